"""Run one fused forward (and optionally its backward) a few times, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:conv_contract --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight ... python3 bench/triton_profile.py [--config d3_n64_b4_c16] [--bwd]

Only the launches matter: the layer and data are bench/triton_sweep.py's.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from bench.triton_sweep import CONFIGS, layer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="d3_n64_b4_c16")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--bwd", action="store_true", help="forward and backward")
    ap.add_argument("--reps", type=int, default=4)
    args = ap.parse_args()
    spec, xs, ws = layer(*CONFIGS[args.config])
    run = lambda xs, ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=args.backend))(xs)
    if args.bwd:
        fn = jax.jit(jax.grad(lambda xs, ws: sum(jnp.sum(o * o) for o in run(xs, ws)), argnums=(0, 1)))
    else:
        fn = jax.jit(run)
    for _ in range(args.reps):
        jax.block_until_ready(fn(xs, ws))
    print("done", args)


if __name__ == "__main__":
    main()
