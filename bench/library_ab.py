"""A/B of two builds of the CUDA library (kernels/cuda) on `python -m bench` rows, in alternation.

Two builds cannot share one process (both register the same FFI targets), so each round runs
`python -m bench` once per library, in the order A, B, A, B, ...; the summary is each row's
median over its rounds, with the ratio B / A. For the GPU machine:

    python -m bench.library_ab OUT --a base.so --b new.so --rounds 3 -- --configs d3_n64_b4_c16 --backends triton --modes fwd,fwd_bwd

Arguments after `--` go to every `python -m bench` run (`--no-check` is added unless `--check`).
Files: OUT/{a,b}-<round>/ (the runs' JSON and logs) and OUT/library_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys


def rows_of(run_dir: pathlib.Path) -> dict[str, float]:
    """{'config-mode-backend': median ms} of every bench JSON under run_dir."""
    out = {}
    for path in sorted(run_dir.rglob("*.json")):
        for bench in json.loads(path.read_text()).get("benchmarks", []):
            out[bench["param"]] = 1e3 * bench["stats"]["median"]
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m bench.library_ab")
    p.add_argument("out")
    p.add_argument("--a", required=True, help="path of library A (the baseline)")
    p.add_argument("--b", required=True, help="path of library B")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--check", action="store_true", help="keep the error check against the reference")
    args = p.parse_args(argv)
    for name in ("a", "b"):
        if not pathlib.Path(getattr(args, name)).is_file():
            p.error(f"`--{name}` (={getattr(args, name)!r}) is not a file")
    if args.rounds < 1:
        p.error(f"`--rounds` (={args.rounds}) must be at least 1")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [] if args.check or "--no-check" in bench_args else ["--no-check"]
    times: dict[str, dict[str, list[float]]] = {"a": {}, "b": {}}
    for r in range(args.rounds):
        for name in ("a", "b"):
            run_dir = out / f"{name}-{r}"
            env = dict(os.environ, GINJAX_CUDA_LIBRARY=str(pathlib.Path(getattr(args, name)).resolve()))
            cmd = [sys.executable, "-m", "bench", "--out", str(run_dir), "--no-plot", *extra, *bench_args]
            with open(out / f"{name}-{r}.log", "w") as log:
                rc = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            if rc:
                print(f"round {r}, library {name}: `python -m bench` exited {rc} (log {out / f'{name}-{r}.log'})")
            for key, ms in rows_of(run_dir).items():
                times[name].setdefault(key, []).append(ms)
    summary = []
    print(f"{'row':44s} {'A ms':>8s} {'B ms':>8s} {'B/A':>6s}  rounds")
    for key in sorted(set(times["a"]) | set(times["b"])):
        a, b = times["a"].get(key, []), times["b"].get(key, [])
        ma = statistics.median(a) if a else None
        mb = statistics.median(b) if b else None
        ratio = mb / ma if ma and mb else None
        summary.append(dict(row=key, a_ms=ma, b_ms=mb, b_over_a=ratio, a_all=a, b_all=b))
        fmt = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8s}"  # noqa: E731
        print(f"{key:44s} {fmt(ma)} {fmt(mb)} {ratio if ratio else float('nan'):6.3f}  "
              f"A {' '.join(f'{v:.3f}' for v in a)} | B {' '.join(f'{v:.3f}' for v in b)}")
    (out / "library_ab.json").write_text(json.dumps(dict(a=args.a, b=args.b, bench_args=bench_args, rows=summary), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
