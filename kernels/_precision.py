"""Precision modes: which operand precision a backend uses, accumulating in fp32 always.

| mode   | operands                   | tolerance (relative L2 vs float64) |
| fp32   | fp32 (3xTF32 split or FMA) | 1e-5                               |
| tf32   | tf32                       | 2e-3                               |
| bf16   | bf16                       | 2e-2                               |

A mode is the least precision a call accepts: a backend may compute more precisely where that
is no slower (the CUDA kernels behind `triton` run bf16 calls at tf32).

`None` follows JAX's default matmul precision (`jax.default_matmul_precision` /
`jax_default_matmul_precision`): "highest"/"float32" give fp32, "bfloat16" gives bf16, anything
else tf32 (JAX's default on GPU).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

MODES = ("fp32", "tf32", "bf16")
TOLERANCE = {"fp32": 1e-5, "tf32": 2e-3, "bf16": 2e-2}

_ALIASES = {
    "highest": "fp32",
    "float32": "fp32",
    "fp32": "fp32",
    "high": "tf32",  # bf16_3x on some platforms; we never claim less than tf32 accuracy
    "tensorfloat32": "tf32",
    "tf32": "tf32",
    "default": "tf32",
    "fastest": "tf32",
    "bfloat16": "bf16",
    "bf16": "bf16",
}


def resolve_precision(precision: Union[None, str, jax.lax.Precision]) -> str:
    """Map a user precision (None, mode string or lax.Precision) to one of MODES."""
    if precision is None:
        configured = jax.config.jax_default_matmul_precision
        return _ALIASES.get(str(configured).lower(), "tf32") if configured else "tf32"
    if isinstance(precision, jax.lax.Precision):
        return {jax.lax.Precision.HIGHEST: "fp32", jax.lax.Precision.HIGH: "tf32"}.get(precision, "tf32")
    key = str(precision).lower()
    if key not in _ALIASES:
        raise ValueError(f"`precision` (={precision!r}) must be None, one of {MODES} or a jax.lax.Precision")
    return _ALIASES[key]


def lax_operands(mode: str, *arrays: jax.Array) -> tuple[Optional[jax.lax.Precision], tuple[jax.Array, ...]]:
    """For lax backends: the lax precision and the (possibly cast) operands for `mode`."""
    if mode == "bf16":
        return jax.lax.Precision.DEFAULT, tuple(a.astype(jnp.bfloat16) for a in arrays)
    if mode == "fp32":
        return jax.lax.Precision.HIGHEST, arrays
    return jax.lax.Precision.DEFAULT, arrays
