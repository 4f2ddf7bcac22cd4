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
from conftest import conv_contract_case, conv_contract_cases, rel_l2

BACKENDS = [b for b in kernels.available_backends()]
_KEY = jax.random.PRNGKey(0)


def _tup(value):
    if isinstance(value, list):
        return tuple(_tup(v) for v in value)
    return value


def _name(key):
    (k, p) = key
    return f"k{len(k)}p{p}"


def _filters(D, M):
    return geom.get_invariant_filters([M], [0, 1, 2], [0, 1], D, geom.make_all_operators(D))


def _fixture_layer(case, backend):
    meta, arrays = conv_contract_case(case)
    D, M = meta["D"], meta["M"]
    sig_in = geom.Signature(tuple(((k, p), c) for k, p, c in meta["input"]))
    sig_out = geom.Signature(tuple(((k, p), c) for k, p, c in meta["target"]))
    kw = {k: _tup(v) for k, v in meta["kwargs"].items()}
    layer = ConvContract(sig_in, sig_out, _filters(D, M), meta["use_bias"], key=_KEY, backend=backend, **kw)
    new_w = {ik: {ok: jnp.asarray(arrays[f"w/{_name(ik)}/{_name(ok)}"]) for ok in d} for ik, d in layer.weights.items()}
    layer = eqx.tree_at(lambda m: m.weights, layer, new_w)
    if layer.bias:
        layer = eqx.tree_at(lambda m: m.bias, layer, {k: jnp.asarray(arrays[f"b/{_name(k)}"]) for k in layer.bias})
    x = geom.MultiImage({((False,) * k, p): jnp.asarray(arrays[f"x/k{k}p{p}"]) for k, p, _ in meta["input"]}, D, _tup(meta["is_torus"]))
    return meta, arrays, layer, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", conv_contract_cases())
def test_reproduces_ginjax_fixture(case, backend):
    meta, arrays, layer, x = _fixture_layer(case, backend)
    assert layer.missing_filter == meta["missing_filter"]
    with jax.default_matmul_precision("highest"):
        out = layer(x)
    expected = {k: v for k, v in arrays.items() if k.startswith("out/")}
    assert sorted(f"out/{_name(k)}" for k in out.keys()) == sorted(expected)
    for key, block in out.items():
        want = expected[f"out/{_name(key)}"]
        assert block.shape == want.shape
        assert rel_l2(block, want) <= 1e-5, key
