#!/usr/bin/env bash
# The Triton backend on the H200, in one command, from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   bash bench/triton_gpu_check.sh
#
# 1. a smoke test of the launcher (one planar forward and its gradient, errors printed in full);
# 2. bench/triton_sweep.py --preset $PRESET (default layers: the ginjax layer with bias, dense vs
#    triton, fwd and fwd_bwd, layout variants, two chained layers) within $BUDGET seconds;
# 3. the GPU tests, python3 -m pytest -m gpu tests/test_conv_contract_triton_gpu.py -k "$TESTS"
#    (default: all, compute-sanitizer memcheck included when it is installed).
# Logs and JSON go to $OUT (default bench/results/triton).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/triton}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c 'import jax, triton; print("jax", jax.__version__, "triton", triton.__version__, jax.devices())'
  python3 -c 'import kernels.triton as t; print("triton backend:", t.availability())'
  timeout 120 python3 - <<'PY'
import sys; sys.path.insert(0, "tests")
import jax, jax.numpy as jnp
from test_conv_contract_triton import make_layer, operands
from kernels.triton import conv_contract_triton
spec = make_layer(3, 3, [("s", 3), ("v", 2)], [("s", 2), ("v", 3)])
xs, ws = operands(spec, 9, seed=1, batch=2)
f = jax.jit(jax.vmap(lambda x: conv_contract_triton(spec, x, ws, "tf32")))
print("smoke forward:", [o.shape for o in f(xs)])
print([l for l in f.lower(xs).compile().as_text().splitlines() if "triton_kernel_call" in l][0][:600])
g = jax.jit(jax.grad(lambda x: sum(jnp.sum(jnp.sin(o)) for o in f(x))))(xs)
print("smoke gradient:", [float(jnp.linalg.norm(a)) for a in g])
PY
} 2>&1 | tee "$OUT/env.log"
timeout $((${BUDGET:-260} + 60)) python3 bench/triton_sweep.py --out "$OUT" --preset "${PRESET:-layers}" --budget "${BUDGET:-260}" ${SWEEP_ARGS:-} 2>&1 | tee "$OUT/sweep.log" | grep -v '^{'
timeout "${TEST_TIMEOUT:-400}" python3 -m pytest -m gpu tests/test_conv_contract_triton_gpu.py -k "${TESTS:-}" -q -rs --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
