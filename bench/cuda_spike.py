"""The CUDA forward kernel (kernels/cuda) on one standard layer, in bench/mosaic_spike.py's format:
correctness against `reference` (float32 'highest'), then kernel-level forward times of cuda
(each BlockSizes.variant, v2 and v3, per strip),
triton and dense on the same operands; each stage guarded, rows to OUT/cuda_spike.json after
every stage (bench/_spike.py).

    python -m bench.cuda_spike OUT_DIR [--config d3_n64_b4_c16] [--strip 32] [--variants v2 v3]
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
    p.add_argument("--variants", nargs="*", default=["v2", "v3"], help="BlockSizes.variant values to time")
    args = p.parse_args(argv)
    from kernels import cuda

    spike = Spike("cuda_spike", args.out, args.config, availability=cuda.availability())
    spec = spike.spec

    def strip_rows(strip, variant):
        blocks = cuda.BlockSizes(strip_rows=strip, variant=variant)
        one = lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks)  # noqa: E731
        return spike.correct_and_time(jax.vmap(one, in_axes=(0, None)))

    spike.stage("reference", spike.reference)
    # v2 keeps its stage names (cuda_strip32, ...: session 9's rows); v3's interleaved per strip so
    # each pair runs in the same stretch of the process
    for strip in args.strip:
        for variant in args.variants:
            name = f"cuda_strip{strip}" if variant == "v2" else f"cuda_{variant}_strip{strip}"
            spike.stage(name, strip_rows(strip, variant))
    spike.stage("triton", spike.timed(spike.layer("triton")))
    spike.stage("dense", spike.timed(spike.layer("dense")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
