"""A norm's affine map as the VectorNeuron Triton kernels' prologue
(`vector_neuron_triton(..., affine=(m, v, shift))`): the nonlinearity of y = m_c (x - shift_c) + v_c
with y made in registers, against the composition it replaces (`channel_affine`, then the XLA
VectorNeuron) on fresh random inputs at fp32, value and gradients in all five operands; under vmap
with per-example maps; in a ResNet step, where GroupNorm -> VectorNeuronNonlinear hands the norm
to the kernels (layers.normalize_and_activate). Host runs go through Triton's interpreter.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import equinox as eqx

import kernels
from conftest import filter_bank, gradient_errors, rel_l2

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import VNBlocks, vector_neuron_triton  # noqa: E402

from ginjax import _vector_neuron, geometric as geom, layers, models  # noqa: E402
from ginjax._norm_stats import channel_affine  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

EPS = 1e-5
TOL = 1e-5  # fp32 (ARCHITECTURE.md)


def affine_operands(seed, shape, D):
    """w (c, c), x `shape` (c, *spatial[D], *tensor), an affine map (m, v, shift) of the kind a
    norm makes (m near a scaled identity, shift near the channel mean) and a cotangent for y."""
    rng = np.random.default_rng(seed)
    c, T = shape[0], int(np.prod(shape[1 + D :]))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    x = f32(rng.normal(size=shape) + rng.normal(size=(c,) + (1,) * D + shape[1 + D :]))
    w = f32(rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c))
    m = f32(np.eye(T) * rng.uniform(0.5, 2, size=(c, 1, 1)) + 0.3 * rng.normal(size=(c, T, T)))
    v, shift = f32(rng.normal(size=(c, T))), f32(rng.normal(size=(c, T)))
    return w, x, (m, v, shift), f32(rng.normal(size=shape))


def composed(w, x, affine, D, activation):
    """The map applied first (`channel_affine`), then the XLA VectorNeuron."""
    m, v, shift = affine
    c, T = m.shape[:2]
    y = channel_affine(m, v, x.reshape((c, -1, T)), shift).reshape(x.shape)
    return _vector_neuron.vector_neuron(w, y, D, activation, EPS, impl="xla")


def value_and_grads(f, w, x, affine, gy):
    out, vjp = jax.vjp(f, w, x, affine)
    gw, gx, (gm, gv, gs) = vjp(gy)
    return out, gw, gx, gm, gv, gs


def check(got, want, tol=TOL):
    for name, g, r in zip(("y", "gw", "gx", "gm", "gv", "gshift"), got, want):
        assert g.shape == r.shape and g.dtype == jnp.float32, name
        assert bool(jnp.all(jnp.isfinite(g))), f"{name}: non-finite values (an element not written?)"
        err = rel_l2(np.asarray(g), np.asarray(r))
        assert err < tol, f"{name}: relative L2 {err:.2e} >= {tol}"


def check_against_composition(D, shape, activation, planar, blocks=None, seed=0, kernel=None):
    """`kernel` (w, x, affine) -> y, default the Triton kernels with `blocks` and `planar`."""
    w, x, affine, gy = affine_operands(seed, shape, D)
    if kernel is None:
        kernel = lambda w, x, a: vector_neuron_triton(w, x, D, activation, EPS, blocks, planar=planar, affine=a)  # noqa: E731
    got = jax.jit(lambda *args: value_and_grads(kernel, *args))(w, x, affine, gy)
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference where this runs on a GPU
        want = jax.jit(lambda *args: value_and_grads(lambda w, x, a: composed(w, x, a, D, activation), *args))(
            w, x, affine, gy)
    check(got, want)


# T = 2 (D=2 vectors), 3, 4 (D=2 2-tensors), 9 (D=3 2-tensors); c = 3, 5 and 17 pad the dots to 16 and
# 32 channels; pixel counts that leave the last tile ragged
CASES = [
    (2, (3, 5, 6, 2), jax.nn.gelu),
    (3, (16, 3, 5, 6, 3), jax.nn.relu),
    (2, (5, 4, 7, 2, 2), jax.nn.relu),
    (3, (17, 2, 3, 5, 3, 3), jax.nn.gelu),
]


@pytest.mark.parametrize("planar, save_mix", [(True, False), (False, False), (True, True)],
                         ids=["planar", "minor", "planar-saved-mix"])
@pytest.mark.parametrize("D, shape, activation", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_affine_prologue_matches_the_composition(D, shape, activation, planar, save_mix):
    check_against_composition(D, shape, activation, planar, VNBlocks(save_mix=save_mix), seed=D + shape[0])


def test_per_example_maps_under_vmap_are_one_launch():
    # a norm's map is per example (its statistics are): vmapped with the block, the weight shared
    D, shape = 3, (4, 2, 3, 5, 3)
    ops = [affine_operands(s, shape, D) for s in (1, 2)]
    w = ops[0][0]
    xs, gys = jnp.stack([o[1] for o in ops]), jnp.stack([o[3] for o in ops])
    affs = tuple(jnp.stack([o[2][i] for o in ops]) for i in range(3))
    kernel = jax.vmap(lambda w, x, a: vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, affine=a), (None, 0, 0))
    jaxpr = str(jax.make_jaxpr(kernel)(w, xs, affs))
    assert jaxpr.count("pure_callback") == 1, "the batch's forward is one launch"
    got = jax.jit(lambda *args: value_and_grads(kernel, *args))(w, xs, affs, gys)
    ref = jax.vmap(lambda w, x, a: composed(w, x, a, D, jax.nn.gelu), (None, 0, 0))
    check(got, jax.jit(lambda *args: value_and_grads(ref, *args))(w, xs, affs, gys))


def test_bad_affine_names_the_argument():
    D, shape = 2, (3, 5, 6, 2)
    w, x, (m, v, shift), _ = affine_operands(0, shape, D)
    run = lambda a: vector_neuron_triton(w, x, D, jax.nn.relu, EPS, affine=a)  # noqa: E731
    with pytest.raises(ValueError, match=r"`affine` must be None or a tuple \(m, v, shift\)"):
        run((m, v))
    with pytest.raises(ValueError, match=r"`affine`'s m \(float32\[3, 3, 3\]\) must be float32\[3, 2, 2\]"):
        run((jnp.zeros((3, 3, 3)), v, shift))
    with pytest.raises(ValueError, match=r"`affine`'s shift \(float16\[3, 2\]\) must be float32\[3, 2\]"):
        run((m, v, shift.astype(jnp.float16)))
    with pytest.raises(ValueError, match=r"`affine`'s v \(list\) must be float32\[3, 2\]"):
        run((m, [[0.0, 0.0]] * 3, shift))


def _resnet_step(D=2):
    sig_in = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    sig_out = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    model = models.ResNet(D, sig_in, sig_out, 4, conv_filters=filter_bank(D, 3), key=jax.random.PRNGKey(4),
                          use_group_norm=True, activation_f=jax.nn.gelu, num_blocks=1)
    rng = np.random.default_rng(5)
    x = geom.MultiImage({kp: jnp.asarray(rng.normal(size=(2, c) + (8,) * D + (D,) * len(kp[0])) + 0.5, jnp.float32)
                         for kp, c in sig_in}, D, True)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, x):
        out = jax.vmap(lambda xi: eqx.combine(params, static)(xi)[0])(x)
        return sum(jnp.mean(jnp.square(v)) for v in out.values())

    return jax.value_and_grad(step), params, x


@pytest.mark.parametrize("layout, prologue", [("planar", "1"), ("minor", "1"), ("planar", "0")])
def test_resnet_step_hands_the_norm_to_the_kernels(monkeypatch, layout, prologue):
    """A ResNet step (GroupNorm then VectorNeuronNonlinear in each block) with the kernels: on
    planar blocks the vector blocks' norm goes into the kernels as their affine map (no
    `channel_affine` pass), on components-minor ones or with GINJAX_VN_NORM_PROLOGUE=0 it is
    applied first; value and gradients equal the step with the norm applied as its own layer."""
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "triton")
    monkeypatch.setenv(_vector_neuron.LAYOUT_ENV, layout)
    monkeypatch.setenv(_vector_neuron.NORM_PROLOGUE_ENV, prologue)
    in_kernel = layout == "planar" and prologue == "1"
    results, passes = {}, {}
    for fused in (True, False):
        step, params, x = _resnet_step()  # a new function: jit's cache would keep the first trace
        if not fused:
            monkeypatch.setattr(layers, "normalize_and_activate", lambda norm, act, x: act(norm(x)))
        norms, firsts = [], []
        monkeypatch.setattr(layers, "vector_group_norm", _counting(layers.vector_group_norm, norms))
        monkeypatch.setattr(_vector_neuron, "channel_affine", _counting(_vector_neuron.channel_affine, firsts))
        with kernels.use_backend("dense"), jax.default_matmul_precision("highest"):
            results[fused] = jax.jit(step)(params, x)
        passes[fused] = (len(norms), len(firsts))
    # two ConvBlocks with a norm and a nonlinearity
    assert passes == {True: (0, 0 if in_kernel else 2), False: (2, 0)}, passes
    got, want = results[True], results[False]
    assert rel_l2(got[0], want[0]) < TOL
    assert max(gradient_errors(got[1], want[1])) < TOL


def test_bad_prologue_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(_vector_neuron.NORM_PROLOGUE_ENV, "yes")
    w, x, affine, _ = affine_operands(0, (3, 5, 6, 2), 2)
    with pytest.raises(ValueError, match=r"`GINJAX_VN_NORM_PROLOGUE` \(='yes'\) must be one of"):
        _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, layout="planar", impl="triton", affine=affine)


def _counting(fn, calls):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted
