"""The Mosaic GPU forward spike (kernels/pallas/mosaic_fwd.py) on one standard layer: correctness
against `reference` (float32 'highest'), then kernel-level forward times against `triton` and
`dense` on the same operands (bench/_timing.py's loop, queued calls). Each stage is guarded, so a
failure is recorded and the rest still runs; rows go to OUT/mosaic_spike.json after every stage.

    python -m bench.mosaic_spike OUT_DIR [--config d3_n64_b4_c16] [--zy N --b B]
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


def rel_l2(out, ref) -> float:
    num = sum(float(jnp.sum((a.astype(jnp.float32) - b) ** 2)) for a, b in zip(out, ref))
    den = sum(float(jnp.sum(b * b)) for b in ref)
    return (num / den) ** 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mosaic_spike")
    p.add_argument("out")
    p.add_argument("--config", default="d3_n64_b4_c16")
    p.add_argument("--zy", type=int, default=None, help="z and y extent override (a CPU dry run: 2)")
    p.add_argument("--b", type=int, default=None, help="batch override")
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from kernels.pallas import mosaic_fwd as mf

    cfg = _configs.CONFIGS[args.config]
    spec = _cases.fixture_spec(cfg)
    spatial = (args.zy or cfg.N, args.zy or cfg.N, cfg.N)
    xs, ws, _ = _cases.spec_operands(spec, spatial, args.b or cfg.B, seed=1)
    rows: dict = {"config": cfg.name, "spatial": spatial, "batch": args.b or cfg.B, "jax": jax.__version__,
                  "device": str(jax.devices()[0]), "stages": {}}

    def save():
        (out_dir / "mosaic_spike.json").write_text(json.dumps(rows, indent=1))

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
            ref = jax.jit(layer("reference"))(xs, ws)
        ref_box["ref"] = [jax.block_until_ready(r) for r in ref]
        return {}

    def correct_and_time(**variant):
        """One compile: the error against the reference, then the timing of the same executable."""
        def run():
            f = jax.jit(lambda xs, ws: mf.mosaic_forward(spec, xs, ws, **variant))
            t0 = time.perf_counter()
            compiled = f.lower(xs, ws).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(xs, ws))
            first_s = time.perf_counter() - t0
            err = rel_l2(out, ref_box["ref"])
            per_block = [rel_l2([o], [r]) for o, r in zip(out, ref_box["ref"])]
            finite = all(bool(jnp.all(jnp.isfinite(o))) for o in out)
            row = {"rel_l2": err, "rel_l2_per_block": per_block, "finite": finite,
                   "pass_tf32": bool(err <= kernels.TOLERANCE["tf32"] and finite), "compile_s": round(compile_s, 1),
                   **_timing.memory_of(compiled)}
            rows["stages"]["partial"] = row
            save()
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
    stage("mosaic", correct_and_time())
    stage("mosaic_shared_reads", correct_and_time(share_loads=True, auto_barriers=False))
    stage("triton", timed(layer("triton")))
    stage("dense", timed(layer("dense")))
    stage("pad_rows", timed(lambda xs, ws: (mf.pad_rows(xs[0], 0), mf.pad_rows(xs[1], 1))))
    stage("mosaic_no_auto_barriers", correct_and_time(auto_barriers=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
