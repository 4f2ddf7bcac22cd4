"""The parity-blocked forward on mma.sync (kernels/cuda/parity_conv.cu) on the CPU: its table and
coverage, and the kernel's addressing through the lane emulation (tests/_parity_cuda_emulate.py)
against `reference`, for the forward and for the input gradient (the same kernel on the transposed
plan). The compiled kernel: tests/test_parity_forward_cuda_gpu.py."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from kernels.cuda import parity_forward as cuda_parity
from kernels.triton import parity_conv
from kernels.triton._parity_source import halo

from _hopper_compile import host_build, ptxas_entries, ptxas_report
from _parity_cuda_emulate import emulate
from conftest import rel_l2
from test_conv_contract_triton import make_layer, operands


def _layer(torus=True, **geometry):
    return make_layer(3, 3, [("s", 3), ("v", 2), ("pv", 1), ("t", 2)], [("s", 2), ("v", 3), ("t", 1)], torus, **geometry)


def _k2_plan():
    from bench import _cases, _configs

    return parity_conv.packed_layer(_cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])).plan


@pytest.mark.parametrize("transposed", [False, True])
def test_table_lists_every_dot_once_in_its_chunks_stage(transposed):
    """The kernel's table: each dot once, in its chunk's weight stage without overlap; the output
    slots are the classes' bits, and a dot's slot is its chunk's class with the combination's
    difference axes flipped (what the kernel, compiled per input class, assumes)."""
    from kernels.triton._parity_plan import combo_q

    plan = _k2_plan()
    plan = plan.transposed() if transposed else plan
    tab, w_stage = cuda_parity._table(plan)
    n_ch, n_dots, F, O = len(plan.chunks), len(plan.dots), cuda_parity.CHUNK_FIELDS, cuda_parity.OUT_FIELDS
    assert tab.dtype == np.int32 and tab.size == (F + cuda_parity.COMBOS) * n_ch + 2 * n_dots + O * cuda_parity.SLOTS
    chunk = tab[: F * n_ch].reshape(n_ch, F)
    dot_of = tab[F * n_ch: (F + cuda_parity.COMBOS) * n_ch].reshape(n_ch, -1)
    dots = tab[(F + cuda_parity.COMBOS) * n_ch: -O * cuda_parity.SLOTS].reshape(n_dots, 2)
    outs = tab[-O * cuda_parity.SLOTS:].reshape(cuda_parity.SLOTS, O)
    assert sorted(dot_of[dot_of >= 0].tolist()) == list(range(n_dots))
    w_at = 0
    for ch, (start, rows, first, n, cls, w_first, w_len) in enumerate(chunk):
        assert (cls, start, rows) == plan.chunks[ch]
        assert w_first == w_at and w_len % 4 == 0 and w_len <= w_stage  # the staged weights: one 16-byte run a chunk
        w_at += w_len
        spans = sorted((dots[d, 1], dots[d, 1] + cuda_parity.NTILE_FLOATS * outs[dots[d, 0], 2])
                       for d in range(first, first + n))
        assert all(plan.dots[d][0] == ch for d in range(first, first + n))
        assert spans[0][0] == 0 and spans[-1][1] == w_len
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # no two tiles overlap
        for combo in range(cuda_parity.COMBOS):
            d = dot_of[ch, combo]
            if d >= 0:
                assert dots[d, 0] == cls ^ combo_q(np.unravel_index(combo, (3, 3, 3)))
    assert w_at == cuda_parity.staged_floats(plan)
    classes = {cls: (start, width) for cls, start, width in plan.out_classes}
    for b in range(cuda_parity.SLOTS):
        if b not in classes:
            assert outs[b, 2] == 0  # no n-tiles: the epilogue writes nothing for it
            continue
        assert tuple(outs[b, :2]) == classes[b] and 0 <= 8 * outs[b, 2] - classes[b][1] < 8
    assert cuda_parity.covers(plan, (64,) * 3, "tf32") is None


def test_staged_weights_are_the_kernels_layout_rounded_to_tf32():
    """stage_weights: dot d's n-tile nt at [4 s + t][g][j] holds wk[d, 8 s + 4 j + t, 8 nt + g], rounded
    to the nearest tf32 (ties away from zero, as cvt.rna; inf and NaN kept)."""
    plan = _k2_plan()
    rng = np.random.default_rng(5)
    wk = rng.standard_normal((len(plan.dots), 16, plan.max_out_pad)).astype(np.float32)
    wk[0, 0, 0], wk[0, 1, 0], wk[0, 2, 0] = np.inf, np.nan, np.float32(1 + 2**-11)  # a tie: away from zero
    got = np.asarray(cuda_parity.stage_weights(plan, jnp.asarray(wk)))
    raw = np.asarray(cuda_parity.stage_weights(plan, jnp.asarray(wk), tf32=False))
    tab = cuda_parity.table(plan)
    F, at = cuda_parity.CHUNK_FIELDS, 0
    for d, (ch, _, b) in enumerate(plan.dots):
        nts = -(-plan.out_classes[b][2] // 8)
        base = tab[F * ch + 5] + tab[(F + cuda_parity.COMBOS) * len(plan.chunks) + 2 * d + 1]
        assert base == at
        for nt in range(nts):
            for k in range(16):
                s, j, t = k // 8, (k % 8) // 4, k % 4
                i = base + nt * cuda_parity.NTILE_FLOATS + 2 * (8 * (4 * s + t) + np.arange(8)) + j
                np.testing.assert_array_equal(raw[i], wk[d, k, 8 * nt: 8 * nt + 8])
        at += nts * cuda_parity.NTILE_FLOATS
    # dot 0, n-tile 0, column 0: rows 0, 1, 2 at [row pair t = 0, 1, 2][g = 0][j = 0]
    assert got[0] == np.inf and np.isnan(got[16]) and got[32] == np.float32(1 + 2**-10)
    u = raw.view(np.uint32)
    want = np.where((u & 0x7F800000) == 0x7F800000, u, (u + 0x1000) & 0xFFFFE000).astype(np.uint32).view(np.float32)
    np.testing.assert_array_equal(got, want)
    assert np.all(np.abs(got[np.isfinite(got)] - raw[np.isfinite(raw)]) <= 2**-11 * np.abs(raw[np.isfinite(raw)]))


def test_coverage_names_what_it_cannot_run():
    plan = _k2_plan()
    assert "TF32 only" in cuda_parity.covers(plan, (64,) * 3, "tf32x3")
    wide = parity_conv.packed_layer(make_layer(3, 3, [("s", 40)], [("s", 40)])).plan
    assert "40 rows" in cuda_parity.covers(wide, (16,) * 3, "tf32")
    flat = parity_conv.packed_layer(make_layer(2, 3, [("s", 4), ("v", 4)], [("s", 4), ("v", 4)])).plan
    assert "D=2" in cuda_parity.covers(flat, (16,) * 2, "tf32")
    far = parity_conv.packed_layer(make_layer(3, 3, [("s", 4), ("v", 4)], [("s", 4), ("v", 4)],
                                              rhs_dilation=(1, 1, 17))).plan
    assert "x halo of 17" in cuda_parity.covers(far, (4, 4, 40), "tf32")


def test_off_by_default_and_not_run_without_the_library(monkeypatch):
    plan = _k2_plan()
    monkeypatch.delenv(cuda_parity.PARITY_CUDA_ENV, raising=False)
    assert not cuda_parity.requested()
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "on")
    assert cuda_parity.requested()
    assert not parity_conv.cuda_forward_runs(plan, (64,) * 3, "tf32")  # no Hopper GPU here
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "sometimes")
    with pytest.raises(ValueError, match=cuda_parity.PARITY_CUDA_ENV):
        cuda_parity.requested()


def _kernel(run, plan, spatial, rows, wk):
    # the emulation's arithmetic is exact: its weights unrounded; the host build's as on the GPU
    x, w, tab, geom = cuda_parity.kernel_operands(plan, spatial, parity_conv.with_halo(plan, rows), wk, halo(plan),
                                                  tf32=run is not emulate)
    y = run(np.asarray(x, np.float64)[None], np.asarray(w, np.float64)[None], tab, geom)
    assert np.isfinite(y).all()  # every output written, no unwritten stage cell read
    return jnp.asarray(y[0], jnp.float32)


HOST = pathlib.Path(__file__).with_name("parity_cuda_host.cpp")
CU = pathlib.Path(cuda_parity.__file__).with_name("parity_conv.cu")


@pytest.fixture(scope="module")
def host_kernel(tmp_path_factory):
    """parity_conv.cu's device code compiled for the host by g++ (tests/parity_cuda_host.cpp, with
    tests/cuda_host.h: a CTA as 128 OS threads, the mma a warp's fragments exchanged, tf32 rounding
    as cvt.rna). Runs (x, w, tab, geom) -> y, as `emulate` does."""
    exe = host_build(CU, HOST, tmp_path_factory.mktemp("parity_host"),
                     [("extern __shared__ float smem[];", "float* smem = dynamic_smem;", 1)])

    def run(x, w, tab, geom):
        head = (" ".join(str(int(v)) for v in [x.shape[0], *geom]) + "\n").encode()
        data = (np.ascontiguousarray(x, np.float32).tobytes() + np.ascontiguousarray(w, np.float32).tobytes()
                + np.ascontiguousarray(tab, np.int32).tobytes())
        out = subprocess.run([str(exe)], input=head + data, capture_output=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        nz, ny, nx, cout = geom[0], geom[1], geom[2], geom[10]
        return np.frombuffer(out.stdout, np.float32).reshape(x.shape[0], cout, nz, ny, nx)
    return run


@pytest.mark.parametrize("runner", ["emulated", "host"])
@pytest.mark.parametrize("spatial, torus, dilation", [((3, 4, 70), True, 1), ((4, 3, 21), (False, True, False), 2)])
def test_kernel_on_the_cpu_matches_reference(request, runner, spatial, torus, dilation):
    """The forward (two x tiles, the second partial, or one short row) and the input gradient,
    through the lane emulation (float64, no rounding: within 1e-5) or the kernel's own code built
    for the host (tf32 operands: within TF32's tolerance)."""
    run = emulate if runner == "emulated" else request.getfixturevalue("host_kernel")
    tol = 1e-5 if runner == "emulated" else kernels.TOLERANCE["tf32"]
    geometry = {} if torus is True else {"padding": "SAME"}
    if dilation > 1:
        geometry["rhs_dilation"] = (dilation,) * 3
    spec = _layer(torus, **geometry)
    xs, ws = operands(spec, spatial, seed=47)
    layer = parity_conv.packed_layer(spec)
    plan = layer.plan
    wc = parity_conv.combo_filter(spec, layer, ws)
    rows = parity_conv.pack_rows(3, spec.in_keys, layer.in_order, xs)
    y = _kernel(run, plan, spatial, rows, parity_conv.dot_weights(plan, wc))
    got = parity_conv.unpack_rows(3, spec.out_keys, layer.out_order, y)
    want = kernels.conv_contract(spec, xs, ws, backend="reference", precision="fp32")
    for a, b in zip(got, want):
        assert rel_l2(a, b) < tol, rel_l2(a, b)

    rng = np.random.default_rng(3)
    dys = [jnp.asarray(rng.standard_normal(np.shape(o)), jnp.float32) for o in want]
    _, vjp = jax.vjp(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"), xs)
    (want_dx,) = vjp(tuple(dys))
    plan_t = plan.transposed()
    dy_rows = parity_conv.pack_rows(3, spec.out_keys, layer.out_order, dys)
    dx = _kernel(run, plan_t, spatial, dy_rows, parity_conv.dot_weights(plan_t, parity_conv.transposed_combos(plan, wc)))
    for a, b in zip(parity_conv.unpack_rows(3, spec.in_keys, layer.in_order, dx), want_dx):
        assert rel_l2(a, b) < tol, rel_l2(a, b)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_no_spills_two_ctas_an_sm(tmp_path):
    """parity_forward<4> compiles for sm_90a (nvcc, ~10 CPU s) without spills or stack, within __launch_bounds__(128,
    2)'s 255 registers (all 255 with nvcc 13.0, the kernel compiled per input class): the 8 x 4 accumulator
    tiles stay in registers."""
    source = pathlib.Path(cuda_parity.__file__).with_name("parity_conv.cu")
    report = ptxas_report(source, tmp_path)
    entries = ptxas_entries(report, r"parity_forwardILi(\d)E")
    assert [e[0] for e in entries] == ["4"], report
    assert entries[0][1:] == ("0", "0"), report
    block = report[report.index("parity_forwardILi4E"):]
    assert int(re.search(r"Used (\d+) registers", block).group(1)) <= 255
    assert re.search(r"(\d+) bytes stack frame", block).group(1) == "0", block[:600]


def _ffi_calls(jaxpr, target):
    """The equations calling FFI target `target` anywhere in a closed jaxpr (sub-jaxprs too)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.params.get("target_name") == target:
            found.append(eqn)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    found += _ffi_calls(sub, target)
    return found


def test_the_layer_traces_to_the_ffi_call_under_vmap_and_grad(monkeypatch):
    """With the switch on and the library taken as available, the layer's forward and input
    gradient trace to the kernel's FFI call (what the GPU run will lower), vmapped: one call each
    for the batch of 3, on the packed rows with their x halo (padded to 16-byte rows), the staged weight tiles
    and the table."""
    from kernels import cuda

    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "on")
    monkeypatch.setattr(cuda, "availability", lambda: (True, ""))
    spec = _layer()
    spatial = (4, 4, 20)
    xs, ws = operands(spec, spatial, seed=53, batch=3)

    def loss(x, w):
        ys = jax.vmap(lambda x: parity_conv.conv_contract_parity(spec, x, w, "tf32"))(x)
        return sum(jnp.sum(y) for y in ys)

    calls = _ffi_calls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(xs, ws).jaxpr, cuda_parity.PARITY_FORWARD)
    plan = parity_conv.packed_layer(spec).plan
    h = halo(plan)
    assert len(calls) == 2  # the forward and the input gradient
    for call, (rows_in, rows_out) in zip(calls, ((plan.cin, plan.cout), (plan.cout, plan.cin))):
        x, w, tab = (v.aval for v in call.invars)
        assert x.shape == (3, rows_in) + spatial[:2] + (cuda_parity.row_floats(spatial[2], h),)
        geom = dict(call.params["attributes"])["geom"]
        geom = np.asarray(getattr(geom, "val", geom))  # a HashableArray on jax 0.11
        assert w.shape == (3, int(geom[14])) and tab.shape[-1] == int(geom[17])
        assert call.outvars[0].aval.shape == (3, rows_out) + spatial
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "off")
    off = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(xs, ws).jaxpr
    assert not _ffi_calls(off, cuda_parity.PARITY_FORWARD)


def test_explain_names_the_cuda_forward(monkeypatch):
    """kernels.explain on the k2 layer: nothing about CUDA with the switch off; with it on, why the
    kernel cannot run on a CPU, and that it runs where the library is available."""
    from bench import _cases, _configs
    from kernels import cuda

    spec = _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])
    monkeypatch.delenv(cuda_parity.PARITY_CUDA_ENV, raising=False)
    assert "mma.sync" not in kernels.explain(spec, (64,) * 3, backend="triton").reason
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "on")
    assert "cannot run here" in kernels.explain(spec, (64,) * 3, backend="triton").reason
    monkeypatch.setattr(cuda, "availability", lambda: (True, ""))
    said = kernels.explain(spec, (64,) * 3, backend="triton").reason
    assert "parity-blocked" in said and "mma.sync kernel" in said, said
