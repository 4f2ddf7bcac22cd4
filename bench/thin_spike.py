"""A model's first and last ConvContract (the thin layers: 2 + 2 -> 16 + 16 and 16 + 16 -> 1 + 1
channels, the standard 3x3x3 bases on a torus) on each way to run them, in one process: `dense`
in two stages (kernels/_thin.py, GINJAX_DENSE_THIN=1), `dense` as one convolution, `triton` and
`triton` with the CUDA kernels on zero channels (GINJAX_CUDA_PAD_CHANNELS=1).
Per layer and mode (fwd; fwd_bwd: value_and_grad in the inputs and the weights; dw: in the
weights only, as a first layer runs in a model, whose input is data): the error of the forward
against `reference` (float32 'highest'), the time (bench/_timing.py's loop) and the temp bytes.
Rows to OUT/thin_spike.json after every stage (bench/_spike.py's guard: a failure is recorded,
the next stage runs).

    python -m bench.thin_spike OUT_DIR [--spatial 64] [--batch 4] [--variants dense-thin,dense-one-conv,triton,cuda-padded]

Wide layers too: `--dims 2 --spatial 32 --batch 8 --layers w256=256:256 --variants
dense-one-conv,dense-stencil-first,dense-contract-first,triton` times the two-stage forms where
the channel GEMM dominates (the factorised form has 4.3x (2D) or 10.8x (3D) fewer MACs than one
convolution, for an intermediate of ~3x the layer's I/O floats). On an H100 both forms lost to one
convolution on every wide layer of the UNets (bench/NOTES.md, "Session 44").
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs, _timing
from bench._spike import TIMING, rel_l2, run_stage
from kernels import _thin
from kernels._env import environment
from kernels.triton import _cuda_padding

LAYERS = {"first": (2, 16), "last": (16, 1)}  # channels per key in, out
# variant -> (backend, the switches it sets while its layers are traced)
VARIANTS = {
    "dense-thin": ("dense", {_thin.THIN_ENV: "1"}),
    "dense-one-conv": ("dense", {_thin.THIN_ENV: "0"}),
    # a form whatever the layer's shape (wide layers included)
    "dense-stencil-first": ("dense", {_thin.THIN_ENV: "stencil-first"}),
    "dense-contract-first": ("dense", {_thin.THIN_ENV: "contract-first"}),
    "dense-grouped-stencil-first": ("dense", {_thin.THIN_ENV: _thin.GROUPED}),
    "triton": ("triton", {_cuda_padding.PAD_CHANNELS_ENV: "0"}),
    # the CUDA kernels with zero channels where they are built and run (else Triton's again)
    "cuda-padded": ("triton", {_cuda_padding.PAD_CHANNELS_ENV: "1"}),
}
MODES = ("fwd", "fwd_bwd", "dw")


BASE_CONFIGS = {2: "d2_n256_b16_c32", 3: "d3_n64_b4_c16"}  # dims -> the standard layer giving keys and bases


def thin_layer(cin: int, cout: int, dims: int = 3) -> kernels.ConvSpec:
    """The standard layer's keys and bases with cin channels per input key and cout per output key."""
    return _cases.with_channels(_cases.fixture_spec(_configs.CONFIGS[BASE_CONFIGS[dims]]), cin, cout)


def parse_layers(text: str) -> dict[str, tuple[int, int]]:
    """'name=cin:cout,...' -> {name: (cin, cout)}."""
    layers = {}
    for item in filter(None, text.split(",")):
        name, sep, channels = item.partition("=")
        cin, colon, cout = channels.partition(":")
        if not (sep and colon and name and cin.isdigit() and cout.isdigit() and int(cin) > 0 and int(cout) > 0):
            raise ValueError(f"`--layers` item (={item!r}) must be name=cin:cout with positive channel counts")
        layers[name] = (int(cin), int(cout))
    if not layers:
        raise ValueError(f"`--layers` (={text!r}) names no layer")
    return layers


def functions(spec: kernels.ConvSpec, backend: str) -> dict:
    """{mode: f(xs, ws, cots)} of the vmapped layer on `backend`."""
    run = lambda x, ws: kernels.conv_contract(spec, x, ws, backend=backend)  # noqa: E731
    fns = _cases.layer_functions(run)

    def loss(ws, xs, cots):
        return sum(jnp.vdot(o, g) for o, g in zip(jax.vmap(lambda x: run(x, ws))(xs), cots))

    fns["dw"] = lambda xs, ws, cots: jax.value_and_grad(loss)(ws, xs, cots)
    return fns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.thin_spike")
    p.add_argument("out")
    p.add_argument("--spatial", type=int, default=64, help="grid side (default 64)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dims", type=int, default=3, choices=sorted(BASE_CONFIGS), help="the layer's D (default 3)")
    p.add_argument("--layers", default=",".join(f"{n}={a}:{b}" for n, (a, b) in LAYERS.items()),
                   help="name=cin:cout,... channels per key in and out (default the thin first and last layers)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {tuple(VARIANTS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    args = p.parse_args(argv)
    try:
        layers = parse_layers(args.layers)
    except ValueError as e:
        p.error(str(e))
    variants = [v for v in args.variants.split(",") if v]
    modes = [m for m in args.modes.split(",") if m]
    for name, value, allowed in (("--variants", variants, VARIANTS), ("--modes", modes, MODES)):
        if not value or any(v not in allowed for v in value):
            p.error(f"{name} (={','.join(value)!r}) must be a comma-separated subset of {tuple(allowed)}")
    path = pathlib.Path(args.out) / "thin_spike.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    spatial = (args.spatial,) * args.dims
    rows: dict = {"spatial": spatial, "batch": args.batch, "jax": jax.__version__, "device": str(jax.devices()[0]),
                  "stages": {}}
    for layer, (cin, cout) in layers.items():
        spec = thin_layer(cin, cout, args.dims)
        xs, ws, cots = _cases.spec_operands(spec, spatial, args.batch, seed=1)
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(functions(spec, "reference")["fwd"])(xs, ws, cots)
        for variant in variants:
            backend, env = VARIANTS[variant]
            with environment(env):  # read when the layer is traced
                for mode in modes:
                    run_stage(rows["stages"], f"{layer}/{variant}/{mode}",
                              lambda: _run(spec, backend, mode, (xs, ws, cots), ref), shown=600)
                    path.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["ok"] for r in rows["stages"].values()) else 1


def _run(spec, backend, mode, args, ref) -> dict:
    fn = functions(spec, backend)[mode]
    compiled = _timing.compile_for(fn, args)
    out = jax.block_until_ready(compiled(*args))
    if backend == "dense":
        form = _thin.thin_form(spec) or "one convolution"
    else:  # what kernels.explain says runs it (the CUDA kernels with zero channels, or Triton's)
        form = kernels.explain(spec, tuple(args[0][0].shape[2 : 2 + spec.D]), backend=backend).reason
    row = {"form": form, **_timing.memory_of(compiled)}
    if mode == "fwd":
        row["rel_l2"] = rel_l2(out, ref)
    timing = _timing.time_compiled(compiled, args, **TIMING)
    return {**row, **timing.as_ms()}


if __name__ == "__main__":
    raise SystemExit(main())
