set -u
export GINJAX_CUDA_LIBRARY=$PWD/kernels/cuda/_ginjax_cuda.so
C=${COMMIT:-x}
timeout 160 python3 -m pytest -m gpu -q -rs --durations=5 -p no:cacheprovider tests/test_conv_contract_cuda_dw_gpu.py -k "not memcheck" > $OUT/pytest-cuda-dw.log 2>&1
echo "pytest rc=$?" >> $OUT/pytest-cuda-dw.log
mkdir -p $OUT/b
for m in xla triton; do
  GINJAX_INPUT_MEANS=$m timeout 65 python3 -u -m bench --out $OUT/b/means-$m --commit $C --configs d3_n64_b4_c16 --backends triton --modes fwd,fwd_bwd --operand-layouts auto --no-check --no-plot --time-budget 55 > $OUT/means-$m.log 2>&1
done
timeout 175 python3 -u -m bench --out $OUT/b/steps --commit $C --configs unet_d3_n64_b4,resnet_d3_n64_b4,dilresnet_d3_n64_b4 --backends auto --modes step --no-check --no-plot --time-budget 160 > $OUT/steps.log 2>&1
tar czf $OUT/results.tgz -C $OUT b
