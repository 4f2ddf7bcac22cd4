"""Where the CUDA VectorNeuron's tensor-core backward loses accuracy: its gradients (gx, gW) from
the float64 truth with each operand made exactly representable in tf32 in turn (the low 13 bits
of W, x or gy cleared), beside the FFMA backward's, on the same block. An operand whose rounding
takes the tensor-core error down to the FFMA kernel's is the one whose 3xTF32 split (or the mma
chain it feeds: d = W x, W^T gd, gW = gd x^T) loses the bits (bench/NOTES.md, "Session 28": gx
1.96e-5 and gW 2.99e-5 against 1.64e-6 and 2.84e-6 on the standard gelu block).

    python -m bench.vn_mma_accuracy OUT_DIR [--shape 4,16,64,64,64,3] [--impl cuda]

Rows (operand made exact, backward kernel -> rel L2 of y, gW, gx from float64) print as they come
and go to OUT_DIR/vn_mma_accuracy.json. `--impl xla` runs the same rows on ginjax's XLA path
(any machine: the script's own check).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

from kernels._env import environment
from kernels.cuda._plan import round_tf32
from kernels.cuda.vector_neuron import MMA_ENV

EPS = 1e-5
OPERANDS = ("none", "w", "x", "gy", "all")


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vn_mma_accuracy")
    p.add_argument("out")
    p.add_argument("--shape", default="4,16,64,64,64,3", help="(batch, channels, *spatial, *tensor)")
    p.add_argument("--D", type=int, default=3)
    p.add_argument("--impl", choices=("cuda", "xla"), default="cuda")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from ginjax import _vector_neuron

    shape = tuple(int(n) for n in args.shape.split(","))
    c, D = shape[1], args.D
    rng = np.random.default_rng(1)
    base = {"x": rng.normal(size=shape).astype(np.float32),
            "w": (rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c)).astype(np.float32),
            "gy": rng.normal(size=shape).astype(np.float32)}
    if args.impl == "cuda":
        ok, why = _vector_neuron.cuda_covers(jnp.asarray(base["w"]), jnp.asarray(base["x"][0]), D, jax.nn.gelu, EPS)
        if not ok:
            print(f"the CUDA VectorNeuron does not run here: {why}", file=sys.stderr)
            return 2

    def run(impl, w, x, gy):
        def batched(w, x):
            return jax.vmap(lambda b: _vector_neuron.vector_neuron(w, b, D, jax.nn.gelu, EPS, impl=impl))(x)

        def f(w, x, gy):
            y, vjp = jax.vjp(batched, w, x)
            return (y,) + vjp(gy)
        return [np.asarray(a) for a in jax.jit(f)(w, x, gy)]

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for exact in OPERANDS:
        ops = {k: (round_tf32(v) if exact in (k, "all") else v) for k, v in base.items()}
        with jax.enable_x64(True):  # the float64 truth; the rows below run in float32
            truth = run("xla", *(jnp.asarray(ops[k], jnp.float64) for k in ("w", "x", "gy")))
        for mma in ("1", "0"):
            with environment({MMA_ENV: mma}):  # read as each call is traced
                got = run(args.impl, *(jnp.asarray(ops[k]) for k in ("w", "x", "gy")))
            row = {"exact": exact, "backward": "tensor cores" if mma == "1" else "ffma",
                   **{name: rel_l2(g, t) for name, g, t in zip(("y", "gw", "gx"), got, truth)}}
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "vn_mma_accuracy.json").write_text(json.dumps({"shape": shape, "impl": args.impl, "rows": rows},
                                                                 indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
