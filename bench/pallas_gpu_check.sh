#!/usr/bin/env bash
# The Pallas backend on the H200, in one command (under 5 minutes), from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
#   bash bench/pallas_gpu_check.sh
#
# 1. times pallas against dense, reference (and triton when available) on d3_n64_b4_c16
#    (D=3 torus, scalar+vector keys, 16 channels in and out, 3x3x3 invariant filters from
#    tests/data/ginjax-0.1.8/invariant_filters.npz, vmapped batch 4, N=64), forward and
#    forward+backward at JAX's default precision (TF32), plus pallas fp32/bf16 and a small
#    block-size sweep; errors against the reference at fp32;
# 2. runs the native GPU tests: python3 -m pytest -m gpu tests/test_conv_contract_pallas_gpu.py
# Logs go to $OUT (or bench/results/pallas_gpu): env.log, timing.log, pallas_timing.json, pytest_gpu.log.
# A CPU dry run of the timing part (interpret mode): PALLAS_CHECK_N=8 PALLAS_CHECK_B=1 bash bench/pallas_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/pallas_gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}"

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv 2>&1
  python3 -c 'import jax, jaxlib; print("jax", jax.__version__, "jaxlib", jaxlib.__version__, jax.devices())'
  python3 -c 'import kernels; from kernels import pallas; print("backends", kernels.available_backends()); print("pallas", pallas.availability())'
} 2>&1 | tee "$OUT/env.log"

timeout "${PALLAS_CHECK_TIMEOUT_S:-150}" python3 - "$OUT" <<'EOF' 2>&1 | tee "$OUT/timing.log"
import json, os, statistics, sys, time, warnings

import numpy as np
import jax
import jax.numpy as jnp

import kernels
from kernels import pallas as kp

out_dir = sys.argv[1]
T_START, BUDGET_S = time.perf_counter(), float(os.environ.get("PALLAS_CHECK_BUDGET_S", 125))
filters = np.load("tests/data/ginjax-0.1.8/invariant_filters.npz")
basis = lambda k: filters[f"filters/D3M3/k{k}p0"]
c, N, B = 16, int(os.environ.get("PALLAS_CHECK_N", 64)), int(os.environ.get("PALLAS_CHECK_B", 4))  # smaller: CPU dry run
spatial = (N, N, N)
spec = kernels.make_spec(
    3, [(0, 0, c), (1, 0, c)], [(0, 0, c), (1, 0, c)],
    [(0, 0, basis(0)), (0, 1, basis(1)), (1, 0, basis(1)), (1, 1, basis(2))], True,
)
rng = np.random.default_rng(0)
xs = [jnp.asarray(rng.standard_normal((B,) + spec.in_shape(a, spatial)), jnp.float32) for a in range(2)]
ws = [
    jnp.asarray(rng.standard_normal((c, c, p.basis.n_filters)) / np.sqrt(c * p.basis.n_filters), jnp.float32)
    for p in spec.pairs
]
out_shapes = [(B, c) + spatial + (3,) * k for k, _, _ in spec.out_keys]
cots = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in out_shapes]


def forward(run):
    return lambda xs, ws: jax.vmap(lambda x: run(x, ws))(xs)


def forward_backward(run):
    def loss(xs, ws):
        return sum(jnp.vdot(o, g) for o, g in zip(forward(run)(xs, ws), cots))
    return jax.value_and_grad(loss, argnums=(0, 1))


def backend_run(name, precision=None):
    return lambda x, w: kernels.conv_contract(spec, x, w, backend=name, precision=precision)


def pallas_run(precision=None, **block):  # block: BlockSizes fields
    bs = kp.BlockSizes(**block)
    return lambda x, w: kp.conv_contract(spec, x, w, precision=precision, block_sizes=bs)


def rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(jnp.sum((x.astype(jnp.float32) - y) ** 2)) for x, y in zip(la, lb))
    return (num / sum(float(jnp.sum(y * y)) for y in lb)) ** 0.5


def measure(fn, reps=15):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        compiled = jax.jit(fn).lower(xs, ws).compile()
        compile_s = time.perf_counter() - t0
    result = jax.block_until_ready(compiled(xs, ws))
    for _ in range(2):
        jax.block_until_ready(compiled(xs, ws))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(xs, ws))
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) / 2**20 if mem is not None else float("nan")
    notes = sorted({f"{w.category.__name__}: {str(w.message)[:120]}" for w in caught})
    return result, dict(
        median_ms=statistics.median(times), p20_ms=times[len(times) // 5], p80_ms=times[(4 * len(times)) // 5],
        compile_s=compile_s, temp_mb=temp, warnings=notes,
    )


flops = {"fwd": B * spec.dense_flops(spatial)}
flops["fwd_bwd"] = 3 * flops["fwd"]
oracle = {}
for mode, wrap in (("fwd", forward), ("fwd_bwd", forward_backward)):
    oracle[mode] = jax.jit(wrap(backend_run("reference", "fp32")))(xs, ws)

rows = []
# In order of importance: the time budget may cut the tail.
avail = kernels.available_backends()
cases = [(b, None, {}) for b in ("reference", "dense") if b in avail]
cases += [("pallas", None, dict(algorithm="taps")), ("pallas", None, dict(algorithm="factorised"))]
cases += [("triton", None, {})] if "triton" in avail else []
cases += [("pallas", p, dict(algorithm=a)) for a in ("taps", "factorised") for p in ("bf16", "fp32")]
cases += [("pallas", None, dict(algorithm="taps", block_p=bp, num_warps=nw)) for bp, nw in ((128, 4), (64, 8))]
cases += [("pallas", None, dict(algorithm="taps", hoist_budget=1 << 20, num_warps=8))]  # weights loaded once
cases += [("pallas", None, dict(algorithm="factorised", block_p=bp, num_warps=nw)) for bp, nw in ((16, 8), (32, 4), (32, 8))]
for backend, precision, block in cases:
    for mode, wrap in (("fwd", forward), ("fwd_bwd", forward_backward)):
        if (precision or len(block) > 1) and mode == "fwd_bwd":
            continue  # variants: forward only
        if time.perf_counter() - T_START > BUDGET_S:
            print(f"skipped {backend} {precision} {block} {mode}: time budget")
            continue
        label = backend + "".join(f"-{v}" if k == "algorithm" else f"-{k}{v}" for k, v in block.items())
        label += f"-{precision}" if precision else ""
        run = pallas_run(precision, **block) if backend == "pallas" else backend_run(backend, precision)
        try:
            result, row = measure(wrap(run))
            row["rel_err_vs_fp32_reference"] = rel(result, oracle[mode])
        except Exception as err:  # report and go on: one failing variant must not hide the others
            row = dict(error=f"{type(err).__name__}: {str(err)[:400]}")
        row.update(backend=label, mode=mode)
        if "median_ms" in row:
            row["tflops_dense_equiv"] = flops[mode] / row["median_ms"] / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(f"{out_dir}/pallas_timing.json", "w") as fh:  # after every row: a timeout keeps them
            json.dump(dict(config="d3_n64_b4_c16", device=jax.devices()[0].device_kind, jax=jax.__version__, rows=rows), fh, indent=1)

base = {(r["mode"], r["backend"]): r.get("median_ms") for r in rows}
print(f"\nd3_n64_b4_c16 on {jax.devices()[0].device_kind}, jax {jax.__version__}")
print(f"{'backend':34s} {'mode':8s} {'median ms':>10s} {'p20-p80':>15s} {'x ref':>7s} {'x dense':>8s} {'TFLOP/s':>8s} {'temp MB':>8s} {'rel err':>9s} {'compile s':>9s}")
for r in rows:
    if "median_ms" not in r:
        print(f"{r['backend']:34s} {r['mode']:8s} ERROR {r['error']}")
        continue
    ref, dense = base.get((r["mode"], "reference")), base.get((r["mode"], "dense"))
    print(
        f"{r['backend']:34s} {r['mode']:8s} {r['median_ms']:10.3f} {r['p20_ms']:7.3f}-{r['p80_ms']:<7.3f} "
        f"{(ref / r['median_ms']) if ref else float('nan'):7.2f} {(dense / r['median_ms']) if dense else float('nan'):8.2f} "
        f"{r['tflops_dense_equiv']:8.1f} {r['temp_mb']:8.0f} {r['rel_err_vs_fp32_reference']:9.2e} {r['compile_s']:9.1f}"
    )
for note in sorted({w for r in rows for w in r.get("warnings", [])}):
    print("warning seen while compiling:", note)
EOF

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: timing only
  timeout 140 python3 -m pytest -m gpu tests/test_conv_contract_pallas_gpu.py -q -rs --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
  echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
fi
