"""`python -m bench measure-auto`: measure the ConvContract configurations the model steps really
run, on every candidate backend, and write them into `auto`'s table kernels/measured/<device>.json.

    python -m bench measure-auto [--configs auto-models] [--backends dense,triton,pallas]
        [--modes fwd_bwd,fwd] [--max-time 0.1] [--time-budget S] [--table PATH] [--out DIR] [--list]

1. Trace each model step (bench/model_layers.py) and collect its distinct configurations
   (signature: geometry, keys, channels, filter bases, spatial size, dtype) with the batch the
   step runs them at. `--configs auto-models`: UNet, ResNet and DilResNet at D=3, batch 1 with
   N=32, 64, 128, and the standard batch-4 N=64 steps.
2. Time each configuration (vmapped over the batch, as in the model) on `dense` and every fused
   backend that runs it itself, `fwd_bwd` first for all of them (what `auto` ranks by), then
   `fwd`, with the shared loop of bench/_timing.py; the table is rewritten after every
   configuration, so a time budget or a timeout keeps what was measured.
3. Print, per configuration, the medians and what `auto` now picks, and per step the sum over its
   layers of the picked backend's time against dense's.
The table's `exact` section is keyed by signature and batch (kernels/_measured.py ranks with it);
its `configs` section (from `python -m bench measured`) is kept as it is.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import sys
import time

from bench import _configs, _suite

FUSED_ORDER = ("triton", "pallas")


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench measure-auto", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="auto-models", help="model configs or sets (default auto-models)")
    p.add_argument("--backends", default="", help="candidates (default: dense and every fused backend available here)")
    p.add_argument("--modes", default="fwd_bwd,fwd", help="fwd_bwd and/or fwd, in the order measured (default fwd_bwd,fwd)")
    p.add_argument("--max-time", type=float, default=0.1, help="seconds of timed calls per case (default 0.1)")
    p.add_argument("--min-rounds", type=int, default=5, help="at least this many timed rounds (default 5)")
    p.add_argument("--time-budget", type=float, default=0.0, help="seconds; no case starts later (0: no limit)")
    p.add_argument("--table", default=None, help="the table to update (default kernels/measured/<device-slug>.json)")
    p.add_argument("--out", default=None, help="also write OUT/<device-slug>/<date>-<commit>-measure-auto.json (every measurement) and a copy of the table")
    p.add_argument("--commit", default=None, help="commit id recorded in the table's sources")
    p.add_argument("--list", action="store_true", help="only list the configurations (no timing; runs on a CPU)")
    args = p.parse_args(argv)
    try:
        args.configs = _configs.parse_selection(args.configs, tuple(_configs.CONFIGS), "--configs", _configs.CONFIG_SETS)
        args.modes = _configs.parse_selection(args.modes, _configs.LAYER_MODES, "--modes")
    except ValueError as err:
        p.error(str(err))
    if args.max_time <= 0 or args.min_rounds < 1 or args.time_budget < 0:
        p.error(f"--max-time (={args.max_time}) must be > 0, --min-rounds (={args.min_rounds}) >= 1, "
                f"--time-budget (={args.time_budget}) >= 0")
    return args


def candidates(value: str) -> tuple[str, ...]:
    import kernels

    if value.strip():
        names = _configs.parse_selection(value, tuple(kernels.registered_backends()), "--backends")
    else:
        names = ("dense",) + tuple(b for b in kernels.available_backends() if b not in ("dense", "reference"))
    return ("dense",) + tuple(n for n in names if n != "dense")  # the baseline first


def load_table(path: pathlib.Path, device_kind: str) -> dict:
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("device_kind", device_kind) != device_kind:
            raise SystemExit(f"--table (={path}) is for {data['device_kind']!r}, this device is {device_kind!r}")
    else:
        data = {"device_kind": device_kind, "sources": [], "configs": {}}
    data.setdefault("exact", {})
    return data


def record(table: dict, use, mode: str, backend: str, ms: float) -> None:
    from kernels import _measured

    entry = table["exact"].setdefault(use.signature, {**_measured.describe(use.spec, use.spatial), "batches": {}, "used_by": []})
    entry["used_by"] = sorted(set(entry["used_by"]) | set(use.sources))
    entry["batches"].setdefault(str(use.batch), {}).setdefault(mode, {})[backend] = round(ms, 4)


def write_table(table: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def measure_all(uses, backends, args, table: dict, table_path: pathlib.Path, log: list) -> None:
    from bench import _timing, model_layers

    start = time.monotonic()
    # the most used (count x cells x batch) first: under a budget they matter most
    ordered = sorted(uses, key=lambda u: -u.count * u.batch * _pixels(u))
    for mode in args.modes:
        for i, use in enumerate(ordered):
            for backend in backends:
                if args.time_budget and time.monotonic() - start > args.time_budget:
                    log.append(dict(signature=use.signature, batch=use.batch, mode=mode, backend=backend, skipped="time budget"))
                    continue
                ok, why = model_layers.runs_itself(use, backend)
                if not ok:
                    log.append(dict(signature=use.signature, batch=use.batch, mode=mode, backend=backend, skipped=why))
                    continue
                row = dict(signature=use.signature, batch=use.batch, mode=mode, backend=backend)
                try:
                    fn, fargs = model_layers.layer_function(use, backend, mode)
                    _, timing, extra = _timing.compile_and_time(
                        fn, fargs, max_time=args.max_time, min_rounds=args.min_rounds, warmup=1
                    )
                except Exception as err:  # noqa: BLE001 - one failing case (OOM, lowering) must not end the run
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                    print(f"  {backend:8s} {mode:8s} {use.describe()}: FAILED {row['error']}", flush=True)
                    log.append(row)
                    continue
                row.update(timing.as_ms(), **extra)
                log.append(row)
                record(table, use, mode, backend, timing.ms)
                print(f"  {backend:8s} {mode:8s} {timing.ms:9.3f} ms  [{i + 1}/{len(ordered)}] {use.describe()}", flush=True)
            write_table(table, table_path)


def _pixels(use) -> int:
    n = 1
    for s in use.spatial:
        n *= s
    return n


def summary(uses, table: dict, backends) -> str:
    """Per configuration: medians and auto's pick; per step: the layers' time with auto vs dense."""
    from kernels import _measured

    lines = [f"{'fwd_bwd ms':>10s} " + " ".join(f"{b:>9s}" for b in backends) + "  auto picks  (rule)  configuration"]
    per_step: dict[str, list[float]] = {}
    for use in sorted(uses, key=lambda u: (u.sources, u.signature)):
        ms = table["exact"].get(use.signature, {}).get("batches", {}).get(str(use.batch), {}).get("fwd_bwd", {})
        ranked, rule = _measured.ranking(table["device_kind"], use.spec, use.spatial, use.dtype, table=table)
        pick = min(ranked, key=ranked.get) if ranked else "-"
        cells = " ".join(f"{ms[b]:9.3f}" if b in ms else f"{'-':>9s}" for b in backends)
        lines.append(f"{'':10s} {cells}  {pick:10s}  ({rule})  {use.describe()}")
        if pick in ms and "dense" in ms:
            for source in use.sources:
                acc = per_step.setdefault(source, [0.0, 0.0])
                acc[0] += use.count * ms[pick]
                acc[1] += use.count * ms["dense"]
    lines.append("")
    lines.append("per step, the ConvContract layers' fwd_bwd time summed (layer by layer, as measured):")
    for source, (auto_ms, dense_ms) in sorted(per_step.items()):
        lines.append(f"  {source:24s} auto {auto_ms:9.2f} ms   dense {dense_ms:9.2f} ms   auto/dense {auto_ms / dense_ms:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from bench import _device, model_layers
    from kernels import _measured

    info = _device.device_info()
    started = time.perf_counter()
    uses = model_layers.model_uses(args.configs)
    print(f"{len(uses)} distinct ConvContract configurations (with batch) in {', '.join(args.configs)} "
          f"({time.perf_counter() - started:.0f} s to trace):")
    for use in uses:
        print(f"  {use.describe()}  <- {', '.join(use.sources)}")
    if args.list:
        return 0
    try:
        backends = candidates(args.backends)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if info["platform"] == "cpu" and not args.backends.strip():
        print("note: on a CPU the fused backends run in interpreters and `auto` uses no table; "
              "measuring dense only (name --backends to override)")
    table_path = pathlib.Path(args.table) if args.table else _measured._DIR / f"{info['device_slug']}.json"
    table = load_table(table_path, info["device_kind"])
    commit = _suite.resolve_commit(args.commit)
    source = f"python -m bench measure-auto --configs {','.join(args.configs)} ({_dt.date.today()}, commit {commit})"
    table["sources"] = [s for s in table.get("sources", []) if s != source] + [source]
    print(f"measuring on {info['device_kind']} with {', '.join(backends)}; table {table_path}")
    log: list = []
    measure_all(uses, backends, args, table, table_path, log)
    write_table(table, table_path)
    _measured.load.cache_clear()
    print()
    print(summary(uses, table, backends))
    print(f"\nwrote {table_path} ({time.perf_counter() - started:.0f} s)")
    if args.out:
        paths = _suite.result_paths(pathlib.Path(args.out), info["device_slug"], commit, tag="measure-auto")
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        paths["json"].write_text(json.dumps({"device": info, "configs": list(args.configs), "rows": log}, indent=1) + "\n")
        copy = paths["json"].parent / table_path.name
        write_table(table, copy)
        print(f"wrote {paths['json']} and {copy}")
    return 0
