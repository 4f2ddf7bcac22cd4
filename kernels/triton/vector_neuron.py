"""The VectorNeuron nonlinearity of one non-scalar block as one fused Triton kernel forward and
one backward (plus a fixed-order sum of the weight gradient's partials).

    y = vector_neuron_triton(weight, block, D, activation, eps)

Per pixel and channel, with x the block's T = D^k components and W = weight (c, c):

    d = W x,  n = |d| (0 where d = 0),  u = d / (n + eps),  s = <x, u>,
    h(s) = (act(s) / (|s| + eps) - 1) s,  y = x + h(s) u

Backward (reverse mode, custom_vjp), with n, u, s recomputed from x (the only residual):

    gs = <gy, u> h'(s),  gu = h gy + gs x,
    gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n)    (second term 0 where d = 0)
    gx = gy + gs u + W^T gd,  gW = sum over pixels and components of gd x^T

The forward reads x once and writes y once; the backward reads x and gy once and writes gx once
and a (c, c) partial of gW per program, which `plan_partial_sums` adds in a fixed order
(bit-identical run after run; no atomics). With `VNBlocks(save_mix=True)` the forward under
differentiation also writes d = W x and the backward reads it rather than recompute it (three of
its nine dots per tile, for a block-sized residual). The kernels index the block component-planar,
(c, T, pixels) per example (`planar=True`, the layout of vector blocks beside the Triton
ConvContract kernels), or components-minor, (c, pixels, T) (`planar=False`, the block's own axis
order, which the CUDA ConvContract kernels read and write): launched through `_launch.run_plan`
with that `block_order`, so on a GPU XLA lays the producers out accordingly (no transposes where
the neighbours agree), and with TRITON_INTERPRET=1 they run on the host.

Activations: jax.nn.relu and jax.nn.gelu (its default tanh form), recognised by identity
(`supported_activation`); anything else raises here (ginjax._vector_neuron falls back to its
XLA path). float32 only. Under `jax.vmap` each kernel is one launch for the whole batch
(custom_vmap, as the ConvContract kernels).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .._fused import INT32_MAX
from .._vn_args import check_arguments, literal_eps, supported_activation
from ._kernel import plan_partial_sums
from ._launch import batch_size, batched_flags, block_order, run_plan
from ._vn_kernel import VNBlocks, VNGeometry, backward_groups, plan_backward, plan_forward, tiling
from .conv_contract import _fold_batch_rule

__all__ = ["VNBlocks", "literal_eps", "supported_activation", "vector_neuron_triton"]


def vector_neuron_triton(
    weight: jax.Array,
    block: jax.Array,
    D: int,
    activation: Callable,
    eps: float,
    blocks: Optional[VNBlocks] = None,
    planar: bool = True,
) -> jax.Array:
    """The VectorNeuron of one block (c, *spatial[D], *tensor) with mixing `weight` (c, c), as
    the fused Triton kernels; float32 in and out. Reverse-mode differentiable and vmappable.

    Args:
        weight: (c, c) float32.
        block: (c, *spatial, *(D,)*k) float32, k >= 1.
        D: the number of spatial axes.
        activation: jax.nn.relu or jax.nn.gelu (see `supported_activation`).
        eps: a Python float > 0.
        blocks: the kernels' tiling (None: `VNBlocks()`).
        planar: index the block component-planar (True) or components-minor (False); the
            result is the same, the layout XLA gives the block around the call differs.
    """
    name, _ = check_arguments(weight, block, D, activation, eps)
    blocks = VNBlocks() if blocks is None else blocks
    blocks.validate()
    return _vn(_Config(D, name, float(eps), blocks, bool(planar)), weight, block)


class _Config(NamedTuple):
    """What one call fixes (hashable: the custom_vjp's static argument, the launchers' cache key)."""

    D: int
    activation: str
    eps: float
    blocks: VNBlocks
    planar: bool


# ---- differentiation: custom_vjp, the residual is x (and d = W x with `blocks.save_mix`) ----------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vn(cfg, w, x):
    (y,) = _batched_forward(cfg, False)((x[None],), (w[None],))
    return y[0]


def _vn_fwd(cfg, w, x):
    if not cfg.blocks.save_mix:
        return _vn(cfg, w, x), (w, x, None)
    y, d = _batched_forward(cfg, True)((x[None],), (w[None],))
    return y[0], (w, x, d[0])


def _vn_bwd(cfg, res, gy):
    w, x, d = res
    xgs = (x[None], gy.astype(jnp.float32)[None]) + (() if d is None else (d[None],))
    gx, gw = _batched_backward(cfg)(xgs, (w[None],))
    return gw[0], gx[0]


_vn.defvjp(_vn_fwd, _vn_bwd)


# ---- batching: custom_vmap into one launch -------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _batched_forward(cfg, with_mix: bool):
    @jax.custom_batching.custom_vmap
    def op(xs, ws):
        return _launch_forward(cfg, xs[0], ws[0], with_mix)

    op.def_vmap(functools.partial(_fold_batch_rule, op))
    return op


@functools.lru_cache(maxsize=64)
def _batched_backward(cfg):
    @jax.custom_batching.custom_vmap
    def op(xgs, ws):
        return _launch_backward(cfg, xgs[0], xgs[1], ws[0], *xgs[2:])

    op.def_vmap(functools.partial(_fold_batch_rule, op))
    return op


def _geometry(cfg, x, w, gy=None):
    D, planar = cfg.D, cfg.planar
    arrays = [x, w] + ([] if gy is None else [gy])
    batch = batch_size(arrays)
    flags = batched_flags(arrays, batch)
    g = VNGeometry(
        channels=int(x.shape[1]),
        components=math.prod(x.shape[2 + D :]),
        pixels=math.prod(x.shape[2 : 2 + D]),
        x_batched=flags[0],
        w_batched=flags[1],
        g_batched=flags[2] if gy is not None else False,
        planar=planar,
    )
    if g.channels * g.components * g.pixels > INT32_MAX:
        raise ValueError(f"`block` (shape {tuple(x.shape[1:])}) has more than 2^31 elements per example")
    return batch, g


def _launch_forward(cfg, x, w, with_mix: bool):
    """x (1 or B, c, *spatial, *tensor), w (1 or B, c, c) -> (y,) or with `with_mix` (y, d), each
    (B, c, *spatial, *tensor)."""
    D, act, eps, blocks, planar = cfg
    batch, g = _geometry(cfg, x, w)
    plan = plan_forward(g, act, eps, *tiling(blocks, g, backward=False), precision=blocks.precision or "ieee",
                        save_mix=with_mix)
    order = block_order(D, x.ndim, planar)
    out = jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), jnp.float32)
    n_out = 2 if with_mix else 1
    return tuple(run_plan(plan, [out] * n_out, plan.programs_per_batch * batch, [x, w], in_orders=[order, None],
                          out_orders=[order] * n_out))


def _launch_backward(cfg, x, gy, w, d=None):
    """x, gy (1 or B, c, *spatial, *tensor), w (1 or B, c, c), the forward's d = W x or None ->
    gx (B, ...), per-example gW (B, c, c)."""
    D, act, eps, blocks, planar = cfg
    batch, g = _geometry(cfg, x, w, gy)
    P, warps = tiling(blocks, g, backward=True)
    groups = backward_groups(blocks, g, batch, P)
    plan = plan_backward(g, act, eps, P, warps, groups, precision=blocks.precision or "ieee",
                         stages=blocks.bwd_stages or 1, saved_mix=d is not None)
    order = block_order(D, x.ndim, planar)
    c = g.channels
    shapes = [jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), jnp.float32),
              jax.ShapeDtypeStruct((batch, groups, c * c), jnp.float32)]
    operands, in_orders = [x, w, gy], [order, None, order]
    if d is not None:
        # the kernel indexes d with the full batch (a cotangent vmapped over an unbatched
        # forward leaves d shared)
        operands.append(jnp.broadcast_to(d, (batch,) + tuple(d.shape[1:])))
        in_orders.append(order)
    gx, part = run_plan(plan, shapes, groups * batch, operands, in_orders=in_orders, out_orders=[order, None])
    sums = plan_partial_sums(batch, groups, c * c, prefix="vector_neuron_dw_sum")
    (gw,) = run_plan(sums, [jax.ShapeDtypeStruct((batch, c * c), jnp.float32)], sums.programs_per_batch * batch, [part])
    return gx, gw.reshape(batch, c, c)
