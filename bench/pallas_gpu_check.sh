#!/usr/bin/env bash
# The Pallas backend on the H200, in one command (under 5 minutes), from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
#   bash bench/pallas_gpu_check.sh
#
# 1. bench/pallas_timing.py: pallas against dense, reference (and triton when available) on
#    d3_n64_b4_c16 (D=3 torus, scalar+vector keys, 16 channels in and out, 3x3x3 invariant filters
#    from tests/data/ginjax-0.1.8/invariant_filters.npz, vmapped batch 4, N=64), forward and
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

timeout "${PALLAS_CHECK_TIMEOUT_S:-150}" python3 -m bench.pallas_timing "$OUT" --budget "${PALLAS_CHECK_BUDGET_S:-125}" \
  ${PALLAS_CHECK_N:+--n "$PALLAS_CHECK_N"} ${PALLAS_CHECK_B:+--b "$PALLAS_CHECK_B"} 2>&1 | tee "$OUT/timing.log"

if [ -z "${SKIP_TESTS:-}" ]; then  # SKIP_TESTS=1: timing only
  timeout 140 python3 -m pytest -m gpu tests/test_conv_contract_pallas_gpu.py -q -rs --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
  echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
fi
