"""Reading a jax.profiler trace of a compiled step: which kernels ran, how long, and what made them.

Two sources, both written by `jax.profiler.trace(dir)` (no extra dependencies):
- the XSpace protobuf `*.xplane.pb`, read with jaxlib's ProfileData (`jax.profiler.ProfileData`,
  or `jax._src.lib._profile_data` where the public name is missing);
- the perfetto/Chrome trace `*.trace.json.gz`, the fallback when ProfileData cannot be imported
  or cannot read the file.

On a GPU the kernels are the events of the `/device:GPU:N` planes (one line per stream), carrying
`hlo_op` and `hlo_module` stats. On a CPU there is no device plane: the XLA CPU runtime's thunks
(events with an `hlo_op` stat on `/host:CPU`) stand in for them, so the same parser is exercised
on both, but CPU thunk times are host times, not kernel times.

The compiled executable's HLO text (`hlo_index`) names, per instruction, its opcode, fusion kind,
custom-call target and the jax op that made it (`op_name`, the name stack) with its source line;
`classify` sorts a kernel into the kinds of the step profile from those.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
from typing import Iterable, Optional

from kernels.cuda import _ffi

# Lines of a device plane that profiler tooling derives from the stream lines (their events
# repeat the kernels' time); only the raw stream lines are summed.
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Framework Ops", "Framework Name Scope", "Steps", "Source code",
                  "Launch Stats", "XLA TraceMe")
_GPU_PLANE = re.compile(r"^/device:GPU:(\d+)")


@dataclasses.dataclass
class KernelEvent:
    """One kernel launch (or CPU thunk) of the trace."""

    name: str
    duration_ns: float
    hlo_op: str = ""
    hlo_module: str = ""
    tf_op: str = ""  # the name stack where the trace carries it
    device: str = ""


# ---- reading a trace ---------------------------------------------------------------------------
def _profile_data_class():
    import jax.profiler

    cls = getattr(jax.profiler, "ProfileData", None)
    if cls is None:
        from jax._src.lib import _profile_data  # older/newer layouts keep the class here

        cls = _profile_data.ProfileData
    return cls


def find_trace_files(trace_dir: str) -> tuple[Optional[str], Optional[str]]:
    """(newest *.xplane.pb, newest *.trace.json.gz) under a jax.profiler.trace directory."""

    def newest(pattern):
        found = glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True)
        return max(found, key=os.path.getmtime) if found else None

    return newest("*.xplane.pb"), newest("*.trace.json.gz")


def _event_from_stats(name: str, duration_ns: float, stats: dict, device: str) -> KernelEvent:
    tf_op = str(stats.get("tf_op", "") or stats.get("name", "") or "")
    return KernelEvent(
        name=name,
        duration_ns=float(duration_ns),
        hlo_op=str(stats.get("hlo_op", "") or ""),
        hlo_module=str(stats.get("hlo_module", "") or ""),
        tf_op="" if tf_op.startswith("XlaModule") else tf_op,  # a module label, not a jax op
        device=device,
    )


def _is_stream_line(line_names: list[str], name: str) -> bool:
    if any(n.startswith("Stream") for n in line_names):
        return name.startswith("Stream")
    return name not in _DERIVED_LINES


def events_from_xplane(path: str) -> tuple[list[KernelEvent], str]:
    """Kernel events of an .xplane.pb and where they came from ('gpu' or 'cpu-thunks')."""
    return events_from_profile_data(_profile_data_class().from_file(path))


def events_from_profile_data(data) -> tuple[list[KernelEvent], str]:
    """The same from a ProfileData (e.g. `ProfileData.from_text_proto` of a hand-written XSpace)."""
    gpu, cpu = [], []
    for plane in data.planes:
        match = _GPU_PLANE.match(plane.name)
        if match:
            lines = list(plane.lines)
            names = [line.name for line in lines]
            for line in lines:
                if not _is_stream_line(names, line.name):
                    continue
                for ev in line.events:
                    gpu.append(_event_from_stats(ev.name, ev.duration_ns, dict(ev.stats), plane.name))
        elif plane.name == "/host:CPU":
            for line in plane.lines:
                for ev in line.events:
                    stats = dict(ev.stats)
                    if "hlo_op" in stats:
                        cpu.append(_event_from_stats(ev.name, ev.duration_ns, stats, plane.name))
    return (gpu, "gpu") if gpu else (cpu, "cpu-thunks")


def events_from_trace_json(path: str) -> tuple[list[KernelEvent], str]:
    """The same from the perfetto/Chrome trace JSON (durations there are microseconds)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        data = json.load(fh)
    process = {e["pid"]: e.get("args", {}).get("name", "") for e in data.get("traceEvents", [])
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in data.get("traceEvents", [])
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu, cpu = [], []
    by_pid: dict = {}
    for (pid, _), name in threads.items():
        by_pid.setdefault(pid, []).append(name)
    for e in data.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        plane = process.get(e.get("pid"), "")
        args = e.get("args", {}) or {}
        duration_ns = 1e3 * float(e.get("dur", 0.0))
        if _GPU_PLANE.match(plane):
            line = threads.get((e["pid"], e.get("tid")), "")
            if _is_stream_line(by_pid.get(e["pid"], []), line):
                gpu.append(_event_from_stats(e.get("name", ""), duration_ns, args, plane))
        elif plane == "/host:CPU" and "hlo_op" in args:
            cpu.append(_event_from_stats(e.get("name", ""), duration_ns, args, plane))
    return (gpu, "gpu") if gpu else (cpu, "cpu-thunks")


def read_events(trace_dir: str) -> tuple[list[KernelEvent], str, str]:
    """(events, source kind, how it was read) from a jax.profiler.trace directory.

    The xplane protobuf first; the trace JSON when ProfileData is missing or fails on it.
    Raises FileNotFoundError naming the directory when the profiler wrote neither.
    """
    xplane, trace_json = find_trace_files(trace_dir)
    problems = []
    if xplane:
        try:
            events, source = events_from_xplane(xplane)
            return events, source, f"ProfileData({os.path.basename(xplane)})"
        except Exception as err:  # noqa: BLE001 - any reader failure falls back to the JSON
            problems.append(f"ProfileData could not read {xplane}: {type(err).__name__}: {err}")
    if trace_json:
        events, source = events_from_trace_json(trace_json)
        return events, source, f"trace JSON ({os.path.basename(trace_json)})" + (f"; {problems[0]}" if problems else "")
    raise FileNotFoundError(
        f"`trace_dir` (={trace_dir!r}) holds no *.xplane.pb or *.trace.json.gz: the profiler wrote no trace"
        + (f" ({'; '.join(problems)})" if problems else "")
    )


# ---- the executable's HLO ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HloInfo:
    opcode: str = ""
    fusion_kind: str = ""  # kLoop, kInput, kOutput, kCustom
    backend_kind: str = ""  # a kCustom fusion's kind, e.g. __triton_gemm, __cudnn$fusion
    target: str = ""  # a custom call's target
    op_name: str = ""  # the jax name stack of the op that made it
    source: str = ""  # file:line of the innermost frame, where the HLO text carries stack frames
    source_path: str = ""  # that frame's file, as the HLO text names it


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"(?:^|[\s)}])([a-z][a-z0-9\-_]*)\(")
_KV = {
    "fusion_kind": re.compile(r"\bkind=(k\w+)"),
    "backend_kind": re.compile(r'"kind":"([^"]+)"'),
    "target": re.compile(r'custom_call_target="([^"]+)"'),
    "op_name": re.compile(r'op_name="([^"]*)"'),
}
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")


# where a step's model code lives: ginjax's models, layers and training loop (not ConvContract's
# dispatch, which every convolution passes through)
_MODEL_CODE = re.compile(r"ginjax/(models/|ml/|layers\.py|geometric/)")


def _source_frames(text: str) -> dict[int, tuple[str, str]]:
    """stack frame id -> ('file:line (function)', path of that file) from the HLO text's
    FileNames/.../StackFrames: the innermost frame, and after ' <- ' the innermost one in a model
    or layer of ginjax (where the step's code made the op) when that is another frame."""
    sections: dict[str, dict[int, str]] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = sections.setdefault(stripped, {})
            continue
        if not stripped or current is None:
            if not stripped:
                current = None
            continue
        head, _, rest = stripped.partition(" ")
        if head.isdigit():
            current[int(head)] = rest
    files = {k: v.strip('"') for k, v in sections.get("FileNames", {}).items()}
    funcs = {k: v.strip('"') for k, v in sections.get("FunctionNames", {}).items()}

    def field(text, name):
        m = re.search(rf"\b{name}=(\d+)", text)
        return int(m.group(1)) if m else None

    locations = {}
    for k, v in sections.get("FileLocations", {}).items():
        f, fn, ln = field(v, "file_name_id"), field(v, "function_name_id"), field(v, "line")
        locations[k] = (files.get(f, "?"), f"{os.path.basename(files.get(f, '?'))}:{ln} ({funcs.get(fn, '?')})")
    frames = {k: (locations.get(field(v, "file_location_id")), field(v, "parent_frame_id"))
              for k, v in sections.get("StackFrames", {}).items()}
    out = {}
    for k, (loc, parent) in frames.items():
        if loc is None:
            continue
        text, seen, caller = loc[1], {k}, None
        while parent and parent not in seen and parent in frames:
            seen.add(parent)
            ploc, parent = frames[parent]
            if ploc and _MODEL_CODE.search(ploc[0]):
                caller = ploc[1]
                break
        out[k] = (text if caller is None or _MODEL_CODE.search(loc[0]) else f"{text} <- {caller}", loc[0])
    return out


_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


def hlo_index(hlo_text: str) -> dict[str, HloInfo]:
    """Instruction name -> HloInfo for every instruction of an HLO module's text.

    A fusion whose own metadata names no jax op takes that of its fused computation's root (or
    of the computation's last instruction that has one).
    """
    frames = _source_frames(hlo_text)
    out: dict[str, HloInfo] = {}
    calls: dict[str, str] = {}
    computation_op: dict[str, tuple[str, str]] = {}
    current = ""
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and " = " not in line.split("(")[0]:
            current = head.group(1)
            continue
        m = _INSTR.match(line)
        if not m or line.lstrip().startswith(("HloModule", "}")):
            continue
        name, rest = m.groups()
        op = _OPCODE.search(rest)
        fields = {k: (r.search(rest).group(1) if r.search(rest) else "") for k, r in _KV.items()}
        frame = _FRAME_ID.search(rest)
        source, source_path = frames.get(int(frame.group(1)), ("", "")) if frame else ("", "")
        info = HloInfo(opcode=op.group(1) if op else "", source=source, source_path=source_path, **fields)
        out[name] = info
        if info.op_name and (line.lstrip().startswith("ROOT") or current not in computation_op):
            computation_op[current] = (info.op_name, info.source, info.source_path)
        called = _CALLS.search(rest)
        if called:
            calls[name] = called.group(1)
    for name, computation in calls.items():
        if not out[name].op_name and computation in computation_op:
            op_name, source, path = computation_op[computation]
            if not out[name].source:
                out[name] = dataclasses.replace(out[name], source=source, source_path=path)
            out[name] = dataclasses.replace(out[name], op_name=op_name)
    return out


def _normal(name: str) -> str:
    # kernels are named after their instruction with '.' as '_': fusion.12 -> fusion_12
    return name.replace(".", "_")


def in_command_buffer(event: KernelEvent) -> bool:
    """Whether XLA launched the kernel inside a command buffer (a CUDA graph): then `hlo_op`
    names the buffer, and only the kernel's own name says which instruction it runs."""
    return event.hlo_op.startswith("command_buffer")


def resolve(event: KernelEvent, index: dict, normal: Optional[dict] = None) -> tuple[str, Optional[HloInfo]]:
    """(instruction name, HloInfo) of the instruction a kernel runs: its `hlo_op`, else (command
    buffers, traces without the stat) the instruction its kernel name is made from."""
    if normal is None:
        normal = {_normal(k): k for k in index}
    for name in ((event.hlo_op,) if event.hlo_op and not in_command_buffer(event) else ()) + (event.name,):
        key = name if name in index else normal.get(_normal(name))
        if key is not None:
            return key, index[key]
    return (event.name if in_command_buffer(event) or not event.hlo_op else event.hlo_op), None


# ---- classification ----------------------------------------------------------------------------
FUSED = "ConvContract fused"
# ConvContract layers that `auto` (or the caller) sent to the dense backend: library convolutions
# and GEMMs made by its lax path (kernels/dense.py, _lax_common.py, _resample.py's sub-pixel GEMMs)
DENSE = "ConvContract dense (cuDNN/cuBLAS)"
VECTOR_NEURON = "VectorNeuron fused"
# kernels/triton/channel_sums.py: the norms' statistics and the bias and affine gradients, per channel
CHANNEL_SUMS = "channel sums fused"
KINDS = (
    f"{FUSED} fwd", f"{FUSED} input-grad", f"{FUSED} weight-grad", DENSE, VECTOR_NEURON, CHANNEL_SUMS,
    "cuDNN/cuBLAS", "XLA gemm fusion", "XLA loop fusion", "XLA input fusion", "XLA reduce fusion",
    "XLA output fusion", "XLA custom fusion", "copy/transpose", "other",
)
_LIBRARY_KERNEL = re.compile(r"cudnn|cublas|cutlass|xmma|implicit_gemm|nvjet|gemm|sm\d\d_|winograd|fft", re.I)
_BACKWARD_STACK = re.compile(r"\btranspose\(")
_DENSE_PATH = re.compile(r"(^|/)kernels/(dense|_lax_common|_resample)\.py$")


def fused_direction(kernel: str, op_name: str) -> Optional[str]:
    """The direction of a fused ConvContract kernel ('fwd', 'input-grad', 'weight-grad'), or None
    when the kernel is not one. The fused kernels are named `conv_contract...`; the weight gradient's
    carry `_dw`, the input gradient's `_dx`, except where the backward runs the forward kernel on
    the transposed layer: then only the name stack (jax's `transpose(...)`) tells."""
    base = kernel.lower()
    if "conv_contract" not in base and not ("conv_contract" in op_name and "custom" in base):
        return None
    if "_dw" in base:
        return "weight-grad"
    if "_dx" in base or _BACKWARD_STACK.search(op_name):
        return "input-grad"
    return "fwd"


def _cuda_direction(kernel: str, target: str, op_name: str) -> Optional[str]:
    """The direction of a kernels/cuda ConvContract kernel, from its FFI target (its kernel names,
    `forward_kernel<...>`, are shared with the VectorNeuron's): the forward kernel runs the input
    gradient too (on the transposed layer), which only the name stack tells."""
    if target == _ffi.DW_TARGET or kernel.startswith("void (anonymous namespace)::weight_gradient_kernel"):
        return "weight-grad"
    # INTO: an output group's launch past the first; ADD: residuals added in the epilogue
    if target in (_ffi.TARGET, _ffi.INTO_TARGET, _ffi.ADD_TARGET, _ffi.INTO_ADD_TARGET):
        return "input-grad" if _BACKWARD_STACK.search(op_name) else "fwd"
    return None


def classify(event: KernelEvent, info: Optional[HloInfo]) -> str:
    """The profile kind of one kernel (see KINDS)."""
    info = info or HloInfo()
    op_name = info.op_name or event.tf_op
    direction = fused_direction(event.name, op_name) or _cuda_direction(event.name, info.target, op_name)
    if info.target.startswith("ginjax_cuda_vn_"):
        return VECTOR_NEURON
    if direction is None and info.opcode == "custom-call" and "conv_contract" in op_name and not re.search(
        "cudnn|cublas", info.target, re.I
    ):
        direction = "input-grad" if _BACKWARD_STACK.search(op_name) else "fwd"
    if direction:
        return f"{FUSED} {direction}"
    hlo = (event.name if in_command_buffer(event) or not event.hlo_op else event.hlo_op).lower()
    name = event.name.lower()
    if name.startswith("vector_neuron_"):  # kernels/triton/vector_neuron.py (and its partial sums)
        return VECTOR_NEURON
    if name.startswith("channel_sums_"):
        return CHANNEL_SUMS
    # a library call is ConvContract's when its lax path made it (the layer ran on `dense`)
    library = DENSE if _DENSE_PATH.search(info.source_path) else "cuDNN/cuBLAS"
    if re.search("cudnn|cublas", info.target + info.backend_kind, re.I) or hlo.startswith(("cudnn", "cublas")):
        return library
    if "gemm" in info.backend_kind or "gemm_fusion" in hlo or "triton_gemm" in hlo:
        return "XLA gemm fusion"
    if info.opcode in ("copy", "transpose", "copy-start", "copy-done") or "transpose" in hlo or hlo.startswith("copy") \
            or "memcpy" in name or "memset" in name:
        return "copy/transpose"
    kind = info.fusion_kind or _kind_from_name(hlo)
    if kind == "kInput":
        return "XLA reduce fusion" if "reduce" in hlo or info.opcode == "reduce" else "XLA input fusion"
    if kind:
        return {"kLoop": "XLA loop fusion", "kOutput": "XLA output fusion", "kCustom": "XLA custom fusion"}.get(kind, "other")
    if info.opcode in ("reduce", "reduce-window"):
        return "XLA reduce fusion"
    if info.opcode in ("convolution", "dot"):  # unfused: a library call (cuDNN/cuBLAS; on a CPU Eigen/oneDNN)
        return library
    if not info.opcode and _LIBRARY_KERNEL.search(name):
        return library
    return "other"


def _kind_from_name(hlo_op: str) -> str:
    # XLA names fusions after their kind when the HLO text is not at hand
    for prefix, kind in (("loop_", "kLoop"), ("wrapped_", "kLoop"), ("input_", "kInput"), ("output_", "kOutput")):
        if hlo_op.startswith(prefix):
            return kind
    return ""


def module_events(events: Iterable[KernelEvent], module: Optional[str]) -> list[KernelEvent]:
    """The events of one HLO module: those naming it (or a suffixed copy, `jit_f.1`) or no module.
    All of them when `module` is None, no event names a module, or none names this one (a
    runtime that renames modules must not leave the profile empty)."""
    events = list(events)
    if not module or not any(e.hlo_module for e in events):
        return events
    ours = [e for e in events if not e.hlo_module or e.hlo_module == module or e.hlo_module.startswith(module + ".")]
    return ours if any(e.hlo_module for e in ours) else events
