"""Model training-step benchmarks (value_and_grad of an MSE loss): UNet, ResNet, DilResNet.

Each case skips, with the reason, while ginjax.models lacks the model. The backend is applied to
every ConvContract of the model through `kernels.use_backend` (layers it does not cover fall back
to dense). Ids are `[quick-]{config}-step-{backend}`, the group `{config}-step`.
"""

from __future__ import annotations

import pytest

import kernels

from bench import _configs, _harness

CASES = [
    pytest.param(case, id=case_id)
    for case, case_id in _configs.cases(_configs.MODEL_CONFIGS, _configs.bench_backends())
]


@pytest.mark.parametrize("case", CASES)
def test_model_step(benchmark, bench_options, case):
    cfg_name, mode, backend = case
    _harness.run_benchmark(benchmark, _configs.CONFIGS[cfg_name], mode, backend, bench_options)
