"""Time the `triton` backend's forward against `dense` and `reference` on the standard layers,
with a sweep over its tiling. For the GPU machine; results go to OUT/triton_sweep.json.

    python3 bench/triton_sweep.py --out DIR [--preset sweep|final|backward|layers] [--budget SECONDS]

Preset "layers": the ginjax ConvContract layer with its bias (bench/_cases.py's LayerCase, as
`python -m bench` builds it) on `dense` and `triton`, forward and forward + backward, with the
block layouts (BlockSizes.layout) as variants and a chain of two layers (the planar blocks
passed from one kernel to the next: the second layer's cost is the kernel's without the
relayouts XLA adds at the jit boundary).

A layer: D-dimensional torus, keys {scalar, vector} with c channels each in and out, 3^D invariant
filters (tests/data/ginjax-0.1.8), vmapped over a batch B, JAX's default precision (TF32).
Every time is the median of 20 calls of an ahead-of-time compiled executable after warm-up
(the shared timing loop, bench/_timing.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time
import traceback

import numpy as np

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from bench import _timing  # noqa: E402
from kernels.triton import BlockSizes, conv_contract_triton  # noqa: E402
from kernels.triton._tiling import weight_grad_tiling  # noqa: E402

FILTERS = ROOT / "tests" / "data" / "ginjax-0.1.8" / "invariant_filters.npz"
CONFIGS = {  # name: (D, N, B, c)
    "d3_n64_b4_c16": (3, 64, 4, 16),
    "d3_n64_b2_c32": (3, 64, 2, 32),
    "d3_n128_b1_c16": (3, 128, 1, 16),
    "d2_n256_b16_c32": (2, 256, 16, 32),
}
SWEEP = {  # label: BlockSizes kwargs (the default is tile 1 x 1 x 64 / 1 x 64, 8 warps, "op")
    "op-1x1x64-w4": dict(tile=(1, 1, 64), num_warps=4),
    "op-1x1x32-w4": dict(tile=(1, 1, 32), num_warps=4),
    "po-1x1x64-w8": dict(tile=(1, 1, 64), orientation="po"),
    "op-1x2x64-w8": dict(tile=(1, 2, 64)),
    "op-1x2x32-w8": dict(tile=(1, 2, 32)),
    "op-1x1x64-w8-o16": dict(tile=(1, 1, 64), block_o=16),
    "op-1x1x64-w8-vec": dict(tile=(1, 1, 64), vector_loads=True),
    "op-1x64-w4": dict(tile=(1, 64), num_warps=4),
    "op-2x64-w8": dict(tile=(2, 64)),
    "op-1x128-w8": dict(tile=(1, 128)),
    # register caps (ptxas .maxnreg): more resident warps for the latency-bound stencil
    "op-1x1x64-w8-r80": dict(tile=(1, 1, 64), max_registers=80),
    "op-1x1x64-w8-r64": dict(tile=(1, 1, 64), max_registers=64),
    "op-1x1x32-w4-r96": dict(tile=(1, 1, 32), num_warps=4, max_registers=96),
    "op-1x1x32-w4-r80": dict(tile=(1, 1, 32), num_warps=4, max_registers=80),
    "op-1x1x32-w4-r72": dict(tile=(1, 1, 32), num_warps=4, max_registers=72),
    "op-1x1x32-w4-r64": dict(tile=(1, 1, 32), num_warps=4, max_registers=64),
    "op-1x64-w4-r80": dict(tile=(1, 64), num_warps=4, max_registers=80),
    "op-1x128-w8-r80": dict(tile=(1, 128), max_registers=80),
    # D=2 with 32 channels walks each stencil segment as a loop over two channel chunks: unrolled
    # (ptxas may overlap one chunk's loads with the other's dots) or software-pipelined by Triton
    # (num_stages > 1: the next chunk's tiles come in by cp.async while this one is used)
    "op-1x64-w8-unroll": dict(tile=(1, 64), unroll_chunks=True),
    "op-1x64-w4-unroll": dict(tile=(1, 64), num_warps=4, unroll_chunks=True),
    "op-1x64-w8-s2": dict(tile=(1, 64), num_stages=2),
    "op-1x64-w8-s3": dict(tile=(1, 64), num_stages=3),
    "op-1x64-w4-s2": dict(tile=(1, 64), num_warps=4, num_stages=2),
    "op-1x128-w8-s2": dict(tile=(1, 128), num_stages=2),
    "op-1x32-w4-s2": dict(tile=(1, 32), num_warps=4, num_stages=2),
    "op-1x32-w4-unroll": dict(tile=(1, 32), num_warps=4, unroll_chunks=True),
    "op-1x64-w2": dict(tile=(1, 64), num_warps=2),
    "op-1x32-w2": dict(tile=(1, 32), num_warps=2),
    "op-1x128-w4": dict(tile=(1, 128), num_warps=4),
    "op-2x64-w4": dict(tile=(2, 64), num_warps=4),
    "op-1x64-w4-o16": dict(tile=(1, 64), num_warps=4, block_o=16),
    # D=2 at 4 warps holds 168 registers: 3 programs an SM (12 warps); caps for 4 and 5
    "op-1x64-w4-r128": dict(tile=(1, 64), num_warps=4, max_registers=128),
    "op-1x64-w4-r96": dict(tile=(1, 64), num_warps=4, max_registers=96),
    "op-1x32-w4-r128": dict(tile=(1, 32), num_warps=4, max_registers=128),
}
REGISTERS = [label for label in SWEEP if "-r" in label and label.count("x") == 2] + ["op-1x1x32-w4"]
# weight-gradient tilings: (warps, tile along the last axis, units, register cap)
DW_REGISTERS = ((2, 32, 4, None), (2, 32, 4, 128), (2, 32, 4, 96), (2, 32, 4, 80), (2, 16, 4, 96), (2, 16, 4, 64),
                (4, 32, 4, 128), (2, 32, 6, 128))
DW_TILINGS = ((2, 16, 4, None), (2, 32, 4, None), (4, 32, 4, None), (1, 16, 4, None), (2, 16, 6, None),
              (2, 16, 3, None), (4, 16, 4, None), (2, 32, 3, None))
FINAL = {  # config: variants timed besides the default
    "d3_n64_b4_c16": ["op-1x1x64-w4", "op-1x2x32-w8"],
    "d3_n64_b2_c32": ["op-1x1x64-w8-o16"],
    "d3_n128_b1_c16": [],
    "d2_n256_b16_c32": ["op-1x128-w8"],
}


def layer(D, N, B, c, seed=0):
    bank = np.load(FILTERS)
    basis = lambda k: bank[f"filters/D{D}M3/k{k}p0"]
    spec = kernels.make_spec(
        D, [(0, 0, c), (1, 0, c)], [(0, 0, c), (1, 0, c)],
        [(0, 0, basis(0)), (0, 1, basis(1)), (1, 0, basis(1)), (1, 1, basis(2))], True,
    )
    rng = np.random.default_rng(seed)
    spatial = (N,) * D
    xs = [jnp.asarray(rng.standard_normal((B,) + spec.in_shape(a, spatial)), jnp.float32) for a in range(2)]
    ws = [jnp.asarray(rng.standard_normal((c, c, p.basis.n_filters)) / math.sqrt(c * p.basis.n_filters), jnp.float32) for p in spec.pairs]
    return spec, xs, ws


def measure(fn, args, reps=20, stream=10):
    """Median of `reps` synchronised calls, and the mean of `stream` calls queued back to back
    (host dispatch hidden behind the GPU), after warming up so that the clocks are up: the shared
    loop of bench/_timing.py."""
    t0 = time.perf_counter()
    compiled = _timing.compile_for(fn, args)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t0
    sync = _timing.time_compiled(compiled, args, min_rounds=reps, max_rounds=reps, calls_per_round=1,
                                 first_call_s=first_s, warmup_s=0.3)
    queued = _timing.time_compiled(compiled, args, min_rounds=1, max_rounds=1, warmup=0, calls_per_round=stream,
                                   first_call_s=first_s)
    temp = _timing.memory_of(compiled)["temp_bytes"]
    return result, dict(ms=sync.ms, p20_ms=1e3 * sync.p20_s, p80_ms=1e3 * sync.p80_s, min_ms=1e3 * sync.min_s,
                        stream_ms=queued.ms, compile_s=round(compile_s, 1), temp_bytes=-1 if temp is None else temp)


def value_and_grad_of(fwd, run, cots):
    """value_and_grad over (xs, ws) of the linear loss sum <fwd(run)(xs, ws), cots>."""
    loss = lambda xs, ws: sum(jnp.vdot(o, g) for o, g in zip(fwd(run)(xs, ws), cots))
    return jax.value_and_grad(loss, argnums=(0, 1))


def dw_blocks(D, warps, tile, units, cap=None, spec=None, spatial=None):
    """The weight-gradient kernel's tiling: warps, pixels along the last axis, units, register cap;
    the forward's as `BlockSizes.for_layer(spec, spatial)` picks it (given both), else the default."""
    base = BlockSizes() if spec is None else BlockSizes.for_layer(spec, spatial)
    return dataclasses.replace(base, dw_num_warps=warps, dw_tile=(1,) * (D - 1) + (tile,), dw_units=units,
                               dw_max_registers=cap)


def dw_tilings(text: str) -> list[tuple[int, int, int]]:
    """--dw-tilings: "w/t/u,..." (warps, pixels, units); empty: the five of the H200's sweep."""
    if not text:
        return [(4, 32, 4), (2, 32, 4), (1, 16, 4), (2, 16, 3), (4, 16, 6)]
    out = []
    for item in text.split(","):
        if (tiling := weight_grad_tiling(item)) is None:
            raise SystemExit(f"--dw-tilings (={text!r}): {item!r} is not warps/pixels/units")
        out.append(tiling)
    return out


def rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y) ** 2)) for x, y in zip(la, lb))
    return math.sqrt(num / sum(float(jnp.sum(y * y)) for y in lb))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/triton")
    ap.add_argument("--preset", default="sweep", choices=["sweep", "final", "backward", "registers", "dw", "layers"])
    ap.add_argument("--budget", type=float, default=240.0)
    ap.add_argument("--variants", default="", help="comma-separated SWEEP labels (default: all for sweep)")
    ap.add_argument("--tiny", action="store_true", help="N=6, B=1: a dry run on the interpreter")
    ap.add_argument("--configs", default="", help="comma-separated config names (preset layers: bench configs; "
                    "preset final: of CONFIGS, default all)")
    ap.add_argument("--variants-bwd", action="store_true", help="preset final: each variant's fwd_bwd too")
    ap.add_argument("--dw-variants", action="store_true", help="preset final: the weight kernel's tilings on every config")
    ap.add_argument("--dw-tilings", default="",
                    help="with --dw-variants: the weight kernel's tilings, warps/pixels/units comma-separated "
                         "(default: five of them)")
    ap.add_argument("--layouts", default="planar,interleaved", help="preset layers: BlockSizes.layout variants on the first config")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = []
    dev = jax.devices()[0]
    meta = dict(device=str(getattr(dev, "device_kind", dev.platform)), jax=jax.__version__)
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "triton_sweep.json").write_text(json.dumps(dict(meta, rows=rows), indent=1))

    def run_case(config, label, fn, fargs, oracle=None, extra=None):
        if time.perf_counter() - start > args.budget:
            record(dict(config=config, label=label, skipped="time budget"))
            return None
        try:
            result, row = measure(fn, fargs)
            if oracle is not None:
                row["rel_err"] = rel(result, oracle)
        except Exception as err:  # one failing variant must not hide the others
            row = dict(error=f"{type(err).__name__}: {str(err)[:600]}")
            traceback.print_exc()
            result = None
        row.update(config=config, label=label, **(extra or {}))
        record(row)
        return result

    if args.preset in ("registers", "dw"):
        return registers_preset(args, run_case, start)
    if args.preset == "layers":
        layers_preset(args, run_case)
        return summary(rows, meta)
    backward = args.preset == "backward"  # the fused backward's tilings only
    configs = ["d3_n64_b4_c16"] if args.preset in ("sweep", "backward") else (
        [c for c in args.configs.split(",") if c] or list(CONFIGS))
    for config in configs:
        labels = [v for v in args.variants.split(",") if v] or (
            [v for v in SWEEP if v.count("x") == 2] if args.preset == "sweep" else [] if backward else FINAL[config]
        )
        D, N, B, c = CONFIGS[config]
        if args.tiny:
            N, B, c = 6, 1, 4
        spec, xs, ws = layer(D, N, B, c)
        io_bytes = sum(x.size * 4 for x in xs) * 2  # outputs have the inputs' sizes here
        extra = dict(io_bytes=io_bytes, dense_flops=B * spec.dense_flops((N,) * D))
        fwd = lambda run: (lambda xs, ws: jax.vmap(lambda x: run(x, ws))(xs))
        by_backend = lambda name, prec=None: fwd(lambda x, w: kernels.conv_contract(spec, x, w, backend=name, precision=prec))
        oracle = jax.jit(by_backend("reference", "fp32"))(xs, ws)
        if config == "d3_n64_b4_c16":
            run_case(config, "copy-floor", lambda xs, ws: tuple(2.0 * x for x in xs), (xs, ws), extra=extra)
        for name in ("triton",) if backward else ("reference", "dense", "triton"):
            run_case(config, name, by_backend(name), (xs, ws), oracle, extra)
        for label in labels:
            blocks = BlockSizes(**SWEEP[label])
            run_case(config, label, fwd(lambda x, w, b=blocks: conv_contract_triton(spec, x, w, precision="tf32", block_sizes=b)), (xs, ws), oracle, extra)
        for mode in ("fp32", "bf16") if config == "d3_n64_b4_c16" and not backward else ():
            run_case(config, f"triton-{mode}", by_backend("triton", mode), (xs, ws), oracle, extra)
        # forward + backward: the fused backward, dense's VJP (A/B) and the weight kernel's tilings
        cots = [jnp.ones_like(o) * 0.01 for o in oracle]
        fwd_bwd = lambda run: value_and_grad_of(fwd, run, cots)
        for name in ("triton",) if backward else ("reference", "dense", "triton"):
            run_case(config, f"{name}-fwd_bwd", fwd_bwd(lambda x, w, n=name: kernels.conv_contract(spec, x, w, backend=n)), (xs, ws), None, extra)
        bwd_variants = {} if backward else {"triton-dense_bwd-fwd_bwd": dict(backward="dense")}
        if args.variants_bwd:
            bwd_variants.update({f"{label}-fwd_bwd": dict(block_sizes=BlockSizes(**SWEEP[label])) for label in labels})
        if config == "d3_n64_b4_c16" or args.dw_variants:
            bwd_variants.update({
                f"dw-w{w}-t{t}-u{u}-fwd_bwd": dict(block_sizes=dw_blocks(D, w, t, u, spec=spec, spatial=(N,) * D))
                for w, t, u in (((4, 32, 4), (2, 64, 3), (2, 16, 6)) if backward else dw_tilings(args.dw_tilings))
            })
        for label, kw in bwd_variants.items():
            run_case(config, label, fwd_bwd(lambda x, w, kw=kw: conv_contract_triton(spec, x, w, precision="tf32", **kw)), (xs, ws), None, extra)
        if config == "d3_n64_b4_c16":  # the backward's two kernels alone
            from kernels._fused import transposed_spec, transposed_weights
            from kernels.triton._backward import weight_grad_launch
            spec_t, _ = transposed_spec(spec)
            run_case(config, "bwd-input-grad-only", fwd(lambda g, w: conv_contract_triton(spec_t, g, transposed_weights(w), precision="tf32")), (cots, ws), None, extra)
            blocks = BlockSizes()
            run_case(config, "bwd-weight-grad-only", lambda xs, gs: weight_grad_launch(spec, "tf32", blocks, xs, gs), (xs, cots), None, extra)
        del xs, ws, oracle
    summary(rows, meta)


def summary(rows, meta):
    print(f"\n{meta}")
    base = {(r["config"], r["label"]): r.get("ms") for r in rows}
    print(f"{'config':16s} {'label':26s} {'ms':>8s} {'stream':>7s} {'x ref':>6s} {'x dense':>7s} {'temp/io':>7s} {'rel err':>9s} {'compile':>7s}")
    for r in rows:
        if "ms" not in r:
            print(f"{r['config']:16s} {r['label']:26s} {r.get('error') or r.get('skipped')}")
            continue
        ref = base.get((r["config"], "reference" if "fwd_bwd" not in r["label"] else "reference-fwd_bwd"))
        label = r["label"]
        dense_label = "dense-fwd_bwd" if "fwd_bwd" in label else "dense-fwd" if label.endswith("-fwd") else "dense"
        dense = base.get((r["config"], dense_label))
        print(
            f"{r['config']:16s} {r['label']:26s} {r['ms']:8.3f} {r['stream_ms']:7.3f} {ref / r['ms'] if ref else 0:6.1f} "
            f"{dense / r['ms'] if dense else 0:7.2f} {r['temp_bytes'] / r['io_bytes']:7.3f} "
            f"{r.get('rel_err', float('nan')):9.2e} {r['compile_s']:7.1f}"
        )


LAYER_CONFIGS = "d3_n64_b4_c16,d3_n64_b2_c32,d3_n128_b1_c16,d2_n256_b16_c32,d3_n64_b2_c8_k2"


def layers_preset(args, run_case):
    """The ginjax layer (bias included) per config: dense and triton, fwd and fwd_bwd; on the first
    config every layout of --layouts, and two chained layers (planar between them)."""
    import contextlib

    from bench import _cases, _configs
    by_name = {c.name: c for c in _configs.LAYER_CONFIGS}
    names = [n for n in (args.configs or LAYER_CONFIGS).split(",") if n]
    layouts = [v for v in args.layouts.split(",") if v]
    real_default = BlockSizes.__dict__["for_layer"]

    @contextlib.contextmanager
    def layout(name):
        BlockSizes.for_layer = classmethod(
            lambda cls, spec, spatial: dataclasses.replace(real_default.__func__(cls, spec, spatial), layout=name)
        )
        try:
            yield
        finally:
            BlockSizes.for_layer = real_default

    def fresh(fn):  # jit caches traces by function: the backend is chosen while tracing
        return lambda *a: fn(*a)

    for n, name in enumerate(names):
        cfg = by_name[name]
        if args.tiny:
            cfg = dataclasses.replace(cfg, N=6, B=1, c=4)
        case = _cases.build_case(cfg)
        extra = dict(io_bytes=case.io_bytes(), dense_flops=int(case.gflop("fwd") * 1e9))
        for mode in ("fwd", "fwd_bwd"):
            fn, fargs = case.function(mode)
            with kernels.use_backend("dense"):
                oracle = run_case(name, f"dense-{mode}", fresh(fn), fargs, None, extra)
            for lay in (layouts if n == 0 else layouts[:1]):
                with kernels.use_backend("triton"), layout(lay):
                    run_case(name, f"triton-{lay}-{mode}", fresh(fn), fargs, oracle, extra)
            if n == 0 and mode == "fwd":
                twice = lambda params, x: fn(params, fn(params, x))
                for backend in ("dense", "triton"):
                    with kernels.use_backend(backend):
                        run_case(name, f"{backend}-two-layers-{mode}", fresh(twice), fargs, None, extra)


def registers_preset(args, run_case, start):
    """d3_n64_b4_c16, preset "registers": register caps on the forward tilings, then the
    backward's two parts alone (the input gradient is the forward kernel on the transposed layer)
    and weight-gradient tilings with caps. Preset "dw": weight-gradient tilings alone, then
    forward + backward (dense's and the fused one with a few weight tilings)."""
    dw_only = args.preset == "dw"
    from kernels._fused import transposed_spec, transposed_weights
    from kernels.triton._backward import weight_grad_launch

    config = "d3_n64_b4_c16"
    D, N, B, c = CONFIGS[config]
    if args.tiny:
        N, B, c = 6, 1, 4
    spec, xs, ws = layer(D, N, B, c)
    extra = dict(io_bytes=sum(x.size * 4 for x in xs) * 2, dense_flops=B * spec.dense_flops((N,) * D))
    fwd = lambda run: (lambda xs, ws: jax.vmap(lambda x: run(x, ws))(xs))
    oracle = jax.jit(fwd(lambda x, w: kernels.conv_contract(spec, x, w, backend="reference", precision="fp32")))(xs, ws)
    run_case(config, "triton", fwd(lambda x, w: conv_contract_triton(spec, x, w, precision="tf32")), (xs, ws), oracle, extra)
    labels = [v for v in args.variants.split(",") if v] or ([] if dw_only else REGISTERS)
    for label in labels:
        blocks = BlockSizes(**SWEEP[label])
        run_case(config, label, fwd(lambda x, w, b=blocks: conv_contract_triton(spec, x, w, precision="tf32", block_sizes=b)), (xs, ws), oracle, extra)
    cots = [jnp.asarray(np.random.default_rng(1).standard_normal(o.shape), jnp.float32) for o in oracle]
    spec_t, _ = transposed_spec(spec)
    for label in ["triton"] + labels[:4]:
        blocks = BlockSizes(**SWEEP.get(label, {}))
        run_case(config, f"bwd-input-grad-only-{label}",
                 fwd(lambda g, w, b=blocks: conv_contract_triton(spec_t, g, transposed_weights(w), precision="tf32", block_sizes=b)), (cots, ws), None, extra)
    for w, t, u, cap in DW_TILINGS if dw_only else DW_REGISTERS:
        run_case(config, f"bwd-weight-grad-only-w{w}-t{t}-u{u}-r{cap}",
                 lambda xs, gs, b=dw_blocks(D, w, t, u, cap): weight_grad_launch(spec, "tf32", b, xs, gs), (xs, cots), None, extra)
    if dw_only:
        fwd_bwd = lambda run: value_and_grad_of(fwd, run, cots)
        for name in ("dense", "triton"):
            run_case(config, f"{name}-fwd_bwd", fwd_bwd(lambda x, w, n=name: kernels.conv_contract(spec, x, w, backend=n)), (xs, ws), None, extra)
        for w, t, u, cap in DW_TILINGS[:3]:
            run_case(config, f"dw-w{w}-t{t}-u{u}-fwd_bwd",
                     fwd_bwd(lambda x, ww, b=dw_blocks(D, w, t, u, cap): conv_contract_triton(spec, x, ww, precision="tf32", block_sizes=b)), (xs, ws), None, extra)
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
