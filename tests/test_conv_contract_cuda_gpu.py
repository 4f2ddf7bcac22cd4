"""The CUDA forward kernel (kernels/cuda) built and run on a Hopper GPU, against `reference` at the
tf32 tolerance: the standard layer's grid, odd grids (z, y not powers of two, short strips that
end mid-grid, x 16/32/48), poisoned outputs (every element written), vmap as one launch, and
gradients (dense's VJP); channel-group passes (32 + 32 inputs at x 64, two groups because one
does not fit; a forced split at a small grid); and against its own lane-by-lane numpy emulation
(tests/_conv_cuda_emulate.py), far tighter than tf32's tolerance: the same tf32 rounding of Z
(the one-add trick relies on the mma ignoring a tf32 operand's low 13 bits) and of the weights.
Build first (kernels/cuda/README.md), then on the GPU machine:

    python3 -m pytest -m gpu tests/test_conv_contract_cuda_gpu.py
"""

from __future__ import annotations

import re
import textwrap
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
import _nonfinite
from _conv_cuda_emulate import Emulator, standard_spec
from _cuda_gpu import GPU_ONLY, both_layouts_fixture, require_compute_sanitizer
from conftest import assert_sanitizer_clean, rel_l2
from kernels import cuda
from kernels.cuda import _dw_plan, _plan
from kernels.cuda import conv_contract as cuda_entry
from test_conv_contract_triton import _backend_config

pytestmark = GPU_ONLY
SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])

# every test in both layouts, with the dilated forward, the x windows and the twin rings on
layout = both_layouts_fixture(
    _plan.DILATED_ENV, _plan.X_WINDOWS_ENV, _plan.NARROW_WINDOWS_ENV, _plan.TWIN_ENV
)


@pytest.fixture(autouse=True)
def _built():
    ok, why = cuda.availability()
    if not ok:
        pytest.fail(f"the CUDA kernel must be built for these tests: {why}")


def _reference(xs, ws, spec=SPEC):
    with jax.default_matmul_precision("highest"):
        return jax.jit(jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference")))(xs)


def _check(spatial, batch, seed, blocks=None, spec=SPEC):
    xs, ws, _ = _cases.spec_operands(spec, spatial, batch, seed=seed)
    run = jax.jit(jax.vmap(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks), in_axes=(0, None)))
    got = run(xs, ws)
    for g, w in zip(got, _reference(xs, ws, spec)):
        assert g.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(g))), "non-finite output: an unwritten or corrupted element"
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


def test_standard_grid_against_reference():
    _check((64, 64, 64), 1, seed=21)


@pytest.mark.parametrize(
    "spatial, batch, strip",
    [((5, 7, 64), 2, None), ((3, 5, 16), 3, 2), ((4, 9, 32), 1, 4), ((1, 2, 48), 2, 1), ((7, 3, 64), 1, 7)],
)
def test_odd_grids_and_strips(spatial, batch, strip):
    _check(spatial, batch, seed=22, blocks=None if strip is None else cuda.BlockSizes(strip_rows=strip))


def test_outputs_are_fully_written():
    """The output buffers are fresh (uninitialised) memory: donate a NaN-filled buffer of the same
    size first so a skipped element shows up as NaN."""
    xs, ws, _ = _cases.spec_operands(SPEC, (5, 6, 32), 2, seed=23)
    poison = [jnp.full((2, 16, 5, 6, 32), jnp.nan), jnp.full((2, 16, 5, 6, 32, 3), jnp.nan)]
    jax.block_until_ready(jax.jit(lambda p: [q * 2 for q in p], donate_argnums=0)(poison))
    got = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(SPEC, x, ws)))(xs)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)


WIDE = standard_spec(32, 16)  # the UNet's decoder layer after its skip concatenation: 32 + 32 -> 16 + 16


@pytest.fixture
def channel_groups(monkeypatch):
    """The channel-group passes on (the default; set here so that the tests hold whatever the
    environment says)."""
    monkeypatch.setenv(_plan.CHANNEL_GROUPS_ENV, "1")


@pytest.mark.parametrize("spatial, strip", [((2, 3, 64), None), ((3, 5, 64), None), ((3, 5, 64), 2)])
def test_two_channel_groups_against_reference(spatial, strip, channel_groups):
    """32 + 32 inputs at x 64: the full ring needs 410 KB, so the kernel passes over each strip
    twice (16 + 16 channels a pass), the second adding to the first's stored outputs."""
    assert _plan.groups(WIDE, spatial[2]) == 2
    _check(spatial, 2, seed=27, blocks=None if strip is None else cuda.BlockSizes(strip_rows=strip), spec=WIDE)


def test_two_channel_groups_write_every_output(channel_groups):
    """Poisoned (NaN) output buffers: the first pass must store every element the second reads
    back, and the second every element again."""
    xs, ws, _ = _cases.spec_operands(WIDE, (2, 3, 64), 2, seed=28)
    poison = [jnp.full((2, 16, 2, 3, 64), jnp.nan), jnp.full((2, 16, 2, 3, 64, 3), jnp.nan)]
    jax.block_until_ready(jax.jit(lambda p: [q * 2 for q in p], donate_argnums=0)(poison))
    got = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(WIDE, x, ws)))(xs)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
    for g, w in zip(got, _reference(xs, ws, WIDE)):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("spatial, strip, channels, n_groups", [((2, 4, 16), 3, (32, 16), 2), ((3, 5, 32), 2, (48, 8), 3)])
def test_forced_channel_groups_match_the_emulation(monkeypatch, spatial, strip, channels, n_groups, channel_groups):
    """A split where one group would fit (`_plan.groups` patched, so `geometry` asks for it):
    the kernel against its emulation of the same passes (tf32 alike, ~1e-6) and `reference`."""
    spec = standard_spec(*channels)
    monkeypatch.setattr(_plan, "groups", lambda spec, nx: n_groups)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=29)
    blocks = cuda.BlockSizes(strip_rows=strip)
    assert cuda.conv_contract.geometry(spec, spatial, blocks)[18] == n_groups
    got = jax.jit(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks))([x[0] for x in xs], ws)
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws])
    emu = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, strip, n_groups=n_groups)
    with jax.default_matmul_precision("highest"):
        ref = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    for g, w, r in zip(got, emu.run()[:2], ref):
        assert rel_l2(g, jnp.asarray(w, jnp.float32)) <= 2e-5
        assert rel_l2(g, r) <= kernels.TOLERANCE["tf32"]


def test_vmap_is_one_launch_and_gradients_match():
    xs, ws, cots = _cases.spec_operands(SPEC, (4, 6, 32), 3, seed=24)
    run = jax.vmap(lambda x, ws: cuda.conv_contract_cuda(SPEC, x, ws), in_axes=(0, None))
    hlo = jax.jit(run).lower(xs, ws).as_text()
    assert hlo.count("ginjax_cuda_forward") == 1

    def loss(fn, xs, ws):
        return sum(jnp.vdot(o, c) for o, c in zip(fn(xs, ws), cots))

    ref = jax.vmap(lambda x, ws: kernels.conv_contract(SPEC, x, ws, backend="reference"), in_axes=(0, None))
    with jax.default_matmul_precision("highest"):
        want = jax.grad(lambda x, w: loss(ref, x, w), argnums=(0, 1))(xs, ws)
    got = jax.jit(jax.grad(lambda x, w: loss(run, x, w), argnums=(0, 1)))(xs, ws)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


def test_triton_backend_forward_and_input_gradient_on_the_cuda_kernel(monkeypatch):
    """GINJAX_TRITON_FORWARD=cuda: the triton backend's forward and its input gradient (the
    transposed layer on the forward's bases, weights moved by sign) are two CUDA launches, the
    weight gradient triton's kernel; value and gradients against `reference` at tf32."""
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cuda")
    xs, ws, cots = _cases.spec_operands(SPEC, (5, 6, 32), 2, seed=26)
    run = jax.vmap(lambda x, ws: kernels.conv_contract(SPEC, x, ws, backend="triton"), in_axes=(0, None))

    def loss(fn, xs, ws):
        return sum(jnp.vdot(o, c) for o, c in zip(fn(xs, ws), cots))

    step = jax.jit(jax.value_and_grad(lambda x, w: loss(run, x, w), argnums=(0, 1)))
    hlo = step.lower(xs, ws).as_text()
    assert hlo.count("ginjax_cuda_forward") == 2, "forward and input gradient on the CUDA kernel"
    ref = jax.vmap(lambda x, ws: kernels.conv_contract(SPEC, x, ws, backend="reference"), in_axes=(0, None))
    with jax.default_matmul_precision("highest"):
        want = jax.value_and_grad(lambda x, w: loss(ref, x, w), argnums=(0, 1))(xs, ws)
    got = step(xs, ws)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


def _cuda_step_against_reference(spec, spatial, batch, seed, forwards, weight_grads, finite=False, precision="tf32",
                                 tolerance=None):
    """value_and_grad of a vmapped, biased `triton` layer at `precision` whose HLO holds `forwards`
    CUDA forward launches, `weight_grads` CUDA weight-gradient launches and (tf32, bf16) no Triton
    kernel but the offsets' channel sums; value and gradients (inputs, weights, biases) against
    `reference` within `tolerance` (None: the precision's; `finite`: every gradient finite too)."""
    from kernels.triton.conv_contract import conv_contract_triton

    o = spec.out_keys[0][2]
    xs, ws, cots = _cases.spec_operands(spec, spatial, batch, seed=seed)
    rng = np.random.default_rng(seed + 1)
    offs = (jnp.asarray(rng.standard_normal((o,)), jnp.float32), jnp.asarray(rng.standard_normal((o, 3)), jnp.float32))
    run = jax.vmap(lambda x, ws, offs: conv_contract_triton(spec, x, ws, precision=precision, offsets=offs),
                   in_axes=(0, None, None))

    def ref(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference"))(xs)
        return (outs[0] + offs[0][None, :, None, None, None], outs[1] + offs[1][None, :, None, None, None, :])

    def loss(fn, *args):
        return sum(jnp.vdot(out, ct) for out, ct in zip(fn(*args), cots))

    step = jax.jit(jax.value_and_grad(lambda *a: loss(run, *a), argnums=(0, 1, 2)))
    hlo = step.lower(xs, ws, offs).as_text()
    assert hlo.count("ginjax_cuda_forward") == forwards, hlo[-3000:]
    assert hlo.count("ginjax_cuda_weight_gradient") == weight_grads
    # the only Triton kernels left at tf32 (and bf16, on the TF32 kernels): the offsets' gradient, each
    # a sum of its cotangent (channel sums)
    for line in hlo.splitlines() if precision in ("tf32", "bf16") else ():
        if "custom_call @triton_kernel_call" in line:
            assert b"channel_sums_" in zlib.decompress(_backend_config(line)), line[:300]
    with jax.default_matmul_precision("highest"):
        want = jax.value_and_grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(xs, ws, offs)
    got = step(xs, ws, offs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if finite:
            assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_l2(g, w) <= (kernels.TOLERANCE[precision] if tolerance is None else tolerance)


def test_triton_backend_all_three_directions_on_the_cuda_kernels(monkeypatch):
    """GINJAX_TRITON_WEIGHT_GRAD=cuda with the default CUDA forward: forward, input gradient and
    weight gradient are CUDA launches (no Triton kernel left in the step but the offsets' sums),
    the layer's biases included; value and gradients (inputs, weights, biases) against
    `reference` at tf32."""
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "cuda")
    _cuda_step_against_reference(SPEC, (4, 6, 32), 3, seed=31, forwards=2, weight_grads=1)


@pytest.mark.parametrize("channels, spatial", [((32, 32), (3, 5, 64)), ((16, 32), (4, 6, 32)), ((32, 64), (3, 4, 16))])
def test_output_groups_all_three_directions(monkeypatch, channels, spatial):
    """GINJAX_CUDA_OUTPUT_GROUPS=1: a layer with 32 or 64 output channels per key runs its
    forward, input gradient and weight gradient as launches of 16 output channels each (the
    first case also passes over two input channel groups at x 64); value and gradients (inputs,
    weights, biases) against `reference` at tf32, and no Triton kernel left in the step but the
    offsets' sums."""
    import dataclasses

    from kernels.triton._cuda_dispatch import OUTPUT_GROUPS_ENV

    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    monkeypatch.setenv(OUTPUT_GROUPS_ENV, "1")
    c, o = channels
    spec = dataclasses.replace(SPEC, in_keys=tuple(k[:2] + (c,) for k in SPEC.in_keys),
                               out_keys=tuple(k[:2] + (o,) for k in SPEC.out_keys))
    launches = o // 16 + (c // 16 if c > 16 else 1)  # the forward's groups + the input gradient's
    _cuda_step_against_reference(spec, spatial, 2, seed=51, forwards=launches, weight_grads=o // 16, finite=True)
    # the forward's groups write their slices of one result: no concatenation of the outputs
    from kernels.triton.conv_contract import conv_contract_triton

    xs, ws, _ = _cases.spec_operands(spec, spatial, 2, seed=52)
    fwd = jax.jit(jax.vmap(lambda x, ws: conv_contract_triton(spec, x, ws, precision="tf32"), in_axes=(0, None)))
    hlo = fwd.lower(xs, ws).compile().as_text()
    assert hlo.count("ginjax_cuda_forward_into") == o // 16 - 1, hlo[-3000:]
    joins = [line for line in hlo.splitlines() if "concatenate(" in line and f"[2,{o}," in line]
    assert not joins, joins


@pytest.mark.parametrize("channels, spatial", [((2, 16), (4, 6, 32)), ((16, 1), (3, 5, 64))], ids=["first", "last"])
def test_thin_layers_with_zero_channels_all_three_directions(monkeypatch, channels, spatial):
    """GINJAX_CUDA_PAD_CHANNELS=1 (the default): a model's first (2 + 2 -> 16 + 16) and last (16 + 16 -> 1 + 1)
    layers run their forward, input gradient and weight gradient on the CUDA kernels with zero
    channels added (kernels/triton/_cuda_padding.py); value and gradients (inputs, weights,
    biases) against `reference` at tf32, every gradient finite, and no Triton kernel left in the
    step but the offsets' sums."""
    from kernels.triton import _cuda_padding

    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "1")
    spec = _cases.with_channels(SPEC, *channels)
    _cuda_step_against_reference(spec, spatial, 2, seed=61, forwards=2, weight_grads=1, finite=True)


@pytest.mark.parametrize("means", ["xla", "triton"])
def test_layer_bias_in_the_forward_epilogue_per_example(monkeypatch, means):
    """The layer's bias through the public API (scalar "add", vector "mean": offsets from each
    example's input means, so batched under vmap) goes into the CUDA forward's epilogue: one
    forward launch, no broadcast add of the outputs after it; outputs and gradients (inputs,
    weights, biases) against `reference` at tf32. The means by XLA's reductions or by the sums
    kernel (GINJAX_INPUT_MEANS; then the forward's only Triton launches are the sums')."""
    import dataclasses

    from kernels.triton import conv_contract as triton_entry

    monkeypatch.setenv(triton_entry.INPUT_MEANS_ENV, means)

    spec = dataclasses.replace(SPEC, bias_modes=("add", "mean"))
    spatial = (4, 6, 32)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 3, seed=41)
    rng = np.random.default_rng(42)
    bias = (jnp.asarray(rng.standard_normal((16,)), jnp.float32), jnp.asarray(rng.standard_normal((16,)), jnp.float32))

    def outputs(backend):
        return jax.vmap(lambda x, ws, b: kernels.conv_contract(spec, x, ws, bias=b, backend=backend),
                        in_axes=(0, None, None))

    def loss(backend, *args):
        return sum(jnp.vdot(o, c) for o, c in zip(outputs(backend)(*args), cots))

    fwd = jax.jit(outputs("triton"))
    hlo = fwd.lower(xs, ws, bias).compile().as_text()
    assert hlo.count("ginjax_cuda_forward") == 1, hlo[-3000:]
    lowered = fwd.lower(xs, ws, bias).as_text()
    triton_calls = [line for line in lowered.splitlines() if "custom_call @triton_kernel_call" in line]
    assert bool(triton_calls) == (means == "triton"), triton_calls
    assert all(b"channel_sums" in zlib.decompress(_backend_config(line)) for line in triton_calls)
    got = fwd(xs, ws, bias)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(outputs("reference"))(xs, ws, bias)
        want_grads = jax.value_and_grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2))(xs, ws, bias)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]
    grads = jax.jit(jax.value_and_grad(lambda *a: loss("triton", *a), argnums=(0, 1, 2)))(xs, ws, bias)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]
    # no fusion makes an array of the outputs' (or the inputs') size but a relayout at the jit
    # boundary (planar blocks in and out of a program whose arguments are row-major): the custom
    # call's results are the outputs, with no add over them
    big = re.compile(r"\s*(ROOT )?%\S+ = f32\[3,16,4,6,32(,3)?\]\S* fusion\(")
    adds = [line for line in hlo.splitlines() if big.match(line) and "transpose" not in line.split("calls=")[-1][:40]]
    assert not adds, hlo[-3000:]


@pytest.mark.parametrize("spatial, batch, strip, channels", [((3, 4, 32), 2, None, (16, 16)), ((2, 5, 64), 1, 2, (16, 16)),
                                                          ((3, 3, 16), 1, None, (32, 8)), ((2, 3, 64), 1, None, (32, 16))])
def test_fp32_against_reference(spatial, batch, strip, channels):
    """precision="fp32": the 3xTF32 instantiation (the `triton` backend's for fp32 unless
    GINJAX_CUDA_FP32=0) within fp32's tolerance of `reference` in float64, where TF32 is ~100x
    further off; whole rows, 8 or 16 outputs, two channel groups (32 + 32 at x 64). A dilated
    layer or x windows are refused in fp32 (compiled at dilation 1 on whole rows)."""
    spec = SPEC if channels == (16, 16) else standard_spec(*channels)
    xs, ws, _ = _cases.spec_operands(spec, spatial, batch, seed=25)
    blocks = None if strip is None else cuda.BlockSizes(strip_rows=strip)
    run = lambda mode: jax.jit(jax.vmap(  # noqa: E731
        lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, precision=mode, block_sizes=blocks), in_axes=(0, None)))
    got, tf32 = run("fp32")(xs, ws), run("tf32")(xs, ws)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference")))(xs)
    for g, t, w in zip(got, tf32, want):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_l2(g, w) <= kernels.TOLERANCE["fp32"] < 0.1 * rel_l2(t, w)
    dilated = standard_spec(16, 16, 2)
    xs, ws, _ = _cases.spec_operands(dilated, (2, 4, 16), 1, seed=26)
    with pytest.raises(ValueError, match="in fp32: the fp32 .3xTF32. forward is compiled at dilation 1 only"):
        cuda.conv_contract_cuda(dilated, [x[0] for x in xs], ws, precision="fp32")


def test_bf16_through_the_triton_backend_runs_the_tf32_kernels(monkeypatch):
    """GINJAX_CUDA_BF16 unset (on): a biased `triton` layer at precision="bf16" runs all three
    directions as CUDA launches of the TF32 kernels, so its value and gradients land within tf32's
    tolerance of `reference`, not only bf16's."""
    monkeypatch.delenv(_plan.BF16_ENV, raising=False)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    _cuda_step_against_reference(SPEC, (3, 4, 32), 2, seed=37, forwards=2, weight_grads=1, precision="bf16",
                                 tolerance=kernels.TOLERANCE["tf32"])


def test_fp32_through_the_triton_backend(monkeypatch):
    """GINJAX_CUDA_FP32 on (the default): a biased `triton` layer at precision="fp32" runs its forward and input
    gradient as two CUDA launches of the 3xTF32 kernels (the weight gradient on Triton's fp32
    kernel, or with GINJAX_CUDA_FP32_WEIGHT_GRAD=1 one launch of the split CUDA one); value and
    gradients (inputs, weights, biases) within fp32's tolerance of `reference`."""
    monkeypatch.setenv(_plan.FP32_ENV, "1")
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    monkeypatch.delenv(_dw_plan.FP32_ENV, raising=False)
    _cuda_step_against_reference(SPEC, (3, 4, 32), 2, seed=27, forwards=2, weight_grads=0, precision="fp32")
    monkeypatch.setenv(_dw_plan.FP32_ENV, "1")  # and the weight gradient's split kernel
    _cuda_step_against_reference(SPEC, (3, 4, 32), 2, seed=28, forwards=2, weight_grads=1, precision="fp32")


@pytest.mark.parametrize(
    "spatial, strip, channels", [((3, 4, 32), 3, (16, 16)), ((2, 3, 16), 2, (16, 16)), ((3, 5, 16), 2, (32, 8)),
                                 ((2, 4, 16), 3, (32, 16))])
def test_matches_its_emulation(spatial, strip, channels):
    """The kernel and its emulation round Z and the weights to tf32 alike; what differs is fp32
    against fp64 accumulation and the rare Z whose rounding that flips: ~1e-6, where tf32's own
    error is ~3e-4 (a kernel that truncated Z, or rounded it twice, would be ~1e-4 off). 32 input
    channels: two chunk rounds per warp half (the vector phase's extra wait); 8 outputs: one
    n-tile. Also against `reference` at the tf32 tolerance."""
    spec = SPEC if channels == (16, 16) else standard_spec(*channels)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=26)
    run = jax.jit(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=cuda.BlockSizes(strip_rows=strip)))
    got = run([x[0] for x in xs], ws)
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws])
    emu = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, strip)
    with jax.default_matmul_precision("highest"):
        ref = kernels.conv_contract(spec, [x[0] for x in xs], ws, backend="reference")
    for g, w, r in zip(got, emu.run()[:2], ref):
        assert rel_l2(g, jnp.asarray(w, jnp.float32)) <= 2e-5
        assert rel_l2(g, r) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("dilation, spatial, batch, strip", [
    (2, (64, 64, 64), 2, None), (4, (64, 64, 64), 1, None), (8, (32, 32, 32), 2, None),  # DilResNet's grids
    (8, (64, 64, 64), 1, None), (8, (3, 32, 64), 2, 3),  # d = 8 at x 64: whole rows, staged over the weights
    (2, (5, 6, 16), 3, 2), (4, (3, 8, 48), 2, 1), (8, (9, 16, 16), 1, 3), (2, (7, 10, 32), 1, 4)])
def test_dilated_layers_against_reference(dilation, spatial, batch, strip):
    """rhs_dilation d on every axis (DilResNet's 2, 4, 8): CTAs over one y phase's rows, the wider
    wrap, the lanes' pixel pairs d apart; grids whose z extent is below 2d (z taps that wrap onto
    each other), strips that end inside a phase. At d = 8 the rows are packed and the outputs
    staged over the vector phase's weights, which each row after a strip's first copies in again
    (strips of 3 rows at x 64)."""
    spec = standard_spec(16, 16, dilation)
    assert _plan.coverage(spec, spatial, np.float32)[0]
    _check(spatial, batch, seed=40 + dilation, blocks=None if strip is None else cuda.BlockSizes(strip_rows=strip),
           spec=spec)


@pytest.mark.parametrize("dilation, spatial, strip, seed", [
    (2, (3, 4, 32), 1, 52), (4, (5, 8, 16), 2, 54), (8, (2, 16, 16), 2, 58), (8, (2, 24, 64), 3, 59),  # dilated
    (1, (2, 3, 128), 2, 81)])  # two x windows of 64
def test_dilated_and_windowed_kernels_match_their_emulation(dilation, spatial, strip, seed):
    """The compiled kernel on dilated layers and in x windows against its lane-by-lane emulation
    (tf32 alike; see test_matches_its_emulation), with poisoned (NaN) output buffers: every element
    written, once by the window that owns it."""
    spec = SPEC if dilation == 1 else standard_spec(16, 16, dilation)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=seed)
    poison = [jnp.full((16,) + spatial, jnp.nan), jnp.full((16,) + spatial + (3,), jnp.nan)]
    jax.block_until_ready(jax.jit(lambda p: [q * 2 for q in p], donate_argnums=0)(poison))
    run = jax.jit(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=cuda.BlockSizes(strip_rows=strip)))
    got = run([x[0] for x in xs], ws)
    packed = _plan.pack_weights(spec, [np.asarray(w) for w in ws])
    emu = Emulator(spec, np.asarray(xs[0][0]), np.asarray(xs[1][0]), packed, strip,
                   planar=cuda_entry.layout() == "planar")
    for g, w in zip(got, emu.run()[:2]):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_l2(g, jnp.asarray(w, jnp.float32)) <= 2e-5


def test_dilated_layer_all_directions_in_the_triton_backend(monkeypatch):
    """A biased dilated layer in the `triton` backend: forward, input gradient and weight gradient
    are CUDA launches; value and gradients (inputs, weights, biases) against `reference`."""
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    _cuda_step_against_reference(standard_spec(16, 16, 4), (8, 8, 32), 2, seed=61, forwards=2, weight_grads=1)


@pytest.mark.parametrize("spatial, batch, strip, channels, dilation", [
    ((8, 8, 128), 2, None, (16, 16), 1), ((3, 5, 96), 1, 2, (16, 16), 1), ((4, 6, 128), 1, 3, (32, 16), 1),
    ((2, 4, 192), 2, 1, (16, 8), 1), ((4, 16, 128), 1, 2, (16, 16), 8), ((4, 8, 128), 1, 2, (16, 16), 4),
    ((2, 8, 64), 1, 2, (32, 8), 2)])
def test_x_windows_against_reference(spatial, batch, strip, channels, dilation):
    """Rows over 64 pixels in x windows (two of 64 at 128, three of 32 at 96, three of 64 at 192),
    the wrap runs from the neighbouring windows; channel groups in windows (32 + 32 inputs);
    dilation 8 in windows of 64 (packed rows, staged over the weights); a row of 64 whose ring does
    not fit whole in two windows of 32 (32 + 32 inputs at dilation 2)."""
    spec = standard_spec(*channels, dilation=dilation)
    assert _plan.coverage(spec, spatial, np.float32)[0] and _plan.layout(spec, spatial[2]).windows > 1
    _check(spatial, batch, seed=70 + spatial[2], blocks=None if strip is None else cuda.BlockSizes(strip_rows=strip),
           spec=spec)


@pytest.mark.parametrize("channels, spatial, batch, strip", [
    ((16, 16), (4, 6, 32), 2, 3),  # one channel group, strips ending mid-grid
    ((32, 16), (2, 5, 32), 2, 2),  # two channel groups (the UNet's 32^3 level): the later pass adds
    ((16, 8), (6, 4, 32), 1, None),  # one n-tile
    ((48, 16), (2, 3, 32), 1, None),  # three channel groups
    ((32, 32), (4, 3, 32), 2, 3),  # two output groups (ginjax_cuda_forward_into)
])
def test_twin_rings_equal_one_ring(monkeypatch, channels, spatial, batch, strip):
    """Rows of 32 at nz even run on twin rings (two z slabs a CTA, 8 warps): outputs bit for bit
    those of the one-ring kernel (GINJAX_CUDA_TWIN=0: the same arithmetic in the same order per
    pixel), within tf32 of `reference`, every element written (poisoned buffers donated first)."""
    spec = standard_spec(*channels)
    o = channels[1]
    blocks = None if strip is None else cuda.BlockSizes(strip_rows=strip)
    sub = standard_spec(channels[0], min(o, 16))  # a launch's layer (16 outputs per output group)
    assert cuda_entry.geometry(sub, spatial, blocks or cuda.BlockSizes())[25] == 1
    xs, ws, _ = _cases.spec_operands(spec, spatial, batch, seed=71 + o)
    poison = [jnp.full((batch, o) + spatial, jnp.nan), jnp.full((batch, o) + spatial + (3,), jnp.nan)]
    jax.block_until_ready(jax.jit(lambda p: [q * 2 for q in p], donate_argnums=0)(poison))

    def run():
        f = jax.jit(jax.vmap(lambda x, ws: kernels.conv_contract(spec, x, ws, backend="triton"), in_axes=(0, None)))
        text = f.lower(xs, ws).as_text()
        assert "ginjax_cuda_forward" in text, "not on the CUDA forward"
        return [np.asarray(y) for y in f(xs, ws)]

    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    twin = run()
    monkeypatch.setenv(_plan.TWIN_ENV, "0")
    assert cuda_entry.geometry(sub, spatial, blocks or cuda.BlockSizes())[25] == 0
    one = run()
    for t, u, w in zip(twin, one, _reference(xs, ws, spec)):
        assert np.all(np.isfinite(t))
        np.testing.assert_array_equal(t, u)
        assert rel_l2(t, w) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_forward_under_compute_sanitizer(tool):
    """The forward's ring under compute-sanitizer (both layouts, the fixture): strips of several
    rows (the y ring slides, each MID leaving the other block's copy in flight), two chunk rounds
    a phase (32 + 32 channels at x 16: the scalar phase waits for its slice before the MID), two
    channel groups (32 + 32 at x 64), a dilated strip, a strip at dilation 8 at x 64 (its
    outputs staged over the vector phase's weights, which each row copies in again), and twin
    rings at x 32 in one and two channel groups; memcheck, racecheck on shared memory and
    synccheck on the barriers."""
    require_compute_sanitizer()
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import jax
        from bench import _cases
        from _conv_cuda_emulate import standard_spec
        from kernels import cuda
        for c, d, spatial, strip in ((16, 1, (2, 5, 16), 5), (32, 1, (2, 5, 16), 3), (32, 1, (1, 4, 64), 4),
                                     (16, 2, (2, 6, 16), 3), (16, 8, (1, 24, 64), 3), (16, 1, (2, 5, 32), 3),
                                     (32, 1, (4, 3, 32), 2)):
            spec = standard_spec(c, 16, d)
            xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=61)
            blocks = cuda.BlockSizes(strip_rows=strip)
            run = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks)))
            jax.block_until_ready(run(xs))
        print("done")
        """
    )
    assert_sanitizer_clean(code, timeout=500, tool=tool)


@pytest.mark.parametrize("dilation, spatial", [(1, (5, 6, 32)), (1, (3, 4, 128)), (2, (4, 6, 64))])
def test_nan_and_inf_reach_exactly_the_tapped_outputs(dilation, spatial):
    """The kernel itself on a NaN (scalar input) and an inf (a vector input's component): non-finite
    exactly at the outputs a nonzero basis tap carries them to, in every output channel, and the
    reference of the clean inputs (tf32) elsewhere; whole rows, x windows (128) and a dilated
    layer. The same check runs on the CPU on the lane emulation (tests/test_conv_contract_cuda.py)."""
    spec = standard_spec(16, 16, dilation)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=23)
    hits, values = _nonfinite.standard_hits(spatial)
    bad, clean = _nonfinite.poison([np.asarray(x[0]) for x in xs], hits, values)
    run = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(spec, x, ws)))
    got = [np.asarray(o[0]) for o in run([jnp.asarray(b)[None] for b in bad])]
    with jax.default_matmul_precision("highest"):
        want = kernels.conv_contract(spec, [jnp.asarray(x) for x in clean], ws, backend="reference")
    _nonfinite.check_nonfinite_exactly_reached(spec, spatial, hits, got, want, kernels.TOLERANCE["tf32"])


@st.composite
def covered_layers(draw):
    """A layer and grid the CUDA forward covers: dilation, x extent (whole rows and x windows),
    y a multiple of the dilation, 16 or 32 inputs and 8 or 16 outputs per key, a strip."""
    d = draw(st.sampled_from([1, 1, 2, 4]))
    spatial = (draw(st.integers(1, 5)), d * draw(st.integers(1, 4)), draw(st.sampled_from([16, 32, 48, 64, 96, 128])))
    spec = standard_spec(draw(st.sampled_from([16, 32])), draw(st.sampled_from([8, 16])), d)
    ok, _ = _plan.coverage(spec, spatial, np.float32)
    assume(ok)
    return spec, spatial, draw(st.integers(1, 2)), draw(st.one_of(st.none(), st.integers(1, 4)))


# the autouse layout fixture is function-scoped on purpose: every drawn example runs in its layout
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
@given(layer=covered_layers(), seed=st.integers(0, 2**31 - 1))
def test_drawn_layers_against_reference(layer, seed):
    """Hypothesis-drawn layers the kernel covers (both layouts, the fixture), against `reference`
    at tf32, every output finite."""
    spec, spatial, batch, strip = layer
    _check(spatial, batch, seed % 1000, None if strip is None else cuda.BlockSizes(strip_rows=strip), spec=spec)


@pytest.mark.parametrize("channels, spatial, strip", [
    ((16, 16), (4, 6, 64), 3),  # the standard layer, strips of several rows (the next row prefetched)
    ((16, 8), (3, 5, 48), 5),  # 8 outputs (one n-tile), x 48
    ((32, 16), (2, 4, 64), 2),  # two channel groups: only the first pass adds the residual
    ((16, 32), (2, 3, 32), 3),  # two output groups: each launch its slice (ginjax_cuda_forward_into_add)
    ((16, 16), (2, 3, 128), 3),  # x windows of 64
])
def test_residuals_added_in_the_epilogue(monkeypatch, channels, spatial, strip):
    """The forward with residuals (forward_kernel<..., kRes = true>, through the triton backend's dispatch:
    `kernels.conv_contract(..., residual=)`): outputs equal `reference` plus the residual, on
    poisoned results too (each element written once, the residual added once); the residual
    arrays unchanged (read, not aliased); a key without one (the scalar key here in half of the
    cases) gets nothing added; gradients in the residual are the cotangent."""
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    spec = standard_spec(*channels)
    xs, ws, _ = _cases.spec_operands(spec, spatial, 2, seed=90 + spatial[2])
    o = channels[1]
    rng = np.random.default_rng(91)
    res = [jnp.asarray(rng.standard_normal((2, o) + spatial), jnp.float32) if spatial[2] != 48 else None,
           jnp.asarray(rng.standard_normal((2, o) + spatial + (3,)), jnp.float32)]
    kept = [None if r is None else np.asarray(r).copy() for r in res]
    run = jax.jit(jax.vmap(lambda x, r: kernels.conv_contract(spec, x, ws, backend="triton", residual=r)))
    text = run.lower(xs, res).as_text()
    assert "ginjax_cuda_forward_add" in text, "the residual did not reach the CUDA forward"
    got = run(xs, res)
    want = _reference(xs, ws, spec)
    for g, w, r, k in zip(got, want, res, kept):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert rel_l2(g, w if r is None else w + r) <= kernels.TOLERANCE["tf32"]
        if r is not None:
            np.testing.assert_array_equal(np.asarray(r), k)
    g_res = jax.grad(lambda r: sum(jnp.sum(jnp.sin(y)) for y in run(xs, r)))(res)
    for g, y, r in zip(g_res, got, res):
        if r is not None:
            assert rel_l2(g, jnp.cos(y)) <= 1e-6


def test_residuals_under_compute_sanitizer():
    """memcheck of the residual kernels: the first row of a strip, the prefetch of the next row
    (its addresses one row on: never past the residual's end, since the last row of a strip
    prefetches nothing), two channel groups, x windows, and one residual key only."""
    require_compute_sanitizer()
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import jax, jax.numpy as jnp
        from bench import _cases
        from _conv_cuda_emulate import standard_spec
        from kernels import cuda
        for c, spatial, strip, keys in ((16, (2, 5, 64), 5, (0, 1)), (32, (1, 4, 64), 4, (1,)), (16, (2, 3, 128), 3, (0,))):
            spec = standard_spec(c, 16)
            xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=62)
            res = (jnp.ones((1, 16) + spatial) if 0 in keys else None, jnp.ones((1, 16) + spatial + (3,)) if 1 in keys else None)
            run = jax.jit(jax.vmap(lambda x, r0, r1: cuda.forward_call(spec, x, ws, residuals=(r0, r1)),
                                   in_axes=(0, 0 if 0 in keys else None, 0 if 1 in keys else None)))
            jax.block_until_ready(run(xs, *res))
        print("done")
        """
    )
    assert_sanitizer_clean(code, timeout=500)


def test_a_resnet_adds_its_residuals_in_the_cuda_forward(monkeypatch):
    """ResNet (preactivation, 16 + 16 channels at 16^3: layers the CUDA forward covers): its
    compiled forward has one `ginjax_cuda_forward_add` per residual block, and its output equals
    the program with GINJAX_CUDA_RESIDUAL=0 (XLA's add after the launch), which has none. The
    backend is `triton` by name: at 16^3 and batch 1 `auto` ranks `dense` first from the measured
    tables, and this test is about the model's residuals reaching the kernel, not that ranking."""
    import ginjax.geometric as geom
    from conftest import filter_bank
    from ginjax import models

    monkeypatch.setenv(kernels._registry.ENV_VAR, "triton")
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv(cuda_entry.RESIDUAL_ENV, raising=False)
    D, N, blocks = 3, 16, 2
    sig = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    model = models.ResNet(D, sig, sig, 16, num_blocks=blocks, conv_filters=filter_bank(D, 3),
                          key=jax.random.PRNGKey(0))
    rng = np.random.default_rng(95)
    x = geom.MultiImage({((), 0): jnp.asarray(rng.standard_normal((1,) + (N,) * D), jnp.float32),
                         ((False,), 0): jnp.asarray(rng.standard_normal((1,) + (N,) * D + (D,)), jnp.float32)}, D, True)

    def compiled():  # traced anew: the switch is read when the call is traced
        return jax.jit(lambda x: model(x)[0]).lower(x).compile()

    fused = compiled()
    assert fused.as_text().count('custom_call_target="ginjax_cuda_forward_add"') == blocks, "a residual missed the kernel"
    monkeypatch.setenv(cuda_entry.RESIDUAL_ENV, "0")
    after = compiled()
    assert "ginjax_cuda_forward_add" not in after.as_text()
    got, want = fused(x), after(x)
    for k in want.keys():
        assert rel_l2(got[k], want[k]) <= 1e-6
