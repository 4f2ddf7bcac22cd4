"""The conformance matrix of tests/_conformance.py on the GPU (run on the GPU machine:
`python3 -m pytest -m gpu tests/test_conformance_gpu.py`): every backend that runs there, every
recorded case, forward and both gradients, batched under jax.vmap (batch 2), in fp32 and in tf32
(JAX's default on the GPU), against the float64 `reference`.

Unwritten outputs: nothing poisons the outputs on this public path; every run scales its
operands by its own power of two (_conformance._scale), so a stale buffer of another run fails
the comparison, and the per-backend GPU files run the kernels on poisoned outputs.
"""

from __future__ import annotations

import jax
import pytest

from _conformance import BACKENDS, CASES, DIRECTIONS, check

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("mode", ["fp32", "tf32"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference_on_the_gpu(backend, case, direction, mode):
    check(backend, case, direction, mode, batch=2)
