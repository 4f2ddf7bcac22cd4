"""The harness the kernel spikes share (bench/mosaic_spike.py, bench/cuda_spike.py,
bench/vector_neuron_spike.py): one standard
layer's operands, stages that are each guarded (a failure is recorded and the next stage still
runs) with the rows rewritten to OUT/<name>.json after every stage, the `reference` outputs
(float32 'highest'), a candidate's error and timing from one compiled executable, and the
kernel-level timing of a registered backend on the same operands."""

from __future__ import annotations

import json
import pathlib
import time
import traceback

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs, _timing
from bench._suite import resolve_commit

TIMING = dict(max_time=0.5, min_rounds=10, max_rounds=40, warmup=2)


def rel_l2(out, ref) -> float:
    num = sum(float(jnp.sum((a.astype(jnp.float32) - b) ** 2)) for a, b in zip(out, ref))
    den = sum(float(jnp.sum(b * b)) for b in ref)
    return (num / den) ** 0.5


def run_stage(stages: dict, name: str, fn, shown: int = 1500) -> None:
    """stages[name] = fn()'s row with ok True, or the error and its traceback with ok False (the
    next stage still runs), and the stage's wall time; the row printed (its first `shown` chars)."""
    start = time.perf_counter()
    try:
        stages[name] = {"ok": True, **fn()}
    except Exception as e:  # noqa: BLE001 - recorded, the next stage still runs
        stages[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:4000],
                        "traceback": traceback.format_exc()[-6000:]}
    stages[name]["wall_s"] = round(time.perf_counter() - start, 2)
    print(name, json.dumps(stages[name])[:shown], flush=True)


class Spike:
    def __init__(self, name: str, out_dir, config: str, spatial=None, batch=None, spec=None, **extra):
        """spec: the layer (default the config's fixture spec, k_max 1 only)."""
        cfg = _configs.CONFIGS[config]
        self.path = pathlib.Path(out_dir) / f"{name}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.spec = spec if spec is not None else _cases.fixture_spec(cfg)
        spatial = tuple(spatial or cfg.spatial)
        batch = batch or cfg.B
        self.xs, self.ws, self.cots = _cases.spec_operands(self.spec, spatial, batch, seed=1)
        self.rows: dict = {"config": cfg.name, "spatial": spatial, "batch": batch, "jax": jax.__version__,
                           "device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
                           "commit": resolve_commit(), **extra, "stages": {}}
        self.ref = None

    def save(self) -> None:
        self.path.write_text(json.dumps(self.rows, indent=1))

    def stage(self, name: str, fn) -> None:
        run_stage(self.rows["stages"], name, fn)
        self.save()

    def layer(self, backend: str):
        spec = self.spec
        return lambda xs, ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend))(xs)

    def reference(self) -> dict:
        with jax.default_matmul_precision("highest"):
            ref = jax.jit(self.layer("reference"))(self.xs, self.ws)
        self.ref = [jax.block_until_ready(r) for r in ref]
        return {}

    def correct_and_time(self, fn, partial: bool = False):
        """A stage: one compile of fn(xs, ws), its error against the reference, then the timing of
        the same executable (`partial`: the error row is saved before the timing starts)."""
        def run():
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(self.xs, self.ws).compile()
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(self.xs, self.ws))
            first_s = time.perf_counter() - t0
            err = rel_l2(out, self.ref)
            finite = all(bool(jnp.all(jnp.isfinite(o))) for o in out)
            row = {"rel_l2": err, "rel_l2_per_block": [rel_l2([o], [r]) for o, r in zip(out, self.ref)],
                   "finite": finite, "pass_tf32": bool(err <= kernels.TOLERANCE["tf32"] and finite),
                   "compile_s": round(compile_s, 1), **_timing.memory_of(compiled)}
            if partial:
                self.rows["stages"]["partial"] = row
                self.save()
            timing = _timing.time_compiled(compiled, (self.xs, self.ws), first_call_s=first_s, **TIMING)
            return {**row, **timing.as_ms()}
        return run

    def timed(self, fn, backend=None):
        """A stage: the kernel-level time of fn(xs, ws) (bench/_timing.py's loop)."""
        def run():
            _, timing, extra = _timing.compile_and_time(fn, (self.xs, self.ws), backend, **TIMING)
            return {**timing.as_ms(), **extra}
        return run
