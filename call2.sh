set -u
export GINJAX_CUDA_LIBRARY=$PWD/kernels/cuda/_ginjax_cuda.so
C=${COMMIT:-x}
timeout 300 python3 -m pytest -m gpu -q -rs --durations=8 -p no:cacheprovider tests/test_conv_contract_cuda_gpu.py tests/test_conv_contract_cuda_dw_gpu.py -k "not sanitizer and not memcheck" > $OUT/pytest-cuda.log 2>&1
echo "pytest rc=$?" >> $OUT/pytest-cuda.log
mkdir -p $OUT/b
timeout 200 python3 -u -m bench --out $OUT/b/layers --commit $C --configs d3_n64_b4_c16,d3_n64_b2_c32,d3_n128_b1_c16 --backends triton,dense --modes fwd,fwd_bwd --operand-layouts auto --time-budget 185 > $OUT/bench-3d.log 2>&1
GINJAX_BENCH_QUEUED_CALLS=25 timeout 90 python3 -u -m bench --out $OUT/b/q25 --commit $C --configs d3_n64_b4_c16 --backends triton,dense --modes fwd,fwd_bwd --operand-layouts auto --no-check --no-plot --time-budget 80 > $OUT/bench-q25.log 2>&1
tar czf $OUT/bench.tgz -C $OUT b
