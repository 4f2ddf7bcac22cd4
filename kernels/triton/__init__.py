"""`triton` backend: the fused ConvContract as generated Triton kernels, launched as jaxlib's
`triton_kernel_call` custom call with component-planar operand and result layouts (`_custom_call`).

Registers itself on import. Importing never needs triton, torch or jax_triton: without them the
backend reports itself unavailable and says why. It runs:
- on an NVIDIA GPU with triton and jax_triton (its compile helper) installed (the default backend
  there), or
- on the host with TRITON_INTERPRET=1, triton and (CPU) torch: the same kernel source through
  Triton's interpreter, for tests without a GPU.

Covered: D 2 and 3, tensor orders up to 2, any channel counts and sizes, torus / SAME / VALID /
explicit padding, rhs_dilation, stride 1, float32 / bfloat16 / float16 operands. Other
configurations (stride > 1, lhs_dilation) run on `dense`; `kernels.explain` says why. Layers the
factorised kernels would split into filter groups (the 2-tensor layers) run as the parity-blocked
convolution of `parity_conv.py` (GINJAX_TRITON_PARITY).

Also here: `vector_neuron_triton`, ginjax's VectorNeuron nonlinearity of one block as one fused
kernel forward and one backward (`vector_neuron.py`), on the same launcher.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from .._bias import check_bias, means_shortcut_exact
from .._registry import Backend, register_backend
from .._fused import count_nonzeros, fused_coverage
from .._spec import ConvSpec
from ._filter_groups import LIVE_Z_CAP, filter_groups
from ._stencil import check_sizes
from ._tiling import MAX_NONZEROS, BlockSizes, interpreting
from . import _cuda_padding
from . import _cuda_dispatch
from .conv_contract import conv_contract_triton
from .parity_conv import PARITY_ENV, parity_runs
from ._vn_kernel import fits as vector_neuron_fits
from .vector_neuron import VNBlocks, literal_eps, supported_activation, vector_neuron_triton

__all__ = ["BlockSizes", "VNBlocks", "conv_contract_triton", "literal_eps", "supported_activation", "vector_neuron_fits",
           "vector_neuron_triton"]


@functools.lru_cache(maxsize=None)
def _import_error(module: str):
    try:
        importlib.import_module(module)
    except Exception as err:  # jax_triton raises more than ImportError on a CPU jaxlib
        return f"{type(err).__name__}: {err}".splitlines()[0]
    return None


@functools.lru_cache(maxsize=None)
def _has_nvidia_gpu() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def availability() -> tuple[bool, str]:
    if interpreting():
        for module, why in (("triton", "Triton's interpreter"), ("torch", "CPU tensors for Triton's interpreter")):
            err = _import_error(module)
            if err:
                return False, f"TRITON_INTERPRET=1 needs {module} ({why}), which failed to import: {err}"
        return True, "Triton interpreter on the host (TRITON_INTERPRET=1), same kernel source as on the GPU"
    if not _has_nvidia_gpu():
        return False, "needs an NVIDIA GPU (or TRITON_INTERPRET=1 with triton and torch for the CPU interpreter)"
    for module in ("triton", "jax_triton"):
        err = _import_error(module)
        if err:
            return False, f"needs {module}, which failed to import: {err}"
    return True, "NVIDIA GPU with triton and jax_triton"


def coverage(spec: ConvSpec, spatial: tuple, dtype) -> tuple[bool, str]:
    # fp32 accumulation only: float64 operands go to dense
    ok, why = fused_coverage(spec, spatial, dtype, (jnp.float32, jnp.bfloat16, jnp.float16))
    if not ok:
        return False, why
    nonzeros = count_nonzeros(spec)
    if nonzeros > MAX_NONZEROS:
        return False, f"the basis has {nonzeros} nonzeros, more than the {MAX_NONZEROS} the kernel unrolls"
    try:
        check_sizes(spec, tuple(spatial))
    except ValueError as err:
        return False, str(err)
    return True, "fused Triton forward (factorised over the basis nonzeros)"


def _run(spec, inputs, weights, mode, bias=None, input_means=None, residual=None):
    """The layer with its bias: offsets (kernels._bias) added in the forward kernel's epilogue,
    the inputs' means' gradient in the input gradient's (`conv_contract_triton`'s `bias`; its
    `input_means` where the inputs' producers computed them), and the `residual` added in the
    epilogue too (`conv_contract_triton`'s).
    A "mean" bias whose input-mean shortcut is not exact (not a full torus) uses the output's own
    mean after the kernel, as the lax backends do; such an output's residual is added after it."""
    bias = check_bias(spec, bias)
    exact = means_shortcut_exact(spec)
    late = [b for b, m in enumerate(spec.bias_modes) if m == "mean" and not exact] if bias is not None else []
    fused = None if residual is None else tuple(None if b in late else r for b, r in enumerate(residual))
    outputs = conv_contract_triton(spec, inputs, weights, precision=mode, bias=bias, input_means=input_means,
                                   residual=fused)
    if not late:
        return outputs
    space = tuple(range(1, 1 + spec.D))
    outputs = list(outputs)
    for b in late:
        k = spec.out_keys[b][0]
        mean = jnp.mean(outputs[b], axis=space, keepdims=True)
        outputs[b] = outputs[b] + bias[b].reshape((-1,) + (1,) * (spec.D + k)).astype(mean.dtype) * mean
        if residual is not None and residual[b] is not None:
            outputs[b] = outputs[b] + residual[b]
    return tuple(outputs)


def _layer_filter_groups(spec: ConvSpec, spatial):
    """The filter groups the layer's forward would run in at its default tiling (None: one launch)."""
    layer = spec.without_bias()
    return filter_groups(layer, tuple(spatial), "tf32", BlockSizes.for_layer(layer, tuple(spatial)))


def _parity_cuda_note(spec: ConvSpec, spatial) -> str:
    """Where GINJAX_PARITY_CUDA asks for kernels/cuda's parity forward: whether it runs this layer
    (in TF32, its only precision), else why not."""
    from ..cuda import parity_forward as cuda_parity
    from .parity_conv import cuda_forward_refusal, packed_layer

    if not cuda_parity.requested():
        return ""
    why = cuda_forward_refusal(packed_layer(spec.without_bias()).plan, tuple(spatial), "tf32")
    if why is None:
        return f"; in TF32 its forward and input gradient run on kernels/cuda's mma.sync kernel ({cuda_parity.PARITY_CUDA_ENV}=on)"
    return f"; {cuda_parity.PARITY_CUDA_ENV}=on, but its CUDA forward cannot run here: {why}"


def describe(spec: ConvSpec, spatial) -> str:
    """What runs the layer's directions (for `kernels.explain`): the CUDA forward and weight
    gradient where they cover the layer (GINJAX_TRITON_FORWARD, GINJAX_TRITON_WEIGHT_GRAD), whole
    or in output-channel groups (GINJAX_CUDA_OUTPUT_GROUPS), or with zero channels
    (GINJAX_CUDA_PAD_CHANNELS), else the Triton kernels, in filter
    groups where one kernel would keep too many Z tiles live (`_filter_groups`)."""
    groups = _layer_filter_groups(spec, spatial)
    if parity_runs(spec.without_bias(), tuple(spatial), groups is not None):
        return ("Triton's parity-blocked convolution: one tensor-core GEMM per (component class, sum or difference "
                f"of opposite taps), forward, input and weight gradient ({PARITY_ENV}=off: the factorised kernels)"
                + _parity_cuda_note(spec, spatial))
    if groups is not None:
        return (f"Triton's kernels, as {len(groups)} launches over groups of the filters, each adding into the "
                f"outputs the groups before it wrote (one kernel would keep more than {LIVE_Z_CAP} Z tiles live)")
    directions = {"the forward and the input gradient": _cuda_dispatch.cuda_forward_covers,
                  "the weight gradient": _cuda_dispatch.cuda_weight_grad_covers}
    on_cuda, on_triton, forward_launch = [], [], None  # forward_launch: the layer a CUDA forward launch runs
    for what, covers in directions.items():
        layer_covered = lambda layer: covers(layer, tuple(spatial), "float32")[0]  # noqa: E731
        found = _cuda_dispatch.covered_launch([(spec, None)], layer_covered)
        if found is None:
            on_triton.append(what)
            continue
        layer, _, split = found
        if _cuda_padding.is_padded(spec, layer):
            ins, outs = ("+".join(map(str, f(layer))) for f in (_cuda_padding.in_channels, _cuda_padding.out_channels))
            on_cuda.append(f"{what} (with zero channels, as {ins} -> {outs}: {_cuda_padding.PAD_CHANNELS_ENV}=1)")
        elif split is not None:
            on_cuda.append(f"{what} (as {split[1]} launches of {split[0].out_keys[0][2]} output channels per key)")
        else:
            on_cuda.append(what)
        launch = layer if split is None else split[0]
        if covers is _cuda_dispatch.cuda_forward_covers:
            forward_launch = launch
    if not on_cuda:
        return ""
    from ..cuda import _dw_plan
    from ..cuda._plan import bf16_enabled, fp32_enabled, twin
    from ..cuda.conv_contract import layout as cuda_layout

    blocks = "component-planar" if cuda_layout() == "planar" else "components-minor"
    split = "the forward's" + (" and the weight gradient's" if _dw_plan.fp32_enabled() else "")
    precisions = "tf32" + (" (bf16 calls too, at tf32: GINJAX_CUDA_BF16=0 for Triton's bf16)" if bf16_enabled() else "")
    if fp32_enabled():
        precisions += f", and {split} fp32 by 3xTF32 at dilation 1 on whole rows (GINJAX_CUDA_FP32=0: Triton's)"
    said = (" and ".join(on_cuda) + f" on kernels/cuda's CUDA kernels at {precisions} ({blocks} vector blocks; "
            "Triton's at other precisions)")
    if forward_launch is not None and twin(forward_launch.without_bias(), tuple(spatial)):
        said += ", the forward's rows of 32 on twin rings (two z slabs a CTA; GINJAX_CUDA_TWIN=0: one)"
    return said + (", " + " and ".join(on_triton) + " on Triton's kernels" if on_triton else "")


def unmeasured_caveat(spec: ConvSpec, spatial) -> str:
    """Why `auto` on a GPU with no measured table should rank `dense` first for this layer: one
    whose Triton kernel would run in filter groups. Each group is a launch that re-reads every
    input and reads and rewrites the outputs, which costs HBM traffic on any GPU (on the H200
    d3_n64_b2_c8_k2's 11 groups took 3.1x dense's time in fwd and 2.9x in fwd_bwd)."""
    groups = _layer_filter_groups(spec, spatial)
    if groups is None:
        return ""
    if parity_runs(spec.without_bias(), tuple(spatial), True):
        return ("its kernels would run this layer as the parity-blocked convolution, which ran the k2 layer at 0.83x "
                "dense's speed in fwd and 0.56x in fwd_bwd on the H100 (bench/NOTES.md, \"Session 46\")")
    return (f"its kernels would run this layer as {len(groups)} filter-group launches, each re-reading the inputs "
            "and rewriting the outputs (3x dense's time on the H200's k2 layer)")


register_backend(Backend("triton", _run, availability, coverage, priority={"gpu": 20}, fused_bias=True,
                         fused_residual=True, describe=describe, unmeasured_caveat=unmeasured_caveat))
