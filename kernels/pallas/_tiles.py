"""In-kernel helpers shared by the Pallas kernels: tile index arithmetic, gathers, stores, dots;
and the pallas_call launches that both algorithms (taps, factorised) make the same way.

Everything works on blocks flattened to 1-D (a free reshape of the native (c, *spatial, *tensor)
layout): a tile is gathered by offset, with masks for channels and pixels that do not exist and
offsets clamped so that nothing is read out of bounds. Triton needs power-of-two tile sides and
tensor-core dots of at least 16 in every dimension (kernels._fused.limits.dot_tile).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .._fused import dot_tile, next_pow2
from ._plan import Stencil

F32 = jnp.float32


def iota(n: int) -> jax.Array:
    return jnp.arange(n, dtype=jnp.int32)


def unravel(flat, shape: Sequence[int]) -> list:
    """Row-major coordinates of `flat` (array or scalar) in `shape`."""
    coords, stride = [], math.prod(shape)
    for n in shape:
        stride //= n
        coords.append(lax.rem(lax.div(flat, jnp.int32(stride)), jnp.int32(n)))
    return coords


def source_pixels(plan: Stencil, coords, tap, ok):
    """Flat source pixel of every destination pixel at filter tap `tap`, and whether it exists."""
    ys = unravel(tap, plan.taps)
    return shifted_source_pixels(
        plan, coords, [y * ax.dilation + ax.offset for y, ax in zip(ys, plan.axes)], ok
    )


def shifted_source_pixels(plan: Stencil, coords, shifts, ok):
    """Flat source pixel of every destination pixel moved by `shifts` (one per axis: a tap's
    displacement, traced or a Python int), wrapped on torus axes, and whether it exists."""
    flat, stride = jnp.int32(0), math.prod(plan.src_spatial)
    for x, shift, ax in zip(coords, shifts, plan.axes):
        stride //= ax.n_src
        s = x + shift
        if ax.wrap:
            s = lax.rem(s + ax.shift, jnp.int32(ax.n_src))
        else:
            ok = ok & (s >= 0) & (s < ax.n_src)
        flat = flat + s * stride
    return flat, ok


def source_reads(plan: Stencil, src_refs, coords, tap, pix_ok):
    """At filter tap `tap`: (component i, its (channel tile, pixels) tile, its uses) for every
    source component that some term reads, each loaded once."""
    src_pix, ok = source_pixels(plan, coords, tap, pix_ok)
    n_src = math.prod(plan.src_spatial)
    for a, (k, ch) in enumerate(plan.src):
        for i in range(plan.comps(k)):
            component_uses = uses(plan, a, i)
            if component_uses:
                yield i, load_pixels(src_refs[a], ch, plan.comps(k), i, n_src, src_pix, ok), component_uses


def load_pixels(ref, channels: int, n_comp: int, comp: int, n_pix: int, pix, ok):
    """(channel tile, pixels) of component `comp` of a flattened (c, pixels, comps) block; zero
    where the channel or the pixel does not exist (offsets clamped: nothing out of bounds)."""
    c = iota(dot_tile(channels))
    mask = (c < channels)[:, None] & ok[None, :]
    offs = c[:, None] * (n_pix * n_comp) + pix[None, :] * n_comp + comp
    return jnp.where(mask, ref[jnp.where(mask, offs, 0)], 0.0)


def store_pixels(ref, value, channels: int, n_comp: int, comp: int, n_pix: int, pix, ok):
    c = iota(dot_tile(channels))
    mask = (c < channels)[:, None] & ok[None, :]
    offs = c[:, None] * (n_pix * n_comp) + pix[None, :] * n_comp + comp
    # Masked lanes point one past the end: never touched on a GPU, dropped by interpret mode.
    offs = jnp.where(mask, offs, channels * n_pix * n_comp)
    pltriton.store(ref.at[offs], value.astype(ref.dtype), mask=mask)


def dot(a, b, mode: str, interpret: bool, contract_b: int = 0):
    """a @ b (or a @ b.T with contract_b=1) accumulated in fp32 at the precision mode."""
    dims = (((1,), (contract_b,)), ((), ()))
    if mode == "bf16":
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        precision = None
    elif mode == "fp32":
        # 3xTF32 on the GPU; exact fp32 on the CPU interpreter (which has no TF32).
        precision = lax.Precision.HIGHEST if interpret else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    else:
        precision = lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def uses(plan: Stencil, a: int, i: int):
    """(term index, term, destination component) of every filter block reading src a, comp i."""
    return [
        (t, term, j)
        for t, term in enumerate(plan.terms)
        if term.src == a
        for ii, j in term.blocks
        if ii == i
    ]


def coefficients(table_ref, plan: Stencil, term, tap, i: int, j: int):
    """table[tap, i, j, :] of a term, padded with zeros to a power of two: (F_pad,)."""
    n_i = plan.comps(plan.src[term.src][0])
    n_j = plan.comps(plan.dst[term.dst][0])
    base = term.table_offset + ((tap * n_i + i) * n_j + j) * term.n_filters
    f = iota(next_pow2(term.n_filters))
    ok = f < term.n_filters
    return jnp.where(ok, table_ref[jnp.where(ok, base + f, 0)], 0.0)


def weight_offsets(plan: Stencil, term):
    """Offsets and mask of the (F_pad, dst channel tile, src channel tile) weight tile."""
    d_ch, s_ch, F = plan.dst[term.dst][1], plan.src[term.src][1], term.n_filters
    f = iota(next_pow2(F))[:, None, None]
    o = iota(dot_tile(d_ch))[None, :, None]
    c = iota(dot_tile(s_ch))[None, None, :]
    mask = (f < F) & (o < d_ch) & (c < s_ch)
    if plan.weights_transposed:
        offs = c * (d_ch * F) + o * F + f
    else:
        offs = o * (s_ch * F) + c * F + f
    return offs, mask


def weight_offsets_shape(plan: Stencil, term) -> tuple[int, int, int]:
    return (
        next_pow2(term.n_filters),
        dot_tile(plan.dst[term.dst][1]),
        dot_tile(plan.src[term.src][1]),
    )


def load_weights(w_ref, plan: Stencil, term):
    offs, mask = weight_offsets(plan, term)
    return jnp.where(mask, w_ref[jnp.where(mask, offs, 0)], 0.0)


def filter_tile(weights, coef):
    """W[o, c] = sum_f coef[f] * w[f, o, c]: the basis expansion, on chip."""
    return jnp.sum(coef[:, None, None] * weights, axis=0)


def compiler_params(bs, interpret: bool, dw: bool):
    if interpret:
        return None
    return pltriton.CompilerParams(num_warps=bs.warps(dw), num_stages=bs.num_stages)


def block_shape(plan: Stencil, key, spatial) -> tuple[int, ...]:
    k, ch = key
    return (ch,) + tuple(spatial) + (plan.D,) * k


# ---- launches ----------------------------------------------------------------------------------
def launch_stencil(kernel, plan: Stencil, operands, *, block_p: int, bs, interpret: bool, poison: bool,
                   name: str):
    """pallas_call of a forward stencil `kernel` (given n_alias) over tiles of `block_p`
    destination pixels; returns the destination blocks in their native shapes."""
    n_dst = math.prod(plan.dst_spatial)
    out_shape = [jax.ShapeDtypeStruct((ch * n_dst * plan.comps(k),), F32) for k, ch in plan.dst]
    operands = list(operands)
    aliases = {}
    if poison:  # outputs start as NaN, to check that the kernel writes every element
        aliases = {len(operands) + n: n for n in range(len(out_shape))}
        operands += [jnp.full(s.shape, jnp.nan, F32) for s in out_shape]
    outs = pl.pallas_call(
        functools.partial(kernel, n_alias=len(aliases)),
        out_shape=out_shape,
        grid=(pl.cdiv(n_dst, block_p),),
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=compiler_params(bs, interpret, dw=False),
        name=name,
    )(*operands)
    return tuple(o.reshape(block_shape(plan, key, plan.dst_spatial)) for o, key in zip(outs, plan.dst))


def launch_weight_grad(kernel, plan: Stencil, operands, *, block_p: int, bs, interpret: bool, name: str):
    """pallas_call of a weight-gradient `kernel` (given n_programs): each program sums its share
    of the tiles of `block_p` pixels; the partial sums are added here. Returns dw per term, shaped
    (dst channels, src channels, F) like the layer's weights."""
    n_dst = math.prod(plan.dst_spatial)
    n_programs = max(1, min(bs.dw_programs, pl.cdiv(n_dst, block_p)))
    sizes = [(plan.dst[t.dst][1], plan.src[t.src][1], t.n_filters) for t in plan.terms]
    out_shape = [jax.ShapeDtypeStruct((n_programs * math.prod(s),), F32) for s in sizes]
    partials = pl.pallas_call(
        functools.partial(kernel, n_programs=n_programs),
        out_shape=out_shape,
        grid=(n_programs,),
        interpret=interpret,
        compiler_params=compiler_params(bs, interpret, dw=True),
        name=name,
    )(*operands)
    return tuple(p.reshape((n_programs,) + s).sum(axis=0) for p, s in zip(partials, sizes))
