set -u
export GINJAX_CUDA_LIBRARY=$PWD/kernels/cuda/_ginjax_cuda.so
C=${COMMIT:-x}
timeout 190 python3 -m pytest -m gpu -q -rs --durations=5 -p no:cacheprovider tests/test_conv_contract_cuda_dw_gpu.py tests/test_conv_contract_cuda_gpu.py -k "(cuda_dw_gpu and not memcheck) or fp32" > $OUT/pytest-cuda-dw.log 2>&1
echo "pytest rc=$?" >> $OUT/pytest-cuda-dw.log
mkdir -p $OUT/b
GINJAX_CUDA_FP32_WEIGHT_GRAD=1 JAX_DEFAULT_MATMUL_PRECISION=highest timeout 75 python3 -u -m bench --out $OUT/b/fp32-dw --commit $C --configs d3_n64_b4_c16 --backends triton --modes fwd,fwd_bwd --operand-layouts auto --no-plot --time-budget 65 > $OUT/fp32-dw.log 2>&1
timeout 150 python3 -u -m bench --out $OUT/b/steps --commit $C --configs unet_d3_n64_b4,resnet_d3_n64_b4,dilresnet_d3_n64_b4 --backends auto --modes step --no-check --no-plot --time-budget 140 > $OUT/steps.log 2>&1
tar czf $OUT/results.tgz -C $OUT b
