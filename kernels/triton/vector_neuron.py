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

With `affine=(m, v, shift)` (a norm's per-channel map, ginjax._norm_stats.
vector_group_norm_coefficients) the kernels take x <- m_c (x - shift_c) + v_c in registers right
after the load, forward and backward: the normalised block is neither written nor kept. The
backward kernel then returns the gradient in that normalised block, and the map's own VJP
(kernels._reduce.affine_backward: one channel-sums pass, in the kernels' own layout, and one
elementwise pass) completes gx, gm, gv and gshift. The coefficients ride along as one
(c, T^2 + 2T) operand, per example under vmap.

Activations: jax.nn.relu and jax.nn.gelu (its default tanh form), recognised by identity
(`supported_activation`); anything else raises here (ginjax._vector_neuron falls back to its
XLA path). float32 only. Under `jax.vmap` each kernel is one launch for the whole batch
(custom_vmap, as the ConvContract kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from .._fused import INT32_MAX
from .._reduce import affine_backward, fused_sums_cover, middle_sum
from .._vn_args import check_affine, check_arguments, check_residual, literal_eps, pack_affine, supported_activation
from ._kernel import plan_partial_sums
from ._launch import batch_size, batched_flags, block_order, run_plan
from ._vn_kernel import VNBlocks, VNGeometry, backward_groups, default_precision, plan_backward, plan_forward, tiling
from .conv_contract import batched_op

__all__ = ["VNBlocks", "literal_eps", "supported_activation", "vector_neuron_triton"]


def vector_neuron_triton(
    weight: jax.Array,
    block: jax.Array,
    D: int,
    activation: Callable,
    eps: float,
    blocks: Optional[VNBlocks] = None,
    planar: bool = True,
    affine: Optional[tuple] = None,
    with_means: bool = False,
    residual: Optional[jax.Array] = None,
):
    """The VectorNeuron of one block (c, *spatial[D], *tensor) with mixing `weight` (c, c), as
    the fused Triton kernels; float32 in and out. Reverse-mode differentiable and vmappable.
    Returns y, or with `with_means` (y, its spatial mean (c, *tensor)).

    Args:
        weight: (c, c) float32.
        block: (c, *spatial, *(D,)*k) float32, k >= 1.
        D: the number of spatial axes.
        activation: jax.nn.relu or jax.nn.gelu (see `supported_activation`).
        eps: a Python float > 0.
        blocks: the kernels' tiling (None: `VNBlocks()`); its precision None takes
            `default_precision` (GINJAX_VN_TRITON_PRECISION).
        planar: index the block component-planar (True) or components-minor (False); the
            result is the same, the layout XLA gives the block around the call differs.
        affine: None, or (m (c, T, T), v (c, T), shift (c, T)) float32: the nonlinearity of
            y = m_c (x - shift_c) + v_c per pixel instead of x, y computed in the kernels'
            registers (a norm's affine map: y is never written; the backward recomputes it
            from x). Differentiable in m, v and shift too.
        with_means: also return y's spatial mean, which the forward kernel adds up from the
            tiles it writes (per-tile partial sums, then XLA's column sum): a following layer's
            "mean" bias takes it instead of reading y again (kernels._bias). Differentiable.
        residual: None, or a float32 array of the block's shape added to y as the kernel writes
            it (a residual block's input: no pass of its own); the means include it, and its
            gradient is y's cotangent.
    """
    name, _ = check_arguments(weight, block, D, activation, eps)
    blocks = VNBlocks() if blocks is None else blocks
    blocks.validate()
    if blocks.precision is None:  # fixed here: the launchers' cache key and the plans then agree
        blocks = dataclasses.replace(blocks, precision=default_precision(int(block.shape[0]),
                                                                          math.prod(block.shape[1 + D :])))
    cfg = _Config(D, name, float(eps), blocks, bool(planar), means=bool(with_means))
    residual = check_residual(residual, block)
    if affine is None:
        return _vn(cfg, weight, block, None, residual)
    affine = check_affine(affine, block.shape[0], math.prod(block.shape[1 + D :]))
    sums_fused = fused_sums_cover(block.reshape((block.shape[0], -1, affine[0].shape[-1])), products=True)
    return _vn(cfg._replace(sums_fused=sums_fused), weight, block, affine, residual)


class _Config(NamedTuple):
    """What one call fixes (hashable: the custom_vjp's static argument, the launchers' cache key)."""

    D: int
    activation: str
    eps: float
    blocks: VNBlocks
    planar: bool
    sums_fused: bool = False  # the affine map's backward sums on the Triton sums kernel (indexed as `planar`)
    means: bool = False  # the forward also returns y's spatial means


# ---- differentiation: custom_vjp, the residual is x (and d = W x with `blocks.save_mix`) ----------------
# `affine` is None or (m, v, shift): per example under vmap, so its packed coefficients are an
# operand group of the launch; with it the kernels' gradient is in y = m (x - shift) + v, and the
# map's own VJP (kernels._reduce.affine_backward) follows
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vn(cfg, w, x, affine, residual):
    return _results(cfg, x, _batched_forward(cfg, False)(_launch_blocks(x, residual), _launch_weights(w, affine)))


def _results(cfg, x, outs):
    """The launch's y (its first result), or with `cfg.means` (y, its spatial means (c, *tensor))
    from the sums (1, c, T) the launch returns last."""
    if not cfg.means:
        return outs[0][0]
    pixels = math.prod(x.shape[1 : 1 + cfg.D])
    return outs[0][0], (outs[-1][0] / pixels).reshape((x.shape[0],) + x.shape[1 + cfg.D :])


def _launch_blocks(x, residual) -> tuple:
    """The launch's block-shaped operands: (x,) or (x, residual)."""
    return (x[None],) if residual is None else (x[None], residual[None])


def _launch_weights(w, affine) -> tuple:
    """The launch's per-example operands besides the block: (w,) or (w, packed coefficients)."""
    return (w[None],) if affine is None else (w[None], pack_affine(*affine)[None])


def _vn_fwd(cfg, w, x, affine, residual):
    with_residual = residual is not None
    if not cfg.blocks.save_mix:
        return _vn(cfg, w, x, affine, residual), (w, x, affine, None, with_residual)
    outs = _batched_forward(cfg, True)(_launch_blocks(x, residual), _launch_weights(w, affine))
    return _results(cfg, x, outs), (w, x, affine, outs[1][0], with_residual)


def _vn_bwd(cfg, res, gy):
    w, x, affine, d, with_residual = res
    if cfg.means:  # a mean's cotangent reaches every pixel divided by their count (zero, and
        # dropped by XLA, where the consumer takes the means as constants: kernels._bias.known_mean)
        gy, g_means = gy
        pixels = math.prod(x.shape[1 : 1 + cfg.D])
        gy = gy + (g_means / pixels).reshape(g_means.shape[:1] + (1,) * cfg.D + g_means.shape[1:])
    g_residual = gy.astype(jnp.float32) if with_residual else None  # y = ... + residual
    xgs = (x[None], gy.astype(jnp.float32)[None]) + (() if d is None else (d[None],))
    g, gw = _batched_backward(cfg)(xgs, _launch_weights(w, affine))
    if affine is None:
        return gw[0], g[0], None, g_residual
    m, _, shift = affine
    c, T = m.shape[0], m.shape[-1]
    # the sums read x and g in the layout these kernels read x and wrote g in: no transposes between
    gm, gv, gx, gshift = affine_backward(cfg.sums_fused, m, x.reshape((c, -1, T)), shift, g[0].reshape((c, -1, T)),
                                         planar=cfg.planar)
    return gw[0], gx.reshape(x.shape), (gm, gv, gshift), g_residual


_vn.defvjp(_vn_fwd, _vn_bwd)


# ---- batching: custom_vmap into one launch -------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _batched_forward(cfg, with_mix: bool):
    def body(xs, ws):  # xs: (x,) or (x, residual); ws: (w,) or (w, aff)
        return _launch_forward(cfg, xs[0], ws[0], with_mix, *ws[1:], resid=xs[1] if len(xs) > 1 else None)

    return batched_op(body)


@functools.lru_cache(maxsize=64)
def _batched_backward(cfg):
    def body(xgs, ws):  # xgs: (x, gy) or (x, gy, d); ws: (w,) or (w, aff)
        return _launch_backward(cfg, xgs[0], xgs[1], ws[0], *xgs[2:], aff=ws[1] if len(ws) > 1 else None)

    return batched_op(body)


def _geometry(cfg, x, w, gy=None, aff=None):
    D, planar = cfg.D, cfg.planar
    arrays = [x, w] + ([] if gy is None else [gy]) + ([] if aff is None else [aff])
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
        affine=aff is not None,
        a_batched=flags[-1] if aff is not None else False,
    )
    if g.channels * g.components * g.pixels > INT32_MAX:
        raise ValueError(f"`block` (shape {tuple(x.shape[1:])}) has more than 2^31 elements per example")
    return batch, g


def _launch_forward(cfg, x, w, with_mix: bool, aff=None, resid=None):
    """x (1 or B, c, *spatial, *tensor), w (1 or B, c, c), aff None or (1 or B, c, affine_row(T)),
    resid None or x's shape (1 or B) -> (y,) or with `with_mix` (y, d), each (B, c, *spatial,
    *tensor); with `cfg.means` y's sums over the pixels (B, c, T) last."""
    D, act, eps, blocks, planar = cfg.D, cfg.activation, cfg.eps, cfg.blocks, cfg.planar
    batch, g = _geometry(cfg, x, w, aff=aff)
    plan = plan_forward(g, act, eps, *tiling(blocks, g, backward=False), precision=blocks.precision or "ieee",
                        save_mix=with_mix, sums=cfg.means, residual=resid is not None)
    order = block_order(D, x.ndim, planar)
    out = jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), jnp.float32)
    n_out = 2 if with_mix else 1
    shapes, out_orders = [out] * n_out, [order] * n_out
    width = g.channels * g.components
    if cfg.means:
        shapes.append(jax.ShapeDtypeStruct((batch, plan.programs_per_batch, width), jnp.float32))
        out_orders.append(None)
    operands, in_orders = [x, w] + ([] if aff is None else [aff]), [order] + [None] * (1 + (aff is not None))
    if resid is not None:  # indexed as y is: the whole batch
        operands.append(jnp.broadcast_to(resid, (batch,) + tuple(resid.shape[1:])))
        in_orders.append(order)
    outs = run_plan(plan, shapes, plan.programs_per_batch * batch, operands, in_orders=in_orders,
                    out_orders=out_orders)
    if not cfg.means:
        return tuple(outs)
    # the partials are tall (a row per tile: 4096 x 48 a 64^3 example), which the fixed-order sums
    # kernel walks with one program per batch element and 64 columns (tens of us a launch on the
    # H200, ~1 ms over a DilResNet step); XLA's two-stage column sum spreads them over the GPU
    total = middle_sum(outs[-1], 1, 2)
    return tuple(outs[:-1]) + (total.reshape(batch, g.channels, g.components),)


def _launch_backward(cfg, x, gy, w, d=None, aff=None):
    """x, gy (1 or B, c, *spatial, *tensor), w (1 or B, c, c), the forward's d = W x or None, aff
    as `_launch_forward`'s -> gx (B, ...; with aff the gradient in y), per-example gW (B, c, c)."""
    D, act, eps, blocks, planar = cfg.D, cfg.activation, cfg.eps, cfg.blocks, cfg.planar
    batch, g = _geometry(cfg, x, w, gy, aff)
    P, warps = tiling(blocks, g, backward=True)
    groups = backward_groups(blocks, g, batch, P)
    plan = plan_backward(g, act, eps, P, warps, groups, precision=blocks.precision or "ieee",
                         stages=blocks.bwd_stages or 1, saved_mix=d is not None)
    order = block_order(D, x.ndim, planar)
    c = g.channels
    shapes = [jax.ShapeDtypeStruct((batch,) + tuple(x.shape[1:]), jnp.float32),
              jax.ShapeDtypeStruct((batch, groups, c * c), jnp.float32)]
    operands, in_orders = [x, w], [order, None]
    if aff is not None:
        operands.append(aff)
        in_orders.append(None)
    operands.append(gy)
    in_orders.append(order)
    if d is not None:
        # the kernel indexes d with the full batch (a cotangent vmapped over an unbatched
        # forward leaves d shared)
        operands.append(jnp.broadcast_to(d, (batch,) + tuple(d.shape[1:])))
        in_orders.append(order)
    gx, part = run_plan(plan, shapes, groups * batch, operands, in_orders=in_orders, out_orders=[order, None])
    sums = plan_partial_sums(batch, groups, c * c, prefix="vector_neuron_dw_sum")
    (gw,) = run_plan(sums, [jax.ShapeDtypeStruct((batch, c * c), jnp.float32)], sums.programs_per_batch * batch, [part])
    return gx, gw.reshape(batch, c, c)
