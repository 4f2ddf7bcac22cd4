"""Initial weights drawn with fewer compiles, and the same values as `jax.random.uniform`.

A model's `__init__` draws one weight array per layer and key pair, eagerly. `jax.random.uniform`
compiles once per distinct shape. The UNet d3_n64_b4 has 179 shapes, and building it took 16 s on
a 2-core CPU, nearly all of it in those compiles (~0.1 s each).

With `jax_threefry_partitionable` on (jax's default since 0.5), element i of a draw depends only
on the key and on i, the element's row-major index. So the first n elements of a longer draw equal
a draw of n elements. `uniform` draws a power-of-two length (compiled once per length), takes its
first n elements on the host and puts them back with `jax.device_put`, which compiles nothing
(`jnp.asarray` would compile a copy per shape). A key under a trace (a model
built inside `jit` or `vmap`), the non-partitionable threefry, and a key of another PRNG
implementation (rbg) take `jax.random.uniform` itself.
"""

from __future__ import annotations

import math

import jax
import numpy as np

# shorter draws are not worth a bucket of their own: one compile covers them all
MIN_DRAW = 256


def draw_length(n: int) -> int:
    """The length `uniform` draws for n elements: the next power of two, at least MIN_DRAW."""
    return max(MIN_DRAW, 1 << max(n - 1, 0).bit_length())


def uniform(key: jax.Array, shape: tuple[int, ...], minval: float, maxval: float) -> jax.Array:
    """`jax.random.uniform(key, shape, minval=minval, maxval=maxval)` in the default float dtype,
    the same values, compiled once per `draw_length` rather than once per shape."""
    n = math.prod(shape)
    if n == 0 or any(_traced(v) for v in (key, minval, maxval)) or not _partitionable_threefry(key):
        return jax.random.uniform(key, shape, minval=minval, maxval=maxval)
    flat = jax.random.uniform(key, (draw_length(n),), minval=minval, maxval=maxval)
    return jax.device_put(np.asarray(flat)[:n].reshape(shape))


def _partitionable_threefry(key) -> bool:
    """Whether `key` draws by threefry, partitionably (jax's default since 0.5): the property the
    prefix relies on. False for another PRNG (rbg) or where the flag is not found, so that those
    take `jax.random.uniform` itself."""
    try:
        return str(jax.random.key_impl(key)) == "threefry2x32" and bool(jax.config.jax_threefry_partitionable)
    except (AttributeError, TypeError, ValueError):
        return False


def _traced(value) -> bool:
    """Whether `value` is a tracer (a model built under `jit` or `vmap`); True where jax.core has no
    Tracer to ask, for the same reason."""
    tracer = getattr(jax.core, "Tracer", None)
    return tracer is None or isinstance(value, tracer)
