"""The fused backends' shared core (kernels/_fused) on the CPU, without any backend: the basis
nonzero tables against np.nonzero, the transposed layer of the input gradient against a
brute-force evaluation of the definition (its adjoint), the int32 limits, the tile sizes, and
the launcher contract every fused backend keeps (entry-point keywords, BlockSizes methods)."""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest
from hypothesis import strategies as st

import kernels
from conftest import (
    conv_contract_case, conv_contract_cases, draw_covered_layer, drawn_examples, fixture_filters,
    fixture_spec, float64, invariant_pairs, random_operands, run_drawn,
)
from kernels import _fused

# ---- a brute-force ConvContract (stride 1, no lhs_dilation), straight from kernels/_spec.py ----


def _source_index(n: int, q: int, wrap: tuple[int, int], zero_lo: int) -> int:
    """The input cell read at padded position q of an axis of n cells padded as
    zeros(zero_lo) + wrap(lo) + X + wrap(hi) + zeros(...), or -1 for a zero."""
    p = q - zero_lo
    if p < 0 or p >= n + wrap[0] + wrap[1]:
        return -1
    return (p - wrap[0]) % n


def brute_forward(spec, inputs, weights):
    """out_b[o, x, j] = sum X_a[c, x + y * rhs_dilation - pad, i] * sum_f w[o, c, f] B[f, y, i, j],
    pixel by pixel in float64."""
    D = spec.D
    spatial = inputs[0].shape[1 : 1 + D]
    out_spatial = spec.out_spatial(spatial)
    outs = [np.zeros((o,) + out_spatial + (D**k,)) for k, _, o in spec.out_keys]
    for t, pair in enumerate(spec.pairs):
        basis = _fused.pair_basis(spec, t)  # (F, taps, I, J)
        filt = np.einsum("ocf,fyij->ocyij", weights[t], basis)
        x = inputs[pair.in_index]
        x = x.reshape(x.shape[: 1 + D] + (-1,))
        for out_pix in np.ndindex(*out_spatial):
            for tap, ys in enumerate(np.ndindex(*spec.filter_shape)):
                src = []
                for ax in range(D):
                    q = out_pix[ax] + ys[ax] * spec.rhs_dilation[ax]
                    src.append(_source_index(spatial[ax], q, spec.torus_pad[ax], spec.zero_pad[ax][0]))
                if min(src) < 0:
                    continue
                outs[pair.out_index][(slice(None),) + out_pix] += np.einsum(
                    "ocij,ci->oj", filt[:, :, tap], x[(slice(None),) + tuple(src)]
                )
    return [o.reshape(o.shape[: 1 + D] + (D,) * k) for o, (k, _, _) in zip(outs, spec.out_keys)]


def _inner(a, b) -> float:
    return float(sum(np.vdot(x, y) for x, y in zip(a, b)))


def _layer(D, M, ins, outs, is_torus, **geometry):
    in_keys = list(ins)
    out_keys, pairs = invariant_pairs(fixture_filters(D, M), in_keys, list(outs))
    return kernels.make_spec(D, in_keys, out_keys, pairs, is_torus, **geometry)


SCALAR, VECTOR = (0, 0), (1, 0)


def test_brute_force_matches_reference():
    """The brute force used below is the operation (against the `reference` backend, float64)."""
    spec = _layer(2, 3, [SCALAR + (2,), VECTOR + (1,)], [VECTOR + (2,)], (True, False), rhs_dilation=(1, 2))
    inputs, weights = random_operands(spec, (5, 6), seed=1)
    with float64():
        want = kernels.conv_contract(spec, inputs, weights, backend="reference", precision="fp32")
        want = [np.asarray(w) for w in want]
    for g, w in zip(brute_forward(spec, inputs, weights), want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


# ---- transposed geometry ------------------------------------------------------------------------
def _check_adjoint(spec, spatial, seed):
    """<G, A X> = <A^T G, X>: the forward of the transposed layer (with transposed weights) is
    the adjoint of the forward, for random X, G and weights."""
    spec_t, used = _fused.transposed_spec(spec)
    inputs, weights = random_operands(spec, spatial, seed)
    rng = np.random.default_rng(seed + 7)
    out_spatial = spec.out_spatial(spatial)
    cots = [rng.standard_normal((o,) + out_spatial + (spec.D,) * k) for k, _, o in spec.out_keys]
    assert spec_t.out_spatial(out_spatial) == tuple(spatial)
    w_t = [np.swapaxes(w, -3, -2) for w in weights]
    grads = brute_forward(spec_t, cots, w_t)
    assert len(grads) == len(used)
    lhs = _inner(cots, brute_forward(spec, inputs, weights))
    rhs = _inner(grads, [inputs[a] for a in used])
    assert abs(lhs - rhs) <= 1e-9 * max(1.0, abs(lhs)), (lhs, rhs)


@pytest.mark.parametrize(
    "D, M, is_torus, geometry, spatial",
    [
        (2, 3, True, dict(padding="TORUS"), (5, 6)),
        (2, 3, False, dict(padding="SAME"), (5, 4)),
        (2, 3, False, dict(padding="VALID"), (6, 5)),
        (2, 3, (True, False), dict(padding="TORUS", rhs_dilation=2), (6, 7)),
        (2, 2, False, dict(padding=((0, 3), (1, 1))), (4, 5)),  # zeros beyond the reach: crops
        (2, 5, False, dict(padding=((4, 0), (0, 2)), rhs_dilation=1), (6, 6)),
        (3, 3, (False, True, False), dict(padding="TORUS"), (3, 4, 3)),
    ],
)
def test_transposed_spec_is_the_adjoint(D, M, is_torus, geometry, spatial):
    spec = _layer(D, M, [SCALAR + (2,), VECTOR + (1,)], [SCALAR + (1,), VECTOR + (2,)], is_torus, **geometry)
    _check_adjoint(spec, spatial, seed=3)


def _adjoint_on_drawn_layer(layer):
    spec, N = layer
    if _fused.transpose_blocker(spec):
        assert _fused.transposed_spec(spec) is None
        return
    _check_adjoint(spec, (N,) * spec.D, seed=5)


@drawn_examples(10, 60)
def test_transposed_spec_is_the_adjoint_on_drawn_layers(examples):
    run_drawn(_adjoint_on_drawn_layer, examples, layer=st.composite(lambda draw: draw_covered_layer(draw))())


def test_transposed_spec_drops_unread_keys_and_swaps_padding():
    # a pseudotensor input reaches the vector output through no filter (order 3): it gets no
    # gradient block
    spec = _layer(2, 3, [SCALAR + (2,), (2, 1, 1), VECTOR + (3,)], [VECTOR + (4,)], (True, False), padding="TORUS")
    spec_t, used = _fused.transposed_spec(spec)
    assert used == (0, 2)
    assert spec_t.in_keys == spec.out_keys
    assert spec_t.out_keys == tuple(spec.in_keys[a] for a in used)
    assert spec_t.torus_pad == ((1, 1), (0, 0)) and spec_t.zero_pad == ((0, 0), (1, 1))
    wide = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], (True, False), padding="TORUS", rhs_dilation=2)
    assert _fused.transposed_spec(wide)[0].torus_pad == ((2, 2), (0, 0))
    assert _fused.transposed_spec(wide)[0].zero_pad == ((0, 0), (2, 2))
    skew = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], False, padding=((0, 3), (2, 0)))
    assert _fused.transposed_spec(skew)[0].zero_pad == ((2, -1), (0, 2))  # -1: one cell cropped
    grads = [np.ones((2, 3, 3), np.float32), np.ones((3, 3, 3, 2), np.float32)]
    inputs = [np.zeros((2, 3, 3), np.float32), np.zeros((1, 3, 3, 2, 2), np.float32), np.zeros((3, 3, 3, 2), np.float32)]
    full = _fused.scatter_input_grads(used, grads, inputs)
    assert full[0] is grads[0] and full[2] is grads[1]
    assert full[1].shape == (1, 3, 3, 2, 2) and not np.asarray(full[1]).any()


def test_transpose_blocker_reasons():
    wrap_and_zero = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], True, padding=((1, 1), (1, 1)))
    wrap_and_zero = type(wrap_and_zero)(**{**wrap_and_zero.__dict__, "torus_pad": ((1, 1), (0, 0)), "zero_pad": ((1, 0), (1, 1))})
    assert _fused.transpose_blocker(wrap_and_zero) == "axis 0 both wraps and zero-pads"
    partial = type(wrap_and_zero)(**{**wrap_and_zero.__dict__, "torus_pad": ((1, 0), (0, 0)), "zero_pad": ((0, 0), (1, 1))})
    assert _fused.transpose_blocker(partial) == "axis 0 wraps by (1, 0), not the 2 cells that keep its size"
    assert _fused.transposed_spec(partial) is None
    strided = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], False, stride=2)
    assert "stride (2, 2)" in _fused.transpose_blocker(strided)
    assert _fused.transpose_blocker(_layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], True)) == ""


# ---- basis tables -------------------------------------------------------------------------------
def _fixture_specs():
    for case in conv_contract_cases():
        meta, arrays = conv_contract_case(case)
        yield case, fixture_spec(meta, arrays)[0]


@pytest.mark.parametrize("case, spec", list(_fixture_specs()), ids=[c for c, _ in _fixture_specs()])
def test_basis_nonzeros_are_the_basis(case, spec):
    """Every nonzero once, in (pair, f, tap, i, j) order with its value; the read groups
    partition them; a dense basis rebuilt from them is the basis."""
    nonzeros = _fused.basis_nonzeros(spec)
    keys = [(nz.pair, nz.f, nz.tap, nz.i, nz.j) for nz in nonzeros]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert _fused.count_nonzeros(spec) == sum(int(np.count_nonzero(p.basis.array)) for p in spec.pairs)
    for t, pair in enumerate(spec.pairs):
        dense = np.zeros_like(_fused.pair_basis(spec, t))
        for nz in nonzeros:
            if nz.pair == t:
                assert nz.key == pair.in_index and nz.value != 0
                dense[nz.f, nz.tap, nz.i, nz.j] = nz.value
        np.testing.assert_array_equal(dense.reshape(pair.basis.array.shape), pair.basis.array)
    groups = _fused.nonzeros_by_read(spec)
    assert list(groups) == sorted(groups)
    regrouped = sorted((nz.pair, nz.f, nz.tap, nz.i, nz.j) for g in groups.values() for nz in g)
    assert regrouped == keys
    for (a, tap, i), group in groups.items():
        assert all((nz.key, nz.tap, nz.i) == (a, tap, i) for nz in group)
        order = [(nz.pair, nz.f, nz.j) for nz in group]
        assert order == sorted(order)


def test_pair_basis_axes():
    """(F, taps, I, J): taps flattened row-major, input tensor index before the output one."""
    spec = _layer(2, 3, [VECTOR + (1,)], [VECTOR + (1,)], True)
    basis = spec.pairs[0].basis.array  # (F, 3, 3, 2, 2)
    table = _fused.pair_basis(spec, 0)
    assert table.shape == (basis.shape[0], 9, 2, 2)
    f, y0, y1, i, j = 0, 2, 1, 1, 0
    assert table[f, y0 * 3 + y1, i, j] == basis[f, y0, y1, i, j]


# ---- per-axis geometry --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, taps, dilation, wrap, zero",
    [(5, 3, 1, (1, 1), (0, 0)), (5, 3, 2, (2, 2), (0, 0)), (6, 3, 1, (0, 0), (1, 1)), (4, 2, 1, (0, 0), (0, 3)),
     (7, 5, 1, (0, 0), (4, 0)), (6, 3, 1, (0, 0), (-1, 2)), (3, 3, 2, (4, 0), (0, 0))],
)
def test_axis_geometry_reads_the_padded_axis(n, taps, dilation, wrap, zero):
    """The source table against the padded axis built cell by cell (zeros, wrapped cells, the
    input, wrapped cells, zeros), then cropped where zero_lo is negative."""
    padded = [-1] * max(zero[0], 0) + [(c - wrap[0]) % n for c in range(n + wrap[0] + wrap[1])] + [-1] * max(zero[1], 0)
    padded = padded[max(-zero[0], 0) : len(padded) - max(-zero[1], 0)]
    n_out = len(padded) - (taps - 1) * dilation
    geo = _fused.AxisGeometry(n, n_out, taps, dilation, wrap[0], wrap[1], zero[0])
    assert geo.source_table().tolist() == padded
    assert geo.wrap == any(wrap) and geo.frame == n + sum(wrap)
    for q in range(n_out):  # the offset form the kernels use, on the cells inside the frame
        for y in range(taps):
            cell = q + y * dilation + geo.offset
            if -wrap[0] <= cell < n + wrap[1]:
                assert padded[q + y * dilation] == cell % n


def test_axes_of_a_spec():
    spec = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], (True, False), padding="TORUS", rhs_dilation=(1, 2))
    assert _fused.axes(spec, (6, 7)) == (
        _fused.AxisGeometry(6, 6, 3, 1, 1, 1, 0), _fused.AxisGeometry(7, 7, 3, 2, 0, 0, 2)
    )


# ---- limits and tile sizes ----------------------------------------------------------------------
def test_next_pow2_and_dot_tile():
    assert [_fused.next_pow2(n) for n in (0, 1, 2, 3, 4, 5, 16, 17, 1000)] == [1, 1, 2, 4, 4, 8, 16, 32, 1024]
    assert [_fused.dot_tile(n) for n in (1, 15, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]


def test_int32_overflow():
    spec = _layer(3, 3, [SCALAR + (3,), VECTOR + (1,)], [VECTOR + (2,)], True)
    assert _fused.int32_overflow(spec, (64, 64, 64), "triton", per_channel=True) == ""
    # 900^3 pixels x 3 components in one channel of the vector input
    assert _fused.int32_overflow(spec, (900,) * 3, "triton", per_channel=True) == (
        "input block 1 has 2187000000 elements per channel (729000000 pixels, tensor order 1); "
        "the triton backend supports at most 2^31 - 1 per channel"
    )
    # 720^3: every channel fits, the 2-channel vector output as a whole does not
    assert _fused.int32_overflow(spec, (720,) * 3, "pallas", per_channel=True) == ""
    assert _fused.int32_overflow(spec, (720,) * 3, "pallas", per_channel=False) == (
        "output block 0 has 2239488000 elements (373248000 pixels, tensor order 1, 2 channels); "
        "the pallas backend supports at most 2^31 - 1 (32-bit offsets)"
    )
    # the limit itself is allowed (the output of this VALID layer is empty)
    at = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], False, padding="VALID")
    assert _fused.int32_overflow(at, (1, _fused.INT32_MAX), "x", per_channel=False) == ""
    assert _fused.int32_overflow(at, (1, _fused.INT32_MAX + 1), "x", per_channel=False).startswith("input block 0")


# ---- the launcher contract ----------------------------------------------------------------------
FUSED = {"triton": "conv_contract_triton", "pallas": "conv_contract_pallas", "native": "conv_contract_native"}


@pytest.mark.parametrize("backend", sorted(FUSED))
def test_launcher_contract(backend):
    """Every fused backend: `conv_contract_<backend>(spec, inputs, weights, *, precision=None,
    block_sizes=None, ...)`, and a BlockSizes with `for_layer(spec, spatial)` and `validate(D)`."""
    try:
        module = importlib.import_module(f"kernels.{backend}")
        entry = getattr(module, FUSED[backend])
        block_sizes = module.BlockSizes
    except (ImportError, AttributeError) as err:  # pallas needs a jax with Pallas' Triton module
        pytest.fail(f"kernels.{backend} does not export its entry point and BlockSizes: {err}")
    params = inspect.signature(entry).parameters
    assert list(params)[:3] == ["spec", "inputs", "weights"]
    for name in ("precision", "block_sizes"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[3:])
    spec = _layer(2, 3, [SCALAR + (1,)], [SCALAR + (1,)], True)
    default = block_sizes.for_layer(spec, (8, 8))
    assert isinstance(default, block_sizes)
    default.validate(2)
    assert block_sizes.validate.__code__.co_varnames[:2] == ("self", "D")
    assert _fused.resolve_block_sizes(None, block_sizes, spec, (8, 8)) == default
    with pytest.raises(ValueError, match=rf"`block_sizes` \(=\{{\}}\) must be a kernels\.{backend}\.BlockSizes or None"):
        _fused.resolve_block_sizes({}, block_sizes, spec, (8, 8))


def test_native_block_sizes():
    from kernels.native import BlockSizes

    with pytest.raises(ValueError, match=r"`block_sizes\.tile_pixels` \(=0\)"):
        BlockSizes(tile_pixels=0).validate(3)
    # rows of the last axis padded to 16 lanes: 64 pixels hold 4 rows of 10, 2 of 20, 1 of 40
    assert [BlockSizes().tile_rows((9, n)) for n in (10, 20, 40)] == [4, 2, 1]
    assert BlockSizes(tile_pixels=256).tile_rows((3, 10)) == 3  # at most the axis
