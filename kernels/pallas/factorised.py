"""The factorised Pallas kernels: the sparse static basis stencil first, then a channel GEMM.

    Z[(term, f, j)][c, x] = sum over the basis NONZEROS (y, i) of B[f, y, i, j] * src[c, s(x, y), i]
    dst[o, x, j]         += sum_(term, f) w[f][o, c] @ Z[(term, f, j)][c, x]
    dw[f][o, c]          += G[o, x, j] @ Z[(term, f, j)][c, x]^T          (Z recomputed)

The basis is static, so the stencil is unrolled at trace time over its nonzeros only (the
invariant filters are sparse, their coefficients mostly +-1): plain FMAs on tiles, tap by tap,
each source tile loaded once per tap and used by every (term, f, j) that needs it. The Z tiles
stay on chip; the GEMM runs on tensor cores. Fewer FLOPs than the per-tap dense filter build of
conv_contract.py for wide layers (docs/ARCHITECTURE.md, "Ways to evaluate it"). The
backend's default algorithm (`BlockSizes().algorithm`); BlockSizes(algorithm="taps") or
$GINJAX_PALLAS_ALGORITHM=taps selects the tap kernels instead. Same operands, outputs and
geometry as the tap kernels.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import _tiles as _t
from .._fused import dot_tile, nonzeros_by_read
from ._plan import Stencil
from ._tiling import factorised_block_p

F32 = jnp.float32


# ---- static structure -------------------------------------------------------------------------
def _tap_uses(plan: Stencil):
    """Per tap: [(src a, component i, its nonzeros), ...]: the basis nonzeros
    (kernels._fused.basis) grouped by the source tile they read; a nonzero's pair is its term."""
    out = [[] for _ in range(plan.n_taps)]
    for (a, tap, i), nonzeros in nonzeros_by_read(plan.spec).items():
        out[tap].append((a, i, nonzeros))
    return out


def _static_source_pixels(plan: Stencil, coords, tap: int, ok):
    """_t.source_pixels at a tap known when tracing: its displacement folds to a constant."""
    ys = np.unravel_index(tap, plan.taps)
    shifts = [int(ax.dilation * y + ax.offset) for y, ax in zip(ys, plan.axes)]
    return _t.shifted_source_pixels(plan, coords, shifts, ok)


def _accumulate_z(plan: Stencil, src_refs, coords, pix_ok, uses):
    """Z tiles {(term, f, j): (src channel tile, pixels)} by the unrolled sparse stencil."""
    n_src = math.prod(plan.src_spatial)
    z = {}
    for tap, reads in enumerate(uses):
        if not reads:
            continue
        src_pix, ok = _static_source_pixels(plan, coords, tap, pix_ok)
        for a, i, nonzeros in reads:
            k, ch = plan.src[a]
            x = _t.load_pixels(src_refs[a], ch, plan.comps(k), i, n_src, src_pix, ok)
            for nz in nonzeros:
                coef = nz.value
                term_x = x if coef == 1.0 else (-x if coef == -1.0 else x * coef)
                key = (nz.pair, nz.f, nz.j)
                z[key] = term_x if key not in z else z[key] + term_x
    return z


def _weight_tile(w_ref, plan: Stencil, term, f: int):
    """w[f] as a (dst channel tile, src channel tile) matrix (transposed for the dX pass)."""
    d_ch, s_ch, F = plan.dst[term.dst][1], plan.src[term.src][1], term.n_filters
    o, c = _t.iota(dot_tile(d_ch))[:, None], _t.iota(dot_tile(s_ch))[None, :]
    mask = (o < d_ch) & (c < s_ch)
    offs = (c * (d_ch * F) + o * F + f) if plan.weights_transposed else (o * (s_ch * F) + c * F + f)
    return jnp.where(mask, w_ref[jnp.where(mask, offs, 0)], 0.0)


# ---- forward / input-gradient kernel ----------------------------------------------------------
def _stencil_kernel(*refs, plan: Stencil, block_p: int, mode: str, interpret: bool, n_alias: int):
    n_s, n_t = len(plan.src), len(plan.terms)
    src_refs, w_refs = refs[:n_s], refs[n_s : n_s + n_t]
    out_refs = refs[n_s + n_t + n_alias :]
    n_dst = math.prod(plan.dst_spatial)

    pix = pl.program_id(0) * block_p + _t.iota(block_p)
    pix_ok = pix < n_dst
    coords = _t.unravel(pix, plan.dst_spatial)
    z = _accumulate_z(plan, src_refs, coords, pix_ok, _tap_uses(plan))

    for d, (k, ch) in enumerate(plan.dst):
        for j in range(plan.comps(k)):
            acc = jnp.zeros((dot_tile(ch), block_p), F32)
            for (t, f, jj), tile in sorted(z.items()):
                if jj == j and plan.terms[t].dst == d:
                    w = _weight_tile(w_refs[t], plan, plan.terms[t], f)
                    acc = acc + _t.dot(w, tile, mode, interpret)
            _t.store_pixels(out_refs[d], acc, ch, plan.comps(k), j, n_dst, pix, pix_ok)


def stencil_call(plan: Stencil, srcs, weights, *, mode, bs, block_p, interpret, poison=False,
                 name="conv_contract"):
    """Launch the factorised stencil kernel; returns the destination blocks, native shapes."""
    block_p = factorised_block_p(plan, block_p, bs.z_budget)
    operands = [x.reshape(-1) for x in srcs] + [w.reshape(-1) for w in weights]
    kernel = functools.partial(_stencil_kernel, plan=plan, block_p=block_p, mode=mode, interpret=interpret)
    return _t.launch_stencil(
        kernel, plan, operands, block_p=block_p, bs=bs, interpret=interpret, poison=poison,
        name=name + "_factorised",
    )


# ---- weight-gradient kernel -------------------------------------------------------------------
def _weight_grad_kernel(*refs, plan: Stencil, block_p: int, n_programs: int, mode: str, interpret: bool):
    """Per program: partial dw[f][o, c] over its share of the pixel tiles (interleaved), with the
    Z tiles of each pixel tile recomputed as in the forward kernel."""
    n_s, n_d = len(plan.src), len(plan.dst)
    src_refs, grad_refs = refs[:n_s], refs[n_s : n_s + n_d]
    out_refs = refs[n_s + n_d :]
    n_dst = math.prod(plan.dst_spatial)
    n_steps = pl.cdiv(pl.cdiv(n_dst, block_p), n_programs)
    prog = pl.program_id(0)
    uses = _tap_uses(plan)
    keys = [(t, f) for t, term in enumerate(plan.terms) for f in range(term.n_filters)]
    acc0 = tuple(
        jnp.zeros((dot_tile(plan.dst[plan.terms[t].dst][1]), dot_tile(plan.src[plan.terms[t].src][1])), F32)
        for t, _ in keys
    )

    def tile_step(step, accs):
        accs = list(accs)
        pix = (prog + step * n_programs) * block_p + _t.iota(block_p)
        pix_ok = pix < n_dst
        coords = _t.unravel(pix, plan.dst_spatial)
        z = _accumulate_z(plan, src_refs, coords, pix_ok, uses)
        for d, (k, ch) in enumerate(plan.dst):
            for j in range(plan.comps(k)):
                g = None
                for (t, f, jj), tile in sorted(z.items()):
                    if jj != j or plan.terms[t].dst != d:
                        continue
                    if g is None:
                        g = _t.load_pixels(grad_refs[d], ch, plan.comps(k), j, n_dst, pix, pix_ok)
                    n = keys.index((t, f))
                    accs[n] = accs[n] + _t.dot(g, tile, mode, interpret, contract_b=1)
        return tuple(accs)

    accs = lax.fori_loop(0, n_steps, tile_step, acc0)
    for (t, f), acc in zip(keys, accs):
        term = plan.terms[t]
        d_ch, s_ch, F = plan.dst[term.dst][1], plan.src[term.src][1], term.n_filters
        o, c = _t.iota(acc.shape[0])[:, None], _t.iota(acc.shape[1])[None, :]
        mask = (o < d_ch) & (c < s_ch)
        offs = jnp.where(mask, prog * (d_ch * s_ch * F) + o * (s_ch * F) + c * F + f, n_programs * d_ch * s_ch * F)
        pltriton.store(out_refs[t].at[offs], acc, mask=mask)


def weight_grad_call(plan: Stencil, srcs, grads, *, mode, bs, interpret):
    """dw per term, shaped (dst channels, src channels, F) like the layer's weights."""
    block_p = factorised_block_p(plan, bs.block_p_dw, bs.acc_budget)
    operands = [x.reshape(-1) for x in srcs] + [g.reshape(-1) for g in grads]
    kernel = functools.partial(_weight_grad_kernel, plan=plan, block_p=block_p, mode=mode, interpret=interpret)
    return _t.launch_weight_grad(
        kernel, plan, operands, block_p=block_p, bs=bs, interpret=interpret, name="conv_contract_dw_factorised"
    )
