"""ConvContract guarantees from issue 17: the layer computes with the filters it holds, keys that
no filter joins are dropped with a warning, a torus wrap wider than the grid is computed (the wrap
repeats), signatures may be mappings, GINJAX_BACKEND tolerates spaces, and one dtype policy holds
in the layer and in kernels.conv_contract."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax.layers import ConvContract, FilterBank
from conftest import filter_bank, rel_l2

D = 2
KEY = jax.random.PRNGKey(3)
SIG = geom.Signature((((0, 0), 2), ((1, 0), 1)))
LAX_BACKENDS = ["reference", "dense"]


def _filters(M=3, ks=(0, 1, 2)):
    return filter_bank(D, M, ks=ks)


def _x(sig=SIG, n=5, seed=0, dtype=jnp.float32, is_torus=True):
    rng = np.random.default_rng(seed)
    return geom.MultiImage(
        {((False,) * k, p): jnp.asarray(rng.normal(size=(c, n, n) + (D,) * k), dtype) for ((k, p), c) in
         [((len(kk), pp), cc) for (kk, pp), cc in sig]},
        D,
        is_torus,
    )


def _scaled(filters, factor):
    return geom.MultiImage({k: factor * v for k, v in filters.items()}, filters.D, filters.is_torus)


# ---- item 1: what the layer holds is what it computes with ------------------------------------


@pytest.mark.parametrize("backend", LAX_BACKENDS + [b for b in ("triton", "pallas") if b in kernels.available_backends()])
def test_replacing_the_filters_takes_effect_eagerly_and_under_jit(backend):
    filters = _filters()
    layer = ConvContract(SIG, SIG, filters, use_bias=False, key=KEY, backend=backend)
    x = _x()
    doubled = eqx.tree_at(lambda m: m.invariant_filters, layer, FilterBank(_scaled(filters, 2.0)))
    base = layer(x)
    for out in (doubled(x), eqx.filter_jit(lambda m, v: m(v))(doubled, x)):
        for key in base.keys():
            assert rel_l2(out[key], 2.0 * base[key]) < 1e-5, key


def test_ginjax_0_1_8_style_filter_transfer_between_models_takes_effect():
    # transfer_weights in 0.1.8 sets every conv's filters with tree_at over a list of fields
    is_conv = lambda n: isinstance(n, ConvContract)  # noqa: E731
    get_filters = lambda m: [c.invariant_filters for c in jax.tree.leaves(m, is_leaf=is_conv) if is_conv(c)]  # noqa: E731
    a = [ConvContract(SIG, SIG, _filters(), use_bias=False, key=KEY)]
    b = [ConvContract(SIG, SIG, _scaled(_filters(), -3.0), use_bias=False, key=KEY)]
    moved = eqx.tree_at(get_filters, a, get_filters(b))
    x = _x()
    for key, block in a[0](x).items():
        assert rel_l2(moved[0](x)[key], -3.0 * block) < 1e-5


def test_a_plain_multi_image_put_in_works_eagerly_and_fails_loudly_under_jit():
    filters = _filters()
    layer = ConvContract(SIG, SIG, filters, use_bias=False, key=KEY)
    plain = eqx.tree_at(lambda m: m.invariant_filters, layer, _scaled(filters, 2.0))
    x = _x()
    assert rel_l2(plain(x)[((), 0)], 2.0 * layer(x)[((), 0)]) < 1e-5
    with pytest.raises(TypeError, match=r"traced under jit.*FilterBank\(filters\)"):
        eqx.filter_jit(lambda m, v: m(v))(plain, x)


def test_filters_are_constants_not_parameters():
    layer = ConvContract(SIG, SIG, _filters(), key=KEY)
    params = jax.tree.leaves(eqx.filter(layer, eqx.is_inexact_array))
    n_weights = sum(len(d) for d in layer.weights.values())
    assert len(params) == n_weights + len(layer.bias)
    with pytest.raises(TypeError, match="immutable"):
        layer.invariant_filters[((), 0)] = jnp.zeros((1, 3, 3))
    with pytest.raises(ValueError, match="weights.*has shape"):  # another filter count: named
        eqx.tree_at(lambda m: m.invariant_filters, layer, FilterBank(_filters(M=5)))(_x())


# ---- item 4: keys no filter joins are dropped with a warning ----------------------------------


def test_keys_without_filters_are_dropped_with_one_warning_naming_them():
    sig_in = geom.Signature((((0, 0), 3), ((3, 0), 1)))
    sig_out = geom.Signature((((0, 0), 1), ((3, 1), 2)))
    with pytest.warns(UserWarning, match=r"input keys \[\(\(False, False, False\), 0\)\].*target keys \[\(\(False, False, False\), 1\)\]"):
        layer = ConvContract(sig_in, sig_out, _filters(ks=(0, 1)), key=KEY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ConvContract(sig_in, sig_out, _filters(ks=(0, 1)), key=KEY)  # once per configuration
    out = layer(_x(sig_in, n=4))
    assert list(out.keys()) == [((), 0)]  # ginjax 0.1.8's result, unchanged


# ---- item 5: a torus wrap wider than the grid repeats ------------------------------------------


def _torus_oracle(layer, x, dilation):
    """Scalar -> scalar by direct summation with indices taken mod N (numpy, float64)."""
    basis = np.asarray(layer.invariant_filters[((), 0)], np.float64)  # (F, 3, 3)
    w = np.asarray(layer.weights[((), 0)][((), 0)], np.float64)  # (o, c, F)
    filt = np.einsum("ocf,fab->ocab", w, basis)
    xs = np.asarray(x[((), 0)], np.float64)
    n = xs.shape[1]
    out = np.zeros((w.shape[0], n, n))
    for i in range(n):
        for j in range(n):
            for a in range(3):
                for b in range(3):
                    patch = xs[:, (i + (a - 1) * dilation) % n, (j + (b - 1) * dilation) % n]
                    out[:, i, j] += filt[:, :, a, b] @ patch
    return out


@pytest.mark.parametrize("backend", LAX_BACKENDS)
def test_torus_wrap_wider_than_the_grid_is_computed(backend):
    sig = geom.Signature((((0, 0), 2),))
    layer = ConvContract(sig, sig, _filters(ks=(0,)), use_bias=False, rhs_dilation=8, key=KEY, backend=backend)
    x = _x(sig, n=4)  # wrap 8 cells on a 4-cell axis
    with jax.default_matmul_precision("highest"):
        out = layer(x)[((), 0)]
    assert rel_l2(out, _torus_oracle(layer, x, 8)) < 1e-5


def test_dilresnet_runs_on_a_periodic_grid_smaller_than_its_dilations():
    from ginjax import models

    sig = geom.Signature((((0, 0), 1),))
    net = models.DilResNet(D, sig, sig, 2, num_blocks=1, conv_filters=_filters(ks=(0, 1)), key=KEY)
    out, _ = net(_x(sig, n=4))  # dilation 8 on 4 cells
    assert out[((), 0)].shape == (1, 4, 4) and bool(jnp.all(jnp.isfinite(out[((), 0)])))


@pytest.mark.parametrize("fused", [b for b in ("triton", "pallas") if b in kernels.registered_backends()])
def test_fused_backends_fall_back_on_a_wrap_wider_than_the_grid(fused):
    sig = geom.Signature((((0, 0), 2),))
    layer = ConvContract(sig, sig, _filters(ks=(0,)), rhs_dilation=8, key=KEY)
    ok, why = kernels._registry.get(fused).coverage(layer.conv_spec(), (4, 4), jnp.float32)
    assert not ok and "wider than its 4 cells" in why
    if fused in kernels.available_backends():
        choice = kernels.explain(layer, _x(sig, n=4), backend=fused)
        assert choice.backend == "dense" and "wider than its 4 cells" in choice.reason


# ---- items 7 and 9: mapping signatures; GINJAX_BACKEND with spaces ------------------------------


def test_a_mapping_signature_means_the_same_as_the_tuple():
    as_dict = ConvContract({(0, 0): 2, (1, 0): 1}, {(0, 0): 2, (1, 0): 1}, _filters(), key=KEY)
    as_tuple = ConvContract(SIG, SIG, _filters(), key=KEY)
    assert as_dict.input_keys == as_tuple.input_keys == SIG
    x = _x()
    for key, block in as_tuple(x).items():
        np.testing.assert_array_equal(as_dict(x)[key], block)


def test_ginjax_backend_tolerates_spaces_and_capitals(monkeypatch):
    layer = ConvContract(SIG, SIG, _filters(), key=KEY)
    monkeypatch.setenv("GINJAX_BACKEND", "  Reference ")
    choice = kernels.explain(layer, _x())
    assert choice.backend == "reference" and choice.source == "$GINJAX_BACKEND"


# ---- item 11: one dtype policy -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("use_bias", [False, "auto"])
def test_half_precision_in_gives_the_same_dtype_out(dtype, use_bias):
    layer = ConvContract(SIG, SIG, _filters(), use_bias=use_bias, key=KEY)
    x32 = _x()
    x16 = geom.MultiImage({k: v.astype(dtype) for k, v in x32.items()}, D, True)
    want = layer(x16.__class__({k: v.astype(jnp.float32) for k, v in x16.items()}, D, True))
    got = layer(x16)
    for key, block in got.items():
        assert block.dtype == dtype, key
        assert rel_l2(block, want[key]) < 2e-2, key


def test_integers_are_rejected_by_the_layer_and_by_kernels_alike():
    layer = ConvContract(SIG, SIG, _filters(), key=KEY)
    x_int = geom.MultiImage({k: v.astype(jnp.int32) for k, v in _x().items()}, D, True)
    with pytest.raises(ValueError, match=r"`x\[\(\(\), 0\)\]` has dtype int32; ConvContract takes floating-point"):
        layer(x_int)
    spec = layer.conv_spec()
    weights = [layer.weights[i][o] for i, o in _pair_keys(layer)]
    with pytest.raises(ValueError, match=r"`inputs\[0\]` has dtype int32; ConvContract takes floating-point"):
        kernels.conv_contract(spec, list(x_int.values()), weights)


def test_kernels_conv_contract_returns_the_input_dtype():
    layer = ConvContract(SIG, SIG, _filters(), key=KEY)
    spec = layer.conv_spec().without_bias()  # the layer's spec carries its bias modes
    weights = [layer.weights[i][o] for i, o in _pair_keys(layer)]
    blocks = [v.astype(jnp.bfloat16) for v in _x().values()]
    outs = kernels.conv_contract(spec, blocks, weights, backend="dense")
    assert all(o.dtype == jnp.bfloat16 for o in outs)


def _pair_keys(layer):
    """(input key, target key) of each pair in the order of layer.conv_spec().pairs."""
    return [(i, o) for i, _ in layer.input_keys for o, _ in layer.target_keys if o in layer.weights[i]]
