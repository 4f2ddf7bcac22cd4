"""Argument checks shared by the layers, models and training helpers.

Each raises a ValueError that names the caller, the argument and its value, and says what would
be valid, so that a bad argument never surfaces as a raw error from deep inside JAX or Python.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Optional

import jax
import jax.numpy as jnp

from ginjax import geometric as geom


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_key(key: Any, where: str, name: str = "key") -> None:
    """`key` must be a jax.random key: a typed key (jax.random.key) or a raw uint32 (2,) array
    (jax.random.PRNGKey). Tracers pass on their dtype and shape, so this works under vmap/jit."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
        return
    if dtype is not None and dtype == jnp.uint32 and shape == (2,):
        return
    raise ValueError(
        f"{where}: `{name}` (={_short(key)}) must be a jax.random key, e.g. "
        "jax.random.key(0) or jax.random.PRNGKey(0)"
    )


def check_count(value: Any, where: str, name: str, minimum: int = 0, why: str = "") -> None:
    """`value` must be an int (not a bool) of at least `minimum`, 0 or 1 (a number of blocks,
    layers, channels, ...); `why`, if given, follows the error's message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int"
        raise ValueError(f"{where}: `{name}` (={_short(value)}) must be {kind}" + (f": {why}" if why else ""))


def as_signature(value: Any, where: str, name: str) -> geom.Signature:
    """`value` as a geom.Signature, or a ValueError naming the argument."""
    try:
        return geom.Signature(value)
    except ValueError as err:
        raise ValueError(
            f"{where}: `{name}` (={_short(value)}) is not a signature: {err}"
        ) from None


def check_multi_image(value: Any, where: str, name: str) -> None:
    """`value` must be a geom.MultiImage."""
    if not isinstance(value, geom.MultiImage):
        raise TypeError(
            f"{where}: `{name}` (={type(value).__name__}) must be a geom.MultiImage"
        )


def residual_blocks(residual: Optional[geom.MultiImage], x: geom.MultiImage, keys: Iterable, *,
                    dtype=None, shapes: Optional[dict] = None) -> Optional[dict]:
    """A layer's `residual` (None, or a MultiImage added to its result) as its blocks by key where
    the layer can add them as it writes the result: exactly the result's `keys`, `x`'s D and torus
    flags, and where given that `dtype` (so the sum is what `+` gives) and those block `shapes`;
    else None, and the layer adds it by `+` (which raises where the two do not match). A residual
    that is not a MultiImage raises a TypeError naming it."""
    if residual is None:
        return None
    if not isinstance(residual, geom.MultiImage):
        raise TypeError(f"`residual` (={type(residual).__name__}) must be None or a geom.MultiImage")
    keys = list(keys)
    if set(residual.keys()) != set(keys) or residual.D != x.D or tuple(residual.is_torus) != tuple(x.is_torus):
        return None
    if dtype is not None and any(residual[k].dtype != dtype for k in keys):
        return None
    if shapes is not None and any(residual[k].shape != shapes[k] for k in keys):
        return None
    return {k: residual[k] for k in keys}
