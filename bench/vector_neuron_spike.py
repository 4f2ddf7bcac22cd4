"""The VectorNeuron nonlinearity of one vector block, ginjax's XLA path against the fused Triton
kernels (kernels/triton/vector_neuron.py), forward and forward + backward, in the spikes' format
(bench/_spike.py: each stage guarded, rows to OUT/vector_neuron_spike.json after every stage).

The block is the vector key of a standard layer's output: (B, c, N, N, N, 3) of the config, gelu
(the models' default) unless --activation says otherwise. Correctness is against the XLA path
at matmul precision 'highest' (the kernels' dots are fp32 "ieee"); the XLA rows run at the
default precision, as in a model step.

    python -m bench.vector_neuron_spike OUT_DIR [--config d3_n64_b4_c16] [--activation gelu]
                                                [--tilings 32/4/32/4 128/8/32/8 ...]
                                                [--channels C --spatial N --batch B]

--channels, --spatial and --batch replace the config's block by a random normal one of that many
channels, cells a side and examples (the config still gives D): the blocks of a UNet's deeper
levels, wider than any standard layer's.

Where the opt-in CUDA library is built (kernels/cuda/README.md) and covers the block, cuda_fwd and
cuda_fwd_bwd rows (kernels.cuda.vector_neuron_cuda, through GINJAX_VN_IMPL's "cuda" path) follow
the triton ones, then its variants: cuda_fwd_bwd_ffma (GINJAX_VN_CUDA_MMA=0: the FFMA backward for
16 channels) and cuda_fwd_bwd_triton_fwd (GINJAX_VN_CUDA_FORWARD=triton: Triton's forward beside
the CUDA backward); otherwise the rows' "cuda" says why not. After the default tiling's rows,
fwd_bwd of the kernels at the other tilings given as PIXELS/WARPS/BWD_PIXELS/BWD_WARPS
(kernels.triton.VNBlocks): the defaults were picked from ptxas' register counts, not from timings.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from bench._spike import Spike
from kernels._env import environment

EPS = 1e-5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vector_neuron_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--activation", choices=("gelu", "relu"), default="gelu")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--tilings", nargs="*", default=["32/4/16/4", "128/8/64/8", "64/8/32/8", "256/8/16/8"])
    p.add_argument("--channels", type=int, help="a random block of this many channels instead of the config's")
    p.add_argument("--spatial", type=int, help="cells a side of the block (default: the config's)")
    p.add_argument("--batch", type=int, help="examples in the block (default: the config's)")
    args = p.parse_args(argv)
    for name in ("channels", "spatial", "batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} (={getattr(args, name)}) must be >= 1")
    from ginjax import _vector_neuron
    from kernels import triton

    activation = getattr(jax.nn, args.activation)
    spike = Spike("vector_neuron_spike", args.out, args.config, availability=triton.availability(),
                  activation=args.activation)
    # the layer's vector output block, and a VectorNeuron weight as the layer initialises it
    block = spike.xs[1] if len(spike.xs) > 1 else spike.xs[0]
    if args.channels or args.spatial or args.batch:
        D = spike.spec.D
        shape = (args.batch or block.shape[0], args.channels or block.shape[1],
                 *(args.spatial or block.shape[2],) * D, D)
        block = jax.random.normal(jax.random.PRNGKey(2), shape, jnp.float32)
    c, D = block.shape[1], spike.spec.D  # (B, c, *spatial, D): a vector block of D=2 or 3
    weight = jax.random.uniform(jax.random.PRNGKey(0), (c, c), jnp.float32, -c ** -0.5, c ** -0.5)
    spike.xs, spike.ws = block, weight
    spike.rows["block"] = list(block.shape)

    def fwd(impl, blocks=None):
        def one(w, b):
            if blocks is not None:
                return triton.vector_neuron_triton(w, b, D, activation, EPS, blocks)
            return _vector_neuron.vector_neuron(w, b, D, activation, EPS, impl=impl)

        def f(x, w):
            for _ in range(args.repeat):
                x = jax.vmap(lambda b: one(w, b))(x)
            return (x,)
        return f

    def fwd_bwd(impl, blocks=None):
        # value and both gradients of a loss whose cotangent depends on the output
        def f(x, w):
            loss = lambda x, w: jnp.sum(jnp.sin(fwd(impl, blocks)(x, w)[0]))  # noqa: E731
            value, (gx, gw) = jax.value_and_grad(loss, argnums=(0, 1))(x, w)
            return gx, gw
        return f

    def reference(fn):
        def run():
            with jax.default_matmul_precision("highest"):
                spike.ref = [jax.block_until_ready(r) for r in jax.jit(fn)(spike.xs, spike.ws)]
            return {}
        return run

    # the CUDA kernels (opt-in library, kernels/cuda/README.md) where built and covering the block
    cuda_ok, cuda_why = _vector_neuron.cuda_covers(weight, block[0], D, activation, EPS)
    spike.rows["cuda"] = "covered" if cuda_ok else cuda_why
    spike.stage("reference_fwd", reference(fwd("xla")))
    spike.stage("triton_fwd", spike.correct_and_time(fwd("triton")))
    if cuda_ok:
        spike.stage("cuda_fwd", spike.correct_and_time(fwd("cuda")))
    spike.stage("xla_fwd", spike.correct_and_time(fwd("xla")))
    spike.stage("reference_fwd_bwd", reference(fwd_bwd("xla")))
    spike.stage("triton_fwd_bwd", spike.correct_and_time(fwd_bwd("triton")))
    if cuda_ok:
        spike.stage("cuda_fwd_bwd", spike.correct_and_time(fwd_bwd("cuda")))
        for row, env, value in (("cuda_fwd_bwd_ffma", "GINJAX_VN_CUDA_MMA", "0"),
                                ("cuda_fwd_bwd_triton_fwd", "GINJAX_VN_CUDA_FORWARD", "triton")):
            spike.stage(row, _with_env(env, value, spike.correct_and_time(fwd_bwd("cuda"))))
    spike.stage("xla_fwd_bwd", spike.correct_and_time(fwd_bwd("xla")))
    spike.rows["repeat"] = args.repeat
    fields = ("pixels", "num_warps", "bwd_pixels", "bwd_num_warps", "groups", "bwd_stages", "precision")
    for tiling in args.tilings:
        values = tiling.split("/")
        if not 4 <= len(values) <= len(fields):
            p.error(f"--tilings: {tiling!r} is not PIXELS/WARPS/BWD_PIXELS/BWD_WARPS[/GROUPS[/BWD_STAGES[/PRECISION]]]")
        given = {k: (v if k == "precision" else int(v)) for k, v in zip(fields, values) if v != "."}
        blocks = triton.VNBlocks(**given)
        spike.stage(f"triton_fwd_bwd_{tiling.replace('/', '_')}", spike.correct_and_time(fwd_bwd("triton", blocks)))
    return 0


def _with_env(name: str, value: str, run):
    """`run` (a stage) with os.environ[name] = value while it traces and times, then as before."""
    def stage():
        with environment({name: value}):
            return run()
    return stage


if __name__ == "__main__":
    raise SystemExit(main())
