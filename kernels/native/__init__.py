"""`native` backend: the factorised ConvContract as C++ kernels for the CPU, called through XLA FFI.

Registers itself on import. The compiled module `kernels/native/_ginjax_native` is built by
`pip install` (CMakeLists.txt through scikit-build-core); without it (a source tree run with
PYTHONPATH=., or a machine that could not build it) the backend reports itself unavailable and
says why, and nothing else changes.

Covered: D 2 and 3, tensor orders up to 2, any channel counts and sizes, torus / SAME / VALID /
explicit padding, rhs_dilation, stride 1, float32 (float64 under x64; bfloat16/float16 operands
are computed in float32). Other configurations (stride > 1, lhs_dilation) run on `dense`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._registry import Backend, register_backend
from .._spec import ConvSpec
from ._ffi import registered
from .conv_contract import conv_contract_native

__all__ = ["conv_contract_native"]

_DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16, jnp.float16)


def availability() -> tuple[bool, str]:
    ok, why = registered()
    if not ok:
        return False, why
    if jax.default_backend() != "cpu":
        return False, f"runs on the CPU; JAX's default backend here is {jax.default_backend()!r}"
    return True, "C++ kernels on the CPU through XLA FFI"


def coverage(spec: ConvSpec, spatial: tuple, dtype) -> tuple[bool, str]:
    orders = [k for k, _, _ in spec.in_keys + spec.out_keys]
    if max(orders) > 2:
        return False, f"tensor orders up to 2 are covered, this layer has order {max(orders)}"
    if any(s != 1 for s in spec.stride):
        return False, f"stride {spec.stride} is not covered (stride 1 only)"
    if any(d != 1 for d in spec.lhs_dilation):
        return False, f"lhs_dilation {spec.lhs_dilation} is not covered"
    if dtype is not None and jnp.dtype(dtype) not in _DTYPES:
        return False, f"{jnp.dtype(dtype).name} operands are not covered"
    return True, "native C++ kernels (factorised over the basis nonzeros)"


register_backend(Backend("native", conv_contract_native, availability, coverage, priority={"cpu": 5}))
