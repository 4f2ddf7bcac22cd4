"""A residual added to a ConvContract's outputs (`kernels.conv_contract(..., residual=)`, the layer's
`residual=`, ResNet's blocks): on every backend equal to the output plus the residual, after the
bias, with gradients in the residual too; on the `triton` backend inside the forward kernels (Triton's
as a prior, the CUDA forward's epilogue: its lane emulation and its lowering), and bad arguments."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ginjax.geometric as geom
import kernels
from bench import _cases
from conftest import filter_bank, fixture_filters, invariant_pairs, random_operands, rel_l2, residual_model_by_plus
from ginjax.layers import ConvContract
from kernels import cuda
from kernels.cuda import _ffi, _plan
from kernels.cuda import conv_contract as cuda_entry
from _conv_cuda_emulate import Emulator, library_emulated, standard_spec

BACKENDS = ["reference", "dense"] + [b for b in ("triton",) if b in kernels.available_backends()]


def _spec(is_torus=True, bias_modes=("add", "mean", "mean"), **geometry):
    filters = fixture_filters(2, 3)
    ins = [(0, 0, 2), (1, 0, 2)]
    out_keys, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 2), (0, 1, 1)])
    return kernels.make_spec(2, ins, out_keys, pairs, is_torus, bias_modes=bias_modes[: len(out_keys)], **geometry)


def _operands(spec, seed, batch=2, N=6, keys=None):
    """Batched inputs, weights, the bias (None without bias modes) and residuals for the output
    keys in `keys` (None: all but the scalar one, so that a key without a residual is covered)."""
    rng = np.random.default_rng(seed)
    xs, ws = random_operands(spec, (N,) * spec.D, seed, batch=batch, dtype=np.float32)
    ws = [jnp.asarray(w) for w in ws]
    bias = None if not spec.has_bias else [
        None if m == "none" else jnp.asarray(rng.standard_normal(o), jnp.float32)
        for m, (_, _, o) in zip(spec.bias_modes, spec.out_keys)]
    x = [jnp.asarray(a[0]) for a in xs]
    shapes = [o.shape for o in jax.eval_shape(lambda x: kernels.conv_contract(spec, x, ws, bias=bias,
                                                                                backend="reference"), x)]
    keys = range(1, len(shapes)) if keys is None else keys
    res = [jnp.asarray(rng.standard_normal((batch,) + s), jnp.float32) if b in keys else None
           for b, s in enumerate(shapes)]
    return [jnp.asarray(a) for a in xs], ws, bias, res


def _loss(spec, backend, fused: bool):
    """A nonlinear loss of the vmapped layer plus residual: given to the backend (`fused`) or added after."""
    def f(xs, ws, bias, res):
        def one(x, r):
            if fused:
                return kernels.conv_contract(spec, x, ws, bias=bias, backend=backend, precision="fp32", residual=r)
            outs = kernels.conv_contract(spec, x, ws, bias=bias, backend="reference", precision="fp32")
            return tuple(o if q is None else o + q for o, q in zip(outs, r))
        outs = jax.vmap(one)(xs, res)
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs
    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("geometry", [dict(is_torus=True), dict(is_torus=False)], ids=["torus", "zeros"])
def test_the_residual_is_added_after_the_bias(backend, geometry):
    """Values and gradients (inputs, weights, bias, residual) against the output plus the residual
    on `reference`, vmapped. With zero padding a "mean" bias reads the output's own mean, which
    must not include the residual (the triton backend then adds that key's residual after it)."""
    spec = _spec(**geometry)
    xs, ws, bias, res = _operands(spec, seed=3)
    (_, got), grads = jax.jit(jax.value_and_grad(_loss(spec, backend, True), argnums=(0, 1, 2, 3), has_aux=True))(
        xs, ws, bias, res)
    (_, want), want_grads = jax.jit(jax.value_and_grad(_loss(spec, backend, False), argnums=(0, 1, 2, 3),
                                                       has_aux=True))(xs, ws, bias, res)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-5
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    for g, w in zip(grads, want_grads):
        assert rel_l2(flat(g), flat(w)) <= 1e-5
    assert grads[3][0] is None and grads[3][1].shape == res[1].shape


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (its interpreter on a CPU)")
def test_triton_adds_the_residual_in_its_kernel():
    """On Triton's kernel the residual is the prior its epilogue adds to (aliased to the output):
    the program has no output-sized add of it."""
    spec = _spec()
    xs, ws, bias, res = _operands(spec, seed=4, batch=1)
    x, r = [a[0] for a in xs], [None if q is None else q[0] for q in res]
    jaxpr = str(jax.make_jaxpr(lambda x, r: kernels.conv_contract(spec, x, ws, bias=bias, backend="triton",
                                                                   residual=r))(x, r))
    shape = ",".join(str(n) for n in r[1].shape)
    assert not [line for line in jaxpr.splitlines() if re.search(rf"f32\[{shape}\] = add ", line)], jaxpr


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the triton backend (its interpreter on a CPU)")
def test_filter_groups_take_the_residual_as_the_first_group_s_prior(monkeypatch, cap=3):
    """A layer Triton runs in filter groups (the cap lowered, as tests/test_triton_filter_groups.py
    does): every launch adds to a prior for each key it writes, the first group's being the
    residual; values and gradients equal the output plus the residual."""
    import functools

    import kernels.triton as triton_backend
    from kernels.triton import conv_contract as triton_entry
    from kernels.triton._filter_groups import filter_groups
    from test_conv_contract_triton import make_layer

    spec = make_layer(2, 3, [("s", 2), ("v", 1), ("t", 1)], [("s", 1), ("v", 2), ("t", 1)])
    capped = functools.partial(filter_groups, cap=cap)
    groups = capped(spec, (6, 6), "fp32", _blocks(spec))
    assert groups is not None and len(groups) >= 2
    monkeypatch.setattr(triton_entry, "filter_groups", capped)
    monkeypatch.setattr(triton_backend, "filter_groups", capped)
    monkeypatch.setenv("GINJAX_TRITON_PARITY", "off")  # else the grouped layer runs parity-blocked
    launched = []
    real_launch = triton_entry.launch

    def spy(spec, mode, blocks, xs, ws, poison=None, offsets=(), priors=()):
        launched.append(len(priors) == len(spec.out_keys) and all(p is not None for p in priors))
        return real_launch(spec, mode, blocks, xs, ws, poison, offsets, priors)

    monkeypatch.setattr(triton_entry, "launch", spy)
    xs, ws, _, res = _operands(spec, seed=5, batch=1, N=6, keys=(0, 1, 2))
    _loss(spec, "triton", True)(xs, ws, None, res)
    # every key of every group's launch (traced more than once) has a prior: the residual, then the sums
    assert launched and len(launched) % len(groups) == 0 and all(launched)
    (_, got), grads = jax.value_and_grad(_loss(spec, "triton", True), argnums=(0, 1, 3), has_aux=True)(xs, ws, None, res)
    (_, want), want_grads = jax.value_and_grad(_loss(spec, "triton", False), argnums=(0, 1, 3), has_aux=True)(
        xs, ws, None, res)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-5
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    for g, w in zip(grads, want_grads):
        assert rel_l2(flat(g), flat(w)) <= 1e-5


def _blocks(spec):
    from kernels.triton._tiling import BlockSizes

    return BlockSizes.for_layer(spec, (6, 6))


def test_bad_residuals_are_clear_errors():
    spec = _spec()
    xs, ws, bias, res = _operands(spec, seed=7, batch=1)
    x = [a[0] for a in xs]
    with pytest.raises(ValueError, match=r"`residual` \(=ndarray\) must be a sequence of 3 entries"):
        kernels.conv_contract(spec, x, ws, bias=bias, residual=np.zeros(3))
    with pytest.raises(ValueError, match=r"`residual` \(=list\) must be a sequence of 3 entries"):
        kernels.conv_contract(spec, x, ws, bias=bias, residual=[None])
    with pytest.raises(ValueError, match=r"`residual\[1\]` \(shape \(2, 6, 6\)\) must have output 1's shape \(2, 6, 6, 2\)"):
        kernels.conv_contract(spec, x, ws, bias=bias, residual=[None, jnp.zeros((2, 6, 6)), None])
    with pytest.raises(ValueError, match=r"`residual\[0\]` has dtype int32"):
        kernels.conv_contract(spec, x, ws, bias=bias, residual=[jnp.zeros((2, 6, 6), jnp.int32), None, None])


# ---- the layer and the residual models ---------------------------------------------------------
def _layer_and_input(seed=0):
    D, N = 2, 6
    bank = filter_bank(D, 3)
    sig = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    layer = ConvContract(sig, sig, bank, use_bias="auto", key=jax.random.PRNGKey(seed), backend="dense")
    rng = np.random.default_rng(seed)
    x = geom.MultiImage({((), 0): jnp.asarray(rng.standard_normal((2, N, N)), jnp.float32),
                         ((False,), 0): jnp.asarray(rng.standard_normal((2, N, N, D)), jnp.float32)}, D, True)
    return layer, x


def test_the_layer_adds_a_residual_as_plus_would(monkeypatch):
    """`layer(x, residual=r)` equals `layer(x) + r`; with the result's keys, blocks and dtype the
    residual goes to `kernels.conv_contract`, otherwise `+` adds it (and raises what `+` raises)."""
    layer, x = _layer_and_input()
    seen = []
    real = kernels.conv_contract

    def spy(*a, **kw):
        seen.append(kw.get("residual"))
        return real(*a, **kw)

    monkeypatch.setattr(kernels, "conv_contract", spy)
    r = geom.MultiImage({k: 0.5 * v + 1.0 for k, v in x.items()}, x.D, x.is_torus)
    got = layer(x, residual=r)
    want = layer(x) + r
    for k in want.keys():
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-6)
    assert seen[0] is not None and len(seen[0]) == 2 and seen[1] is None
    # another dtype: added by `+` after the layer (its promotion), not given to the backend
    seen.clear()
    r_bf16 = geom.MultiImage({k: v.astype(jnp.bfloat16) for k, v in r.items()}, x.D, x.is_torus)
    got = layer(x, residual=r_bf16)
    assert seen == [None]
    for k in want.keys():
        np.testing.assert_allclose(np.asarray(got[k], np.float32), np.asarray(want[k]), rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match=r"`residual` \(=dict\) must be None or a geom.MultiImage"):
        layer(x, residual=dict(r.items()))
    short = geom.MultiImage({((), 0): r[((), 0)]}, x.D, x.is_torus)
    with pytest.raises(Exception):  # the keys differ: what `+` says
        layer(x, residual=short)


def test_residual_models_give_the_block_input_to_its_last_convolution(monkeypatch):
    """ResNet (preactivation order: the residual goes into its blocks' last ConvContract) and
    DilResNet (conv -> norm -> activation: added after) compute what their blocks plus `+` did:
    values (and ResNet's gradients) against a loop that adds the residual by `+`."""
    from ginjax import models
    from ginjax.models import _resnet

    D, N = 2, 8
    bank = filter_bank(D, 3)
    sig = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    rng = np.random.default_rng(2)
    x = geom.MultiImage({((), 0): jnp.asarray(rng.standard_normal((1, N, N)), jnp.float32),
                         ((False,), 0): jnp.asarray(rng.standard_normal((1, N, N, D)), jnp.float32)}, D, True)

    for cls, kw in ((models.ResNet, dict(num_blocks=2)), (models.DilResNet, dict(num_blocks=1))):
        model = cls(D, sig, sig, depth=4, equivariant=True, conv_filters=bank, key=jax.random.PRNGKey(0), **kw)
        seen = []
        real = kernels.conv_contract
        monkeypatch.setattr(kernels, "conv_contract", lambda *a, **k: seen.append(k.get("residual")) or real(*a, **k))
        got = jax.jit(_resnet._run_residual)(model, x)  # jit: one compile instead of op-by-op dispatch
        monkeypatch.setattr(kernels, "conv_contract", real)
        want = jax.jit(residual_model_by_plus)(model, x)
        for k in want.keys():
            np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-5)
        fused = sum(r is not None for r in seen)
        assert fused == (2 if cls is models.ResNet else 0), (cls.__name__, fused)
        if cls is not models.ResNet:  # the same loop, with `+` in the end: its values suffice
            continue
        loss = lambda m, f: sum(jnp.sum(jnp.sin(b)) for b in f(m, x).values())  # noqa: E731
        g_got = jax.jit(jax.grad(lambda m: loss(m, _resnet._run_residual)))(model)
        g_want = jax.jit(jax.grad(lambda m: loss(m, residual_model_by_plus)))(model)
        for a, b in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ---- the CUDA forward: its epilogue emulated, and its lowering ---------------------------------
@pytest.mark.parametrize("layout", ["minor", "planar"])
@pytest.mark.parametrize("n_groups, keys", [(1, (0, 1)), (2, (1,))])
def test_the_cuda_epilogue_adds_the_residual_once(layout, n_groups, keys):
    """The lane emulation of the forward (tests/_conv_cuda_emulate.py) with residuals: the first
    pass reads each residual float exactly once, at its output's addresses, and adds it; a later
    channel group's pass does not again. Against `reference` plus the residual, both layouts."""
    planar = layout == "planar"
    spec = standard_spec(32, 16) if n_groups == 2 else standard_spec(16, 8)
    spatial = (2, 3, 16)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=9)
    x0, x1 = (np.asarray(x[0]) for x in xs)
    o = spec.out_keys[0][2]
    rng = np.random.default_rng(10)
    res = [rng.standard_normal((o,) + spatial).astype(np.float32) if 0 in keys else None,
           rng.standard_normal((o,) + spatial + (3,)).astype(np.float32)]
    packed = _plan.pack_weights(spec, ws, xp=np, tf32=False)
    emu = Emulator(spec, x0, x1, packed, 2, tf32=False, n_groups=n_groups, planar=planar, residuals=res)
    got = emu.run()[:2]
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    for key in range(2):
        w = np.asarray(want[key]) + (0 if res[key] is None else res[key])
        assert rel_l2(got[key], w) <= 1e-5
        if res[key] is not None:
            assert (emu.residual_reads[key] == 1).all()


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_output_groups_each_add_their_slice_of_the_residual(monkeypatch, layout):
    """kernels.triton's CUDA forward of 32 output channels per key as two launches of 16, with
    residuals, the FFI calls replaced by the emulation configured only from what each launch gets:
    the first launch is `ginjax_cuda_forward_add` (no aliases), the second
    `ginjax_cuda_forward_into_add` (the previous results aliased, operands 4 and 5); both take the
    whole residuals (operands after them, in the results' layout, `residual` = 3) and each adds its
    channels, each residual float read once over the two."""
    from kernels.triton import _cuda_dispatch

    library_emulated(monkeypatch)
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    vector = cuda_entry.PLANAR_VECTOR if layout == "planar" else None
    spec, sub, spatial = standard_spec(16, 32), standard_spec(16, 16), (2, 3, 16)
    rng = np.random.default_rng(11)
    res = (jnp.asarray(rng.standard_normal((32,) + spatial), jnp.float32),
           jnp.asarray(rng.standard_normal((32,) + spatial + (3,)), jnp.float32))
    calls, reads = [], []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts, input_output_aliases=None):
        into = target == _ffi.INTO_ADD_TARGET
        assert list(input_layouts) == [None, vector, None, None] + [None, vector] * (2 if into else 1)

        def call(*operands, geom, residual):
            calls.append((target, int(geom[20]), input_output_aliases, int(residual)))
            prev = operands[4:6] if into else ()

            def host(x0, x1, w, off, *rest):
                emu = Emulator(sub, np.asarray(x0), np.asarray(x1), np.asarray(w), int(geom[6]), tf32=False,
                               offsets=np.asarray(off), out_channels=int(geom[19]), first_channel=int(geom[20]),
                               out=[np.asarray(p) for p in rest[:2]] if into else None, planar=bool(geom[21]),
                               residuals=[np.asarray(r) for r in rest[-2:]])
                outs = emu.run()[:2]
                reads.append(emu.residual_reads)
                return tuple(np.asarray(a, np.float32) for a in outs)

            return jax.pure_callback(host, tuple(shapes), *operands[:4], *prev, *operands[-2:])

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=12)
    got = _cuda_dispatch.forward_by_output_groups((sub, 2), [x[0] for x in xs], ws, None, residuals=res)
    assert calls == [(_ffi.ADD_TARGET, 0, None, 3), (_ffi.INTO_ADD_TARGET, 16, {4: 0, 5: 1}, 3)]
    for key in range(2):
        assert ((reads[0][key] + reads[1][key]) == 1).all()
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    for g, w, r in zip(got, want, res):
        assert rel_l2(g, w + r) <= kernels.TOLERANCE["tf32"]  # the packed weights are tf32


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_the_residual_lowers_to_read_only_operands(monkeypatch, layout):
    """The real FFI call of a vmapped forward with a vector residual only, lowered for CUDA here:
    `ginjax_cuda_forward_add` with the residual after the offsets in the result's layout, not
    aliased, a one-float placeholder for the scalar key, `residual = 2`."""

    library_emulated(monkeypatch)
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    spec = standard_spec(16, 16)
    xs, ws, _ = _cases.spec_operands(spec, (2, 3, 16), 2, seed=13)
    r1 = jnp.zeros((2, 16, 2, 3, 16, 3), jnp.float32)
    run = jax.jit(jax.vmap(lambda x, r: cuda_entry.forward_call(spec, x, ws, residuals=(None, r)), in_axes=(0, 0)))
    text = run.trace(xs, r1).lower(lowering_platforms=("cuda",)).as_text()
    (call,) = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert re.search(r"custom_call @(\w+)", call).group(1) == _ffi.ADD_TARGET
    assert "output_operand_alias" not in call and "residual = 2" in call, call
    vector = "[4, 3, 2, 5, 1, 0]" if layout == "planar" else "[5, 4, 3, 2, 1, 0]"
    got = re.findall(r"dense<(\[[\d, ]+\])>", call.split("operand_layouts")[1].split("result_layouts")[0])
    assert got == ["[4, 3, 2, 1, 0]", vector, "[1, 0]", "[1, 0]", "[1, 0]", vector], got


@pytest.mark.parametrize("dilation, switch", [(1, None), (2, None), (1, "0")])
def test_the_cuda_forward_gets_the_residual_and_the_input_gradient_none(monkeypatch, dilation, switch):
    """The public API on the triton backend with CUDA stand-ins: the forward call gets the residuals
    (its epilogue's), the input gradient's call none; a dilated layer's forward none either (the
    kernels with residuals are compiled at dilation 1: added after it), nor any with
    GINJAX_CUDA_RESIDUAL=0. Values and gradients equal `reference`'s."""
    if switch is None:
        monkeypatch.delenv(cuda_entry.RESIDUAL_ENV, raising=False)
    else:
        monkeypatch.setenv(cuda_entry.RESIDUAL_ENV, switch)
    spec = standard_spec(2, 2, dilation)
    spatial = (4, 4, 4)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 2, seed=14)
    xs, ws = [jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws]
    rng = np.random.default_rng(15)
    res = [jnp.asarray(rng.standard_normal((2, 2) + spatial), jnp.float32),
           jnp.asarray(rng.standard_normal((2, 2) + spatial + (3,)), jnp.float32)]
    given = []

    def forward(s, inputs, weights, offsets=None, fp32=False, residuals=None):
        given.append(residuals)
        outs = kernels.conv_contract(s, inputs, weights, backend="dense", precision="fp32")
        return tuple(y if r is None else y + r for y, r in zip(outs, residuals or (None, None)))

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "coverage", lambda s, spatial, dtype: (True, "stand-in"))
    monkeypatch.setattr(cuda, "forward_call", forward)
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cuda")
    monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "triton")

    def loss(backend, fused):
        def f(xs, ws, res):
            def one(x, r):
                if fused:
                    return kernels.conv_contract(spec, x, ws, backend=backend, residual=r)
                return tuple(o + q for o, q in zip(kernels.conv_contract(spec, x, ws, backend=backend,
                                                                          precision="fp32"), r))
            outs = jax.vmap(one)(xs, res)
            return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs
        return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

    (_, got), grads = loss("triton", True)(xs, ws, res)
    assert len(given) == 2 and given[1] is None  # forward, input gradient
    assert (given[0] is not None) == (dilation == 1 and switch is None)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = loss("reference", False)(xs, ws, res)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    for g, w in zip(grads, want_grads):
        assert rel_l2(flat(g), flat(w)) <= kernels.TOLERANCE["tf32"]
