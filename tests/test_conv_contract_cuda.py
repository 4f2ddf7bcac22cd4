"""The CUDA forward kernel (kernels/cuda) on a CPU through a lane-by-lane numpy emulation
(tests/_conv_cuda_emulate.py: slice copies and wrap floats, the ring and its refill, the stencil
reads, the symmetric walk, the mma fragments, the output staging and 16-byte stores, the channel
groups' passes) against `reference`, with every shared-memory float written once per copy and
every output float written once per channel group (read back by the same thread in between);
the entry points' geometry, output groups, dilated and fp32 layers through emulated FFI calls,
and their lowering. The plan's own checks are tests/test_conv_contract_cuda_plan.py's. What only
tests/test_conv_contract_cuda_gpu.py covers: the compiled kernel's numbers (the hardware's
cp.async, barriers, mma), the FFI call, vmap, timing."""

from __future__ import annotations

import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from _conv_cuda_dw_emulate import emulated_dw_call
import _nonfinite
from _conv_cuda_emulate import Emulator, from_physical, library_emulated, standard_spec
from conftest import gradient_errors, rel_l2
from kernels import cuda
from kernels.cuda import _dw_plan, _ffi, _plan
from kernels.cuda import conv_contract as cuda_entry

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])


def _emulated(spatial, strip, tf32, seed, spec=SPEC, n_groups=None, planar=False):
    """The emulated kernel on fresh operands, with fresh bias offsets in its epilogue (the
    `off` operand `cuda.conv_contract.flat_offsets` builds); without `tf32` neither Z nor the
    packed weights are rounded to tf32, so only the index arithmetic and the walk's
    reassociation remain. `n_groups` forces a channel-group split (None: the kernel's)."""
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=seed)
    o = spec.out_keys[0][2]
    rng = np.random.default_rng(seed + 100)
    offsets = (jnp.asarray(rng.standard_normal(o), jnp.float32), jnp.asarray(rng.standard_normal((o, 3)), jnp.float32))
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws], tf32=tf32)
    emu = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, strip, tf32=tf32,
                   offsets=np.asarray(cuda_entry.flat_offsets(spec, offsets)), n_groups=n_groups, planar=planar)
    y0, y1, copies = emu.run()
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    want = (want[0] + offsets[0][:, None, None, None], want[1] + offsets[1][:, None, None, None, :])
    return emu, (y0, y1), want, copies


@pytest.mark.parametrize("spatial, strip, channels, n_groups, planar, dilation", [
    ((3, 5, 32), 2, (16, 16), None, False, 1), ((2, 3, 16), 3, (16, 16), None, False, 1),
    ((2, 3, 16), 2, (32, 8), None, False, 1), ((2, 3, 16), 2, (32, 16), 2, False, 1), ((3, 4, 16), 3, (48, 8), 3, False, 1),
    ((1, 3, 32), 2, (32, 16), None, False, 1), ((3, 5, 32), 2, (16, 16), None, True, 1),
    ((2, 3, 16), 2, (32, 8), None, True, 1), ((3, 4, 16), 3, (48, 8), 3, True, 1), ((1, 2, 48), 1, (16, 16), None, True, 1),
    # dilated: rows of one y phase per CTA, wider wrap, the lanes' pixel pairs d apart; strips that
    # end inside a phase (2 of 3 rows), wrap floats past 32 lanes (d 8: 48 of them), z wrapping
    # more than once (nz < d), 32 inputs (two chunk rounds)
    ((3, 6, 16), 2, (16, 16), None, False, 2), ((2, 8, 32), 3, (32, 8), None, True, 2),
    ((5, 8, 16), 2, (16, 16), None, True, 4), ((2, 4, 48), 1, (16, 8), None, False, 4),
    ((3, 8, 16), 1, (16, 16), None, False, 8), ((2, 16, 32), 2, (16, 8), None, True, 8),
    # x windows: rows over 64 pixels (128: two windows of 64; 96: three of 32) with the wrap runs
    # from the neighbouring windows, two channel groups in windows; dilation 8 (packed rows, the
    # outputs staged over the vector weights, copied in again between a strip's rows) at x 64 whole
    # and at x 128 in two windows of 64
    ((1, 2, 128), 2, (16, 16), None, False, 1), ((2, 2, 96), 1, (16, 8), None, True, 1),
    ((1, 2, 128), 1, (32, 16), None, True, 1), ((2, 16, 64), 2, (16, 16), None, True, 8),
    ((1, 16, 128), 2, (16, 16), None, False, 8)])
def test_emulated_kernel_matches_reference(spatial, strip, channels, n_groups, planar, dilation, monkeypatch):
    """Without tf32 rounding the kernel's index arithmetic and walk agree with `reference` to fp32
    accuracy; every slice float a copy writes is the wrapped input it should be (of the copy's
    channel group), written once; every output float is stored once per channel group and read
    back G - 1 times, all by one thread. 32 input channels: two chunk rounds per warp half; 8
    outputs: one n-tile; (32, 16) at x 16 forced to 2 groups and (48, 8) to 3; (32, 16) at x 32
    takes 2 because one does not fit. `planar`: the vector blocks component-planar in memory
    (the copies' other lane mapping, x 48 where a component's row is not a multiple of 32 floats,
    and the planar staging and stores). `dilation` d: taps at -d, 0, d on every axis."""
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    monkeypatch.setenv(_plan.X_WINDOWS_ENV, "1")
    spec = SPEC if channels == (16, 16) and dilation == 1 else standard_spec(*channels, dilation=dilation)
    assert _plan.coverage(spec, spatial, np.float32)[0]
    emu, got, want, copies = _emulated(spatial, strip, tf32=False, seed=5, spec=spec, n_groups=n_groups,
                                       planar=planar)
    G = emu.n_groups
    assert G == (n_groups or _plan.groups(spec, spatial[2]))
    assert G == (n_groups or (2 if channels == (32, 16) and spatial[2] >= 32 else 1))
    windows = {128: 2, 96: 3}.get(spatial[2], 1)
    assert emu.lay.windows == windows and emu.w * windows == spatial[2]
    for g, w in zip(got, want):
        assert rel_l2(jnp.asarray(g, jnp.float32), w) <= 1e-5
    assert all((w == G).all() for w in emu.out_writes) and all((r == G - 1).all() for r in emu.out_reads)
    assert all((t >= 0).all() for t in emu.out_thread)
    nz, ny, nx = spatial
    lay, d = emu.lay, emu.d
    assert d == dilation
    x = [emu.x[0].reshape(G * lay.channels[0], nz, ny, nx, 1),
         from_physical(emu.x[1], (G * lay.channels[1], nz, ny, nx, 3), planar)]
    rows, w = ny // d, emu.w  # a CTA's strip: rows of one y phase of one x window; 3 + L - 1 slices a key
    assert len(copies) == G * nz * d * windows * sum(2 * (min(j0 + strip, rows) - j0 + 2) for j0 in range(0, rows, strip))
    for key, z, yy, writes in copies:
        m, P = (3 if key else 1), lay.pitch[key]
        want_at = np.zeros(lay.slice_floats, int)
        for c in range(lay.channels[key]):
            for dz in range(3):
                start = lay.region[key] + lay.chan(key, c) + dz * P
                want_at[start : start + (w + 2 * d) * m] = 1
        assert np.array_equal(writes, want_at), (key, z, yy)  # every float of every row once, no pad touched
    # a slot's contents for one CTA (the last x window) and each group: the copies wrote the
    # group's wrapped rows
    x0 = nx - w
    for grp in range(G):
        slot = np.full(lay.slice_floats, np.nan)
        for key in (0, 1):
            emu.load_slice(key, slot, 0, ny - 1, np.zeros(lay.slice_floats, int), grp, x0)
            m, P = (3 if key else 1), lay.pitch[key]
            for c in range(lay.channels[key]):
                for dz in range(3):
                    start = lay.region[key] + lay.chan(key, c) + dz * P
                    row = x[key][grp * lay.channels[key] + c, (d * (dz - 1)) % nz, ny - 1][np.arange(x0 - d, nx + d) % nx]
                    assert np.array_equal(slot[start : start + (w + 2 * d) * m], row.reshape(-1))


def test_group_weights_are_the_groups_chunks():
    """A group's shared-memory weights (the kernel's two contiguous copies) are pack_weights of
    the group's channels alone: the packed layout is chunk-major within each phase."""
    spec, G = standard_spec(48, 16), 3
    rng = np.random.default_rng(4)
    ws = [rng.standard_normal((16, 48, p.basis.n_filters)) for p in spec.pairs]
    packed = _plan.pack_weights(spec, ws, tf32=False)
    emu = Emulator(spec, np.zeros((48, 1, 1, 16)), np.zeros((48, 1, 1, 16, 3)), packed, 1, n_groups=G)
    sub = standard_spec(16, 16)
    assert G * emu.lay.weight_floats == packed.size == G * _plan.layout(sub, 16).weight_floats
    for grp in range(G):
        mine = [w[:, 16 * grp : 16 * (grp + 1)] for w in ws]
        assert np.array_equal(emu.group_weights(grp), _plan.pack_weights(sub, mine, tf32=False))


def test_emulated_kernel_with_tf32_meets_the_tolerance():
    _, got, want, _ = _emulated((3, 4, 16), 4, tf32=True, seed=6)
    for g, w in zip(got, want):
        err = rel_l2(jnp.asarray(g, jnp.float32), w)
        assert 1e-6 < err <= kernels.TOLERANCE["tf32"]  # rounded (not fp32-exact), within tf32's bound


@pytest.mark.parametrize("dilation, spatial, planar", [(1, (3, 5, 16), False), (1, (2, 4, 32), True),
                                                       (2, (3, 6, 16), True)])
def test_nan_and_inf_reach_exactly_the_tapped_outputs_on_the_emulated_kernel(dilation, spatial, planar):
    """A NaN (scalar input) and an inf (one component of a vector input) through the emulated
    kernel: non-finite exactly at the outputs a nonzero basis tap carries them to, every output
    channel there, no more (the symmetric walk's shared sums and differences of two taps only
    combine taps that are both nonzero), and the reference of the clean inputs elsewhere (tf32).
    Z reaches the mma as the GPU makes it (`tf32_operand`: the canonical NaN, truncated). The GPU
    test of the same name runs the kernel itself."""
    spec = standard_spec(16, 16, dilation)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=23)
    hits, values = _nonfinite.standard_hits(spatial)
    bad, clean = _nonfinite.poison([np.asarray(x[0]) for x in xs], hits, values)
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws])
    y0, y1, _ = Emulator(spec, bad[0], bad[1], packed, 2, planar=planar).run()
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [jnp.asarray(x) for x in clean], ws, backend="reference")
    _nonfinite.check_nonfinite_exactly_reached(spec, spatial, hits, (y0, y1), want, kernels.TOLERANCE["tf32"])


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_entry_point_geometry_drives_the_emulated_passes(monkeypatch, layout):
    """forward_call with the FFI call replaced by the emulation, configured only from what the
    kernel gets (`geom` as Forward reads it, the packed weights, the offsets): 32 + 32 inputs at
    x 64 arrive as two channel groups and match `reference` (the Python side's totals, weight
    size and group count agree with the kernel's reading of them). GINJAX_CUDA_LAYOUT=planar asks
    XLA for the vector blocks component-planar and says so in `geom`; the emulation then indexes
    the planar buffers."""
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")
    library_emulated(monkeypatch)
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    planar = layout == "planar"
    vector = cuda_entry.PLANAR_VECTOR if planar else None
    spec, spatial = standard_spec(32, 16), (1, 2, 64)
    calls = []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts):
        assert target == _ffi.TARGET and vmap_method == "broadcast_all"
        assert list(input_layouts) == [None, vector, None, None] and list(output_layouts) == [None, vector]

        def call(x0, x1, w, off, geom):
            nz, ny, nx, c0, c1, o, strip = (int(v) for v in geom[:7])
            G, w_floats = int(geom[18]), int(geom[17])
            assert len(geom) == 26 and (nz, ny, nx, c0, c1, o) == (*spatial, 32, 32, 16) and geom[21] == planar
            assert geom[24] == 0 and geom[25] == 0  # tf32, one ring (x 64)
            assert w.shape == (w_floats,) and off.shape == (4 * o,) and G == 2
            calls.append(G)

            def host(x0, x1, w, off):
                emu = Emulator(spec, np.asarray(x0), np.asarray(x1), np.asarray(w), strip, tf32=False,
                               offsets=np.asarray(off), n_groups=G, planar=bool(geom[21]))
                assert G * emu.lay.weight_floats == w_floats
                return tuple(np.asarray(a, np.float32) for a in emu.run()[:2])

            return jax.pure_callback(host, tuple(shapes), x0, x1, w, off)

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=7)
    got = cuda_entry.forward_call(spec, [x[0] for x in xs], ws)
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    assert calls == [2]
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]  # the packed weights are tf32, Z is not


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_output_groups_write_their_slices_of_one_result(monkeypatch, layout):
    """kernels.triton's CUDA forward of a layer with 32 output channels per key as two launches of
    16 (`_forward_by_output_groups`), the FFI calls replaced by the emulation configured only from
    what the kernel gets: the first launch's results are fresh (NaN) buffers of all 32 channels of
    which it writes channels 0-15 (`geom`'s O and o_base), the second aliases them
    (`ginjax_cuda_forward_into`, operands 4 and 5 to results 0 and 1) and writes 16-31, each output
    float once over the two; no concatenation; the bias offsets' rows per launch; against
    `reference`. Out-of-range slices are refused by `geometry`. Both layouts (the aliased
    operands in the results' layout)."""
    from kernels.triton import _cuda_dispatch

    library_emulated(monkeypatch)
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    vector = cuda_entry.PLANAR_VECTOR if layout == "planar" else None

    spec = standard_spec(16, 32)
    spatial = (2, 3, 16)
    rng = np.random.default_rng(17)
    offsets = (jnp.asarray(rng.standard_normal((32,)), jnp.float32),
               jnp.asarray(rng.standard_normal((32, 3)), jnp.float32))
    calls = []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts, input_output_aliases=None):
        assert vmap_method == "broadcast_all" and [s.shape[0] for s in shapes] == [32, 32]
        assert list(output_layouts) == [None, vector]
        assert list(input_layouts) == [None, vector, None, None] + ([None, vector] if input_output_aliases else [])

        def call(*operands, geom):
            total, first = int(geom[19]), int(geom[20])
            calls.append((target, total, first, input_output_aliases))
            x0, x1, w, off = operands[:4]
            prev = operands[4:]

            def host(x0, x1, w, off, *prev):
                emu = Emulator(_sub, np.asarray(x0), np.asarray(x1), np.asarray(w), int(geom[6]), tf32=False,
                               offsets=np.asarray(off), out_channels=total, first_channel=first,
                               out=[np.asarray(p) for p in prev] if prev else None, planar=bool(geom[21]))
                outs = emu.run()[:2]
                writes.append([emu.out_writes[0].reshape(outs[0].shape),
                               from_physical(emu.out_writes[1], outs[1].shape, emu.planar)])
                return tuple(np.asarray(a, np.float32) for a in outs)

            return jax.pure_callback(host, tuple(shapes), x0, x1, w, off, *prev)

        return call

    _sub = standard_spec(16, 16)
    writes = []
    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=19)
    split = (_sub, 2)
    fn = lambda x, w, offs: _cuda_dispatch.forward_by_output_groups(split, x, w, offs)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(fn)([x[0] for x in xs], ws, offsets))
    joins = [line for line in jaxpr.splitlines() if "concatenate" in line]
    assert not [line for line in joins if "[32,2,3,16" in line], joins  # only the weight packing's
    calls.clear()
    got = fn([x[0] for x in xs], ws, offsets)
    assert [c[:3] for c in calls] == [(_ffi.TARGET, 32, 0), (_ffi.INTO_TARGET, 32, 16)]
    assert calls[0][3] is None and calls[1][3] == {4: 0, 5: 1}
    for key in range(2):  # launch g wrote exactly its 16 channels, each float once
        assert (writes[0][key][:16] == 1).all() and (writes[0][key][16:] == 0).all()
        assert (writes[1][key][:16] == 0).all() and (writes[1][key][16:] == 1).all()
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    want = (want[0] + offsets[0][:, None, None, None], want[1] + offsets[1][:, None, None, None, :])
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]  # the packed weights are tf32, Z is not
    with pytest.raises(ValueError, match=r"`first_channel` \(=8\)"):
        cuda_entry.geometry(_sub, spatial, cuda.BlockSizes(strip_rows=2), out_channels=32, first_channel=8)
    with pytest.raises(ValueError, match=r"`first_channel` \(=32\)"):
        cuda_entry.geometry(_sub, spatial, cuda.BlockSizes(strip_rows=2), out_channels=32, first_channel=32)


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_output_groups_lower_to_aliased_custom_calls(monkeypatch, layout):
    """The real FFI calls of a vmapped two-group forward, lowered for CUDA on this host: the second
    launch (`ginjax_cuda_forward_into`) takes the first one's batched results as operands 4 and 5,
    aliased to its results 0 and 1, so XLA keeps one buffer per output key. The vector blocks'
    layouts (minor-to-major, the vmapped batch the most major axis): row-major, or with the
    components ahead of the spatial axes where planar, on the operand and its aliased result alike."""
    from kernels.triton import _cuda_dispatch

    library_emulated(monkeypatch)
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)

    spec, sub = standard_spec(16, 32), standard_spec(16, 16)
    xs, ws, _ = _cases.spec_operands(spec, (2, 3, 16), 2, seed=23)
    run = jax.jit(jax.vmap(lambda x, w: _cuda_dispatch.forward_by_output_groups((sub, 2), x, w, None), in_axes=(0, None)))
    text = run.trace(xs, ws).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert [re.search(r"custom_call @(\w+)", c).group(1) for c in calls] == [_ffi.TARGET, _ffi.INTO_TARGET]
    assert "output_operand_alias" not in calls[0]
    aliases = re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d)", calls[1])
    assert aliases == [("0", "4"), ("1", "5")], calls[1]
    assert "-> (tensor<2x32x2x3x16xf32>, tensor<2x32x2x3x16x3xf32>)" in calls[0]
    scalar, vector = "[4, 3, 2, 1, 0]", ("[4, 3, 2, 5, 1, 0]" if layout == "planar" else "[5, 4, 3, 2, 1, 0]")
    weights = ["[1, 0]", "[1, 0]"]  # the packed weights and the offsets, batched
    for call, operands in zip(calls, ([scalar, vector] + weights, [scalar, vector] + weights + [scalar, vector])):
        got = re.findall(r"dense<(\[[\d, ]+\])>", call.split("operand_layouts")[1].split("result_layouts")[0])
        assert got == operands, (layout, got)
        results = re.findall(r"dense<(\[[\d, ]+\])>", call.split("result_layouts")[1])
        assert results[:2] == [scalar, vector], (layout, results)


def _emulated_launch(layer, geom, shapes, operands, **kwargs):
    """A forward FFI call's results from the lane emulation configured only from what the kernel
    gets (`geom`, the packed weights, the offsets): one emulated launch per example of the vmapped
    batch (`broadcast_all`)."""

    def host(x0, x1, w, off):
        outs = []
        for b in range(x0.shape[0]):
            emu = Emulator(layer, np.asarray(x0[b]), np.asarray(x1[b]), np.asarray(w[b]), int(geom[6]),
                           offsets=np.asarray(off[b]), planar=bool(geom[21]), fp32=bool(geom[24]), **kwargs)
            outs.append(emu.run()[:2])
        return tuple(np.stack([o[k] for o in outs]).astype(np.float32) for k in range(2))

    return jax.pure_callback(host, tuple(shapes), *operands, vmap_method="broadcast_all")


def _assert_matches_reference(got, grads, reference_loss, xs, ws, tol):
    """Outputs and gradients (in xs and ws, of a `_sin_loss`) within `tol` of `reference_loss`'s at
    JAX's highest matmul precision."""
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = jax.value_and_grad(reference_loss, argnums=(0, 1), has_aux=True)(xs, ws)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= tol
    errors = gradient_errors(grads, want_grads, element_scale=1.0)
    assert max(errors) <= tol, errors


def _sin_loss(spec, backend, precision=None):
    """(loss, outputs) of a vmapped layer on `backend`: a nonlinear loss, so every gradient is tested."""
    def f(xs, ws):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision=precision))(xs)
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs
    return f


@pytest.mark.parametrize("layout, dilation", [("planar", 2), ("minor", 4)])
def test_a_dilated_layer_runs_forward_and_input_gradient_on_the_emulated_kernel(monkeypatch, layout, dilation):
    """The `triton` backend on a dilated layer (DilResNet's), the CUDA FFI calls replaced by the
    emulations configured only from what the kernels get: the forward and the input gradient (the
    transposed layer, a dilated layer on the forward's bases) are two forward launches whose
    `geom` says the dilation, the weight gradient one launch of the dilated weight-gradient
    kernel; outputs and every gradient match `reference`."""
    from kernels.triton import _cuda_dispatch

    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    monkeypatch.setenv(_plan.DILATED_ENV, "1")
    monkeypatch.setattr(cuda, "availability", lambda: (True, "emulated"))
    library_emulated(monkeypatch)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    spec, spatial = standard_spec(16, 16, dilation), (dilation + 1, 2 * dilation, 16)  # the backend wraps d <= n
    assert _cuda_dispatch.cuda_forward_covers(spec, spatial, np.float32)[0]
    assert _cuda_dispatch.cuda_weight_grad_covers(spec, spatial, np.float32)[0]
    launches, dw_launches = [], []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts=None):
        if target == _ffi.DW_TARGET:
            def record(geom):
                assert len(geom) == 17 and int(geom[14]) == dilation and int(geom[16]) == 0
                dw_launches.append(int(geom[5]))

            return emulated_dw_call(spec, shapes, record)
        assert target == _ffi.TARGET, target

        def call(x0, x1, w, off, geom):
            assert len(geom) == 26 and int(geom[22]) == dilation and geom[21] == (layout == "planar") and geom[24] == 0
            launches.append(int(geom[6]))

            # either direction runs a layer on the forward's bases
            return _emulated_launch(standard_spec(16, 16, dilation), geom, shapes, (x0, x1, w, off), tf32=False)

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 2, seed=29)
    loss = lambda backend: _sin_loss(spec, backend)  # noqa: E731

    (_, got), grads = jax.value_and_grad(loss("triton"), argnums=(0, 1), has_aux=True)(xs, ws)
    assert len(launches) == 2 and len(dw_launches) == 1  # forward, input gradient; weight gradient
    _assert_matches_reference(got, grads, loss("reference"), xs, ws, kernels.TOLERANCE["tf32"])


def test_the_fp32_kernels_emulated_meet_the_fp32_tolerance():
    """The 3xTF32 instantiation (template kSplit) emulated lane by lane: Z and the unrounded packed
    weights each split into a tf32 part and a tf32 remainder, three mma a tile. Within fp32's
    tolerance of `reference` in float64, where one tf32 mma is ~100x further off."""
    spec, spatial = SPEC, (3, 4, 16)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=41)
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    errors = {}
    for fp32 in (True, False):
        packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws], tf32=not fp32)
        got = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, 2, fp32=fp32).run()[:2]
        errors[fp32] = max(rel_l2(jnp.asarray(g, jnp.float32), w) for g, w in zip(got, want))
    assert errors[True] <= kernels.TOLERANCE["fp32"] < 0.1 * errors[False], errors


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_fp32_calls_run_the_split_kernels_where_asked(monkeypatch, layout):
    """precision="fp32" on the `triton` backend (GINJAX_CUDA_FP32 unset, on): the forward and the input
    gradient are forward launches with `geom`[24] = 1 and unrounded packed weights (the FFI calls
    replaced by the emulation); outputs and gradients within fp32's tolerance of `reference`, the
    weight gradient on Triton's kernel unless GINJAX_CUDA_FP32_WEIGHT_GRAD=1 (off by default), then
    one weight-gradient launch with `geom`[16] = 1 (emulated with the split). Without the switch, or
    on a dilated layer (compiled at dilation 1 only), fp32 makes no CUDA launch."""
    from kernels.triton import _cuda_dispatch

    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, layout)
    monkeypatch.setattr(cuda, "availability", lambda: (True, "emulated"))
    library_emulated(monkeypatch)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    spec, spatial = standard_spec(16, 16), (2, 3, 16)
    launches, dw_launches = [], []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts=None):
        if target == _ffi.DW_TARGET:
            def record(geom):
                assert len(geom) == 17
                dw_launches.append(int(geom[16]))

            return emulated_dw_call(spec, shapes, record)
        assert target == _ffi.TARGET, target

        def call(x0, x1, w, off, geom):
            assert len(geom) == 26
            launches.append(int(geom[24]))

            return _emulated_launch(spec, geom, shapes, (x0, x1, w, off))

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 2, seed=43)
    loss = lambda backend, layer=spec: _sin_loss(layer, backend, "fp32")  # noqa: E731

    monkeypatch.setenv(_plan.FP32_ENV, "0")
    jax.value_and_grad(loss("triton"), argnums=(0, 1), has_aux=True)(xs, ws)
    assert launches == []  # turned off: Triton's kernels
    monkeypatch.delenv(_plan.FP32_ENV)  # on by default
    (_, got), grads = jax.value_and_grad(loss("triton"), argnums=(0, 1), has_aux=True)(xs, ws)
    assert launches == [1, 1] and dw_launches == []  # the forward and the input gradient, both split
    _assert_matches_reference(got, grads, loss("reference"), xs, ws, kernels.TOLERANCE["fp32"])
    monkeypatch.setenv(_dw_plan.FP32_ENV, "1")
    launches.clear()
    (_, got), grads = jax.value_and_grad(loss("triton"), argnums=(0, 1), has_aux=True)(xs, ws)
    assert launches == [1, 1] and dw_launches == [1]  # and the weight gradient, split
    _assert_matches_reference(got, grads, loss("reference"), xs, ws, kernels.TOLERANCE["fp32"])
    dilated = standard_spec(16, 16, 2)
    assert _cuda_dispatch.cuda_forward_covers(dilated, (3, 4, 16), np.float32)[0]
    assert not _plan.fp32_coverage(dilated, (3, 4, 16), np.float32)[0]
    launches.clear()
    jax.value_and_grad(loss("triton", dilated), argnums=(0, 1), has_aux=True)(*_cases.spec_operands(dilated, (3, 4, 16), 1, seed=44)[:2])
    assert launches == []
