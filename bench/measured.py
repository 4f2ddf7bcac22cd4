"""`python -m bench measured RESULTS.json [MORE.json ...]`: write the `configs` part of the `auto`
table kernels/measured/<device>.json from committed bench runs (the median ms of every backend, per
layer configuration and mode; a later run's numbers replace an earlier run's). The `exact` part,
from `python -m bench measure-auto`, is kept.

    python -m bench measured bench/results/nvidia-h200/<date>-<commit>.json [...]
"""

from __future__ import annotations

import argparse
import json
import pathlib

from kernels._measured import _DIR, device_slug


def measure_auto_source(source: str) -> bool:
    """Whether a table's source names a `python -m bench measure-auto` run (the `exact` entries'
    provenance, kept when the `configs` part is rebuilt), with or without an environment prefix."""
    return "python -m bench measure-auto" in source


def table_from_run(run: dict, configs: dict | None = None) -> tuple[str, dict]:
    """(device kind, table) from a pytest-benchmark JSON written by `python -m bench --out`,
    updating `configs` (a table from earlier runs) when given."""
    configs = {} if configs is None else configs
    kinds = set()
    for bench in run["benchmarks"]:
        info = bench.get("extra_info", {})
        if info.get("kind") != "layer" or "median_s" not in info or info.get("backend") == "auto":
            continue  # `auto` rows measure the table's own pick
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
    p.add_argument("results", nargs="+", help="bench JSONs (bench/results/<device>/<date>-<commit>.json), oldest first")
    args = p.parse_args(argv)
    configs: dict = {}
    kinds = set()
    for path in args.results:
        kind, configs = table_from_run(json.loads(pathlib.Path(path).read_text()), configs)
        kinds.add(kind)
    if len(kinds) != 1:
        raise SystemExit(f"the runs are from different device kinds: {sorted(kinds)}")
    out = _DIR / f"{device_slug(kind)}.json"
    sources = [pathlib.Path(path).as_posix() for path in args.results]
    table = {"device_kind": kind, "sources": sources, "configs": configs}
    if out.exists():  # keep the exact entries of `python -m bench measure-auto`
        old = json.loads(out.read_text())
        if old.get("compute_capability"):  # measure-auto's record (kernels._measured.device_table)
            table["compute_capability"] = old["compute_capability"]
        if old.get("exact"):
            table["exact"] = old["exact"]
            table["sources"] += [s for s in old.get("sources", []) if measure_auto_source(s)]
    out.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}: {len(configs)} configurations from {', '.join(sources)}")
    return 0
