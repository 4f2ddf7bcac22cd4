"""ConvContract as fused Pallas kernels: forward, input gradient and weight gradient.

Each direction is ONE `pallas_call` for all key pairs of the layer. A program owns a tile of
`block_p` destination pixels (flattened over the spatial axes) and every destination channel,
and loops over the filter taps. Per tap it reads each source block at the shifted pixels
(torus wrap or zero padding by index arithmetic: no padded copy), builds the filter tile of each
(i, j) component pair on chip from the learned weights and the static basis coefficients, and
accumulates `filter tile @ source tile` in fp32 ("taps" algorithm; the "factorised" one, the
default, which runs the sparse basis stencil first and the channel GEMM after, is in
factorised.py). Blocks
stay in their native layout (c, *spatial, *tensor): the kernels see them flattened (a free
reshape) and gather by offset.

    forward        out_b[o, x, j] += W[y, i, j][o, c] * X_a[c, x + y*r - pad, i]
    input grad     dX_a[c, x, i]  += W[y, i, j][o, c] * G_b[o, x - y*r + pad, j]
    weight grad    dw[o, c, f]    += B[f, y, i, j] * sum_x G_b[o, x, j] X_a[c, x + y*r - pad, i]

GPU lowering: Pallas' Triton lowering (`compiler_params=pltriton.CompilerParams`), supported on
jax 0.10 and (deprecated, still shipped) on jax 0.11; see bench/PALLAS_NOTES.md. On a CPU the
same kernels run in Pallas interpret mode. Batch with jax.vmap: pallas_call batches itself.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .._precision import resolve_precision
from .._spec import ConvSpec, check_operands
from . import _tiles as _t
from . import factorised as _fact
from .._fused import dot_tile, resolve_block_sizes, scatter_input_grads
from ._plan import Stencil, coverage, forward_plan, input_grad_keys, input_grad_plan, term_table
from ._tiling import ALGORITHMS, ALGORITHM_ENV, BlockSizes, taps_block_p, taps_weight_grad_block_p  # noqa: F401 (re-exported)

_F32 = jnp.float32


# ---- forward / input-gradient kernel ----------------------------------------------------------
def _stencil_kernel(*refs, plan: Stencil, block_p: int, mode: str, interpret: bool, n_alias: int,
                    hoist: bool):
    n_s, n_t = len(plan.src), len(plan.terms)
    src_refs, w_refs = refs[:n_s], refs[n_s : n_s + n_t]
    table_ref = refs[n_s + n_t]
    out_refs = refs[n_s + n_t + 1 + n_alias :]
    n_dst = math.prod(plan.dst_spatial)

    pix = pl.program_id(0) * block_p + _t.iota(block_p)
    pix_ok = pix < n_dst
    coords = _t.unravel(pix, plan.dst_spatial)
    slots = [(d, j) for d, (k, _) in enumerate(plan.dst) for j in range(plan.comps(k))]
    acc0 = tuple(jnp.zeros((dot_tile(plan.dst[d][1]), block_p), _F32) for d, _ in slots)

    def load_weights():
        return [_t.load_weights(w_refs[t], plan, term) for t, term in enumerate(plan.terms)]

    hoisted = load_weights() if hoist else None  # else reloaded per tap (from L1/L2)

    def tap_step(tap, accs):
        accs = list(accs)
        weights = hoisted if hoist else load_weights()
        for i, x, uses in _t.source_reads(plan, src_refs, coords, tap, pix_ok):
            for t, term, j in uses:
                w = _t.filter_tile(weights[t], _t.coefficients(table_ref, plan, term, tap, i, j))
                s = slots.index((term.dst, j))
                accs[s] = accs[s] + _t.dot(w, x, mode, interpret)
        return tuple(accs)

    accs = lax.fori_loop(0, plan.n_taps, tap_step, acc0)
    for (d, j), acc in zip(slots, accs):
        k, ch = plan.dst[d]
        _t.store_pixels(out_refs[d], acc, ch, plan.comps(k), j, n_dst, pix, pix_ok)


def _stencil_call(plan: Stencil, srcs, weights, *, mode, bs: BlockSizes, block_p, interpret,
                  poison: bool = False, name: str = "conv_contract"):
    """Launch the stencil kernel; returns the destination blocks in their native shapes."""
    block_p = taps_block_p(plan, block_p, bs.acc_budget)
    operands = [x.reshape(-1) for x in srcs] + [w.reshape(-1) for w in weights]
    operands.append(jnp.asarray(plan.table.array, _F32))
    n_weights = sum(math.prod(_t.weight_offsets_shape(plan, term)) for term in plan.terms)
    kernel = functools.partial(
        _stencil_kernel, plan=plan, block_p=block_p, mode=mode, interpret=interpret,
        hoist=n_weights <= bs.hoist_budget,
    )
    return _t.launch_stencil(
        kernel, plan, operands, block_p=block_p, bs=bs, interpret=interpret, poison=poison, name=name
    )


# ---- weight-gradient kernel -------------------------------------------------------------------
def _weight_grad_kernel(*refs, plan: Stencil, block_p: int, n_programs: int, mode: str,
                        interpret: bool):
    """Per program: partial dw[o, c, f] over its share of the pixel tiles (interleaved)."""
    n_s, n_d = len(plan.src), len(plan.dst)
    src_refs, grad_refs = refs[:n_s], refs[n_s : n_s + n_d]
    table_ref = refs[n_s + n_d]
    out_refs = refs[n_s + n_d + 1 :]
    n_dst = math.prod(plan.dst_spatial)
    n_steps = pl.cdiv(pl.cdiv(n_dst, block_p), n_programs)
    prog = pl.program_id(0)

    acc0 = tuple(_t.weight_offsets(plan, term)[0].shape for term in plan.terms)
    acc0 = tuple(jnp.zeros(shape, _F32) for shape in acc0)
    wanted = sorted({(term.dst, j) for term in plan.terms for _, j in term.blocks})

    def tile_step(step, accs):
        pix = (prog + step * n_programs) * block_p + _t.iota(block_p)
        pix_ok = pix < n_dst
        coords = _t.unravel(pix, plan.dst_spatial)
        grads = {}
        for d, j in wanted:
            k, ch = plan.dst[d]
            grads[(d, j)] = _t.load_pixels(grad_refs[d], ch, plan.comps(k), j, n_dst, pix, pix_ok)

        def tap_step(tap, accs):
            accs = list(accs)
            for i, x, uses in _t.source_reads(plan, src_refs, coords, tap, pix_ok):
                for t, term, j in uses:
                    m = _t.dot(grads[(term.dst, j)], x, mode, interpret, contract_b=1)
                    coef = _t.coefficients(table_ref, plan, term, tap, i, j)
                    accs[t] = accs[t] + coef[:, None, None] * m[None, :, :]
            return tuple(accs)

        return lax.fori_loop(0, plan.n_taps, tap_step, accs)

    accs = lax.fori_loop(0, n_steps, tile_step, acc0)
    for term, out_ref, acc in zip(plan.terms, out_refs, accs):
        offs, mask = _t.weight_offsets(plan, term)
        size = plan.dst[term.dst][1] * plan.src[term.src][1] * term.n_filters
        offs = jnp.where(mask, prog * size + offs, n_programs * size)
        pltriton.store(out_ref.at[offs], acc, mask=mask)


def _weight_grad_call(plan: Stencil, srcs, grads, *, mode, bs: BlockSizes, interpret):
    """dw per term, shaped (dst channels, src channels, F) like the layer's weights."""
    block_p = taps_weight_grad_block_p(plan, bs.block_p_dw)
    operands = [x.reshape(-1) for x in srcs] + [g.reshape(-1) for g in grads]
    operands.append(jnp.asarray(plan.table.array, _F32))
    kernel = functools.partial(_weight_grad_kernel, plan=plan, block_p=block_p, mode=mode, interpret=interpret)
    return _t.launch_weight_grad(
        kernel, plan, operands, block_p=block_p, bs=bs, interpret=interpret, name="conv_contract_dw"
    )


# ---- differentiable entry ---------------------------------------------------------------------
def _spatial(spec: ConvSpec, inputs) -> tuple[int, ...]:
    return tuple(inputs[0].shape[1 : 1 + spec.D])


def _launchers(bs: BlockSizes):
    """(stencil launcher, weight-gradient launcher) of the chosen algorithm."""
    if bs.algorithm == "factorised":
        return _fact.stencil_call, _fact.weight_grad_call
    return _stencil_call, _weight_grad_call


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _conv_contract(spec, mode, bs, interpret, inputs, weights):
    plan = forward_plan(spec, _spatial(spec, inputs))
    stencil, _ = _launchers(bs)
    return stencil(plan, inputs, weights, mode=mode, bs=bs, block_p=bs.block_p, interpret=interpret)


def _conv_contract_fwd(spec, mode, bs, interpret, inputs, weights):
    return _conv_contract(spec, mode, bs, interpret, inputs, weights), (inputs, weights)


def _conv_contract_bwd(spec, mode, bs, interpret, res, grads):
    inputs, weights = res
    spatial = _spatial(spec, inputs)
    grads = tuple(g.astype(_F32) for g in grads)
    stencil, weight_grad = _launchers(bs)
    dx = stencil(
        input_grad_plan(spec, spatial), grads, weights, mode=mode, bs=bs, block_p=bs.block_p_dx,
        interpret=interpret, name="conv_contract_dx",
    )
    dx = scatter_input_grads(input_grad_keys(spec), dx, inputs, _F32)
    dw = weight_grad(forward_plan(spec, spatial), inputs, grads, mode=mode, bs=bs, interpret=interpret)
    return dx, dw


_conv_contract.defvjp(_conv_contract_fwd, _conv_contract_bwd)


def default_interpret() -> bool:
    """Interpret mode unless JAX's default backend is a GPU."""
    return jax.default_backend() != "gpu"


def _check_dtypes(name: str, arrays) -> None:
    for n, x in enumerate(arrays):
        if jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"`{name}[{n}]` has dtype {jnp.dtype(x.dtype).name}; the Pallas kernels take float32")


def conv_contract_pallas(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    *,
    precision=None,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Optional[bool] = None,
) -> tuple[jax.Array, ...]:
    """One ConvContract on unbatched float32 blocks with the fused Pallas kernels.

    Args:
        spec: the layer (`kernels.make_spec`); must be inside `coverage` (else ValueError).
        inputs: per input key, (c_a, *spatial, *(D,)*k_a).
        weights: per pair, (o_b, c_a, n_filters).
        precision: None (JAX's default), "fp32", "tf32" or "bf16".
        block_sizes: tile sizes; None for the defaults.
        interpret: run in Pallas interpret mode; None = unless the default backend is a GPU.
    Returns: the output blocks in `spec.out_keys` order. Differentiable (custom_vjp), vmappable.
    """
    inputs, weights = tuple(inputs), tuple(weights)
    spatial = check_operands(spec, inputs, weights)
    _check_dtypes("inputs", inputs)
    _check_dtypes("weights", weights)
    ok, why = coverage(spec, spatial, None)
    if not ok:
        raise ValueError(f"`spec` is outside the Pallas kernels' coverage: {why}")
    mode = resolve_precision(precision)
    bs = resolve_block_sizes(block_sizes, BlockSizes, spec, spatial)
    interpret = default_interpret() if interpret is None else bool(interpret)
    return _conv_contract(spec, mode, bs, interpret, inputs, weights)


# ---- reference --------------------------------------------------------------------------------
def stencil_reference(plan: Stencil, srcs, weights) -> tuple[jax.Array, ...]:
    """The kernels' stencil contraction in plain jnp (fp32, highest precision), from the plan.

    Source pixels are computed with numpy over the whole destination grid, independently of the
    kernels' tile arithmetic; the tests use it to check the plans (input-gradient geometry).
    """
    import numpy as np

    D = plan.D
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in plan.dst_spatial], indexing="ij"), 0)
    outs = [
        jnp.zeros((ch,) + plan.dst_spatial + (plan.comps(k),), _F32) for k, ch in plan.dst
    ]
    flat_srcs = [x.reshape((x.shape[0], -1, plan.comps(k))) for x, (k, _) in zip(srcs, plan.src)]
    for tap in range(plan.n_taps):
        ys = np.unravel_index(tap, plan.taps)
        ok = np.ones(plan.dst_spatial, bool)
        coords = []
        for x, y, ax in zip(grid, ys, plan.axes):
            s = x + ax.dilation * y + ax.offset
            if ax.wrap:
                s = np.mod(s, ax.n_src)
            else:
                ok &= (s >= 0) & (s < ax.n_src)
            coords.append(np.clip(s, 0, ax.n_src - 1))
        src_pix = np.ravel_multi_index(coords, plan.src_spatial)
        for term, w in zip(plan.terms, weights):
            coef = jnp.asarray(term_table(plan, term)[tap], _F32)
            w = jnp.swapaxes(w, 0, 1) if plan.weights_transposed else w
            x = flat_srcs[term.src][:, src_pix.reshape(-1), :]  # (c, pixels, i)
            x = jnp.where(jnp.asarray(ok.reshape(1, -1, 1)), x, 0.0)
            contrib = jnp.einsum("ocf,ijf,cpi->opj", w, coef, x, precision=lax.Precision.HIGHEST)
            outs[term.dst] = outs[term.dst] + contrib.reshape(outs[term.dst].shape)
    return tuple(o.reshape((o.shape[0],) + plan.dst_spatial + (D,) * k) for o, (k, _) in zip(outs, plan.dst))


def conv_contract_reference(spec: ConvSpec, inputs, weights) -> tuple[jax.Array, ...]:
    """The forward pass through `stencil_reference`."""
    plan = forward_plan(spec, _spatial(spec, inputs))
    return stencil_reference(plan, [x.astype(_F32) for x in inputs], [w.astype(_F32) for w in weights])
