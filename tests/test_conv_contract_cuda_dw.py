"""The CUDA weight gradient (kernels/cuda/weight_gradient.cu) on a CPU: its generated include is up
to date, the plan's passes and per-weight accumulators, the row layout of the transposed lane
mapping and the staged gY rows (bank-conflict-free reads), shared memory, scratch and register
arithmetic, the unpacking of the per-CTA partials, a lane-by-lane numpy emulation of the kernel
(tests/_conv_cuda_dw_emulate.py: copies in flight read NaN) against the float64 VJP of
`reference`, `weight_gradient_call`'s batching with the kernel replaced by that emulation, the
coverage reasons, and (slow) nvcc's resource report. What only tests/test_conv_contract_cuda_dw_gpu.py
covers: the compiled kernel's numbers, the FFI call, determinism, memcheck, timing."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
import _nonfinite
from _conv_cuda_dw_emulate import (DwEmulator, check_entry_point_batches, reference_dw, rel,
                                   unpack_matches_the_fragment_order)
from _conv_cuda_emulate import standard_spec
from _hopper_compile import ptxas_entries, ptxas_report, row_loop_moves
from kernels.cuda import _dw_plan, _ffi, _plan
from kernels.cuda import conv_contract as cuda_entry
from kernels.cuda import weight_gradient as wg

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3
MAX_REGISTERS = 255  # __launch_bounds__(4 nx, 1) at nx 64: 65,536 registers / 256 threads


def test_generated_include_is_up_to_date():
    assert _dw_plan.INCLUDE.read_text() == _dw_plan.dw_source(SPEC), (
        "regenerate: kernels/cuda/weight_gradient_d3.inc = _dw_plan.dw_source(spec)")


def test_passes_and_weights_of_the_standard_layer():
    """Each phase's row groups in exactly one pass (by input component, dy-major), a pass's tiles
    exactly the ones its rows touch, each with the forward tile's group and its (t, f)'s
    accumulator: 18 weights for the 40 tiles (a vector (t, f) serves 3 output components)."""
    groups, phs = _plan.phases(SPEC)
    assert groups == ((0, 0), (1, 0), (1, 1), (1, 2))  # the kernel's A fragments: scalar, then j = 0..2
    ps = _dw_plan.passes(SPEC)
    ws = _dw_plan.weights(SPEC)
    assert [(p.key, p.i, len(p.tiles), p.last) for p in ps] == [
        (1, 0, 13, False), (1, 1, 13, False), (1, 2, 13, True), (0, 0, 13, True)]
    assert len(ws) == 18 == sum(p.basis.n_filters for p in SPEC.pairs)
    for ph in phs:
        mine = [p for p in ps if p.key == ph.key]
        got = [(g.dy, g.i, tuple((p.tiles[t], zk, xk, c) for t, zk, xk, c in g.uses)) for p in mine for g in p.groups]
        assert sorted(got) == sorted((g.dy, g.i, g.uses) for g in _plan.row_groups(ph))
        for p in mine:
            assert [g.dy for g in p.groups] == sorted(g.dy for g in p.groups)
            assert set(range(len(p.tiles))) == {t for g in p.groups for t, _, _, _ in g.uses}
            for k, T in enumerate(p.tiles):
                tile = ph.tiles[T]
                assert p.group[k] == tile.group and ws[p.weight[k]] == (tile.term, tile.f)
    assert _dw_plan.mma_count(SPEC) == 104  # (39 + 13) tiles x 2 k-steps; the forward: 80


@pytest.mark.parametrize("dilation", _plan.DILATIONS)
@pytest.mark.parametrize("nx", [16, 32, 48, 64])
def test_row_layout_reads_are_bank_conflict_free(nx, dilation):
    """Every stencil read of a warp (lane (g, tid): channel g, pixel k_pixel(tid, d), shifted by
    s d, dz, i, the k-step and the chunk) hits 32 distinct banks; the forward's layout would not.
    The k-steps' 16 pixels: each of the segment's once, as B row tid (x) or tid + 4 (x + d)."""
    d = dilation
    for comps in (1, 3):
        pitch, skew = _dw_plan.row_layout(nx, comps, d)
        assert pitch >= (nx + 2 * d) * comps + max(skew) and len(skew) == 8 and max(skew) < 16
        for chunk in (0, 1):
            for s in range(4):
                for dz in range(3):
                    for step in (0, 1):
                        c = chunk * 8 + G
                        x = _dw_plan.k_pixel(TID, d) + _dw_plan.kstep_shift(d) * step + s * d
                        addr = 3 * c * pitch + np.asarray(skew)[c & 7] + x * comps + dz * pitch
                        assert len(set((addr % 32).tolist())) == 32
        if d == 1:
            assert not _dw_plan.bank_conflict_free(*_plan.row_layout(nx, comps)[:1], (0,) * 8, comps)
    tids = np.arange(4)
    first = [_dw_plan.k_pixel(tids, d) + _dw_plan.kstep_shift(d) * step for step in (0, 1)]
    assert sorted(np.concatenate(first + [f + d for f in first])) == list(range(16))


@pytest.mark.parametrize("nx", [16, 32, 48, 64])
def test_staged_gy_reads_are_conflict_free_and_aligned(nx):
    """A fragments: float2 reads (scalar: o = g, pixel x = 2 tid + 8 s; vector: three float2 from
    3 x), each half warp's 16 lanes on distinct 8-byte bank pairs; 16-byte copy destinations."""
    p0, p1 = _dw_plan.gy_pitch(nx)
    assert p0 >= nx and p1 >= 3 * nx and p0 % 4 == 0 and p1 % 4 == 0
    for s in (0, 1):
        for r in (0, 1):
            x = 2 * TID + 8 * s
            for addr in [(G + 8 * r) * p0 + x] + [16 * p0 + (G + 8 * r) * p1 + 3 * x + 2 * k for k in range(3)]:
                assert (addr % 2 == 0).all()
                for lanes in (LANE < 16, LANE >= 16):
                    assert len(set(((addr[lanes] // 2) % 16).tolist())) == 16


def test_shared_memory_scratch_and_registers():
    lay = _dw_plan.layout(SPEC, 64)
    assert (lay.pitch, lay.slice_floats, lay.gy_floats) == ((68, 200), 12_864, 4_352)
    assert lay.smem_bytes == 189_184 <= _plan.SMEM_LIMIT  # 3 slices + 2 gY rows: one CTA an SM
    assert 4 * lay.partial_floats == 18_432 and 4 * lay.result_floats == 18_432 + 256  # + the cotangent sums
    for nx in _plan.NX_COVERED:
        assert _dw_plan.layout(SPEC, nx).smem_bytes <= _plan.SMEM_LIMIT  # and the reduction fits the ring
    # d3_n64_b4_c16 at the default strip: 256 CTAs, 4.8 MB of partials, < 5 % of the I/O
    spatial, batch = (64, 64, 64), 4
    io = 4 * batch * 64**3 * (16 + 48) * 2  # inputs and cotangents, float32
    assert _dw_plan.grid(SPEC, spatial, _dw_plan.DEFAULT_STRIP) == (1, 64, 1)
    assert _dw_plan.scratch_bytes(SPEC, spatial, _dw_plan.DEFAULT_STRIP, batch) == 4_784_128 < 0.05 * io
    # registers live in the walk: accumulators + a pass's Z tiles + A fragments of 4 groups x 2
    # k-steps (the row's) + the row registers of the symmetric walk (u 24, z / x classes <= 24 + 16)
    live = 4 * len(_dw_plan.weights(SPEC)) + 4 * max(len(p.tiles) for p in _dw_plan.passes(SPEC)) + 32 + 24 + 40
    assert live == 220 <= MAX_REGISTERS - 32  # ptxas: 199-219 (the walk's classes are not all live at once)


def test_unpack_is_the_inverse_of_the_fragment_order():
    unpack_matches_the_fragment_order(standard_spec(32, 8))


@pytest.mark.parametrize("spatial, strip, batch, channels, planar, dilation", [
    ((2, 3, 16), 2, 3, (16, 16), False, 1), ((1, 3, 32), 2, 1, (32, 8), False, 1), ((1, 2, 48), 1, 1, (16, 16), False, 1),
    ((1, 2, 64), 3, 1, (16, 16), False, 1), ((2, 3, 16), 2, 3, (16, 16), True, 1), ((1, 3, 32), 2, 1, (32, 8), True, 1),
    ((1, 2, 48), 1, 1, (16, 16), True, 1),
    # dilated: CTAs over one y phase's rows, the k-steps' pixel pairs d apart (k-step 1 four pixels
    # on at d 8), gY fragments one float a load, z taps wrapping onto each other (nz < 2d)
    ((3, 4, 16), 1, 2, (16, 16), False, 2), ((2, 6, 32), 2, 1, (32, 8), True, 2), ((5, 8, 16), 3, 1, (16, 16), True, 4),
    ((3, 8, 48), 1, 1, (16, 8), False, 4), ((3, 24, 32), 2, 1, (16, 16), False, 8), ((9, 8, 32), 1, 1, (16, 16), True, 8),
    # x windows: rows over 64 pixels, the gY rows staged from the window
    ((1, 2, 128), 2, 2, (16, 16), True, 1), ((2, 3, 96), 1, 1, (32, 8), False, 1), ((3, 4, 128), 1, 1, (16, 16), False, 2)])
def test_emulated_kernel_matches_reference(spatial, strip, batch, channels, planar, dilation, monkeypatch):
    """Without tf32 rounding the emulated kernel (float64) is the float64 VJP of `reference` up
    to reassociation: its index arithmetic, copies, ring, barriers and reduction; odd batch, two
    channel groups with 8 outputs (one A row half), strips that end mid-grid or exceed it; the
    vector blocks components minor or component-planar in memory; rhs_dilation d on every axis."""
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "1")
    spec = SPEC if channels == (16, 16) and dilation == 1 else standard_spec(*channels, dilation=dilation)
    assert _dw_plan.coverage(spec, spatial, np.float32)[0]
    assert _dw_plan.layout(spec, spatial[2]).windows == {128: 2, 96: 3}.get(spatial[2], 1)
    xs, ws, cots = _cases.spec_operands(spec, spatial, batch, seed=7)
    emu = DwEmulator(spec, *(np.asarray(a) for a in xs + cots), strip, tf32=False, planar=planar)
    dws, parts = emu.run()
    assert not np.isnan(parts).any()
    for g, w in zip(dws, reference_dw(spec, xs, ws, cots)):
        assert g.shape[1:] == w.shape and rel(g.sum(axis=0), w) <= 1e-12
    # the bias gradient from the same staged rows: every pixel of every row once, channel group 0's CTAs only
    for got, cot in zip(emu.sums, cots):
        want = np.asarray(cot, np.float64).sum(axis=(2, 3, 4))
        assert got.shape == want.shape and rel(got, want) <= 1e-12


def test_emulated_fp32_kernel_meets_the_fp32_tolerance():
    """The 3xTF32 instantiation (template kSplit) emulated lane by lane: gY and Z split into a
    rounded tf32 part and remainder at each mma, three mma, no truncation scale. Within fp32's
    tolerance of the float64 VJP, where the tf32 kernel is ~100x further off."""
    xs, ws, cots = _cases.spec_operands(SPEC, (2, 4, 16), 1, seed=9)
    want = reference_dw(SPEC, xs, ws, cots)
    errors = {}
    for fp32 in (True, False):
        dws, _ = DwEmulator(SPEC, *(np.asarray(a) for a in xs + cots), 4, fp32=fp32).run()
        errors[fp32] = max(rel(g[0], w) for g, w in zip(dws, want))
    assert errors[True] <= kernels.TOLERANCE["fp32"] < 0.1 * errors[False], errors


def test_fp32_coverage_is_opt_in_at_dilation_1_on_whole_rows(monkeypatch):
    """The split weight gradient runs only with GINJAX_CUDA_FP32_WEIGHT_GRAD=1, at dilation 1, on
    rows the kernel takes whole; the reasons name what is missing."""
    monkeypatch.delenv(_dw_plan.FP32_ENV, raising=False)
    ok, why = _dw_plan.fp32_coverage(SPEC, (2, 4, 16), np.float32)
    assert not ok and _dw_plan.FP32_ENV in why
    monkeypatch.setenv(_dw_plan.FP32_ENV, "1")
    assert _dw_plan.fp32_coverage(SPEC, (2, 4, 64), np.float32) == (True, "")
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    ok, why = _dw_plan.fp32_coverage(standard_spec(16, 16, dilation=2), (2, 4, 16), np.float32)
    assert not ok and "dilation 1" in why
    ok, why = _dw_plan.fp32_coverage(SPEC, (2, 4, 128), np.float32)
    assert not ok and "whole rows" in why


def test_emulated_kernel_with_tf32_meets_the_tolerance():
    xs, ws, cots = _cases.spec_operands(SPEC, (2, 4, 16), 1, seed=8)
    dws, _ = DwEmulator(SPEC, *(np.asarray(a) for a in xs + cots), 4).run()
    for g, w in zip(dws, reference_dw(SPEC, xs, ws, cots)):
        assert 1e-6 < rel(g[0], w) <= kernels.TOLERANCE["tf32"]  # rounded, within tf32's bound


@pytest.mark.parametrize("dilation, spatial, planar", [(1, (2, 3, 16), False), (2, (3, 4, 16), True)])
def test_nan_and_inf_reach_exactly_their_weights_on_the_emulated_kernel(dilation, spatial, planar, monkeypatch):
    """A NaN (scalar input), an inf (a vector input's component) and a NaN in a vector cotangent
    (each NaN the GPU's canonical one) through the emulated weight gradient: dW non-finite exactly
    where `_nonfinite.reached_weights` says, the clean operands' float64 VJP elsewhere (tf32: gY
    and Z reach the mma as the GPU makes them, `tf32_operand`). The GPU test of the same name runs
    the kernel itself."""
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    spec = standard_spec(16, 16, dilation=dilation)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 1, seed=29)
    hits, g_hits, bad, clean, bad_g, clean_g = _nonfinite.poison_weight_gradient_operands(
        [np.asarray(x[0]) for x in xs], [np.asarray(c[0]) for c in cots], spatial)
    dws, _ = DwEmulator(spec, bad[0][None], bad[1][None], *(g[None] for g in bad_g), 2, planar=planar).run()
    want = reference_dw(spec, [c[None] for c in clean], ws, [jnp.asarray(g)[None] for g in clean_g])
    _nonfinite.check_weights_nonfinite_exactly_reached(spec, hits, [g[0] for g in dws], want, kernels.TOLERANCE["tf32"],
                                                       cotangent_hits=g_hits)


def test_emulation_sees_a_slot_refilled_too_early(monkeypatch):
    """The emulation's copies read NaN until waited for: with the vector MID before the last
    vector pass's dy = -1 rows, those rows read the slot being refilled."""
    orig = DwEmulator.row_ops

    def early(self):
        ops = [op for op in orig(self) if op != ("mid", 1)]
        at = next(i for i, op in enumerate(ops) if op[0] == "walk" and op[1] == 2)
        return ops[:at] + [("mid", 1)] + ops[at:]

    monkeypatch.setattr(DwEmulator, "row_ops", early)
    xs, _, cots = _cases.spec_operands(SPEC, (1, 4, 16), 1, seed=9)
    _, parts = DwEmulator(SPEC, *(np.asarray(a) for a in xs + cots), 4, tf32=False).run()
    assert np.isnan(parts).any()


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_entry_point_batches_like_the_triton_weight_gradient(monkeypatch, layout):
    """weight_gradient_call with the FFI call replaced by the emulation: under vmap one call for
    the batch (broadcast_all), one dW per batch element, in the weights' layout; their sum is
    the VJP of the shared weights. The geometry attribute is the compiled layout's; the vector
    blocks are asked for in GINJAX_CUDA_LAYOUT's layout and `geom` says which."""
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    spec, strip = standard_spec(32, 16), 2
    xs, cots, got = check_entry_point_batches(monkeypatch, spec, (2, 3, 16), strip, layout == "planar")
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.vmap(lambda x, g: wg.weight_gradient_call(
        spec, x, g, strip=strip))(xs, cots), got))
    with pytest.raises(ValueError, match=r"`strip` \(=0\)"):
        wg.weight_gradient_call(spec, [x[0] for x in xs], [c[0] for c in cots], strip=0)


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_output_groups_read_their_cotangent_rows_in_place(monkeypatch, layout):
    """kernels.triton's weight gradient of a layer with 32 output channels per key as two launches
    of 16 (`_weight_grad_by_output_groups`), the FFI calls replaced by the emulation configured
    only from what the kernel gets: each launch takes the whole 32-channel cotangents (no channel
    slice is copied out for it) and reads rows `geom`[12] .. + 15 of them; the rows of dW against
    `reference`'s VJP. A first channel off the group grid is refused by `geometry`."""
    from kernels.triton import _cuda_dispatch

    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    monkeypatch.setattr(wg, "registered", lambda: (True, "the emulation stands in for the library"))
    spec, sub = standard_spec(16, 32), standard_spec(16, 16)
    spatial = (2, 3, 16)
    seen = []

    def ffi_call(target, shape, vmap_method, input_layouts):
        def call(x0, x1, g0, g1, geom):
            seen.append((int(geom[11]), int(geom[12]), g0.shape, g1.shape))

            def host(*ops):
                _, parts = DwEmulator(sub, *(np.asarray(a)[None] for a in ops), int(geom[5]), tf32=False,
                                      first_channel=int(geom[12]), planar=bool(geom[13])).run()
                return parts[0].astype(np.float32)

            return jax.pure_callback(host, shape, x0, x1, g0, g1)

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 1, seed=29)
    got, sums = _cuda_dispatch.weight_grad_by_output_groups((sub, 2), [x[0] for x in xs], [c[0] for c in cots])
    assert [s[:2] for s in seen] == [(32, 0), (32, 16)]
    assert all(g0[0] == 32 and g1[0] == 32 for *_, g0, g1 in seen)  # the whole cotangents, not a slice
    for g, w in zip(got, reference_dw(spec, xs, ws, cots)):  # exact sums, scaled as for the kernel
        assert g.shape == w.shape and rel(g / wg.TRUNCATION_SCALE, w) <= 1e-5
    for s, cot in zip(sums, cots):  # each launch's 16 channels of the bias gradient, concatenated
        want = np.asarray(cot[0], np.float64).sum(axis=(1, 2, 3))
        assert s.shape == want.shape and rel(s, want) <= 1e-6
    with pytest.raises(ValueError, match=r"`first_channel` \(=8\)"):
        wg.geometry(sub, spatial, 2, out_channels=32, first_channel=8)


def test_coverage_reasons(monkeypatch):
    assert _dw_plan.coverage(SPEC, (5, 7, 64), np.float32)[0]
    # dilated (on unless GINJAX_CUDA_DILATED=0): 2, 4, 8 (8 at x 64 too: one channel group's ring
    # fits), the y extent a multiple of d
    monkeypatch.setenv(_plan.DILATED_ENV, "0")
    assert f"turned off ({_plan.DILATED_ENV}=0)" in _dw_plan.coverage(standard_spec(16, 16, 2), (4, 4, 16), np.float32)[1]
    monkeypatch.delenv(_plan.DILATED_ENV)
    for d in (2, 4, 8):
        ok, why = _dw_plan.coverage(standard_spec(16, 16, d), (64, 64, 64), np.float32)
        assert ok and f"dilation {d}" in why
    assert "multiple of the dilation 4" in _dw_plan.coverage(standard_spec(16, 16, 4), (4, 6, 16), np.float32)[1]
    assert "rhs_dilation (3, 3, 3)" in _dw_plan.coverage(standard_spec(16, 16, 3), (4, 6, 16), np.float32)[1]
    # one channel group in shared memory: 32 + 32 inputs at x 64 (the UNet's decoder layer after
    # its skip concatenation) fit here, and in the forward's two channel-group passes
    wide = standard_spec(32, 16)
    assert _dw_plan.coverage(wide, (64, 64, 64), np.float32)[0]
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")
    assert _plan.coverage(wide, (64, 64, 64), np.float32)[0] and _plan.groups(wide, 64) == 2
    # layer_coverage still refuses a layout over the budget (the weight gradient's check)
    assert "shared memory" in _plan.layer_coverage(wide, (4, 4, 64), np.float32, smem=lambda nx: _plan.SMEM_LIMIT + 1)[1]
    assert "x extent" in _dw_plan.coverage(SPEC, (5, 7, 40), np.float32)[1]
    data = np.load(_cases.FIXTURE_FILTERS)
    basis = lambda k: data[f"filters/D3M3/k{k}p0"]  # noqa: E731
    pairs = [(0, 0, basis(0)), (0, 1, basis(1)), (1, 0, basis(1)), (1, 1, basis(2))]
    unequal = kernels.make_spec(3, [(0, 0, 16), (1, 0, 32)], [(0, 0, 16), (1, 0, 16)], pairs, True)
    assert "same channel count" in _dw_plan.coverage(unequal, (4, 4, 16), np.float32)[1]  # a CTA walks 16 of each
    monkeypatch.setattr(_dw_plan, "compiled_source", lambda dims=3: "")  # a library built before the weight gradient
    assert "weight_gradient_d3.inc was generated" in _dw_plan.coverage(SPEC, None)[1]
    monkeypatch.undo()
    monkeypatch.setattr(_ffi, "library", lambda: None)
    _ffi.registered.cache_clear()
    try:
        ok, why = kernels.cuda.weight_gradient_coverage(SPEC, (64, 64, 64), jnp.float32)
        assert not ok and "not built" in why
    finally:
        _ffi.registered.cache_clear()


# weight_gradient_kernel<NX, NT, kPlanar, D, kWin, kSplit> as weight_gradient.cu compiles it: both
# n-tile counts, both block layouts, every dilation; every whole-row width (kWin false) and the
# window widths (kWin true); the fp32 (3xTF32) ones at dilation 1 on whole rows.
_DW_KERNEL = r"weight_gradient_kernelILi(\d+)ELi(\d)ELb([01])ELi(\d)ELb([01])ELb([01])EE"
_DW_KERNELS = {(str(nx), str(nt), pl, str(d), win, "0") for win, widths in (("0", _plan.NX_COVERED), ("1", _plan.WINDOWS_COVERED))
               for nx in widths for nt in (1, 2) for pl in "01" for d in _plan.DILATIONS}
_DW_KERNELS |= {(str(nx), str(nt), pl, "1", "0", "1") for nx in _plan.NX_COVERED for nt in (1, 2) for pl in "01"}


@pytest.fixture(scope="module")
def compiled_dw(tmp_path_factory):
    """weight_gradient.cu compiled for sm_90a as the library's build does: (ptxas' report, the object)."""
    out = tmp_path_factory.mktemp("weight_gradient")
    return ptxas_report(_dw_plan.INCLUDE.with_name("weight_gradient.cu"), out), out / "weight_gradient.o"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_resources_within_budget(compiled_dw):
    report = compiled_dw[0]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    entries = ptxas_entries(report, _DW_KERNEL)
    kernels_ = [e[:6] for e in entries]
    assert sorted(kernels_) == sorted(_DW_KERNELS), report
    assert len(regs) == len(_DW_KERNELS), report
    # the TF32 kernels do not spill; the fp32 ones (gY split per use beside the accumulators) at
    # most a few words (ptxas, nvcc 13.0: one of 16 spills 8 bytes)
    for e in entries:
        assert (e[6], e[7]) == ("0", "0") if e[5] == "0" else int(e[6]) <= 16, (e, report)
    assert max(regs) <= MAX_REGISTERS, report


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_row_loops_do_not_rebuild_mma_operands(compiled_dw):
    """The TF32 kernels' row loops in SASS: at most 4 % register moves. With float2 A loads ptxas
    rebuilt each mma's A quad with moves before every mma, 14-16 % of the loop (load_a;
    bench/NOTES.md, "Session 42"). The 8-output kernels (NT = 1), whose quads' zero halves are
    written before each mma (~9 %), and the fp32 ones, which split each quad per use, are left out."""
    loops = row_loop_moves(compiled_dw[1], _DW_KERNEL)
    checked = {k: v for k, v in loops.items() if k[1] == "2" and k[5] == "0"}
    assert set(checked) == {k for k in _DW_KERNELS if k[1] == "2" and k[5] == "0"}, sorted(loops)
    heavy = {k: v for k, v in checked.items() if v[0] > 0.04 * v[1]}
    assert not heavy, heavy
