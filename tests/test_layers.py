"""ginjax.layers: GroupNorm, LayerNorm, VectorNeuronNonlinear, MaxNormPool and the wrappers.

Reference outputs come from ginjax 0.1.8 (tests/data/ginjax-0.1.8/layers.npz); the rest is
checked against float64 numpy references, against the group action (equivariance) and for
clear errors on bad input.
"""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ginjax._conv_contract
import ginjax.geometric as geom
from ginjax import layers

from conftest import FIXTURES, rel_l2

SCALAR = ((), 0)
VECTOR = ((False,), 0)
PSEUDOVECTOR = ((False,), 1)
MATRIX = ((False, False), 0)


def _name(key) -> str:
    return f"k{len(key[0])}p{key[1]}"


def _load_case(case: str):
    data = np.load(FIXTURES / "layers.npz")
    meta = json.loads(str(data[f"{case}/meta"]))
    D = meta["D"]
    sig = geom.Signature(tuple((((False,) * k, p), c) for k, p, c in meta["input"]))
    blocks = {
        ((False,) * k, p): jnp.asarray(data[f"{case}/x/k{k}p{p}"]) for k, p, _ in meta["input"]
    }
    return data, D, sig, geom.MultiImage(blocks, D)


def _random_image(rng, D, sig, N, is_torus=True):
    blocks = {
        key: jnp.asarray(rng.standard_normal((c,) + (N,) * D + (D,) * len(key[0])), jnp.float32)
        for key, c in sig
    }
    return geom.MultiImage(blocks, D, is_torus)


def _rel_multi(a: geom.MultiImage, b: geom.MultiImage) -> float:
    assert set(a.keys()) == set(b.keys())
    num = sum(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2) for k in a.keys())
    den = sum(np.sum(np.asarray(b[k], np.float64) ** 2) for k in b.keys())
    assert den > 0
    return float(np.sqrt(num / den))


def _sample_ops(D: int) -> list[np.ndarray]:
    ops = geom.make_all_operators(D)
    # identity excluded; a rotation, a reflection and one more element
    picks = [1, len(ops) // 2 + 1, len(ops) - 1]
    chosen = [np.asarray(ops[i]) for i in picks]
    assert any(np.linalg.det(g) < 0 for g in chosen) and any(np.linalg.det(g) > 0 for g in chosen)
    return chosen


# ---------------------------------------------------------------------------------------------
# ginjax 0.1.8 fixtures
# ---------------------------------------------------------------------------------------------
CASES = ["layers0", "layers1"]


def _compare(data, case, name, out: geom.MultiImage, tol=1e-5):
    expected_keys = {n.split("/")[-1] for n in data.files if n.startswith(f"{case}/{name}/")}
    assert {_name(k) for k in out.keys()} == expected_keys
    for key, block in out.items():
        expected = data[f"{case}/{name}/{_name(key)}"]
        assert block.shape == expected.shape
        assert rel_l2(block, expected) < tol, (case, name, key)


@pytest.mark.parametrize("case", CASES)
def test_group_norm_matches_ginjax(case):
    data, D, sig, x = _load_case(case)
    _compare(data, case, "group_norm2", layers.GroupNorm(sig, D, 2)(x))


@pytest.mark.parametrize("case", CASES)
def test_layer_norm_matches_ginjax(case):
    data, D, sig, x = _load_case(case)
    _compare(data, case, "layer_norm", layers.LayerNorm(sig, D)(x))


@pytest.mark.parametrize("case", CASES)
def test_vector_neuron_matches_ginjax(case):
    data, D, sig, x = _load_case(case)
    layer = layers.VectorNeuronNonlinear(sig, D, jax.nn.gelu, key=jax.random.PRNGKey(3))
    stored = {
        k: jnp.asarray(data[f"{case}/vector_neuron_gelu_weights/{_name(k)}"]) for k in layer.weights
    }
    assert stored, "the fixture must store weights for the non-scalar keys"
    layer = eqx.tree_at(lambda m: [m.weights[k] for k in stored], layer, list(stored.values()))
    _compare(data, case, "vector_neuron_gelu", layer(x))


@pytest.mark.parametrize("case", CASES)
def test_max_norm_pool_matches_ginjax(case):
    data, D, sig, x = _load_case(case)
    _compare(data, case, "max_norm_pool2", layers.MaxNormPool(2, True)(x), tol=1e-7)


def test_conv_contract_is_reexported():
    assert layers.ConvContract is ginjax._conv_contract.ConvContract


# ---------------------------------------------------------------------------------------------
# _group_norm_K1 against float64 numpy
# ---------------------------------------------------------------------------------------------
def _numpy_whiten(block: np.ndarray, groups: int, method: str, eps: float) -> np.ndarray:
    D = block.shape[-1]
    out = np.empty_like(block, dtype=np.float64)
    per = block.shape[0] // groups
    for g in range(groups):
        part = block[g * per : (g + 1) * per].astype(np.float64)
        X = part.reshape(-1, D)
        Xc = X - X.mean(axis=0)
        C = Xc.T @ Xc / len(Xc)
        if method == "eigh":
            lam, U = np.linalg.eigh(C)
            W = U @ np.diag(1 / np.sqrt(lam + eps)) @ U.T
            Y = Xc @ W
        else:
            L = np.linalg.cholesky(C) + eps * np.eye(D)
            Y = np.linalg.solve(L.T, Xc.T).T  # Y L = Xc
        out[g * per : (g + 1) * per] = Y.reshape(part.shape)
    return out


@pytest.mark.parametrize("D,groups,method", [(2, 2, "eigh"), (3, 1, "eigh"), (2, 1, "cholesky"), (3, 2, "cholesky")])
def test_group_norm_K1_matches_numpy(rng, D, groups, method):
    block = rng.standard_normal((4,) + (5,) * D + (D,)).astype(np.float32)
    block[..., 0] *= 3.0  # anisotropic, so whitening is not a plain rescale
    out = layers._group_norm_K1(D, jnp.asarray(block), groups, method=method, eps=1e-5)
    assert out.shape == block.shape
    assert rel_l2(out, _numpy_whiten(block, groups, method, 1e-5)) < 1e-4


def test_group_norm_K1_whitens(rng):
    D = 3
    block = rng.standard_normal((2, 6, 6, 6, D)) @ np.array([[2.0, 0.5, 0], [0, 1, 0], [0.3, 0, 0.2]])
    out = np.asarray(layers._group_norm_K1(D, jnp.asarray(block, jnp.float32), 1), np.float64)
    X = out.reshape(-1, D)
    assert np.allclose(X.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(X.T @ X / len(X), np.eye(D), atol=1e-3)


def test_group_norm_K1_bad_input(rng):
    block = jnp.asarray(rng.standard_normal((4, 5, 5, 2)), jnp.float32)
    with pytest.raises(ValueError, match="`groups` \\(=3\\)"):
        layers._group_norm_K1(2, block, 3)
    with pytest.raises(ValueError, match="k=0"):
        layers._group_norm_K1(2, block[..., 0], 1)
    with pytest.raises(NotImplementedError, match="`method`"):
        layers._group_norm_K1(2, block, 2, method="svd")


# ---------------------------------------------------------------------------------------------
# GroupNorm with learned scale and bias, against numpy
# ---------------------------------------------------------------------------------------------
def test_group_norm_scale_and_bias(rng):
    D = 2
    sig = geom.Signature(((SCALAR, 4), (VECTOR, 4)))
    x = _random_image(rng, D, sig, 6)
    norm = layers.GroupNorm(sig, D, 2)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(4), jnp.float32)
    norm = eqx.tree_at(lambda m: (m.scale[VECTOR], m.bias[VECTOR]), norm, (scale, bias))
    out = norm(x)
    v = np.asarray(x[VECTOR], np.float64)
    expected = _numpy_whiten(v, 2, "eigh", 1e-5) * np.asarray(scale)[:, None, None, None] + v.mean(
        axis=(1, 2), keepdims=True
    ) * np.asarray(bias)[:, None, None, None]
    assert rel_l2(out[VECTOR], expected) < 1e-4
    s = np.asarray(x[SCALAR], np.float64).reshape(2, -1)
    s_expected = ((s - s.mean(1, keepdims=True)) / np.sqrt(s.var(1, keepdims=True) + 1e-5)).reshape(4, 6, 6)
    assert rel_l2(out[SCALAR], s_expected) < 1e-5


def test_group_norm_bad_input(rng):
    with pytest.raises(ValueError, match="`groups` \\(=3\\) must divide the channels \\(=4\\)"):
        layers.GroupNorm(geom.Signature(((VECTOR, 4),)), 2, 3)
    with pytest.raises(NotImplementedError, match="k>1"):
        layers.LayerNorm(geom.Signature(((MATRIX, 2),)), 2)
    norm = layers.LayerNorm(geom.Signature(((VECTOR, 2),)), 2)
    with pytest.raises(KeyError, match="not in the `input_keys`"):
        norm(_random_image(rng, 2, geom.Signature(((PSEUDOVECTOR, 2),)), 4))
    with pytest.raises(ValueError, match="`x.D` \\(=3\\)"):
        norm(_random_image(rng, 3, geom.Signature(((VECTOR, 2),)), 4))


# ---------------------------------------------------------------------------------------------
# VectorNeuronNonlinear
# ---------------------------------------------------------------------------------------------
def test_vector_neuron_against_numpy(rng):
    D = 3
    sig = geom.Signature(((SCALAR, 2), (MATRIX, 3), (((), 1), 2)))
    x = _random_image(rng, D, sig, 4)
    layer = layers.VectorNeuronNonlinear(sig, D, jax.nn.relu, key=jax.random.PRNGKey(0))
    assert set(layer.weights) == {MATRIX, ((), 1)}
    out = layer(x)
    assert rel_l2(out[SCALAR], np.maximum(np.asarray(x[SCALAR]), 0)) < 1e-7
    for key in (MATRIX, ((), 1)):
        v = np.asarray(x[key], np.float64)
        W = np.asarray(layer.weights[key], np.float64)
        axes = tuple(range(1 + D, v.ndim))
        d = np.tensordot(W, v, axes=1)
        dn = np.sqrt(np.sum(d * d, axis=axes, keepdims=True)) if axes else np.abs(d)
        u = d / (dn + 1e-5)
        inner = np.sum(v * u, axis=axes, keepdims=True) if axes else v * u
        par = inner * u
        expected = np.maximum(inner, 0) / (np.abs(inner) + 1e-5) * par + (v - par)
        assert rel_l2(out[key], expected) < 1e-5


def test_vector_neuron_grad_finite_at_zero_pixels(rng):
    D = 2
    sig = geom.Signature(((VECTOR, 3),))
    layer = layers.VectorNeuronNonlinear(sig, D, jax.nn.gelu, key=jax.random.PRNGKey(1))
    block = rng.standard_normal((3, 4, 4, D)).astype(np.float32)
    block[:, :2] = 0.0  # zero pixels: the direction vector is zero there
    x = geom.MultiImage({VECTOR: jnp.asarray(block)}, D)

    def loss(layer, x):
        return jnp.sum(layer(x)[VECTOR] ** 2)

    g_layer, g_x = jax.grad(loss, argnums=(0, 1))(layer, x)
    assert np.all(np.isfinite(np.asarray(g_layer.weights[VECTOR])))
    assert np.all(np.isfinite(np.asarray(g_x[VECTOR])))
    assert np.any(np.asarray(g_layer.weights[VECTOR]) != 0)


def test_vector_neuron_bad_input(rng):
    with pytest.raises(ValueError, match="`key` \\(=None\\)"):
        layers.VectorNeuronNonlinear(geom.Signature(((VECTOR, 2),)), 2)
    layers.VectorNeuronNonlinear(geom.Signature(((SCALAR, 2),)), 2)  # scalars need no key
    layer = layers.VectorNeuronNonlinear(geom.Signature(((VECTOR, 2),)), 2, key=jax.random.PRNGKey(0))
    with pytest.raises(KeyError, match="not in the `input_keys`"):
        layer(_random_image(rng, 2, geom.Signature(((PSEUDOVECTOR, 2),)), 4))
    with pytest.raises(ValueError, match="3 channels"):
        layer(_random_image(rng, 2, geom.Signature(((VECTOR, 3),)), 4))


# ---------------------------------------------------------------------------------------------
# MaxNormPool
# ---------------------------------------------------------------------------------------------
def _numpy_norm_pool(block: np.ndarray, D: int, p: int, use_norm: bool) -> np.ndarray:
    c = block.shape[0]
    spatial = block.shape[1 : 1 + D]
    tshape = block.shape[1 + D :]
    out = np.empty((c,) + tuple(n // p for n in spatial) + tshape, block.dtype)
    for ch in range(c):
        for idx in np.ndindex(*(n // p for n in spatial)):
            best, best_val = None, -np.inf
            for off in np.ndindex(*(p,) * D):
                pix = tuple(i * p + o for i, o in zip(idx, off))
                val = block[(ch,) + pix]
                score = np.linalg.norm(val) if use_norm else float(val)
                if score > best_val:
                    best, best_val = val, score
            out[(ch,) + idx] = best
    return out


@pytest.mark.parametrize("D,p", [(2, 2), (2, 3), (3, 2)])
def test_max_norm_pool_against_numpy(rng, D, p):
    sig = geom.Signature(((SCALAR, 2), (VECTOR, 1), (MATRIX, 1)))
    x = _random_image(rng, D, sig, 6)
    out = layers.MaxNormPool(p)(x)
    for key, block in out.items():
        assert rel_l2(block, _numpy_norm_pool(np.asarray(x[key]), D, p, True)) == 0.0
    plain = layers.MaxNormPool(p, use_norm=False)(geom.MultiImage({SCALAR: x[SCALAR]}, D))
    assert rel_l2(plain[SCALAR], _numpy_norm_pool(np.asarray(x[SCALAR]), D, p, False)) == 0.0


def test_max_norm_pool_bad_input(rng):
    x = _random_image(rng, 2, geom.Signature(((VECTOR, 1),)), 6)
    with pytest.raises(ValueError, match="`patch_len` \\(=4\\) must divide"):
        layers.MaxNormPool(4)(x)
    with pytest.raises(ValueError, match="`use_norm` \\(=False\\)"):
        layers.MaxNormPool(2, use_norm=False)(x)
    with pytest.raises(ValueError, match="`patch_len` \\(=0\\)"):
        layers.MaxNormPool(0)


# ---------------------------------------------------------------------------------------------
# equivariance of the layers, under jit and vmap
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [2, 3])
def test_layers_equivariant(rng, D):
    sig = geom.Signature(((SCALAR, 4), (VECTOR, 2), (PSEUDOVECTOR, 2)))
    x = _random_image(rng, D, sig, 4)
    key = jax.random.PRNGKey(7)
    norm = layers.GroupNorm(sig, D, 2)
    norm = eqx.tree_at(
        lambda m: (m.bias[VECTOR], m.scale[PSEUDOVECTOR]),
        norm,
        (jnp.asarray(rng.standard_normal(2), jnp.float32), jnp.asarray(rng.uniform(0.5, 2, 2), jnp.float32)),
    )
    stack = [norm, layers.VectorNeuronNonlinear(sig, D, jax.nn.gelu, key=key), layers.MaxNormPool(2)]

    @eqx.filter_jit
    def f(stack, x):
        for layer in stack:
            x = layer(x)
        return x

    with jax.default_matmul_precision("highest"):
        y = f(stack, x)
        for gg in _sample_ops(D):
            err = _rel_multi(f(stack, x.times_group_element(gg)), y.times_group_element(gg))
            assert err < 1e-5, (D, gg, err)
        # batched with vmap equals the unbatched calls
        xb = geom.MultiImage({k: jnp.stack([v, 2 * v]) for k, v in x.items()}, D)
        yb = eqx.filter_vmap(f, in_axes=(None, 0))(stack, xb)
        y2 = f(stack, x * 2.0)
        for k in y.keys():
            assert rel_l2(yb[k][0], y[k]) < 1e-6 and rel_l2(yb[k][1], y2[k]) < 1e-6


# ---------------------------------------------------------------------------------------------
# LayerWrapper, LayerWrapperAux
# ---------------------------------------------------------------------------------------------
def test_layer_wrapper_applies_module_per_key(rng):
    D = 2
    sig = geom.Signature(((SCALAR, 3),))
    conv = eqx.nn.Conv(D, 3, 5, 3, padding="SAME", key=jax.random.PRNGKey(0))
    wrapper = layers.LayerWrapper(conv, sig)
    x = _random_image(rng, D, sig, 6, is_torus=(True, False))
    out = wrapper(x)
    assert out.is_torus == (True, False)
    assert rel_l2(out[SCALAR], conv(x[SCALAR])) < 1e-7

    sig2 = geom.Signature(((SCALAR, 2), (VECTOR, 2)))
    x2 = _random_image(rng, D, sig2, 4)
    act = layers.LayerWrapper(jnp.tanh, sig2)(x2)
    for k in sig2:
        assert rel_l2(act[k[0]], np.tanh(np.asarray(x2[k[0]]))) < 1e-6
    with pytest.raises(KeyError, match="not in the `input_keys`"):
        wrapper(_random_image(rng, D, geom.Signature(((VECTOR, 3),)), 4))
    with pytest.raises(TypeError, match="`module`"):
        layers.LayerWrapper(3, sig)


def test_layer_wrapper_aux_threads_state(rng):
    D = 2
    sig = geom.Signature(((SCALAR, 3),))

    def counting(block, state):
        return block * 2.0, state + 1

    out, state = layers.LayerWrapperAux(counting, sig)(_random_image(rng, D, sig, 4), 10)
    assert int(state) == 11
    bn = layers.LayerWrapperAux(eqx.nn.BatchNorm(3, axis_name="batch"), sig)
    bn, state = eqx.nn.make_with_state(lambda: bn)()
    x = _random_image(rng, D, sig, 4)
    xb = geom.MultiImage({SCALAR: jnp.stack([x[SCALAR], 3 * x[SCALAR] + 1])}, D)
    yb, new_state = eqx.filter_vmap(bn, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(xb, state)
    data = np.asarray(xb[SCALAR], np.float64)
    mean = data.mean(axis=(0, 2, 3), keepdims=True)
    var = data.var(axis=(0, 2, 3), keepdims=True)
    assert rel_l2(yb[SCALAR], (data - mean) / np.sqrt(var + 1e-5)) < 1e-4
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(state)
