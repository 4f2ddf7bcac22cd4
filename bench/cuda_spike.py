"""The CUDA kernels (kernels/cuda) on one standard layer, in bench/mosaic_spike.py's format:
correctness against `reference` (float32 'highest'), then kernel-level forward times of cuda
(per strip), triton and dense on the same operands; then the weight gradient: cuda's
(weight_gradient_call, per strip) against triton's weight-gradient kernel and dense's weight VJP,
each with its rel L2 against `reference`'s weight VJP and its temp bytes. Each stage guarded, rows
to OUT/cuda_spike.json after every stage (bench/_spike.py).

    python -m bench.cuda_spike OUT_DIR [--config d3_n64_b4_c16] [--strip 32 16 64] [--dw-strip 64 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

import kernels
from bench import _timing
from bench._spike import TIMING, Spike, rel_l2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--strip", type=int, nargs="*", default=[32, 16, 64])
    p.add_argument("--dw-strip", type=int, nargs="*", default=[64, 32], help="weight-gradient strips to time")
    args = p.parse_args(argv)
    from kernels import cuda

    spike = Spike("cuda_spike", args.out, args.config, availability=cuda.availability())
    spec = spike.spec

    def strip_rows(strip):
        blocks = cuda.BlockSizes(strip_rows=strip)
        one = lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks)  # noqa: E731
        return spike.correct_and_time(jax.vmap(one, in_axes=(0, None)))

    spike.stage("reference", spike.reference)
    for strip in args.strip:
        spike.stage(f"cuda_strip{strip}", strip_rows(strip))
    spike.stage("triton", spike.timed(spike.layer("triton")))
    spike.stage("dense", spike.timed(spike.layer("dense")))
    weight_gradient_stages(spike, args.dw_strip)
    return 0


def weight_gradient_stages(spike: Spike, strips) -> None:
    """dW of the batch (shared weights) for the spike's operands and seed-1 cotangents."""
    from kernels import cuda
    from kernels._fused import resolve_block_sizes
    from kernels.cuda import _dw_plan

    spec, xs, ws, cots = spike.spec, spike.xs, spike.ws, spike.cots
    spatial, batch = tuple(spike.rows["spatial"]), spike.rows["batch"]
    state = {}

    def vjp_of(backend):
        def dw(xs, cots):
            run = lambda ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend))(xs)  # noqa: E731
            return jax.vjp(run, ws)[1](tuple(cots))[0]
        return dw

    def reference():
        with jax.default_matmul_precision("highest"):
            state["ref"] = [jax.block_until_ready(r) for r in jax.jit(vjp_of("reference"))(xs, cots)]
        return {}

    def timed(fn, **extra):
        def run():
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(xs, cots).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(xs, cots))
            first_s = time.perf_counter() - t0
            err = rel_l2(out, state["ref"])
            finite = all(bool(jnp.all(jnp.isfinite(o))) for o in out)
            row = {"rel_l2": err, "finite": finite, "pass_tf32": bool(err <= kernels.TOLERANCE["tf32"] and finite),
                   "compile_s": round(compile_s, 1), **_timing.memory_of(compiled), **extra}
            timing = _timing.time_compiled(compiled, (xs, cots), first_call_s=first_s, **TIMING)
            return {**row, **timing.as_ms()}
        return run

    def cuda_dw(strip):
        per = jax.vmap(lambda x, g: cuda.weight_gradient_call(spec, x, g, strip=strip))
        return lambda xs, cots: [jnp.sum(d, axis=0) for d in per(xs, cots)]  # noqa: E731

    def triton_dw(xs, cots):
        from kernels.triton import BlockSizes
        from kernels.triton.conv_contract import _batched_weight_grad

        blocks = resolve_block_sizes(None, BlockSizes, spec, spatial)
        outs = _batched_weight_grad(spec, "tf32", blocks, ())(tuple(xs), tuple(cots))
        return [jnp.sum(d, axis=0) for d in outs[: len(spec.pairs)]]

    spike.stage("dw_reference", reference)
    for strip in strips:
        scratch = _dw_plan.scratch_bytes(spec, spatial, strip, batch)
        spike.stage(f"cuda_dw_strip{strip}", timed(cuda_dw(strip), scratch_bytes=scratch))
    spike.stage("triton_dw", timed(triton_dw))
    spike.stage("dense_dw", timed(vjp_of("dense")))


if __name__ == "__main__":
    raise SystemExit(main())
