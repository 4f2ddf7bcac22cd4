#!/usr/bin/env bash
# Everything one GPU call needs, by stage, so that a session's few calls stay full. From the repo root:
#
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site:$PWD
#   STAGES="sweep profile pallas" bash bench/gpu_session.sh
#
# Stages (each bounded by its own timeout; logs and JSON under $OUT/<stage>/):
#   sweep    bench/triton_sweep.py --preset $PRESET (final: forward variants and the backward vs dense and
#            reference on every standard layer; backward: the weight kernel's tilings only; registers:
#            register caps on the forward, the input-gradient and the weight-gradient kernels)
#   profile  Nsight Compute on triton launches of d3_n64_b4_c16 (PROFILE_ARGS=--bwd: the backward's too;
#            PROFILE_SKIP launches skipped, PROFILE_COUNT profiled;
#            PROFILE_KERNEL: the kernel-name regex, default conv_contract, e.g. conv_contract_dw or
#            forward_kernel, the CUDA forward; PROFILE_STALLS=1: the warp stall reasons too)
#   pallas   bench/pallas_gpu_check.sh's timing part (block-size sweep)
#   tests    python3 -m pytest -m gpu, triton tests first, then pallas (memcheck included; the
#            triton file alone needs more than 170 s with the backward tests); TEST_ARGS: the files
#            (word-split), TEST_K: a -k expression (kept whole: "a or b" survives), TEST_MARK: the -m
#            expression (default gpu; TEST_MARK= runs the files' every test, CPU-marked ones on the GPU)
#   bench    python3 -m bench on the standard configurations (the committed A/B table)
#   profile-steps  python3 -m bench profile on the UNet, ResNet and DilResNet train steps (d3_n64_b4,
#            backend $PROFILE_BACKEND, default auto): where each step's GPU time goes, JSON/TXT/PNG
#            under $OUT/profile-steps/<device>/ (copy them to bench/results/ to commit); PROFILE_CONFIGS
#            overrides the configs, PROFILE_STEP_ARGS adds arguments (e.g. --hlo)
#   measure-auto   python3 -m bench measure-auto: the ConvContract configurations of the UNet, ResNet and
#            DilResNet steps (D=3, batch 1 at N=32/64/128 and batch 4 at N=64; MEASURE_CONFIGS overrides,
#            else AUTO_CONFIGS),
#            timed on dense, triton and pallas, into kernels/measured/<device>.json (a copy, and every
#            measurement, under $OUT/measure-auto/<device>/: copy the table to kernels/measured/ to commit)
#   auto-check     python3 -m bench on the same steps with auto and dense (mode step): auto no slower; then
#            bench.step_variants on them with backend=auto,backend=dense in alternation (AUTO_ALTERNATE=0: not)
#   variants       python3 -m bench.step_variants: train-step variants of the glue timed in alternation
#            (VARIANT_CONFIGS, default resnet_d3_n64_b4,dilresnet_d3_n64_b4; VARIANTS, default
#            baseline,vn-xla)
#   thin-spike     python3 -m bench.thin_spike: a model's first and last layers (thin) on dense in two stages, dense as
#            one convolution and triton, fwd / fwd_bwd / dw (THIN_SPIKE_ARGS adds arguments, e.g. --spatial 128 --batch 1)
#   vn-spike       python3 -m bench.vector_neuron_spike: the VectorNeuron of a d3_n64_b4_c16 vector block, XLA path
#            vs the fused Triton kernels, fwd and fwd_bwd (VN_SPIKE_ARGS adds arguments, e.g. --activation relu)
#   cuda-build     builds the opt-in CUDA kernels (kernels/cuda, -DGINJAX_CUDA=ON in place) for the stages after
#            it (variants cuda-fwd / vn-cuda); ptxas' report in $OUT/cuda-build/build.log
#   cuda-fwd       the CUDA forward's spike (bench.cuda_spike: cuda vs triton vs dense) and its GPU tests
#            (run cuda-build first)
#   cuda-ncu       Nsight Compute on the CUDA forward of d3_n64_b4_c16 (CUDA_NCU_CONFIG: a bench/triton_sweep.py
#            config; CUDA_NCU_KERNEL: the kernel-name regex, e.g. weight_gradient_kernel with CUDA_NCU_ARGS=--bwd)
#            in each layout (CUDA_NCU_LAYOUTS, default "minor planar"), warp stall reasons included;
#            run cuda-build first (or CUDA_PREBUILT=1)
#   env-ab         one switch in alternation: ENV_AB_ROUNDS rounds (default 2) of `python -m bench $ENV_AB_ARGS`
#            with ENV_AB_VAR set to each of ENV_AB_VALUES in turn (default args: d3_n64_b4_c16, triton, fwd and
#            fwd_bwd, in-model layouts); each run's limit T_ENV_AB (default 120 s)
#   compile-check  the compile switches (kernels/triton/_compile.py): COMPILE_CHECK_CONFIG's step
#            (default resnet_d3_n64_b4, auto; COMPILE_CHECK_MODES, default step) compiled and timed in four fresh processes: plain
#            (one thread, no disk cache), 16 threads without the cache, and twice with the defaults on a new
#            GINJAX_TRITON_CACHE_DIR (cold, then warm); COMPILE_CHECK_RUNS picks some of them
#            ("cache-cold cache-warm", say); COMPILE_CHECK_PROFILE=1 runs each under cProfile (the 40 costliest
#            calls, cumulative, in $run-profile.txt: what the lowering spends beside Triton's compiles);
#            each run's limit T_COMPILE_CHECK (default 150 s); their compile split and step times
#   cuda-ab        bench/library_ab.py: kernels/cuda/_ginjax_cuda_base.so (A) against _ginjax_cuda.so (B), AB_ROUNDS
#            rounds of `python -m bench $AB_ARGS` in alternation (default: d3_n64_b4_c16, triton, fwd and fwd_bwd)
#   cuda-dw        the CUDA weight gradient's GPU tests (tests/test_conv_contract_cuda_dw_gpu.py, memcheck
#            included), then bench.cuda_spike's weight-gradient rows (cuda vs triton's kernel vs dense's VJP;
#            --strip with no value: no forward rows); run cuda-build first
#   vn-ncu         Nsight Compute on the CUDA VectorNeuron backward (bench/vector_neuron_profile.py --impl cuda,
#            VN_NCU_SHAPE, default 16,32,256,256,2: d2_n256_b16_c32's block), the stall metrics included; builds
#            the library as cuda-build does (CUDA_PREBUILT=1: the carried one)
#   vn-cuda        builds the CUDA kernels as cuda-build does, runs the CUDA VectorNeuron's GPU tests, then
#            bench.vector_neuron_spike (its cuda rows beside triton); logs under $OUT/vn-cuda/
#   parity-cuda    the CUDA parity forward (kernels/cuda/parity_conv.cu) on d3_n64_b2_c8_k2: bench.parity_spike's
#            defaults (Triton's forward against it, alone and in fwd_bwd), `python -m bench` with
#            GINJAX_PARITY_CUDA=on (triton and dense, fwd and fwd_bwd: the error column checks it on the layer),
#            Nsight Compute on one launch (stall reasons included), then tests/test_parity_forward_cuda_gpu.py
#            (TEST_K: a -k expression); each step archived as it ends; carry the library (CUDA_PREBUILT's build)
# Every stage's files end up in $OUT/results.tar.gz as well (the device tool returns few files).
# CUDA_PREBUILT=1: the CUDA stages use a kernels/cuda/_ginjax_cuda.so carried with the tree (built
# on the CPU machine with the same nvcc: cmake -S . -B build/cuda -G Ninja -DGINJAX_CUDA=ON
# -DGINJAX_NATIVE=OFF -DGINJAX_CUDA_INPLACE=ON && cmake --build build/cuda) instead of building it.
# Pass COMMIT=<short hash>: the device machine's copy of the tree may carry stale git metadata, and
# results are named after the commit.
# Per-stage time limits in seconds: T_SWEEP, T_PROFILE, T_PALLAS, T_TESTS, T_BENCH, T_PROFILE_STEPS,
# T_MEASURE_AUTO, T_AUTO_CHECK, T_VARIANTS, T_VN_SPIKE, T_THIN_SPIKE, T_VN_CUDA, T_CUDA_FWD, T_CUDA_NCU, T_CUDA_DW,
# T_ENV_AB, T_VN_NCU and T_COMPILE_CHECK (each run of the stage); parity-cuda's steps T_PARITY_SPIKE,
# T_PARITY_BENCH, T_PARITY_NCU and T_PARITY_TESTS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_session}"
export PYTHONUNBUFFERED=1 PYTHONPATH="${PYTHONPATH:-$PWD}"
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  python3 -c 'import jax, triton; print("jax", jax.__version__, "triton", triton.__version__, jax.devices())'
  git log -1 --format=%H 2>/dev/null || true
} > "$OUT/env.log" 2>&1
build_cuda() {  # the opt-in CUDA library in place, for this and the later stages
  export GINJAX_CUDA_LIBRARY="$PWD/kernels/cuda/_ginjax_cuda.so"
  if [ "${CUDA_PREBUILT:-0}" = 1 ] && [ -f kernels/cuda/_ginjax_cuda.so ]; then
    # carried from a machine with the same nvcc (run's `carry`): no device time on the build
    echo "CUDA_PREBUILT=1: using the carried kernels/cuda/_ginjax_cuda.so" | tee "$1"
    return 0
  fi
  { cmake -S . -B build/cuda -G Ninja -DGINJAX_CUDA=ON -DGINJAX_NATIVE=OFF -DGINJAX_CUDA_INPLACE=ON \
      && cmake --build build/cuda; } > "$1" 2>&1
  local rc=$?  # the build's status, not grep's (a warm machine relinks only: no ptxas lines)
  grep -E "registers|spill|error" "$1" | tail -20
  return $rc
}
# warp stall reasons by plain metric name (a regex or --print-details all segfaulted ncu, sessions 22-23)
STALL_METRICS="$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' short_scoreboard \
  long_scoreboard mio_throttle barrier math_pipe_throttle wait not_selected selected dispatch_stall lg_throttle \
  no_instruction branch_resolving membar tex_throttle drain imc_miss misc | sed 's/,$//')"
# Nsight Compute's sections of the profile stages (profile, vn-ncu; cuda-ncu adds the memory tables)
NCU_SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis
  --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats --section InstructionStats)
archive() {  # everything so far into $OUT/results.tar.gz (the device tool returns few files)
  tar czf /tmp/gpu_session_results.tar.gz --exclude=results.tar.gz -C "$OUT" . && mv /tmp/gpu_session_results.tar.gz "$OUT/results.tar.gz"
}
for stage in ${STAGES:-sweep profile pallas}; do
  rm -rf "${OUT:?}/$stage" && mkdir -p "$OUT/$stage"  # a warm machine may keep an earlier run's files
  t0=$(date +%s)
  case "$stage" in
    sweep)
      timeout "${T_SWEEP:-240}" python3 bench/triton_sweep.py --out "$OUT/sweep" --preset "${PRESET:-final}" \
        --budget "$(( ${T_SWEEP:-240} - 25 ))" ${SWEEP_ARGS:-} > "$OUT/sweep/log.txt" 2>&1 ;;
    profile)
      timeout "${T_PROFILE:-120}" ncu --clock-control none --kernel-name "regex:${PROFILE_KERNEL:-conv_contract}" --launch-skip "${PROFILE_SKIP:-2}" --launch-count "${PROFILE_COUNT:-1}" \
        "${NCU_SECTIONS[@]}" ${PROFILE_STALLS:+--metrics "$STALL_METRICS"} python3 bench/triton_profile.py ${PROFILE_ARGS:-} \
        > "$OUT/profile/ncu.txt" 2>&1
      rc=$?; grep -E "Duration|Issue Slots Busy|L1/TEX Cache Throughput|Registers Per" "$OUT/profile/ncu.txt"
      grep -E "stalled" "$OUT/profile/ncu.txt" | sort -k3 -n -r | head -18; (exit $rc) ;;
    pallas)
      OUT="$OUT/pallas" SKIP_TESTS=1 PALLAS_CHECK_TIMEOUT_S="${T_PALLAS:-150}" PALLAS_CHECK_BUDGET_S="$(( ${T_PALLAS:-150} - 30 ))" \
        bash bench/pallas_gpu_check.sh > "$OUT/pallas/log.txt" 2>&1 ;;
    tests)
      # one line a test with its time, as it finishes (pytest >= 8.2; else -q): a stage cut off by
      # its limit still says what ran and how long each test took (--durations prints only at the end)
      style=$(python3 -c 'import pytest; print("-v -o console_output_style=times" if pytest.version_tuple >= (8, 2) else "-q")' 2>/dev/null || echo -q)
      # TEST_MARK (default gpu; empty: every test of TEST_ARGS, e.g. CPU-marked files run on the GPU)
      mark="${TEST_MARK-gpu}"
      timeout "${T_TESTS:-300}" python3 -m pytest ${mark:+-m "$mark"} $style -rfs --durations=15 -p no:cacheprovider ${TEST_K:+-k "$TEST_K"} ${TEST_ARGS:-tests/test_conv_contract_triton_gpu.py tests/test_conv_contract_pallas_gpu.py} > "$OUT/tests/log.txt" 2>&1 ;;
    bench)
      timeout "${T_BENCH:-300}" python3 -u -m bench --out "$OUT/bench" --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
        --time-budget "$(( ${T_BENCH:-300} - 40 ))" ${BENCH_ARGS:-} > "$OUT/bench/log.txt" 2>&1 ;;
    profile-steps)
      timeout "${T_PROFILE_STEPS:-200}" python3 -u -m bench profile "${PROFILE_CONFIGS:-unet_d3_n64_b4,resnet_d3_n64_b4,dilresnet_d3_n64_b4}" \
        --backend "${PROFILE_BACKEND:-auto}" ${PROFILE_STEP_ARGS:-} --out "$OUT/profile-steps" --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
        > "$OUT/profile-steps/log.txt" 2>&1
      rc=$?; sed -n '/^| step | backend/,$p' "$OUT/profile-steps/log.txt"; (exit $rc) ;;
    measure-auto)
      timeout "${T_MEASURE_AUTO:-240}" python3 -u -m bench measure-auto --configs "${MEASURE_CONFIGS:-${AUTO_CONFIGS:-auto-models}}" \
        --time-budget "$(( ${T_MEASURE_AUTO:-240} - 45 ))" --out "$OUT/measure-auto" \
        --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" ${MEASURE_ARGS:-} > "$OUT/measure-auto/log.txt" 2>&1
      rc=$?; grep -E "^error:" "$OUT/measure-auto/log.txt"; sed -n '/^per step, the ConvContract/,$p' "$OUT/measure-auto/log.txt"; (exit $rc) ;;
    auto-check)
      timeout "${T_AUTO_CHECK:-400}" python3 -u -m bench --configs "${AUTO_CONFIGS:-auto-models}" --backends auto,dense --modes step \
        --no-check --max-time 0.5 --min-rounds 3 --out "$OUT/auto-check" --time-budget "$(( ${T_AUTO_CHECK:-400} - 40 ))" \
        --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" > "$OUT/auto-check/log.txt" 2>&1
      rc=$?; grep -E '^\| (unet|resnet|dilresnet)' "$OUT/auto-check/log.txt"
      # the same steps in alternation (auto, dense, auto, ...): a batch-1 step at N = 32 is host-bound
      # and its time jumps between two levels (4.9 / 7.0 ms, session 22), which one pass per backend
      # can catch on different levels
      [ "${AUTO_ALTERNATE:-1}" = 1 ] && timeout "${T_AUTO_ALTERNATE:-200}" python3 -u -m bench.step_variants "$OUT/auto-check" \
        --configs "${AUTO_CONFIGS:-auto-models}" \
        --variants backend=auto,backend=dense --alternations 5 > "$OUT/auto-check/alternation.txt" 2>&1 && tail -n 12 "$OUT/auto-check/alternation.txt"
      (exit $rc) ;;
    variants)
      timeout "${T_VARIANTS:-300}" python3 -u -m bench.step_variants "$OUT/variants" --configs "${VARIANT_CONFIGS:-resnet_d3_n64_b4,dilresnet_d3_n64_b4}" \
        --variants "${VARIANTS:-baseline,vn-xla}" > "$OUT/variants/log.txt" 2>&1
      rc=$?; cat "$OUT/variants/log.txt" | tail -20; (exit $rc) ;;
    vn-spike)
      timeout "${T_VN_SPIKE:-150}" python3 -u -m bench.vector_neuron_spike "$OUT/vn-spike" ${VN_SPIKE_ARGS:-} > "$OUT/vn-spike/log.txt" 2>&1
      rc=$?; cut -c1-400 "$OUT/vn-spike/log.txt" | tail -8; (exit $rc) ;;
    thin-spike)
      timeout "${T_THIN_SPIKE:-240}" python3 -u -m bench.thin_spike "$OUT/thin-spike" ${THIN_SPIKE_ARGS:-} > "$OUT/thin-spike/log.txt" 2>&1
      rc=$?; cut -c1-300 "$OUT/thin-spike/log.txt" | tail -20; (exit $rc) ;;
    cuda-build)  # the library comes back too: carry it as kernels/cuda/_ginjax_cuda.so to skip the next build
      build_cuda "$OUT/cuda-build/build.log" && cp kernels/cuda/_ginjax_cuda.so "$OUT/cuda-build/" ;;
    cuda-fwd)
      timeout "${T_CUDA_FWD:-120}" python3 -u -m bench.cuda_spike "$OUT/cuda-fwd" > "$OUT/cuda-fwd/spike.log" 2>&1
      cut -c1-200 "$OUT/cuda-fwd/spike.log"
      timeout "${T_CUDA_FWD:-120}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_conv_contract_cuda_gpu.py \
        > "$OUT/cuda-fwd/tests.log" 2>&1
      rc=$?; tail -3 "$OUT/cuda-fwd/tests.log"; (exit $rc) ;;
    cuda-ncu)  # the CUDA forward under Nsight Compute in each vector-block layout (run cuda-build first)
      # through bench/triton_profile.py (the triton backend's forward runs the CUDA kernel): under
      # bench.cuda_spike ncu segfaulted at the first kernel (session 24), also with the plain
      # sections; --print-details all and regex metrics segfaulted it in sessions 22-23
      for layout in ${CUDA_NCU_LAYOUTS:-minor planar}; do
        GINJAX_CUDA_LAYOUT=$layout timeout "${T_CUDA_NCU:-150}" ncu --clock-control none --kernel-name "regex:${CUDA_NCU_KERNEL:-forward_kernel}" \
          --launch-skip 2 --launch-count 1 "${NCU_SECTIONS[@]}" --section MemoryWorkloadAnalysis_Tables --metrics "$STALL_METRICS" \
          python3 bench/triton_profile.py --config "${CUDA_NCU_CONFIG:-d3_n64_b4_c16}" ${CUDA_NCU_ARGS:-} > "$OUT/cuda-ncu/ncu-$layout.txt" 2>&1
        grep -E "Duration|Memory Throughput|DRAM Throughput|L2 Hit Rate|Issue Slots Busy|Registers Per" "$OUT/cuda-ncu/ncu-$layout.txt" | head -12
        grep -E "stalled" "$OUT/cuda-ncu/ncu-$layout.txt" | sort -k3 -n -r | head -18
      done ;;
    compile-check)  # the compile switches, each in a fresh process (a process compiles a kernel once)
      rc=0
      for run in ${COMPILE_CHECK_RUNS:-plain threads cache-cold cache-warm}; do
        case "$run" in
          plain) switch="GINJAX_TRITON_COMPILE_THREADS=1 GINJAX_TRITON_CACHE_DIR=off" ;;
          threads) switch="GINJAX_TRITON_COMPILE_THREADS=16 GINJAX_TRITON_CACHE_DIR=off" ;;
          *) switch="GINJAX_TRITON_CACHE_DIR=$OUT/compile-check/triton-cache" ;;  # the default threads
        esac
        # COMPILE_CHECK_PROFILE=1: each run under cProfile, its 40 costliest calls (cumulative) in $run-profile.txt
        prof=(); [ "${COMPILE_CHECK_PROFILE:-0}" = 1 ] && prof=(-m cProfile -o "$OUT/compile-check/$run.prof")
        env $switch timeout "${T_COMPILE_CHECK:-150}" python3 -u "${prof[@]}" -m bench --configs "${COMPILE_CHECK_CONFIG:-resnet_d3_n64_b4}" \
          --backends auto --modes "${COMPILE_CHECK_MODES:-step}" --no-check --max-time 0.5 --min-rounds 3 --out "$OUT/compile-check/$run" \
          --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" > "$OUT/compile-check/$run.log" 2>&1 || rc=$?
        echo "$run ($switch):"; grep -E "compiled and ran once|^\| [a-z0-9_]+ +\| (fwd|fwd_bwd|step) " "$OUT/compile-check/$run.log"
        if [ -f "$OUT/compile-check/$run.prof" ]; then
          python3 -c "import pstats, sys; pstats.Stats(sys.argv[1], stream=open(sys.argv[2], 'w')).sort_stats('cumulative').print_stats(40)" \
            "$OUT/compile-check/$run.prof" "$OUT/compile-check/$run-profile.txt" && rm -f "$OUT/compile-check/$run.prof"
        fi
      done
      ls "$OUT/compile-check/triton-cache" 2>/dev/null | wc -l | sed 's/^/cache entries: /'
      (exit $rc) ;;
    env-ab)  # one switch's values in alternation over `python -m bench` runs of the same layers
      # (ENV_AB_VAR, ENV_AB_VALUES, ENV_AB_ROUNDS, ENV_AB_ARGS); one results folder and log a run
      rc=0
      for round in $(seq "${ENV_AB_ROUNDS:-2}"); do
        for value in ${ENV_AB_VALUES:?ENV_AB_VALUES: the values of ENV_AB_VAR to alternate}; do
          tag=$(printf '%s' "$value" | tr -c 'A-Za-z0-9._-' '-')  # a file name (values like 2/64/4)
          env "${ENV_AB_VAR:?ENV_AB_VAR: the switch to alternate}=$value" timeout "${T_ENV_AB:-120}" python3 -u -m bench \
            --out "$OUT/env-ab/$tag-$round" --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
            ${ENV_AB_ARGS:---configs d3_n64_b4_c16 --backends triton --modes fwd,fwd_bwd --operand-layouts auto --no-check} \
            > "$OUT/env-ab/$tag-$round.log" 2>&1 || rc=$?
          echo "$ENV_AB_VAR=$value round $round:"; grep -E '^\| [a-z0-9_]+ +\| (fwd|fwd_bwd|step)' "$OUT/env-ab/$tag-$round.log"
        done
      done
      (exit $rc) ;;
    cuda-ab)  # two builds of the CUDA library in alternation (bench/library_ab.py): carry the baseline as
      # kernels/cuda/_ginjax_cuda_base.so beside the new kernels/cuda/_ginjax_cuda.so
      timeout "${T_CUDA_AB:-300}" python3 -u -m bench.library_ab "$OUT/cuda-ab" --a kernels/cuda/_ginjax_cuda_base.so \
        --b kernels/cuda/_ginjax_cuda.so --rounds "${AB_ROUNDS:-3}" -- ${AB_ARGS:---configs d3_n64_b4_c16 --backends triton --modes fwd,fwd_bwd} \
        > "$OUT/cuda-ab/log.txt" 2>&1
      rc=$?; tail -8 "$OUT/cuda-ab/log.txt"; (exit $rc) ;;
    cuda-dw)
      timeout "${T_CUDA_DW:-300}" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_conv_contract_cuda_dw_gpu.py \
        > "$OUT/cuda-dw/tests.log" 2>&1
      rc=$?; tail -3 "$OUT/cuda-dw/tests.log"
      timeout "${T_CUDA_DW:-300}" python3 -u -m bench.cuda_spike "$OUT/cuda-dw" --strip > "$OUT/cuda-dw/spike.log" 2>&1
      cut -c1-300 "$OUT/cuda-dw/spike.log"; (exit $rc) ;;
    vn-ncu)
      build_cuda "$OUT/vn-ncu/build.log"
      timeout "${T_VN_NCU:-150}" ncu --clock-control none --kernel-name regex:backward_kernel --launch-skip 1 --launch-count 1 \
        "${NCU_SECTIONS[@]}" --metrics "$STALL_METRICS" python3 bench/vector_neuron_profile.py --impl cuda --shape "${VN_NCU_SHAPE:-16,32,256,256,2}" \
        > "$OUT/vn-ncu/ncu.txt" 2>&1
      rc=$?; grep -E "Duration|Issue Slots Busy|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy" "$OUT/vn-ncu/ncu.txt"
      grep -E "stalled" "$OUT/vn-ncu/ncu.txt" | sort -k3 -n -r | head -12; (exit $rc) ;;
    vn-cuda)
      build_cuda "$OUT/vn-cuda/build.log"
      timeout "${T_VN_CUDA:-240}" python3 -m pytest -m gpu -v -rfEs -p no:cacheprovider tests/test_vector_neuron_cuda_gpu.py \
        > "$OUT/vn-cuda/tests.log" 2>&1
      rc=$?; tail -5 "$OUT/vn-cuda/tests.log"
      timeout 150 python3 -u -m bench.vector_neuron_spike "$OUT/vn-cuda" --repeat 8 --tilings > "$OUT/vn-cuda/spike.log" 2>&1
      cut -c1-300 "$OUT/vn-cuda/spike.log" | grep -E "^(triton|cuda)_" ; (exit $rc) ;;
    parity-cuda)  # the CUDA parity forward (GINJAX_PARITY_CUDA) on the k2 layer, each step archived as it ends
      # (a call cut off by its limit still returns what finished): spike, bench, ncu, GPU tests
      d="$OUT/parity-cuda"; export GINJAX_CUDA_LIBRARY="$PWD/kernels/cuda/_ginjax_cuda.so"
      timeout "${T_PARITY_SPIKE:-200}" python3 -m bench.parity_spike "$d/spike" > "$d/spike.log" 2>&1
      rc=$?; tail -12 "$d/spike.log"; archive
      GINJAX_PARITY_CUDA=on timeout "${T_PARITY_BENCH:-120}" python3 -u -m bench --out "$d/bench" \
        --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
        --configs d3_n64_b2_c8_k2 --backends triton,dense --modes fwd,fwd_bwd > "$d/bench.log" 2>&1 || rc=$?
      grep -E '^\| ' "$d/bench.log" | head -12; archive
      timeout "${T_PARITY_NCU:-90}" ncu --clock-control none --kernel-name regex:parity_forward --launch-skip 1 --launch-count 1 \
        "${NCU_SECTIONS[@]}" --metrics "$STALL_METRICS" python3 -m bench.parity_spike "$d/ncu_spike" --forward cuda --weight-grad \
        > "$d/ncu.txt" 2>&1
      grep -E "Duration|Issue Slots Busy|Executed Ipc A|L1/TEX Cache Throughput|L2 Cache Throughput|Registers Per|Achieved Occ" "$d/ncu.txt"
      grep -E "stalled" "$d/ncu.txt" | sort -k3 -n -r | head -8; archive
      timeout "${T_PARITY_TESTS:-240}" python3 -m pytest -m gpu -v -rfs -p no:cacheprovider tests/test_parity_forward_cuda_gpu.py \
        ${TEST_K:+-k "$TEST_K"} > "$d/tests.log" 2>&1 || rc=$?
      tail -12 "$d/tests.log"; (exit $rc) ;;
    *) echo "unknown stage $stage"; (exit 2) ;;
  esac
  echo "stage $stage: exit $? after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/env.log"
done
# The device tool returns at most 8 files and no deeply nested folders: everything in one archive.
archive
echo "archived under $OUT/results.tar.gz"
