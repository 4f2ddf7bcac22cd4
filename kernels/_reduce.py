"""Sums over the middle axes of a block, in the layout the block already has.

A block (c, *spatial, *tensor) keeps its few tensor components as the minor axes. Summing over
the spatial axes while keeping the components is, for XLA on a GPU, a column reduction whose
kept minor dimension has D^k elements (3 for a vector in 3D): its reduction tiles are 32 lanes
wide over that minor dimension, so most lanes idle and the reads are not coalesced.

`middle_sum` reads the same memory as a column reduction with a wide minor dimension: the
summed axes and the kept minor axes, contiguous in memory, are reshaped (a bitcast, no copy) to
(rows, width) with width = r * T >= 64 elements, the rows are summed (every lane busy, whole
rows read), and the r partial sums of each component are added last (a tiny reduction). No
transpose anywhere; where no such split exists the plain sum is used.

On a GPU the per-channel sums of (c, P, T) blocks that the norms and the bias gradients take
(`fused_sums_cover`) run as one Triton kernel instead (kernels/triton/channel_sums.py), reading
the blocks in the layout the kernels around it share (`sums_planar`);
`GINJAX_CHANNEL_SUMS=xla` (the default elsewhere) keeps `middle_sum`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from ._env import env_choice
from ._fused import INT32_MAX

# the minor extent the first stage keeps: two 32-lane warps' worth of fp32 (256 bytes per row)
_MIN_WIDTH = 64


def middle_sum(x: jax.Array, start: int, stop: int) -> jax.Array:
    """sum of `x` over axes [start, stop), those axes dropped; the axes after `stop` (the
    minor ones, kept) should be few elements. Equal to jnp.sum(x, axis=tuple(range(start, stop)))."""
    axes = tuple(range(start, stop))
    if not axes:
        return x
    lead, mid, tail = x.shape[:start], x.shape[start:stop], x.shape[stop:]
    n, t = math.prod(mid), math.prod(tail)
    r = _split(n, t)
    if r is None:
        return jnp.sum(x, axis=axes)
    rows = x.reshape(lead + (n // r, r * t))
    partial = jnp.sum(rows, axis=len(lead))  # (lead, r * t): the wide column reduction
    return jnp.sum(partial.reshape(lead + (r,) + tail), axis=len(lead))


def middle_mean(x: jax.Array, start: int, stop: int) -> jax.Array:
    """mean of `x` over axes [start, stop) (see `middle_sum`)."""
    n = math.prod(x.shape[start:stop])
    return middle_sum(x, start, stop) / jnp.asarray(n, x.dtype)


def spatial_mean(block: jax.Array, D: int) -> jax.Array:
    """Spatial mean of an unbatched block (c, *spatial[D], *tensor): (c, *tensor)."""
    return middle_mean(block, 1, 1 + D)


def _split(n: int, t: int):
    """The smallest r dividing n with r * t >= _MIN_WIDTH, or None when the plain sum is as good
    (the kept minor extent is already wide, or n is too small to gain anything)."""
    if t >= _MIN_WIDTH or n < 4 * _MIN_WIDTH:
        return None
    for r in range(-(-_MIN_WIDTH // t), min(n, 4 * _MIN_WIDTH) + 1):
        if n % r == 0:
            return r
    return None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_spatial_offset(block: jax.Array, offset: jax.Array, D: int) -> jax.Array:
    """block (c, *spatial[D], *tensor) + offset (c, *tensor) at every pixel.

    Its gradient with respect to the offset is the spatial sum of the cotangent, taken with
    `middle_sum` (autodiff of the broadcast would emit the narrow column reduction).
    """
    return block + offset.reshape((offset.shape[0],) + (1,) * D + offset.shape[1:])


def _add_offset_fwd(block, offset, D):
    # residuals: the offset (tiny) for its dtype, an empty array for the block's dtype
    return add_spatial_offset(block, offset, D), (offset, jnp.zeros((0,), block.dtype))


def _add_offset_bwd(D, res, g):
    offset, block_dtype = res
    return g.astype(block_dtype.dtype), middle_sum(g, 1, 1 + D).astype(offset.dtype)


add_spatial_offset.defvjp(_add_offset_fwd, _add_offset_bwd)


SUMS_ENV = "GINJAX_CHANNEL_SUMS"
SUMS_IMPLS = ("xla", "triton")


def channel_sums_impl() -> str:
    """$GINJAX_CHANNEL_SUMS: "triton" (the fused kernel where `fused_sums_cover`; the default on
    a GPU, where it took 3.6 ms off a ResNet step and left the UNet and DilResNet steps as they
    were: bench/NOTES.md) or "xla" (`middle_sum`; the default elsewhere)."""
    return env_choice(SUMS_ENV, SUMS_IMPLS, "triton" if jax.default_backend() == "gpu" else "xla")


def fused_sums_cover(a: jax.Array, products: bool) -> bool:
    """Whether the per-channel sums of `a` (c, P, T) run on kernels/triton/channel_sums.py: asked
    for, float32, the triton backend available, one device and no spatial sharding (XLA cannot
    partition the custom call), T <= 4 where products are summed."""
    if channel_sums_impl() != "triton" or a.ndim != 3 or a.dtype != jnp.float32:
        return False
    import kernels
    from kernels.triton.channel_sums import products_fit

    return (
        (not products or products_fit(int(a.shape[2])))
        and a.shape[1] * a.shape[2] <= INT32_MAX
        and jax.device_count() == 1
        and kernels.active_spatial_sharding() is None
        and "triton" in kernels.available_backends()
    )


def sums_planar() -> bool:
    """Whether the Triton sums kernel reads its blocks component-planar: `block_layout()`
    (kernels/_layout.py, $GINJAX_BLOCK_LAYOUT) is "planar", the layout the kernels producing and
    consuming those blocks are asked for, so XLA inserts no transpose next to the sums. Read when
    the caller is traced, beside `fused_sums_cover`, and handed down as a static argument."""
    from ._layout import block_layout

    return block_layout() == "planar"


def shifted(x: jax.Array, shift) -> jax.Array:
    """x (c, P, T) less shift (c, T) at every pixel (None: x)."""
    return x if shift is None else x - shift[:, None, :]


def channel_matvec(m: jax.Array, x: jax.Array) -> jax.Array:
    """y[c, p, i] = sum_j m[c, i, j] x[c, p, j] for m (c, T, T), x (c, P, T): T multiply-adds that
    fuse with the elementwise work around them (no GEMM with inner dimension T)."""
    T = m.shape[-1]
    out = x[..., 0:1] * m[:, None, :, 0]
    for j in range(1, T):
        out = out + x[..., j : j + 1] * m[:, None, :, j]
    return out


def channel_sums_value(fused: bool, a: jax.Array, b, shift,
                       planar: bool = False) -> tuple[jax.Array, jax.Array]:
    """(sum_p a (c, T), sum_p a b^T (c, T, T)) for a, b (c, P, T), b None meaning a, `shift`
    subtracted from b (and from a where b is a) as they are read: the Triton kernel where `fused`
    (`fused_sums_cover`, decided by the caller), reading a and b component-planar where `planar`
    (`sums_planar()`, also the caller's), else `middle_sum` (`planar` unused). Not
    differentiable itself (ginjax._norm_stats.channel_sums is)."""
    if fused:
        from kernels.triton.channel_sums import channel_sums_triton

        return channel_sums_triton(a, b, shift=shift, planar=planar)
    c, P, T = a.shape
    if b is None:
        a = b = shifted(a, shift)
    else:
        b = shifted(b, shift)
    first = middle_sum(a, 1, 2)
    products = (a[..., :, None] * b[..., None, :]).reshape((c, P, T * T))
    return first, middle_sum(products, 1, 2).reshape((c, T, T))


def affine_backward(fused: bool, m: jax.Array, x: jax.Array, shift, g: jax.Array, planar: bool = False):
    """The VJP of y = m (x - shift) + v (per channel; m (c, T, T), x (c, P, T), shift (c, T) or
    None) at cotangent g (c, P, T): (gm, gv, gx, gshift or None) in float32. gm and gv are one
    `channel_sums_value` of (g, x) shifted as it reads x (`fused`, `planar` as there), gx = m^T g
    one elementwise pass."""
    gv, gm = channel_sums_value(fused, g, x, shift, planar)
    mt = jnp.swapaxes(m, 1, 2)
    gx = channel_matvec(mt, g)
    # d/dshift: -m^T summed over pixels, i.e. -m^T gv
    ds = None if shift is None else -jnp.einsum("cij,cj->ci", mt, gv)
    return gm, gv, gx, ds
