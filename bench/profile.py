"""Where one step's GPU time goes: `python -m bench profile` and `bench.profile.profile_step`.

    python -m bench profile CONFIG[,CONFIG...] [--backend auto] [--out DIR] [--steps 3] [--top 15]

    from bench.profile import profile_step
    report = profile_step(step_fn, *args)       # any jittable step; returns a StepProfile
    print(report.format()); report.write("profiles")

A step is compiled once (ahead of time), run once to load its kernels, timed (wall clock), then
run `steps` times under `jax.profiler.trace`; the trace's kernels of that executable are summed
per step and sorted into kinds (bench/_trace.py: fused ConvContract kernels by direction,
cuDNN/cuBLAS (ConvContract's layers on dense apart from other library calls), the VectorNeuron kernels,
XLA fusions by kind, copies/transposes, other), with the top kernels, the HLO op
that launched each and the jax op (name stack and source line) that made it.

Kernel timing needs a GPU. On a CPU the step runs once under the profiler and the report lists
the XLA CPU runtime's thunks instead, saying that those are host times.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Optional

from bench import _suite, _trace

CPU_NOTE = (
    "kernel timing needs a GPU: on this {platform} the step ran once under the profiler, and the "
    "times below are the XLA CPU runtime's thunks (host time), not GPU kernel time"
)


@dataclasses.dataclass
class KernelRow:
    """One kernel (name and HLO op) summed over a step."""

    kernel: str
    hlo_op: str  # the first instruction that launched it
    kind: str
    ms: float  # per step
    launches: float  # per step
    jax_op: str = ""
    source: str = ""
    hlo_ops: list = dataclasses.field(default_factory=list)  # every instruction that launched it

    def ops_text(self) -> str:
        more = len(self.hlo_ops) - 1
        return self.hlo_op + (f" (+{more} more)" if more > 0 else "")


@dataclasses.dataclass
class StepProfile:
    """Where one step's time goes. `kinds` and `kernels` are per step, in milliseconds."""

    name: str
    backend: str
    platform: str
    device_kind: str
    jax_version: str
    steps: int
    step_ms: Optional[float]  # wall clock, median over untraced calls (None on a CPU)
    kernel_ms: float
    launches: float
    kinds: dict[str, float]
    kernels: list[KernelRow]
    source: str  # 'gpu' | 'cpu-thunks'
    reader: str
    hlo_module: str
    note: str = ""
    # the compiled step's optimized HLO (layouts, fusions, the copies layout assignment added);
    # written only on request (`write(hlo=True)`, `--hlo`), never into the JSON
    hlo_text: str = dataclasses.field(default="", repr=False)

    def share(self, ms: float) -> float:
        return ms / self.kernel_ms if self.kernel_ms > 0 else 0.0

    def conv_contract_ms(self) -> tuple[float, float]:
        """(ms per step in the fused ConvContract kernels, the same plus ConvContract's layers that
        ran on dense: cuDNN/cuBLAS calls its lax path made)."""
        fused = sum(ms for k, ms in self.kinds.items() if k.startswith(_trace.FUSED))
        return fused, fused + self.kinds.get(_trace.DENSE, 0.0)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("hlo_text")
        out["kernels"] = [dataclasses.asdict(k) for k in self.kernels]
        out["kind_order"] = list(_trace.KINDS)
        return out

    def format(self, top: int = 15) -> str:
        unit = "GPU" if self.source == "gpu" else "CPU thunks"
        lines = [
            f"profile of {self.name} (backend {self.backend}) on {self.device_kind}, jax {self.jax_version}, "
            f"{self.steps} step{'s' if self.steps != 1 else ''} traced ({self.reader})",
        ]
        if self.note:
            lines.append(f"note: {self.note}")
        wall = f"step {self.step_ms:.2f} ms wall clock (median); " if self.step_ms is not None else ""
        lines.append(f"{wall}{unit}: {self.kernel_ms:.2f} ms per step in {self.launches:.0f} launches")
        fused, conv = self.conv_contract_ms()
        lines.append(f"ConvContract: fused kernels {fused:.2f} ms ({100 * self.share(fused):.1f}%), with its layers "
                     f"on dense (library calls) {conv:.2f} ms ({100 * self.share(conv):.1f}%); outside ConvContract "
                     f"{100 * (1 - self.share(conv)):.1f}%")
        lines.append("")
        lines.append(f"{'kind':28s} {'ms/step':>9s} {'share':>6s}")
        for kind, ms in sorted(self.kinds.items(), key=lambda kv: -kv[1]):
            lines.append(f"{kind:28s} {ms:9.3f} {100 * self.share(ms):5.1f}%")
        lines.append("")
        lines.append(f"top {min(top, len(self.kernels))} kernels (per step):")
        lines.append(f"{'ms':>8s} {'share':>6s} {'launch':>6s}  {'kind':22s} kernel | HLO op | jax op [source]")
        for k in self.kernels[:top]:
            jax_op = k.jax_op or "?"
            lines.append(
                f"{k.ms:8.3f} {100 * self.share(k.ms):5.1f}% {k.launches:6.0f}  {k.kind:22s} "
                f"{_short(k.kernel, 60)} | {k.ops_text()} | {_short(jax_op, 110)}" + (f" [{k.source}]" if k.source else "")
            )
        return "\n".join(lines)

    def write(self, out_dir, commit: Optional[str] = None, plot: bool = True, hlo: bool = False) -> dict:
        """Write `<out_dir>/<device-slug>/<date>-<commit>-profile-<name>.{json,txt,png}` (and, with
        `hlo`, the optimized HLO as `.hlo.txt.gz`); the paths."""
        from bench import _device

        commit = _suite.resolve_commit(commit)
        paths = _suite.result_paths(pathlib.Path(out_dir), _device.slugify(self.device_kind), commit,
                                    tag=f"profile-{_slug(self.name)}")
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        data["commit"] = commit
        paths["json"].write_text(json.dumps(data, indent=1) + "\n")
        paths["txt"].write_text(self.format(top=40) + "\n")
        written = {"json": paths["json"], "txt": paths["txt"]}
        if plot and self.plot(paths["png"]):
            written["png"] = paths["png"]
        if hlo and self.hlo_text:
            written["hlo"] = paths["json"].with_suffix(".hlo.txt.gz")
            written["hlo"].write_bytes(gzip.compress(self.hlo_text.encode()))
        return written

    def plot(self, path) -> bool:
        """A horizontal bar chart of ms per kind; False (nothing written) without matplotlib."""
        from bench import plot as _plot

        if not _plot.have_matplotlib():
            return False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        kinds = [k for k in _trace.KINDS if self.kinds.get(k)] + sorted(k for k in self.kinds if k not in _trace.KINDS)
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(kinds) + 1.5))
        values = [self.kinds[k] for k in kinds]
        colors = ["C0" if k.startswith(_trace.FUSED) else "C9" if k == _trace.DENSE else "C2" if k == _trace.VECTOR_NEURON
                  else "C3" if k == "cuDNN/cuBLAS" else "C7" for k in kinds]
        ax.barh(kinds[::-1], values[::-1], color=colors[::-1])
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:.2f} ms ({100 * self.share(v):.0f}%)", va="center", fontsize=8)
        unit = "GPU kernel" if self.source == "gpu" else "CPU thunk (host)"
        ax.set_xlabel(f"{unit} ms per step")
        ax.set_title(f"{self.name}, backend {self.backend}, {self.device_kind}: {self.kernel_ms:.1f} ms per step", fontsize=9)
        ax.set_xlim(0, max(values or [1]) * 1.35)
        fig.tight_layout()
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "step"


# ---- profiling ---------------------------------------------------------------------------------
def _module_name(hlo_text: str) -> str:
    m = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
    return m.group(1) if m else ""


def summarise(events, index: dict, steps: int) -> tuple[dict, list[KernelRow], float, float]:
    """(ms per kind, kernel rows sorted by time, total ms, launches) per step from trace events.
    A row is one kernel made by one jax op: launches of it from several HLO instructions (the
    same layer repeated, command buffers) add up, and `hlo_op` lists the instructions."""
    kinds: dict[str, float] = {}
    rows: dict[tuple[str, str, str], KernelRow] = {}
    normal = {_trace._normal(k): k for k in index}
    total, launches = 0.0, 0
    for ev in events:
        op, info = _trace.resolve(ev, index, normal)
        kind = _trace.classify(ev, info)
        ms = ev.duration_ns / 1e6 / steps
        kinds[kind] = kinds.get(kind, 0.0) + ms
        total += ms
        launches += 1
        jax_op = (info.op_name if info else "") or ev.tf_op
        row = rows.get((ev.name, kind, jax_op))
        if row is None:
            row = rows[(ev.name, kind, jax_op)] = KernelRow(
                kernel=ev.name, hlo_op=op, kind=kind, ms=0.0, launches=0.0, jax_op=jax_op,
                source=info.source if info else "",
            )
        if op not in row.hlo_ops:
            row.hlo_ops.append(op)
        row.ms += ms
        row.launches += 1 / steps
    return kinds, sorted(rows.values(), key=lambda r: -r.ms), total, launches / steps


def profile_step(
    fn: Callable,
    *args: Any,
    steps: int = 3,
    backend: Optional[str] = None,
    name: str = "step",
    trace_dir: Optional[str] = None,
    operand_layouts: str = "row-major",
) -> StepProfile:
    """Profile one step `fn(*args)` (jitted here; `backend` applies `kernels.use_backend` to every
    ConvContract whose backend is 'auto'). Returns a StepProfile; see the module docstring.

    steps: traced calls on a GPU (the report is per step); a CPU runs the step once.
    trace_dir: keep the raw trace there (default: a temporary directory, removed afterwards).
    operand_layouts: `_timing.compile_for`'s: "auto" profiles the step as one part of a larger
    program (a layer inside a model: no relayouts at the jit boundary).
    """
    import jax

    from bench import _device

    if steps < 1:
        raise ValueError(f"`steps` (={steps}) must be >= 1")
    info = _device.device_info()
    on_gpu = info["platform"] == "gpu"
    from bench import _timing

    compiled = _timing.compile_for(fn, args, backend, operand_layouts=operand_layouts)
    args = _timing.place(compiled, args)
    hlo_text = compiled.as_text() or ""
    module = _module_name(hlo_text)
    index = _trace.hlo_index(hlo_text)
    step_ms = None
    if on_gpu:
        jax.block_until_ready(compiled(*args))  # loads the kernels
        times = []
        for _ in range(max(3, steps)):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(1e3 * (time.perf_counter() - start))
        step_ms = statistics.median(times)
    else:
        steps = 1
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        where = trace_dir or tmp
        with jax.profiler.trace(where):
            for _ in range(steps):
                jax.block_until_ready(compiled(*args))
        events, source, reader = _trace.read_events(where)
    events = _trace.module_events(events, module)
    note = "" if source == "gpu" else CPU_NOTE.format(platform=info["platform"])
    if on_gpu and source != "gpu":
        note = ("the trace has no GPU kernel events (the profiler's CUPTI tracer did not start?); "
                "listing the host's XLA thunks instead")
    kinds, rows, total, launches = summarise(events, index, steps)
    if step_ms is not None and total > 1.5 * step_ms:
        note = (f"the kernels add up to {total:.1f} ms per step, more than the step's {step_ms:.1f} ms wall clock: "
                "kernels overlapped on several streams, or the trace repeats events")
    return StepProfile(
        name=name, backend=backend or "auto", platform=info["platform"], device_kind=info["device_kind"],
        jax_version=info["jax_version"], steps=steps, step_ms=step_ms, kernel_ms=total, launches=launches,
        kinds=kinds, kernels=rows, source=source, reader=reader, hlo_module=module, note=note,
        hlo_text=hlo_text,
    )


def profile_config(config: str, backend: str = "auto", mode: Optional[str] = None, steps: int = 3,
                   operand_layouts: str = "row-major") -> StepProfile:
    """profile_step on a standard bench configuration (bench/_configs.py): a model's train step,
    or a layer's `fwd_bwd` (or `mode`); a layer at `operand_layouts` "auto" is named with an
    "-auto-layouts" suffix."""
    from bench import _cases, _configs

    cfg = _configs.CONFIGS[config]
    mode = mode or cfg.modes[-1]
    if mode not in cfg.modes:
        raise ValueError(f"`--mode` (={mode!r}) must be one of {cfg.modes} for {config}")
    fn, args = _cases.build_case(cfg).function(mode)
    label = config if mode in ("step", "fwd_bwd") else f"{config}-{mode}"
    if operand_layouts != "row-major" and mode != "step":
        label += f"-{operand_layouts}-layouts"
    return profile_step(fn, *args, steps=steps, backend=backend, name=label, operand_layouts=operand_layouts)


# ---- the command -------------------------------------------------------------------------------
def parse_args(argv) -> argparse.Namespace:
    from bench import _configs, _timing

    p = argparse.ArgumentParser(prog="python -m bench profile", description=__doc__.splitlines()[0])
    p.add_argument("configs", help="config names or sets of bench/_configs.py (e.g. unet_d3_n64_b4, models)")
    p.add_argument("--backend", default="auto", help="ConvContract backend for every 'auto' layer (default auto)")
    p.add_argument("--mode", default=None, help="layer configs: fwd or fwd_bwd (default fwd_bwd)")
    p.add_argument("--out", default=None, help=f"write OUT/<device-slug>/<date>-<commit>-profile-<config>.{{json,txt,png}} (default {_suite.default_out_dir()})")
    p.add_argument("--steps", type=int, default=3, help="traced steps on a GPU (default 3)")
    p.add_argument("--operand-layouts", default="row-major", choices=_timing.OPERAND_LAYOUTS,
                   help="a layer's argument and result layouts: row-major (as handed over at a jit boundary) or "
                        "auto (XLA picks them, as inside a model: no boundary relayouts; default row-major)")
    p.add_argument("--top", type=int, default=15, help="kernels listed (default 15)")
    p.add_argument("--commit", default=None, help=f"commit id in the file names (default: ${_suite.COMMIT_ENV}, git, 'unknown')")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--hlo", action="store_true", help="also write the step's optimized HLO (<stem>.hlo.txt.gz): layouts and the copies XLA added")
    args = p.parse_args(argv)
    try:
        args.configs = _configs.parse_selection(args.configs, tuple(_configs.CONFIGS), "configs", _configs.CONFIG_SETS)
    except ValueError as err:
        p.error(str(err))
    if args.steps < 1:
        p.error(f"--steps (={args.steps}) must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import kernels

    try:
        with kernels.use_backend(args.backend):
            pass
    except ValueError as err:
        print(f"error: --backend (={args.backend!r}): {err}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out) if args.out else _suite.default_out_dir()
    summary = []
    for config in args.configs:
        start = time.perf_counter()
        report = profile_config(config, args.backend, args.mode, args.steps, args.operand_layouts)
        print(report.format(top=args.top))
        paths = report.write(out, args.commit, plot=not args.no_plot, hlo=args.hlo)
        print(f"({time.perf_counter() - start:.0f} s) wrote " + ", ".join(str(p) for p in paths.values()) + "\n", flush=True)
        summary.append(report)
    if len(summary) > 1:
        print(split_table(summary))
    return 0


def split_table(reports: list[StepProfile]) -> str:
    """One row per profiled step: wall ms, kernel ms, and the share of the main kinds."""
    cols = [f"{_trace.FUSED} fwd", f"{_trace.FUSED} input-grad", f"{_trace.FUSED} weight-grad", _trace.DENSE,
            _trace.VECTOR_NEURON, "cuDNN/cuBLAS"]
    head = ["step", "backend", "wall ms", "kernel ms", "fused fwd", "fused dx", "fused dw", "dense conv", "VectorNeuron",
            "other cuDNN/cuBLAS", "everything else"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        rest = r.kernel_ms - sum(r.kinds.get(c, 0.0) for c in cols)
        cells = [r.name, r.backend, f"{r.step_ms:.1f}" if r.step_ms is not None else "-", f"{r.kernel_ms:.1f}"]
        cells += [f"{r.kinds.get(c, 0.0):.1f} ({100 * r.share(r.kinds.get(c, 0.0)):.0f}%)" for c in cols]
        cells.append(f"{rest:.1f} ({100 * r.share(rest):.0f}%)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
