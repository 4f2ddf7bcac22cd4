"""The Vector Neurons nonlinearity of one non-scalar block, as one differentiable operation.

Per pixel and channel, with x the block's T = D^k tensor components and d = W x (the channel
mixing, a batched GEMM: ginjax._channel_mix):

    n = |d|,  u = d / (n + eps),  s = <x, u>,  y = x + h(s) u,
    h(s) = (act(s) / (|s| + eps) - 1) s

which is ginjax 0.1.8's gain * parallel + (x - parallel) with parallel = s u. Autodiff of that
chain saves and re-reads a dozen block-sized intermediates (norms, unit vectors, gains, their
broadcasts, a transposed copy for the norm's backward). Here the backward is written out:

    gs = <gy, u> h'(s)                         (h' by a forward-mode derivative of h, elementwise)
    gu = h(s) gy + gs x
    gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n)       (second term 0 where d = 0)
    gx = gy + gs u + W^T gd,   gW = sum over pixels of gd x^T

so the forward is the GEMM and one elementwise pass (x, d -> y), and the backward one elementwise
pass (gy, x, d -> gd and the local part of gx) and the two GEMMs; n, u, s are recomputed, only
x and d are kept. The sums over the T components are written as T multiply-adds on slices of
the minor axis, so they fuse with the elementwise work instead of becoming reductions.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from ginjax._channel_mix import _mix, _mix_bwd


def vector_neuron(
    weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps: float
) -> jax.Array:
    """The VectorNeuronNonlinear of one block (c, *spatial[D], *tensor) with mixing `weight`
    (c, c); the result has the block's shape. Reverse-mode differentiable and vmappable."""
    lead = block.shape[: 1 + D]
    T = math.prod(block.shape[1 + D :])
    y = _vn(weight, block.reshape(lead + (T,)), activation, eps)
    return y.reshape(block.shape)


def component_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """sum_i a[..., i] b[..., i], keeping the axis (size 1): multiply-adds on slices, so XLA
    fuses it with the elementwise work around it."""
    out = a[..., 0:1] * b[..., 0:1]
    for i in range(1, a.shape[-1]):
        out = out + a[..., i : i + 1] * b[..., i : i + 1]
    return out


def _norm(d):
    """|d| over the minor axis (kept), and the mask where it is positive."""
    squared = component_dot(d, d)
    positive = squared > 0
    return jnp.sqrt(jnp.where(positive, squared, 1.0)) * positive, positive


def _h(activation, eps, s):
    return (activation(s) / (jnp.abs(s) + eps) - 1.0) * s


def _local(x, d, activation, eps):
    n, positive = _norm(d)
    u = d / (n + eps)
    s = component_dot(x, u)
    return n, positive, u, s


def _forward(w, x, activation, eps):
    d = _mix(w, x)
    _, _, u, s = _local(x, d, activation, eps)
    parallel = s * u
    gain = activation(s) / (jnp.abs(s) + eps)
    return gain * parallel + (x - parallel), d


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _vn(w, x, activation, eps):
    return _forward(w, x, activation, eps)[0]


def _vn_fwd(w, x, activation, eps):
    y, d = _forward(w, x, activation, eps)
    return y, (w, x, d)


def _vn_bwd(activation, eps, res, gy):
    w, x, d = res
    n, positive, u, s = _local(x, d, activation, eps)
    h, dh = jax.jvp(functools.partial(_h, activation, eps), (s,), (jnp.ones_like(s),))
    gs = component_dot(gy, u) * dh
    gu = h * gy + gs * x
    scale = 1.0 / (n + eps)
    # d|d|/dd = d / |d|, taken as 0 at d = 0 (the safe norm's convention)
    inv_n = jnp.where(positive, 1.0 / jnp.where(positive, n, 1.0), 0.0)
    gd = gu * scale - component_dot(gu, d) * (scale * scale * inv_n) * d
    gw, gx_mix = _mix_bwd((w, x), gd)
    return gw, (gy + gs * u + gx_mix).astype(x.dtype)


_vn.defvjp(_vn_fwd, _vn_bwd)
