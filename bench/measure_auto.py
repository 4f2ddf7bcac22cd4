"""`python -m bench measure-auto`: measure the ConvContract configurations the model steps really
run, on every candidate backend, and write them into `auto`'s table kernels/measured/<device>.json.

    python -m bench measure-auto [--configs auto-models] [--backends dense,triton,pallas]
        [--modes fwd_bwd,fwd] [--row-lengths N[,N...]] [--thin-only] [--max-time 0.1] [--time-budget S]
        [--table PATH] [--out DIR] [--list]

1. Trace each model step (bench/model_layers.py) and collect its distinct configurations
   (signature: geometry, keys, channels, filter bases, spatial size, dtype) with the batch the
   step runs them at. `--configs auto-models`: UNet, ResNet and DilResNet at D=3, batch 1 with
   N=32, 64, 128, the standard batch-4 N=64 steps, and at D=2 on 256^2 at batch 8 (`models-2d`).
   `--configs cpu-small`: single layers of CPU-sized models (bench/_configs.py AUTO_LAYER_GRID),
   what `auto` ranks by on a CPU beside the committed bench layers.
2. Time each configuration (vmapped over the batch, as in the model) on `dense` and every fused
   backend that runs it itself and `auto` may pick here (on a CPU: `native`), `fwd_bwd` first for
   all of them (what `auto` ranks by), then `fwd`, with the shared loop of bench/_timing.py; the
   table is rewritten after every configuration, so a time budget or a timeout keeps what was
   measured. With one worker (a CPU's default) the compile times go into the table too.
3. Print, per configuration, the medians and what `auto` now picks, and per step the sum over its
   layers of the picked backend's time against dense's.
The table's `exact` section is keyed by signature and batch (kernels/_measured.py ranks with it);
its `configs` section (from `python -m bench measured`) is kept as it is.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as _dt
import json
import pathlib
import sys
import time
from typing import Any, Optional

from bench import _configs, _suite

FUSED_ORDER = ("triton", "pallas")


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench measure-auto", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="auto-models", help="model configs or sets (default auto-models)")
    p.add_argument("--backends", default="", help="candidates (default: dense and every fused backend available here)")
    p.add_argument("--modes", default="fwd_bwd,fwd", help="fwd_bwd and/or fwd, in the order measured (default fwd_bwd,fwd)")
    p.add_argument("--row-lengths", default="",
                   help="only the configurations whose rows (last spatial axis) are this long, e.g. 32 (default: all); "
                        "a kernel change that touches some row lengths re-times those and keeps the rest of the table")
    p.add_argument("--thin-only", action="store_true",
                   help="only the thin layers, which `dense` runs in two stages (kernels/_thin.py): a model's first "
                        "and last, whose dense rows were timed as one convolution before session 26")
    _suite.add_timing_args(p, max_time=0.1, warmup=False, budget_help="seconds; no case starts later (0: no limit)")
    p.add_argument("--table", default=None, help="the table to update (default kernels/measured/<device-slug>.json)")
    p.add_argument("--out", default=None, help="also write OUT/<device-slug>/<date>-<commit>-measure-auto.json (every measurement) and a copy of the table")
    p.add_argument("--commit", default=None, help="commit id recorded in the table's sources")
    p.add_argument("--workers", type=int, default=None,
                   help="cases compiled at once, in threads (default 8 on a GPU, 1 on a CPU; at 1 the table records compile times)")
    p.add_argument("--list", action="store_true", help="only list the configurations (no timing; runs on a CPU)")
    p.add_argument("--operand-layouts", default="row-major", choices=OPERAND_LAYOUTS,
                   help="the timed layer's arguments and results: row-major (default), auto (XLA picks them, every "
                        "backend), or fused-auto (the fused backends with XLA's picks, as inside a model where their "
                        "neighbours take their block layout; dense row-major)")
    p.add_argument("--allow-partial", action="store_true",
                   help="measure new samples without backends that beat dense in another table of this compute "
                        "capability's samples of them (refused otherwise: the new sample would hide that table's, so "
                        "`auto` would rank the layer without the backends left out)")
    p.add_argument("--only-unmeasured", action="store_true",
                   help="skip the cases the table already holds (configuration, batch, mode and backend): "
                        "a budgeted run measures the costliest first, so its cheap tail is measured by a second run")
    args = p.parse_args(argv)
    args.configs_arg = args.configs  # as given (a set's name), for the table's sources
    try:
        args.configs = _configs.parse_selection(
            args.configs, tuple(_configs.CONFIGS) + tuple(_configs.AUTO_LAYER_GRID), "--configs",
            {**_configs.CONFIG_SETS, **_configs.AUTO_LAYER_SETS})
        args.modes = _configs.parse_selection(args.modes, _configs.LAYER_MODES, "--modes")
        args.row_lengths = parse_row_lengths(args.row_lengths)
    except ValueError as err:
        p.error(str(err))
    _suite.check_timing_args(p, args)
    return args


def parse_row_lengths(value: str) -> tuple[int, ...]:
    """`--row-lengths` as a tuple of positive ints (empty: every configuration)."""
    lengths = []
    for item in (v.strip() for v in value.split(",")):
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"--row-lengths (={value!r}) must be positive integers separated by commas")
        lengths.append(int(item))
    return tuple(lengths)


def select_rows(uses, row_lengths: tuple[int, ...], thin_only: bool = False) -> list:
    """The configurations whose last spatial axis is one of `row_lengths` (any where it is empty)
    and, with `thin_only`, the thin ones (`kernels._thin.candidate_form`: a model's first and last layers)."""
    from kernels import _thin

    return [u for u in uses if (not row_lengths or u.spatial[-1] in row_lengths)
            and (not thin_only or _thin.candidate_form(u.spec) is not None)]


OPERAND_LAYOUTS = ("row-major", "auto", "fused-auto")


def layouts_for(choice: str, backend: str) -> str:
    """`_timing.compile_for`'s operand_layouts for a backend under --operand-layouts `choice`."""
    if choice not in OPERAND_LAYOUTS:
        raise ValueError(f"`--operand-layouts` (={choice!r}) must be one of {OPERAND_LAYOUTS}")
    if choice == "fused-auto":
        return "row-major" if backend in ("dense", "reference") else "auto"
    return choice


def candidates(value: str) -> tuple[str, ...]:
    """The backends to time: those named, else dense and every other backend `auto` may pick on
    this platform (it has a priority here; the reference oracle has none)."""
    import kernels
    from kernels import _registry

    if value.strip():
        names = _configs.parse_selection(value, tuple(kernels.registered_backends()), "--backends")
    else:
        plat = _registry.platform()
        names = ("dense",) + tuple(b for b in kernels.available_backends() if plat in _registry.get(b).priority)
    return ("dense",) + tuple(n for n in names if n != "dense")  # the baseline first


def hidden_backends(uses, backends, table: dict, device_kind: str, capability: str) -> dict[str, tuple[str, list]]:
    """{signature: (other device kind, backends)} for the configurations (at their batch) this device's
    `table` has not measured while another table of its compute `capability` has, with backends outside
    `backends` that beat dense there: a sample measured now would replace that one in `auto`'s merged
    table (`_measured.device_table`, batch by batch), those backends with it. (A backend that lost to
    dense there, e.g. pallas, ranks after dense either way: leaving it out hides nothing.)"""
    from kernels import _measured

    hidden = {}
    others = [k for k in (_measured.kinds_of_capability().get(capability, ()) if capability else ()) if k != device_kind]
    for use in uses:
        if str(use.batch) in table.get("exact", {}).get(use.signature, {}).get("batches", {}):
            continue
        for kind in others:
            row = ((_measured.load(kind) or {}).get("exact") or {}).get(use.signature, {})
            sample = row.get("batches", {}).get(str(use.batch))
            if sample is None:
                continue
            # the ranking's own rule for a backend that beats dense in a sample (run times only)
            winners = set().union(*(_measured._allowed([sample], mode) for mode in _measured.MODES))
            winners.discard(_measured.BASELINE)
            if missing := sorted(winners - set(backends)):
                hidden[use.signature] = (kind, missing)
            break  # the first table with the sample is the one the new one would hide
    return hidden


def load_table(path: pathlib.Path, device_kind: str, capability: str = "") -> dict:
    """The table at `path` (a new one if there is none) for `device_kind`, with its compute
    `capability` recorded (a GPU without a table of its own ranks by one of the same capability:
    kernels._measured.device_table)."""
    if path.exists():
        data = json.loads(path.read_text())
        if data.get("device_kind", device_kind) != device_kind:
            raise SystemExit(f"--table (={path}) is for {data['device_kind']!r}, this device is {device_kind!r}")
    else:
        data = {"device_kind": device_kind, "sources": [], "configs": {}}
    if capability:
        data["compute_capability"] = capability
    data.setdefault("exact", {})
    return data


def record(table: dict, use, mode: str, backend: str, ms: float, compile_s: Optional[float] = None) -> None:
    """The median `ms` into the entry's batch and mode; `compile_s` (trace, lower and compile, one
    case at a time) beside it under "compile_s", which the ranking does not read."""
    from kernels import _measured

    entry = table["exact"].setdefault(use.signature, {**_measured.describe(use.spec, use.spatial), "batches": {}, "used_by": []})
    entry["used_by"] = sorted(set(entry["used_by"]) | set(use.sources))
    batch = entry["batches"].setdefault(str(use.batch), {})
    batch.setdefault(mode, {})[backend] = round(ms, 4)
    if compile_s is not None:
        batch.setdefault("compile_s", {}).setdefault(mode, {})[backend] = round(compile_s, 3)


def write_table(table: dict, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


@dataclasses.dataclass
class _Case:
    use: Any
    mode: str
    backend: str
    compiled: Any = None
    args: tuple = ()
    compile_s: float = 0.0
    error: str = ""
    layouts: str = "row-major"  # _timing.compile_for's operand_layouts

    def row(self) -> dict:
        return dict(signature=self.use.signature, batch=self.use.batch, mode=self.mode, backend=self.backend)


def plan(uses, backends, modes, table: Optional[dict] = None) -> tuple[list, list]:
    """(cases to measure, rows of the cases left out and why): per mode, configurations by
    weight (the costliest first, so a budget cuts the cheap tail), dense then the fused backends;
    with `table`, the cases it already holds are left out."""
    from bench import model_layers

    todo, left_out = [], []
    ordered = sorted(uses, key=lambda u: -u.weight)
    for mode in modes:
        for use in ordered:
            held = {} if table is None else (
                table["exact"].get(use.signature, {}).get("batches", {}).get(str(use.batch), {}).get(mode, {}))
            for backend in backends:
                ok, why = model_layers.runs_itself(use, backend)
                if ok and backend in held:
                    left_out.append(dict(_Case(use, mode, backend).row(), skipped="already in the table"))
                elif ok:
                    todo.append(_Case(use, mode, backend))
                else:
                    left_out.append(dict(_Case(use, mode, backend).row(), skipped=why))
    return todo, left_out


def _compile(case: _Case) -> _Case:
    from bench import _timing, model_layers

    start = time.perf_counter()
    try:
        fn, case.args = model_layers.layer_function(case.use, case.backend, case.mode)
        case.compiled = _timing.compile_for(fn, case.args, operand_layouts=case.layouts)
        if case.layouts != "row-major":
            case.args = _timing.place(case.compiled, case.args)
    except Exception as err:  # noqa: BLE001 - one failing case (lowering, OOM) must not end the run
        case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    case.compile_s = round(time.perf_counter() - start, 2)
    return case


def measure_all(uses, backends, args, table: dict, table_path, log: list, workers: int = 1,
                deadline: Optional[float] = None) -> None:
    """Compile `workers` cases at a time (the fused ones in threads: XLA and Triton compile largely
    outside the GIL), then time them one by one with nothing else running; record each median into
    `table` and rewrite the file(s) after every group (`table_path`: a path or a list of them).
    No group starts after `deadline` (time.monotonic()), else after args.time_budget from now."""
    import jax

    from bench import _timing

    if deadline is None and args.time_budget:
        deadline = time.monotonic() + args.time_budget
    paths = table_path if isinstance(table_path, (list, tuple)) else [table_path]
    todo, left_out = plan(uses, backends, args.modes, table if getattr(args, "only_unmeasured", False) else None)
    for case in todo:
        case.layouts = layouts_for(getattr(args, "operand_layouts", "row-major"), case.backend)
    log.extend(left_out)
    chunk = max(1, workers)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=chunk) if chunk > 1 else None
    try:
        for i in range(0, len(todo), chunk):
            if deadline is not None and time.monotonic() > deadline:
                log.extend(dict(c.row(), skipped="time budget") for c in todo[i:])
                print(f"  time budget spent: {len(todo) - i} of {len(todo)} cases left unmeasured", flush=True)
                break
            batch = todo[i : i + chunk]
            if pool:
                # dense compiles here, alone: XLA autotunes its convolutions on the GPU, and
                # autotuning next to other autotuning could pick a slower algorithm than the model gets
                futures = [pool.submit(_compile, c) for c in batch if c.backend != "dense"]
                for c in batch:
                    if c.backend == "dense":
                        _compile(c)
                concurrent.futures.wait(futures)
            else:
                for c in batch:
                    _compile(c)
            done = batch
            for n, case in enumerate(done, start=i + 1):
                row = dict(case.row(), compile_s=case.compile_s, operand_layouts=case.layouts)
                if not case.error:
                    try:
                        first = time.perf_counter()
                        jax.block_until_ready(case.compiled(*case.args))
                        timing = _timing.time_compiled(
                            case.compiled, case.args, max_time=args.max_time, min_rounds=args.min_rounds,
                            warmup=1, warmup_s=0.05, first_call_s=time.perf_counter() - first,
                        )
                    except Exception as err:  # noqa: BLE001 - e.g. out of memory at run time
                        case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                if case.error:
                    row["error"] = case.error
                    print(f"  {case.backend:8s} {case.mode:8s} FAILED {case.error}  {case.use.describe()}", flush=True)
                else:
                    row.update(timing.as_ms())
                    # compile times only mean something when nothing else compiled beside them
                    record(table, case.use, case.mode, case.backend, timing.ms, case.compile_s if chunk == 1 else None)
                    print(f"  {case.backend:8s} {case.mode:8s} {timing.ms:9.3f} ms  [{n}/{len(todo)}] {case.use.describe()}", flush=True)
                log.append(row)
                case.compiled, case.args = None, ()  # free the device memory
            for path in paths:
                write_table(table, path)
    finally:
        if pool:
            pool.shutdown()


def summary(uses, table: dict, backends) -> str:
    """Per configuration: medians and auto's pick; per step: the layers' time with auto vs dense."""
    from kernels import _measured

    lines = [f"{'fwd_bwd ms':>10s} " + " ".join(f"{b:>9s}" for b in backends) + "  auto picks  (rule)  configuration"]
    per_step: dict[str, list[float]] = {}
    for use in sorted(uses, key=lambda u: (u.sources, u.signature)):
        measured = table["exact"].get(use.signature, {}).get("batches", {}).get(str(use.batch), {})
        ms = measured.get("fwd_bwd", {})
        ranked, rule = _measured.ranking(table["device_kind"], use.spec, use.spatial, use.dtype, table=table, batch=use.batch)
        pick = min(ranked, key=ranked.get) if ranked else "-"
        cells = " ".join(f"{ms[b]:9.3f}" if b in ms else f"{'-':>9s}" for b in backends)
        compiled = measured.get("compile_s", {}).get("fwd_bwd", {})
        if compiled:
            cells += "  compile s " + " ".join(f"{b} {compiled[b]:.2f}" for b in backends if b in compiled)
        lines.append(f"{'':10s} {cells}  {pick:10s}  ({rule})  {use.describe()}")
        if pick in ms and "dense" in ms:
            for source, n in use.counts.items():
                acc = per_step.setdefault(source, [0.0, 0.0])
                acc[0] += n * ms[pick]
                acc[1] += n * ms["dense"]
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
    if info["platform"] not in ("gpu", "cpu") and not (args.list or args.table):
        print(f"error: `auto` ranks by a measured table on GPUs and CPUs only; on this {info['platform']} give "
              "--table PATH to measure anyway, or --list to see the configurations", file=sys.stderr)
        return 2
    if args.workers is None:
        # a CPU compiles on the cores it times on: one case at a time, and then its compile time
        # is recorded too
        args.workers = 1 if info["platform"] == "cpu" else 8
    started = time.perf_counter()
    # the budget counts from here: tracing the steps is part of it
    deadline = time.monotonic() + args.time_budget if args.time_budget else None
    uses = select_rows(model_layers.model_uses(args.configs), args.row_lengths, args.thin_only)
    rows = f" with rows of {', '.join(map(str, args.row_lengths))}" if args.row_lengths else ""
    rows += " (thin layers only)" if args.thin_only else ""
    print(f"{len(uses)} distinct ConvContract configurations (with batch){rows} in {', '.join(args.configs)} "
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
    table_path = pathlib.Path(args.table) if args.table else _measured._DIR / f"{info['device_slug']}.json"
    table = load_table(table_path, info["device_kind"], info.get("compute_capability", ""))
    hidden = hidden_backends(uses, backends, table, info["device_kind"], info.get("compute_capability", ""))
    if hidden and not args.allow_partial:
        shown = "; ".join(f"{sig} ({kind}: {', '.join(names)})" for sig, (kind, names) in list(hidden.items())[:4])
        print(f"error: --backends (={','.join(backends)}) leaves out backends that beat dense in another table of compute "
              f"capability {info.get('compute_capability')} for {len(hidden)} of these configurations, e.g. {shown}. "
              f"This device's new samples would hide those and `auto` would rank the layers without them: add them "
              f"to --backends, or pass --allow-partial", file=sys.stderr)
        return 2
    commit = _suite.resolve_commit(args.commit)
    layouts = "" if args.operand_layouts == "row-major" else f" --operand-layouts {args.operand_layouts}"
    layouts += f" --row-lengths {','.join(map(str, args.row_lengths))}" if args.row_lengths else ""
    layouts += " --thin-only" if args.thin_only else ""
    source = f"python -m bench measure-auto --configs {args.configs_arg}{layouts} ({_dt.date.today()}, commit {commit})"
    table["sources"] = [s for s in table.get("sources", []) if s != source] + [source]
    targets = [table_path]
    if args.out:
        paths = _suite.result_paths(pathlib.Path(args.out), info["device_slug"], commit, tag="measure-auto")
        targets.append(paths["json"].parent / table_path.name)  # a copy that travels back with OUT
        print(f"the table is also written to {targets[1]} as it fills")
    print(f"measuring on {info['device_kind']} with {', '.join(backends)}; table {table_path}", flush=True)
    log: list = []
    try:
        measure_all(uses, backends, args, table, targets, log, workers=args.workers, deadline=deadline)
    finally:
        for path in targets:
            write_table(table, path)
        if args.out:
            paths["json"].write_text(json.dumps({"device": info, "configs": list(args.configs), "rows": log}, indent=1) + "\n")
    _measured.load.cache_clear()
    _measured.kinds_of_capability.cache_clear()
    print()
    print(summary(uses, table, backends))
    if args.row_lengths or args.thin_only:
        print(f"(the per-step sums cover only the layers selected{rows})")
    print(f"\nwrote {', '.join(map(str, targets))}" + (f" and {paths['json']}" if args.out else "")
          + f" ({time.perf_counter() - started:.0f} s)")
    return 0
