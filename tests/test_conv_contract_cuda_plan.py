"""The CUDA forward kernel's plan (kernels/cuda/_plan.py) on a CPU: its generated stencil walk is up
to date, the plan's phases, symmetric row groups and shared-memory layout (bank-conflict-free
reads, the budget), the packed, tf32-rounded mma B fragments and the tf32 rounding, the
channel-group choice and its shared memory, the coverage reasons and a library that will not
load, and (slow) nvcc's resource report: no spills, the register budget, for the kernels with
residuals too. The lane emulation of the kernel is tests/test_conv_contract_cuda.py's; what only
tests/test_conv_contract_cuda_gpu.py covers is said there."""

from __future__ import annotations

import dataclasses

import re
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from _conv_cuda_emulate import standard_spec
from _hopper_compile import ptxas_entries, ptxas_report
from kernels import cuda
from kernels.cuda import _dw_plan, _ffi, _plan
from kernels.cuda import conv_contract as cuda_entry

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3
MAX_REGISTERS = 255  # __launch_bounds__(256, 1): 65,536 registers / 256 threads


def test_generated_stencil_is_up_to_date():
    assert _plan.INCLUDE.read_text() == _plan.stencil_source(SPEC), (
        "regenerate: kernels/cuda/stencil_d3.inc = _plan.stencil_source(spec)")


def test_phases_of_the_standard_layer():
    groups, (vec, sca) = _plan.phases(SPEC)
    assert groups == ((0, 0), (1, 0), (1, 1), (1, 2))
    assert (vec.key, len(vec.tiles), len(vec.rows), vec.first_rows) == (1, 27, 27, 9)
    assert (sca.key, len(sca.tiles), len(sca.rows), sca.first_rows) == (0, 13, 9, 3)
    assert sum(len(u) for ph in (vec, sca) for _, u in ph.rows) == 342  # every basis nonzero once
    for ph in (vec, sca):
        dys = [dy for (dz, dy, i), _ in ph.rows]
        assert dys == sorted(dys)  # dy-major: the MID hook frees the dy = -1 slice
    assert (_plan.walk_cost(vec), _plan.walk_cost(sca)) == (712, 236)  # FP32 instructions, was 4 x 342


def test_row_groups_reconstruct_every_tap():
    """The symmetric classes' coefficients give back each tile's taps (dz, dy, dx, i) exactly."""
    _, phs = _plan.phases(SPEC)
    basis = {0: (0, 1, 0), 1: (1, 0, 1), 2: (-1, 0, 1)}  # class -> its weight at taps -1, 0, 1
    for ph in phs:
        want, got = {}, {}
        for (dz, dy, i), uses in ph.rows:
            for t, dx, coef in uses:
                want[t, dz, dy, dx, i] = float(np.float32(coef))
        groups = _plan.row_groups(ph)
        assert [(g.dy, g.i) for g in groups] == sorted({(dy, i) for (_, dy, i), _ in ph.rows})
        for grp in groups:
            for t, zk, xk, coef in grp.uses:
                assert (zk == 0 or zk in grp.zc) and (xk == 0 or (zk, xk) in grp.xc)
                assert (zk == 0) <= (0 in grp.dzs) and (zk != 0) <= ({-1, 1} <= set(grp.dzs))
                for dz in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v = coef * basis[zk][dz + 1] * basis[xk][dx + 1]
                        if v:
                            key = (t, dz, grp.dy, dx, grp.i)
                            got[key] = got.get(key, 0.0) + v
        got = {k: v for k, v in got.items() if v != 0.0}
        assert got.keys() == want.keys()
        assert max(abs(got[k] - want[k]) for k in want) < 1e-7


@pytest.mark.parametrize("dilation", _plan.DILATIONS)
@pytest.mark.parametrize("nx", [16, 32, 48, 64])
def test_row_layout_reads_are_bank_conflict_free(nx, dilation):
    d = dilation
    for comps in (1, 3):
        pitch, skew, stride = _plan.row_layout(nx, comps, d)
        assert pitch >= (nx + 2 * d) * comps + max(skew) and max(skew) < 256  # 8 bits a skew
        # a channel's three rows fit its stride, whatever the skews of it and the next channel
        assert all(stride + skew[(c + 1) & 3] >= 2 * pitch + (nx + 2 * d) * comps + skew[c & 3] for c in range(4))
        if d in _plan.PACKED_DILATIONS:  # packed rows, a gap of 8 after each channel's three
            assert (pitch, skew, stride) == ((nx + 2 * d) * comps, (0, 0, 0, 0), 3 * pitch + 8)
        else:
            assert stride == 3 * pitch
        assert _plan.bank_conflict_free(pitch, skew, comps, d, stride)
        # the brute force: every (channel half, s, dz, i) read of a warp hits 32 distinct banks
        for half in (0, 4):
            for s in range(4):
                for dz in range(3):
                    for i in range(comps):
                        c = TID + half
                        x = _plan.lane_pixel(G, d) + s * d  # the lane's read s: x - d + s d from the row's x = -d
                        addr = c * stride + np.asarray(skew)[c & 3] + x * comps + dz * pitch + i
                        assert len(set((addr % 32).tolist())) == 32
    # the lanes' 16 pixels: each segment pixel once, as row g (x) or row g + 8 (x + d)
    assert sorted(np.concatenate([_plan.lane_pixel(np.arange(8), d), _plan.lane_pixel(np.arange(8), d) + d])) == list(range(16))
    assert not _plan.bank_conflict_free(66, (0, 0, 0, 0), 1)  # the packed row: conflicts
    lay = _plan.window_layout(standard_spec(16, 16, d), nx)  # the whole row in one CTA
    assert lay.threads == 4 * nx  # 2 warp halves x nx / 16 segments
    # the standard layer's ring fits at every dilation, 8 at x 64 (the wrap: 80 pixels a row) with
    # packed rows and the outputs staged over the vector phase's weights
    assert lay.smem_bytes <= _plan.SMEM_LIMIT
    assert lay.stage_in_weights == (d == 8) and lay.stage_floats <= lay.vector_weight_floats
    if d == 1:  # the layouts measured since version 2
        assert (lay.pitch, lay.smem_bytes) == (_plan.layout(SPEC, nx).pitch, _plan.layout(SPEC, nx).smem_bytes)


def test_channel_groups_where_the_ring_does_not_fit(monkeypatch):
    """32 + 32 inputs (16 + 16 outputs) at x 64, the UNet's decoder layer after its skip
    concatenation: one group needs 410 KB, two are the standard layer's 214,592 bytes each.
    The passes are on by default; GINJAX_CUDA_CHANNEL_GROUPS=0 turns them off."""
    wide = standard_spec(32, 16)
    assert _plan.splits(wide) == (1, 2) and _plan.splits(SPEC) == (1,) and _plan.splits(standard_spec(64, 8)) == (1, 2, 4)
    monkeypatch.delenv(_plan.CHANNEL_GROUPS_ENV, raising=False)
    assert _plan.groups(wide, 64) == 2 and _plan.coverage(wide, (64, 64, 64), np.float32)[0]
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "0")
    assert _plan.groups(wide, 64) is None and _plan.layout(wide, 64).groups == 1
    ok, why = _plan.coverage(wide, (64, 64, 64), np.float32)
    assert not ok and "410496 bytes" in why and f"{_plan.CHANNEL_GROUPS_ENV}=0" in why, why
    assert _plan.groups(SPEC, 64) == 1 and _plan.coverage(SPEC, (64, 64, 64), np.float32)[0]
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "yes")
    with pytest.raises(ValueError, match="GINJAX_CUDA_CHANNEL_GROUPS"):
        _plan.groups(wide, 64)
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")
    assert _plan.groups(wide, 64) == 2 and _plan.groups(SPEC, 64) == 1
    assert _plan.groups(wide, 16) == 1 and _plan.groups(wide, 32) == 2  # 178,944 fits; 253,824 does not
    one, two = _plan.layout(wide, 64, 1), _plan.layout(wide, 64)
    assert one.smem_bytes == 410_496 > _plan.SMEM_LIMIT  # 3 x 103,296 ring + 81,920 weights + staging, offsets
    assert (two.groups, two.channels, two.weight_floats) == (2, (16, 16), 10_240)
    assert two.smem_bytes == _plan.layout(SPEC, 64).smem_bytes == 214_592
    assert _plan.coverage(wide, (64, 64, 64), np.float32)[0]

    geom = cuda_entry.geometry(wide, (64, 64, 64), cuda.BlockSizes(strip_rows=32))
    assert len(geom) == 26 and geom[3:6] == [32, 32, 16] and geom[17:] == [20_480, 2, 16, 0, 0, 1, 64, 0, 0]
    assert cuda_entry.geometry(wide, (4, 4, 16), cuda.BlockSizes(strip_rows=2), n_groups=2)[17:19] == [20_480, 2]
    assert cuda_entry.geometry(SPEC, (64, 64, 64), cuda.BlockSizes())[17:19] == [10_240, 1]
    with pytest.raises(ValueError, match=r"`n_groups` \(=3\)"):
        _plan.layout(wide, 64, 3)


def test_a_patched_group_count_reaches_the_launch_geometry(monkeypatch):
    """The GPU tests force a split where one group would fit by patching `_plan.groups`: the
    layout, and so the launch's geometry, must take its count from there."""
    spec = standard_spec(32, 16)
    blocks = cuda.BlockSizes(strip_rows=3)
    assert cuda_entry.geometry(spec, (2, 4, 16), blocks)[18] == 1
    monkeypatch.setattr(_plan, "groups", lambda spec, nx: 2)
    assert _plan.layout(spec, 16).groups == 2
    assert cuda_entry.geometry(spec, (2, 4, 16), blocks)[18] == 2


def test_twin_rings_where_rows_of_32_would_leave_an_sm_4_warps(monkeypatch):
    """Rows of 32 (the UNet's 32^3 level: 32 + 32 inputs in two channel groups, 16 outputs a launch)
    run on twin rings: two rings, the weights once, 8 warps, within a CTA's shared memory; one ring
    (4 warps) at 131,648 bytes leaves no room for a second CTA on the SM. Not at x 64, nz odd, a
    dilation, fp32, GINJAX_CUDA_TWIN=0, or where two rings do not fit (32 + 32 inputs at 8
    outputs, one channel group); `geom`[25] says which."""
    monkeypatch.delenv(_plan.TWIN_ENV, raising=False)
    unet = standard_spec(32, 16)
    one = _plan.layout(unet, 32)
    assert (one.groups, one.rings, one.threads, one.smem_bytes) == (2, 1, 128, 131_648)
    assert 2 * one.smem_bytes > 228 * 1024  # an SM's shared memory: one such CTA an SM
    two = dataclasses.replace(one, rings=2)
    # 2 x (3 x 27,072 ring + 9,216 staging) + 40,960 weights + 256 offsets
    assert (two.threads, two.smem_bytes) == (256, 222_080) and two.smem_bytes <= _plan.SMEM_LIMIT
    blocks = cuda.BlockSizes()
    for spec, spatial, fp32, want in [(unet, (32, 32, 32), False, 1), (SPEC, (4, 6, 32), False, 1),
                                      (standard_spec(16, 8), (2, 2, 32), False, 1), (unet, (32, 32, 64), False, 0),
                                      (unet, (31, 32, 32), False, 0), (SPEC, (4, 6, 32), True, 0),
                                      (standard_spec(16, 16, 2), (4, 6, 32), False, 0),
                                      (standard_spec(32, 8), (4, 6, 32), False, 0)]:
        assert _plan.twin(spec, spatial, fp32) == bool(want), (spec, spatial, fp32)
        assert cuda_entry.geometry(spec, spatial, blocks, fp32=fp32)[25] == want
    assert _plan.layout(standard_spec(32, 8), 32).groups == 1  # whose single ring fits, twice it does not
    monkeypatch.setenv(_plan.TWIN_ENV, "0")
    assert not _plan.twin(unet, (32, 32, 32))
    monkeypatch.setenv(_plan.TWIN_ENV, "2")
    with pytest.raises(ValueError, match="GINJAX_CUDA_TWIN"):
        _plan.twin(unet, (32, 32, 32))


def test_shared_memory_of_the_standard_layer():
    lay = _plan.layout(SPEC, 64)
    assert (lay.pitch, lay.skew) == ((69, 200), ((0, 0, 1, 3), (0, 1, 0, 1)))
    assert lay.region == (0, 3312) and lay.slice_floats == 12_912
    assert lay.weight_floats == 10_240 and lay.stage_floats == 4_608
    assert lay.smem_bytes == 214_592  # 3 x 51,648 ring + 40,960 weights + 18,432 staging + 256 offsets: one CTA per SM
    assert lay.slice_floats % 4 == 0 and lay.weight_floats % 4 == 0  # 16-byte weight copies, float4 staging


def test_staging_writes_take_two_wavefronts_and_rows_are_16_byte_aligned():
    """Each of half 0's 32 staging stores (q, n, k) hits 32 distinct floats in 2 bank wavefronts
    (pixel pairs 2g + r: even strides, the minimum); each staged output row is float4-aligned;
    half 1's partials in fragment order fit the same area."""
    o, (s0, s1) = 16, _plan.STAGE_PITCH
    assert s0 % 4 == 0 and s1 % 4 == 0 and (o * s0) % 4 == 0
    assert 4 * 2 * 4 * 32 <= o * (s0 + s1)  # groups x n-tiles x fragment x lanes
    for blk, comp in ((0, 0), (1, 0), (1, 1), (1, 2)):
        for n in range(2):
            for k in range(4):
                oo, xx = n * 8 + 2 * TID + (k & 1), 2 * G + (k >> 1)
                at = oo * s0 + xx if blk == 0 else o * s0 + oo * s1 + 3 * xx + comp
                assert len(set(at.tolist())) == 32
                assert np.bincount(at % 32, minlength=32).max() == 2


def test_packed_weights_are_mma_b_fragments():
    rng = np.random.default_rng(3)
    ws = [rng.standard_normal((16, 16, p.basis.n_filters)) for p in SPEC.pairs]
    packed = _plan.pack_weights(SPEC, ws)
    _, phs = _plan.phases(SPEC)
    base = 0
    for ph in phs:
        n_t = len(ph.tiles)
        for h in range(2):
            for T, tile in enumerate(ph.tiles):
                for n in range(2):
                    for lane in range(32):
                        for r in range(2):
                            got = packed[base + ((h * n_t + T) * 32 + lane) * 4 + 2 * n + r]
                            want = ws[tile.term][8 * n + lane // 4, 8 * h + lane % 4 + 4 * r, tile.f]
                            scaled = np.float32(want) * np.float32(1 / (1 - _plan.TF32_TRUNCATION_BIAS))
                            assert got == _plan.round_tf32(scaled)
        base += 2 * n_t * 2 * 64
    assert base == packed.size
    traced = jax.jit(lambda w: _plan.pack_weights(SPEC, w, xp=jnp))([jnp.asarray(w, jnp.float32) for w in ws])
    assert np.array_equal(np.asarray(traced), packed)  # the path conv_contract_cuda takes


def test_truncate_tf32_keeps_nan_and_inf():
    """The mma's reading of a float: the low 13 bits cleared, the GPU's canonical NaN (0x7fffffff)
    and inf kept (an add of 0x1000 first, the old rounding, made that NaN -0); its mean relative
    error on log-uniform mantissas is TF32_TRUNCATION_BIAS."""
    canonical = np.uint32([0x7FFFFFFF, 0xFFFFFFFF]).view(np.float32)
    got = _plan.truncate_tf32(np.concatenate([canonical, np.float32([np.inf, -np.inf, 1 + 2**-11, -3.0])]))
    assert np.isnan(got[:2]).all() and np.array_equal(got[2:], np.float32([np.inf, -np.inf, 1.0, -3.0]))
    assert np.array_equal(np.asarray(_plan.truncate_tf32(jnp.asarray(got), jnp)), got, equal_nan=True)
    assert not np.isnan((canonical.view(np.uint32) + np.uint32(0x1000)).view(np.float32)).any()  # the old add
    m = np.exp2(np.random.default_rng(1).uniform(0, 1, 200_000)).astype(np.float32)  # log-uniform in [1, 2)
    bias = np.mean(1 - _plan.truncate_tf32(m) / m)
    assert abs(bias - _plan.TF32_TRUNCATION_BIAS) < 0.02 * _plan.TF32_TRUNCATION_BIAS


def test_round_tf32():
    """To nearest, ties away from zero (cvt.rna.tf32.f32), in numpy and in jax alike."""
    ulp = 2.0**-10
    x = np.float32([1.0, 1 + ulp / 2, 1 + ulp / 2 - 2**-23, -(1 + ulp / 2), 1 + 3 * ulp / 2, np.inf, -np.inf, 3e38])
    want = np.float32([1.0, 1 + ulp, 1.0, -(1 + ulp), 1 + 2 * ulp, np.inf, -np.inf, 3.0001e38])
    got = _plan.round_tf32(x)
    assert np.array_equal(got[:7], want[:7]) and (got.view(np.uint32) & 0x1FFF == 0)[:7].all()
    assert np.array_equal(np.asarray(_plan.round_tf32(jnp.asarray(x), jnp)), got)
    assert np.isnan(_plan.round_tf32(np.float32([np.nan]))).all()
    rng = np.random.default_rng(0)
    r = rng.standard_normal(10_000).astype(np.float32)
    assert np.abs(_plan.round_tf32(r) / r - 1).max() <= 2.0**-11


def test_a_library_that_will_not_load_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    bad = tmp_path / "_ginjax_cuda.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv(_ffi.ENV, str(bad))
    _ffi.registered.cache_clear()
    try:
        ok, why = _ffi.registered()
    finally:
        _ffi.registered.cache_clear()
    assert not ok and f"{_ffi.NAME} could not be loaded from {bad}" in why


def test_an_explicit_library_path_is_the_only_candidate(monkeypatch, tmp_path):
    """$GINJAX_CUDA_LIBRARY naming no file is the reason, not a cue to load another build (the
    in-place one, say): a mistyped path must not run other kernels than the ones asked for."""
    missing = tmp_path / "elsewhere" / "_ginjax_cuda.so"
    monkeypatch.setenv(_ffi.ENV, str(missing))
    monkeypatch.setattr(_ffi.pathlib.Path, "is_file", lambda self: self != missing)  # every other path a file
    _ffi.registered.cache_clear()
    try:
        assert _ffi.library() == missing
        ok, why = _ffi.registered()
    finally:
        _ffi.registered.cache_clear()
    assert not ok and f"${_ffi.ENV} ({missing}): no such file" in why


def test_coverage_reasons(monkeypatch):
    monkeypatch.setattr(_ffi, "library", lambda: None)
    _ffi.registered.cache_clear()
    try:
        ok, why = kernels.cuda.coverage(SPEC, (64, 64, 64), jnp.float32)
        assert not ok and "not built" in why and "GINJAX_CUDA=ON" in why
        with pytest.raises(ValueError, match="cannot run here"):
            kernels.cuda.conv_contract_cuda(SPEC, [jnp.zeros((16, 3, 3, 64)), jnp.zeros((16, 3, 3, 64, 3))], [])
    finally:
        _ffi.registered.cache_clear()
    assert _plan.coverage(SPEC, (5, 7, 64), np.float32)[0]
    assert "x extent" in _plan.coverage(SPEC, (5, 7, 40), np.float32)[1]
    assert "float32 only" in _plan.coverage(SPEC, (5, 7, 64), jnp.bfloat16)[1]
    c8 = _cases.fixture_spec(_configs.CONFIGS["d3_n16_b2_c8"])
    assert "multiples of 16" in _plan.coverage(c8, (16, 16, 16), np.float32)[1]
    d2 = _cases.fixture_spec(_configs.CONFIGS["d2_n64_b4_c8"])
    assert "D=2" in _plan.coverage(d2, None, np.float32)[1]
    # dilations: 1, 2, 4, 8 on every axis, the y extent a multiple (a CTA's rows are one y phase),
    # one channel group (the weight gradient's coverage: test_conv_contract_cuda_dw.py). On by
    # default; GINJAX_CUDA_DILATED=0 turns it off.
    monkeypatch.setenv(_plan.DILATED_ENV, "0")
    assert f"turned off ({_plan.DILATED_ENV}=0)" in _plan.coverage(standard_spec(16, 16, 2), (5, 8, 32), np.float32)[1]
    monkeypatch.delenv(_plan.DILATED_ENV)
    for d in (2, 4, 8):
        ok, why = _plan.coverage(standard_spec(16, 16, d), (5, 8, 32), np.float32)
        assert ok and f"dilation {d}" in why
    assert "rhs_dilation (3, 3, 3) is not covered" in _plan.coverage(standard_spec(16, 16, 3), (5, 9, 32), np.float32)[1]
    mixed = kernels.make_spec(3, SPEC.in_keys, SPEC.out_keys, [(p.in_index, p.out_index, p.basis.array) for p in SPEC.pairs],
                              True, rhs_dilation=(1, 2, 2))
    assert "rhs_dilation (1, 2, 2) is not covered" in _plan.coverage(mixed, (5, 8, 32), np.float32)[1]
    assert "multiple of the dilation 4" in _plan.coverage(standard_spec(16, 16, 4), (5, 6, 32), np.float32)[1]
    # x windows (on by default, GINJAX_CUDA_X_WINDOWS=0 turns them off): rows over 64 pixels, and
    # rows of 64 whose ring does not fit whole (32 + 32 inputs at dilation 2: 368 KB, windows of 32
    # 216 KB; dilation 8 at x 64 fits whole since its rows are packed)
    narrow = standard_spec(32, 8, 2)
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "0")
    why = _plan.coverage(narrow, (8, 8, 64), np.float32)[1]
    assert "shared memory" in why and f"x windows may fit (turned off by {_plan.X_WINDOWS_ENV}=0)" in why
    assert "needs x windows" in _plan.coverage(SPEC, (4, 4, 128), np.float32)[1]
    assert "multiple of 16" in _plan.coverage(SPEC, (4, 4, 72), np.float32)[1]
    monkeypatch.delenv(_plan.X_WINDOWS_ENV)
    for spec, nx, w in ((SPEC, 128, 64), (SPEC, 96, 32), (SPEC, 256, 64), (narrow, 64, 32), (SPEC, 64, 64),
                        (standard_spec(16, 16, 8), 64, 64), (standard_spec(16, 16, 8), 128, 64)):
        assert _plan.coverage(spec, (8, 8, nx), np.float32)[0] and _plan.window(spec, nx) == w
        assert _plan.layout(spec, nx).windows == nx // w
    assert "multiple of 32" in _plan.coverage(SPEC, (4, 4, 80), np.float32)[1]  # windows of 64 or 32 only
    # GINJAX_CUDA_NARROW_WINDOWS=0: a row of 64 pixels whose ring does not fit stays whole, so the
    # forward leaves it (to Triton); rows over 64 pixels keep their windows, the weight gradient its layout
    monkeypatch.setenv(_plan.NARROW_WINDOWS_ENV, "0")
    ok, why = _plan.coverage(narrow, (8, 8, 64), np.float32)
    assert not ok and f"turned off for rows of 64 pixels by {_plan.NARROW_WINDOWS_ENV}=0" in why
    assert _plan.coverage(narrow, (8, 8, 128), np.float32)[0] and _plan.window(narrow, 128) == 32
    assert _plan.coverage(standard_spec(16, 16, 8), (8, 8, 64), np.float32)[0]  # whole, as without the switch
    assert _plan.coverage(SPEC, (8, 8, 64), np.float32)[0] and _plan.window(SPEC, 64) == 64
    assert _dw_plan.layout(standard_spec(16, 16, 8), 64).windows == 1
    monkeypatch.delenv(_plan.NARROW_WINDOWS_ENV)
    # at dilation 8 the staging shares the vector phase's weights; were it larger, a reason, not a crash
    d8 = standard_spec(16, 16, 8)
    with monkeypatch.context() as m:
        m.setattr(_plan, "STAGE_PITCH", (64, 64))
        ok, why = _plan.coverage(d8, (8, 8, 64), np.float32)
        assert not ok and "does not fit the vector phase's weights (6912) it shares at dilation 8" in why, why
    assert _plan.coverage(d8, (8, 8, 64), np.float32)[0]
    why = _plan.coverage(standard_spec(32, 16, 2), (8, 8, 64), np.float32)[1]
    assert "shared memory" in why and "dilation 1 only" in why
    # the blocks' channel counts are equal (the Mosaic plan's tables), so groups of 16 + 16, the
    # standard layer's ring, always fit: with the channel-group passes on, shared memory no longer
    # limits the forward's coverage
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")
    for c in (48, 64, 80):
        assert _plan.coverage(standard_spec(c, 16), (5, 7, 64), np.float32)[0]
        assert _plan.groups(standard_spec(c, 16), 64) == c // 16
    assert _plan.groups(standard_spec(64, 8), 16) == 2  # where G = 1 does not fit, the fewest that do


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_resources_within_budget(tmp_path):
    report = ptxas_report(_plan.INCLUDE.with_name("conv_contract.cu"), tmp_path)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    # forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, kSplit>: both n-tile counts, both block
    # layouts; G = 1 and G > 1 at dilation 1, G = 1 at the other dilations; every whole-row width
    # (kWin false) and the window widths (kWin true); the fp32 (3xTF32) ones at dilation 1 on whole
    # rows; each compiled exactly once.
    entries = ptxas_entries(report, r"forward_kernelILi(\d+)ELi(\d)ELb([01])ELb([01])ELi(\d)ELb([01])ELb([01])ELb0ELb0EJEE")
    kernels_ = [e[:7] for e in entries]
    expected = {(str(nx), str(nt), g, pl, str(d), win, "0") for win, widths in (("0", _plan.NX_COVERED), ("1", _plan.WINDOWS_COVERED))
                for nx in widths for nt in (1, 2) for pl in "01" for d in _plan.DILATIONS for g in ("01" if d == 1 else "0")}
    expected |= {(str(nx), str(nt), g, pl, "1", "0", "1") for nx in _plan.NX_COVERED for nt in (1, 2) for pl in "01"
                 for g in "01"}
    assert sorted(kernels_) == sorted(expected), report
    # the TF32 kernels do not spill, but the whole-row ones at dilation 8, x 16 and 48, 16 outputs
    # (the widest walk offsets), and the fp32 ones (3 mma a tile, their splits live beside the Z
    # tiles) at most a few words (ptxas, nvcc 13.0: 4-12 bytes in 3 of the fp32 ones and in the
    # planar dilation-8 one at x 48)
    for e in entries:
        few_words = e[6] == "1" or (e[4] == "8" and e[5] == "0" and e[0] in ("16", "48") and e[1] == "2")
        assert int(e[7]) <= 16 if few_words else (e[7], e[8]) == ("0", "0"), (e, report)
    # forward_kernel<..., kRes = true, const float*, const float*> (the first pass adds residuals):
    # dilation 1, TF32, every width, n-tile count, group setting and layout, whole rows and
    # windows; at most a few words of spills (nvcc 13.0: 4 bytes in one, x 48 with 8 outputs in
    # two channel groups, planar)
    residual = ptxas_entries(report, r"forward_kernelILi(\d+)ELi(\d)ELb([01])ELb([01])ELi(\d)ELb([01])ELb([01])"
                                     r"ELb1ELb0EJPKfS\d_EEEv")
    want_residual = {k for k in expected if k[4] == "1" and k[6] == "0"}
    assert sorted(e[:7] for e in residual) == sorted(want_residual), report
    assert all(int(e[7]) <= 16 and int(e[8]) <= 16 for e in residual), [e for e in residual if e[7] != "0"]
    # forward_kernel<32, ..., kTwin = true> (two rings a CTA, 256 threads): whole rows of 32 at
    # dilation 1 in TF32, both n-tile counts, group settings and layouts, with and without
    # residuals; no spills
    twin = ptxas_entries(report, r"forward_kernelILi(\d+)ELi(\d)ELb([01])ELb([01])ELi(\d)ELb([01])ELb([01])"
                                 r"ELb([01])ELb1EJ")
    want_twin = {("32", nt, g, pl, "1", "0", "0", r) for nt in "12" for g in "01" for pl in "01" for r in "01"}
    assert sorted(e[:8] for e in twin) == sorted(want_twin), report
    assert all((e[8], e[9]) == ("0", "0") for e in twin), [e for e in twin if e[8] != "0"]
    assert len(regs) == len(expected) + len(want_residual) + len(want_twin), report
    assert max(regs) <= MAX_REGISTERS, report
    assert "bytes smem" not in report or all(int(b) == 0 for b in re.findall(r"(\d+) bytes smem", report))
