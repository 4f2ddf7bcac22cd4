"""ginjax.layers.ConvContract: fixtures (with every bias mode) on every backend, equivariance under
every group element, jit/vmap/grad, dispatch through the layer, and bad input."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax.layers import ConvContract
from conftest import conv_contract_case, conv_contract_cases, filter_bank, nested_tuple, rel_l2

BACKENDS = [b for b in kernels.available_backends()]
_KEY = jax.random.PRNGKey(0)


def _name(key):
    (k, p) = key
    return f"k{len(k)}p{p}"


def _filters(D, M):
    return filter_bank(D, M)


def _fixture_layer(case, backend):
    meta, arrays = conv_contract_case(case)
    D, M = meta["D"], meta["M"]
    sig_in = geom.Signature(tuple(((k, p), c) for k, p, c in meta["input"]))
    sig_out = geom.Signature(tuple(((k, p), c) for k, p, c in meta["target"]))
    kw = {k: nested_tuple(v) for k, v in meta["kwargs"].items()}
    layer = ConvContract(sig_in, sig_out, _filters(D, M), meta["use_bias"], key=_KEY, backend=backend, **kw)
    new_w = {ik: {ok: jnp.asarray(arrays[f"w/{_name(ik)}/{_name(ok)}"]) for ok in d} for ik, d in layer.weights.items()}
    layer = eqx.tree_at(lambda m: m.weights, layer, new_w)
    if layer.bias:
        layer = eqx.tree_at(lambda m: m.bias, layer, {k: jnp.asarray(arrays[f"b/{_name(k)}"]) for k in layer.bias})
    x = geom.MultiImage({((False,) * k, p): jnp.asarray(arrays[f"x/k{k}p{p}"]) for k, p, _ in meta["input"]}, D, nested_tuple(meta["is_torus"]))
    return meta, arrays, layer, x


def _layer_fixture_params():
    """Every recorded case on the lax backends; on the others only the biased cases: their
    unbiased forward is the conformance suite's (tests/test_conformance.py), the layer's bias
    passed through to them is not. By default the reference rows (the same layer code as dense's,
    whose kernel-level agreement test_conformance.py checks on every case) and Pallas' interpret
    rows but the standard 3D layer's (case09) are `slow`: 10-40 CPU seconds each."""
    lax = ("reference", "dense")
    params = []
    for case in conv_contract_cases():
        for backend in BACKENDS:
            if backend in lax or conv_contract_case(case)[0]["use_bias"]:
                slow = backend == "reference" or (backend == "pallas" and case != "case09")
                params.append(pytest.param(case, backend, marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("case, backend", _layer_fixture_params())
def test_reproduces_ginjax_fixture(case, backend):
    meta, arrays, layer, x = _fixture_layer(case, backend)
    assert layer.missing_filter == meta["missing_filter"]
    with jax.default_matmul_precision("highest"):
        # jitted: op by op the layer compiles dozens of small programs per case
        out = eqx.filter_jit(lambda layer, x: layer(x))(layer, x)
    expected = {k: v for k, v in arrays.items() if k.startswith("out/")}
    assert sorted(f"out/{_name(k)}" for k in out.keys()) == sorted(expected)
    for key, block in out.items():
        want = expected[f"out/{_name(key)}"]
        assert block.shape == want.shape
        assert rel_l2(block, want) <= 1e-5, key


def _random_multi_image(sig, D, N, is_torus, seed, batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    data = {key: jnp.asarray(rng.standard_normal(lead + (c,) + (N,) * D + (D,) * len(key[0])), jnp.float32) for key, c in sig}
    return geom.MultiImage(data, D, is_torus)


SIG_D = {
    2: geom.Signature((((0, 0), 2), ((1, 0), 2), ((1, 1), 1), ((2, 0), 1))),
    3: geom.Signature((((0, 0), 2), ((1, 0), 2), ((2, 0), 1))),
}


@pytest.mark.parametrize("backend", ["reference", "dense"])
@pytest.mark.parametrize("D", [2, 3])
def test_equivariant_under_every_group_element(D, backend):
    """f(g.x) == g.f(x) for all 8 (D=2) / 48 (D=3) elements, torus padding, highest precision."""
    N = 6 if D == 2 else 5
    layer = ConvContract(SIG_D[D], SIG_D[D], _filters(D, 3), "auto", key=jax.random.PRNGKey(D), backend=backend)
    x = _random_multi_image(SIG_D[D], D, N, True, seed=D)
    with jax.default_matmul_precision("highest"):
        fx = layer(x)
        f_jit = eqx.filter_jit(lambda v: layer(v))
        worst = 0.0
        for gg in geom.make_all_operators(D):
            lhs = f_jit(x.times_group_element(gg))
            rhs = fx.times_group_element(gg)
            for key in rhs.keys():
                worst = max(worst, rel_l2(lhs[key], rhs[key]))
    assert worst <= 1e-5


def test_jit_vmap_grad_through_layer():
    D = 2
    sig = SIG_D[D]
    layer = ConvContract(sig, sig, _filters(D, 3), "auto", key=_KEY, backend="dense")
    xb = _random_multi_image(sig, D, 6, True, seed=1, batch=3)
    out = eqx.filter_jit(lambda m, v: jax.vmap(m)(v))(layer, xb)
    for key, block in out.items():
        assert block.shape[:2] == (3, dict(sig)[key])
    single = layer(geom.MultiImage({k: v[1] for k, v in xb.items()}, D, True))
    for key in single.keys():
        assert rel_l2(out[key][1], single[key]) <= 1e-5

    def loss(model, x):
        y = jax.vmap(model)(x)
        return sum(jnp.sum(v**2) for v in y.values())

    grads = eqx.filter_jit(eqx.filter_grad(loss))(layer, xb)
    ref_layer = ConvContract(sig, sig, _filters(D, 3), "auto", key=_KEY, backend="reference")
    grads_ref = eqx.filter_jit(eqx.filter_grad(loss))(ref_layer, xb)
    with jax.default_matmul_precision("highest"):
        for a, b in zip(jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)), jax.tree_util.tree_leaves(eqx.filter(grads_ref, eqx.is_array))):
            if np.any(np.asarray(b)):
                assert rel_l2(a, b) <= 1e-3


def test_scalar_bias_keeps_non_scalar_outputs():
    D = 2
    sig = geom.Signature((((0, 0), 2), ((1, 0), 2)))
    layer = ConvContract(sig, sig, _filters(D, 3), "scalar", key=_KEY)
    unbiased = ConvContract(sig, sig, _filters(D, 3), False, key=_KEY)  # same key: same weights
    x = _random_multi_image(sig, D, 6, True, seed=2)
    out, plain = layer(x), unbiased(x)
    assert set(out.keys()) == set(sig_k for sig_k, _ in sig)
    vec = ((False,), 0)
    np.testing.assert_allclose(out[vec], plain[vec], rtol=1e-6)
    scalar = ((), 0)
    np.testing.assert_allclose(out[scalar] - plain[scalar], jnp.broadcast_to(layer.bias[scalar][:, None, None], plain[scalar].shape), rtol=1e-5, atol=1e-6)


def test_use_bias_true_means_auto():
    sig = SIG_D[2]
    layer = ConvContract(sig, sig, _filters(2, 3), True, key=_KEY)
    assert layer.use_bias == "auto"
    assert set(layer(_random_multi_image(sig, 2, 6, True, seed=3)).keys()) == set(k for k, _ in sig)


def test_layer_backend_dispatch_and_explain(monkeypatch):
    sig = SIG_D[2]
    filt = _filters(2, 3)
    x = _random_multi_image(sig, 2, 6, True, seed=4)
    outs = {}
    for backend in ["reference", "dense"]:
        layer = ConvContract(sig, sig, filt, key=_KEY, backend=backend)
        assert kernels.explain(layer, x).backend == backend
        outs[backend] = layer(x)
    for key in outs["dense"].keys():
        assert rel_l2(outs["dense"][key], outs["reference"][key]) <= 2e-3
    auto = ConvContract(sig, sig, filt, key=_KEY)
    monkeypatch.setenv("GINJAX_BACKEND", "reference")
    assert kernels.explain(auto, x).backend == "reference"
    strided = ConvContract(sig, sig, filt, key=_KEY, stride=2)
    assert kernels.explain(strided, x).backend in kernels.available_backends()


def test_fast_and_individual_convolve_agree():
    sig = SIG_D[2]
    layer = ConvContract(sig, sig, _filters(2, 3), key=_KEY)
    x = _random_multi_image(sig, 2, 7, (True, False), seed=5)
    with jax.default_matmul_precision("highest"):
        a = layer.fast_convolve(x, layer.weights)
        b = layer.individual_convolve(x, layer.weights)
    for key in b.keys():
        assert rel_l2(a[key], b[key]) <= 1e-5


def test_bad_input_is_a_clear_error():
    sig = geom.Signature((((0, 0), 2), ((1, 0), 2)))
    filt = _filters(2, 3)
    layer = ConvContract(sig, sig, filt, key=_KEY)
    with pytest.raises(ValueError, match="signature"):
        layer(_random_multi_image(geom.Signature((((0, 0), 3), ((1, 0), 2))), 2, 6, True, seed=0))
    with pytest.raises(ValueError, match="signature"):
        layer(_random_multi_image(geom.Signature((((0, 0), 2),)), 2, 6, True, seed=0))
    with pytest.raises(ValueError, match=r"`x.D` \(=3\)"):
        layer(_random_multi_image(sig, 3, 5, True, seed=0))
    with pytest.raises(ValueError, match="unknown ConvContract backend|not a ConvContract backend"):
        ConvContract(sig, sig, filt, key=_KEY, backend="cudnn-please")
    with pytest.raises(ValueError, match=r"`use_bias` \(='always'\)"):
        ConvContract(sig, sig, filt, "always", key=_KEY)
    with pytest.raises(ValueError, match=r"`key` \(=None\)"):
        ConvContract(sig, sig, filt)
    even = _filters(2, 2)
    with pytest.raises(ValueError, match="odd filter sizes"):
        ConvContract(sig, sig, even, key=_KEY)(_random_multi_image(sig, 2, 6, True, seed=0))
    with pytest.raises(ValueError, match="odd filter sizes"):
        ConvContract(sig, sig, even, key=_KEY, padding="SAME")(_random_multi_image(sig, 2, 6, False, seed=0))
    with pytest.raises(ValueError, match="too small"):
        ConvContract(sig, sig, filt, key=_KEY, padding="VALID")(_random_multi_image(sig, 2, 2, False, seed=0))
    with pytest.raises(ValueError, match="weights"):
        bad = eqx.tree_at(lambda m: m.weights[((), 0)][((), 0)], layer, jnp.ones((2, 2, 1)))
        bad(_random_multi_image(sig, 2, 6, True, seed=0))
