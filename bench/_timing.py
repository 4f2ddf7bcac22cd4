"""The one timing loop of bench/: compile ahead of time, warm up, time calls of the executable.

Every number comes from an ahead-of-time compiled executable (`jax.jit(f).lower(...).compile()`),
so neither tracing nor compilation is ever timed; `memory_of` reads its temp bytes.

`time_compiled` is the loop the pytest-benchmark suite, `python -m bench measure-auto`,
`python -m bench profile`, triton_sweep.py, scaling.py and bench/pallas_timing.py all use:
- one call (unless the caller already made it) and, when that was short, one warm call decide
  how many calls make a round: calls under QUEUE_BELOW_S are queued `queued_calls()` to a round and
  synchronised once, as a training loop runs them (a synchronised single call also pays 0.2-0.8 ms
  of host round trip on the H200, which is not the backend's cost; bench/NOTES.md); a round still
  pays one round trip, a share of it per call, so $GINJAX_BENCH_QUEUED_CALLS (default 5) sets
  the queue depth to see how much of a short call's time that share is;
- `warmup` calls, then WARMUP_S of back-to-back calls so a GPU's clocks are up (a median over
  calls at lower clocks read up to 1.4x slow on the H200);
- rounds filling about `max_time` seconds (at least `min_rounds`, at most `max_rounds`); a case
  whose warm call (or, past WARM_CHECK_BELOW_S, first call) already took longer than `max_time`
  runs `min_rounds` rounds without warm-up.
Statistics are per call (round time / calls per round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

import jax

import kernels

WARMUP_S = 0.25
QUEUED_CALLS_ENV = "GINJAX_BENCH_QUEUED_CALLS"
QUEUE_BELOW_S = 0.05
WARM_CHECK_BELOW_S = 2.0

# runner(run, rounds, calls_per_round) -> seconds of each round; the default times them with perf_counter
RoundsRunner = Callable[[Callable[[], Any], int, int], Sequence[float]]


def queued_calls() -> int:
    """Calls queued to a round for calls under QUEUE_BELOW_S: $GINJAX_BENCH_QUEUED_CALLS, default 5."""
    raw = os.environ.get(QUEUED_CALLS_ENV, "5")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"${QUEUED_CALLS_ENV} (={raw!r}) must be an int >= 1")
    return n


OPERAND_LAYOUTS = ("row-major", "auto")


def compile_for(fn: Callable, args: tuple, backend: Optional[str] = None, precision: Optional[str] = None,
                operand_layouts: str = "row-major", phases: Optional[dict] = None):
    """AOT-compile fn(*args) with every 'auto' ConvContract on `backend` (None: left to `auto`).

    precision: None for JAX's default matmul precision, or a jax.default_matmul_precision name
    ('highest' for the reference oracle).
    operand_layouts: "row-major" (arguments and results as JAX hands them over; a kernel that
    wants another layout gets a relayout pass at the boundary), or "auto": XLA picks the layouts
    of the arguments and results as it does between the ops of a program, i.e. the function as
    one part of a larger program (a layer inside a model). Call it on `place(compiled, args)`.
    phases: a dict to fill with where the time went, in seconds: `lower_s` (tracing and lowering,
    which includes `triton_s`, compiling our Triton kernels to PTX) and `xla_compile_s` (XLA's
    compile, autotuning included); `triton_slowest` lists the five slowest of those kernels as
    (name, seconds).
    """
    if operand_layouts not in OPERAND_LAYOUTS:
        raise ValueError(f"`operand_layouts` (={operand_layouts!r}) must be one of {OPERAND_LAYOUTS}")

    # A fresh function object per call: jit's trace cache is keyed on the function, and the
    # backend choice happens at trace time, outside anything jit knows about.
    def traced(*a):
        return fn(*a)

    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    use = kernels.use_backend(backend) if backend else contextlib.nullcontext()
    if operand_layouts == "auto":
        from jax.experimental.layout import Format, Layout

        jit = jax.jit(traced, in_shardings=jax.tree.map(lambda _: Format(Layout.AUTO), tuple(args)),
                      out_shardings=Format(Layout.AUTO))
    else:
        jit = jax.jit(traced)
    with use, ctx:
        start, seen = time.perf_counter(), len(_triton_compile_log())
        lowered = jit.lower(*args)
        lowered_at, triton = time.perf_counter(), _triton_compile_log()[seen:]
        compiled = lowered.compile()
    if phases is not None:
        phases.update(lower_s=lowered_at - start, triton_s=sum(s for _, s in triton),
                      xla_compile_s=time.perf_counter() - lowered_at,
                      triton_slowest=[(name, round(s, 2)) for name, s in sorted(triton, key=lambda k: -k[1])[:5]])
    return compiled


def _triton_compile_log() -> list[tuple[str, float]]:
    from kernels.triton._compile import compile_log

    return compile_log()


def place(compiled, args: tuple) -> tuple:
    """`args` in the layouts `compiled` takes them in (a copy only where those are not row-major:
    `compile_for(..., operand_layouts="auto")`)."""
    formats = getattr(compiled, "input_formats", None)
    if formats is None:
        return args
    return tuple(jax.tree.map(lambda a, f: jax.device_put(a, f), tuple(args), tuple(formats[0])))


def memory_of(compiled) -> dict:
    """temp/argument/output bytes from the executable's memory analysis (None where unknown)."""
    out = {"temp_bytes": None, "argument_bytes": None, "output_bytes": None}
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some runtimes do not implement it
        return out
    if stats is None:
        return out
    for field, attr in (
        ("temp_bytes", "temp_size_in_bytes"),
        ("argument_bytes", "argument_size_in_bytes"),
        ("output_bytes", "output_size_in_bytes"),
    ):
        value = getattr(stats, attr, None)
        out[field] = int(value) if value is not None else None
    return out


@dataclasses.dataclass
class Timing:
    """Per-call statistics of one timed executable, in seconds."""

    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    rounds: int
    calls_per_round: int
    first_call_s: float
    samples_s: tuple[float, ...] = ()  # per call, one per round, in the order timed

    @property
    def ms(self) -> float:
        return 1e3 * self.median_s

    def as_ms(self) -> dict:
        """The fields bench scripts record: median/p20/p80/min in ms, rounds, calls per round."""
        return dict(
            ms=round(1e3 * self.median_s, 4), p20_ms=round(1e3 * self.p20_s, 4), p80_ms=round(1e3 * self.p80_s, 4),
            min_ms=round(1e3 * self.min_s, 4), rounds=self.rounds, calls_per_round=self.calls_per_round,
        )


def _perf_counter_rounds(run: Callable[[], Any], rounds: int, calls_per_round: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        out.append(time.perf_counter() - start)
    return out


def _timed_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_compiled(
    compiled,
    args: tuple,
    *,
    max_time: float = 1.0,
    min_rounds: int = 5,
    max_rounds: int = 200,
    warmup: int = 1,
    first_call_s: Optional[float] = None,
    calls_per_round: Optional[int] = None,
    runner: Optional[RoundsRunner] = None,
    warmup_s: float = WARMUP_S,
) -> Timing:
    """Time `compiled(*args)` as the module docstring says; returns per-call statistics.

    first_call_s: the time of a first call the caller already made (else one is made here).
    calls_per_round: force the calls per round (default: decided on a warm call).
    runner: runs and times the rounds (pytest-benchmark's pedantic in the suite).
    warmup_s: seconds of back-to-back calls after the `warmup` calls (when `warmup` > 0).
    """
    if min_rounds < 1 or max_rounds < min_rounds:
        raise ValueError(f"`min_rounds` (={min_rounds}) must be >= 1 and <= `max_rounds` (={max_rounds})")
    call = lambda: jax.block_until_ready(compiled(*args))  # noqa: E731
    if first_call_s is None:
        first_call_s = _timed_call(call)
    # decided on a warm call: a first call also loads modules (jax-triton's PTX, cuDNN's engines);
    # judged by it, every triton case once ran 1 call per round next to 5 for dense, and 6 ms
    # steps whose first call passed `max_time` got 3 rounds without warm-up (session 22)
    warm_s = _timed_call(call) if first_call_s < WARM_CHECK_BELOW_S else first_call_s
    if calls_per_round is None:
        calls_per_round = queued_calls() if warm_s < QUEUE_BELOW_S else 1

    def run():
        return jax.block_until_ready([compiled(*args) for _ in range(calls_per_round)])

    if warm_s > max_time:
        rounds = min_rounds
    else:
        for _ in range(warmup):
            run()
        start = time.perf_counter()
        while warmup and time.perf_counter() - start < warmup_s:
            run()
        once = max(_timed_call(run), 1e-6)
        rounds = int(min(max_rounds, max(min_rounds, math.ceil(max_time / once))))
    data = np.asarray((runner or _perf_counter_rounds)(run, rounds, calls_per_round), dtype=np.float64) / calls_per_round
    p20, p50, p80 = np.percentile(data, [20, 50, 80])
    return Timing(float(p50), float(p20), float(p80), float(data.min()), len(data), calls_per_round, first_call_s,
                  tuple(float(t) for t in data))


def compile_and_time(fn: Callable, args: tuple, backend: Optional[str] = None, **timing) -> tuple[Any, Timing, dict]:
    """(first result, Timing, {compile_s, temp_bytes, ...}) of fn(*args) on `backend`: the whole
    measurement of one case for the bench scripts."""
    start = time.perf_counter()
    compiled = compile_for(fn, args, backend, timing.pop("precision", None))
    extra = {"compile_s": round(time.perf_counter() - start, 2), **memory_of(compiled)}
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - start
    return result, time_compiled(compiled, args, first_call_s=first, **timing), extra
