"""The step profiler (bench/profile.py, bench/_trace.py) on CPU: a real trace of a small layer step
read both ways (ProfileData and the trace JSON), the report and its files, and the GPU path on a
hand-written XSpace with the kernels a GPU step launches."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from bench import _trace

GPU_HLO = """HloModule jit_step, is_scheduled=true

%fused_reduce (p: f32[8,64]) -> f32[8] {
  %p = f32[8,64]{1,0} parameter(0)
  ROOT %r = f32[8]{0} reduce(%p, %c), dimensions={1}, metadata={op_name="jit(step)/jvp(VectorNeuron)/reduce_sum" stack_frame_id=1}
}

ENTRY %main (x: f32[8,64]) -> f32[8] {
  %x = f32[8,64]{1,0} parameter(0)
  %loop_add_fusion = f32[8,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/add"}
  %input_reduce_fusion = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_reduce
  %input_add_transpose_fusion = f32[64,8]{1,0} fusion(%x), kind=kInput, calls=%fused_t, metadata={op_name="jit(step)/transpose"}
  %gemm_fusion_dot = f32[8,8]{1,0} fusion(%x), kind=kCustom, calls=%fused_dot, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %cudnn-conv.1 = (f32[8,64]{1,0}, u8[0]{0}) custom-call(%x), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/conv_general_dilated"}
  %custom-call.2 = f32[8,64]{1,0} custom-call(%x), custom_call_target="triton_kernel_call", metadata={op_name="jit(step)/jvp(ConvContract)/conv_contract_triton"}
  %custom-call.3 = f32[8,64]{1,0} custom-call(%x), custom_call_target="triton_kernel_call", metadata={op_name="jit(step)/transpose(jvp(ConvContract))/conv_contract_triton"}
  %custom-call.4 = f32[8,64]{1,0} custom-call(%x), custom_call_target="triton_kernel_call", metadata={op_name="jit(step)/transpose(jvp(ConvContract))/conv_contract_triton"}
  %custom-call.5 = f32[8,64]{1,0} custom-call(%x), custom_call_target="triton_kernel_call", metadata={op_name="jit(step)/jvp(ConvContract)/conv_contract_triton"}
  %loop_multiply_fusion.3 = f32[8,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_mul, metadata={op_name="jit(step)/mul"}
  ROOT %copy.5 = f32[8]{0} copy(%x)
}
"""

# (kernel name, hlo_op, duration in microseconds, expected kind)
GPU_KERNELS = [
    ("loop_add_fusion", "loop_add_fusion", 2.0, "XLA loop fusion"),
    ("input_reduce_fusion", "input_reduce_fusion", 3.0, "XLA reduce fusion"),
    ("input_add_transpose_fusion", "input_add_transpose_fusion", 4.0, "copy/transpose"),
    ("gemm_fusion_dot", "gemm_fusion_dot", 5.0, "XLA gemm fusion"),
    ("sm90_xmma_fprop_implicit_gemm_indexed_wo_smem", "cudnn-conv.1", 6.0, "cuDNN/cuBLAS"),
    ("conv_contract_fwd_0a1b", "custom-call.2", 7.0, "ConvContract fused fwd"),
    ("conv_contract_fwd_0a1b", "custom-call.3", 8.0, "ConvContract fused input-grad"),
    ("conv_contract_dw_9f", "custom-call.4", 9.0, "ConvContract fused weight-grad"),
    ("copy_5", "copy.5", 1.0, "copy/transpose"),
    # the same kernel launched by a second instruction of the same jax op: one row
    ("conv_contract_fwd_0a1b", "custom-call.5", 7.0, "ConvContract fused fwd"),
    # inside a CUDA graph, hlo_op names the command buffer: the kernel's name says the instruction
    ("loop_multiply_fusion_3", "command_buffer_12", 1.5, "XLA loop fusion"),
    ("Memset 3", "command_buffer_12", 0.5, "copy/transpose"),
]


def _xspace_text() -> str:
    names = sorted({k for k, _, _, _ in GPU_KERNELS})
    meta = {name: i + 1 for i, name in enumerate(names)}
    events = "".join(
        f'events {{ metadata_id: {meta[k]} offset_ps: {i * 10**7} duration_ps: {int(us * 10**6)} '
        f'stats {{ metadata_id: 1 str_value: "{op}" }} stats {{ metadata_id: 2 str_value: "jit_step" }} }}\n'
        for i, (k, op, us, _) in enumerate(GPU_KERNELS)
    )
    derived = 'lines { id: 9 name: "XLA Ops" events { metadata_id: 1 offset_ps: 0 duration_ps: 999000000 } }'
    metadata = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{k}" }} }}\n' for k, i in meta.items())
    return (
        'planes { id: 1 name: "/device:GPU:0"\n'
        f'lines {{ id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000\n{events}}}\n{derived}\n{metadata}'
        'stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }\n'
        'stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }\n}\n'
    )


def test_gpu_kernels_are_sorted_into_kinds_from_the_trace_and_the_hlo():
    from bench.profile import summarise

    data = _trace._profile_data_class().from_text_proto(_xspace_text())
    events, source = _trace.events_from_profile_data(data)
    assert source == "gpu"
    assert [e.name for e in events] == [k for k, _, _, _ in GPU_KERNELS]  # the derived 'XLA Ops' line is not summed
    index = _trace.hlo_index(GPU_HLO)
    assert index["cudnn-conv.1"].target == "__cudnn$convForward" and index["gemm_fusion_dot"].backend_kind == "__triton_gemm"
    assert index["input_reduce_fusion"].op_name == "jit(step)/jvp(VectorNeuron)/reduce_sum"  # from its fused root
    for event, (_, _, _, kind) in zip(events, GPU_KERNELS):
        assert _trace.classify(event, _trace.resolve(event, index)[1]) == kind, event
    kinds, rows, total, launches = summarise(events, index, steps=2)
    assert total == pytest.approx(sum(us for _, _, us, _ in GPU_KERNELS) / 1e3 / 2)
    assert sum(kinds.values()) == pytest.approx(total) and launches == len(GPU_KERNELS) / 2
    assert rows[0].kernel == "conv_contract_fwd_0a1b" and rows[0].kind == "ConvContract fused fwd"
    assert rows[0].hlo_ops == ["custom-call.2", "custom-call.5"] and rows[0].ops_text() == "custom-call.2 (+1 more)"
    assert rows[0].launches == 1.0 and rows[0].ms == pytest.approx(14e-3 / 2)
    assert "conv_contract_triton" in rows[0].jax_op
    in_graph = next(r for r in rows if r.kernel == "loop_multiply_fusion_3")
    assert in_graph.hlo_op == "loop_multiply_fusion.3" and in_graph.jax_op == "jit(step)/mul"


def test_sources_name_the_op_and_the_model_code_that_called_it():
    hlo = """HloModule m

FileNames
1 "/src/ginjax/kernels/dense.py"
2 "/src/ginjax/ginjax/_conv_contract.py"
3 "/src/ginjax/ginjax/models/unet.py"

FunctionNames
1 "assemble_dense_filter"
2 "ConvContract.__call__"
3 "UNet.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=34 end_line=34 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=299 end_line=299 column=1 end_column=2}
3 {file_name_id=3 function_name_id=3 line=120 end_line=120 column=1 end_column=2}

StackFrames
1 {file_location_id=3 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=1 parent_frame_id=2}

ENTRY %main (x: f32[8]) -> f32[8] {
  %x = f32[8]{0} parameter(0)
  ROOT %loop_fusion = f32[8]{0} fusion(%x), kind=kLoop, calls=%f, metadata={op_name="jit(step)/dot_general" stack_frame_id=3}
}
"""
    info = _trace.hlo_index(hlo)["loop_fusion"]
    assert info.source == "dense.py:34 (assemble_dense_filter) <- unet.py:120 (UNet.__call__)"
    assert info.source_path == "/src/ginjax/kernels/dense.py"
    assert info.op_name == "jit(step)/dot_general" and info.fusion_kind == "kLoop"


LIBRARY_HLO = """HloModule m

FileNames
1 "/site/kernels/_lax_common.py"
2 "/site/ginjax/_channel_mix.py"

FunctionNames
1 "conv_channels_last"
2 "channel_mix"

FileLocations
1 {file_name_id=1 function_name_id=1 line=34 end_line=34 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=50 end_line=50 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=0}
2 {file_location_id=2 parent_frame_id=0}

ENTRY %main (x: f32[8,64]) -> f32[8,64] {
  %x = f32[8,64]{1,0} parameter(0)
  %cudnn-conv.1 = (f32[8,64]{1,0}, u8[0]{0}) custom-call(%x), custom_call_target="__cudnn$convForward", metadata={op_name="jit(step)/conv_general_dilated" stack_frame_id=1}
  %custom-call.7 = f32[8,64]{1,0} custom-call(%x), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/dot_general" stack_frame_id=2}
  ROOT %custom-call.8 = f32[8,64]{1,0} custom-call(%x), custom_call_target="triton_kernel_call", metadata={op_name="jit(step)/transpose(jvp(vmap()))/ginjax_triton_kernel_call"}
}
"""


def test_library_calls_of_conv_contracts_on_dense_and_the_vector_neuron_kernels_have_their_own_kinds():
    from bench.profile import StepProfile

    index = _trace.hlo_index(LIBRARY_HLO)
    events = [_trace.KernelEvent("sm90_xmma_fprop_implicit_gemm", 4e6, hlo_op="cudnn-conv.1"),
              _trace.KernelEvent("nvjet_tst_64x8", 1e6, hlo_op="custom-call.7"),
              _trace.KernelEvent("vector_neuron_bwd_4a3203e08726", 2e6, hlo_op="custom-call.8"),
              _trace.KernelEvent("conv_contract_dw_9f", 3e6, hlo_op="custom-call.9")]
    kinds = [_trace.classify(e, _trace.resolve(e, index)[1]) for e in events]
    assert kinds == [_trace.DENSE, "cuDNN/cuBLAS", _trace.VECTOR_NEURON, "ConvContract fused weight-grad"]
    report = StepProfile(
        name="t", backend="auto", platform="gpu", device_kind="H", jax_version="0", steps=1, step_ms=11.0,
        kernel_ms=10.0, launches=4, kinds={_trace.DENSE: 4.0, "cuDNN/cuBLAS": 1.0, _trace.VECTOR_NEURON: 2.0,
                                           "ConvContract fused weight-grad": 3.0},
        kernels=[], source="gpu", reader="test", hlo_module="m")
    assert report.conv_contract_ms() == (3.0, 7.0)
    assert "fused kernels 3.00 ms (30.0%), with its layers on dense (library calls) 7.00 ms (70.0%); " \
           "outside ConvContract 30.0%" in report.format()


def test_the_cuda_kernels_are_sorted_by_their_ffi_target():
    """kernels/cuda's ConvContract forward (which also runs the input gradient, under jax's
    transpose) and weight gradient, and its VectorNeuron kernels, whose kernel name is also
    `forward_kernel`: the custom call's target tells them apart."""
    def kind(name, target, op_name):
        return _trace.classify(_trace.KernelEvent(name, 1.0, hlo_op="ffi_call.3"),
                               _trace.HloInfo(opcode="custom-call", target=target, op_name=op_name))

    conv = "void (anonymous namespace)::forward_kernel<32, 2>((anonymous namespace)::Params)"
    assert kind(conv, "ginjax_cuda_forward", "jit(s)/jvp(vmap())/ffi_call") == "ConvContract fused fwd"
    assert kind(conv, "ginjax_cuda_forward", "jit(s)/transpose(jvp(vmap()))/ffi_call") == "ConvContract fused input-grad"
    # a later output group's launch, writing its channels into the previous launch's results
    assert kind(conv, "ginjax_cuda_forward_into", "jit(s)/jvp(vmap())/ffi_call") == "ConvContract fused fwd"
    assert kind(conv, "ginjax_cuda_forward_into", "jit(s)/transpose(jvp(vmap()))/ffi_call") == \
        "ConvContract fused input-grad"
    # with a residual block's input added in the epilogue (alone, and into a previous group's results)
    for target in ("ginjax_cuda_forward_add", "ginjax_cuda_forward_into_add"):
        assert kind(conv, target, "jit(s)/jvp(vmap())/ffi_call") == "ConvContract fused fwd"
    dw = "void (anonymous namespace)::weight_gradient_kernel<64>((anonymous namespace)::DwParams)"
    assert kind(dw, "ginjax_cuda_weight_gradient", "jit(s)/transpose(jvp(vmap()))/ffi_call") == \
        "ConvContract fused weight-grad"
    vn = "void (anonymous namespace)::forward_kernel<16, 3>(float const*, float const*, float*, int, float, int)"
    assert kind(vn, "ginjax_cuda_vn_forward", "jit(s)/jvp(vmap())/ffi_call") == _trace.VECTOR_NEURON
    assert kind(vn, "some_other_ffi_target", "jit(s)/ffi_call") == "other"
    # the per-channel sums kernel (Triton, through jaxlib's triton_kernel_call) has its own kind
    sums = _trace.classify(_trace.KernelEvent("channel_sums_a_planar_16_262144_3_4_1", 1.0, hlo_op="ginjax_triton_kernel_call.1"),
                           _trace.HloInfo(opcode="custom-call", target="triton_kernel_call",
                                          op_name="jit(s)/transpose(jvp(vmap()))/ginjax_triton_kernel_call"))
    assert sums == _trace.CHANNEL_SUMS


def test_a_kernel_without_hlo_text_is_classified_by_its_names():
    def kind(name, hlo_op="", tf_op=""):
        return _trace.classify(_trace.KernelEvent(name, 1.0, hlo_op=hlo_op, tf_op=tf_op), None)

    assert kind("loop_multiply_fusion", "loop_multiply_fusion") == "XLA loop fusion"
    assert kind("input_add_reduce_fusion", "input_add_reduce_fusion") == "XLA reduce fusion"
    assert kind("conv_contract_dx_factorised", "custom-call.1") == "ConvContract fused input-grad"
    assert kind("conv_contract_fwd_1", "custom-call.1", tf_op="jit(f)/transpose(jvp(f))/x") == "ConvContract fused input-grad"
    assert kind("nvjet_tst_128x64", "") == "cuDNN/cuBLAS"
    assert kind("MemcpyD2D", "") == "copy/transpose"
    assert kind("some_kernel", "") == "other"


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    """A real profile of a small layer's value_and_grad on this CPU, its raw trace kept."""
    from bench import _cases, _configs
    from bench.profile import profile_step

    trace_dir = tmp_path_factory.mktemp("trace")
    fn, args = _cases.LayerCase(_configs.LayerConfig("t", D=2, N=8, B=2, c=2)).function("fwd_bwd")
    return profile_step(fn, *args, backend="dense", name="t-fwd_bwd", trace_dir=str(trace_dir)), trace_dir


def test_profile_step_on_cpu_reads_a_real_trace_and_says_it_needs_a_gpu(cpu_profile, tmp_path):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU path of the profiler")
    report, _ = cpu_profile
    assert report.source == "cpu-thunks" and report.steps == 1 and report.step_ms is None
    assert "kernel timing needs a GPU" in report.note and "kernel timing needs a GPU" in report.format()
    assert report.kernel_ms > 0 and sum(report.kinds.values()) == pytest.approx(report.kernel_ms)
    assert [r.ms for r in report.kernels] == sorted((r.ms for r in report.kernels), reverse=True)
    assert report.hlo_module and report.launches == len([1 for r in report.kernels for _ in range(int(r.launches))])
    # the dense backend's convolutions, with the jax op and the source line that made them
    convs = [r for r in report.kernels if "conv_general_dilated" in r.jax_op]
    assert convs and any("_lax_common.py" in r.source for r in convs)
    paths = report.write(tmp_path, commit="abc1234")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d-abc1234-profile-t-fwd_bwd\.json", paths["json"].name)
    assert paths["json"].parent.name == "cpu"
    data = json.loads(paths["json"].read_text())
    assert data["kinds"] == report.kinds and data["commit"] == "abc1234" and data["kernels"][0]["kernel"]
    if "png" in paths:
        assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "hlo_text" not in data and "hlo" not in paths
    with_hlo = report.write(tmp_path, commit="abc1234", plot=False, hlo=True)
    assert with_hlo["hlo"].name == with_hlo["json"].name.replace(".json", ".hlo.txt.gz")
    assert gzip.decompress(with_hlo["hlo"].read_bytes()).decode().lstrip().startswith("HloModule")


def test_the_trace_json_gives_the_same_kernels_as_the_xplane(cpu_profile):
    _, trace_dir = cpu_profile
    xplane, trace_json = _trace.find_trace_files(str(trace_dir))
    from_pb, source_pb = _trace.events_from_xplane(xplane)
    from_json, source_json = _trace.events_from_trace_json(trace_json)
    assert source_pb == source_json and from_pb
    key = lambda e: (e.hlo_op, round(e.duration_ns / 1e3))  # noqa: E731 - the JSON has microseconds
    assert sorted(map(key, from_pb)) == sorted(map(key, from_json))


def test_read_events_names_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`trace_dir` \(=.*\) holds no"):
        _trace.read_events(str(tmp_path))


def test_profile_command_names_a_bad_config_and_takes_sets(capsys):
    from bench import _configs
    from bench.profile import parse_args

    with pytest.raises(SystemExit):
        parse_args(["unet_d9"])
    assert "unknown name 'unet_d9'" in capsys.readouterr().err
    assert parse_args(["models"]).configs == _configs.CONFIG_SETS["models"]


def test_kernels_replayed_in_a_command_buffer_are_found_by_their_instruction_name():
    # Inside a CUDA graph the trace's hlo_op names the command buffer; the kernel's own name
    # (instruction name with '.' as '_') must still find the fusion, its kind and its jax op.
    from bench.profile import summarise

    index = _trace.hlo_index(GPU_HLO)
    replayed = _trace.KernelEvent("input_reduce_fusion", 2e6, hlo_op="command_buffer_7", tf_op="XlaModule:")
    kinds, rows, total, _ = summarise([replayed], index, steps=1)
    assert kinds == {"XLA reduce fusion": pytest.approx(2.0)}
    assert rows[0].hlo_op == "input_reduce_fusion"
    assert rows[0].jax_op == "jit(step)/jvp(VectorNeuron)/reduce_sum"


def test_a_layer_is_profiled_at_in_model_operand_layouts(tmp_path, capsys):
    """`--operand-layouts auto`: compiled with XLA's layouts at the boundary, the arguments placed
    in them, and the report named so that it is not mistaken for the row-major profile."""
    import jax

    from bench import _cases, _configs
    from bench.profile import parse_args, profile_step

    fn, args = _cases.LayerCase(_configs.LayerConfig("t", D=2, N=8, B=2, c=2)).function("fwd")
    report = profile_step(fn, *args, backend="dense", name="t-fwd-auto-layouts", operand_layouts="auto")
    assert report.kernel_ms > 0 and report.name == "t-fwd-auto-layouts"
    if jax.default_backend() == "cpu":
        assert report.source == "cpu-thunks"
    assert parse_args(["d3_n64_b4_c16"]).operand_layouts == "row-major"
    assert parse_args(["d3_n64_b4_c16", "--operand-layouts", "auto"]).operand_layouts == "auto"
    with pytest.raises(SystemExit):
        parse_args(["d3_n64_b4_c16", "--operand-layouts", "planar"])
    assert "--operand-layouts" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"`operand_layouts` \(='planar'\)"):
        profile_step(fn, *args, backend="dense", operand_layouts="planar")
