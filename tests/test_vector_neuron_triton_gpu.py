"""The VectorNeuron's fused Triton kernels on an NVIDIA GPU (`python3 -m pytest -m gpu
tests/test_vector_neuron_triton_gpu.py`): the compiled kernels through the launcher's custom call
against ginjax's XLA path with TF32 off, on a standard block (B=4, 16 channels, 64^3, vectors)
and odd sizes; the weight gradient bit-identical run to run; NaN propagation; and the compiled HLO
of a ResNet-like step (ConvContract -> VectorNeuron -> ConvContract, value and gradients): no
copy or transpose next to the VectorNeuron's custom calls."""

from __future__ import annotations

import os
import re

import pytest

import jax

from _vector_neuron_gpu import EPS, check_against_xla, check_bit_identical, relayouts_next_to, resnet_like_step_hlo

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import vector_neuron_triton  # noqa: E402

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from test_vector_neuron_triton import test_nan_propagates_like_xla  # noqa: E402,F401  (re-run here on the GPU)

CASES = [
    ("standard-gelu", 3, (4, 16, 64, 64, 64, 3), jax.nn.gelu),
    ("standard-relu", 3, (4, 16, 64, 64, 64, 3), jax.nn.relu),
    ("odd-c5-t9", 3, (2, 5, 7, 9, 11, 3, 3), jax.nn.gelu),
    ("odd-c33-d2", 2, (3, 33, 37, 41, 2), jax.nn.relu),
]


@pytest.mark.parametrize("layout", ["planar", "minor"])
@pytest.mark.parametrize("name, D, shape, activation", CASES, ids=[c[0] for c in CASES])
def test_against_xla_fp32(name, D, shape, activation, layout):
    check_against_xla("triton", D, shape, activation, layout)


@pytest.mark.parametrize("name, D, shape, activation", [CASES[0], CASES[2]], ids=[CASES[0][0], CASES[2][0]])
def test_saved_mix_against_xla_fp32(name, D, shape, activation, monkeypatch):
    """The backward reading the forward's d = W x (GINJAX_VN_SAVE_MIX=1) instead of recomputing it."""
    from ginjax import _vector_neuron

    monkeypatch.setenv(_vector_neuron.SAVE_MIX_ENV, "1")
    check_against_xla("triton", D, shape, activation)


def test_weight_gradient_bit_identical():
    check_bit_identical("triton")


@pytest.mark.parametrize("planar, conv", [(True, "triton"), (False, "cuda"), (True, "cuda")],
                         ids=["planar-triton-conv", "minor-cuda-conv", "planar-cuda-conv"])
def test_no_relayout_around_the_vector_neuron(planar, conv, monkeypatch):
    """A ResNet-like step (ConvContract, VectorNeuron on the vector key, ConvContract; value and
    gradients): in the compiled HLO no operand of a VectorNeuron custom call is produced by, and
    no result consumed by, a copy, a transpose or a fusion containing one. Component-planar
    kernels beside the Triton ConvContract kernels (which keep blocks planar) and beside the CUDA
    ones in their planar layout (kernels/_layout.py's default on a GPU); components-minor ones
    beside the CUDA kernels in their minor layout (GINJAX_BLOCK_LAYOUT=minor)."""
    if conv == "triton":
        monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")
        monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "triton")
    else:
        from kernels import cuda

        ok, why = cuda.availability()
        if not ok:
            pytest.fail(f"the CUDA ConvContract kernels must run here: {why}")
        monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cuda")
        monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "cuda")
        monkeypatch.setenv("GINJAX_BLOCK_LAYOUT", "planar" if planar else "minor")
    text = resnet_like_step_hlo(lambda w, b: vector_neuron_triton(w, b, 3, jax.nn.gelu, EPS, planar=planar))
    if conv == "cuda":
        assert 'custom_call_target="ginjax_cuda_forward"' in text, "the step's convolutions did not run on the CUDA kernels"
    # the VectorNeuron's kernels: the triton calls with a (1, 16, 16) weight operand
    vn, bad = relayouts_next_to(text, lambda name, line: "triton_kernel_call" in line
                                and re.search(r"f32\[1,16,16\]", line.split("custom-call(", 1)[-1]))
    assert len(vn) == 2, vn  # forward and backward
    assert not bad, bad
    if conv == "cuda" and planar:  # nor around the CUDA kernels (their forward, input and weight gradients)
        from test_conv_contract_triton_gpu import _line_of

        cuda_calls, bad = relayouts_next_to(text, lambda name, line: "ginjax_cuda_" in line, boundary=False)
        assert len(cuda_calls) >= 3, cuda_calls
        # the blocks' neighbours (32^3 grids), not the weights' packing into the kernels' fragments
        blocks = [b for b in bad if ",32,32,32" in _line_of(text, b[1]).split("=", 1)[1].split("{")[0]]
        assert not blocks, blocks


@pytest.mark.parametrize("planar", [True, False], ids=["planar", "minor"])
def test_affine_prologue_against_composition_fp32(planar):
    """A norm's affine map applied in the kernels' registers against `channel_affine` then the XLA
    path, on the standard block and an odd D=2 2-tensor one."""
    from test_vector_neuron_affine_triton import check_against_composition

    check_against_composition(3, (16, 64, 64, 64, 3), jax.nn.gelu, planar)
    check_against_composition(2, (5, 37, 41, 2, 2), jax.nn.relu, planar, seed=1)
