"""pytest options and hooks of the benchmark suite (`pytest bench/`).

Selection: --bench-configs (names or sets quick/full/all/layers/models; default 'auto' = quick on
CPU, all elsewhere), --bench-backends (default: every registered backend; those that cannot run
here are skipped with the registry's reason), --bench-modes. Timing: pytest-benchmark's own
--benchmark-max-time / --benchmark-min-rounds, plus --bench-warmup calls before timing.
--benchmark-disable turns the suite into a correctness check (one call per case, rel err asserted).
"""

from __future__ import annotations

import fnmatch
import os
import sys
import time

import pytest

from bench import _configs, _timing
from bench._suite import COMMIT_ENV

BASELINE_BACKENDS = ("reference", "dense")


def pytest_addoption(parser):
    group = parser.getgroup("bench", "ConvContract benchmarks (bench/)")
    group.addoption("--bench-configs", default="auto", help="comma-separated config names or sets (quick, full, all, layers, models, small-models); 'auto': quick on CPU, all on GPU")
    group.addoption("--bench-backends", default="", help="comma-separated backends (default: all registered)")
    group.addoption("--bench-modes", default="", help=f"comma-separated modes out of {', '.join(_configs.MODES)}")
    group.addoption("--bench-warmup", type=int, default=1, help="untimed calls of each compiled executable before timing")
    group.addoption("--bench-exclude", default="", help="comma-separated fnmatch patterns of '{config}-{mode}-{backend}' to leave out")
    group.addoption("--bench-time-budget", type=float, default=0.0, help="seconds; cases starting later are skipped (0: no limit)")
    group.addoption("--bench-progress", action="store_true", help="log each phase of each case to stderr")
    group.addoption("--bench-cases", default="", help="append one JSON line per finished case to this file")
    group.addoption("--bench-no-check", action="store_true", help="time only: no error against the reference oracle (saves compiling and running it)")
    group.addoption("--bench-operand-layouts", default="row-major", choices=_timing.OPERAND_LAYOUTS,
                    help="arguments and results row-major, or in the layouts XLA picks (auto)")
    group.addoption("--bench-commit", default=None, help=f"commit id to record (default: ${COMMIT_ENV}, else git)")


def pytest_configure(config):
    # a case skipped before timing (backend unavailable, model missing) never touches the fixture
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")


def _platform() -> str:
    import jax

    return jax.default_backend()


def _selection(config) -> tuple[set, set, set]:
    import kernels

    try:
        configs = set(_configs.select_configs(config.getoption("--bench-configs"), _platform()))
        backends = set(
            _configs.parse_selection(
                config.getoption("--bench-backends") or ",".join(kernels.registered_backends()),
                _configs.bench_backends(),
                "--bench-backends",
            )
        )
        modes = set(_configs.parse_selection(config.getoption("--bench-modes"), _configs.MODES, "--bench-modes"))
    except ValueError as err:
        raise pytest.UsageError(str(err).replace("--configs", "--bench-configs")) from None
    if config.getoption("--bench-warmup") < 0:
        raise pytest.UsageError(f"--bench-warmup (={config.getoption('--bench-warmup')}) must be >= 0")
    if config.getoption("--bench-time-budget") < 0:
        raise pytest.UsageError(f"--bench-time-budget (={config.getoption('--bench-time-budget')}) must be >= 0")
    return configs, backends, modes


def pytest_collection_modifyitems(config, items):
    """Deselect the cases outside --bench-configs/--bench-backends/--bench-modes."""
    configs, backends, modes = _selection(config)
    excluded = [p.strip() for p in config.getoption("--bench-exclude").split(",") if p.strip()]
    keep, drop = [], []
    for item in items:
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        if case is None:
            keep.append(item)
            continue
        cfg_name, mode, backend = case
        chosen = cfg_name in configs and mode in modes and backend in backends
        if any(fnmatch.fnmatchcase(f"{cfg_name}-{mode}-{backend}", p) for p in excluded):
            chosen = False
        (keep if chosen else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    # layers before model steps (seconds each); layers: reference and dense first, then the fused
    # kernels, so under --bench-time-budget the layer A/B completes; model steps: each config's
    # backends together, so a budget cut leaves whole comparisons (the sort is stable)
    keep.sort(key=lambda item: _tier(item))
    items[:] = keep


def _tier(item) -> tuple[int, int]:
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if case is None:
        return (0, 0)
    cfg = _configs.CONFIGS.get(case[0])
    if cfg is not None and cfg.kind == "model":
        return (1, 0)
    return (0, int(case[2] not in BASELINE_BACKENDS))


@pytest.fixture(scope="session")
def bench_options(request) -> dict:
    config = request.config
    budget = float(config.getoption("--bench-time-budget"))
    return {
        "max_time": float(config.getoption("benchmark_max_time", 1.0) or 1.0),
        "min_rounds": int(config.getoption("benchmark_min_rounds", 5) or 5),
        "warmup": int(config.getoption("--bench-warmup")),
        "check": not config.getoption("--bench-no-check"),
        "operand_layouts": config.getoption("--bench-operand-layouts"),
        "deadline": time.monotonic() + budget if budget > 0 else None,
        "log": _progress_log(config) if config.getoption("--bench-progress") else None,
        "cases_path": config.getoption("--bench-cases") or None,
    }


def _progress_log(config):
    capture = config.pluginmanager.getplugin("capturemanager")

    def log(message: str) -> None:
        with capture.global_and_fixture_disabled():
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    return log


def pytest_benchmark_update_machine_info(config, machine_info):
    from bench import _device

    machine_info.update(_device.device_info())


def pytest_benchmark_update_commit_info(config, commit_info):
    explicit = config.getoption("--bench-commit") or os.environ.get(COMMIT_ENV)
    if explicit:
        commit_info["id"] = explicit
        commit_info.pop("error", None)
    elif not commit_info.get("id"):
        commit_info["id"] = "unknown"
