"""The D = 2 CUDA weight gradient (kernels/cuda/weight_gradient_d2.cu: weight_gradient_kernel.cuh on the
2D walk) on a CPU: its generated include is up to date; its passes and accumulators; one-row slices
and the staged gY rows read free of bank conflicts; shared memory at 32 outputs (two m-tiles, whose
partials outgrow the ring); the partials' unpacking with two m-tiles; the lane-by-lane emulation
(tests/_conv_cuda_dw_emulate.py, copies in flight read NaN) against the float64 VJP of `reference`
at every compiled dilation, 16 and 32 outputs, one and two channel groups, whole rows and x windows;
NaN and inf reaching exactly their weights; the entry point's batching and the `triton` backend's
output groups with the FFI call replaced by that emulation; coverage; (slow) nvcc's resource report.
What only tests/test_conv_contract_cuda_dw_d2_gpu.py covers: the compiled kernel's numbers, the FFI
call, compute-sanitizer."""

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
from _conv_cuda_dw_emulate import DwEmulator, check_entry_point_batches, reference_dw, rel, unpack_matches_the_fragment_order
from _hopper_compile import ptxas_entries, ptxas_report, row_loop_moves
from kernels.cuda import _dw_plan, _ffi, _plan
from kernels.cuda import weight_gradient as wg
from test_conv_contract_cuda_d2 import spec_2d

SPEC = _cases.fixture_spec(_configs.CONFIGS["d2_n256_b16_c32"])
LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3


@pytest.fixture(autouse=True)
def planar(monkeypatch):
    """The GPU's block layout, the only one the 2D kernels are compiled for; the dilated kernels and
    x windows on (their defaults, pinned against a user's =0)."""
    monkeypatch.setenv(_plan.LAYOUT_ENV, "planar")
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "1")


def test_generated_include_is_up_to_date():
    assert _dw_plan.INCLUDES[2].read_text() == _dw_plan.dw_source(SPEC), (
        "regenerate: kernels/cuda/weight_gradient_d2.inc = _dw_plan.dw_source(spec) of the D=2 layer")
    src = _dw_plan.compiled_source(2)
    for line in ("#define GJ_DW_COMPS 2", "#define GJ_DW_ROWS 1", "#define GJ_DW_SUM_CHANNELS 32",
                 "#define GJ_DW_WALK GJ_DW_PASS(0) GJ_DW_PASS(1) GJ_DW_PASS(2)"):
        assert line in src


def test_passes_and_weights_of_the_2d_layer():
    """Two vector passes (one per input component) and the scalar pass, 7 tiles each, every row of
    a pass at dz = 0; 12 weights (each pair's filters); at 32 outputs each tile's mma runs on both
    m-tiles: 84 mma a warp and row."""
    ps = _dw_plan.passes(SPEC)
    assert [(p.key, p.i, len(p.tiles), p.last) for p in ps] == [(1, 0, 7, False), (1, 1, 7, True), (0, 0, 7, True)]
    assert len(_dw_plan.weights(SPEC)) == 12 == sum(p.basis.n_filters for p in SPEC.pairs)
    assert all(g.dzs == (0,) for p in ps for g in p.groups)
    assert {q for p in ps for q in p.group} == {0, 1, 2}  # A fragments: scalar, vector j = 0, 1
    assert _dw_plan.mma_count(SPEC) * _dw_plan.m_tiles(32) == 84
    _, phs = _plan.phases(SPEC)  # every symmetric class use of the forward's row groups once across the passes
    assert sum(len(g.uses) for p in ps for g in p.groups) == sum(len(g.uses) for ph in phs for g in _plan.row_groups(ph))


@pytest.mark.parametrize("dilation", _plan.DILATIONS)
@pytest.mark.parametrize("nx", _plan.NX_COVERED)
def test_one_row_slices_read_free_of_bank_conflicts(nx, dilation):
    """A slice holds one row a channel (chan(c) = c pitch + skew): every walk read of a warp (lane
    (g, tid): channel g, pixel k_pixel(tid, d), shifted by s d, the component and the k-step) hits 32
    distinct banks, for the scalar and the 2-component vector block."""
    d = dilation
    for comps in (1, 2):
        pitch, skew = _dw_plan.row_layout(nx, comps, d, rows=1)
        assert pitch >= (nx + 2 * d) * comps + max(skew) and max(skew) < 16
        for chunk in (0, 1):
            for s in range(4):
                for i in range(comps):
                    for step in (0, 1):
                        c = chunk * 8 + G
                        x = _dw_plan.k_pixel(TID, d) + _dw_plan.kstep_shift(d) * step + s * d
                        addr = c * pitch + np.asarray(skew)[c & 7] + x * comps + i
                        assert len(set((addr % 32).tolist())) == 32


@pytest.mark.parametrize("nx", _plan.NX_COVERED)
def test_staged_gy_reads_are_conflict_free_and_aligned(nx):
    """A fragments at 32 outputs: float2 reads (scalar o = 16 m + g + 8 r at pixel 2 tid + 8 s;
    vector component j at j nx + that, planar), each half warp on 16 distinct 8-byte bank pairs."""
    p0, p1 = _dw_plan.gy_pitch(nx, 2)
    n = _dw_plan.sum_channels(2)
    assert n == 32 and p0 >= nx and p1 >= 2 * nx and p0 % 4 == 0 and p1 % 4 == 0
    for s in (0, 1):
        for m in (0, 1):
            for r in (0, 1):
                o, x = 16 * m + G + 8 * r, 2 * TID + 8 * s
                for addr in [o * p0 + x] + [n * p0 + o * p1 + j * nx + x for j in range(2)]:
                    assert (addr % 2 == 0).all()
                    for lanes in (LANE < 16, LANE >= 16):
                        assert len(set(((addr[lanes] // 2) % 16).tolist())) == 16


def test_shared_memory_and_scratch_of_the_2d_layer():
    """The standard 2D layer (rows of 256 in x windows of 64, 32 outputs): the segments' partials
    (4 x 6,144 floats) outgrow the ring (3 x 3,264) and take the shared memory from float 0 at the
    end, the threads' sums after them; one launch; its partials under 5 % of the I/O."""
    lay = _dw_plan.layout(SPEC, 256)
    assert (lay.nx, lay.windows, lay.m_tiles, lay.rows, lay.comps) == (64, 4, 2, 1, 2)
    assert (lay.pitch, lay.slice_floats, lay.gy_floats, lay.partial_floats) == ((68, 136), 3_264, 6_656, 6_144)
    assert lay.reduction_floats == 4 * 6_144 > 3 * lay.slice_floats
    assert lay.smem_bytes == 4 * (4 * 6_144 + 256) == 99_328 <= _plan.SMEM_LIMIT
    assert lay.result_floats == 6_144 + 96  # + 32 scalar and 32 x 2 vector cotangent sums
    for nx in _plan.NX_COVERED:
        for o in (16, 32):
            assert _dw_plan.layout(spec_2d(32, o), nx).smem_bytes <= _plan.SMEM_LIMIT
    spatial, batch = (256, 256), 16
    assert _dw_plan.grid(SPEC, spatial, _dw_plan.DEFAULT_STRIP) == (16, 1, 2)  # 4 windows x 4 strips, 2 channel groups
    io = 4 * batch * 256**2 * (32 + 64) * 2  # inputs and cotangents, float32
    assert _dw_plan.scratch_bytes(SPEC, spatial, _dw_plan.DEFAULT_STRIP, batch) < 0.05 * io


@pytest.mark.parametrize("c_out", [16, 32])
def test_unpack_is_the_inverse_of_the_fragment_order(c_out):
    unpack_matches_the_fragment_order(spec_2d(16, c_out))


@pytest.mark.parametrize("spatial, strip, batch, channels, dilation", [
    ((3, 16), 2, 2, (16, 16), 1), ((4, 32), 3, 1, (16, 32), 1), ((2, 48), 1, 1, (32, 16), 1),
    ((2, 64), 1, 1, (32, 32), 1), ((5, 64), 2, 1, (16, 32), 1),
    # x windows: rows over 64 pixels in windows of 64 (and 32 for 96), the gY rows staged from the window
    ((4, 128), 2, 1, (16, 32), 1), ((3, 96), 1, 2, (16, 16), 1),
    # dilated: CTAs over one y phase's rows, the k-steps' pixel pairs d apart, one float a gY load
    ((6, 32), 2, 1, (16, 32), 2), ((8, 16), 1, 2, (16, 16), 4), ((16, 32), 3, 1, (32, 32), 8)])
def test_emulated_kernel_matches_reference(spatial, strip, batch, channels, dilation):
    """Without tf32 rounding the emulated kernel (float64) is the float64 VJP of `reference` up to
    reassociation: index arithmetic, copies, ring, barriers, the m-tiles and the reduction past the
    ring; the bias gradient from the same staged rows."""
    spec = spec_2d(*channels, dilation=dilation)
    assert _dw_plan.coverage(spec, spatial, np.float32)[0]
    xs, ws, cots = _cases.spec_operands(spec, spatial, batch, seed=7)
    emu = DwEmulator(spec, *(np.asarray(a) for a in xs + cots), strip, tf32=False, planar=True)
    dws, parts = emu.run()
    assert not np.isnan(parts).any()
    for g, w in zip(dws, reference_dw(spec, xs, ws, cots)):
        assert g.shape[1:] == w.shape and rel(g.sum(axis=0), w) <= 1e-12
    for got, cot in zip(emu.sums, cots):
        want = np.asarray(cot, np.float64).sum(axis=(2, 3))
        assert got.shape == want.shape and rel(got, want) <= 1e-12


def test_emulated_kernel_with_tf32_meets_the_tolerance():
    spec = spec_2d(16, 32)
    xs, ws, cots = _cases.spec_operands(spec, (4, 32), 1, seed=8)
    dws, _ = DwEmulator(spec, *(np.asarray(a) for a in xs + cots), 4, planar=True).run()
    for g, w in zip(dws, reference_dw(spec, xs, ws, cots)):
        assert 1e-6 < rel(g[0], w) <= kernels.TOLERANCE["tf32"]  # rounded, within tf32's bound


@pytest.mark.parametrize("dilation, spatial", [(1, (4, 32)), (2, (6, 32))])
def test_nan_and_inf_reach_exactly_their_weights_on_the_emulated_kernel(dilation, spatial):
    """A canonical NaN (scalar input), an inf (vector input component 1) and a NaN in a vector
    cotangent (component 1, output 20: the second m-tile) through the emulated kernel: dW non-finite
    exactly where `_nonfinite.reached_weights` says, the clean operands' VJP elsewhere."""
    spec = spec_2d(16, 32, dilation=dilation)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 1, seed=29)
    hits, g_hits, bad, clean, bad_g, clean_g = _nonfinite.poison_weight_gradient_operands(
        [np.asarray(x[0]) for x in xs], [np.asarray(c[0]) for c in cots], spatial, cotangent_channel=20)
    dws, _ = DwEmulator(spec, bad[0][None], bad[1][None], *(g[None] for g in bad_g), 2, planar=True).run()
    want = reference_dw(spec, [c[None] for c in clean], ws, [jnp.asarray(g)[None] for g in clean_g])
    _nonfinite.check_weights_nonfinite_exactly_reached(spec, hits, [g[0] for g in dws], want, kernels.TOLERANCE["tf32"],
                                                       cotangent_hits=g_hits)


def test_entry_point_batches_like_the_triton_weight_gradient(monkeypatch):
    """weight_gradient_and_sums of a 2D layer (32 outputs) on the emulated FFI call: the 2D target,
    planar blocks, `geom` with nz = 1, one call for a vmapped batch."""
    check_entry_point_batches(monkeypatch, spec_2d(16, 32), (3, 32), 2, True)


def test_triton_backend_runs_output_groups_of_32_on_the_emulated_kernel(monkeypatch):
    """The `triton` backend's CUDA weight gradient of a 2D layer of 64 outputs: two launches of 32,
    each reading its rows of the whole cotangents in place (`geom`[12]); dW and the bias gradient
    against `reference`."""
    from kernels import cuda
    from kernels.triton import _cuda_dispatch

    spec, sub = spec_2d(16, 64), spec_2d(16, 32)
    spatial = (2, 32)
    monkeypatch.setattr(cuda, "availability", lambda: (True, ""))
    monkeypatch.setattr(cuda, "weight_gradient_coverage", lambda s, sp, dt: _dw_plan.coverage(s, sp, dt))
    monkeypatch.setattr(wg, "registered", lambda: (True, "the emulation stands in for the library"))
    seen = []

    def ffi_call(target, shape, vmap_method, input_layouts):
        assert target == _ffi.DW_TARGET_2D

        def call(x0, x1, g0, g1, geom):
            seen.append((int(geom[11]), int(geom[12]), g0.shape))

            def host(*ops):
                _, parts = DwEmulator(sub, *(np.asarray(a)[None] for a in ops), int(geom[5]), tf32=False,
                                      first_channel=int(geom[12]), planar=True).run()
                return parts[0].astype(np.float32)

            return jax.pure_callback(host, shape, x0, x1, g0, g1)

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 1, seed=29)
    got, sums = _cuda_dispatch.cuda_weight_grad(spec, "tf32", None, [x[0] for x in xs], [c[0] for c in cots])
    assert [s[:2] for s in seen] == [(64, 0), (64, 32)] and all(s[2][0] == 64 for s in seen)
    for g, w in zip(got, reference_dw(spec, xs, ws, cots)):
        assert g.shape == w.shape and rel(g / wg.TRUNCATION_SCALE, w) <= 1e-5
    for s, cot in zip(sums, cots):
        want = np.asarray(cot[0], np.float64).sum(axis=(1, 2))
        assert s.shape == want.shape and rel(s, want) <= 1e-6


def test_coverage_of_the_2d_weight_gradient(monkeypatch):
    ok, why = _dw_plan.coverage(SPEC, (256, 256), np.float32)
    assert ok and why.startswith("CUDA weight gradient: D=2"), why
    for d in (2, 4, 8):
        ok, why = _dw_plan.coverage(spec_2d(32, 32, d), (64, 64), np.float32)
        assert ok and f"dilation {d}" in why
    assert _dw_plan.coverage(spec_2d(16, 16), (16, 16), np.float32)[0]
    for nx in (16, 48):  # the sums' split: NX / 32 pixel runs per output
        ok, why = _dw_plan.coverage(spec_2d(16, 32), (16, nx), np.float32)
        assert not ok and "x windows of a multiple of 32" in why
    for spec, spatial, reason in [(spec_2d(32, 8), (64, 64), "must be equal and 16 or 32"),
                                  (spec_2d(8, 16), (64, 64), "multiples of 16"),
                                  (spec_2d(16, 16, 2), (63, 64), "multiple of the dilation")]:
        ok, why = _dw_plan.coverage(spec, spatial, np.float32)
        assert not ok and reason in why, why
    monkeypatch.setenv(_dw_plan.FP32_ENV, "1")
    ok, why = _dw_plan.fp32_coverage(SPEC, (64, 64), np.float32)
    assert not ok and "compiled for D=3" in why
    monkeypatch.setenv(_plan.LAYOUT_ENV, "minor")
    ok, why = _dw_plan.coverage(SPEC, (64, 64), np.float32)
    assert not ok and "component-planar" in why
    monkeypatch.setenv(_plan.LAYOUT_ENV, "planar")
    monkeypatch.setattr(_dw_plan, "compiled_source", lambda dims=3: "")  # a library built before the 2D kernel
    assert "weight_gradient_d2.inc was generated" in _dw_plan.coverage(SPEC, None)[1]


# weight_gradient_kernel<NX, NT, planar, D, kWin, TF32> as weight_gradient_d2.cu compiles it: every
# whole-row width and window width, 16 and 32 outputs (32 at x 32 and 64), every dilation.
_DW_2D_KERNEL = r"weight_gradient_kernelILi(\d+)ELi(\d)ELb1ELi(\d)ELb([01])ELb0EE"
_DW_2D_KERNELS = {(str(nx), nt, str(d), win) for win, widths in (("0", _plan.NX_COVERED), ("1", _plan.WINDOWS_COVERED))
                  for nx in widths for nt in "24" for d in _plan.DILATIONS if nt == "2" or nx % 32 == 0}


@pytest.fixture(scope="module")
def compiled_dw_2d(tmp_path_factory):
    """weight_gradient_d2.cu compiled for sm_90a as the library's build does: (ptxas' report, the object)."""
    out = tmp_path_factory.mktemp("weight_gradient_d2")
    return ptxas_report(_dw_plan.INCLUDES[2].with_name("weight_gradient_d2.cu"), out), out / "weight_gradient_d2.o"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_resources_of_the_2d_kernels(compiled_dw_2d):
    """weight_gradient_kernel<NX, NT, kPlanar, D, kWin, kSplit> of weight_gradient_d2.cu: every
    whole-row width and window width, 16 and 32 outputs (32 at x 32 and 64), every dilation, planar,
    TF32; each compiled once, no spills, within the 255 registers of one 256-thread CTA an SM."""
    report = compiled_dw_2d[0]
    entries = ptxas_entries(report, _DW_2D_KERNEL)
    assert sorted(e[:4] for e in entries) == sorted(_DW_2D_KERNELS), report
    assert all((e[4], e[5]) == ("0", "0") for e in entries), [e for e in entries if e[4] != "0"]
    assert max(int(r) for r in re.findall(r"Used (\d+) registers", report)) <= 255


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_row_loops_do_not_rebuild_mma_operands(compiled_dw_2d):
    """Every 2D kernel's row loop in SASS: at most 4 % register moves (float2 A loads made ptxas
    rebuild each mma's A quad with moves, 22 % of the loop at 32 outputs; bench/NOTES.md, "Session 42")."""
    loops = row_loop_moves(compiled_dw_2d[1], _DW_2D_KERNEL)
    assert set(loops) == _DW_2D_KERNELS, sorted(loops)
    heavy = {k: v for k, v in loops.items() if v[0] > 0.04 * v[1]}
    assert not heavy, heavy
