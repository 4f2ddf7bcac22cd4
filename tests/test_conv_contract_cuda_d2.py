"""The D = 2 CUDA forward's plan on a CPU (kernels/cuda/conv_contract_d2.cu: forward_kernel.cuh compiled
on the 2D walk): its generated walk (stencil_d2.inc) is up to date; its phases hold every basis
nonzero once; the walk and the packed weights, evaluated as the kernel combines them (each Z tile
from its rows' shifted reads, then the tile's mma B fragments), give `reference`'s layer at every
compiled dilation and both output widths; one-row slices read free of bank conflicts and fit the
shared-memory budget; the launch geometry; coverage and its reasons; the `triton` backend's CUDA
plan for 2D layers (whole, in output groups of 32, the weight gradient on the CUDA kernel too:
tests/test_conv_contract_cuda_dw_d2.py). The kernel's index arithmetic through the lane-by-lane
emulation (tests/_conv_cuda_emulate.py's `Emulator` on a grid of one z plane: the one-row slice
copies and wrap floats, the ring, the walk's reads, the B fragments of two and four n-tiles, the
staging and the 16-byte planar stores with the bias offsets) against the float64 `reference` on
whole rows and x windows, every dilation, 16 and 32 outputs, 16 .. 48 inputs, every slice float
written once a copy and every output float once. What only tests/test_conv_contract_cuda_d2_gpu.py
covers: the compiled kernel's numbers (cp.async, barriers, mma), its launches, compute-sanitizer."""

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
from _conv_cuda_emulate import Emulator
from _hopper_compile import ptxas_entries, ptxas_report
from conftest import float64, rel_l2
from kernels.cuda import _dw_plan, _plan
from kernels.cuda import conv_contract as cuda_entry

SPEC = _cases.fixture_spec(_configs.CONFIGS["d2_n256_b16_c32"])
LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3


@pytest.fixture(autouse=True)
def planar(monkeypatch):
    """The GPU's block layout, the only one the 2D kernels are compiled for."""
    monkeypatch.setenv(_plan.LAYOUT_ENV, "planar")


def spec_2d(c_in: int, c_out: int, dilation: int = 1):
    """The 2D {scalar, vector} layer of SPEC's filters with c_in / c_out channels a key."""
    spec = dataclasses.replace(SPEC, in_keys=tuple((k, p, c_in) for k, p, _ in SPEC.in_keys),
                               out_keys=tuple((k, p, c_out) for k, p, _ in SPEC.out_keys))
    if dilation == 1:
        return spec
    return dataclasses.replace(spec, rhs_dilation=(dilation,) * 2, torus_pad=((dilation, dilation),) * 2)


def test_generated_walk_is_up_to_date():
    assert _plan.INCLUDES[2].read_text() == _plan.stencil_source(SPEC), (
        "regenerate: kernels/cuda/stencil_d2.inc = _plan.stencil_source(spec) of the D=2 layer")
    assert "#define GJ_COMPS 2" in _plan.compiled_stencil(2) and "#define GJ_ROWS 1" in _plan.compiled_stencil(2)


def test_phases_of_the_2d_layer():
    groups, (vec, sca) = _plan.phases(SPEC)
    assert groups == ((0, 0), (1, 0), (1, 1))
    assert (vec.key, len(vec.tiles), sca.key, len(sca.tiles)) == (1, 12, 0, 7)
    assert sum(len(u) for ph in (vec, sca) for _, u in ph.rows) == 67  # every basis nonzero once
    assert all(dz == 0 for ph in (vec, sca) for (dz, _, _), _ in ph.rows)  # one row a channel and slice
    for ph in (vec, sca):
        dys = [dy for (_, dy, _), _ in ph.rows]
        assert dys == sorted(dys) and ph.first_rows > 0  # dy-major: the MID hook frees the dy = -1 slice
        assert all(g.dzs == (0,) and not g.zc for g in _plan.row_groups(ph))
    assert _plan.walk_cost(vec) + _plan.walk_cost(sca) == 236  # FP32 a warp, row and chunk (bench.walk_cost)


def unpack_weights(spec, packed, ph, base):
    """Phase ph's (tiles, o, c) weights from the packed B fragments at `base`, read the way the
    kernel reads them: lane (g, tid)'s 2 NT floats of chunk h and tile T start at
    ((h n_tiles + T) NT 64 + kLaneB lane) (kLaneB 4 at 4 n-tiles, else 2 NT), the second float4 of
    4 n-tiles 128 floats on; float 2 n + r is w[o = 8 n + g, c = 8 h + tid + 4 r]."""
    o = spec.out_keys[0][2]
    c = spec.in_keys[ph.key][2]
    n_t, nt = len(ph.tiles), o // 8
    lane_b = 4 if nt == 4 else 2 * nt
    w = np.zeros((n_t, o, c))
    for h in range(c // 8):
        for T in range(n_t):
            for lane in range(32):
                at = base + (h * n_t + T) * nt * 64 + lane_b * lane
                floats = np.concatenate([packed[at:at + 4], packed[at + 128:at + 132]]) if nt == 4 else packed[at:at + 2 * nt]
                for n in range(nt):
                    for r in range(2):
                        w[T, 8 * n + lane // 4, 8 * h + lane % 4 + 4 * r] = floats[2 * n + r]
    return w, base + (c // 8) * n_t * nt * 64


def plan_forward(spec, x0, x1, weights):
    """The layer as the kernel computes it from its plan, in float64: per phase and tile, Z[c, y, x]
    = sum of the tile's (row (0, dy, i), dx, coefficient) uses times the input at (y + d dy, x + d dx)
    (torus), then out[group] += W_tile Z over the phase's channels, W from the packed fragments."""
    d = _plan.dilation(spec)
    groups, phases = _plan.phases(spec)
    o = spec.out_keys[0][2]
    outs = [np.zeros((o,) + x0.shape[1:]), np.zeros((o,) + x0.shape[1:] + (2,))]
    packed = np.asarray(_plan.pack_weights(spec, weights, tf32=False), np.float64)
    base = 0
    for ph in phases:
        x = np.asarray(x0, np.float64)[..., None] if ph.key == 0 else np.asarray(x1, np.float64)
        w, base = unpack_weights(spec, packed, ph, base)
        for T, tile in enumerate(ph.tiles):
            z = np.zeros(x.shape[:3])
            for (_, dy, i), uses in ph.rows:
                for t, dx, coef in uses:
                    if t == T:
                        z += coef * np.roll(x[..., i], (-d * dy, -d * dx), axis=(1, 2))
            b, j = groups[tile.group]
            out = np.einsum("oc,cyx->oyx", w[T], z)
            if b == 0:
                outs[0] += out
            else:
                outs[1][..., j] += out
    assert base == packed.size
    return outs


@pytest.mark.parametrize("c_in, c_out, dilation", [(32, 32, 1), (16, 16, 1), (32, 16, 2), (16, 32, 4), (16, 16, 8)])
def test_walk_and_packed_weights_give_the_reference_layer(c_in, c_out, dilation):
    spec = spec_2d(c_in, c_out, dilation)
    spatial = (24, 32) if dilation < 8 else (16, 40)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=5 + dilation)
    got = plan_forward(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), [np.asarray(w) for w in ws])
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_l2(jnp.asarray(g, jnp.float32), w) < 1e-6


@pytest.mark.parametrize("dilation", _plan.DILATIONS)
@pytest.mark.parametrize("nx", [16, 32, 48, 64])
def test_one_row_slices_read_free_of_bank_conflicts(nx, dilation):
    d = dilation
    for comps in (1, 2):
        pitch, skew, stride = _plan.row_layout(nx, comps, d, rows=1)
        assert stride == pitch and pitch >= (nx + 2 * d) * comps + max(skew) and max(skew) < 256
        for half in (0, 4):  # every (channel half, s, i) read of a warp hits 32 distinct banks
            for s in range(4):
                for i in range(comps):
                    c = TID + half
                    addr = c * stride + np.asarray(skew)[c & 3] + (_plan.lane_pixel(G, d) + s * d) * comps + i
                    assert len(set((addr % 32).tolist())) == 32
    lay = _plan.window_layout(spec_2d(32, 32, d), nx)  # the standard 2D layer's channels, one group
    assert lay.dims == 2 and not lay.stage_in_weights and lay.smem_bytes <= _plan.SMEM_LIMIT
    assert lay.stage_floats == (nx // 16) * 32 * (20 + 36)  # 16 scalar and 32 vector floats an output, padded


def reference_64(spec, xs, ws):
    """`reference`'s layer of the first example in float64 (jit: eager dispatch of its einsums
    costs seconds)."""
    with float64():
        run = jax.jit(lambda x, w: kernels.conv_contract(spec, x, w, backend="reference"))
        outs = run([jnp.asarray(np.asarray(x[0]), jnp.float64) for x in xs],
                   [jnp.asarray(np.asarray(w), jnp.float64) for w in ws])
        return [np.asarray(a) for a in outs]


def emulate(spec, xs, ws, strip, **kwargs):
    """The emulated kernel (no tf32 rounding: float64, the index arithmetic and the walk's
    reassociation alone) on the first example, planar, the weights packed unrounded."""
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws], tf32=False)
    emu = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, strip, tf32=False, planar=True, **kwargs)
    return emu, emu.run()


def emulate_biased(spec, xs, ws, strip, seed, **kwargs):
    """`emulate` with fresh bias offsets in the epilogue: (the flat offsets as the kernel reads them,
    the emulator, its results, float64 `reference` plus the offsets)."""
    o = spec.out_keys[0][2]
    rng = np.random.default_rng(seed)
    offsets = (jnp.asarray(rng.standard_normal(o), jnp.float32), jnp.asarray(rng.standard_normal((o, 2)), jnp.float32))
    off = np.asarray(cuda_entry.flat_offsets(spec, offsets), np.float64)
    emu, out = emulate(spec, xs, ws, strip, offsets=off, **kwargs)
    want = reference_64(spec, xs, ws)
    return off, emu, out, (want[0] + off[:o, None, None], want[1] + off[o:].reshape(o, 1, 1, 2))


@pytest.mark.parametrize("spatial, strip, c_in, c_out, dilation", [
    # whole rows of 16 .. 64: odd y extents, strips that end mid-grid, a single row (its slices y - 1,
    # y, y + 1 the same row), 32 and 48 inputs (two and three chunk rounds a warp half), 16 and 32
    # outputs (two and four n-tiles)
    ((3, 16), 2, 16, 16, 1), ((5, 32), 2, 32, 32, 1), ((3, 48), 2, 48, 16, 1), ((4, 64), 3, 16, 32, 1),
    ((1, 32), 1, 16, 32, 1),
    # dilated: a CTA's rows of one y phase, strips ending inside a phase (2 of 3 rows), one row a
    # phase (ny = d), the lanes' pixel pairs d apart, 2 d wrap pixels a row (d 8: all 32 lanes copy
    # vector wrap floats)
    ((6, 32), 2, 32, 16, 2), ((12, 16), 2, 16, 32, 4), ((16, 48), 3, 32, 32, 8), ((8, 64), 1, 16, 16, 8),
    # x windows: rows of 96 in three windows of 32, of 128 in two of 64, the wrap runs from the
    # neighbouring windows (or around the row at its ends), dilated too
    ((3, 96), 2, 16, 32, 1), ((2, 128), 1, 32, 16, 1), ((4, 96), 1, 48, 16, 2), ((8, 128), 3, 16, 32, 4),
    ((8, 128), 1, 16, 32, 8)])
def test_emulated_kernel_matches_reference(spatial, strip, c_in, c_out, dilation, monkeypatch):
    """The 2D kernel emulated lane by lane (conv_contract_d2.cu's instantiations: planar, one
    channel group, TF32 without its rounding) is the float64 `reference` up to reassociation; every
    slice float a copy writes is the wrapped input row it should be, written once, no pad touched;
    every output float is stored once, by one thread."""
    monkeypatch.setenv(_plan.DILATED_ENV, "1")  # their defaults, pinned against a user's =0
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "1")
    spec = spec_2d(c_in, c_out, dilation)
    assert _plan.coverage(spec, spatial, np.float32)[0]
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=11 + dilation)
    emu, (y0, y1, copies) = emulate(spec, xs, ws, strip)
    ny, nx = spatial
    windows = {96: 3, 128: 2}.get(nx, 1)
    lay, d, w = emu.lay, emu.d, emu.w
    assert (emu.nz, emu.comps, emu.rows, emu.nt, emu.n_groups) == (1, 2, 1, c_out // 8, 1)
    assert d == dilation and lay.windows == windows and w * windows == nx and not lay.stage_in_weights
    for got, want in zip((y0, y1), reference_64(spec, xs, ws)):
        assert got.shape == want.shape and rel_l2(got, want) <= 1e-12
    assert all((n == 1).all() for n in emu.out_writes) and all((t >= 0).all() for t in emu.out_thread)
    rows = ny // d  # a CTA's strip: rows of one y phase of one x window; 3 + L - 1 slices a key
    assert len(copies) == d * windows * sum(2 * (min(j0 + strip, rows) - j0 + 2) for j0 in range(0, rows, strip))
    runs = {}  # per key, where the rows of its channels lie in a slice: x = -d .. w + d - 1
    for key in (0, 1):
        m = 2 if key else 1
        runs[key] = [lay.region[key] + lay.chan(key, c) + np.arange((w + 2 * d) * m) for c in range(lay.channels[key])]
    for key, z, yy, writes in copies:
        want_at = np.zeros(lay.slice_floats, int)
        want_at[np.concatenate(runs[key])] = 1
        assert z == 0 and np.array_equal(writes, want_at), (key, yy)
    # a slot's contents for the last x window's CTA: each channel's wrapped row (component-planar
    # in global memory, pixel-major in the slice)
    x0 = nx - w
    slot = np.full(lay.slice_floats, np.nan)
    x = [np.asarray(xs[0][0], np.float64)[..., None], np.asarray(xs[1][0], np.float64)]
    for key in (0, 1):
        emu.load_slice(key, slot, 0, ny - 1, np.zeros(lay.slice_floats, int), 0, x0)
        for c, at in enumerate(runs[key]):
            assert np.array_equal(slot[at], x[key][c, ny - 1][np.arange(x0 - d, nx + d) % nx].reshape(-1))


@pytest.mark.parametrize("c_out", [16, 32])
def test_emulated_kernel_adds_the_bias_offsets(c_out):
    """The epilogue's offsets (`off`: o scalar, then (o, 2) vector, as flat_offsets lays them out)
    added to every pixel of their output channel and component; at 32 outputs a CTA of 16 pixels
    (64 threads) copies the 96 offsets in two rounds."""
    spec, spatial = spec_2d(16, c_out), (3, 16)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=23)
    off, _, (y0, y1, _), want = emulate_biased(spec, xs, ws, 2, seed=24)
    assert off.shape == (3 * c_out,)
    for got, w in zip((y0, y1), want):
        assert rel_l2(got, w) <= 1e-12


@pytest.mark.parametrize("spatial, strip, c_in, c_out, n_groups", [
    # forced splits where one group would fit: 32 + 32 inputs in two groups of 16 + 16, 48 + 48 in
    # three, a single row (its slices y - 1, y, y + 1 the same row)
    ((3, 32), 2, 32, 16, 2), ((4, 16), 3, 48, 32, 3), ((1, 32), 1, 32, 32, 2),
    # the plan's own: 64 + 64 inputs at x 64 (the UNet's decoder layer after its skip concatenation:
    # 341 KB in one group), and in x windows of 64 of a row of 128
    ((3, 64), 2, 64, 16, None), ((2, 128), 1, 64, 32, None)])
def test_emulated_channel_groups_match_reference(spatial, strip, c_in, c_out, n_groups, monkeypatch):
    """Channel-group passes in 2D (conv_contract_d2.cu's kGroups instantiations, dilation 1): each
    pass copies its group's weights and refills the ring with its channels, the first stores with
    the bias offsets and a later one adds to what the same thread stored; the sum is the float64
    `reference` plus the offsets, up to reassociation; every output float is stored once a pass."""
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")  # their defaults, pinned against a user's =0
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_2D_ENV, "1")  # opt-in (slower on most 2D layers measured)
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "1")
    spec = spec_2d(c_in, c_out)
    assert _plan.coverage(spec, spatial, np.float32)[0]
    want_groups = n_groups or _plan.groups(spec, spatial[1])
    assert want_groups > 1 and (n_groups or _plan.window_layout(spec, spatial[1]).smem_bytes > _plan.SMEM_LIMIT)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=31 + c_in)
    _, emu, (y0, y1, copies), want = emulate_biased(spec, xs, ws, strip, seed=32 + c_in, n_groups=n_groups)
    assert emu.n_groups == want_groups and emu.lay.smem_bytes <= _plan.SMEM_LIMIT
    assert emu.lay.channels == (c_in // want_groups, c_in // want_groups)
    for got, w in zip((y0, y1), want):
        assert got.shape == w.shape and rel_l2(got, w) <= 1e-12
    assert all((n == want_groups).all() for n in emu.out_writes)
    assert len({key for key, *_ in copies}) == 2


def test_emulated_output_groups_write_each_output_float_once():
    """A layer of 64 outputs as two launches of 32 into one result (the `triton` backend's output
    groups): the first launch, into fresh (NaN) results of 64 channels, stores each float of
    channels 0-31 once, by one thread, and none of 32-63; the second, starting from the first's
    results, stores each of 32-63 once and none of 0-31; together `reference`'s layer."""
    spec, sub = spec_2d(16, 64), spec_2d(16, 32)
    spatial = (3, 32)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=29)
    out = None
    for first in (0, 32):
        mine = [np.asarray(w)[first : first + 32] for w in ws]
        emu, (*out, _) = emulate(sub, xs, mine, 2, out_channels=64, first_channel=first, out=out)
        for writes, thread in zip(emu.out_writes, emu.out_thread):
            writes, thread = writes.reshape(64, -1), thread.reshape(64, -1)  # planar: channel-major too
            assert (writes[first : first + 32] == 1).all() and (thread[first : first + 32] >= 0).all()
            assert (writes[:first] == 0).all() and (writes[first + 32 :] == 0).all()
    for got, want in zip(out, reference_64(spec, xs, ws)):
        assert got.shape == want.shape and rel_l2(got, want) <= 1e-12


def test_shared_memory_and_geometry_of_the_2d_layer():
    lay = _plan.layout(SPEC, 256)  # rows of 256 in x windows of 64
    assert (lay.nx, lay.windows, lay.groups) == (64, 4, 1)
    assert lay.weight_floats == (12 + 7) * 32 * 32
    assert lay.slice_floats == 32 * 71 + 32 * 133 and lay.slice_floats % 4 == 0
    assert lay.smem_bytes == 4 * (3 * lay.slice_floats + lay.stage_floats + lay.weight_floats + 3 * 32)  # + the offsets
    blocks = cuda_entry.BlockSizes.for_layer(SPEC, (256, 256), 16)
    geom = cuda_entry.geometry(SPEC, (256, 256), blocks, planar=True)
    assert geom[:7] == [1, 256, 256, 32, 32, 32, blocks.strip_rows]
    assert geom[17:] == [lay.weight_floats, 1, 32, 0, 1, 1, 64, 0, 0]
    assert cuda_entry.flat_offsets(SPEC, None).shape == (3 * 32,)  # o scalar, then (o, 2) vector offsets


def test_coverage_of_2d_layers(monkeypatch):
    ok, why = _plan.coverage(SPEC, (256, 256))
    assert ok and why.startswith("CUDA forward: D=2"), why
    assert _plan.coverage(spec_2d(32, 16, 8), (64, 48))[0]
    assert _plan.coverage(spec_2d(16, 16), (20, 16))[0]
    for spec, spatial, reason in [
        (spec_2d(32, 8), (64, 64), "must be equal and 16 or 32"),
        (spec_2d(32, 64), (64, 64), "must be equal and 16 or 32"),
        (spec_2d(8, 16), (64, 64), "multiples of 16"),
        (SPEC, (64, 40), "multiple of 16"),
        (spec_2d(16, 16, 2), (63, 64), "multiple of the dilation"),
    ]:
        ok, why = _plan.coverage(spec, spatial)
        assert not ok and reason in why, why
    # channel-group passes: opt-in in 2D (slower on most layers measured; 64 + 64 inputs at x 64: 341 KB in one group)
    monkeypatch.delenv(_plan.CHANNEL_GROUPS_ENV, raising=False)
    monkeypatch.delenv(_plan.CHANNEL_GROUPS_2D_ENV, raising=False)
    ok, why = _plan.coverage(spec_2d(64, 32), (8, 64))
    assert not ok and "341376 bytes" in why and f"{_plan.CHANNEL_GROUPS_2D_ENV}=1" in why, why
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_2D_ENV, "1")
    assert _plan.coverage(spec_2d(64, 32), (8, 64))[0] and _plan.groups(spec_2d(64, 32), 64) == 2
    assert _plan.groups(spec_2d(32, 32, 2), 64) == 1  # dilated layers: one group, as compiled
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "0")  # the switch of every D turns them off too
    assert not _plan.coverage(spec_2d(64, 32), (8, 64))[0]
    ok, why = _plan.fp32_coverage(SPEC, (64, 64))
    assert not ok and "compiled for D=3" in why
    monkeypatch.setenv(_plan.LAYOUT_ENV, "minor")
    ok, why = _plan.coverage(SPEC, (64, 64))
    assert not ok and "component-planar" in why
    assert not cuda_entry.takes_residuals(SPEC)  # no residual epilogue in 2D: XLA adds them


def test_the_triton_backend_plans_2d_forwards_on_cuda(monkeypatch):
    """Where the library runs, a 2D layer's forward (and its input gradient, the transposed layer on
    the forward's bases) is one CUDA launch, a layer of 64 outputs two launches of 32; so is its
    weight gradient (test_conv_contract_cuda_dw_d2.py runs that plan on the emulated kernel)."""
    from kernels import cuda
    from kernels.triton import _cuda_dispatch

    monkeypatch.setattr(cuda, "availability", lambda: (True, ""))
    monkeypatch.setattr(cuda, "coverage", lambda spec, spatial, dtype: _plan.coverage(spec, spatial, dtype))
    monkeypatch.setattr(cuda, "weight_gradient_coverage", lambda spec, spatial, dtype: _dw_plan.coverage(spec, spatial, dtype))
    x = [jnp.zeros((32, 64, 64)), jnp.zeros((32, 64, 64, 2))]
    layer, _, split, fp32 = _cuda_dispatch.cuda_forward_plan(SPEC, "tf32", None, x)
    assert (layer, split, fp32) == (SPEC, None, False)
    wide = spec_2d(32, 64)
    layer, _, split, _ = _cuda_dispatch.cuda_forward_plan(wide, "tf32", None, x)
    assert layer == wide and split[1] == 2 and split[0].out_keys[0][2] == 32
    from kernels._fused import transposed_spec

    spec_t, _ = transposed_spec(SPEC)
    assert _cuda_dispatch.cuda_forward_plan(spec_t, "tf32", None, x, like=SPEC) is not None
    plan_dw = lambda spec: _cuda_dispatch.cuda_plan(_cuda_dispatch.cuda_weight_grad_covers, [(spec, None)], "tf32",  # noqa: E731
                                                    None, x, _dw_plan.fp32_coverage)
    assert plan_dw(SPEC)[2] is None and plan_dw(wide)[2][1] == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernel's compile check)")
def test_ptxas_resources_of_the_2d_kernels(tmp_path):
    """forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, ...> of conv_contract_d2.cu: every whole-row
    width and window width, 2 and 4 n-tiles, planar; one group at every dilation and the
    channel-group passes at dilation 1; each compiled once, no spills, within the 255 registers of
    one 256-thread CTA an SM."""
    report = ptxas_report(_plan.INCLUDES[2].with_name("conv_contract_d2.cu"), tmp_path)
    entries = ptxas_entries(report, r"forward_kernelILi(\d+)ELi(\d)ELb([01])ELb1ELi(\d)ELb([01])ELb0ELb0ELb0EJEE")
    expected = {(str(nx), nt, groups, str(d), win)
                for win, widths in (("0", _plan.NX_COVERED), ("1", _plan.WINDOWS_COVERED))
                for nx in widths for nt in "24" for groups in "01" for d in _plan.DILATIONS
                if groups == "0" or d == 1}
    assert sorted(e[:5] for e in entries) == sorted(expected), report
    assert all((e[5], e[6]) == ("0", "0") for e in entries), [e for e in entries if e[5] != "0"]
    assert max(int(r) for r in re.findall(r"Used (\d+) registers", report)) <= 255
