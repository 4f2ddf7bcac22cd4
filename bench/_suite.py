"""Running the pytest-benchmark suite in-process and reading its JSON back: the engine behind
`python -m bench` and `python -m bench compare`. No jax import at module level.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pathlib
import signal
import subprocess
import threading
from typing import Iterable, Optional, Sequence

BENCH_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
COMMIT_ENV = "BENCH_COMMIT"
MIB = float(1 << 20)


def resolve_commit(explicit: Optional[str] = None) -> str:
    """The commit to record: the flag, then $BENCH_COMMIT, then `git rev-parse`, then 'unknown'.

    The GPU machine's copy of the tree may have no .git (or no git): never fail on that.
    """
    if explicit:
        return str(explicit)
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, cwd=BENCH_DIR
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else "unknown"


OUT_ENV = "GINJAX_BENCH_OUT"


def default_out_dir() -> pathlib.Path:
    """Where results go without --out: $GINJAX_BENCH_OUT, else ~/.cache/ginjax-bench (kept, and
    outside the source tree so that a plain run never adds files to the repository)."""
    if os.environ.get(OUT_ENV):
        return pathlib.Path(os.environ[OUT_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "ginjax-bench"


def cases_path(json_path) -> pathlib.Path:
    """Where the suite appends each finished case as it ends (`_harness.record_case`): what is
    left of a run killed before pytest-benchmark wrote `json_path`."""
    return pathlib.Path(str(json_path) + ".cases.jsonl")


def result_paths(root: pathlib.Path, device_slug: str, commit: str, when: Optional[_dt.datetime] = None,
                 tag: str = "") -> dict:
    """Free `<root>/<device-slug>/<date>-<commit>[-<tag>][-n].{json,png,txt}` paths (n from 2 on clashes)."""
    when = when or _dt.datetime.now(_dt.timezone.utc)
    folder = pathlib.Path(root) / device_slug
    stem = f"{when:%Y-%m-%d}-{commit}" + (f"-{tag}" if tag else "")
    n = 1
    while (folder / f"{stem}.json").exists() if n == 1 else (folder / f"{stem}-{n}.json").exists():
        n += 1
    if n > 1:
        stem = f"{stem}-{n}"
    return {ext: folder / f"{stem}.{ext}" for ext in ("json", "png", "txt")}


class _SkipRecorder:
    """A pytest plugin that keeps (test id, reason) of every skipped case, for the final report."""

    def __init__(self, into: list):
        self.into = into

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.into.append((report.nodeid.split("::")[-1], reason.removeprefix("Skipped: ")))


def run_suite(
    *,
    configs: Sequence[str],
    backends: Sequence[str],
    modes: Sequence[str],
    json_path: pathlib.Path,
    commit: str,
    max_time: float,
    min_rounds: int,
    warmup: int,
    exclude: str = "",
    time_budget: float = 0.0,
    extra_args: Iterable[str] = (),
    skipped: Optional[list] = None,
    check: bool = True,
    operand_layouts: str = "row-major",
) -> int:
    """Run the selected benchmarks with pytest-benchmark in this process; returns pytest's exit code.

    pytest-benchmark's own tables stay quiet (the caller prints the one table); `skipped`, when
    given, receives (test id, reason) of every case that was skipped.
    """
    import pytest

    args = [
        str(BENCH_DIR / "test_suite.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "--bench-progress",
        f"--rootdir={BENCH_DIR.parent}",
        f"--bench-configs={','.join(configs)}",
        f"--bench-backends={','.join(backends)}",
        f"--bench-modes={','.join(modes)}",
        f"--bench-warmup={warmup}",
        f"--bench-exclude={exclude}",
        f"--bench-time-budget={time_budget}",
        f"--bench-commit={commit}",
        f"--benchmark-json={json_path}",
        f"--bench-cases={cases_path(json_path)}",
        f"--benchmark-max-time={max_time}",
        f"--benchmark-min-rounds={min_rounds}",
        "--benchmark-quiet",
        *([] if check else ["--bench-no-check"]),
        f"--bench-operand-layouts={operand_layouts}",
        *extra_args,
    ]
    pathlib.Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    cases_path(json_path).unlink(missing_ok=True)
    plugins = [_SkipRecorder(skipped)] if skipped is not None else []
    # Under a pytest-xdist worker (the tests run `python -m bench` in a subprocess) the inherited
    # PYTEST_XDIST_WORKER makes pytest-benchmark disable itself: this run is not distributed.
    xdist_env = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PYTEST_XDIST_")}
    try:
        with _terminate_as_interrupt():
            rc = int(pytest.main(args, plugins=plugins))
        if pathlib.Path(json_path).exists() and pathlib.Path(json_path).stat().st_size:
            cases_path(json_path).unlink(missing_ok=True)  # the JSON holds every case
        return rc
    finally:
        os.environ.update(xdist_env)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (what `timeout` sends) raises KeyboardInterrupt while the suite runs: pytest then
    ends the session as interrupted and pytest-benchmark still writes the cases that finished,
    where the default action would kill the process and lose every result. (Main thread only:
    elsewhere signal handlers cannot be set, and the default stays.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- reading results ---------------------------------------------------------------------------
def load_results(path) -> dict:
    """A pytest-benchmark JSON file; ValueError (naming the file) when it is not one."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"results file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"results file {str(path)!r} is not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"results file {str(path)!r} is not pytest-benchmark JSON (no 'benchmarks' list)")
    return data


_BACKEND_ORDER = ("reference", "dense", "triton", "pallas", "auto")


def backend_order(name: str) -> tuple:
    """Sort key: the oracle and the lax baseline first, then the fused kernels, then the rest."""
    return (_BACKEND_ORDER.index(name), "") if name in _BACKEND_ORDER else (len(_BACKEND_ORDER), name)


def _speedup(numer: Optional[float], denom: Optional[float]) -> Optional[float]:
    if numer is None or denom is None or denom <= 0:
        return None
    return numer / denom


def table_rows(results: dict) -> list[dict]:
    """One row per benchmark, with speedups vs reference and dense of the same (config, mode)."""
    from bench import _configs

    device_kind = results.get("machine_info", {}).get("device_kind", "")
    medians: dict = {}
    rows = []
    for bench in results["benchmarks"]:
        info = bench.get("extra_info", {})
        stats = bench.get("stats", {})
        median = info.get("median_s", stats.get("median"))
        row = {
            "name": bench.get("name"),
            "config": info.get("config", bench.get("group", "?")),
            "mode": info.get("mode", "?"),
            "backend": info.get("backend", "?"),
            "pixels": info.get("pixels"),
            "D": info.get("D"),
            "median_s": median,
            "p20_s": info.get("p20_s"),
            "p80_s": info.get("p80_s"),
            "gflop": info.get("gflop"),
            "temp_bytes": info.get("temp_bytes"),
            "rel_err": info.get("rel_err_vs_reference"),
            "precision": info.get("precision", ""),
        }
        row["tflops"] = (row["gflop"] / 1e3 / median) if row["gflop"] and median else None
        peak = _configs.peak_tflops(info.get("device_kind", device_kind), row["precision"])
        row["pct_peak"] = 100.0 * row["tflops"] / peak if peak and row["tflops"] else None
        medians[(row["config"], row["mode"], row["backend"])] = median
        rows.append(row)
    for row in rows:
        row["vs_reference"] = _speedup(medians.get((row["config"], row["mode"], "reference")), row["median_s"])
        row["vs_dense"] = _speedup(medians.get((row["config"], row["mode"], "dense")), row["median_s"])
    order = {name: i for i, name in enumerate(_configs.CONFIGS)}
    mode_order = {m: i for i, m in enumerate(_configs.MODES)}
    rows.sort(key=lambda r: (order.get(r["config"], len(order)), mode_order.get(r["mode"], 9), backend_order(r["backend"])))
    return rows


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """A Markdown table (pastes into README as is)."""
    header = [
        "config", "mode", "backend", "median ms", "p20-p80 ms", "vs reference", "vs dense",
        "TFLOP/s", "% peak", "temp MB", "rel err",
    ]
    lines = []
    for r in rows:
        spread = (
            f"{r['p20_s'] * 1e3:.3g}-{r['p80_s'] * 1e3:.3g}" if r["p20_s"] is not None and r["p80_s"] is not None else "-"
        )
        lines.append([
            r["config"],
            r["mode"],
            r["backend"],
            _fmt(r["median_s"] * 1e3 if r["median_s"] is not None else None, ".3f"),
            spread,
            _fmt(r["vs_reference"], ".2f") + ("x" if r["vs_reference"] is not None else ""),
            _fmt(r["vs_dense"], ".2f") + ("x" if r["vs_dense"] is not None else ""),
            _fmt(r["tflops"], ".1f" if (r["tflops"] or 0) >= 10 else ".3g"),
            _fmt(r["pct_peak"], ".0f"),
            _fmt(r["temp_bytes"] / MIB if r["temp_bytes"] is not None else None, ".0f"),
            _fmt(r["rel_err"], ".1e"),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    def render(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [render(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(render(l) for l in lines)
    return "\n".join(out)


def describe_run(results: dict) -> str:
    """One line: device, precision, jax versions, commit, date."""
    m = results.get("machine_info", {})
    c = results.get("commit_info", {})
    # on a CPU, JAX's default matmul precision is full fp32: there is no TF32 to speak of
    precision = "fp32 (CPU)" if m.get("platform") == "cpu" else m.get("precision", "?")
    return (
        f"device: {m.get('device_kind', '?')} ({m.get('platform', '?')}), default precision "
        f"{precision}, jax {m.get('jax_version', '?')} / jaxlib {m.get('jaxlib_version', '?')}, "
        f"commit {c.get('id', 'unknown')}, {results.get('datetime', '?')}"
        + (f"; CUDA kernels: {m['cuda_kernels']}" if m.get("cuda_kernels") else "")
        + (f"; VectorNeuron: {m['vector_neuron']}" if m.get("vector_neuron") else "")
    )


def add_timing_args(p, *, max_time: float = 1.0, warmup: bool = True, budget_help: str = "") -> None:
    """The timing options every bench command shares, on argparse parser `p`."""
    p.add_argument("--max-time", type=float, default=max_time, help=f"seconds of timed calls per benchmark (default {max_time})")
    p.add_argument("--min-rounds", type=int, default=5, help="at least this many timed calls (default 5)")
    if warmup:
        p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing, after the first call (default 1)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help=budget_help or "seconds; cases that would start later are skipped, so the run ends with its results (0: no limit)")


def check_timing_args(p, args) -> None:
    """`p.error` (exit 2, naming the option and its value) on a timing option out of range."""
    checks = [("--max-time", args.max_time, args.max_time > 0, "> 0"),
              ("--min-rounds", args.min_rounds, args.min_rounds >= 1, ">= 1"),
              ("--warmup", getattr(args, "warmup", 0), getattr(args, "warmup", 0) >= 0, ">= 0"),
              ("--time-budget", args.time_budget, args.time_budget >= 0, ">= 0")]
    for name, value, ok, rule in checks:
        if not ok:
            p.error(f"{name} (={value}) must be {rule}")
