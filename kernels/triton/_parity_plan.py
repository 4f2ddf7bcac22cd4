"""The static plan of the parity-blocked convolution (`parity_conv.py`): channel classes, tap
combinations, the GEMM blocks they make, and the generated Triton source of its kernels.

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
axes on which the combination takes a difference: 7.5x fewer multiply-adds than the dense
convolution of d3_n64_b2_c8_k2 (38,912 against 292,032 a pixel). `unsupported` checks the
structure on the layer's own bases.

The GEMMs are grouped into blocks, one per (group tuple, output class): a group tuple picks per
axis tap 0 (group 0) or the pair +-g (group g), and its combinations are the x0 / s_g / d_g of
those. Output class P takes from input class P' the combination that takes differences on the
axes where P and P' differ (which must be among the tuple's paired axes): one GEMM with K = the
rows of every such input class. The forward builds that A tile from 2^k shifted loads of those
rows (k paired axes), each added with a per-row sign (`_block_a`), and runs one tl.dot per block:
56 dots of K <= 128 a pixel tile on the k2 layer instead of 216 of K = 16.
The kernels read packed operands: (batch, rows, *spatial), rows ordered by class (`ParityPlan`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import numpy as np

from .._fused.basis import pair_basis
from .._spec import ConvSpec
from ._tiling import KernelPlan

INT32_MAX = 2**31 - 1
MAX_OUT_WIDTH = 128  # accumulator columns a forward program keeps: BLOCK_X x 128 floats
STRUCTURE_TOL = 1e-6  # |W'| outside the parity blocks, relative to the basis' largest entry


def _pow2(n: int) -> int:
    """The tile size for n rows or columns: a power of two >= 16 (tl.dot's least)."""
    return max(16, 1 << (n - 1).bit_length())


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


def _paired(groups: tuple[int, ...]) -> int:
    """The bits of the axes a group tuple pairs (+-g)."""
    return sum(1 << a for a, g in enumerate(groups) if g > 0)


def block_combo(groups: tuple[int, ...], q: int) -> tuple[int, ...]:
    """Per-axis combination of a group tuple for class difference q: x0, else d_g where q has the
    axis, s_g where not."""
    return tuple(0 if g == 0 else (2 * g if q >> a & 1 else 2 * g - 1) for a, g in enumerate(groups))


@dataclasses.dataclass(frozen=True)
class ParityPlan:
    """Rows, classes and GEMM blocks of one direction of the parity-blocked convolution.

    in_classes / out_classes: (class, first packed row, rows) of the operand read / written,
    classes with rows only, in packed order. blocks: (group tuple, output class index, input
    class indices), the A tile's rows being those input classes' rows in that order."""

    D: int
    M: int
    dilation: tuple[int, ...]
    torus: tuple[bool, ...]
    in_classes: tuple[tuple[int, int, int], ...]
    out_classes: tuple[tuple[int, int, int], ...]
    blocks: tuple[tuple[tuple[int, ...], int, tuple[int, ...]], ...]

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
        """Accumulator columns of output class b."""
        return _pow2(self.out_classes[b][2])

    @property
    def max_out_pad(self) -> int:
        return max(self.out_pad(b) for b in range(len(self.out_classes)))

    def k_rows(self, n: int) -> int:
        return sum(self.in_classes[a][2] for a in self.blocks[n][2])

    def k_pad(self, n: int) -> int:
        return _pow2(self.k_rows(n))

    @property
    def k_max(self) -> int:
        return max(self.k_pad(n) for n in range(len(self.blocks)))

    def block_rows(self, n: int) -> list[tuple[int, int]]:
        """(packed input row, class difference q) of each A row of block n."""
        groups, b, members = self.blocks[n]
        out_cls = self.out_classes[b][0]
        rows = []
        for a in members:
            cls, start, width = self.in_classes[a]
            rows += [(start + i, cls ^ out_cls) for i in range(width)]
        return rows

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """(blocks, k_max) int32: each A row's packed input row (-1 past the block's rows) and
        its class difference q (the signs of its shifted loads)."""
        rows = np.full((len(self.blocks), self.k_max), -1, np.int32)
        qs = np.zeros((len(self.blocks), self.k_max), np.int32)
        for n in range(len(self.blocks)):
            for i, (row, q) in enumerate(self.block_rows(n)):
                rows[n, i], qs[n, i] = row, q
        return rows, qs

    def macs(self) -> int:
        """Multiply-adds a pixel (the blocks' unpadded rows x columns)."""
        return sum(self.k_rows(n) * self.out_classes[b][2] for n, (_, b, _) in enumerate(self.blocks))

    def transposed(self) -> "ParityPlan":
        """The input gradient's plan: the correlation with W[-tap]^T reads the output's classes."""
        return _build(self.D, self.M, self.dilation, self.torus, self.out_classes, self.in_classes)

    def out_groups(self) -> tuple[tuple[int, ...], ...]:
        """Output classes split into runs of at most MAX_OUT_WIDTH accumulator columns: one
        forward launch each."""
        groups, cur, width = [], [], 0
        for b in range(len(self.out_classes)):
            if cur and width + self.out_pad(b) > MAX_OUT_WIDTH:
                groups.append(tuple(cur))
                cur, width = [], 0
            cur.append(b)
            width += self.out_pad(b)
        groups.append(tuple(cur))
        return tuple(groups)

    def tuples(self) -> list[tuple[int, ...]]:
        """The group tuples with a block, in block order."""
        return list(dict.fromkeys(g for g, _, _ in self.blocks))


def _class_runs(cls: tuple[int, ...], order: list[int]) -> tuple[tuple[int, int, int], ...]:
    runs = []
    for row, n in enumerate(order):
        if runs and runs[-1][0] == cls[n]:
            runs[-1][2] += 1
        else:
            runs.append([cls[n], row, 1])
    return tuple(tuple(r) for r in runs)


def _build(D, M, dilation, torus, in_classes, out_classes) -> ParityPlan:
    blocks = []
    for groups in itertools.product(range(M // 2 + 1), repeat=D):
        paired = _paired(groups)
        for b, (out_cls, _, _) in enumerate(out_classes):
            members = tuple(a for a, (cls, _, _) in enumerate(in_classes) if (cls ^ out_cls) & ~paired == 0)
            if members:
                blocks.append((groups, b, members))
    return ParityPlan(D, M, tuple(dilation), tuple(torus), tuple(in_classes), tuple(out_classes), tuple(blocks))


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
        pads = (spec.torus_pad[a], spec.zero_pad[a]) if spec.is_torus[a] else (spec.zero_pad[a], spec.torus_pad[a])
        if tuple(pads[0]) != (half, half) or tuple(pads[1]) != (0, 0):
            return f"axis {a}: padding other than SAME ({half} cells a side)"
        if spatial[a] < half or (spec.is_torus[a] and spatial[a] < half):
            return f"axis {a}: size {spatial[a]} below the filter's reach {half}"
    for (k, parity, _) in spec.in_keys + spec.out_keys:
        if parity not in (0, 1):
            return f"key parity {parity}"
    if _structure_error(spec) > STRUCTURE_TOL:
        return "the filter bases are not even or odd along each axis per component pair"
    return None


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
            q = sum(1 << a for a, c in enumerate(combo) if combo_odd(c))
            off = (ci[:, None] ^ cj[None, :]) != q
            if off.any():
                worst = max(worst, float(np.abs(B[(slice(None),) + combo][:, off]).max()) / scale)
    return worst


@dataclasses.dataclass(frozen=True)
class PackedLayer:
    """A layer's packed row orders (dense channel index of each packed row) and forward plan."""

    in_order: tuple[int, ...]
    out_order: tuple[int, ...]
    plan: ParityPlan


def packed_layer(spec: ConvSpec) -> PackedLayer:
    D, M = spec.D, spec.filter_shape[0]
    cls_in, order_in = _classes_of(D, spec.in_keys)
    cls_out, order_out = _classes_of(D, spec.out_keys)
    plan = _build(D, M, spec.rhs_dilation, spec.is_torus, _class_runs(cls_in, order_in), _class_runs(cls_out, order_out))
    return PackedLayer(tuple(order_in), tuple(order_out), plan)


# ---- generated source ---------------------------------------------------------------------------------
def _name(o: int) -> str:
    return f"m{-o}" if o < 0 else f"p{o}"


class _Source:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str, depth: int = 1) -> None:
        self.lines.append("    " * depth + line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _axis_offsets(plan: ParityPlan) -> list[list[int]]:
    return [[g * plan.dilation[a] * s for g in range(plan.r + 1) for s in ((1,) if g == 0 else (-1, 1))]
            for a in range(plan.D)]


def _coordinates(e: _Source, plan: ParityPlan, spatial, depth: int, masked_x: bool) -> None:
    """Shifted coordinates of the program's pixels: leading axes `c{a}_{o}` (scalars, wrapped or
    with validity `v{a}_{o}`), the x axis `xo_{o}` (vectors, with `xm_{o}` where masked)."""
    for a, offsets in enumerate(_axis_offsets(plan)[:-1]):
        n = spatial[a]
        for o in offsets:
            nm = f"c{a}_{_name(o)}"
            if o == 0:
                e(f"{nm} = c{a}", depth)
            elif plan.torus[a]:
                e(f"{nm} = (c{a} + {o + n}) % {n}", depth)
            else:
                e(f"{nm} = c{a} + {o}", depth)
                # a vector: the interpreter rejects a scalar validity and-ed into a vector mask
                e(f"v{a}_{_name(o)} = (xs * 0 + {nm} >= 0) & (xs * 0 + {nm} < {n})", depth)
    n, h = spatial[-1], halo(plan)
    for o in _axis_offsets(plan)[-1]:  # the packed input carries h halo cells a side along x
        e(f"xo_{_name(o)} = xs + {o + h}", depth)
        if masked_x:
            e(f"xm_{_name(o)} = xs < {n}", depth)


def halo(plan: ParityPlan) -> int:
    """Cells the packed input carries on each side of the x axis (wrapped or zero), so that every
    shifted x load is a contiguous run: Triton then coalesces it along x (a wrap or a mask on x
    hid the contiguity and it laid the tile out along the rows, one cache line a lane)."""
    return plan.r * plan.dilation[-1]


def in_spatial(plan: ParityPlan, spatial) -> tuple[int, ...]:
    """The packed input's spatial shape: the x axis with its halo."""
    return tuple(spatial[:-1]) + (spatial[-1] + 2 * halo(plan),)


def _tap_load(plan: ParityPlan, spatial, base: str, rows: str, offs: tuple[int, ...], rmask: Optional[str],
              masked_x: bool) -> str:
    """A [BLOCK_X, rows] tile of `base` at the shifted pixel `offs` (one offset per axis)."""
    D = plan.D
    padded = in_spatial(plan, spatial)
    strides = [math.prod(padded[a + 1:]) for a in range(D)]
    lead = " + ".join(f"c{a}_{_name(o)} * {strides[a]}" for a, o in enumerate(offs[:-1])) or "0"
    xo = _name(offs[-1])
    masks = [f"v{a}_{_name(o)}" for a, o in enumerate(offs[:-1]) if o != 0 and not plan.torus[a]]
    if masked_x:
        masks.append(f"xm_{xo}")
    mask_terms = []
    if masks:  # a vector mask: scalars alone (leading axes' validity) would not broadcast
        vector = ([f"xm_{xo}"] if f"xm_{xo}" in masks else ["(xs >= 0)"]) + [m for m in masks if m != f"xm_{xo}"]
        mask_terms.append(f"({' & '.join(vector)})[:, None]")
    if rmask:
        mask_terms.append(f"{rmask}[None, :]")
    mask = f", mask={' & '.join(mask_terms)}, other=0.0" if mask_terms else ""
    return f"tl.load({base} + {rows} + ({lead} + xo_{xo})[:, None]{mask})"


def _dot_kw(precision: str) -> str:
    return f", input_precision=\"{precision}\""


def _block_a(e: _Source, plan: ParityPlan, spatial, groups: tuple[int, ...], k_pad: int, masked_x: bool,
             depth: int) -> None:
    """`A` = the block's [BLOCK_X, k_pad] tile: the 2^k shifted loads of its rows (`roff`,
    `rmask`), each added with the sign its rows' combination gives it (from `q`)."""
    nz = [a for a in range(plan.D) if groups[a] > 0]
    for n_pat, pat in enumerate(itertools.product("pm", repeat=len(nz))):
        offs = [0] * plan.D
        for i, a in enumerate(nz):
            offs[a] = groups[a] * plan.dilation[a] * (-1 if pat[i] == "m" else 1)
        load = _tap_load(plan, spatial, "xbase", "roff[None, :]", tuple(offs), "rmask", masked_x)
        minus = sum(1 << a for i, a in enumerate(nz) if pat[i] == "m")
        if n_pat == 0:  # every axis +g: sign +1
            e(f"A = {load}", depth)
            continue
        bits = " ^ ".join(f"(qm >> {a})" for a in range(plan.D) if minus >> a & 1)
        e(f"qm = q & {minus}", depth)
        e(f"A += tl.where((({bits}) & 1) == 1, -1.0, 1.0)[None, :] * {load}", depth)


def forward_source(plan: ParityPlan, spatial: tuple[int, ...], group: tuple[int, ...], block_x: int,
                   batched: tuple[bool, bool], precision: str, name: str) -> tuple[str, int]:
    """The forward kernel of output classes `group`: (source, programs per batch element).
    Operands x (B|1, cin, *spatial), w (B|1, blocks, k_max, max_out_pad), rtab and qtab
    (`ParityPlan.tables`); result y (B, rows of the group's classes, *spatial)."""
    D, S = plan.D, math.prod(spatial)
    n_x = spatial[-1]
    nxb = -(-n_x // block_x)
    masked_x = n_x % block_x != 0
    programs = nxb * math.prod(spatial[:-1])
    wmax, kmax = plan.max_out_pad, plan.k_max
    row0 = plan.out_classes[group[0]][1]
    width = sum(plan.out_classes[b][2] for b in group)
    e = _Source()
    e("import triton", 0)
    e("import triton.language as tl", 0)
    e("", 0)
    e("", 0)
    e("@triton.jit", 0)
    e(f"def {name}(x, w, rtab, qtab, y):", 0)
    e("pid = tl.program_id(0)")
    e(f"xb = pid % {nxb}")
    e(f"t = pid // {nxb}")
    for a in reversed(range(D - 1)):
        e(f"c{a} = t % {spatial[a]}")
        e(f"t = t // {spatial[a]}")
    e("b = t.to(tl.int64)")
    e(f"xs = xb * {block_x} + tl.arange(0, {block_x})")
    S_in = math.prod(in_spatial(plan, spatial))
    e(f"xbase = x{f' + b * {plan.cin * S_in}' if batched[0] else ''}")
    e(f"wbase = w{f' + b * {len(plan.blocks) * kmax * wmax}' if batched[1] else ''}")
    _coordinates(e, plan, spatial, 1, masked_x)
    lead_out = " + ".join(f"c{a} * {math.prod(spatial[a + 1:])}" for a in range(D - 1)) or "0"
    e(f"ybase = y + b * {width * S}")
    e(f"pix = ({lead_out} + xs)[:, None]")
    # class by class, its blocks then its store: one accumulator live at a time (all of them at
    # once spilled: 255 registers and ~1 KB of stack on sm_90)
    for b in group:
        p = plan.out_pad(b)
        e(f"acc = tl.zeros(({block_x}, {p}), tl.float32)")
        for n, (groups, b2, _) in enumerate(plan.blocks):
            if b2 != b:
                continue
            kp = plan.k_pad(n)
            e(f"kk = tl.arange(0, {kp})")
            _static_rows(e, plan, n, S_in)
            _block_a(e, plan, spatial, groups, kp, masked_x, 1)
            e(f"acc = tl.dot(A, tl.load(wbase + {n * kmax * wmax} + kk[:, None] * {wmax} + tl.arange(0, {p})[None, :]),"
              f" acc{_dot_kw(precision)})")
        _, start, rows = plan.out_classes[b]
        mask = []
        if rows < p:
            mask.append(f"(tl.arange(0, {p}) < {rows})[None, :]")
        if masked_x:
            mask.append(f"(xs < {n_x})[:, None]")
        m = f", mask={' & '.join(mask)}" if mask else ""
        cols = _row_offsets(f"tl.arange(0, {p}) + {start - row0}", width * S, S)
        e(f"tl.store(ybase + ({cols})[None, :] + pix, acc{m})")
    return e.text(), programs


def _row_offsets(rows: str, extent: int, S: int) -> str:
    """Element offsets of rows of S elements: int32 where a batch element's `extent` elements
    fit (64-bit offsets cost two registers an element of every [BLOCK_X, K] address tile)."""
    return f"({rows}).to(tl.int64) * {S}" if extent > INT32_MAX else f"({rows}) * {S}"


def _static_rows(e: _Source, plan: ParityPlan, n: int, S: int) -> None:
    """`roff`, `rmask` and `q` of block n from its classes' row ranges (static where-chains: no
    table loads, and the compiler sees the rows)."""
    groups, b, members = plan.blocks[n]
    out_cls = plan.out_classes[b][0]
    segs, at = [], 0
    for a in members:
        cls, start, width = plan.in_classes[a]
        segs.append((at, at + width, start, cls ^ out_cls))
        at += width
    ridx, q = "-1", "0"
    for lo, hi, start, qa in reversed(segs):
        ridx = f"tl.where(kk < {hi}, kk + {start - lo}, {ridx})"
        q = f"tl.where(kk < {hi}, {qa}, {q})"
    e(f"ridx = {ridx}")
    e("rmask = ridx >= 0")
    e(f"roff = {_row_offsets('tl.where(rmask, ridx, 0)', plan.cin * S, S)}")
    e(f"q = {q}")


def tuple_blocks(plan: ParityPlan, groups: tuple[int, ...]) -> list[int]:
    """The block indices of one group tuple (consecutive)."""
    return [n for n, (g, _, _) in enumerate(plan.blocks) if g == groups]


def weight_grad_source(plan: ParityPlan, spatial: tuple[int, ...], groups: tuple[int, ...], block_x: int,
                       slabs: int, batched: tuple[bool, bool], precision: str, name: str) -> tuple[str, int]:
    """The weight gradient of one group tuple's blocks: (source, programs per batch element).
    Operands x (B|1, cin, *spatial), g (B|1, cout, *spatial), rtab, qtab (`ParityPlan.tables`),
    otab (blocks, 2) int32 (each block's output class: first row, rows); result part (B, slabs,
    the tuple's blocks, K, max_out_pad), K the tuple's largest k_pad, every entry written. A
    program owns one block (a runtime index) and one run of rows of pixels: A^T dY summed."""
    D, S = plan.D, math.prod(spatial)
    n_x = spatial[-1]
    nxb = -(-n_x // block_x)
    masked_x = n_x % block_x != 0
    n_rows = math.prod(spatial[:-1])
    per = -(-n_rows // slabs)
    wmax, kmax = plan.max_out_pad, plan.k_max
    mine = tuple_blocks(plan, groups)
    first, n_b = mine[0], len(mine)
    kp = max(plan.k_pad(n) for n in mine)
    e = _Source()
    e("import triton", 0)
    e("import triton.language as tl", 0)
    e("", 0)
    e("", 0)
    e("@triton.jit", 0)
    e(f"def {name}(x, g, rtab, qtab, otab, part):", 0)
    e("pid = tl.program_id(0)")
    e(f"blk = pid % {n_b}")
    e(f"slab = (pid // {n_b}) % {slabs}")
    e(f"b = (pid // {n_b * slabs}).to(tl.int64)")
    e(f"kk = tl.arange(0, {kp})")
    e(f"oc = tl.arange(0, {wmax})")
    S_in = math.prod(in_spatial(plan, spatial))
    e(f"xbase = x{f' + b * {plan.cin * S_in}' if batched[0] else ''}")
    e(f"gbase = g{f' + b * {plan.cout * S}' if batched[1] else ''}")
    e(f"ridx = tl.load(rtab + (blk + {first}) * {kmax} + kk)")
    e("rmask = ridx >= 0")
    e(f"roff = {_row_offsets('tl.where(rmask, ridx, 0)', plan.cin * S_in, S_in)}")
    e(f"q = tl.load(qtab + (blk + {first}) * {kmax} + kk)")
    e(f"ocol = ({_row_offsets(f'oc + tl.load(otab + (blk + {first}) * 2)', plan.cout * S, S)})[None, :]")
    e(f"omask = (oc < tl.load(otab + (blk + {first}) * 2 + 1))[None, :]")
    e(f"acc = tl.zeros(({kp}, {wmax}), tl.float32)")
    e(f"for row in range(slab * {per}, tl.minimum(slab * {per} + {per}, {n_rows})):")
    t = "row"
    for a in reversed(range(D - 1)):
        e(f"c{a} = {t} % {spatial[a]}", 2)
        if a:
            e(f"r{a} = {t} // {spatial[a]}", 2)
            t = f"r{a}"
    e(f"for xb in range({nxb}):", 2)
    e(f"xs = xb * {block_x} + tl.arange(0, {block_x})", 3)
    _coordinates(e, plan, spatial, 3, masked_x)
    lead_out = " + ".join(f"c{a} * {math.prod(spatial[a + 1:])}" for a in range(D - 1)) or "0"
    _block_a(e, plan, spatial, groups, kp, masked_x, 3)
    xmask = f" & (xs < {n_x})[:, None]" if masked_x else ""
    e(f"gy = tl.load(gbase + ocol + ({lead_out} + xs)[:, None], mask=omask{xmask}, other=0.0)", 3)
    e(f"acc = tl.dot(tl.trans(A), gy, acc{_dot_kw(precision)})", 3)
    e(f"tl.store(part + ((b * {slabs} + slab) * {n_b} + blk) * {kp * wmax} + kk[:, None] * {wmax} + oc[None, :], acc)")
    return e.text(), n_b * slabs


def kernel_plan(name: str, source: str, programs: int, num_warps: int = 4) -> KernelPlan:
    return KernelPlan(name=name, source=source, programs_per_batch=programs, out_spatial=(), num_warps=num_warps,
                      num_stages=1, nonzeros=0, peak_live_z=0)
