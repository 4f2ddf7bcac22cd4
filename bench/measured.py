"""`python -m bench measured RESULTS.json`: write the `auto` table kernels/measured/<device>.json
from a committed bench run (the median ms of every backend, per layer configuration and mode).

    python -m bench measured bench/results/nvidia-h200/<date>-<commit>.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from kernels._measured import _DIR, device_slug


def table_from_run(run: dict) -> tuple[str, dict]:
    """(device kind, table) from a pytest-benchmark JSON written by `python -m bench --out`."""
    configs: dict = {}
    kinds = set()
    for bench in run["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") != "layer" or "median_s" not in info:
            continue
        kinds.add(info["device_kind"])
        entry = configs.setdefault(info["config"], {
            "D": info["D"], "cin": info["cin"], "cout": info["cout"], "k_max": info["k_max"],
            "pixels": info["pixels"], "fwd": {}, "fwd_bwd": {},
        })
        entry[info["mode"]][info["backend"]] = round(1e3 * info["median_s"], 4)
    if len(kinds) != 1:
        raise SystemExit(f"expected layer results of one device kind, found {sorted(kinds)}")
    return kinds.pop(), configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench measured", description=__doc__.splitlines()[0])
    p.add_argument("results", help="a bench JSON (bench/results/<device>/<date>-<commit>.json)")
    args = p.parse_args(argv)
    path = pathlib.Path(args.results)
    kind, configs = table_from_run(json.loads(path.read_text()))
    out = _DIR / f"{device_slug(kind)}.json"
    out.write_text(json.dumps({"device_kind": kind, "source": path.as_posix(), "configs": configs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {len(configs)} configurations from {path}")
    return 0
