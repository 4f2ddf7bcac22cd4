"""The statistics and small per-pixel products of GroupNorm/LayerNorm, in one pass over a block.

- Scalars: the mean and variance of each channel group come from one read of the block (two
  sibling reductions XLA fuses into one kernel: the sum and the sum of squares, about a shift so
  the difference of squares loses no precision), not a mean followed by a variance pass.
- Vectors: the per-channel mean vectors, and each group's mean and D x D covariance, come from
  one reduction of the block over its pixels, in its (c, *spatial, D) layout (kernels._reduce),
  instead of a mean pass, a centring pass and a GEMM with the pixel count as its inner dimension.
- The whitening product y = W_g x at every pixel (D x D, D <= 3) is written out as D
  multiply-adds that fuse with the surrounding elementwise work, instead of a GEMM with inner
  dimension D; its backward reduces the weight gradient the same wide way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels._reduce import middle_sum


def scalar_group_norm(norm, block: jax.Array) -> jax.Array:
    """`norm` (an equinox.nn.GroupNorm) applied to `block` (channels, ...), equal to norm(block)
    up to rounding; its groups, eps and channelwise affine parameters are used as they are."""
    orig_dtype = block.dtype
    x = block.astype(jnp.promote_types(block.dtype, jnp.float32))
    y = x.reshape((norm.groups, -1))
    # shifting by one sample of the group leaves mean and variance exact while keeping the
    # sum of squares small: the one-pass formula then loses nothing to cancellation
    d = y - jax.lax.stop_gradient(y[:, :1])
    m1 = jnp.mean(d, axis=1, keepdims=True)
    m2 = jnp.mean(d * d, axis=1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + norm.eps)
    out = ((d - m1) * inv).reshape(x.shape)
    if norm.channelwise_affine:
        lead = (-1,) + (1,) * (x.ndim - 1)
        out = norm.weight.astype(out.dtype).reshape(lead) * out + norm.bias.astype(out.dtype).reshape(lead)
    return out.astype(orig_dtype)


def vector_moments(block: jax.Array, groups: int, D: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pass over a vector block (c, *spatial[D], D).

    Returns (channel_mean (c, D), group_mean (G, D), group_cov (G, D, D)): the spatial mean vector
    of every channel, and the mean and biased covariance of each group's vectors (all its
    channels and pixels).
    """
    c = block.shape[0]
    per = c // groups
    shift = jax.lax.stop_gradient(block.reshape((groups, -1, D))[:, 0, :])  # (G, D)
    d = block - jnp.repeat(shift, per, axis=0).reshape((c,) + (1,) * D + (D,))
    outer = (d[..., :, None] * d[..., None, :]).reshape(d.shape[:-1] + (D * D,))
    sums = middle_sum(jnp.concatenate([d, outer], axis=-1), 1, 1 + D)  # (c, D + D*D)
    pixels = d.size // (c * D)
    channel_mean = jnp.repeat(shift, per, axis=0) + sums[:, :D] / pixels
    group = sums.reshape((groups, per, D + D * D)).sum(axis=1) / (per * pixels)
    m1, m2 = group[:, :D], group[:, D:].reshape((groups, D, D))
    cov = m2 - m1[:, :, None] * m1[:, None, :]
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))  # exactly symmetric for eigh
    return channel_mean, shift + m1, cov


@jax.custom_vjp
def apply_group_matrix(a: jax.Array, v: jax.Array) -> jax.Array:
    """y[g, n, i] = sum_j a[g, i, j] v[g, n, j] for a (G, D, D), v (G, n, D)."""
    D = a.shape[-1]
    return sum(v[..., j : j + 1] * a[:, None, :, j] for j in range(D))


def _apply_fwd(a, v):
    return apply_group_matrix(a, v), (a, v)


def _apply_bwd(res, g):
    a, v = res
    D = a.shape[-1]
    dv = apply_group_matrix(jnp.swapaxes(a, 1, 2), g)
    outer = (g[..., :, None] * v[..., None, :]).reshape(g.shape[:-1] + (D * D,))
    da = middle_sum(outer, 1, 2).reshape(a.shape)
    return da.astype(a.dtype), dv.astype(v.dtype)


apply_group_matrix.defvjp(_apply_fwd, _apply_bwd)
