"""Conformance of every backend on this machine (tests/_conformance.py has the rules): the lax
backends run directly, `triton` through Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py without a GPU), `pallas` in interpret mode, any other registered backend (a native
one) as it runs here. Per-backend files keep only what is specific to one backend.

Also: the lax backends reproduce the outputs recorded from ginjax 0.1.8, and the fused backends
cover every recorded stride-1 geometry (so their coverage cannot shrink unnoticed into skips).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import kernels
from _conformance import BACKENDS, CASES, DIRECTIONS, check, operands
from conftest import conv_contract_case, fixture_spec, rel_l2

FUSED = ("triton", "pallas")  # the backends whose documented coverage is "every stride-1 layer"

# Pallas' interpret mode compiles each case's three kernels as large XLA CPU programs: about 23
# CPU seconds per case on 2 cores (case00, measured), 5 minutes for all twelve covered cases.
# By default it runs the standard 3D layer (case09); the other cases are `slow` (tests/test_conv_contract_pallas.py covers their geometries by
# default: the tap kernels on recorded cases, drawn configurations of both algorithms).
# Triton's interpreter: 5-20 CPU seconds a case; by default a 2D case with 2-tensors and a missing
# filter and the standard 3D layer, the others `slow` (test_conv_contract_triton.py's configurations
# run by default).
# `reference` at fp32 is the oracle's own code (run in float64 on every case here) in another
# dtype, and its fp32 forward meets the recorded ginjax outputs of every unbiased case below: its
# rows check the precision plumbing, which the same two cases show.
DEFAULT_CASES = {"pallas": ("case09",), "triton": ("case01", "case09"), "reference": ("case01", "case09")}


def _matrix():
    for backend in BACKENDS:
        for case in CASES:
            slow = backend in DEFAULT_CASES and case not in DEFAULT_CASES[backend]
            yield pytest.param(backend, case, marks=[pytest.mark.slow] if slow else [], id=f"{backend}-{case}")


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("backend, case", list(_matrix()))
def test_backend_matches_reference(backend, case, direction):
    check(backend, case, direction, "fp32")


def _unbiased(case: str) -> bool:
    return not conv_contract_case(case)[0]["use_bias"]


@pytest.mark.parametrize("case", [c for c in CASES if _unbiased(c)])
@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_lax_backends_reproduce_recorded_outputs(backend, case):
    """The recorded ginjax 0.1.8 outputs of the unbiased cases (bias is the layer's job:
    tests/test_conv_contract_layer.py), from the recorded inputs and weights, at fp32."""
    spec, inputs, weights, expected = fixture_spec(*conv_contract_case(case))
    # jitted: the reference backend op by op compiles a program per operation
    outs = jax.jit(lambda xs, ws: kernels.conv_contract(spec, xs, ws, backend=backend, precision="fp32"))(inputs, weights)
    assert len(outs) == len(expected)
    for got, want in zip(outs, expected):
        assert got.shape == want.shape
        assert rel_l2(got, want) <= kernels.TOLERANCE["fp32"]


@pytest.mark.parametrize("backend", FUSED)
def test_fused_coverage_of_the_recorded_cases(backend):
    """Every stride-1 case is covered; the others (stride 2, lhs_dilation 2) fall back to dense
    with a reason that names what is not covered."""
    for case in CASES:
        spec, xs, _, _ = operands(case, None)
        try:
            choice = kernels.explain(spec, [np.zeros(xs[0].shape, np.float32)], backend=backend)
        except ValueError as err:  # cannot run on this machine: the message says why
            pytest.skip(str(err))
        if spec.is_default_stride:
            assert choice.backend == backend, (case, str(choice))
        else:
            assert choice.backend == "dense", (case, str(choice))
            assert "stride" in choice.reason or "lhs_dilation" in choice.reason, (case, choice.reason)
