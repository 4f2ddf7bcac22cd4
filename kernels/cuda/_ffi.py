"""Loading the compiled kernel library and registering its XLA FFI targets (once, for CUDA): the
ConvContract forward and weight gradient, the VectorNeuron forward and backward, and the
parity-blocked forward."""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import sys

import jax

TARGET = "ginjax_cuda_forward"
INTO_TARGET = "ginjax_cuda_forward_into"  # a later output group's launch, into the previous results
ADD_TARGET = "ginjax_cuda_forward_add"  # with residuals added in the epilogue
INTO_ADD_TARGET = "ginjax_cuda_forward_into_add"  # both
TARGET_2D = "ginjax_cuda_forward_2d"  # the D = 2 layer's forward (conv_contract_d2.cu)
INTO_TARGET_2D = "ginjax_cuda_forward_2d_into"
DW_TARGET = "ginjax_cuda_weight_gradient"
DW_TARGET_2D = "ginjax_cuda_weight_gradient_2d"  # the D = 2 layer's (weight_gradient_d2.cu)
VN_FORWARD = "ginjax_cuda_vn_forward"
VN_BACKWARD = "ginjax_cuda_vn_backward"
PARITY_FORWARD = "ginjax_cuda_parity_forward"  # the parity-blocked forward (parity_conv.cu)
# target -> the handler symbol the library exports
HANDLERS = {TARGET: "GinjaxCudaForward", INTO_TARGET: "GinjaxCudaForwardInto", ADD_TARGET: "GinjaxCudaForwardAdd",
            INTO_ADD_TARGET: "GinjaxCudaForwardIntoAdd", TARGET_2D: "GinjaxCudaForward2d",
            INTO_TARGET_2D: "GinjaxCudaForward2dInto", DW_TARGET: "GinjaxCudaWeightGradient",
            DW_TARGET_2D: "GinjaxCudaWeightGradient2d",
            VN_FORWARD: "GinjaxCudaVnForward", VN_BACKWARD: "GinjaxCudaVnBackward",
            PARITY_FORWARD: "GinjaxCudaParityForward"}
NAME = "_ginjax_cuda.so"
ENV = "GINJAX_CUDA_LIBRARY"  # an explicit path to the built library
BUILD = ("`pip install` builds it where the machine has a Hopper GPU and nvcc >= 12, or "
         "CMAKE_ARGS=-DGINJAX_CUDA=ON pip install -e .; see kernels/cuda/README.md")


@functools.lru_cache(maxsize=None)
def registered() -> tuple[bool, str]:
    """Load kernels/cuda/_ginjax_cuda.so and register its targets; (ok, why not)."""
    path = library()
    if path is None:
        return False, f"the CUDA extension {NAME} is not built ({BUILD})"
    if not path.is_file():
        return False, f"the CUDA extension {NAME} is not at ${ENV} ({path}): no such file"
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    except (OSError, AttributeError, ValueError) as err:
        return False, f"the CUDA extension {NAME} could not be loaded from {path}: {err}"
    return True, ""


def library():
    """The built library: $GINJAX_CUDA_LIBRARY where set (the only candidate then, so that a wrong
    path is reported rather than replaced by another build), else next to this file (a wheel, or the
    in-place CMake build) or under kernels/cuda on sys.path (an editable install's build tree);
    None if absent."""
    if os.environ.get(ENV):
        return pathlib.Path(os.environ[ENV])
    candidates = [pathlib.Path(__file__).with_name(NAME)]
    candidates += [pathlib.Path(p) / "kernels" / "cuda" / NAME for p in sys.path if p]
    return next((c for c in candidates if c.is_file()), None)
