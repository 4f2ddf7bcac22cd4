"""The benchmark cases (`pytest bench/`): every layer config x mode x backend, and every model
train step x backend (value_and_grad of an MSE loss; the backend applies to every ConvContract of
the model through `kernels.use_backend`, layers it does not cover fall back to dense).

Ids are `[quick-]{config}-{mode}-{backend}` and the pytest-benchmark group is `{config}-{mode}`;
tooling (`python -m bench`, `compare`) reads these names. See bench/_configs.py for the configs.
"""

from __future__ import annotations

import pytest

from bench import _configs, _harness


def _params(configs):
    return [pytest.param(case, id=case_id) for case, case_id in _configs.cases(configs, _configs.bench_backends())]


def _run(benchmark, bench_options, case):
    cfg_name, mode, backend = case
    _harness.run_benchmark(benchmark, _configs.CONFIGS[cfg_name], mode, backend, bench_options)


@pytest.mark.parametrize("case", _params(_configs.LAYER_CONFIGS))
def test_conv_contract(benchmark, bench_options, case):
    _run(benchmark, bench_options, case)


@pytest.mark.parametrize("case", _params(_configs.MODEL_CONFIGS))
def test_model_step(benchmark, bench_options, case):
    _run(benchmark, bench_options, case)
