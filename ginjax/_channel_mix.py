"""Channel mixing y[o, ...] = sum_c w[o, c] x[c, ...] that stays one transpose-free GEMM under vmap.

Written as `jnp.tensordot(w, x, axes=1)` on an unbatched block, the mixing becomes, under the
user's `jax.vmap` over a batch, a dot_general of w (o, c) with x (B, c, N) whose contracting
axis c sits between the free axes B and N. A GEMM needs the free axes of an operand on one side
of its contracting axis, so XLA copies x to channels-last (B, N, c) first (on the GPU a
transpose fusion the size of the block, then the GEMM, then the consumers read (B, N, o)).

Here the mixing is a batched GEMM: w is broadcast over the batch (o * c numbers per example) and
the batch becomes a batch dimension of both operands, so x is read as it lies, (B, c, N) =
B matrices of K=c rows and N columns, and the result is (B, o, N), the layout the next layer
reads. A `custom_vmap` rule does the broadcasting (a layer never sees the batch), and a
`custom_vjp` keeps the backward on the same footing: dx = w^T g is the same batched GEMM,
dw = sum_B g x^T a batched GEMM that contracts the minor axes of both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def channel_mix(w: jax.Array, x: jax.Array) -> jax.Array:
    """sum_c w[o, c] x[c, ...]: w (o, c), x (c, *rest) -> (o, *rest). Differentiable (reverse
    mode) and vmappable; equal to jnp.tensordot(w, x, axes=1)."""
    if w.ndim != 2 or x.ndim < 1 or w.shape[1] != x.shape[0]:
        raise ValueError(
            f"channel_mix: `w` (shape {tuple(w.shape)}) must be (o, c) and `x` (shape "
            f"{tuple(x.shape)}) (c, ...) with the same c"
        )
    return _mix(w, x)


@jax.custom_vjp
def _mix(w, x):
    rest = x.shape[1:]
    out = _batched_gemm(w[None], x.reshape((1, x.shape[0], -1)))
    return out.reshape((w.shape[0],) + rest)


def _mix_fwd(w, x):
    return _mix(w, x), (w, x)


def _mix_bwd(res, g):
    w, x = res
    dx = _mix(w.T, g)
    # (o, N) x (c, N) -> (o, c): contracts the minor axis of both; under vmap a batched GEMM
    dw = jax.lax.dot_general(g.reshape((g.shape[0], -1)), x.reshape((x.shape[0], -1)), (((1,), (1,)), ((), ())))
    return dw.astype(w.dtype), dx.astype(x.dtype)


_mix.defvjp(_mix_fwd, _mix_bwd)


@jax.custom_batching.custom_vmap
def _batched_gemm(w, x):
    """w (L, o, c), x (L, c, N) -> (L, o, N): a GEMM per l, both operands read as they lie."""
    return jax.lax.dot_general(w, x, (((2,), (1,)), ((0,), (0,))))


@_batched_gemm.def_vmap
def _batched_gemm_rule(axis_size, in_batched, w, x):
    # a new batch axis (leading) merges into L; the unbatched operand is broadcast (the weights:
    # a few hundred numbers per example), so the dot keeps batch dimensions on both sides
    w_batched, x_batched = in_batched
    if not w_batched:
        w = jnp.broadcast_to(w, (axis_size,) + w.shape)
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    A, L = w.shape[0], w.shape[1]
    out = _batched_gemm(w.reshape((A * L,) + w.shape[2:]), x.reshape((A * L,) + x.shape[2:]))
    return out.reshape((A, L) + out.shape[1:]), True
