"""What the fused VectorNeuron kernels (kernels/triton/vector_neuron.py, kernels/cuda/vector_neuron.py)
accept, checked once for both: the activations they implement, eps as a literal of the kernel,
and the (weight, block) shapes and dtypes."""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

ACTIVATIONS = ("relu", "gelu")  # the kernels' names, in the order of the CUDA kernel's attribute


def supported_activation(activation: Callable) -> Optional[str]:
    """The kernels' name for `activation` ("relu", "gelu"), or None where they have none (only the
    functions themselves: e.g. functools.partial(jax.nn.gelu, approximate=False) is not gelu's
    tanh form)."""
    if activation is jax.nn.relu:
        return "relu"
    if activation is jax.nn.gelu:
        return "gelu"
    return None


def literal_eps(eps) -> bool:
    """Whether `eps` can be a literal of the kernels: a Python int or float > 0 (a traced eps is
    neither, and a bool is no epsilon)."""
    return not isinstance(eps, bool) and isinstance(eps, (int, float)) and eps > 0


def check_arguments(weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps) -> tuple[str, int]:
    """(activation name, components T) of a call, or a ValueError naming the argument: weight
    (c, c) and block (c, *spatial[D], *(D,)*k) float32 with k >= 1, activation relu or gelu, eps a
    Python number > 0."""
    name = supported_activation(activation)
    if name is None:
        raise ValueError(f"`activation` (={activation!r}) must be jax.nn.relu or jax.nn.gelu (one of {ACTIVATIONS})")
    if not isinstance(D, int) or isinstance(D, bool) or D < 1:
        raise ValueError(f"`D` (={D!r}) must be a positive int")
    if block.ndim < D + 2:
        raise ValueError(f"`block` (shape {tuple(block.shape)}) must be (c, *spatial[{D}], *tensor) with a tensor axis")
    if any(n != D for n in block.shape[1 + D :]):
        raise ValueError(f"`block` (shape {tuple(block.shape)}) must have tensor axes of size D (={D})")
    c = block.shape[0]
    if weight.shape != (c, c):
        raise ValueError(f"`weight` (shape {tuple(weight.shape)}) must be (c, c) = {(c, c)} for a block of {c} channels")
    for arg, a in (("weight", weight), ("block", block)):
        if a.dtype != jnp.float32:
            raise ValueError(f"`{arg}` (dtype {a.dtype}) must be float32")
    if not literal_eps(eps):
        raise ValueError(f"`eps` (={eps!r}) must be a Python number > 0 (a literal of the kernel)")
    return name, math.prod(block.shape[1 + D :])


def check_affine(affine, channels: int, components: int) -> tuple:
    """A norm's affine map for the kernels' prologue: (m, v, shift) float32 of shapes (c, T, T),
    (c, T), (c, T), or a ValueError naming what is not."""
    c, T = channels, components
    if not isinstance(affine, (tuple, list)) or len(affine) != 3:
        raise ValueError(f"`affine` must be None or a tuple (m, v, shift); got {type(affine).__name__}")
    for name, a, shape in zip(("m", "v", "shift"), affine, ((c, T, T), (c, T), (c, T))):
        if not hasattr(a, "shape") or tuple(a.shape) != shape or a.dtype != jnp.float32:
            found = f"{a.dtype}{list(a.shape)}" if hasattr(a, "shape") else type(a).__name__
            raise ValueError(f"`affine`'s {name} ({found}) must be float32{list(shape)} for a block of "
                             f"{c} channels of {T} components")
    return tuple(affine)


def check_residual(residual, block):
    """A block added to the VectorNeuron's output (None, or an array of `block`'s shape), as
    float32, or a ValueError naming `residual`."""
    if residual is None:
        return None
    if not hasattr(residual, "shape") or tuple(residual.shape) != tuple(block.shape):
        found = tuple(residual.shape) if hasattr(residual, "shape") else type(residual).__name__
        raise ValueError(f"`residual` ({found}) must be None or an array of the block's shape {tuple(block.shape)}")
    if not jnp.issubdtype(residual.dtype, jnp.floating):
        raise ValueError(f"`residual` has dtype {residual.dtype}; it must be floating point")
    return residual.astype(jnp.float32)


def pack_affine(m, v, shift) -> jax.Array:
    """(c, T^2 + 2T): m row-major, v, shift per channel, the kernels' `aff` operand."""
    return jnp.concatenate([m.reshape(m.shape[0], -1), v, shift], axis=1)
