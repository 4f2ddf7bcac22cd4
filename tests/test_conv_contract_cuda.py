"""The CUDA forward kernel (kernels/cuda) on a CPU: its generated stencil walk is up to date, the
plan's phases and shared-memory layout (bank-conflict-free reads, the budget), the packed mma
B fragments, a numpy emulation of the kernel's arithmetic (phases, fragment-order weights)
against `reference`, the coverage reasons, and (slow) nvcc's resource report: no spills, the
register and shared-memory budget. What only tests/test_conv_contract_cuda_gpu.py covers: the
compiled kernel's numbers (cp.async ring, wrap, mma fragments, the warp halves' reduction), the
FFI call, vmap, timing."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from conftest import rel_l2
from kernels.cuda import _ffi, _plan

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
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


@pytest.mark.parametrize("nx", [16, 32, 48, 64])
def test_row_layout_reads_are_bank_conflict_free(nx):
    for comps in (1, 3):
        pitch, skew = _plan.row_layout(nx, comps)
        assert pitch >= (nx + 2) * comps + max(skew)
        assert _plan.bank_conflict_free(pitch, skew, comps)
    assert not _plan.bank_conflict_free(66, (0, 0, 0, 0), 1)  # the packed row: conflicts
    lay = _plan.layout(SPEC, nx)
    assert lay.smem_bytes <= _plan.SMEM_LIMIT and lay.threads == 4 * nx  # 2 warp halves x nx / 16 segments


def test_shared_memory_of_the_standard_layer():
    lay = _plan.layout(SPEC, 64)
    assert (lay.pitch, lay.skew) == ((71, 200), ((0, 0, 2, 2), (0, 1, 0, 1)))
    assert lay.slice_floats == 13_008 and lay.weight_floats == 10_240 and lay.red_floats == 4_096
    assert lay.smem_bytes == 213_440


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
                            got = packed[base + ((h * n_t + T) * 2 + n) * 64 + 2 * lane + r]
                            want = ws[tile.term][8 * n + lane // 4, 8 * h + lane % 4 + 4 * r, tile.f]
                            assert got == want
        base += 2 * n_t * 2 * 64
    assert base == packed.size


def _emulate(spec, x0, x1, ws):
    """The kernel's arithmetic in numpy: per phase, Z tiles from the phase's rows (dz, dy, i) and
    taps dx; per tile, the GEMM against its packed fragments; fp64."""
    _, phs = _plan.phases(spec)
    packed = _plan.pack_weights(spec, ws)
    o = spec.out_keys[0][2]
    out = [np.zeros((o,) + x0.shape[1:]), np.zeros((o,) + x1.shape[1:])]
    groups, _ = _plan.phases(spec)
    base = 0
    for ph in phs:
        x = x1 if ph.key == 1 else x0[..., None]
        n_t, n_h = len(ph.tiles), x.shape[0] // 8
        for h in range(n_h):
            z = np.zeros((n_t, 8) + x.shape[1:4])
            for (dz, dy, i), uses in ph.rows:
                for t, dx, coef in uses:
                    z[t] += coef * np.roll(x[8 * h : 8 * h + 8, ..., i], (-dz, -dy, -dx), axis=(1, 2, 3))
            for t, tile in enumerate(ph.tiles):
                frag = packed[base + ((h * n_t + t) * (o // 8)) * 64 : base + ((h * n_t + t + 1) * (o // 8)) * 64]
                w = frag.reshape(o // 8, 8, 4, 2).transpose(0, 1, 3, 2).reshape(o, 8)  # (o, c in chunk)
                b, j = groups[tile.group]
                contrib = np.einsum("oc,czyx->ozyx", w, z[t])
                if b == 0:
                    out[0] += contrib
                else:
                    out[1][..., j] += contrib
        base += n_h * n_t * (o // 8) * 64
    return out


def test_numpy_emulation_matches_reference():
    xs, ws, _ = _cases.spec_operands(SPEC, (3, 4, 16), 1, seed=5)
    x0, x1 = (np.asarray(x[0], np.float64) for x in xs)
    got = _emulate(SPEC, x0, x1, [np.asarray(w, np.float64) for w in ws])
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(SPEC, [x[0] for x in xs], ws, backend="reference")
    for g, w in zip(got, want):
        assert rel_l2(jnp.asarray(g, jnp.float32), w) <= kernels.TOLERANCE["fp32"]


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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_resources_within_budget(tmp_path):
    src = _plan.INCLUDE.with_name("conv_contract.cu")
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", f"-I{jax.ffi.include_dir()}",
           "-o", str(tmp_path / "k.cubin"), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    report = res.stderr
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", report)]
    assert len(regs) == 2 and len(spills) == 2, report  # forward_kernel<1>, <2>
    assert all(s == ("0", "0") for s in spills), report
    assert max(regs) <= MAX_REGISTERS, report
    assert "bytes smem" not in report or all(int(b) == 0 for b in re.findall(r"(\d+) bytes smem", report))
