"""`native` backend: the factorised ConvContract as C++ kernels for the CPU, called through XLA FFI.

Registers itself on import. The compiled module `kernels/native/_ginjax_native` is built by
`pip install` (CMakeLists.txt through scikit-build-core); without it (a source tree run with
PYTHONPATH=., or a machine that could not build it) the backend reports itself unavailable and
says why, and nothing else changes; GINJAX_DISABLE_NATIVE=1 makes a built one do the same.

Covered: D 2 and 3, tensor orders up to 2, any channel counts and sizes, torus / SAME / VALID /
explicit padding, rhs_dilation, stride 1, float32 (float64 under x64; bfloat16/float16 operands
are computed in float32). Other configurations (stride > 1, lhs_dilation) run on `dense`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp

from .._registry import Backend, register_backend
from .._fused import ffi_availability, fused_coverage
from .._spec import ConvSpec
from ._ffi import registered
from ._tiling import BlockSizes
from .conv_contract import conv_contract_native

__all__ = ["BlockSizes", "conv_contract_native"]

_DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16)


# set to 1: the backend reports itself unavailable, as an unbuilt one does (an A/B of `auto` with
# and without it, or a way out should the build misbehave on some machine)
DISABLE_ENV = "GINJAX_DISABLE_NATIVE"


def availability() -> tuple[bool, str]:
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return False, f"disabled by the environment variable {DISABLE_ENV}={os.environ[DISABLE_ENV]!r}"
    return ffi_availability(registered, "cpu", "the CPU", "C++ kernels on the CPU through XLA FFI")


def coverage(spec: ConvSpec, spatial: tuple, dtype) -> tuple[bool, str]:
    ok, why = fused_coverage(spec, spatial, dtype, _DTYPES)
    if not ok:
        return False, why
    return True, "native C++ kernels (factorised over the basis nonzeros)"


def _run(spec, inputs, weights, mode):
    return conv_contract_native(spec, inputs, weights, precision=mode)


register_backend(Backend("native", _run, availability, coverage, priority={"cpu": 5}))
