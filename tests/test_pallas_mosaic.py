"""The Mosaic GPU forward spike (kernels/pallas/mosaic_fwd.py) on a CPU: its plan (groups, basis
nonzeros, shared reads, K sizes), the TMA box and shared-memory arithmetic, a numpy emulation of
the kernel's indexing (halo rows, wrap-padded x rows, stride-3 component views, packed K-major
weights, per-group GEMMs) against the `reference` backend, and the lowering of the kernel itself
to a Mosaic GPU custom call for CUDA (jax's Mosaic lowering runs in Python, so API misuse, layout
and transfer errors show up here). What only the GPU tests (tests/test_pallas_mosaic_gpu.py)
cover: the compiled kernel's numbers (TMA zero fill, the swizzled A stores, wgmma tf32), its
timing, and jax 0.11.2."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

import jax

import kernels
from bench import _cases, _configs
from conftest import rel_l2
from kernels.pallas import _mosaic_plan as mp

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
from kernels.pallas import mosaic_fwd as mf  # noqa: E402

CFG = _configs.CONFIGS["d3_n64_b4_c16"]
SPEC = _cases.fixture_spec(CFG)
H100_SMEM = 232_448  # bytes of dynamic shared memory one block may take on sm_90


def test_plan_of_the_standard_layer():
    plan = mp.make_plan(SPEC, (64, 64, 64))
    assert [(g.dst, g.j) for g in plan.groups] == [(0, 0), (1, 0), (1, 1), (1, 2)]
    assert [len(g.tiles) for g in plan.groups] == [7, 11, 11, 11]  # the 40 Z tiles per channel
    assert [g.k for g in plan.groups] == [56, 88, 88, 88]  # wgmma K: multiples of 8 (tf32, 32 B swizzle)
    assert sum(len(e) for g in plan.groups for e in g.entries) == 342  # basis nonzeros
    assert len(mp.shared_reads(plan)) == 108  # 27 taps x (1 scalar + 3 vector components)
    assert len(mp.weight_sets(plan)) == 2  # the vector components share their weights
    assert plan.n_chunks == 2


def test_shared_memory_fits_one_block():
    plan = mp.make_plan(SPEC, (64, 64, 64))
    assert mp.smem_bytes(plan) == 204_288
    assert mp.smem_bytes(plan) <= H100_SMEM


def test_tma_boxes_are_aligned():
    plan = mp.make_plan(SPEC, (64, 64, 64))
    for k in (0, 1):
        row = plan.row_floats(k)
        assert row == (64 + 3 * mp.PAD) * 3**k
        assert mp.bank_conflicts(row, 3**k) == 1  # the padded pitch: one wavefront per warp read
        assert mp.bank_conflicts((64 + 2 * mp.PAD) * 3**k, 3**k) == 2  # a symmetric pad: two
        assert mp.tma_box_ok(0, row, row), k
    assert mp.tma_box_ok(0, 64, 64) and mp.tma_box_ok(0, 3 * 64, 3 * 64)  # the output rows
    # what the wrap-padded rows avoid: a start one pixel (3 floats) into a vector row, a box past
    # 256 elements (a 16-pixel vector pad)
    assert not mp.tma_box_ok(3, 192, 192)
    assert not mp.tma_box_ok(0, 288, 288)
    assert mp.pixel_start(-1) == mp.PAD - 1 and mp.pixel_start(1) + 64 <= mp.ROW_PIXELS


def test_halo_rows_wrap():
    assert [mp.halo_row(0, d, 5) for d in (-1, 0, 1)] == [4, 0, 1]
    assert [mp.halo_row(4, d, 5) for d in (-1, 0, 1)] == [3, 4, 0]


@pytest.mark.parametrize(
    "change, spatial, why",
    [
        ({}, (8, 8, 32), "x extent"),
        ({"c": 12}, (8, 8, 64), "multiple of 8"),
    ],
)
def test_coverage_says_why(change, spatial, why):
    spec = _cases.fixture_spec(dataclasses.replace(CFG, **change))
    ok, reason = mp.coverage(spec, spatial)
    assert not ok and why in reason
    with pytest.raises(ValueError, match="not covered by the Mosaic GPU spike"):
        mp.make_plan(spec, spatial)


def test_coverage_rejects_2d_and_zero_padding():
    spec2 = _cases.fixture_spec(_configs.CONFIGS["d2_n256_b16_c32"])
    assert not mp.coverage(spec2, (64, 64))[0]
    same = dataclasses.replace(SPEC, is_torus=(False,) * 3, torus_pad=((0, 0),) * 3, zero_pad=((1, 1),) * 3)
    ok, reason = mp.coverage(same, (8, 8, 64))
    assert not ok and "torus" in reason


def _emulate(plan, xs, ws):
    """The kernel's data movement in numpy float64: per (b, z, y) row and channel chunk, the 3 x 3
    halo rows of the wrap-padded blocks, the Z tiles from their shifted (and stride-3) views, the
    per-group GEMM with the packed weights, the transposed stores."""
    xpad = [np.asarray(mf.pad_rows(x, k), np.float64) for k, x in enumerate(xs)]
    packed = [np.asarray(w, np.float64) for w in mp.pack_weights(plan, [np.asarray(w) for w in ws])]
    sets = mp.weight_sets(plan)
    B = xs[0].shape[0]
    nz, ny, nx = plan.spatial
    o = plan.out_channels
    out0 = np.full((B, o, nz, ny, nx), np.nan)
    out1 = np.full((B, o, nz, ny, nx, 3), np.nan)
    zs, ys = np.arange(nz), np.arange(ny)
    for b in range(B):
        acc = [np.zeros((nz, ny, mp.ROW, o)) for _ in plan.groups]
        for h in range(plan.n_chunks):
            ch = slice(h * mp.CHUNK, (h + 1) * mp.CHUNK)

            def tile(offset, a, i):
                dz, dy, dx = offset
                rows = xpad[a][b, ch][:, mp.halo_row(zs, dz, nz)][:, :, mp.halo_row(ys, dy, ny)]
                rows = rows.reshape(rows.shape[:3] + (mp.ROW_PIXELS, 3**a))
                view = rows[..., mp.pixel_start(dx) : mp.pixel_start(dx) + mp.ROW, i]  # (c, z, y, px)
                return np.moveaxis(view, 0, -1)  # (z, y, px, c)

            for gi, g in enumerate(plan.groups):
                a_tile = np.zeros((nz, ny, mp.ROW, g.k))
                for ti, entries in enumerate(g.entries):
                    for offset, a, i, coef in entries:
                        a_tile[..., ti * mp.CHUNK : (ti + 1) * mp.CHUNK] += coef * tile(offset, a, i)
                acc[gi] += a_tile @ packed[sets.index(g.tiles)][h].T
        for gi, g in enumerate(plan.groups):
            res = np.moveaxis(acc[gi], -1, 0)  # (o, z, y, x)
            if g.dst == 0:
                out0[b] = res
            else:
                out1[b, ..., g.j] = res
    return out0, out1


def test_emulated_kernel_matches_reference():
    spatial = (3, 4, 64)
    xs, ws, _ = _cases.spec_operands(SPEC, spatial, 2, seed=3)
    plan = mp.make_plan(SPEC, spatial)
    got = _emulate(plan, xs, ws)
    with jax.default_matmul_precision("highest"):
        want = jax.vmap(lambda x: kernels.conv_contract(SPEC, x, ws, backend="reference"))(xs)
    for g, w in zip(got, want):
        assert not np.isnan(g).any(), "an output element the kernel's rows never write"
        assert rel_l2(g, w) <= kernels.TOLERANCE["fp32"]


def test_pack_weights_is_the_k_major_gemm_operand():
    plan = mp.make_plan(SPEC, (64, 64, 64))
    _, ws, _ = _cases.spec_operands(SPEC, (4, 4, 64), 1)
    ws = [np.asarray(w) for w in ws]
    packed = mp.pack_weights(plan, ws)
    for tiles, p in zip(mp.weight_sets(plan), packed):
        assert p.shape == (plan.n_chunks, plan.out_channels, len(tiles) * mp.CHUNK)
        for h in range(plan.n_chunks):
            for ti, (t, f) in enumerate(tiles):
                np.testing.assert_array_equal(
                    p[h, :, ti * mp.CHUNK : (ti + 1) * mp.CHUNK], ws[t][:, h * mp.CHUNK : (h + 1) * mp.CHUNK, f]
                )


@pytest.mark.parametrize("variant", [{}, {"share_loads": True, "auto_barriers": False}])
def test_kernel_lowers_to_a_mosaic_gpu_custom_call(variant):
    """Lowered for CUDA on this machine: Mosaic's layouts, transfers, TMA boxes and wgmma
    operand checks all run at lowering time."""
    xs, ws, _ = _cases.spec_operands(SPEC, (3, 4, 64), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = jax.jit(lambda xs, ws: mf.mosaic_forward(SPEC, xs, ws, **variant))
        text = fn.trace(xs, ws).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
