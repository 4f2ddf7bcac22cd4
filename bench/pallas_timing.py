"""The Pallas backend against dense, reference (and triton when available) on one standard layer,
with precision variants and a small block-size sweep: the timing part of bench/pallas_gpu_check.sh.

    python -m bench.pallas_timing OUT_DIR [--config d3_n64_b4_c16] [--n N] [--b B] [--budget S]

Forward and forward+backward at JAX's default precision, pallas at fp32/bf16 and a few BlockSizes
(forward only); errors against the reference at fp32. Times come from the shared loop
(bench/_timing.py). Rows go to OUT_DIR/pallas_timing.json after every case (a timeout keeps them).
A CPU dry run (interpret mode): --n 8 --b 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs, _timing


def rel(a, b) -> float:
    """Relative L2 error of all arrays of `a` against `b` as one vector."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y) ** 2)) for x, y in zip(la, lb))
    return (num / sum(float(jnp.sum(y * y)) for y in lb)) ** 0.5


def cases(available) -> list[tuple[str, object, dict]]:
    """(backend, precision, BlockSizes fields) in order of importance: a budget cuts the tail."""
    out = [(b, None, {}) for b in ("reference", "dense") if b in available]
    out += [("pallas", None, dict(algorithm="taps")), ("pallas", None, dict(algorithm="factorised"))]
    out += [("triton", None, {})] if "triton" in available else []
    out += [("pallas", p, dict(algorithm=a)) for a in ("taps", "factorised") for p in ("bf16", "fp32")]
    out += [("pallas", None, dict(algorithm="taps", block_p=bp, num_warps=nw)) for bp, nw in ((128, 4), (64, 8))]
    out += [("pallas", None, dict(algorithm="taps", hoist_budget=1 << 20, num_warps=8))]  # weights loaded once
    out += [("pallas", None, dict(algorithm="factorised", block_p=bp, num_warps=nw)) for bp, nw in ((16, 8), (32, 4), (32, 8))]
    return out


def measure(fn, args) -> tuple[object, dict]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, timing, extra = _timing.compile_and_time(fn, args, max_time=0.3, min_rounds=15, max_rounds=15, warmup=2)
    row = dict(
        median_ms=timing.ms, p20_ms=1e3 * timing.p20_s, p80_ms=1e3 * timing.p80_s, calls_per_round=timing.calls_per_round,
        compile_s=extra["compile_s"], temp_mb=(extra["temp_bytes"] or 0) / 2**20,
        warnings=sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught}),
    )
    return result, row


def label_of(backend, precision, block) -> str:
    label = backend + "".join(f"-{v}" if k == "algorithm" else f"-{k}{v}" for k, v in block.items())
    return label + (f"-{precision}" if precision else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pallas_timing", description=__doc__.splitlines()[0])
    p.add_argument("out", help="directory for pallas_timing.json")
    p.add_argument("--config", default="d3_n64_b4_c16", choices=[c.name for c in _configs.LAYER_CONFIGS if c.k_max == 1])
    p.add_argument("--n", type=int, default=None, help="grid size override (a CPU dry run: 8)")
    p.add_argument("--b", type=int, default=None, help="batch override")
    p.add_argument("--budget", type=float, default=125.0, help="seconds; no case starts later")
    args = p.parse_args(argv)
    from kernels import pallas as kp

    start = time.perf_counter()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = _configs.CONFIGS[args.config]
    cfg = dataclasses.replace(cfg, N=args.n or cfg.N, B=args.b or cfg.B)
    spec = _cases.fixture_spec(cfg)
    xs, ws, cots = _cases.spec_operands(spec, cfg.spatial, cfg.B)
    flops = {"fwd": cfg.B * spec.dense_flops(cfg.spatial)}
    flops["fwd_bwd"] = 3 * flops["fwd"]

    def backend_run(name, precision=None):
        return lambda x, w: kernels.conv_contract(spec, x, w, backend=name, precision=precision)

    def pallas_run(precision=None, **block):
        bs = kp.BlockSizes(**block)
        return lambda x, w: kp.conv_contract_pallas(spec, x, w, precision=precision, block_sizes=bs)

    oracle = {m: jax.jit(f)(xs, ws, cots) for m, f in _cases.layer_functions(backend_run("reference", "fp32")).items()}
    device = jax.devices()[0].device_kind
    rows = []
    for backend, precision, block in cases(kernels.available_backends()):
        run = pallas_run(precision, **block) if backend == "pallas" else backend_run(backend, precision)
        for mode, fn in _cases.layer_functions(run).items():
            if (precision or len(block) > 1) and mode == "fwd_bwd":
                continue  # variants: forward only
            label = label_of(backend, precision, block)
            if time.perf_counter() - start > args.budget:
                print(f"skipped {label} {mode}: time budget")
                continue
            try:
                result, row = measure(fn, (xs, ws, cots))
                row["rel_err_vs_fp32_reference"] = rel(result, oracle[mode])
                row["tflops_dense_equiv"] = flops[mode] / row["median_ms"] / 1e9
            except Exception as err:  # noqa: BLE001 - one failing variant must not hide the others
                row = dict(error=f"{type(err).__name__}: {str(err)[:400]}")
            row.update(backend=label, mode=mode)
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out_dir / "pallas_timing.json").write_text(
                json.dumps(dict(config=cfg.name, N=cfg.N, B=cfg.B, device=device, jax=jax.__version__, rows=rows), indent=1)
            )
    print(table(rows, cfg.name, device))
    return 0


def table(rows, config: str, device: str) -> str:
    base = {(r["mode"], r["backend"]): r.get("median_ms") for r in rows}
    lines = [f"\n{config} on {device}, jax {jax.__version__}",
             f"{'backend':34s} {'mode':8s} {'median ms':>10s} {'p20-p80':>15s} {'x ref':>7s} {'x dense':>8s} "
             f"{'TFLOP/s':>8s} {'temp MB':>8s} {'rel err':>9s} {'compile s':>9s}"]
    nan = float("nan")
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"{r['backend']:34s} {r['mode']:8s} ERROR {r['error']}")
            continue
        ref, dense = base.get((r["mode"], "reference")), base.get((r["mode"], "dense"))
        lines.append(
            f"{r['backend']:34s} {r['mode']:8s} {r['median_ms']:10.3f} {r['p20_ms']:7.3f}-{r['p80_ms']:<7.3f} "
            f"{(ref / r['median_ms']) if ref else nan:7.2f} {(dense / r['median_ms']) if dense else nan:8.2f} "
            f"{r['tflops_dense_equiv']:8.1f} {r['temp_mb']:8.0f} {r['rel_err_vs_fp32_reference']:9.2e} {r['compile_s']:9.1f}"
        )
    lines += [f"warning seen while compiling: {n}" for n in sorted({w for r in rows for w in r.get("warnings", [])})]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
