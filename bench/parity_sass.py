"""Offline sm_90 SASS of a parity-blocked kernel (kernels/triton/_parity_source.py), without a GPU:
Triton compiles the generated source for GPUTarget("cuda", 90, 32) and the cuobjdump Triton ships
reports the registers, stack and shared memory a thread, and the SASS opcode counts that say what
each dot costs (HGMMA / HMMA, the shared-memory trips STS / STSM / LDS, BAR, FENCE, MEMBAR) and
whether it spills (LDL / STL). Counts are of the whole kernel, a loop body once.

    python -m bench.parity_sass [--config d3_n64_b2_c8_k2] [--kernel fwd|dw] [--block-x 64]
        [--warps 4] [--concat 1] [--lookahead 2] [--out-width 128] [--group 0] [--cls 0]

fwd: the forward of output group --group (groups of at most --out-width accumulator columns);
dw: the weight gradient of input class index --cls. The device runs Triton 3.6; counts from
another Triton version are estimates of it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

OPCODES = ("HGMMA", "HMMA", "LDG", "LDS", "STS", "STSM", "BAR", "FENCE", "MEMBAR", "LDL", "STL", "FADD")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity_sass")
    p.add_argument("--config", default="d3_n64_b2_c8_k2")
    p.add_argument("--kernel", choices=("fwd", "dw"), default="fwd")
    p.add_argument("--block-x", type=int, default=64)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--concat", type=int, default=1)
    p.add_argument("--lookahead", type=int, default=2)
    p.add_argument("--out-width", type=int, default=128, help="fwd: accumulator columns a program keeps")
    p.add_argument("--group", type=int, default=0, help="fwd: the output group")
    p.add_argument("--cls", type=int, default=0, help="dw: the input class index")
    p.add_argument("--precision", default="tf32")
    args = p.parse_args(argv)

    # this tool compiles for a GPU, never interprets; and a triton imported under the interpreter
    # cannot compile (bench/_offline.py): refuse that rather than fail inside Triton
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    import triton

    if triton.knobs.runtime.interpret:
        raise SystemExit("bench.parity_sass needs triton imported without TRITON_INTERPRET: run it as "
                         "`python -m bench.parity_sass` (tests: in a subprocess)")

    from bench import _cases, _configs, _offline, sass_loop
    from kernels.triton import _parity_plan, _parity_source, parity_conv

    cfg = _configs.CONFIGS[args.config]
    spec = _cases.layer_spec(cfg)
    layer = _parity_plan.packed_layer(spec)
    plan = layer.plan
    spatial = tuple(cfg.spatial)
    slabs = 8
    if args.kernel == "fwd":
        group = plan.out_groups(args.out_width)[args.group]
        out = None  # as the layer runs it: its blocks written by the kernel where one launch holds every class,
        if len(group) == len(plan.out_classes):  # with its bias offsets, no residual
            offsets = tuple(mode != "none" for mode in spec.bias_modes)
            rows = parity_conv.BlockRows.of(spec.D, spec.out_keys, layer.out_order)
            out = rows.epilogue(offsets, (False,) * len(spec.out_keys))
        batched = (True, False) + ((False,) * sum(out.offsets) if out is not None else ())
        source, programs = _parity_source.forward_source(
            plan, spatial, group, args.block_x, batched, args.precision, "k", args.concat, args.lookahead, out)
    else:
        source, programs = _parity_source.weight_grad_source(plan, spatial, args.cls, args.block_x, slabs,
                                                             args.concat, (True, True), args.precision, "k",
                                                             g_halo=True)
    start = time.perf_counter()
    compiled = _offline.compile_for_hopper(_parity_source.kernel_plan("k", source, programs, args.warps))
    seconds = time.perf_counter() - start
    with _offline.written_cubin(compiled) as fh:
        usage = _offline.resource_usage(fh.name)
        sass = sass_loop.disassemble(fh.name, str(_offline.cuobjdump()))
    resources = " ".join(re.findall(r"(?:REG|STACK|SHARED):\d+", usage))
    print(f"{args.config} {args.kernel} block_x {args.block_x} warps {args.warps} concat {args.concat} "
          f"lookahead {args.lookahead} (triton {triton.__version__}, compile {seconds:.1f} s): {resources}")
    counts = {op: len(re.findall(r"\b" + op + r"[.\s]", sass)) for op in OPCODES}
    print("  " + "  ".join(f"{op} {n}" for op, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
