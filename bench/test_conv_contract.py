"""ConvContract benchmarks: every standard layer config x mode x backend (`pytest bench/`).

Ids are `[quick-]{config}-{mode}-{backend}` and the pytest-benchmark group is `{config}-{mode}`;
tooling (`python -m bench`, `compare`) reads these names. See bench/_configs.py for the configs.
"""

from __future__ import annotations

import pytest

import kernels

from bench import _configs, _harness

CASES = [
    pytest.param(case, id=case_id)
    for case, case_id in _configs.cases(_configs.LAYER_CONFIGS, _configs.bench_backends())
]


@pytest.mark.parametrize("case", CASES)
def test_conv_contract(benchmark, bench_options, case):
    cfg_name, mode, backend = case
    _harness.run_benchmark(benchmark, _configs.CONFIGS[cfg_name], mode, backend, bench_options)
