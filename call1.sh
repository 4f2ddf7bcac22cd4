set -u
export GINJAX_CUDA_LIBRARY=$PWD/kernels/cuda/_ginjax_cuda.so
C=${COMMIT:-x}
nvidia-smi -L > $OUT/env.txt; python3 -c "import jax;print(jax.__version__, jax.devices())" >> $OUT/env.txt 2>&1
timeout 290 python3 -m pytest -m gpu -q -rs --durations=10 -p no:cacheprovider tests/test_conv_contract_cuda_gpu.py tests/test_conv_contract_cuda_dw_gpu.py -k "nan_and_inf or drawn or fp32" > $OUT/pytest-new.log 2>&1
echo "pytest rc=$?" >> $OUT/pytest-new.log
mkdir -p $OUT/b
for v in 1 0; do
  GINJAX_CUDA_FP32=$v JAX_DEFAULT_MATMUL_PRECISION=highest timeout 140 python3 -u -m bench --out $OUT/b/fp32-$v --commit $C --configs d3_n64_b4_c16 --backends triton,dense --modes fwd,fwd_bwd --operand-layouts auto --no-plot --time-budget 120 > $OUT/fp32-$v.log 2>&1
done
tar czf $OUT/bench.tgz -C $OUT b
