"""The static plan of the parity-blocked convolution (`parity_conv.py`): channel classes, tap
combinations and the dots they make (the kernels' generated source: `_parity_source.py`).

The layer's dense filter W[tap, (c, i), (o, j)] (`kernels.dense.assemble_dense_filter`) is, per
axis, rewritten from the taps -r..r to the combinations

    x0 = tap 0,   s_g = (tap +g) + (tap -g),   d_g = (tap +g) - (tap -g)     (g = 1..r)

with weights W'[x0] = W[0], W'[s_g] = (W[+g] + W[-g]) / 2, W'[d_g] = (W[+g] - W[-g]) / 2, so that
sum_tap W[tap] X[p + tap] = sum_combo W'[combo] X_combo[p] exactly. The filters are invariant
under the reflections of the octahedral group, so every (input component, output component)
filter is even or odd along each axis: even under x -> -x when the two components carry an even
number of x indices between them (a pseudo-tensor key flips all three), odd otherwise. An odd
filter has no x0 or s term and an even one no d term, so W'[combo] is zero except where the
components' classes (their per-axis index parities, `component_class`) differ by exactly the
axes on which the combination takes a difference. For each input class and combination there is
one output class: the layer becomes one small GEMM per (input class, combination), 7.5x fewer
multiply-adds than the dense convolution of d3_n64_b2_c8_k2 (38,912 against 292,032 a pixel), on
the tensor cores. `unsupported` checks the structure on the layer's own bases.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Optional

import numpy as np

from .._fused import MIN_DOT_TILE, dot_tile
from .._fused.basis import pair_basis
from .._spec import ConvSpec

CHUNK = MIN_DOT_TILE  # input rows per dot: tl.dot's least K
MAX_OUT_WIDTH = 128  # accumulator columns a program keeps: BLOCK_X x 128 floats
STRUCTURE_TOL = 1e-6  # |W'| outside the parity blocks, relative to the basis' largest entry


def component_class(D: int, k: int, parity: int, comp: int) -> int:
    """Bit a set where the component's index tuple holds axis a an odd number of times (all
    bits flipped for a pseudo-tensor key)."""
    bits = 0
    for _ in range(k):
        bits ^= 1 << (comp % D)
        comp //= D
    return bits ^ ((1 << D) - 1) if parity % 2 else bits


def _classes_of(D: int, keys) -> tuple[tuple[int, ...], list[int]]:
    """Per dense channel (block by block, (c, i) within a block) its class; and the packed order:
    dense channel indices sorted by class (stable)."""
    cls = []
    for k, parity, c in keys:
        comps = [component_class(D, k, parity, i) for i in range(D**k)]
        cls += comps * c
    order = sorted(range(len(cls)), key=lambda n: cls[n])
    return tuple(cls), order


def combo_matrix(M: int) -> np.ndarray:
    """(M combos, M taps): rows x0, s_1, d_1, ..., s_r, d_r over taps -r..r."""
    r = M // 2
    T = np.zeros((M, M))
    T[0, r] = 1.0
    for g in range(1, r + 1):
        T[2 * g - 1, r + g] = T[2 * g - 1, r - g] = 0.5
        T[2 * g, r + g], T[2 * g, r - g] = 0.5, -0.5
    return T


def combo_odd(c: int) -> bool:
    """Whether per-axis combination c (0 = x0, 2g-1 = s_g, 2g = d_g) is a difference."""
    return c > 0 and c % 2 == 0


def combo_group(c: int) -> int:
    return (c + 1) // 2


def combo_q(combo: tuple[int, ...]) -> int:
    """The bits of the axes on which a per-axis combination tuple takes a difference: the class
    difference of the component pairs it connects."""
    return sum(1 << a for a, c in enumerate(combo) if combo_odd(c))


def paired_axes(groups: tuple[int, ...]) -> list[int]:
    """The axes a group tuple pairs (+-g taps): its loads' sign patterns run over these."""
    return [a for a, g in enumerate(groups) if g > 0]


@dataclasses.dataclass(frozen=True)
class ParityPlan:
    """Rows, classes and dots of one direction of the parity-blocked convolution.

    in_classes / out_classes: (class, first packed row, rows) of the operand read / written,
    classes with rows only, in packed order. chunks: (class, first row, rows <= CHUNK).
    dots: (chunk index, per-axis combination tuple, output class index), by chunk, then output
    class, then in `walk_combos` order; `dot_index` maps (chunk, combo) to its place. wraps: per
    axis, whether the operands are padded by wrapping (else by zeros; `wraps`)."""

    D: int
    M: int
    dilation: tuple[int, ...]
    wraps: tuple[bool, ...]
    in_classes: tuple[tuple[int, int, int], ...]
    out_classes: tuple[tuple[int, int, int], ...]
    chunks: tuple[tuple[int, int, int], ...]
    dots: tuple[tuple[int, tuple[int, ...], int], ...]

    @property
    def cin(self) -> int:
        return sum(w for _, _, w in self.in_classes)

    @property
    def cout(self) -> int:
        return sum(w for _, _, w in self.out_classes)

    @property
    def r(self) -> int:
        return self.M // 2

    def out_pad(self, b: int) -> int:
        """Accumulator columns of output class b: a power of two >= 16."""
        return dot_tile(self.out_classes[b][2])

    @property
    def max_out_pad(self) -> int:
        return max(self.out_pad(b) for b in range(len(self.out_classes)))

    def dot_index(self) -> dict:
        return {(ch, combo): n for n, (ch, combo, _) in enumerate(self.dots)}

    def transposed(self) -> "ParityPlan":
        """The input gradient's plan: the correlation with W[-tap]^T reads the output's classes."""
        return _build(self.D, self.M, self.dilation, self.wraps, self.out_classes, self.in_classes)

    def out_groups(self, max_width: int = MAX_OUT_WIDTH) -> tuple[tuple[int, ...], ...]:
        """Output classes split into runs of at most max_width accumulator columns (a class
        wider than that alone): one forward launch each."""
        groups, cur, width = [], [], 0
        for b in range(len(self.out_classes)):
            if cur and width + self.out_pad(b) > max_width:
                groups.append(tuple(cur))
                cur, width = [], 0
            cur.append(b)
            width += self.out_pad(b)
        groups.append(tuple(cur))
        return tuple(groups)


def _class_runs(cls: tuple[int, ...], order: list[int]) -> tuple[tuple[int, int, int], ...]:
    runs = []
    for row, n in enumerate(order):
        if runs and runs[-1][0] == cls[n]:
            runs[-1][2] += 1
        else:
            runs.append([cls[n], row, 1])
    return tuple(tuple(r) for r in runs)


def _build(D, M, dilation, wraps, in_classes, out_classes) -> ParityPlan:
    chunks = tuple((c, s + k, min(CHUNK, w - k)) for c, s, w in in_classes for k in range(0, w, CHUNK))
    by_class = {c: b for b, (c, _, _) in enumerate(out_classes)}
    dots = []
    for ch, (cls, _, _) in enumerate(chunks):
        reached = [(by_class[cls ^ combo_q(combo)], combo) for combo in walk_combos(D, M)
                   if cls ^ combo_q(combo) in by_class]
        # a chunk's dots into one output class consecutive: the forward concatenates their tiles
        dots += [(ch, combo, b) for b, combo in sorted(reached, key=lambda t: t[0])]
    return ParityPlan(D, M, tuple(dilation), tuple(wraps), tuple(in_classes), tuple(out_classes), chunks, tuple(dots))


def walk_combos(D: int, M: int) -> list[tuple[int, ...]]:
    """Every per-axis combination tuple, in the kernels' order: by group tuple, then as
    `_butterfly` leaves them."""
    out = []
    for groups in itertools.product(range(M // 2 + 1), repeat=D):
        out += group_combos(groups)
    return out


def group_combos(groups: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The combinations of one group tuple: per axis x0 (group 0) or s_g, d_g."""
    choices = [[0] if g == 0 else [2 * g - 1, 2 * g] for g in groups]
    return [tuple(c) for c in itertools.product(*choices)]


def wraps(spec: ConvSpec) -> tuple[bool, ...]:
    """Per axis, whether the layer pads it by wrapping (a torus axis under 'TORUS'); else by zeros."""
    return tuple(tuple(p) != (0, 0) for p in spec.torus_pad)


def unsupported(spec: ConvSpec, spatial: tuple[int, ...]) -> Optional[str]:
    """Why the parity-blocked form cannot run this layer (None: it can)."""
    D, M = spec.D, spec.filter_shape[0]
    if any(m != M for m in spec.filter_shape) or M % 2 == 0:
        return f"filter shape {spec.filter_shape}: needs one odd size on every axis"
    if any(s != 1 for s in spec.stride) or any(d != 1 for d in spec.lhs_dilation):
        return "stride or lhs_dilation other than 1"
    r = M // 2
    for a in range(D):
        half = r * spec.rhs_dilation[a]
        # wrapped or zeros, not both: a torus axis under padding='SAME' is zero-padded (wraps())
        pads = sorted((tuple(spec.torus_pad[a]), tuple(spec.zero_pad[a])))
        if pads != [(0, 0), (half, half)]:
            return f"axis {a}: padding other than SAME or TORUS ({half} cells a side)"
        if spatial[a] < half:
            return f"axis {a}: size {spatial[a]} below the filter's reach {half}"
    for (k, parity, _) in spec.in_keys + spec.out_keys:
        if parity not in (0, 1):
            return f"key parity {parity}"
    if _structure_error(spec) > STRUCTURE_TOL:
        return "the filter bases are not even or odd along each axis per component pair"
    return None


@functools.lru_cache(maxsize=256)
def _structure_error(spec: ConvSpec) -> float:
    """Largest |W'| outside the parity blocks over the pairs' bases, relative to each basis' largest."""
    D, M = spec.D, spec.filter_shape[0]
    T = combo_matrix(M)
    worst = 0.0
    for t, pair in enumerate(spec.pairs):
        k_a, p_a, _ = spec.in_keys[pair.in_index]
        k_b, p_b, _ = spec.out_keys[pair.out_index]
        B = pair_basis(spec, t).reshape((-1,) + (M,) * D + (D**k_a, D**k_b))
        scale = float(np.abs(B).max()) or 1.0
        for a in range(D):
            B = np.moveaxis(np.tensordot(T, np.moveaxis(B, a + 1, 0), axes=(1, 0)), 0, a + 1)
        ci = np.array([component_class(D, k_a, p_a, i) for i in range(D**k_a)])
        cj = np.array([component_class(D, k_b, p_b, j) for j in range(D**k_b)])
        for combo in itertools.product(range(M), repeat=D):
            off = (ci[:, None] ^ cj[None, :]) != combo_q(combo)
            if off.any():
                worst = max(worst, float(np.abs(B[(slice(None),) + combo][:, off]).max()) / scale)
    return worst


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """A layer's packed row orders (dense channel index of each packed row) and forward plan."""

    in_order: tuple[int, ...]
    out_order: tuple[int, ...]
    plan: ParityPlan


@functools.lru_cache(maxsize=256)
def packed_layer(spec: ConvSpec) -> PackedLayer:
    D, M = spec.D, spec.filter_shape[0]
    cls_in, order_in = _classes_of(D, spec.in_keys)
    cls_out, order_out = _classes_of(D, spec.out_keys)
    plan = _build(D, M, spec.rhs_dilation, wraps(spec), _class_runs(cls_in, order_in), _class_runs(cls_out, order_out))
    return PackedLayer(tuple(order_in), tuple(order_out), plan)
