"""The VectorNeuron as fused Triton kernels (kernels.triton.vector_neuron_triton) on the host,
through Triton's interpreter (TRITON_INTERPRET=1, torch CPU tensors), against ginjax's XLA path
(ginjax._vector_neuron) and autodiff of the plain chain, on fresh random inputs at fp32.

Outputs on the interpreter path start as NaN, so an element the kernels fail to write shows up
as non-finite; every comparison checks finiteness first.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import equinox as eqx

import kernels
from conftest import filter_bank, gradient_errors, rel_l2

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import VNBlocks, vector_neuron_triton  # noqa: E402

from ginjax import _vector_neuron, geometric as geom, models  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

EPS = 1e-5
TOL = 1e-5  # fp32 (ARCHITECTURE.md)


def _operands(seed, c, spatial, D, k, batch=()):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=batch + (c,) + spatial + (D,) * k), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c), jnp.float32)
    gy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    return w, x, gy


def _plain(w, block, D, activation, eps):
    """ginjax 0.1.8's formulation, differentiated by autodiff."""
    x = block.reshape(block.shape[: 1 + D] + (-1,))
    d = jnp.tensordot(w, x, axes=1)
    n = jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True))
    u = d / (n + eps)
    s = jnp.sum(x * u, axis=-1, keepdims=True)
    parallel = s * u
    return (activation(s) / (jnp.abs(s) + eps) * parallel + (x - parallel)).reshape(block.shape)


def _value_and_grads(f, w, x, gy):
    y, vjp = jax.vjp(f, w, x)
    return (y,) + vjp(gy)


def _check(got, want, tol=TOL):
    for name, g, r in zip(("y", "gw", "gx"), got, want):
        assert g.shape == r.shape and g.dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(g))), f"{name}: non-finite values (an element not written?)"
        err = rel_l2(np.asarray(g), np.asarray(r))
        assert err < tol, f"{name}: relative L2 {err:.2e} >= {tol}"


# D, tensor order k, channels, spatial, activation: T = 2 (D=2 vectors), 3, 4 (D=2 2-tensors), 9
# (D=3 2-tensors); c = 3, 5 and 17 pad the dots to 16 and 32 channels. Components-minor blocks of
# T = 2, 3 and 4 are read and written whole pixels at a time (`_vn_kernel._packed`), T = 9 at stride T.
CASES = [
    (2, 1, 3, (5, 6), jax.nn.gelu),
    (3, 1, 16, (3, 5, 6), jax.nn.relu),
    (2, 2, 5, (4, 7), jax.nn.relu),
    (3, 2, 17, (2, 3, 5), jax.nn.gelu),
]


@pytest.mark.parametrize("planar, save_mix", [(True, False), (False, False), (True, True)],
                         ids=["planar", "minor", "planar-saved-mix"])
@pytest.mark.parametrize("D,k,c,spatial,activation", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_forward_and_gradients_match_xla(D, k, c, spatial, activation, planar, save_mix):
    w, x, gy = _operands(D * 10 + c, c, spatial, D, k)
    blocks = VNBlocks(save_mix=save_mix)
    got = jax.jit(lambda w, x, gy: _value_and_grads(
        lambda w, x: vector_neuron_triton(w, x, D, activation, EPS, blocks, planar=planar), w, x, gy))(w, x, gy)
    xla = jax.jit(lambda w, x, gy: _value_and_grads(
        lambda w, x: _vector_neuron.vector_neuron(w, x, D, activation, EPS, layout="minor", impl="xla"), w, x, gy))
    _check(got, xla(w, x, gy))
    plain = jax.jit(lambda w, x, gy: _value_and_grads(lambda w, x: _plain(w, x, D, activation, EPS), w, x, gy))
    _check(got, plain(w, x, gy))


@pytest.mark.parametrize("extra, planar", [({}, True), ({}, False), ({"bwd_stages": 2, "precision": "tf32x3"}, True),
                                           ({"save_mix": True}, False)])
def test_weight_gradient_partials_ragged_and_bit_identical(extra, planar):
    # 90 pixels in tiles of 16 (the last one ragged), 6 tiles shared by 4 programs per example
    # (two of them walk past the last tile): the partial sums' fixed order, run twice; also with
    # a pipelined loop and tensor-core dots (the interpreter runs them at fp32)
    D, c = 3, 3
    w, x, gy = _operands(7, c, (3, 5, 6), D, 1)
    blocks = VNBlocks(pixels=32, bwd_pixels=16, bwd_num_warps=2, groups=4, **extra)
    run = jax.jit(lambda w, x, gy: _value_and_grads(
        lambda w, x: vector_neuron_triton(w, x, D, jax.nn.relu, EPS, blocks, planar=planar), w, x, gy))
    first, second = run(w, x, gy), run(w, x, gy)
    ref = jax.jit(lambda w, x, gy: _value_and_grads(
        lambda w, x: _vector_neuron.vector_neuron(w, x, D, jax.nn.relu, EPS, impl="xla"), w, x, gy))
    _check(first, ref(w, x, gy))
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _callback_results(fn, *args) -> list[int]:
    """The number of results of each host launch in fn's jaxpr, nested programs included."""
    from bench._flops import equations

    return [len(e.outvars) for e in equations(jax.make_jaxpr(fn)(*args).jaxpr) if e.primitive.name == "pure_callback"]


def test_saved_mix_is_written_only_under_differentiation_and_vmaps(monkeypatch):
    # save_mix: the forward writes d = W x only where a backward will read it; under vmap of the
    # forward, and with only the cotangent vmapped (d then shared, broadcast to the launch's batch)
    D, c = 3, 3
    w, x, gy = _operands(17, c, (2, 3, 5), D, 1)
    blocks = VNBlocks(save_mix=True)
    f = lambda w, x: vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, blocks)  # noqa: E731
    ref = lambda w, x: _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla")  # noqa: E731
    assert _callback_results(f, w, x) == [1]
    assert _callback_results(lambda w, x: jax.vjp(f, w, x)[0], w, x) == [2]
    xs = jnp.stack([x, -0.5 * x])
    gys = jnp.stack([gy, gy[::-1]])
    batched = lambda fn: jax.jit(lambda w, xs, gys: _value_and_grads(jax.vmap(fn, in_axes=(None, 0)), w, xs, gys))  # noqa: E731
    _check(batched(f)(w, xs, gys), batched(ref)(w, xs, gys))

    def cotangents_vmapped(fn):
        y, vjp = jax.vjp(fn, w, x)
        return (y,) + jax.vmap(vjp)(gys)

    got, want = jax.jit(lambda: cotangents_vmapped(f))(), jax.jit(lambda: cotangents_vmapped(ref))()
    _check((got[0], got[1][1], got[2][1]), (want[0], want[1][1], want[2][1]))
    _check((got[0], got[1][0], got[2][0]), (want[0], want[1][0], want[2][0]))
    # through ginjax's entry, switched by the environment; a bad value names the variable
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "triton")
    monkeypatch.setenv(_vector_neuron.SAVE_MIX_ENV, "1")
    g = lambda w, x: _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS)  # noqa: E731
    assert _callback_results(lambda w, x: jax.vjp(g, w, x)[0], w, x) == [2]
    monkeypatch.setenv(_vector_neuron.SAVE_MIX_ENV, "yes")
    with pytest.raises(ValueError, match=r"`GINJAX_VN_SAVE_MIX` \(='yes'\) must be one of"):
        g(w, x)


def _callbacks(jaxpr) -> int:
    return str(jaxpr).count("pure_callback")


def test_vmap_is_one_launch_and_matches_xla(monkeypatch):
    # through ginjax's entry with the implementation switched by the environment
    D, c, batch = 3, 16, (2,)
    w, x, gy = _operands(11, c, (2, 3, 5), D, 1, batch)
    act = jax.nn.gelu

    def grads(impl, w, x, gy):
        monkeypatch.setenv(_vector_neuron.IMPL_ENV, impl)
        f = jax.vmap(lambda w, x: _vector_neuron.vector_neuron(w, x, D, act, EPS), in_axes=(None, 0))
        return jax.jit(lambda w, x, gy: _value_and_grads(f, w, x, gy)), f

    run, f = grads("triton", w, x, gy)
    # forward: one launch for the batch; backward: the kernel and the partial sums
    assert _callbacks(jax.make_jaxpr(f)(w, x)) == 1
    assert _callbacks(jax.make_jaxpr(lambda w, x, gy: _value_and_grads(f, w, x, gy))(w, x, gy)) == 3
    got = run(w, x, gy)
    ref_run, ref_f = grads("xla", w, x, gy)
    assert _callbacks(jax.make_jaxpr(ref_f)(w, x)) == 0
    _check(got, ref_run(w, x, gy))


def test_nested_vmap_with_per_example_weights():
    # outer vmap shares the weights, inner vmap maps them: both fold into one launch's batch
    D = 2
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 4, 4)) / 2, jnp.float32)
    gy = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def run(one):
        f = jax.vmap(jax.vmap(one), in_axes=(None, 0))
        return jax.jit(lambda w, x, gy: _value_and_grads(f, w, x, gy))(w, x, gy)

    got = run(lambda w, x: vector_neuron_triton(w, x, D, jax.nn.gelu, EPS))
    _check(got, run(lambda w, x: _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla")))


def test_nan_propagates_like_xla():
    D, c = 2, 3
    w, x, gy = _operands(5, c, (5, 6), D, 1)
    x = x.at[1, 2, 3, 0].set(jnp.nan)
    got = jax.jit(lambda w, x, gy: _value_and_grads(
        lambda w, x: vector_neuron_triton(w, x, D, jax.nn.relu, EPS), w, x, gy))(w, x, gy)
    with jax.default_matmul_precision("highest"):  # no TF32 where this runs on a GPU
        ref = jax.jit(lambda w, x, gy: _value_and_grads(
            lambda w, x: _vector_neuron.vector_neuron(w, x, D, jax.nn.relu, EPS, impl="xla"), w, x, gy))(w, x, gy)
    for name, g, r in zip(("y", "gw", "gx"), got, ref):
        g, r = np.asarray(g), np.asarray(r)
        assert np.array_equal(np.isnan(g), np.isnan(r)), name
        assert np.isnan(r).any(), name
        ok = ~np.isnan(r)
        if ok.any():
            assert rel_l2(g[ok], r[ok]) < TOL, name


def test_unsupported_activation_falls_back_to_xla():
    D, c = 2, 3
    w, x, _ = _operands(3, c, (5, 6), D, 1)
    for act in (jax.nn.tanh, functools.partial(jax.nn.gelu, approximate=False)):
        f = lambda w, x: _vector_neuron.vector_neuron(w, x, D, act, EPS, impl="triton")  # noqa: E731
        assert _callbacks(jax.make_jaxpr(f)(w, x)) == 0
        want = _vector_neuron.vector_neuron(w, x, D, act, EPS, impl="xla")
        assert np.array_equal(np.asarray(f(w, x)), np.asarray(want))
    # other dtypes, an eps that is an array (not a literal) and tensor order 3 take the XLA path too
    assert not _vector_neuron.triton_covers(w, x.astype(jnp.float16), D, jax.nn.relu, EPS)
    assert not _vector_neuron.triton_covers(w, x, D, jax.nn.relu, jnp.float32(EPS))
    assert not _vector_neuron.triton_covers(w, x, D, jax.nn.relu, True)  # a bool is no epsilon: the kernel refuses it
    assert not _vector_neuron.triton_covers(w, jnp.zeros((c, 5, 6, 2, 2, 2)), D, jax.nn.relu, EPS)
    # channels past what the kernels keep in registers: 64 for vectors, 32 for 2-tensors
    assert _vector_neuron.triton_covers(jnp.zeros((64, 64)), jnp.zeros((64, 5, 6, 2)), D, jax.nn.relu, EPS)
    assert not _vector_neuron.triton_covers(jnp.zeros((65, 65)), jnp.zeros((65, 5, 6, 2)), D, jax.nn.relu, EPS)
    assert not _vector_neuron.triton_covers(jnp.zeros((33, 33)), jnp.zeros((33, 5, 6, 2, 2)), D, jax.nn.relu, EPS)
    assert _vector_neuron.triton_covers(w, x, D, jax.nn.relu, EPS)


def test_bad_input_names_the_argument(monkeypatch):
    D, c = 2, 3
    w, x, _ = _operands(3, c, (5, 6), D, 1)
    with pytest.raises(ValueError, match="`weight`"):
        vector_neuron_triton(w[:2], x, D, jax.nn.relu, EPS)
    with pytest.raises(ValueError, match="`block`"):
        vector_neuron_triton(w, x[..., 0], D, jax.nn.relu, EPS)
    with pytest.raises(ValueError, match="`block`"):
        vector_neuron_triton(w, jnp.concatenate([x, x], axis=-1), D, jax.nn.relu, EPS)
    with pytest.raises(ValueError, match="`block`.*float32"):
        vector_neuron_triton(w, x.astype(jnp.float16), D, jax.nn.relu, EPS)
    with pytest.raises(ValueError, match="`activation`"):
        vector_neuron_triton(w, x, D, jax.nn.tanh, EPS)
    with pytest.raises(ValueError, match="`eps`"):
        vector_neuron_triton(w, x, D, jax.nn.relu, 0.0)
    with pytest.raises(ValueError, match="`blocks.pixels`"):
        vector_neuron_triton(w, x, D, jax.nn.relu, EPS, VNBlocks(pixels=24))
    with pytest.raises(ValueError, match="`blocks.bwd_num_warps`"):
        vector_neuron_triton(w, x, D, jax.nn.relu, EPS, VNBlocks(bwd_num_warps=3))
    with pytest.raises(ValueError, match=r"`blocks.bwd_stages` \(=0\)"):
        vector_neuron_triton(w, x, D, jax.nn.relu, EPS, VNBlocks(bwd_stages=0))
    with pytest.raises(ValueError, match=r"`blocks.precision` \(='bf16'\) must be None or one of"):
        vector_neuron_triton(w, x, D, jax.nn.relu, EPS, VNBlocks(precision="bf16"))
    with pytest.raises(ValueError, match="`impl`"):
        _vector_neuron.vector_neuron(w, x, D, jax.nn.relu, EPS, impl="pallas")
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "pallas")
    with pytest.raises(ValueError, match=_vector_neuron.IMPL_ENV):
        _vector_neuron.vector_neuron(w, x, D, jax.nn.relu, EPS)


def test_resnet_step_with_the_kernels_matches_xla(monkeypatch):
    """A ResNet train step (value and gradients; D=2, 8x8, batch 2, gelu) with its
    VectorNeuronNonlinear layers on the kernels (GINJAX_VN_IMPL=triton) against the XLA path."""
    D = 2
    sig_in = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    sig_out = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    model = models.ResNet(D, sig_in, sig_out, 4, conv_filters=filter_bank(D, 3), key=jax.random.PRNGKey(4),
                          use_group_norm=True, activation_f=jax.nn.gelu, num_blocks=1)
    rng = np.random.default_rng(5)
    x = geom.MultiImage({kp: jnp.asarray(rng.normal(size=(2, c) + (8,) * D + (D,) * len(kp[0])) * 0.5, jnp.float32)
                         for kp, c in sig_in}, D, True)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, x):
        out = jax.vmap(lambda xi: eqx.combine(params, static)(xi)[0])(x)
        return sum(jnp.mean(jnp.square(v)) for v in out.values())

    results = {}
    for impl in ("triton", "xla"):
        monkeypatch.setenv(_vector_neuron.IMPL_ENV, impl)
        with kernels.use_backend("dense"), jax.default_matmul_precision("highest"):
            lowered = jax.jit(jax.value_and_grad(step)).lower(params, x)
            launches = lowered.as_text().count("python_cpu_callback")  # the interpreter's pure_callbacks
            assert (launches > 0) == (impl == "triton"), (impl, launches)
            results[impl] = lowered.compile()(params, x)
    got, want = results["triton"], results["xla"]
    assert rel_l2(got[0], want[0]) < TOL
    assert max(gradient_errors(got[1], want[1])) < TOL


_COMPILE_FOR_HOPPER = """
from kernels.triton import _vn_kernel as vk

for C, T in ((16, 3), (32, 3), (3, 2)):
    tiling = vk._DEFAULT_TILING[(vk._padded(C), False)]
    for planar in (True, False):
        fwd = vk.plan_forward(vk.VNGeometry(C, T, 64**3, True, False, planar=planar), "relu", 1e-5, *tiling[0])
        bwd = vk.plan_backward(vk.VNGeometry(C, T, 64**3, True, False, True, planar=planar), "gelu", 1e-5,
                               *tiling[1], 64)
        plans = [fwd, bwd]
        if C == 16:  # with a norm's affine map as the prologue
            plans += [vk.plan_forward(vk.VNGeometry(C, T, 64**3, True, False, planar=planar, affine=True, a_batched=True),
                                      "gelu", 1e-5, *tiling[0], sums=True),
                      vk.plan_backward(vk.VNGeometry(C, T, 64**3, True, False, True, planar=planar, affine=True,
                                                     a_batched=True), "gelu", 1e-5, *tiling[1], 64),
                      # adding a residual block's input (DilResNet's blocks), with the means
                      vk.plan_forward(vk.VNGeometry(C, T, 64**3, True, False, planar=planar), "gelu", 1e-5,
                                      *tiling[0], sums=True, residual=True)]
        for plan in plans:
            compiled = compile_for_hopper(plan)
            assert compiled.asm.get("cubin"), plan.name
            assert ("tl.split" in plan.source) == (not planar), plan.name  # packed where minor
            print("compiled", plan.name, C, T, planar, "stack", stack_bytes(compiled))
"""


@pytest.mark.slow
def test_kernels_compile_for_hopper():
    """If this Triton can compile offline, the forward and backward sources at the GPU's default
    tilings (16 and 32 channels of 3D vectors, 3 of 2D ones; planar and packed components-minor;
    at 16 channels also with the affine prologue, whose forward adds up its output's means as in
    the models, and the forward adding a residual)
    compile to sm_90 cubins without a GPU (tests/_hopper_compile.py), and where Triton ships
    cuobjdump, with no stack (no spills) for the 3D vectors, but for the few bytes of the
    32-channel backward's measured tiling."""
    from _hopper_compile import run_offline

    lines = [line.split() for line in run_offline(_COMPILE_FOR_HOPPER) if line.startswith("compiled")]
    assert len(lines) == 18, lines
    for _, name, C, T, planar, _, stack in lines:
        # the 32-channel backward's tiling was picked by its measured time, spills included (8
        # and 16 bytes with Triton 3.6, up to 40 with 3.9): a few bytes, not a register blow-up
        allowed = 64 if C == "32" and name.startswith("vector_neuron_bwd") else 0
        if T == "3" and stack != "None":
            assert int(stack) <= allowed, f"{name} ({C} channels, planar={planar}) spills: stack {stack}"


def test_default_precision_follows_the_switch_and_the_matmul_precision(monkeypatch):
    """GINJAX_VN_TRITON_PRECISION names the dots' precision; "auto" gives TF32 only to blocks of at
    least TF32_MIN_CHANNELS channels and at most TF32_MAX_COMPONENTS components, and only while
    JAX's default matmul precision is TF32."""
    from kernels.triton import _vn_kernel

    assert (_vn_kernel.TF32_MIN_CHANNELS, _vn_kernel.TF32_MAX_COMPONENTS) == (64, 2)
    assert _vn_kernel.default_precision(32, 2) == "ieee"
    assert _vn_kernel.default_precision(64, 2) == "tf32"
    assert _vn_kernel.default_precision(64, 3) == "ieee"  # spills in TF32 (ptxas)
    with jax.default_matmul_precision("highest"):
        assert _vn_kernel.default_precision(64, 2) == "ieee"
    monkeypatch.setattr(_vn_kernel, "TF32_MIN_CHANNELS", None)
    assert _vn_kernel.default_precision(256, 2) == "ieee"
    for value in ("ieee", "tf32", "tf32x3"):
        monkeypatch.setenv(_vn_kernel.PRECISION_ENV, value)
        assert _vn_kernel.default_precision(8, 3) == value
    monkeypatch.setenv(_vn_kernel.PRECISION_ENV, "bf16")
    with pytest.raises(ValueError, match=_vn_kernel.PRECISION_ENV):
        _vn_kernel.default_precision(8, 3)


def test_the_switch_reaches_the_kernels_and_tf32_meets_its_tolerance(monkeypatch):
    """With GINJAX_VN_TRITON_PRECISION=tf32 both kernels are planned with TF32 dots, and the values
    and both gradients stay within tf32's tolerance of the plain chain at fp32."""
    from kernels.triton import _vn_kernel
    from kernels.triton import vector_neuron as vn_module

    seen = []
    for name in ("plan_forward", "plan_backward"):
        original = getattr(vn_module, name)

        def spy(*args, _original=original, _name=name, **kw):
            seen.append((_name, kw.get("precision")))
            return _original(*args, **kw)

        monkeypatch.setattr(vn_module, name, spy)
    monkeypatch.setenv(_vn_kernel.PRECISION_ENV, "tf32")
    D, k = 2, 1
    w, x, gy = _operands(7, 32, (8, 8), D, k)
    got = _value_and_grads(lambda w, x: vector_neuron_triton(w, x, D, jax.nn.gelu, EPS), w, x, gy)
    with jax.default_matmul_precision("highest"):
        want = _value_and_grads(lambda w, x: _plain(w, x, D, jax.nn.gelu, EPS), w, x, gy)
    assert {p for _, p in seen} == {"tf32"} and {n for n, _ in seen} == {"plan_forward", "plan_backward"}
    for g, r in zip(got, want):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_l2(g, r) <= kernels.TOLERANCE["tf32"]
