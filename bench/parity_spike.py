"""The parity-blocked path's switches on one layer (kernels/triton/parity_conv.py), in
bench/cuda_spike.py's format: the `triton` layer (without its bias: the same XLA passes in every
variant) under each forward tiling (GINJAX_PARITY_BLOCKS) and each weight-gradient tiling
(GINJAX_PARITY_DW_BLOCKS), or with kernels/cuda's mma.sync forward (the value `cuda`:
GINJAX_PARITY_CUDA=on, default tilings), beside `dense` on the same operands. Every variant is traced before any
is compiled, so their Triton kernels compile side by side (kernels/triton/_compile.py) instead of
one variant after another, and all are compiled before anything is timed. Forward rows carry the
error against `reference` (float32 'highest'), fwd_bwd rows the error of the value and gradients
against `dense`'s; every row its temp bytes. Rows to OUT/parity_spike.json after every stage.

    python -m bench.parity_spike OUT_DIR [--config d3_n64_b2_c8_k2]
        [--forward 64,4,1,2 cuda] [--weight-grad 32,4,8 cuda] [--spatial N --batch B]

(the defaults: Triton's forward against the CUDA one, alone and in fwd_bwd)
"""

from __future__ import annotations

import argparse
import time

import jax

import kernels
from bench import _cases, _configs, _timing
from bench._spike import TIMING, Spike, rel_l2
from kernels._env import environment
from kernels.cuda.parity_forward import PARITY_CUDA_ENV
from kernels.triton import parity_conv

CUDA = "cuda"  # a row's value: the CUDA forward (and input gradient), default tilings elsewhere


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b2_c8_k2")
    p.add_argument("--spatial", type=int, default=None, help="grid size per axis (default: the config's)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--forward", nargs="*", default=["64,4,1,2", CUDA],
                   help=f"{parity_conv.BLOCKS_ENV} values or {CUDA!r}, each a forward row")
    p.add_argument("--weight-grad", nargs="*", default=["32,4,8", CUDA],
                   help=f"{parity_conv.WEIGHT_GRAD_BLOCKS_ENV} values (the default forward) or {CUDA!r}, "
                        "each a fwd_bwd row")
    args = p.parse_args(argv)

    cfg = _configs.CONFIGS[args.config]
    spike = Spike("parity_spike", args.out, args.config, batch=args.batch, spec=_cases.layer_spec(cfg).without_bias(),
                  spatial=None if args.spatial is None else (args.spatial,) * cfg.D)
    spec = spike.spec
    operands = (spike.xs, spike.ws, spike.cots)
    triton = _cases.layer_functions(lambda x, w: kernels.conv_contract(spec, x, w, backend="triton"))
    dense = _cases.layer_functions(lambda x, w: kernels.conv_contract(spec, x, w, backend="dense"))
    spike.stage("reference", spike.reference)

    def trace(mode: str, env: str, value: str):
        # a new function object each time: jit reuses a function's trace, read switches and all
        switches = {PARITY_CUDA_ENV: "on"} if value == CUDA else {env: value}
        with environment({parity_conv.PARITY_ENV: "on", **switches}):
            return jax.jit(lambda *a: triton[mode](*a)).trace(*operands)

    traced = {f"fwd {blocks}": trace("fwd", parity_conv.BLOCKS_ENV, blocks) for blocks in args.forward}
    traced.update({f"fwd_bwd {blocks}": trace("fwd_bwd", parity_conv.WEIGHT_GRAD_BLOCKS_ENV, blocks)
                   for blocks in args.weight_grad})

    oracle = {}

    def timed(fn, keep=None):
        def run():
            result, timing, extra = _timing.compile_and_time(fn, operands, **TIMING)
            if keep:
                oracle[keep] = result
            return {**timing.as_ms(), **extra}
        return run

    executables: dict = {}

    def compile_all():
        # every variant compiled before anything is timed: Triton's compile threads hold the GIL
        # in turns, and the timing loop they delay ran `dense` at 16-22 ms against bench's 3.1
        seconds = {}
        for name, t in traced.items():
            t0 = time.perf_counter()
            try:
                executables[name] = t.lower().compile()
            except Exception as exc:  # the variant's own stage reports it
                executables[name] = exc
            seconds[name] = round(time.perf_counter() - t0, 1)
        return {"compile_s": seconds}

    def variant(name):
        def run():
            compiled = executables[name]
            if isinstance(compiled, Exception):
                raise compiled
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*operands))
            first_s = time.perf_counter() - t0
            if name.startswith("fwd_bwd"):
                want = oracle.get("fwd_bwd")
                err = None if want is None else rel_l2(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want))
            else:
                err = rel_l2(out, spike.ref)
            row = {"rel_l2": err, **_timing.memory_of(compiled)}
            return {**row, **_timing.time_compiled(compiled, operands, first_call_s=first_s, **TIMING).as_ms()}
        return run

    spike.stage("compile", compile_all)
    spike.stage("dense fwd", timed(dense["fwd"]))
    if args.weight_grad:
        spike.stage("dense fwd_bwd", timed(dense["fwd_bwd"], keep="fwd_bwd"))
    for name in traced:
        spike.stage(name, variant(name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
