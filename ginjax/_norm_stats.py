"""GroupNorm/LayerNorm of a block as two passes forward and two backward.

A block (c, *spatial, *tensor) is viewed as x (c, P, T): P pixels, T components (1 for scalars,
D for vectors). Normalising a channel group, whitening included, is a per-channel affine map of
the components, y[c, p] = M_c x[c, p] + v_c, whose M and v are small functions of each channel's
sums over pixels of x and of x x^T. So the layer is:

- `channel_sums`: one read of the block, the per-channel sums as wide reductions in the block's
  own layout (kernels._reduce); its backward is elementwise (d/dx of sum x x^T is (G + G^T) x);
- the statistics, eigh and the affine coefficients on (c, T, T) arrays (autodiff, but for the
  whitening C^(-1/2), whose derivative `inverse_sqrt` takes in closed form: eigh's own has
  1 / (eigenvalue gaps), and a vector group's covariance is near-isotropic);
- `channel_affine`: one elementwise pass (T multiply-adds per component, fused by XLA; no GEMM
  with inner dimension T); its backward is one `channel_sums` of (gy, x) for gM and gv, and one
  elementwise pass for gx = M^T gy, which XLA fuses with the sums' backward.

Forward: 1 read (statistics) + 1 read and 1 write; backward: 2 reads (weight sums) + 2 reads and
1 write: no transposes, concatenations or GEMMs over the block. The statistics are taken about a
per-group sample (`_group_moments`), and that shift is handed to the sums and the affine map,
which subtract it as they read the block: the shifted block is never written out (a custom call,
such as the Triton sums kernel, would otherwise make XLA write it, and the affine map's backward
would keep it). `vector_group_norm_coefficients` stops before the affine pass, for a consumer
that applies the map as it reads the block (the Triton VectorNeuron kernels,
layers.normalize_and_activate).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels._reduce import (affine_backward, channel_matvec, channel_sums_value, fused_sums_cover, shifted,
                             sums_planar)


def scalar_group_norm(norm, block: jax.Array) -> jax.Array:
    """`norm` (an equinox.nn.GroupNorm) applied to `block` (channels, ...), equal to norm(block)
    up to rounding; its groups, eps and channelwise affine parameters are used as they are.

    Computed as `vector_group_norm` is, with one component: one statistics pass, then the
    per-channel map y = w_c inv_g (x - mean_g) + b_c as one `channel_affine`."""
    orig_dtype = block.dtype
    x = block.astype(jnp.promote_types(block.dtype, jnp.float32))
    c = x.shape[0]
    shift, _, m1, m2 = _group_moments(x.reshape((c, -1, 1)), norm.groups)
    per = c // norm.groups
    inv = jax.lax.rsqrt(jnp.maximum(m2[:, 0, 0] - m1[:, 0] * m1[:, 0], 0.0) + norm.eps)
    m = jnp.repeat(inv, per)
    v = -m * jnp.repeat(m1[:, 0], per)
    if norm.channelwise_affine:
        weight = norm.weight.astype(x.dtype)
        m, v = weight * m, weight * v + norm.bias.astype(x.dtype)
    out = channel_affine(m[:, None, None], v[:, None], x.reshape((c, -1, 1)), shift)
    return out.reshape(x.shape).astype(orig_dtype)


def _group_moments(x: jax.Array, groups: int):
    """One statistics pass over x (c, P, T) in channel groups.

    Returns (shift (c, T), first (c, T) = sum_p d, m1 (G, T), m2 (G, T, T)) for d = x - shift:
    m1 and m2 the mean of d and of d d^T over each group's channels and pixels. The shift is one
    sample of the group (no gradient): the moments of d are those of x about a point inside the
    data, so the one-pass covariance m2 - m1 m1^T does not cancel. d is never materialised: the
    sums subtract the shift as they read x (so does `channel_affine` after them).
    """
    c, P, T = x.shape
    per = c // groups
    shift = jnp.repeat(jax.lax.stop_gradient(x.reshape((groups, -1, T))[:, 0, :]), per, axis=0)
    first, products = channel_sums(x, shift=shift)
    m1 = first.reshape((groups, per, T)).sum(axis=1) / (per * P)
    m2 = products.reshape((groups, per, T, T)).sum(axis=1) / (per * P)
    return shift, first, m1, m2


def channel_sums(a: jax.Array, b: jax.Array | None = None, shift: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """a, b (c, P, T) -> (sum_p a[c, p, i] (c, T), sum_p a[c, p, i] b[c, p, j] (c, T, T)); b None
    means b = a (read once). `shift` (c, T), if given, is subtracted from b (from a as well where
    b is a) as the block is read: the shifted block is never written out.

    Both are wide column reductions in the block's layout (kernels._reduce.middle_sum), or one
    Triton kernel where `kernels._reduce.fused_sums_cover` (GINJAX_CHANNEL_SUMS, "triton" by default on a
    GPU, read when the call is traced), reading the block component-planar where
    `kernels._reduce.sums_planar()` (GINJAX_BLOCK_LAYOUT); the backward is one elementwise pass per
    operand (per-channel T x T products written as multiply-adds), not the reductions and
    transposes autodiff of the outer product makes.
    """
    return _channel_sums(fused_sums_cover(a, products=True), sums_planar(), a, b, shift)


# `fused` and `planar` are static arguments, decided outside: a decision taken inside a
# custom_vjp's rules would be reused from any trace JAX caches of them
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _channel_sums(fused: bool, planar: bool, a, b, shift):
    return channel_sums_value(fused, a, b, shift, planar)


def _channel_sums_fwd(fused, planar, a, b, shift):
    sums = _channel_sums(fused, planar, a, b, shift)
    return sums, (a, b, shift, None if shift is None else sums[0])


def _channel_sums_bwd(fused, planar, res, g):
    a, b, shift, first = res
    g_first, g_products = g
    if b is None:  # d/da of sum d d^T (d = a - shift): (G + G^T) d
        sym = g_products + jnp.swapaxes(g_products, 1, 2)
        da = g_first[:, None, :] + channel_matvec(sym, shifted(a, shift))
        # d/dshift of sum d and sum d d^T: -P and -(ds F^T + F ds^T), F = sum d
        ds = None if shift is None else -a.shape[1] * g_first - jnp.einsum("cij,cj->ci", sym, first)
        return da.astype(a.dtype), None, None if ds is None else ds.astype(shift.dtype)
    da = g_first[:, None, :] + channel_matvec(g_products, shifted(b, shift))
    db = channel_matvec(jnp.swapaxes(g_products, 1, 2), a)
    # d/dshift of sum a (b - shift)^T: -F dshift^T, F = sum a
    ds = None if shift is None else -jnp.einsum("cij,ci->cj", g_products, first)
    return da.astype(a.dtype), db.astype(b.dtype), None if ds is None else ds.astype(shift.dtype)


_channel_sums.defvjp(_channel_sums_fwd, _channel_sums_bwd)


def channel_affine(m: jax.Array, v: jax.Array, x: jax.Array, shift: jax.Array | None = None) -> jax.Array:
    """y[c, p] = m[c] (x[c, p] - shift[c]) + v[c] for m (c, T, T), v (c, T), x (c, P, T), shift
    (c, T) or None (0): one elementwise pass; the backward reduces gm and gv in one
    `channel_sums` (shifted as it reads x) and gx is one elementwise pass. x, not x - shift, is
    what the backward keeps."""
    return _channel_affine(fused_sums_cover(x, products=True), sums_planar(), m, v, x, shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _channel_affine(fused: bool, planar: bool, m, v, x, shift):
    return channel_matvec(m, shifted(x, shift)) + v[:, None, :]


def _affine_fwd(fused, planar, m, v, x, shift):
    return _channel_affine(fused, planar, m, v, x, shift), (m, x, shift)


def _affine_bwd(fused, planar, res, g):
    m, x, shift = res
    gm, gv, gx, ds = affine_backward(fused, m, x, shift, g, planar)
    ds = None if ds is None else ds.astype(shift.dtype)
    return gm.astype(m.dtype), gv.astype(m.dtype), gx.astype(x.dtype), ds


_channel_affine.defvjp(_affine_fwd, _affine_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def inverse_sqrt(cov: jax.Array, eps: float) -> jax.Array:
    """(C + eps I)^(-1/2) of symmetric (..., D, D) matrices C, as V diag(1 / sqrt(w + eps)) V^T
    from eigh's eigenvalues w and eigenvectors V.

    The derivative is taken in closed form rather than through eigh's: for a matrix function
    f(C) = V f(w) V^T, df = V (G o (V^T dC V)) V^T with G_ij the divided difference
    (f(w_i) - f(w_j)) / (w_i - w_j), which for f(w) = (w + eps)^(-1/2) and s = sqrt(w + eps) is
    -1 / (s_i s_j (s_i + s_j)), f'(w_i) on the diagonal included. eigh's derivative instead
    carries 1 / (w_j - w_i) into the eigenvectors, to cancel in V f(w) V^T; a vector group's
    covariance is near-isotropic (rotations mix its components), so those factors are huge and
    the cancellation leaves rounding noise. At fp32 against float64, eigh's derivative is 2e-4
    off at an eigenvalue gap of 1e-3, 1e-2 (D=2) to 0.12 (D=3) at 1e-6 and NaN at 0; this one
    within 6e-7 at every gap (tests/test_glue.py)."""
    return _inverse_sqrt_parts(cov, eps)[0]


def _inverse_sqrt_parts(cov: jax.Array, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """((C + eps I)^(-1/2), eigh's eigenvectors V, s = sqrt(eigenvalues + eps))."""
    eigvals, eigvecs = jnp.linalg.eigh(cov, symmetrize_input=False)
    s = jnp.sqrt(eigvals + eps)
    return jnp.einsum("...ij,...j,...kj->...ik", eigvecs, 1.0 / s, eigvecs), eigvecs, s


@inverse_sqrt.defjvp
def _inverse_sqrt_jvp(eps, primals, tangents):
    (cov,), (dcov,) = primals, tangents
    out, eigvecs, s = _inverse_sqrt_parts(cov, eps)
    si, sj = s[..., :, None], s[..., None, :]
    gain = -1.0 / (si * sj * (si + sj))
    hi = jax.lax.Precision.HIGHEST  # D x D products: TF32 would cost accuracy and save nothing
    dsym = 0.5 * (dcov + jnp.swapaxes(dcov, -1, -2))
    rotated = jnp.einsum("...ji,...jk,...kl->...il", eigvecs, dsym, eigvecs, precision=hi)
    return out, jnp.einsum("...ij,...jk,...lk->...il", eigvecs, gain * rotated, eigvecs, precision=hi)


def vector_group_norm(
    block: jax.Array,
    groups: int,
    D: int,
    eps: float,
    method: str = "eigh",
    scale: jax.Array | None = None,
    bias: jax.Array | None = None,
) -> jax.Array:
    """Whiten a vector block (c, *spatial[D], D) per channel group, then (optionally) scale each
    channel and add `bias` times its spatial mean vector:

        y[c, p] = scale[c] A_g (x[c, p] - mean_g) + bias[c] mean_c

    with mean_g and the biased covariance C_g of group g's vectors (all its channels and
    pixels), mean_c channel c's spatial mean, A_g = C_g^(-1/2) by "eigh" (eigenvalues + eps) or
    the inverse transposed Cholesky factor (+ eps on its diagonal) by "cholesky".

    One statistics pass (`_group_moments`), the G x D x D algebra, and one per-channel affine
    map y = M_c (x - shift_c) + v_c (`channel_affine`); the gradient of "eigh"'s whitening is
    `inverse_sqrt`'s closed form, the Cholesky factor's autodiff's on the D x D matrices.
    """
    m, v, shift = vector_group_norm_coefficients(block, groups, D, eps, method, scale, bias)
    x = block.reshape((block.shape[0], -1, D))
    return channel_affine(m, v, x, shift).reshape(block.shape)


def vector_group_norm_coefficients(
    block: jax.Array, groups: int, D: int, eps: float, method: str = "eigh",
    scale: jax.Array | None = None, bias: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`vector_group_norm`'s per-channel affine map as (M (c, D, D), v (c, D), shift (c, D)) in
    the block's dtype: the norm is y[c, p] = M_c (x[c, p] - shift_c) + v_c, which a consumer may
    apply itself (the VectorNeuron kernels do, in registers) instead of reading y."""
    c = block.shape[0]
    per = c // groups
    x = block.reshape((c, -1, D))
    P = x.shape[1]
    shift, first, m1, m2 = _group_moments(x, groups)
    cov = m2 - m1[:, :, None] * m1[:, None, :]
    cov = 0.5 * (cov + jnp.swapaxes(cov, 1, 2))  # exactly symmetric for eigh
    if method == "eigh":
        whitening = inverse_sqrt(cov, eps)
    elif method == "cholesky":
        factor = jax.lax.linalg.cholesky(cov, symmetrize_input=False)
        factor = factor + eps * jnp.eye(D, dtype=factor.dtype)
        # row vectors y with y L = x, i.e. y = L^-T x as columns
        eye = jnp.broadcast_to(jnp.eye(D, dtype=factor.dtype), factor.shape)
        whitening = jnp.swapaxes(
            jax.lax.linalg.triangular_solve(factor, eye, left_side=False, lower=True), 1, 2)
    else:
        raise NotImplementedError(f"_group_norm_K1: `method` (={method!r}) must be 'eigh' or 'cholesky'")
    m = jnp.repeat(whitening, per, axis=0)  # (c, D, D)
    centre = jnp.repeat(m1, per, axis=0)  # mean_g - shift_c
    v = -jnp.einsum("cij,cj->ci", m, centre)
    if scale is not None:
        m = scale[:, None, None] * m
        v = scale[:, None] * v
    if bias is not None:
        v = v + bias[:, None] * (shift + first / P)
    return m.astype(x.dtype), v.astype(x.dtype), shift
