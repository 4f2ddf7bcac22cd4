#!/usr/bin/env bash
# The Triton backend on the H200, in one command (about 8 minutes), from the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
#   bash bench/triton_gpu_check.sh            # or: PRESET=sweep bash bench/triton_gpu_check.sh
#
# 1. bench/triton_sweep.py: triton vs dense vs reference, forward and forward+backward, on the
#    standard layers (PRESET=final, default) or a tiling sweep on d3_n64_b4_c16 (PRESET=sweep);
# 2. the GPU tests: python3 -m pytest -m gpu tests/test_conv_contract_triton_gpu.py
#    (compute-sanitizer memcheck included when it is installed).
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
} 2>&1 | tee "$OUT/env.log"
timeout 300 python3 bench/triton_sweep.py --out "$OUT" --preset "${PRESET:-final}" --budget 260 2>&1 | tee "$OUT/sweep.log"
timeout 400 python3 -m pytest -m gpu tests/test_conv_contract_triton_gpu.py -q -rs --durations=10 -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.log"
