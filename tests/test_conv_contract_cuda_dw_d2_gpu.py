"""The D = 2 CUDA weight gradient (kernels/cuda/weight_gradient_d2.cu) built and run on a Hopper GPU: dW
against the float64 VJP of `reference` at the tf32 tolerance and the cotangent sums (the bias
gradient) at fp32's, on the standard 2D layer in x windows, odd y extents and short strips, 16 and
32 outputs (one and two m-tiles), one to three channel groups, every dilation; against its
lane-by-lane emulation far tighter (partials included); every partial written (NaN-poisoned
memory); vmap as one launch, two runs bit-identical; NaN and inf reaching exactly their weights;
compute-sanitizer (the `triton` backend's step with all three directions on the CUDA kernels:
tests/test_conv_contract_cuda_d2_gpu.py). Build first
(kernels/cuda/README.md), then on the GPU machine:

    python3 -m pytest -m gpu tests/test_conv_contract_cuda_dw_d2_gpu.py

tests/test_conv_contract_cuda_dw_d2.py runs the kernel's emulation and plan on the CPU.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases
import _nonfinite
from _conv_cuda_dw_emulate import DwEmulator, reference_dw, rel
from _cuda_gpu import GPU_ONLY, pin_2d_kernels, require_compute_sanitizer
from conftest import assert_sanitizer_clean
from kernels import cuda
from kernels.cuda import _dw_plan
from kernels.cuda import weight_gradient as wg
from test_conv_contract_cuda_d2 import SPEC, spec_2d

pytestmark = GPU_ONLY


@pytest.fixture(autouse=True)
def _built(monkeypatch):
    pin_2d_kernels(monkeypatch)
    ok, why = cuda.weight_gradient_coverage(SPEC, (16, 64), jnp.float32)
    if not ok:
        pytest.fail(f"the 2D CUDA weight gradient must be built for these tests: {why}")


def batched(spec, strip=None):
    """Per example dW and sums under vmap (one launch), dW summed over the batch (shared weights)."""
    per = jax.vmap(lambda x, g: wg.weight_gradient_and_sums(spec, x, g, strip=strip))
    return jax.jit(lambda xs, cots: (lambda d, s: ([jnp.sum(a, axis=0) for a in d], s))(*per(xs, cots)))


@pytest.mark.parametrize("channels, spatial, batch, strip, dilation", [
    ((32, 32), (64, 256), 2, None, 1), ((32, 32), (37, 64), 2, None, 1), ((16, 16), (9, 16), 3, 2, 1),
    ((48, 16), (7, 48), 1, 3, 1), ((16, 32), (5, 32), 2, 1, 1), ((32, 16), (12, 128), 1, 5, 1),
    ((16, 16), (6, 96), 2, 4, 1), ((32, 32), (12, 64), 2, 3, 2), ((16, 32), (16, 32), 1, None, 4),
    ((32, 32), (24, 64), 1, 2, 8), ((16, 32), (8, 128), 2, None, 2), ((16, 16), (24, 16), 2, 1, 8)])
def test_against_float64_reference(channels, spatial, batch, strip, dilation):
    """(At d = 8 on a torus of 16 the taps x - 8 and x + 8 coincide, so the odd filters' dW is zero
    and its relative error meaningless: the y extent is 24 there.)"""
    spec = spec_2d(*channels, dilation)
    assert _dw_plan.coverage(spec, spatial, np.float32)[0]
    xs, ws, cots = _cases.spec_operands(spec, spatial, batch, seed=41)
    got, sums = batched(spec, strip)(xs, cots)
    for g, w, want in zip(got, ws, reference_dw(spec, xs, ws, cots)):
        assert g.shape == w.shape and bool(jnp.all(jnp.isfinite(g)))
        assert rel(g, want) <= kernels.TOLERANCE["tf32"]
    for s, cot in zip(sums, cots):  # per example, exact fp32 sums of the staged rows
        want = np.asarray(cot, np.float64).sum(axis=(2, 3))
        assert s.shape == want.shape and rel(s, want) <= kernels.TOLERANCE["fp32"]


@pytest.mark.parametrize("channels, spatial, strip, dilation", [
    ((16, 32), (4, 32), 3, 1), ((32, 32), (3, 64), 2, 1), ((16, 16), (5, 16), 2, 1), ((16, 32), (6, 32), 1, 2),
    ((16, 32), (3, 128), 2, 1)])
def test_matches_its_emulation(channels, spatial, strip, dilation):
    """Kernel and emulation round gY and Z to tf32 alike: ~1e-6 apart (fp32 against fp64
    accumulation), tf32's own error being ~3e-4; the per-CTA partials each against the
    emulation's, after NaN-poisoned memory (every partial written)."""
    spec = spec_2d(*channels, dilation)
    xs, _, cots = _cases.spec_operands(spec, spatial, 1, seed=42)
    strips, nz, groups = _dw_plan.grid(spec, spatial, strip)
    shape = (groups * nz * strips, _dw_plan.layout(spec, spatial[1]).result_floats)
    jax.block_until_ready(jax.jit(lambda p: p * 2, donate_argnums=0)(jnp.full(shape, jnp.nan)))
    parts = jax.jit(lambda x, g: wg.partials(spec, x, g, strip))([x[0] for x in xs], [c[0] for c in cots])
    assert parts.shape == shape and bool(jnp.all(jnp.isfinite(parts)))
    got = wg.weight_gradient_call(spec, [x[0] for x in xs], [c[0] for c in cots], strip=strip)
    dws, want_parts = DwEmulator(spec, *(np.asarray(a) for a in xs + cots), strip, planar=True).run()
    assert rel(parts, want_parts[0]) <= 2e-5
    for g, w in zip(got, dws):
        assert rel(g, w[0]) <= 2e-5


def test_vmap_is_one_launch_per_example_and_deterministic():
    xs, _, cots = _cases.spec_operands(SPEC, (6, 64), 3, seed=43)
    per = jax.jit(jax.vmap(lambda x, g: wg.weight_gradient_call(SPEC, x, g)))
    assert per.lower(xs, cots).as_text().count("ginjax_cuda_weight_gradient_2d") == 1
    got, again = per(xs, cots), per(xs, cots)
    one = jax.jit(lambda x, g: wg.weight_gradient_call(SPEC, x, g))
    for b in range(3):
        for g, s in zip(got, one([x[b] for x in xs], [c[b] for c in cots])):
            np.testing.assert_allclose(np.asarray(g[b]), np.asarray(s), rtol=1e-6, atol=1e-6)
    for g, h in zip(got, again):
        assert np.array_equal(np.asarray(g), np.asarray(h))


@pytest.mark.parametrize("dilation, spatial", [(1, (8, 64)), (2, (8, 32))])
def test_nan_and_inf_reach_exactly_their_weights(dilation, spatial):
    """A canonical NaN (scalar input), an inf (vector component 1) and a NaN in a vector cotangent of
    the second m-tile (output 20): dW non-finite exactly where `_nonfinite.reached_weights` says."""
    spec = spec_2d(16, 32, dilation)
    xs, ws, cots = _cases.spec_operands(spec, spatial, 1, seed=44)
    hits, g_hits, bad, clean, bad_g, clean_g = _nonfinite.poison_weight_gradient_operands(
        [np.asarray(x[0]) for x in xs], [np.asarray(c[0]) for c in cots], spatial, cotangent_channel=20)
    got = wg.weight_gradient_call(spec, [jnp.asarray(b) for b in bad], [jnp.asarray(g) for g in bad_g], strip=2)
    want = reference_dw(spec, [c[None] for c in clean], ws, [jnp.asarray(g)[None] for g in clean_g])
    _nonfinite.check_weights_nonfinite_exactly_reached(spec, hits, got, want, kernels.TOLERANCE["tf32"],
                                                       cotangent_hits=g_hits)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_2d_weight_gradient_under_compute_sanitizer(tool):
    """Strips of several rows, x windows at both ends of a row, two channel groups, 16 and 32 outputs
    (the reduction past the ring), rows of 48, dilation 8 whole rows and dilation 2 in windows."""
    require_compute_sanitizer()
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests")
        import jax
        from bench import _cases
        from test_conv_contract_cuda_d2 import spec_2d
        from kernels.cuda import weight_gradient as wg
        for c, o, d, spatial, strip in ((32, 32, 1, (5, 128), 3), (16, 16, 1, (4, 16), 2), (16, 32, 8, (16, 64), 1),
                                        (32, 16, 2, (6, 64), 2), (16, 32, 2, (4, 128), 1), (16, 16, 1, (3, 48), 2)):
            spec = spec_2d(c, o, d)
            xs, _, cots = _cases.spec_operands(spec, spatial, 2, seed=46)
            run = jax.jit(jax.vmap(lambda x, g: wg.weight_gradient_and_sums(spec, x, g, strip=strip)))
            jax.block_until_ready(run(xs, cots))
        print("done")
        """
    )
    assert_sanitizer_clean(code, timeout=400, tool=tool)  # the fixture's planar layout is in os.environ
