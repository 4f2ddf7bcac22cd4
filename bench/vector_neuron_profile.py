"""Run one VectorNeuron forward and backward a few times, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:"(forward|backward)_kernel" --launch-count 2 \
        --section SpeedOfLight ... python3 bench/vector_neuron_profile.py --impl cuda

The block is bench.vector_neuron_spike's: the vector output block of d3_n64_b4_c16, (4, 16, 64,
64, 64, 3), gelu (`--shape`: another, e.g. 16,32,256,256,2 for d2_n256_b16_c32's); `--affine`
adds a LayerNorm's affine map (the Triton kernels' prologue on planar blocks), `--layout` picks
the block's layout. Only the launches matter (the first
forward, then the first backward: the CUDA kernels are `forward_kernel<C, T>` /
`backward_kernel<C, T>`, Triton's `vector_neuron_fwd_*` / `vector_neuron_bwd_*`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ginjax import _vector_neuron  # noqa: E402
from ginjax._norm_stats import vector_group_norm_coefficients  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", default="cuda", choices=("xla", "triton", "cuda"))
    ap.add_argument("--shape", default="4,16,64,64,64,3", help="B,C,*spatial,3 of the vector block")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layout", default=None, choices=_vector_neuron.LAYOUTS, help="default: default_layout()")
    ap.add_argument("--affine", action="store_true",
                    help="with a LayerNorm's affine map (the Triton kernels' prologue on planar blocks)")
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[1]
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float32)
    w = jax.random.uniform(jax.random.PRNGKey(1), (c, c), jnp.float32, -c ** -0.5, c ** -0.5)
    D = len(shape) - 3

    def one(b, w):
        affine = vector_group_norm_coefficients(b, 1, D, 1e-5, "eigh", jnp.ones(c), jnp.zeros(c)) if args.affine else None
        return _vector_neuron.vector_neuron(w, b, D, jax.nn.gelu, 1e-5, layout=args.layout, impl=args.impl, affine=affine)

    def loss(x, w):  # w is an argument, so its gradient (gW's partial sums) is in the program
        return jnp.sum(jnp.sin(jax.vmap(one, in_axes=(0, None))(x, w)))

    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for _ in range(args.reps):
        jax.block_until_ready(fn(x, w))
    print("done", args)


if __name__ == "__main__":
    main()
