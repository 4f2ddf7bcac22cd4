"""In-kernel helpers shared by the Pallas kernels: tile index arithmetic, gathers, stores, dots.

Everything works on blocks flattened to 1-D (a free reshape of the native (c, *spatial, *tensor)
layout): a tile is gathered by offset, with masks for channels and pixels that do not exist and
offsets clamped so that nothing is read out of bounds. Triton needs power-of-two tile sides and
tensor-core dots of at least 16 in every dimension (`channel_tile`, `MIN_TILE` in _plan.py).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

from ._plan import Stencil, channel_tile, next_pow2

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
    flat, stride = jnp.int32(0), math.prod(plan.src_spatial)
    for x, y, ax in zip(coords, ys, plan.axes):
        stride //= ax.n_src
        s = x + y * (ax.sign * ax.dilation) + ax.offset
        if ax.wrap:
            s = lax.rem(s + ax.shift, jnp.int32(ax.n_src))
        else:
            ok = ok & (s >= 0) & (s < ax.n_src)
        flat = flat + s * stride
    return flat, ok


def load_pixels(ref, channels: int, n_comp: int, comp: int, n_pix: int, pix, ok):
    """(channel tile, pixels) of component `comp` of a flattened (c, pixels, comps) block; zero
    where the channel or the pixel does not exist (offsets clamped: nothing out of bounds)."""
    c = iota(channel_tile(channels))
    mask = (c < channels)[:, None] & ok[None, :]
    offs = c[:, None] * (n_pix * n_comp) + pix[None, :] * n_comp + comp
    return jnp.where(mask, ref[jnp.where(mask, offs, 0)], 0.0)


def store_pixels(ref, value, channels: int, n_comp: int, comp: int, n_pix: int, pix, ok):
    c = iota(channel_tile(channels))
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
    o = iota(channel_tile(d_ch))[None, :, None]
    c = iota(channel_tile(s_ch))[None, None, :]
    mask = (f < F) & (o < d_ch) & (c < s_ch)
    if plan.weights_transposed:
        offs = c * (d_ch * F) + o * F + f
    else:
        offs = o * (s_ch * F) + c * F + f
    return offs, mask


def weight_offsets_shape(plan: Stencil, term) -> tuple[int, int, int]:
    return (
        next_pow2(term.n_filters),
        channel_tile(plan.dst[term.dst][1]),
        channel_tile(plan.src[term.src][1]),
    )


def load_weights(w_ref, plan: Stencil, term):
    offs, mask = weight_offsets(plan, term)
    return jnp.where(mask, w_ref[jnp.where(mask, offs, 0)], 0.0)


def filter_tile(weights, coef):
    """W[o, c] = sum_f coef[f] * w[f, o, c]: the basis expansion, on chip."""
    return jnp.sum(coef[:, None, None] * weights, axis=0)


# (algorithm, weight-gradient kernel) -> warps: without a GPU to time on, the counts for which
# ptxas (sm_90a) reports no or few register spills on the bench layer (bench/PALLAS_NOTES.md).
DEFAULT_WARPS = {("taps", False): 8, ("taps", True): 4, ("factorised", False): 4, ("factorised", True): 8}


def compiler_params(bs, interpret: bool, dw: bool):
    if interpret:
        return None
    warps = bs.num_warps_dw if dw else bs.num_warps
    if warps is None:
        warps = DEFAULT_WARPS[(bs.algorithm, dw)]
    return pltriton.CompilerParams(num_warps=warps, num_stages=bs.num_stages)


def block_shape(plan: Stencil, key, spatial) -> tuple[int, ...]:
    k, ch = key
    return (ch,) + tuple(spatial) + (plan.D,) * k
