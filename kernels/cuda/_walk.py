"""The stencil walk of the CUDA forward (kernels/cuda/forward_kernel.cuh) as pure Python: the layer's
Z tiles (output *groups* (output block b, component j), each with its tiles (term, f) and their
basis nonzeros, in the order of the Mosaic spike's plan, kernels/pallas/_mosaic_plan.py)
regrouped into two *phases* by the input block they read (the vector block first, then the
scalar one). A phase's tiles are all live in registers while every input row it reads (dz, dy,
component i) is loaded from shared memory once and fed to every tile that uses it. The rows are
ordered dy-major, so after the dy = -1 rows the kernel can overwrite that y slice with the next one
while the rest of the phase computes. A D = 2 layer's taps are the plane dz = 0 of a D = 3 one's:
its rows are (0, dy, i).

The walk is emitted in the filters' reflection symmetry (`row_groups`): the three z rows of one
(dy, component) are loaded together, and each tile's 3x3 (dz, dx) pattern is split into z classes
(centre, dz = +-1 sum, dz = +-1 difference) times x classes (centre, dx = +-1 sum, difference).
The invariant filters are even or odd along each axis, so a tile's symmetric pair of taps is one
FMA on a shared sum or difference: 948 instead of 1,368 FP32 instructions per warp and row.
kernels/cuda/_plan.py emits it as C++ (`stencil_source`); the weight gradient walks the same rows
(kernels/cuda/_dw_plan.py).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .._fused.basis import basis_nonzeros
from .._spec import ConvSpec

PHASE_KEYS = (1, 0)  # the vector block's tiles first (the larger phase), then the scalar ones


@dataclasses.dataclass(frozen=True)
class PhaseTile:
    group: int  # output group (block b, component j) its GEMM accumulates into
    term: int
    f: int


@dataclasses.dataclass(frozen=True)
class Phase:
    key: int  # the input block every tile of the phase reads
    tiles: tuple[PhaseTile, ...]
    # per row (dz, dy, i), the (tile index, dx, coefficient) it feeds; rows dy-major
    rows: tuple[tuple[tuple[int, int, int], tuple[tuple[int, int, float], ...]], ...]

    @property
    def first_rows(self) -> int:
        """Rows with dy = -1: after them the oldest y slice is no longer read by this phase."""
        return sum(1 for (dz, dy, i), _ in self.rows if dy == -1)


def dilation(spec: ConvSpec) -> int:
    """The layer's rhs_dilation d where it is the same on every axis (the kernel's one factor),
    else 0."""
    d = set(spec.rhs_dilation)
    return d.pop() if len(d) == 1 else 0


def undilated(spec: ConvSpec) -> ConvSpec:
    """`spec` with rhs_dilation 1 (and the torus padding of 3^3 filters): the same basis walk,
    which the dilation only spreads (every tap offset times d); identity for an undilated spec."""
    if all(r == 1 for r in spec.rhs_dilation):
        return spec
    return dataclasses.replace(spec, rhs_dilation=(1,) * spec.D, torus_pad=((1, 1),) * spec.D)


def lane_pixel(g, d: int):
    """The x (within a warp's segment of 16) of mma row g's pixel at dilation d; row g + 8's is
    that + d. Each lane's two pixels are d apart, so one row read x - d, x, x + d, x + 2d (four
    loads at stride d) serves the three dx taps of both, as x - 1 .. x + 2 does at d = 1 (the
    lanes' 16 pixels: 2d-blocks, the first d of each block and + d)."""
    return 2 * d * (g // d) + g % d


def output_groups(spec: ConvSpec) -> tuple[tuple[int, int, tuple], ...]:
    """Per output group (block b, component j), in the Mosaic plan's order (blocks, then j): its
    tiles (term, f), each with its basis nonzeros ((dz, dy, dx), i, coefficient) in (tap, i)
    order; a D = 2 layer's taps have dz = 0. A tile is a (term, f) with a nonzero at j."""
    by_tile: dict[tuple[int, int, int], list] = {}
    for n in basis_nonzeros(spec):  # ordered by (pair, f, tap, i, j)
        taps = tuple(int(a) - 1 for a in np.unravel_index(n.tap, (3,) * spec.D))
        by_tile.setdefault((n.pair, n.f, n.j), []).append(((0,) * (3 - spec.D) + taps, n.i, n.value))
    out = []
    for dst, (k_out, _, _) in enumerate(spec.out_keys):
        for j in range(spec.D**k_out):
            tiles = tuple(((t, f), tuple(by_tile[t, f, j])) for t, pair in enumerate(spec.pairs)
                          if pair.out_index == dst for f in range(pair.basis.n_filters) if (t, f, j) in by_tile)
            out.append((dst, j, tiles))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def phases(spec: ConvSpec) -> tuple[tuple[tuple[int, int], ...], tuple[Phase, ...]]:
    """((dst block, j) per output group, the phases) of a layer of 3^D filters (at dilation 1: a
    dilated layer's phases are its undilated one's)."""
    spec = undilated(spec)
    plan = output_groups(spec)
    groups = tuple((dst, j) for dst, j, _ in plan)
    out = []
    for key in PHASE_KEYS:
        tiles, rows = [], {}
        for gi, (_, _, group_tiles) in enumerate(plan):
            for (t, f), entries in group_tiles:
                if plan_src(spec, t) != key:
                    continue
                ti = len(tiles)
                tiles.append(PhaseTile(gi, t, f))
                for (dz, dy, dx), i, coef in entries:
                    rows.setdefault((dz, dy, i), []).append((ti, dx, coef))
        order = sorted(rows, key=lambda r: (r[1], r[0], r[2]))
        out.append(Phase(key, tuple(tiles), tuple((r, tuple(rows[r])) for r in order)))
    return groups, tuple(out)


@dataclasses.dataclass(frozen=True)
class RowGroup:
    """The three z rows of one (dy, component i) of a phase, in the symmetric basis: z class zk
    (0: the dz = 0 row, 1: rows dz = -1 plus dz = 1, 2: dz = 1 minus dz = -1), x class xk (0: the
    tap dx = 0, 1: taps -1 plus 1, 2: tap 1 minus tap -1)."""

    dy: int
    i: int
    dzs: tuple[int, ...]  # the z rows it loads
    zc: tuple[int, ...]  # z classes 1 / 2 it forms from them
    xc: tuple[tuple[int, int], ...]  # (z class, x class 1 / 2) it forms
    uses: tuple[tuple[int, int, int, float], ...]  # (tile, zk, xk, coefficient)


def _classes(a: float, b: float, c: float) -> tuple[float, float, float]:
    """(centre, even, odd) coefficients of taps (-1, 0, 1): a u(-1) + b u(0) + c u(1) =
    b u(0) + (a + c) / 2 (u(-1) + u(1)) + (c - a) / 2 (u(1) - u(-1))."""
    return b, (a + c) / 2, (c - a) / 2


@functools.lru_cache(maxsize=32)
def row_groups(phase: Phase) -> tuple[RowGroup, ...]:
    """The phase's walk in the symmetric basis, (dy, i)-major (dy first, like the rows)."""
    pats: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    for (dz, dy, i), uses in phase.rows:
        for t, dx, coef in uses:
            pats.setdefault((dy, i), {}).setdefault(t, np.zeros((3, 3)))[dz + 1, dx + 1] = float(np.float32(coef))
    out = []
    for dy, i in sorted(pats):
        uses = []
        for t, pat in sorted(pats[dy, i].items()):
            for zk, row in enumerate(np.stack(_classes(*pat))):
                for xk, coef in enumerate(_classes(*row)):
                    if coef != 0.0:
                        uses.append((t, zk, xk, float(np.float32(coef))))
        zks = {zk for _, zk, _, _ in uses}
        dzs = tuple(dz for dz in (-1, 0, 1) if (dz == 0 and 0 in zks) or (dz != 0 and zks - {0}))
        zc = tuple(sorted(zks - {0}))
        xc = tuple(sorted({(zk, xk) for _, zk, xk, _ in uses if xk}))
        out.append(RowGroup(dy, i, dzs, zc, xc, tuple(uses)))
    return tuple(out)


def walk_cost(phase: Phase) -> int:
    """FP32 instructions per warp, output row and chunk of the symmetric walk: 4 a tile use
    (2 pixels x 2 channels), 8 a z class (4 x positions x 2 channels), 4 an x class."""
    return sum(4 * len(g.uses) + 8 * len(g.zc) + 4 * len(g.xc) for g in row_groups(phase))


def plan_src(spec: ConvSpec, term: int) -> int:
    return spec.pairs[term].in_index
