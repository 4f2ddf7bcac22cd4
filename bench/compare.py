"""Regression check between two benchmark runs.

    python -m bench compare [OLD] [NEW] [--threshold 0.10]

OLD defaults to the newest stored baseline for this device (bench/results/<device-slug>/*.json);
NEW defaults to a fresh run of the benchmarks OLD holds that can run here. Prints one row per
benchmark (old and new median, new/old ratio) and exits 1 when any median is slower than
(1 + threshold) x the old one, 0 otherwise, 2 on bad arguments or unreadable files.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
from typing import Optional

from bench import _suite

EXIT_OK, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2


def medians(results: dict) -> dict[str, float]:
    """benchmark name -> median seconds (pytest-benchmark's `stats.median`)."""
    out = {}
    for bench in results["benchmarks"]:
        median = bench.get("stats", {}).get("median")
        if median is None:
            median = bench.get("extra_info", {}).get("median_s")
        if bench.get("name") and median:
            out[bench["name"]] = float(median)
    return out


def compare_results(old: dict, new: dict, threshold: float) -> tuple[list[dict], bool]:
    """Rows (name, old_s, new_s, ratio, verdict) and whether any median regressed."""
    if threshold < 0:
        raise ValueError(f"`threshold` (={threshold!r}) must be >= 0")
    old_m, new_m = medians(old), medians(new)
    rows, regressed = [], False
    for name in sorted(set(old_m) | set(new_m)):
        o, n = old_m.get(name), new_m.get(name)
        if o is None or n is None:
            rows.append({"name": name, "old_s": o, "new_s": n, "ratio": None, "verdict": "only in " + ("new" if o is None else "old")})
            continue
        ratio = n / o
        if ratio > 1.0 + threshold:
            verdict, regressed = "SLOWER", True
        elif ratio < 1.0 / (1.0 + threshold):
            verdict = "faster"
        else:
            verdict = "ok"
        rows.append({"name": name, "old_s": o, "new_s": n, "ratio": ratio, "verdict": verdict})
    return rows, regressed


def format_rows(rows: list[dict]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.3f}"

    cells = [["benchmark", "old ms", "new ms", "new/old", "verdict"]]
    cells += [[r["name"], ms(r["old_s"]), ms(r["new_s"]), "-" if r["ratio"] is None else f"{r['ratio']:.3f}", r["verdict"]] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def stored_results(device_slug: str, root=None) -> list[pathlib.Path]:
    """Stored result files for a device, oldest first (by the run's recorded datetime)."""
    folder = pathlib.Path(root or _suite.RESULTS_DIR) / device_slug
    found = []
    for path in folder.glob("*.json"):
        try:
            when = _suite.load_results(path).get("datetime", "")
        except ValueError:
            continue
        found.append((when, path.name, path))
    return [p for _, _, p in sorted(found)]


def _fresh_run(old: dict, args) -> tuple[Optional[dict], int]:
    """Run, here and now, the benchmarks that `old` holds; returns (results or None, pytest exit code)."""
    from bench import _configs, _device

    import kernels

    cases = {
        tuple(b.get("extra_info", {}).get(k) for k in ("config", "mode", "backend")) for b in old["benchmarks"]
    }
    cases = {c for c in cases if None not in c and c[0] in _configs.CONFIGS}
    if not cases:
        raise ValueError("the baseline names no known (config, mode, backend) in its extra_info; give NEW explicitly")
    configs = sorted({c for c, _, _ in cases})
    run = dict(
        configs=configs,
        modes=sorted({m for _, m, _ in cases}),
        backends=[b for b in sorted({b for _, _, b in cases}) if b in kernels.available_backends() + ("auto",)],
        commit=_suite.resolve_commit(args.commit),
        max_time=args.max_time,
        min_rounds=args.min_rounds,
        warmup=args.warmup,
        exclude=args.exclude,
        time_budget=args.time_budget,
    )
    if args.save:
        json_path = _suite.result_paths(pathlib.Path(args.save), _device.device_info()["device_slug"], run["commit"])["json"]
        rc = _suite.run_suite(json_path=json_path, **run)
        if json_path.exists():
            print(f"wrote {json_path}")
            return _suite.load_results(json_path), rc
        return None, rc
    with tempfile.TemporaryDirectory() as tmp:
        json_path = pathlib.Path(tmp) / "fresh.json"
        rc = _suite.run_suite(json_path=json_path, **run)
        return (_suite.load_results(json_path) if json_path.exists() else None), rc


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench compare", description=__doc__.split("\n\n")[2])
    p.add_argument("old", nargs="?", help="baseline JSON (default: newest stored for this device)")
    p.add_argument("new", nargs="?", help="JSON to check (default: a fresh run)")
    p.add_argument("--threshold", type=float, default=0.10, help="allowed slowdown of a median, as a fraction (default 0.10)")
    p.add_argument("--results", default=None, help=f"stored results root (default {_suite.RESULTS_DIR})")
    p.add_argument("--save", default=None, help="also keep the fresh run under DIR/<device-slug>/")
    p.add_argument("--commit", default=None, help="commit id for the fresh run")
    _suite.add_timing_args(p, budget_help="seconds for the fresh run (see python -m bench)")
    p.add_argument("--exclude", default="", help="fnmatch patterns of '{config}-{mode}-{backend}' the fresh run leaves out")
    args = p.parse_args(argv)
    if args.threshold < 0:
        p.error(f"--threshold (={args.threshold}) must be >= 0")
    _suite.check_timing_args(p, args)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.old:
            old_path = pathlib.Path(args.old)
        else:
            from bench import _device

            slug = _device.device_info()["device_slug"]
            stored = stored_results(slug, args.results)
            if not stored:
                root = pathlib.Path(args.results or _suite.RESULTS_DIR) / slug
                print(f"error: no stored baseline in {root}; record one with `python -m bench --out {root.parent}`", file=sys.stderr)
                return EXIT_USAGE
            old_path = stored[-1]
        old = _suite.load_results(old_path)
        run_rc = 0
        if args.new:
            new, new_label = _suite.load_results(args.new), args.new
        else:
            new, run_rc = _fresh_run(old, args)
            new_label = "fresh run"
            if new is None:
                print(f"error: the fresh run wrote no results (pytest exit code {run_rc})", file=sys.stderr)
                return EXIT_USAGE
        rows, regressed = compare_results(old, new, args.threshold)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(f"old: {old_path}\n     {_suite.describe_run(old)}")
    print(f"new: {new_label}\n     {_suite.describe_run(new)}")
    if old.get("machine_info", {}).get("device_kind") != new.get("machine_info", {}).get("device_kind"):
        print("warning: the two runs are from different devices; ratios compare hardware, not code")
    print(format_rows(rows))
    common = [r for r in rows if r["ratio"] is not None]
    if not common:
        print("error: the two runs have no benchmark in common", file=sys.stderr)
        return EXIT_USAGE
    slower = [r["name"] for r in common if r["verdict"] == "SLOWER"]
    if regressed:
        print(f"REGRESSION: {len(slower)} of {len(common)} medians slower than {1 + args.threshold:.2f}x the baseline: {', '.join(slower)}")
        return EXIT_REGRESSION
    print(f"ok: {len(common)} medians within {1 + args.threshold:.2f}x of the baseline")
    if run_rc not in (0, 5):
        print(f"note: the fresh run's pytest exit code was {run_rc} (a failed correctness check?)")
        return EXIT_REGRESSION
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
