"""The CUDA forward kernel (kernels/cuda) on one standard layer, in bench/mosaic_spike.py's format:
correctness against `reference` (float32 'highest'), then kernel-level forward times of cuda,
triton and dense on the same operands; each stage guarded, rows to OUT/cuda_spike.json after
every stage (bench/_spike.py).

    python -m bench.cuda_spike OUT_DIR [--config d3_n64_b4_c16] [--strip 32]
"""

from __future__ import annotations

import argparse

import jax

from bench._spike import Spike


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--strip", type=int, nargs="*", default=[32, 16, 64])
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
