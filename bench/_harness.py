"""pytest glue of the benchmark suite: one benchmark = build the case, compile it for a backend,
check it against the oracle, time it with pytest-benchmark through the shared loop
(bench/_timing.py), and fill the benchmark's `extra_info`.

The parts live by concern: _device (device info), _cases (case building), _flops (FLOP and byte
counts), _errors (error metrics), _timing (compiling and the timing loop).
"""

from __future__ import annotations

import json
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import kernels

from ._cases import cached_case
from ._configs import Config, LayerConfig, group_name
from ._device import device_info
from ._errors import rel_err_detail
from ._timing import compile_for, memory_of, place, time_compiled

# Oracle results stay cached for the whole session, like the cases (see _cases.cached_case).
_ORACLES: dict = {}


def oracle_precision(cfg: Config) -> Optional[str]:
    """'highest' for layers. Models use the reference backend at the default precision: compiling
    a whole model twice more costs minutes on the GPU, and through 16 layers the error is set by
    the TF32 arithmetic of the backend under test, not by the oracle's."""
    return "highest" if cfg.kind == "layer" else None


def oracle_result(case, mode: str):
    """The `reference` backend's result on the case's inputs at `oracle_precision`, cached."""
    key = (case.cfg.name, mode)
    if key not in _ORACLES:
        fn, args = case.function(mode)
        compiled = compile_for(fn, args, "reference", precision=oracle_precision(case.cfg))
        _ORACLES[key] = jax.block_until_ready(compiled(*args))
    return _ORACLES[key]


_SIZES: dict = {}


def _case_sizes(case, mode: str) -> tuple[float, int]:
    """(gflop, io_bytes), cached: for a model both trace the whole forward pass."""
    key = (case.cfg.name, mode)
    if key not in _SIZES:
        _SIZES[key] = (case.gflop(mode), case.io_bytes())
    return _SIZES[key]


def progress(options: dict, message: str) -> None:
    """With --bench-progress, one line per phase, shown past pytest's output capture."""
    log = options.get("log")
    if log is not None:
        log(f"[bench {time.strftime('%H:%M:%S')}] {message}")


def record_case(options: dict, label: str, extra: dict) -> None:
    """One JSON line per finished case in options["cases_path"] (where set), written as the case
    ends: pytest-benchmark writes its JSON only when the session ends, and a process killed
    without it (a SIGTERM that lands while the main thread sits in native code, such as a long
    kernel compile on the GPU) would lose every case that did finish."""
    path = options.get("cases_path")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"name": label, **extra}, default=str) + "\n")


def _pytest_benchmark_runner(benchmark):
    """Rounds timed by pytest-benchmark, its stored samples made per call: a round of `n` queued
    calls is divided by `n` in place, so pytest-benchmark's own JSON stats agree with ours."""

    def runner(run, rounds, calls_per_round):
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
        data = benchmark.stats.stats.data
        out = list(data)
        data[:] = [t / calls_per_round for t in out]  # before any of its cached statistics is read
        return out

    return runner


def run_benchmark(benchmark, cfg: Config, mode: str, backend: str, options: dict) -> dict:
    """Compile, check against the oracle, time, and fill `benchmark.extra_info`; returns it.

    Skips (pytest.skip) when the backend cannot run here or would only fall back to dense.
    Asserts, for layer configs, that the error is within kernels.TOLERANCE for the precision.
    """
    import pytest

    label = f"{cfg.name}-{mode}-{backend}"
    if options.get("deadline") is not None and time.monotonic() > options["deadline"]:
        pytest.skip("the run's --bench-time-budget is spent")
    start = time.perf_counter()
    case = cached_case(cfg)
    progress(options, f"{label}: case ready ({time.perf_counter() - start:.1f} s)")
    ok, why = case.coverage(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")

    info = device_info()
    benchmark.group = group_name(cfg, mode)
    fn, args = case.function(mode)
    start = time.perf_counter()
    layouts = options.get("operand_layouts", "row-major")
    phases = {}
    compiled = compile_for(fn, args, backend, operand_layouts=layouts, phases=phases)
    compile_s = time.perf_counter() - start
    if layouts != "row-major":
        args = place(compiled, args)
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    first_call_s = time.perf_counter() - start
    if layouts != "row-major":  # through the host: jax 0.10.2 misreads such arrays in later jitted ops
        result = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), result)
    progress(options, f"{label}: compiled and ran once ({compile_s:.1f} s to compile: lowering {phases['lower_s']:.1f}, "
                      f"of which Triton {phases['triton_s']:.1f}, XLA {phases['xla_compile_s']:.1f})"
                      + "".join(f"; Triton's slowest {n} {t:.1f} s" for n, t in phases["triton_slowest"][:1]))
    start = time.perf_counter()
    if backend == "reference" and oracle_precision(cfg) is None:
        _ORACLES.setdefault((cfg.name, mode), result)  # it is its own oracle
    # layers: the worst array; models: the whole gradient as one vector (single tiny gradients of
    # a deep net are not a fair measure of a backend)
    if options.get("check", True):
        err, worst_array = rel_err_detail(result, oracle_result(case, mode), per_array=cfg.kind == "layer")
        progress(options, f"{label}: rel err {err:.2e} vs the oracle, worst in {worst_array} ({time.perf_counter() - start:.1f} s)")
    else:  # --bench-no-check: timing only, no oracle to compile and run
        err, worst_array = None, None
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result))
    del result

    if getattr(benchmark, "disabled", False):  # --benchmark-disable: a correctness check
        benchmark.pedantic(lambda: jax.block_until_ready(compiled(*args)), rounds=1, iterations=1)
        timing = None
    else:
        timing = time_compiled(
            compiled, args, max_time=options["max_time"], min_rounds=options["min_rounds"],
            warmup=options["warmup"], first_call_s=first_call_s, runner=_pytest_benchmark_runner(benchmark),
        )
    gflop, io_bytes = _case_sizes(case, mode)
    extra = {
        "backend": backend,
        "config": cfg.name,
        "mode": mode,
        "kind": cfg.kind,
        "D": cfg.D,
        "N": cfg.N,
        "B": cfg.B,
        "pixels": cfg.pixels,
        "gflop": gflop,
        "io_bytes": io_bytes,
        **memory_of(compiled),
        "rel_err_vs_reference": err,
        "rel_err_worst_array": worst_array,
        "oracle": f"reference@{oracle_precision(cfg) or 'default'}",
        "tolerance": kernels.TOLERANCE[info["precision"]],
        "compile_s": compile_s,
        **{f"compile_{k}": v for k, v in phases.items()},
        "operand_layouts": layouts,
        "calls_per_round": timing.calls_per_round if timing else 1,
        **{k: info[k] for k in ("platform", "device_kind", "jax_version", "jaxlib_version", "precision", "cuda_kernels", "vector_neuron")},
    }
    if isinstance(cfg, LayerConfig):
        extra.update(c=cfg.c, k_max=cfg.k_max, cin=case.spec().cin, cout=case.spec().cout)
    if timing is not None:
        extra.update(p20_s=timing.p20_s, median_s=timing.median_s, p80_s=timing.p80_s, tflops=gflop / 1e3 / timing.median_s)
    benchmark.extra_info.update(extra)
    record_case(options, label, extra)  # before the log line, which is what a watcher acts on
    if timing is not None:
        progress(options, f"{label}: median {timing.ms:.3f} ms")

    assert finite, f"{backend} produced non-finite values on {cfg.name} {mode}"
    if isinstance(cfg, LayerConfig) and err is not None:
        assert err <= extra["tolerance"], (
            f"{backend} on {cfg.name} {mode}: relative error {err:.3g} vs the reference (worst in "
            f"{worst_array}) exceeds {extra['tolerance']:.1g} ({info['precision']})"
        )
    return extra
