"""The bias of a ConvContract (kernels._bias, the `bias=` argument, Backend.fused_bias): every
mode on every backend against ginjax 0.1.8's layer bias written out plainly, the input-mean
shortcut against the output's own mean (torus and the non-torus fallback), gradients with
respect to bias, inputs and weights at fp32, and bad bias arguments."""

from __future__ import annotations

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax.layers import ConvContract
from kernels import _bias, _registry
from conftest import filter_bank, fixture_filters, invariant_pairs, random_operands, rel_l2

SCALAR = ((), 0)
FUSED = [b for b in ("triton", "pallas") if b in kernels.available_backends()]


def _spec(D=2, M=3, is_torus=True, bias_modes=None, outs=((0, 0, 2), (1, 0, 2), (0, 1, 1)), **geometry):
    filters = fixture_filters(D, M)
    ins = [(0, 0, 2), (1, 0, 2)]
    out_keys, pairs = invariant_pairs(filters, ins, list(outs))
    if bias_modes is not None:
        bias_modes = bias_modes[: len(out_keys)]
    return kernels.make_spec(D, ins, out_keys, pairs, is_torus, bias_modes=bias_modes, **geometry)


def _bias_arrays(spec, seed):
    rng = np.random.default_rng(seed)
    return [
        None if m == "none" else jnp.asarray(rng.standard_normal(o).astype(np.float32))
        for m, (_, _, o) in zip(spec.bias_modes, spec.out_keys)
    ]


def _plain_bias(spec, outs, bias):
    """The bias as ginjax 0.1.8's layer adds it: after the convolution, from the output's mean."""
    res = []
    for out, b, mode in zip(outs, bias, spec.bias_modes):
        if mode == "none":
            res.append(out)
            continue
        b = b.reshape((-1,) + (1,) * (out.ndim - 1))
        if mode == "add":
            res.append(out + b)
        else:
            res.append(out + b * jnp.mean(out, axis=tuple(range(1, 1 + spec.D)), keepdims=True))
    return tuple(res)


def _fp32(spec, seed, N=6):
    inputs, weights = random_operands(spec, (N,) * spec.D, seed, dtype=np.float32)
    return [jnp.asarray(x) for x in inputs], [jnp.asarray(w) for w in weights]


def _assert_mean_close(mean, out):
    """`mean` is the spatial mean of `out` to fp32 accuracy. Some means vanish by symmetry (the
    tap sum of an invariant filter of odd parity, or mapping a scalar to a vector, is zero); their
    error is measured against the output's scale instead."""
    D = out.ndim - mean.ndim
    want = np.asarray(jnp.mean(out, axis=tuple(range(1, 1 + D))), np.float64)
    assert mean.shape == want.shape
    scale = np.sqrt(np.mean(np.square(np.asarray(out, np.float64)))) * np.sqrt(want.size)
    err = np.linalg.norm(np.asarray(mean, np.float64) - want)
    assert err <= 1e-5 * max(np.linalg.norm(want), scale)


GEOMETRIES = [
    dict(is_torus=True),  # the shortcut
    dict(is_torus=True, rhs_dilation=2),  # the shortcut, wider wrap
    dict(is_torus=False),  # zero padding: the output's own mean
    dict(is_torus=(True, False)),
    dict(is_torus=True, padding="VALID"),  # torus, but no wrap
    dict(is_torus=True, stride=2),
]


# ---- the input-mean shortcut --------------------------------------------------------------
@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_output_means_equal_the_outputs_mean(D, geometry):
    if D == 3 and isinstance(geometry["is_torus"], tuple):
        geometry = dict(geometry, is_torus=(True, False, True))
    spec = _spec(D, **geometry)
    inputs, weights = _fp32(spec, seed=1, N=6 if D == 2 else 5)
    means = _bias.output_means(spec, inputs, weights)
    exact = _bias.means_shortcut_exact(spec)
    assert exact == (all(spec.is_torus) and "padding" not in geometry and "stride" not in geometry)
    if not exact:
        assert means == (None,) * len(spec.out_keys)
        return
    outs = kernels.conv_contract(spec, inputs, weights, backend="reference", precision="fp32")
    for m, out in zip(means, outs):
        _assert_mean_close(m, out)


def test_shortcut_exact_for_asymmetric_wrap():
    """An even filter wraps one side more than the other; the mean is still exact."""
    filters = fixture_filters(2, 2)
    ins = [(0, 0, 2)]
    out_keys, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 1)])
    base = kernels.make_spec(2, ins, out_keys, pairs, True, padding="VALID")
    spec = dataclasses.replace(base, torus_pad=((1, 0), (0, 1)))
    assert _bias.means_shortcut_exact(spec)
    inputs, weights = _fp32(spec, seed=2)
    outs = kernels.conv_contract(spec, inputs, weights, backend="dense", precision="fp32")
    for m, out in zip(_bias.output_means(spec, inputs, weights), outs):
        _assert_mean_close(m, out)


# ---- every mode on every backend ----------------------------------------------------------
MODES = [("add", "mean", "mean"), ("mean", "mean", "mean"), ("add", "none", "none"), ("none", "mean", "add")]


@pytest.mark.parametrize("modes", MODES, ids=str)
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_bias_modes_lax_backends(backend, geometry, modes):
    _check_modes(backend, dict(geometry), modes, seed=3)


@pytest.mark.parametrize("backend", FUSED)
def test_bias_modes_fused_backends(backend):
    _check_modes(backend, dict(is_torus=True), ("add", "mean", "mean"), seed=4)
    _check_modes(backend, dict(is_torus=False), ("mean", "none", "add"), seed=5)


def _check_modes(backend, geometry, modes, seed):
    spec = _spec(2, bias_modes=modes, **geometry)
    inputs, weights = _fp32(spec, seed)
    bias = _bias_arrays(spec, seed)
    got = kernels.conv_contract(spec, inputs, weights, bias=bias, backend=backend, precision="fp32")
    plain = kernels.conv_contract(spec.without_bias(), inputs, weights, backend="reference", precision="fp32")
    want = _plain_bias(spec, plain, bias)
    for g, w, mode in zip(got, want, spec.bias_modes):
        assert rel_l2(g, w) <= 1e-5, mode
    # the bias really is there ("mean" offsets may vanish by symmetry: see _assert_mean_close)
    for g, p, mode in zip(got, plain, spec.bias_modes):
        if mode == "add":
            assert rel_l2(g, p) > 1e-3


# ---- gradients ----------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_gradients_match_the_plain_bias(backend, geometry):
    spec = _spec(2, bias_modes=("add", "mean", "mean"), **geometry)
    inputs, weights = _fp32(spec, seed=6)
    bias = _bias_arrays(spec, seed=6)
    cot = [jnp.asarray(np.random.default_rng(7 + i).standard_normal(s.shape).astype(np.float32))
           for i, s in enumerate(kernels.conv_contract(spec, inputs, weights, bias=bias, backend="reference"))]

    def loss(fn):
        def f(xs, ws, bs):
            return sum(jnp.sum(o * c) for o, c in zip(fn(xs, ws, bs), cot))
        # jitted: the eager transposes of the reference's einsums cost several times the compile
        # (eager gradients through a layer: test_layer_bias_is_ginjax_semantics)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(inputs, weights, bias)

    got = loss(lambda xs, ws, bs: kernels.conv_contract(spec, xs, ws, bias=bs, backend=backend, precision="fp32"))
    want = loss(lambda xs, ws, bs: _plain_bias(
        spec, kernels.conv_contract(spec.without_bias(), xs, ws, backend="reference", precision="fp32"), bs))
    # per argument, all blocks together: some bias gradients vanish by symmetry (see
    # _assert_mean_close) and are compared at the scale of the others
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])
    for g, w in zip(got, want):
        assert rel_l2(flat(g), flat(w)) <= 1e-5


def _triton_gradients_match_the_plain_bias(spec, seed):
    """Gradients (inputs, weights, bias) of a loss through the `triton` layer with its bias, at
    fp32, against the plain bias's on the reference backend; returns the operands."""
    inputs, weights = _fp32(spec, seed=seed)
    bias = _bias_arrays(spec, seed=seed)
    cot = [jnp.asarray(np.random.default_rng(seed + 1 + i).standard_normal(s.shape).astype(np.float32))
           for i, s in enumerate(kernels.conv_contract(spec, inputs, weights, bias=bias, backend="reference"))]

    def loss(fn):
        def f(xs, ws, bs):
            return sum(jnp.sum(o * c) for o, c in zip(fn(xs, ws, bs), cot))
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(inputs, weights, bias)

    got = loss(lambda xs, ws, bs: kernels.conv_contract(spec, xs, ws, bias=bs, backend="triton", precision="fp32"))
    want = loss(lambda xs, ws, bs: _plain_bias(
        spec, kernels.conv_contract(spec.without_bias(), xs, ws, backend="reference", precision="fp32"), bs))
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])
    for g, w in zip(got, want):
        assert rel_l2(flat(g), flat(w)) <= 1e-5
    return inputs, weights, bias


@pytest.mark.skipif("triton" not in FUSED, reason="needs the triton backend (its interpreter on a CPU)")
@pytest.mark.parametrize("geometry", GEOMETRIES[:3], ids=str)
def test_triton_routes_the_means_gradient_into_the_input_gradient_kernel(monkeypatch, geometry):
    """The triton backend takes the layer's bias into its custom_vjp: values and gradients (inputs,
    weights, bias) equal the plain bias's, and on a torus the input-gradient launch gets the
    inputs' means' gradient as its epilogue offsets (no pass over the input gradient adds it);
    without the shortcut (zero padding) it gets none and the output's own mean is used."""
    from kernels.triton import conv_contract as triton_entry

    spec = _spec(2, bias_modes=("add", "mean", "mean"), **geometry)
    launches = []  # (input gradient?, offsets per output key given?)
    real = triton_entry._forward

    def spy(spec, mode, blocks, poison, inputs, weights, offsets=None, like=None, priors=None):
        launches.append((like is not None, tuple(o is not None for o in offsets or ())))
        return real(spec, mode, blocks, poison, inputs, weights, offsets, like, priors)

    monkeypatch.setattr(triton_entry, "_forward", spy)
    _triton_gradients_match_the_plain_bias(spec, seed=16)
    shortcut = _bias.means_shortcut_exact(spec)
    forward = [given for grad, given in launches if not grad]
    backward = [given for grad, given in launches if grad]
    assert forward and backward
    assert all(given == (True, shortcut, shortcut) for given in forward)  # "add" always, "mean" with the shortcut
    assert all(given == ((True, True) if shortcut else ()) for given in backward)


@pytest.mark.skipif("triton" not in FUSED, reason="needs the triton backend (its interpreter on a CPU)")
@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_triton_input_means_on_the_sums_kernel(monkeypatch, layout):
    """GINJAX_INPUT_MEANS=triton: where the CUDA forward runs a layer (stood in for here, the
    Triton kernel computing it), the "mean" bias takes its inputs' means from the per-channel sums
    kernel read in the CUDA kernels' layout; values and gradients equal the plain bias's."""
    from kernels import _reduce
    from kernels.cuda import conv_contract as cuda_entry
    from kernels.triton import channel_sums as sums_module
    from kernels.triton import _cuda_dispatch, conv_contract as triton_entry

    spec = _spec(2, bias_modes=("add", "mean", "mean"), **GEOMETRIES[0])
    assert _bias.means_shortcut_exact(spec)
    monkeypatch.setenv(triton_entry.INPUT_MEANS_ENV, "triton")
    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    monkeypatch.setattr(_cuda_dispatch, "cuda_forward_plan", lambda *a, **k: ("a plan",))
    monkeypatch.setattr(_cuda_dispatch, "cuda_forward", lambda *a, **k: None)
    seen, real = [], sums_module.channel_sums_triton

    def spy(a, *args, planar=False, **kwargs):
        seen.append((a.shape, planar))
        return real(a, *args, planar=planar, **kwargs)

    monkeypatch.setattr(sums_module, "channel_sums_triton", spy)
    inputs, weights, bias = _triton_gradients_match_the_plain_bias(spec, seed=26)
    # the vector input's mean on the kernel, in the layout asked for, once (the scalar input's
    # reaches no offset: `input_means_needed`; the backward's bias sums stay with the Triton weight
    # kernel here: fp32, no CUDA weight gradient)
    assert _bias.input_means_needed(spec) == (False, True)
    assert seen == [((2, 36, 2), layout == "planar")], seen
    # vmapped (each example its own means)
    batch = [jnp.stack([x, 2.0 * x + 1.0]) for x in inputs]
    got = jax.jit(jax.vmap(lambda xs: kernels.conv_contract(spec, xs, weights, bias=bias, backend="triton",
                                                            precision="fp32")))(batch)
    for e in range(2):
        want = _plain_bias(spec, kernels.conv_contract(spec.without_bias(), [x[e] for x in batch], weights,
                                                       backend="reference", precision="fp32"), bias)
        for g, w in zip(got, want):
            assert rel_l2(g[e], w) <= 1e-5
    monkeypatch.setenv(triton_entry.INPUT_MEANS_ENV, "xla")
    seen.clear()
    jax.jit(lambda xs, ws, bs: kernels.conv_contract(spec, xs, ws, bias=bs, backend="triton", precision="fp32"))(
        inputs, weights, bias)
    assert not seen


# ---- the layer ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "use_bias, is_torus", [("auto", True), ("mean", True), ("scalar", True), (False, True), ("auto", False)]
)
def test_layer_bias_is_ginjax_semantics(use_bias, is_torus):
    D = 2
    sig_in = geom.Signature((((0, 0), 2), ((1, 0), 2)))
    sig_out = geom.Signature((((0, 0), 2), ((1, 0), 2), ((0, 1), 1)))
    filters = filter_bank(D, 3)
    layer = ConvContract(sig_in, sig_out, filters, use_bias, key=jax.random.PRNGKey(1), backend="dense")
    rng = np.random.default_rng(8)
    x = geom.MultiImage(
        {k: jnp.asarray(rng.standard_normal((c,) + (6,) * D + (D,) * len(k[0])).astype(np.float32)) for k, c in sig_in},
        D, is_torus,
    )

    def layer_out(layer, x):
        return dict(layer(x).items())

    def plain_out(layer, x):
        out = layer.individual_convolve(x, layer.weights)
        res = {}
        for key, block in out.items():
            if use_bias and key == SCALAR and use_bias in ("auto", "scalar"):
                block = block + layer.bias[key].reshape((-1, 1, 1))
            elif use_bias == "mean" or (use_bias == "auto" and key != SCALAR):
                b = layer.bias[key].reshape((-1,) + (1,) * (block.ndim - 1))
                block = block + b * jnp.mean(block, axis=(1, 2), keepdims=True)
            res[key] = block
        return res

    with jax.default_matmul_precision("highest"):
        got, want = layer_out(layer, x), plain_out(layer, x)
        assert set(got) == set(want)
        for key in got:
            assert rel_l2(got[key], want[key]) <= 1e-5, key

        def loss(fn):
            return lambda lay, x: sum(jnp.sum(jnp.sin(v)) for v in fn(lay, x).values())

        g_got = eqx.filter_grad(lambda lx: loss(layer_out)(*lx))((layer, x))
        g_want = eqx.filter_grad(lambda lx: loss(plain_out)(*lx))((layer, x))
    # per kind of leaf, all blocks together: some bias gradients vanish by symmetry (see
    # _assert_mean_close) and are compared at the scale of the others
    flat = lambda tree: np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])
    for part in (lambda g: g[0].weights, lambda g: g[1]) + ((lambda g: g[0].bias),) * bool(use_bias):
        assert rel_l2(flat(part(g_got)), flat(part(g_want))) <= 1e-5
    if use_bias == "scalar":  # the non-scalar biases are unused: zero gradient
        assert not any(np.any(np.asarray(v)) for k, v in g_got[0].bias.items() if k != SCALAR)


def test_layer_spec_carries_the_bias_modes():
    D = 2
    sig = geom.Signature((((0, 0), 1), ((1, 0), 1), ((0, 1), 1)))
    filters = filter_bank(D, 3)
    expected = {"auto": {SCALAR: "add"}, "mean": {}, "scalar": {SCALAR: "add"}, False: {}}
    default = {"auto": "mean", "mean": "mean", "scalar": "none", False: "none"}
    for use_bias in expected:
        layer = ConvContract(sig, sig, filters, use_bias, key=jax.random.PRNGKey(0))
        spec = layer.conv_spec()
        keys = [((False,) * k, p) for k, p, _ in spec.out_keys]
        assert spec.bias_modes == tuple(expected[use_bias].get(k, default[use_bias]) for k in keys)


# ---- the fused-bias call path -------------------------------------------------------------
def test_fused_bias_backend_gets_spec_and_bias(monkeypatch):
    seen = {}

    def run(spec, inputs, weights, mode, bias):
        seen["modes"], seen["bias"] = spec.bias_modes, bias
        outs = kernels.conv_contract(spec.without_bias(), inputs, weights, backend="dense", precision=mode)
        offsets = _bias.bias_offsets(spec, inputs, weights, bias)
        # an epilogue adds the offsets; "mean" without the shortcut falls back to apply_bias
        assert all(o is not None for o, m in zip(offsets, spec.bias_modes) if m != "none")
        return tuple(o if off is None else o + off.reshape((off.shape[0],) + (1,) * spec.D + off.shape[1:])
                     for o, off in zip(outs, offsets))

    def plain_run(spec, inputs, weights, mode):
        seen["plain_modes"] = spec.bias_modes
        return kernels.conv_contract(spec, inputs, weights, backend="dense", precision=mode)

    always = lambda: (True, "test")
    covers = lambda spec, spatial, dtype: (True, "test")
    monkeypatch.setitem(_registry._BACKENDS, "fused_test", kernels.Backend("fused_test", run, always, covers, {}, fused_bias=True))
    monkeypatch.setitem(_registry._BACKENDS, "plain_test", kernels.Backend("plain_test", plain_run, always, covers, {}))
    spec = _spec(2, bias_modes=("add", "mean", "none"), is_torus=True)
    inputs, weights = _fp32(spec, seed=9)
    bias = _bias_arrays(spec, seed=9)
    want = kernels.conv_contract(spec, inputs, weights, bias=bias, backend="reference", precision="fp32")
    fused = kernels.conv_contract(spec, inputs, weights, bias=bias, backend="fused_test", precision="fp32")
    assert seen["modes"] == spec.bias_modes and seen["bias"][2] is None
    plain = kernels.conv_contract(spec, inputs, weights, bias=bias, backend="plain_test", precision="fp32")
    assert seen["plain_modes"] == ("none",) * 3  # a backend without fused bias never sees the modes
    for f, p, w in zip(fused, plain, want):
        assert rel_l2(f, w) <= 1e-5 and rel_l2(p, w) <= 1e-5


# ---- bad input ----------------------------------------------------------------------------
def test_bad_bias_is_a_clear_error():
    spec = _spec(2, bias_modes=("add", "mean", "none"))
    inputs, weights = _fp32(spec, seed=10)
    ok = _bias_arrays(spec, seed=10)
    call = lambda bias: kernels.conv_contract(spec, inputs, weights, bias=bias, backend="dense")
    with pytest.raises(ValueError, match=r"`bias` \(=None\) must be a sequence of 3 entries"):
        call(None)
    with pytest.raises(ValueError, match=r"`bias` \(=\[array of shape \(2,\)\]\) must be a sequence of 3"):
        call(ok[:1])
    with pytest.raises(ValueError, match=r"`bias\[1\]` \(=array of shape \(3,\)\) must be an array of shape \(2,\)"):
        call([ok[0], jnp.zeros(3), None])
    with pytest.raises(ValueError, match=r"`bias\[2\]` \(=array of shape \(1,\)\) must be None"):
        call([ok[0], ok[1], jnp.zeros(1)])
    with pytest.raises(ValueError, match=r"every bias mode of the spec is 'none'"):
        kernels.conv_contract(spec.without_bias(), inputs, weights, bias=ok, backend="dense")
    with pytest.raises(ValueError, match=r"`bias_modes` \(=\('add', 'sum'\)\) must give one of"):
        _spec(2, bias_modes=("add", "sum"), outs=((0, 0, 2), (1, 0, 2)))


@pytest.mark.parametrize("modes, needed", [(("add", "mean"), (False, True)), (("mean", "mean"), (True, True)),
                                           (("mean", "none"), (True, False))])
def test_only_the_means_an_offset_reads_are_taken(modes, needed, monkeypatch):
    """A scalar input's mean reaches a vector "mean" block only through scalar-to-vector filters,
    whose taps sum to zero (odd under a reflection), and a vector input's a scalar one only through
    vector-to-scalar ones: ginjax's layers (scalar "add", vector "mean") skip the scalar block's
    reduction. The offsets are exactly those with every mean taken, and the input means' jaxpr
    holds the reductions of the needed blocks only."""
    spec = _spec(D=2, bias_modes=modes, outs=((0, 0, 2), (1, 0, 2)))
    assert _bias.input_means_needed(spec) == needed
    inputs, weights = _fp32(spec, seed=31, N=32)  # 1,024 pixels: middle_sum's two stages
    bias = _bias_arrays(spec, seed=32)
    got = _bias.bias_offsets(spec, inputs, weights, bias)
    reductions = str(jax.make_jaxpr(lambda xs: _bias.input_means(spec, xs))(inputs)).count("reduce_sum")
    monkeypatch.setattr(_bias, "input_means_needed", lambda spec: (True,) * len(spec.in_keys))
    want = _bias.bias_offsets(spec, inputs, weights, bias)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or np.array_equal(np.asarray(g), np.asarray(w)))
    every = str(jax.make_jaxpr(lambda xs: _bias.input_means(spec, xs))(inputs)).count("reduce_sum")
    assert reductions == every * sum(needed) // len(needed) and every > 0
