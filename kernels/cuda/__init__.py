"""`cuda`: the forward ConvContract and its weight gradient (`weight_gradient_call`,
`weight_gradient_coverage`) as CUDA C++ kernels for Hopper (sm_90a), through XLA FFI, and the
VectorNeuron nonlinearity's forward and backward (`vector_neuron_cuda`, opt-in through ginjax's
GINJAX_VN_IMPL=cuda; `vector_neuron_cuda_covers` says why it cannot run a call).

Not a registered backend of its own: where it is built and runs (a Hopper GPU), the `triton`
backend runs its forward, its input gradient (where the transposed layer is covered) and its
weight gradient on it (GINJAX_TRITON_FORWARD=triton, GINJAX_TRITON_WEIGHT_GRAD=triton opt out); `conv_contract_cuda` calls it directly (bench/
cuda_spike.py, tests/test_conv_contract_cuda_gpu.py). kernels/cuda/README.md says when
`pip install` builds the library. `availability()` and `coverage()`
say why it cannot run (not built, no GPU, a layer it was not compiled for).
"""

from __future__ import annotations

import functools

import jax

from .._fused import ffi_availability
from .._spec import ConvSpec
from ._dw_plan import coverage as _dw_coverage
from ._ffi import registered
from ._plan import coverage as _coverage
from ._tiling import BlockSizes
from .conv_contract import conv_contract_cuda, forward_call, takes_residuals
from .vector_neuron import vector_neuron_cuda, vector_neuron_cuda_covers
from .weight_gradient import weight_gradient_and_sums, weight_gradient_call

__all__ = ["BlockSizes", "availability", "conv_contract_cuda", "coverage", "forward_call", "takes_residuals", "vector_neuron_cuda",
           "vector_neuron_cuda_covers", "weight_gradient_and_sums", "weight_gradient_call", "weight_gradient_coverage"]


def availability() -> tuple[bool, str]:
    """Whether the kernels can run here: the library built and loaded, JAX on a GPU, and that GPU a
    Hopper (the library holds sm_90a code only; elsewhere its launches would fail)."""
    ok, why = ffi_availability(registered, "gpu", "an NVIDIA GPU", "CUDA kernels through XLA FFI")
    if ok and (cc := _compute_capability()) != "9.0":
        return False, f"the library is compiled for sm_90a (Hopper); this GPU's compute capability is {cc}"
    return ok, why


@functools.lru_cache(maxsize=1)
def _compute_capability() -> str:
    return str(getattr(jax.devices()[0], "compute_capability", "unknown"))


def coverage(spec: ConvSpec, spatial: tuple, dtype) -> tuple[bool, str]:
    """Whether the kernel computes this configuration; first, whether the library is built."""
    ok, why = registered()
    if not ok:
        return False, why
    return _coverage(spec, spatial, dtype)


def weight_gradient_coverage(spec: ConvSpec, spatial: tuple, dtype) -> tuple[bool, str]:
    """Whether `weight_gradient_call` computes this configuration; first, whether the library is built."""
    ok, why = registered()
    if not ok:
        return False, why
    return _dw_coverage(spec, spatial, dtype)
