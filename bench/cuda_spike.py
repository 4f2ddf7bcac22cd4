"""The CUDA forward kernel (kernels/cuda) on one standard layer, in bench/mosaic_spike.py's format:
correctness against `reference` (float32 'highest'), then kernel-level forward times of cuda,
triton and dense on the same operands; each stage guarded, rows to OUT/cuda_spike.json after
every stage.

    python -m bench.cuda_spike OUT_DIR [--config d3_n64_b4_c16] [--strip 32]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs, _timing
from bench.mosaic_spike import rel_l2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cuda_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--strip", type=int, nargs="*", default=[32, 16, 64])
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from kernels import cuda

    cfg = _configs.CONFIGS[args.config]
    spec = _cases.fixture_spec(cfg)
    spatial = (cfg.N,) * 3
    xs, ws, _ = _cases.spec_operands(spec, spatial, cfg.B, seed=1)
    rows: dict = {"config": cfg.name, "spatial": spatial, "batch": cfg.B, "jax": jax.__version__,
                  "device": str(jax.devices()[0]), "availability": cuda.availability(), "stages": {}}

    def save():
        (out_dir / "cuda_spike.json").write_text(json.dumps(rows, indent=1))

    def stage(name, fn):
        start = time.perf_counter()
        try:
            rows["stages"][name] = {"ok": True, **fn()}
        except Exception as e:  # noqa: BLE001 - recorded, the next stage still runs
            rows["stages"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000],
                                    "traceback": traceback.format_exc()[-6000:]}
        rows["stages"][name]["wall_s"] = round(time.perf_counter() - start, 2)
        print(name, json.dumps(rows["stages"][name])[:1500], flush=True)
        save()

    def layer(backend):
        return lambda xs, ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend))(xs)

    ref_box = {}

    def reference():
        with jax.default_matmul_precision("highest"):
            ref_box["ref"] = [jax.block_until_ready(r) for r in jax.jit(layer("reference"))(xs, ws)]
        return {}

    def correct_and_time(strip):
        def run():
            blocks = cuda.BlockSizes(strip_rows=strip)
            f = jax.jit(jax.vmap(lambda x, ws: cuda.conv_contract_cuda(spec, x, ws, block_sizes=blocks), in_axes=(0, None)))
            compiled = f.lower(xs, ws).compile()
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(xs, ws))
            first_s = time.perf_counter() - t0
            err = rel_l2(out, ref_box["ref"])
            finite = all(bool(jnp.all(jnp.isfinite(o))) for o in out)
            row = {"rel_l2": err, "rel_l2_per_block": [rel_l2([o], [r]) for o, r in zip(out, ref_box["ref"])],
                   "finite": finite, "pass_tf32": bool(err <= kernels.TOLERANCE["tf32"] and finite),
                   **_timing.memory_of(compiled)}
            timing = _timing.time_compiled(compiled, (xs, ws), first_call_s=first_s, max_time=0.5, min_rounds=10,
                                           max_rounds=40, warmup=2)
            return {**row, **timing.as_ms()}
        return run

    def timed(fn, backend=None):
        def run():
            _, timing, extra = _timing.compile_and_time(fn, (xs, ws), backend, max_time=0.5, min_rounds=10,
                                                        max_rounds=40, warmup=2)
            return {**timing.as_ms(), **extra}
        return run

    stage("reference", reference)
    for strip in args.strip:
        stage(f"cuda_strip{strip}", correct_and_time(strip))
    stage("triton", timed(layer("triton")))
    stage("dense", timed(layer("dense")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
