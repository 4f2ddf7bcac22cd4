"""Static plans for the Pallas kernels: what each launch computes, known before tracing.

All three launches (forward, input gradient, weight gradient) are one *stencil contraction*:
for every destination pixel x and filter tap y, read each source block at a shifted pixel
s(x, y) (torus wrap or zero padding by index arithmetic, per axis) and contract it with a filter
tile built on chip from the learned weights and the static basis:

    dst_b[o, x, j] += sum_{term (a -> b)} sum_{c, i} W_t[y, i, j][o, c] * src_a[c, s(x, y), i]
    W_t[y, i, j][o, c] = sum_f table_t[y, i, j, f] * w_t[o, c, f]

The forward pass uses the layer's pairs as they are. The input gradient is the same contraction
from the output keys to the input keys with the basis transposed in its tensor indices, the
weights transposed in their channels and the tap offset negated. Everything here is numpy or
plain Python: a `Stencil` is hashable and passed to the kernels as a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import numpy as np

from .._spec import ConvSpec, FilterBasis, fused_coverage

# Channel tiles are padded to a power of two of at least this size: Triton's tensor-core dot needs
# every matrix dimension >= 16, and every Triton tensor dimension must be a power of two.
MIN_TILE = 16
MAX_CHANNELS = 64  # per key; wider layers need channel tiling (not implemented: falls back)
MAX_TENSOR_ORDER = 2


@dataclasses.dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis: source pixel s = x + sign * y * dilation + offset.

    If `wrap`, s is taken modulo `n_src` (torus); otherwise s outside [0, n_src) reads zero.
    `shift` is a non-negative multiple of n_src that makes s + shift >= 0 before the modulo.
    """

    n_dst: int
    n_src: int
    sign: int
    offset: int
    dilation: int
    wrap: bool
    shift: int


@dataclasses.dataclass(frozen=True)
class Term:
    """One (source key -> destination key) term; its coefficients sit in the flat table."""

    src: int
    dst: int
    n_filters: int
    table_offset: int
    blocks: tuple[tuple[int, int], ...]  # (source component i, destination component j) in use


@dataclasses.dataclass(frozen=True)
class Stencil:
    """One launch: source and destination blocks, terms, geometry and the coefficient table.

    src/dst: per block (tensor order k, channels); a block is (channels, *spatial, *(D,)*k).
    The table holds, per term, the array (taps, I_src, J_dst, F) flattened; `table` wraps it
    hashably (float64, cast at launch). Term weights are (dst channels, src channels, F), or
    (src channels, dst channels, F) when `weights_transposed` (the input-gradient pass).
    """

    D: int
    taps: tuple[int, ...]
    axes: tuple[Axis, ...]
    src: tuple[tuple[int, int], ...]
    dst: tuple[tuple[int, int], ...]
    terms: tuple[Term, ...]
    table: FilterBasis
    weights_transposed: bool

    def comps(self, k: int) -> int:
        return self.D**k

    @property
    def n_taps(self) -> int:
        return math.prod(self.taps)

    @property
    def src_spatial(self) -> tuple[int, ...]:
        return tuple(ax.n_src for ax in self.axes)

    @property
    def dst_spatial(self) -> tuple[int, ...]:
        return tuple(ax.n_dst for ax in self.axes)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def channel_tile(channels: int) -> int:
    return max(MIN_TILE, next_pow2(channels))


# ---- coverage ---------------------------------------------------------------------------------
def coverage(spec: ConvSpec, spatial, dtype) -> tuple[bool, str]:
    """Whether the Pallas kernels compute this configuration, and if not, why."""
    if spec.D not in (2, 3):
        return False, f"D={spec.D}; the Pallas kernels cover D=2 and D=3"
    ok, why = fused_coverage(spec, spatial, dtype, (np.float32,), MAX_TENSOR_ORDER)
    if not ok:
        return False, why
    keys = spec.in_keys + spec.out_keys
    if any(c > MAX_CHANNELS for _, _, c in keys):
        return False, f"more than {MAX_CHANNELS} channels in one key (no channel tiling yet)"
    for ax, (tp, zp, m, r) in enumerate(zip(spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation)):
        if any(tp) and any(zp):
            return False, f"axis {ax} both wraps and zero-pads"
        if any(tp) and tp[0] + tp[1] != (m - 1) * r:
            return False, f"axis {ax} wraps by {tp}, not the {(m - 1) * r} cells that keep its size"
    if spatial is not None:
        n_pix = math.prod(spatial)
        widest = max(c * spec.D**k for k, _, c in keys)
        if n_pix * widest >= 2**31:
            return False, "a block has 2^31 or more elements (32-bit offsets)"
    return True, "D 2/3, k<=2, stride 1, no lhs_dilation, float32"


# ---- plans ------------------------------------------------------------------------------------
def _blocks(table: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(i, j) component pairs whose coefficients are nonzero for some tap and filter."""
    used = np.any(table != 0, axis=(0, 3))
    return tuple((int(i), int(j)) for i, j in zip(*np.nonzero(used)))


def _terms_and_table(spec: ConvSpec, transpose: bool):
    D, n_taps = spec.D, spec.taps
    terms, chunks, offset = [], [], 0
    for pair in spec.pairs:
        k_a = spec.in_keys[pair.in_index][0]
        k_b = spec.out_keys[pair.out_index][0]
        basis = pair.basis.array.reshape((pair.basis.n_filters, n_taps, D**k_a, D**k_b))
        # (F, taps, i, j) -> (taps, i, j, F); transposed: (taps, j, i, F)
        table = basis.transpose((1, 3, 2, 0) if transpose else (1, 2, 3, 0))
        src, dst = (pair.out_index, pair.in_index) if transpose else (pair.in_index, pair.out_index)
        terms.append(Term(src, dst, pair.basis.n_filters, offset, _blocks(table)))
        chunks.append(table.reshape(-1))
        offset += table.size
    return tuple(terms), FilterBasis(np.concatenate(chunks))


def _key_shapes(keys) -> tuple[tuple[int, int], ...]:
    return tuple((k, c) for k, _, c in keys)


@functools.lru_cache(maxsize=256)
def forward_plan(spec: ConvSpec, spatial: tuple[int, ...]) -> Stencil:
    """out_b[o, x, j] += W[y, i, j] . X_a[c, x + y*r - pad, i]  (wrap axes modulo n)."""
    out_spatial = spec.out_spatial(spatial)
    axes = []
    for n, n_out, tp, zp, m, r in zip(
        spatial, out_spatial, spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation
    ):
        wrap = bool(any(tp))
        offset = -tp[0] if wrap else -zp[0]
        shift = n * (-(offset // n)) if wrap and offset < 0 else 0
        axes.append(Axis(n_out, n, +1, offset, r, wrap, shift))
    terms, table = _terms_and_table(spec, transpose=False)
    return Stencil(
        spec.D, spec.filter_shape, tuple(axes), _key_shapes(spec.in_keys),
        _key_shapes(spec.out_keys), terms, table, weights_transposed=False,
    )


@functools.lru_cache(maxsize=256)
def input_grad_plan(spec: ConvSpec, spatial: tuple[int, ...]) -> Stencil:
    """dX_a[c, x, i] += W[y, i, j]^T . G_b[o, x - y*r + pad, j]  (needs stride 1, no lhs_dilation).

    On a wrap axis the forward pass keeps the size (coverage checks it), so every input pixel has
    exactly one output pixel per tap: (x - y*r + lo) mod n. On a zero-padded axis the output pixel
    x - y*r + lo exists only inside [0, n_out).
    """
    out_spatial = spec.out_spatial(spatial)
    axes = []
    for n, n_out, tp, zp, m, r in zip(
        spatial, out_spatial, spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation
    ):
        wrap = bool(any(tp))
        offset = tp[0] if wrap else zp[0]
        lowest = offset - (m - 1) * r
        shift = n_out * (-(lowest // n_out)) if wrap and lowest < 0 else 0
        axes.append(Axis(n, n_out, -1, offset, r, wrap, shift))
    terms, table = _terms_and_table(spec, transpose=True)
    return Stencil(
        spec.D, spec.filter_shape, tuple(axes), _key_shapes(spec.out_keys),
        _key_shapes(spec.in_keys), terms, table, weights_transposed=True,
    )


def default_block_p(plan: Stencil, requested: Optional[int], budget: int) -> int:
    """Pixels per program: the request, or the largest power of two (16..128) whose fp32
    accumulators (sum over destination blocks of channel tile x components x pixels) fit `budget`."""
    n_dst = math.prod(plan.dst_spatial)
    if requested is not None:
        return requested
    rows = sum(channel_tile(c) * plan.comps(k) for k, c in plan.dst)
    bp = 128
    while bp > MIN_TILE and rows * bp > budget:
        bp //= 2
    return max(MIN_TILE, min(bp, next_pow2(n_dst)))


def term_table(plan: Stencil, term: Term) -> np.ndarray:
    """The term's coefficients, (taps, I_src, J_dst, F)."""
    n_i, n_j = plan.comps(plan.src[term.src][0]), plan.comps(plan.dst[term.dst][0])
    size = plan.n_taps * n_i * n_j * term.n_filters
    table = plan.table.array[term.table_offset : term.table_offset + size]
    return table.reshape(plan.n_taps, n_i, n_j, term.n_filters)


def factorised_block_p(plan: Stencil, requested: Optional[int], budget: int) -> int:
    """Pixels per program of the factorised kernels: the request, or the largest power of two
    (16..128) for which the on-chip Z tiles (every nonzero (term, f, j): a source channel tile)
    and the accumulators fit `budget` fp32 elements."""
    if requested is not None:
        return requested
    rows = sum(channel_tile(c) * plan.comps(k) for k, c in plan.dst)
    for term in plan.terms:
        used = np.any(term_table(plan, term) != 0, axis=(0, 1))  # (J, F)
        rows += int(used.sum()) * channel_tile(plan.src[term.src][1])
    bp = 128
    while bp > MIN_TILE and rows * bp > budget:
        bp //= 2
    return max(MIN_TILE, min(bp, next_pow2(math.prod(plan.dst_spatial))))
