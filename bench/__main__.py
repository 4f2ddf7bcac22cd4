"""`python -m bench`: the A/B table of every available ConvContract backend on this device.

    python -m bench [--configs quick|full|all|NAME,...] [--backends reference,dense,...]
                    [--modes fwd,fwd_bwd,step] [--out DIR] [--commit SHA] [--max-time S]
    python -m bench compare [OLD] [NEW] [--threshold 0.10]     (see bench/compare.py)
    python -m bench measured RESULTS.json     (the `auto` table kernels/measured/<device>.json)
    python -m bench measure-auto [...]        (the table's exact entries: see bench/measure_auto.py)
    python -m bench profile CONFIG [...]      (where a step's GPU time goes: see bench/profile.py)

Runs the pytest-benchmark suite (bench/test_suite.py) on the selected cases, then prints one
row per benchmark: median and p20-p80 ms, speedup vs the `reference` and `dense` backends,
dense-equivalent TFLOP/s and % of the device's measured dense peak (when known), temp MB from
the compiled executable, relative error vs the reference oracle; then the backends and cases
left out and why, and where the results went: DIR/<device-slug>/<date>-<commit>.{json,png,txt}
with --out DIR (`--out bench/results` records a baseline for `compare`), else the same under
$GINJAX_BENCH_OUT or ~/.cache/ginjax-bench. The commit comes from --commit, $BENCH_COMMIT or git, else
'unknown' (git is not needed).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from bench import _configs, _device, _suite, _timing


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="A/B benchmark of ConvContract backends (subcommands: compare, measured, measure-auto, profile)",
    )
    p.add_argument("--configs", default="auto", help="names or sets (quick, full, all, layers, models, models-b1, models-2d, auto-models, small-models); default: quick on CPU, all on GPU")
    p.add_argument("--backends", default="", help="comma-separated backends (default: every one available here; on a CPU, not the interpreted triton/pallas)")
    p.add_argument("--modes", default="", help=f"comma-separated modes out of {', '.join(_configs.MODES)} (default: all)")
    p.add_argument("--out", default=None, help="write DIR/<device-slug>/<date>-<commit>.{json,png,txt} (default: $GINJAX_BENCH_OUT or ~/.cache/ginjax-bench)")
    p.add_argument("--commit", default=None, help=f"commit id to record (default: ${_suite.COMMIT_ENV}, git, 'unknown')")
    _suite.add_timing_args(p)
    p.add_argument("--exclude", default="", help="comma-separated fnmatch patterns of '{config}-{mode}-{backend}' to leave out, e.g. '*_k2-*-triton'")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--no-check", action="store_true", help="time only: skip the error against the reference oracle (no oracle compiled; rel err shows '-')")
    p.add_argument("--operand-layouts", default="row-major", choices=_timing.OPERAND_LAYOUTS,
                   help="the compiled step's arguments and results: row-major (default; XLA relayouts them for kernels "
                        "that want another layout), or auto (XLA picks them, as for a layer inside a model)")
    args = p.parse_args(argv)
    _suite.check_timing_args(p, args)
    return args


_INTERPRETED_ON_CPU = ("triton", "pallas")


def _resolve_selection(args) -> tuple[tuple, tuple, tuple, list]:
    """Configs, backends and modes to run, and (backend, why) of those left out by default;
    ValueError naming the flag for a bad value."""
    import jax

    import kernels

    configs = _configs.select_configs(args.configs, jax.default_backend())
    available = kernels.available_backends()
    left_out = []
    if args.backends.strip():
        backends = _configs.parse_selection(args.backends, _configs.bench_backends(), "--backends")
        for name in backends:
            if name not in available:
                try:
                    with kernels.use_backend(name):
                        pass
                except ValueError as err:
                    raise ValueError(f"--backends (={args.backends!r}): {err}") from None
    else:
        backends = available
        for name in kernels.registered_backends():
            if name not in available:
                left_out.append((name, _device.backend_runs_here(name)[1]))
        if jax.default_backend() == "cpu":
            # the fused backends run in interpreters on a CPU: their timings say nothing and take
            # minutes; they stay selectable with --backends
            for name in _INTERPRETED_ON_CPU:
                if name in backends:
                    left_out.append((name, "runs in an interpreter on a CPU (timings mean nothing, minutes per case); name it in --backends to run it anyway"))
            backends = tuple(b for b in available if b not in _INTERPRETED_ON_CPU)
    modes = _configs.parse_selection(args.modes, _configs.MODES, "--modes")
    # only the modes some selected config has: no header entry without rows
    modes = tuple(m for m in modes if any(m in _configs.CONFIGS[c].modes for c in configs))
    return configs, backends, modes, left_out


INTERRUPTED = 2  # pytest.ExitCode.INTERRUPTED: what a SIGTERM during the suite ends it with


def run(args) -> int:
    from bench import plot

    try:
        configs, backends, modes, left_out = _resolve_selection(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not modes:
        print(f"error: --modes (={args.modes!r}) matches no mode of the selected configs", file=sys.stderr)
        return 2
    info = _device.device_info()
    commit = _suite.resolve_commit(args.commit)
    out_root = pathlib.Path(args.out) if args.out else _suite.default_out_dir()
    paths = _suite.result_paths(out_root, info["device_slug"], commit)
    print(f"python -m bench: {info['device_kind']} | configs {','.join(configs)} | backends {','.join(backends)} | modes {','.join(modes)}")
    skipped: list = []
    rc = _suite.run_suite(
        configs=configs, backends=backends, modes=modes, json_path=paths["json"], commit=commit,
        max_time=args.max_time, min_rounds=args.min_rounds, warmup=args.warmup,
        exclude=args.exclude, time_budget=args.time_budget, skipped=skipped, check=not args.no_check,
        operand_layouts=args.operand_layouts,
    )
    cases = _suite.cases_path(paths["json"])
    if not paths["json"].exists() or paths["json"].stat().st_size == 0:
        kept = f"; the cases that finished are in {cases}" if cases.exists() else ""
        print(f"error: the suite wrote no results (pytest exit code {rc}){kept}", file=sys.stderr)
        return rc or 2
    results = _suite.load_results(paths["json"])
    table = _suite.describe_run(results) + "\n\n" + _suite.format_table(_suite.table_rows(results))
    notes = [f"left out: {name}: {why}" for name, why in left_out]
    notes += [f"skipped: {case}: {why}" for case, why in skipped]
    if rc == INTERRUPTED:
        notes.append("interrupted (SIGTERM or Ctrl-C): the cases after these did not run")
    if notes:
        table += "\n\n" + "\n".join(notes)
    print()
    print(table)
    paths["txt"].write_text(table + "\n")
    written = [paths["json"], paths["txt"]]
    if not args.no_plot:
        if plot.plot_speedups(results, paths["png"]):
            written.append(paths["png"])
        else:
            print(plot.MISSING_MATPLOTLIB)
    where = "" if args.out else f" (no --out: kept under {out_root}, or ${_suite.OUT_ENV})"
    print("\nresults" + where + ":\n" + "\n".join(f"  {p}" for p in written))
    # 5: nothing selected/collected; not an error of the code under test
    return 0 if rc in (0, 5) else rc


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "measured":
        from bench import measured

        return measured.main(argv[1:])
    if argv and argv[0] == "measure-auto":
        from bench import measure_auto

        return measure_auto.main(argv[1:])
    if argv and argv[0] == "profile":
        from bench import profile

        return profile.main(argv[1:])
    if argv and argv[0] == "compare":
        from bench import compare

        return compare.main(argv[1:])
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
