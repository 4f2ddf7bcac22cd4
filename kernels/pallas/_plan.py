"""Static plans for the Pallas kernels: what each launch computes, known before tracing.

All three launches (forward, input gradient, weight gradient) are one *stencil contraction*:
for every destination pixel x and filter tap y, read each source block at a shifted pixel
s(x, y) (torus wrap or zero padding by index arithmetic, per axis) and contract it with a filter
tile built on chip from the learned weights and the static basis:

    dst_b[o, x, j] += sum_{term (a -> b)} sum_{c, i} W_t[y, i, j][o, c] * src_a[c, s(x, y), i]
    W_t[y, i, j][o, c] = sum_f table_t[y, i, j, f] * w_t[o, c, f]

The forward pass uses the layer's pairs as they are. The input gradient is the forward of the
transposed layer (kernels._fused.transpose: keys swapped, bases flipped and transposed), whose
weights the kernels read transposed from the layer's own. Everything here is numpy or plain
Python: a `Stencil` is hashable and passed to the kernels as a static argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .._fused import axes, fused_coverage, int32_overflow, pair_basis
from .._fused import transpose_blocker, transposed_spec
from .._spec import ConvSpec, FilterBasis

MAX_CHANNELS = 64  # per key; wider layers need channel tiling (not implemented: falls back)
MAX_TENSOR_ORDER = 2


@dataclasses.dataclass(frozen=True)
class Axis:
    """Geometry of one spatial axis: source pixel s = x + y * dilation + offset.

    If `wrap`, s is taken modulo `n_src` (torus); otherwise s outside [0, n_src) reads zero.
    `shift` is a non-negative multiple of n_src that makes s + shift >= 0 before the modulo.
    """

    n_dst: int
    n_src: int
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
    """One launch: the forward of `spec` (the layer, or its transpose for the input gradient):
    source and destination blocks, terms, geometry and the coefficient table.

    src/dst: per block (tensor order k, channels); a block is (channels, *spatial, *(D,)*k).
    The table holds, per term, the array (taps, I_src, J_dst, F) flattened; `table` wraps it
    hashably (float64, cast at launch). Term weights are (dst channels, src channels, F), or
    (src channels, dst channels, F) when `weights_transposed` (the input-gradient pass).
    """

    spec: ConvSpec
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


# ---- coverage ---------------------------------------------------------------------------------
def coverage(spec: ConvSpec, spatial, dtype) -> tuple[bool, str]:
    """Whether the Pallas kernels compute this configuration, and if not, why."""
    if spec.D not in (2, 3):
        return False, f"D={spec.D}; the Pallas kernels cover D=2 and D=3"
    ok, why = fused_coverage(spec, spatial, dtype, (np.float32,), MAX_TENSOR_ORDER)
    if not ok:
        return False, why
    if any(c > MAX_CHANNELS for _, _, c in spec.in_keys + spec.out_keys):
        return False, f"more than {MAX_CHANNELS} channels in one key (no channel tiling yet)"
    # the input gradient is the forward of the transposed layer
    if why := transpose_blocker(spec):
        return False, why
    if spatial is not None and (why := int32_overflow(spec, spatial, "pallas", per_channel=False)):
        return False, why
    return True, "D 2/3, k<=2, stride 1, no lhs_dilation, float32"


# ---- plans ------------------------------------------------------------------------------------
def _blocks(table: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(i, j) component pairs whose coefficients are nonzero for some tap and filter."""
    used = np.any(table != 0, axis=(0, 3))
    return tuple((int(i), int(j)) for i, j in zip(*np.nonzero(used)))


def _terms_and_table(spec: ConvSpec):
    terms, chunks, offset = [], [], 0
    for t, pair in enumerate(spec.pairs):
        table = pair_basis(spec, t).transpose((1, 2, 3, 0))  # (F, taps, i, j) -> (taps, i, j, F)
        terms.append(Term(pair.in_index, pair.out_index, pair.basis.n_filters, offset, _blocks(table)))
        chunks.append(table.reshape(-1))
        offset += table.size
    return tuple(terms), FilterBasis(np.concatenate(chunks))


def _key_shapes(keys) -> tuple[tuple[int, int], ...]:
    return tuple((k, c) for k, _, c in keys)


@functools.lru_cache(maxsize=256)
def forward_plan(spec: ConvSpec, spatial: tuple[int, ...]) -> Stencil:
    """out_b[o, x, j] += W[y, i, j] . X_a[c, x + y*r - pad, i]  (wrap axes modulo n)."""
    plan_axes = []
    for ax in axes(spec, spatial):
        # coverage: a wrapped axis has no zeros, so the frame is the wrap's and the source
        # modulo n is exact once shifted non-negative
        shift = ax.n * (-(ax.offset // ax.n)) if ax.wrap and ax.offset < 0 else 0
        plan_axes.append(Axis(ax.n_out, ax.n, ax.offset, ax.dilation, ax.wrap, shift))
    terms, table = _terms_and_table(spec)
    return Stencil(
        spec, spec.D, spec.filter_shape, tuple(plan_axes), _key_shapes(spec.in_keys),
        _key_shapes(spec.out_keys), terms, table, weights_transposed=False,
    )


def input_grad_plan(spec: ConvSpec, spatial: tuple[int, ...]) -> Stencil:
    """The input gradient on inputs of `spatial` size: the forward plan of the transposed layer
    (`coverage` ensures there is one), reading the layer's weights transposed. Its destination
    blocks are the input keys some pair reads (`input_grad_keys`)."""
    spec_t, _ = transposed_spec(spec)
    plan = forward_plan(spec_t, spec.out_spatial(spatial))
    return dataclasses.replace(plan, weights_transposed=True)


def input_grad_keys(spec: ConvSpec) -> tuple[int, ...]:
    """The input keys the input-gradient plan produces, in its destination order."""
    return transposed_spec(spec)[1]


def term_table(plan: Stencil, term: Term) -> np.ndarray:
    """The term's coefficients, (taps, I_src, J_dst, F)."""
    n_i, n_j = plan.comps(plan.src[term.src][0]), plan.comps(plan.dst[term.dst][0])
    size = plan.n_taps * n_i * n_j * term.n_filters
    table = plan.table.array[term.table_offset : term.table_offset + size]
    return table.reshape(plan.n_taps, n_i, n_j, term.n_filters)
