"""The D = 2 CUDA forward (kernels/cuda/conv_contract_d2.cu) built and run on a Hopper GPU, against
`reference` at the tf32 tolerance: the standard 2D layer's rows in x windows, whole rows of 16 .. 64
pixels on odd y extents and short strips, 16 and 32 output channels, 16 .. 48 input channels (one to
three chunk rounds a warp half), every dilation, channel-group passes (64 + 64 and 128 + 128 inputs); poisoned outputs (every element written); vmap as
one launch with the bias offsets of each example; the `triton` backend's step with the forward and
the input gradient on the kernel (a layer of 64 outputs as two launches of 32, its input gradient in
two channel groups, and a dilated one;
its weight gradient on weight_gradient_d2.cu's kernel, tests/test_conv_contract_cuda_dw_d2_gpu.py);
compute-sanitizer. Build first (kernels/cuda/README.md), then on the
GPU machine:

    python3 -m pytest -m gpu tests/test_conv_contract_cuda_d2_gpu.py

The CPU run emulates the kernel lane by lane (tests/_conv_cuda_emulate.py's Emulator, D-generic:
tests/test_conv_contract_cuda_d2.py, against `reference`); these tests run the compiled kernel.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases
from _cuda_gpu import GPU_ONLY, pin_2d_kernels, require_compute_sanitizer
from conftest import assert_sanitizer_clean, rel_l2
from kernels import cuda
from kernels.cuda import _plan
from test_conv_contract_cuda_d2 import SPEC, spec_2d
from test_conv_contract_cuda_gpu import _reference

pytestmark = GPU_ONLY


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    pin_2d_kernels(monkeypatch)
    ok, why = cuda.availability()
    if not ok:
        pytest.fail(f"the CUDA kernel must be built for these tests: {why}")


def _check(spec, spatial, batch, seed, strip=None):
    xs, ws, _ = _cases.spec_operands(spec, spatial, batch, seed=seed)
    blocks = None if strip is None else cuda.BlockSizes(strip_rows=strip)
    run = jax.jit(jax.vmap(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks), in_axes=(0, None)))
    hlo = run.lower(xs, ws).as_text()
    assert hlo.count("ginjax_cuda_forward_2d") == 1, "one launch of the 2D kernel for the batch"
    for g, w in zip(run(xs, ws), _reference(xs, ws, spec)):
        assert g.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(g))), "non-finite output: an unwritten or corrupted element"
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


def test_standard_2d_layer_in_x_windows():
    _check(SPEC, (64, 256), 2, seed=1)


@pytest.mark.parametrize("channels, spatial, batch, strip", [
    ((32, 32), (37, 64), 2, None), ((16, 16), (9, 16), 3, 2), ((48, 16), (7, 48), 1, 3), ((16, 32), (5, 32), 2, 1),
    ((32, 16), (12, 128), 1, 5), ((16, 32), (6, 96), 2, 4),
])
def test_grids_strips_and_widths(channels, spatial, batch, strip):
    _check(spec_2d(*channels), spatial, batch, seed=2, strip=strip)


@pytest.mark.parametrize("dilation, spatial, strip", [(2, (12, 64), 3), (4, (16, 32), None), (8, (24, 64), 2),
                                                      (2, (8, 128), None), (8, (16, 16), 1)])
def test_dilated_layers(dilation, spatial, strip):
    _check(spec_2d(32, 32, dilation), spatial, 2, seed=3, strip=strip)


@pytest.mark.parametrize("channels, spatial, batch, strip", [
    ((64, 32), (9, 64), 2, 4),  # 64 + 64 inputs at x 64 (341 KB in one group): two passes
    ((64, 16), (5, 128), 1, None),  # in x windows of 64
    ((128, 32), (4, 32), 2, 3),  # the UNet's 32^2 level: 128 + 128 inputs
])
def test_channel_group_passes(channels, spatial, batch, strip):
    """Where one group's ring does not fit, the kernel passes over the strip once per channel group
    (the later passes adding to what the first stored); `_plan.groups` says how many."""
    spec = spec_2d(*channels)
    assert _plan.groups(spec, spatial[1]) > 1
    _check(spec, spatial, batch, seed=8, strip=strip)


def test_outputs_are_fully_written():
    """Fresh output buffers: a donated NaN-filled buffer of the same size first, so a skipped
    element shows up as NaN."""
    xs, ws, _ = _cases.spec_operands(SPEC, (6, 96), 2, seed=4)
    poison = [jnp.full((2, 32, 6, 96), jnp.nan), jnp.full((2, 32, 6, 96, 2), jnp.nan)]
    jax.block_until_ready(jax.jit(lambda p: [q * 2 for q in p], donate_argnums=0)(poison))
    got = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(SPEC, x, ws)))(xs)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)


@pytest.mark.parametrize("spec, spatial", [(SPEC, (10, 64)), (SPEC, (6, 16)), (spec_2d(64, 32), (6, 64))],
                         ids=["x64", "x16", "two-channel-groups"])
def test_bias_offsets_per_example(spec, spatial):
    """forward_call's offsets (each example its own, as the 'mean' bias gives) added in the epilogue;
    at x 16 a CTA's 64 threads copy the 96 offsets of 32 outputs in two rounds; with two channel
    groups only the first pass adds them."""
    xs, ws, _ = _cases.spec_operands(spec, spatial, 3, seed=5)
    rng = np.random.default_rng(5)
    offs = (jnp.asarray(rng.standard_normal((3, 32)), jnp.float32), jnp.asarray(rng.standard_normal((3, 32, 2)), jnp.float32))
    got = jax.jit(jax.vmap(lambda x, off: cuda.forward_call(spec, x, ws, off)))(xs, offs)
    want = _reference(xs, ws, spec)
    assert rel_l2(got[0], want[0] + offs[0][:, :, None, None]) <= kernels.TOLERANCE["tf32"]
    assert rel_l2(got[1], want[1] + offs[1][:, :, None, None, :]) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("spec, spatial, launches, dw_launches", [
    (spec_2d(32, 64), (8, 64), 3, 2), (spec_2d(32, 32, 2), (8, 128), 2, 1), (SPEC, (16, 64), 2, 1)],
    ids=["two-groups", "dilated", "standard"])
def test_triton_backend_step_on_the_2d_kernel(monkeypatch, spec, spatial, launches, dw_launches):
    """value_and_grad of a vmapped, biased `triton` layer: the forward and the input gradient on the
    2D kernel where it covers them (`launches` custom calls: for 64 outputs the forward's two output
    groups of 32, the second an `_into` launch, and the input gradient, 64 + 64 inputs whose ring
    and weights need 312 KB in one channel group, one launch in two channel-group passes), and the weight gradient
    (the biases' from its cotangent sums) on weight_gradient_d2.cu's in `dw_launches` (64 outputs:
    two output groups of 32 reading the cotangents in place); value and gradients (inputs, weights,
    biases) against `reference`."""
    from kernels.triton.conv_contract import conv_contract_triton

    for env in ("GINJAX_TRITON_FORWARD", "GINJAX_TRITON_WEIGHT_GRAD"):
        monkeypatch.delenv(env, raising=False)
    o = spec.out_keys[0][2]
    xs, ws, cots = _cases.spec_operands(spec, spatial, 2, seed=6)
    rng = np.random.default_rng(6)
    offs = (jnp.asarray(rng.standard_normal((o,)), jnp.float32), jnp.asarray(rng.standard_normal((o, 2)), jnp.float32))
    run = jax.vmap(lambda x, ws, offs: conv_contract_triton(spec, x, ws, offsets=offs), in_axes=(0, None, None))

    def ref(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference"))(xs)
        return outs[0] + offs[0][None, :, None, None], outs[1] + offs[1][None, :, None, None, :]

    def loss(fn, *args):
        return sum(jnp.vdot(out, ct) for out, ct in zip(fn(*args), cots))

    step = jax.jit(jax.value_and_grad(lambda *a: loss(run, *a), argnums=(0, 1, 2)))
    hlo = step.lower(xs, ws, offs).as_text()
    assert hlo.count("ginjax_cuda_forward_2d") == launches, hlo[-2000:]
    assert hlo.count("ginjax_cuda_weight_gradient_2d") == dw_launches, hlo[-2000:]
    with jax.default_matmul_precision("highest"):
        want = jax.value_and_grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(xs, ws, offs)
    got = step(xs, ws, offs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_2d_forward_under_compute_sanitizer(tool):
    """Strips of several rows (the ring slides), x windows at both ends of a row, two chunk rounds
    a phase (32 + 32 channels), 32 outputs, dilation 8 whole rows and dilation 2 in windows, two
    channel-group passes (64 + 64 channels)."""
    require_compute_sanitizer()
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import jax
        from bench import _cases
        from test_conv_contract_cuda_d2 import spec_2d
        from kernels import cuda
        for c, o, d, spatial, strip in ((32, 32, 1, (5, 128), 3), (16, 16, 1, (4, 16), 2), (16, 32, 8, (16, 64), 1),
                                        (32, 16, 2, (6, 64), 2), (16, 16, 2, (4, 128), 1), (64, 32, 1, (5, 64), 2)):
            spec = spec_2d(c, o, d)
            xs, ws, _ = _cases.spec_operands(spec, spatial, 1, seed=7)
            blocks = cuda.BlockSizes(strip_rows=strip)
            run = jax.jit(jax.vmap(lambda x: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks)))
            jax.block_until_ready(run(xs))
        print("done")
        """
    )
    assert_sanitizer_clean(code, timeout=400, tool=tool)  # the fixture's planar layout is in os.environ
