"""The static plan of the CUDA forward kernel (kernels/cuda/conv_contract.cu): pure Python and
numpy, so the tables, shared-memory layout and weight packing are checked on a CPU.

The kernel reuses the Mosaic spike's plan (kernels/pallas/_mosaic_plan.py): output *groups*
(output block b, component j), each with its Z tiles (term, f) and their basis nonzeros. Here the
tiles are regrouped into two *phases* by the input block they read (the vector block first, then
the scalar one): a phase's tiles are all live in registers while every input row it reads
(dz, dy, component i) is loaded from shared memory once and fed to every tile that uses it. The
phase's rows are ordered dy-major, so after the dy = -1 rows the kernel can overwrite that y
slice with the next one while the rest of the phase computes.

The walk is emitted in the filters' reflection symmetry (`row_groups`): the three z rows of one
(dy, component) are loaded together, and each tile's 3x3 (dz, dx) pattern is split into z classes
(centre, dz = +-1 sum, dz = +-1 difference) times x classes (centre, dx = +-1 sum, difference).
The invariant filters are even or odd along each axis, so a tile's symmetric pair of taps is one
FMA on a shared sum or difference: 948 instead of 1,368 FP32 instructions per warp and row.

`stencil_source(spec)` emits that walk as straight-line C++ (kernels/cuda/stencil_d3.inc, committed
and compiled in); `coverage` accepts a layer only if it regenerates the same text, i.e. the kernel
was compiled for its basis.

Shared memory holds a ring of three y slices of every input channel and the packed weights; where
that does not fit (`SMEM_LIMIT`), the kernel passes over each strip once per *channel group*
(`groups`: the fewest that fit), the ring and weights holding one group at a time (`layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Optional

import numpy as np

from .._env import env_choice
from .._spec import ConvSpec
from ..pallas._mosaic_plan import MosaicPlan, make_plan
from ..pallas._mosaic_plan import coverage as mosaic_coverage

INCLUDE = pathlib.Path(__file__).with_name("stencil_d3.inc")
SEG = 16  # output pixels (x) per warp: one m16 row block of the mma
CHUNK = 8  # input channels per mma k-step
CHANNELS_PER_ROUND = 2 * CHUNK  # a chunk per warp half: a block's (and a channel group's) multiple
NX_COVERED = (16, 32, 48, 64)  # x extents the kernel is compiled for (a segment of 16 per warp)
# rhs_dilations the forward is compiled for (the same on every axis): a lane's two pixels x, x + d
# keep the walk's four reads per row (x - d .. x + 2d) within a segment of 16 for d | 8
DILATIONS = (1, 2, 4, 8)
SMEM_LIMIT = 232_448  # bytes of dynamic shared memory one block may take on sm_90
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


@functools.lru_cache(maxsize=32)
def phases(spec: ConvSpec) -> tuple[tuple[tuple[int, int], ...], tuple[Phase, ...]]:
    """((dst block, j) per output group, the phases) of a layer the Mosaic plan covers (at
    dilation 1: a dilated layer's phases are its undilated one's)."""
    spec = undilated(spec)
    plan: MosaicPlan = make_plan(spec, (3, 3, 64))  # the tables do not depend on z, y
    groups = tuple((g.dst, g.j) for g in plan.groups)
    out = []
    for key in PHASE_KEYS:
        tiles, rows = [], {}
        for gi, g in enumerate(plan.groups):
            for (t, f), entries in zip(g.tiles, g.entries):
                if plan_src(spec, t) != key:
                    continue
                ti = len(tiles)
                tiles.append(PhaseTile(gi, t, f))
                for (dz, dy, dx), _, i, coef in entries:
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


def _float(c: float) -> str:
    return f"{np.float32(c)!r}".replace("np.float32(", "").rstrip(")") + "f"


def stencil_source(spec: ConvSpec) -> str:
    """The generated C++ of the layer's stencil phases, tables and row layouts
    (kernels/cuda/stencil_d3.inc)."""
    groups, phs = phases(spec)
    lines = [
        "// Generated by kernels/cuda/_plan.py (stencil_source) for the D=3 {scalar, vector} layer with",
        "// 3x3x3 invariant filters; tests/test_conv_contract_cuda.py checks it is up to date.",
        "// ROW(dz, dy, i): u[dz + 1][ch][s] = input row (dz, dy) component i, channel ch (0: tid,",
        "// 1: tid + 4) of the chunk, at x = 2 * (lane / 4) + s - 1 of the warp's 16 pixels.",
        "// ZC(zk): z class zk of the loaded rows (1: u[0] + u[2], 2: u[2] - u[0]; 0 is u[1]).",
        "// XC(zk, xk): x class xk of z class zk per pixel p (1: s = p plus s = p + 2, 2: p + 2 minus p;",
        "// 0 is s = p + 1). NZ(T, zk, xk, c): Z tile T (A fragment a0..a3 = (p 0, ch 0), (p 1, ch 0),",
        "// (p 0, ch 1), (p 1, ch 1)) += c * class (zk, xk). MID(): the hook after the dy = -1 rows.",
        f"#define GJ_GROUPS {len(groups)}",
        "__device__ constexpr int kGroupBlock[GJ_GROUPS] = {" + ", ".join(str(b) for b, _ in groups) + "};",
        "__device__ constexpr int kGroupComp[GJ_GROUPS] = {" + ", ".join(str(j) for _, j in groups) + "};",
        "// Row layouts per dilation 1, 2, 4, 8 and x extent 16, 32, 48, 64 (row_layout): pitch, skew",
        "// by channel mod 4 packed 8 bits each, channel stride, for the scalar (comps 1) and vector",
        "// (comps 3) block.",
    ]
    for comps in (1, 3):
        lays = [[row_layout(nx, comps, d) for nx in NX_COVERED] for d in DILATIONS]
        shape = f"[{len(DILATIONS)}][{len(NX_COVERED)}]"
        lines.append(f"constexpr int kPitch{comps}{shape} = {{"
                     + ", ".join("{" + ", ".join(str(p) for p, _, _ in row) + "}" for row in lays) + "};")
        lines.append(f"constexpr int kSkew{comps}{shape} = {{"
                     + ", ".join("{" + ", ".join(str(sum(s << (8 * k) for k, s in enumerate(sk))) for _, sk, _ in row) + "}"
                                 for row in lays) + "};")
        lines.append(f"constexpr int kStride{comps}{shape} = {{"
                     + ", ".join("{" + ", ".join(str(t) for _, _, t in row) + "}" for row in lays) + "};")
    for ph in phs:
        name = "V" if ph.key == 1 else "S"
        lines += [
            f"#define GJ_{name}_TILES {len(ph.tiles)}",
            f"#define GJ_{name}_KEY {ph.key}",
            f"__device__ constexpr int k{name}TileGroup[GJ_{name}_TILES] = {{"
            + ", ".join(str(t.group) for t in ph.tiles) + "};",
            f"#define GJ_{name}_STENCIL(ROW, ZC, XC, NZ, MID) \\",
        ]
        mid = False
        for grp in row_groups(ph):
            if grp.dy > -1 and not mid:
                lines.append("  MID() \\")
                mid = True
            parts = [f"ROW({dz}, {grp.dy}, {grp.i})" for dz in grp.dzs]
            parts += [f"ZC({zk})" for zk in grp.zc] + [f"XC({zk}, {xk})" for zk, xk in grp.xc]
            parts += [f"NZ({t}, {zk}, {xk}, {_float(c)})" for t, zk, xk, c in grp.uses]
            lines.append("  " + " ".join(parts) + " \\")
        lines.append("  /* end */")
    return "\n".join(lines) + "\n"


# ---- coverage ---------------------------------------------------------------------------------
def coverage(spec: ConvSpec, spatial, dtype=None) -> tuple[bool, str]:
    """What the kernel covers: the standard D=3 {scalar, vector} torus layer with the basis it was
    compiled for, x extent 16/32/48/64 (any multiple of 16 in x windows of those, GINJAX_CUDA_X_WINDOWS),
    input channels per key a multiple of 16, output channels 8 or 16 (both keys the same), float32,
    within the shared-memory budget in one channel group or in several (`groups`;
    GINJAX_CUDA_CHANNEL_GROUPS=0 allows one only); rhs_dilation d = 1, 2, 4 or 8 on every axis
    (d > 1: one channel group, the y extent a multiple of d)."""

    def groups_hint(nx: int) -> str:
        if dilation(spec) != 1:
            return " (channel-group passes are compiled at dilation 1 only)"
        if channel_groups_enabled() or all(layout(spec, nx, g).smem_bytes > SMEM_LIMIT for g in splits(spec)):
            return ""
        return f"; channel-group passes would fit (turned off by {CHANNEL_GROUPS_ENV}=0)"

    def hint(nx: int) -> str:
        if x_windows_enabled() and forward_rows_whole(nx):
            return groups_hint(nx) + f"; x windows may fit (turned off for rows of {nx} pixels by {NARROW_WINDOWS_ENV}=0)"
        return groups_hint(nx)

    if dilation(spec) > 1 and not dilated_enabled():
        return False, f"the dilated forward is turned off ({DILATED_ENV}=0)"
    ok, why = layer_coverage(spec, spatial, dtype, smem=lambda nx: layout(spec, nx).smem_bytes, smem_hint=hint,
                             dilations=DILATIONS)
    if ok and spatial is not None:
        lay = layout(spec, int(tuple(spatial)[2]))
        if lay.stage_in_weights and lay.stage_floats > lay.vector_weight_floats:  # the kernel refuses it too
            return False, (f"its output staging ({lay.stage_floats} floats) does not fit the vector phase's weights "
                           f"({lay.vector_weight_floats}) it shares at dilation {lay.dilation}")
    return ok, why


def layer_coverage(spec: ConvSpec, spatial, dtype=None, smem=None, smem_hint=None,
                   dilations: tuple[int, ...] = (1,)) -> tuple[bool, str]:
    """`coverage` with the shared memory a kernel needs at x extent nx given by `smem(nx)` (None:
    not checked): the forward's ring holds every input channel, the weight gradient's one group.
    `smem_hint(nx)`, if given, is appended to the reason when that does not fit. `dilations`: the
    rhs_dilations (one factor on every axis) the kernel was compiled for."""
    d = dilation(spec)
    if d not in dilations or (d > 1 and spec.torus_pad != ((d, d),) * spec.D):
        allowed = ", ".join(map(str, dilations))
        return False, (f"rhs_dilation {spec.rhs_dilation} is not covered (the same factor {allowed} on every axis, "
                       "torus padding)")
    ok, why = mosaic_coverage(undilated(spec), None)
    if not ok:
        return False, why.replace("the spike covers", "the CUDA kernel covers")
    if dtype is not None and np.dtype(dtype) != np.float32:
        return False, f"{np.dtype(dtype).name} operands are not covered (float32 only)"
    c0, c1 = (c for _, _, c in spec.in_keys)
    o0, o1 = (o for _, _, o in spec.out_keys)
    if c0 % CHANNELS_PER_ROUND or c1 % CHANNELS_PER_ROUND:
        return False, f"input channels (={c0}, {c1}) must be multiples of {CHANNELS_PER_ROUND} (a chunk per warp half)"
    if o0 != o1 or o0 not in (8, 16):
        return False, f"output channels (={o0}, {o1}) must be equal and 8 or 16"
    if spatial is not None:
        nx = int(tuple(spatial)[2])
        if nx % SEG or nx < SEG:
            return False, f"the x extent (={nx}) must be a multiple of {SEG}"
        if not window_choices(nx):
            if x_windows_enabled():
                return False, f"the x extent (={nx}) over {max(NX_COVERED)} must be a multiple of 32 (x windows of 64 or 32)"
            return False, f"the x extent (={nx}) over {max(NX_COVERED)} needs x windows (turned off by {X_WINDOWS_ENV}=0)"
        if d > 1 and int(tuple(spatial)[1]) % d:
            return False, f"the y extent (={tuple(spatial)[1]}) must be a multiple of the dilation {d} (a CTA's rows)"
        if smem is not None and (need := smem(nx)) > SMEM_LIMIT:
            hint = smem_hint(nx) if smem_hint else ""
            if not x_windows_enabled() and nx > SEG:
                hint += f"; x windows may fit (turned off by {X_WINDOWS_ENV}=0)"
            return False, f"needs {need} bytes of shared memory (> {SMEM_LIMIT})" + hint
    if stencil_source(undilated(spec)) != compiled_stencil():
        return False, "the layer's basis is not the one kernels/cuda/stencil_d3.inc was generated for"
    return True, "CUDA forward: D=3 {scalar, vector} torus layer" + (f", dilation {d}" if d > 1 else "") + ", tf32 mma.sync"


@functools.lru_cache(maxsize=1)
def compiled_stencil() -> str:
    return INCLUDE.read_text() if INCLUDE.exists() else ""


# ---- shared-memory layout ---------------------------------------------------------------------
# One y slice holds, per input block and channel c, its three z rows dz = -d, 0, d at
# region + c * stride + skew[c % 4] + (dz / d + 1) * pitch: the stencil's row offsets (dz * pitch +
# i + s * d * comps) are then compile-time immediates of one per-lane base. A row is
# x = -d .. nx + d - 1 wrapped, `comps` floats a pixel (d: the dilation).
STAGE_PITCH = (SEG + 4, 3 * SEG + 4)  # floats per output channel of a segment's staged outputs
# Dilations whose rows are packed (pitch = the row's floats, each channel's three rows followed by a
# gap that makes the reads conflict-free, `row_layout`) and whose kernels stage their outputs in the
# vector phase's weights (`Layout.stage_in_weights`): together 24.6 KB less than the ring with
# skews inside the pitch and a staging area of its own, so the whole row of 64 pixels fits at d = 8.
PACKED_DILATIONS = (8,)


def bank_conflict_free(pitch: int, skew: tuple[int, ...], comps: int, dilation: int = 1,
                       stride: Optional[int] = None) -> bool:
    """Whether one warp's stencil read hits 32 distinct banks: lane (g, tid) reads channel tid
    (and, in a second load, tid + 4) at float c * stride + skew[c % 4] + comps * lane_pixel(g, d)
    (+ a uniform shift for dz, s, i); `stride` None: 3 pitch, the rows of one channel after another."""
    stride = 3 * pitch if stride is None else stride
    for half in (0, 4):
        seen = set()
        for lane in range(32):
            g, c = lane >> 2, (lane & 3) + half
            seen.add((c * stride + skew[c & 3] + comps * lane_pixel(g, dilation)) % 32)
        if len(seen) != 32:
            return False
    return True


@functools.lru_cache(maxsize=64)
def row_layout(nx: int, comps: int, dilation: int = 1) -> tuple[int, tuple[int, int, int, int], int]:
    """(row pitch, skew per channel mod 4, channel stride) in floats: the smallest pitch (then
    skew) for which the stencil reads are free of bank conflicts; a row (x = -d .. nx + d - 1)
    and its skew fit one pitch, a channel's three rows one stride (3 pitch). Skews up to 3 at d = 1
    (the layouts measured since version 2), up to 15 otherwise (d = 4 at x 64 then fits the
    shared-memory budget: pitch 78 where skews < 4 need 90). At the PACKED_DILATIONS the rows are
    packed instead (pitch = the row, no skews) and the channels' stride is 3 pitch plus the
    smallest gap that makes the reads conflict-free (8 floats: channels tid 0..3 then start 8 banks
    apart; at d = 8, x 64 the stride is 248 and 728 floats against 264 and 744 with skews)."""
    need = (nx + 2 * dilation) * comps
    if dilation in PACKED_DILATIONS:
        for gap in range(32):
            if bank_conflict_free(need, (0, 0, 0, 0), comps, dilation, 3 * need + gap):
                return need, (0, 0, 0, 0), 3 * need + gap
        raise ValueError(f"no bank-conflict-free packed rows for nx={nx}, comps={comps}, dilation={dilation}")
    top = 4 if dilation == 1 else 16
    for pitch in range(need, need + 64):
        for s1 in range(top):
            for s2 in range(top):
                for s3 in range(top):
                    skew = (0, s1, s2, s3)
                    if pitch >= need + max(skew) and bank_conflict_free(pitch, skew, comps, dilation):
                        return pitch, skew, 3 * pitch
    raise ValueError(f"no bank-conflict-free row layout for nx={nx}, comps={comps}, dilation={dilation}")


def _round4(n: int) -> int:
    return -(-n // 4) * 4


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shared memory of one CTA pass over a channel group: `channels` and `weight_floats` are one
    group's (the ring and the weights shared memory holds at a time), `groups` the passes."""

    nx: int
    channels: tuple[int, int]  # input channels (scalar, vector) of one group
    pitch: tuple[int, int]
    skew: tuple[tuple[int, ...], tuple[int, ...]]
    weight_floats: int  # one group's packed weights
    out_channels: int
    groups: int = 1
    dilation: int = 1
    row: int = 0  # the rows' x extent (0: nx, one window); nx is a CTA's x window
    stride: tuple[int, int] = (0, 0)  # floats from one channel's rows to the next's (0: 3 pitch)
    vector_weight_floats: int = 0  # the vector phase's share of weight_floats (first in it)

    def channel_stride(self, key: int) -> int:
        return self.stride[key] or 3 * self.pitch[key]

    def chan(self, key: int, c: int) -> int:
        """Where channel c (an int, or lanes' channels as an integer array) of block `key` starts
        within the block's region: its row dz = -d."""
        return c * self.channel_stride(key) + np.asarray(self.skew[key])[np.bitwise_and(c, 3)]

    @property
    def stage_in_weights(self) -> bool:
        """Whether the kernel stages its outputs in the vector phase's weights (the PACKED_DILATIONS):
        they are read only in the vector phase, which every warp has left by the scalar MID's
        barrier, and each row after the strip's first copies them in again after a barrier behind
        the stores, landing by the next row's vector MID (conv_contract.cu, "Staging")."""
        return self.dilation in PACKED_DILATIONS

    @property
    def windows(self) -> int:
        """x windows of nx pixels per row (conv_contract.cu's header, "X windows")."""
        return (self.row or self.nx) // self.nx

    @property
    def region(self) -> tuple[int, int]:
        """Where each block's channels start in a slice (floats)."""
        return 0, self.channels[0] * self.channel_stride(0)

    @property
    def slice_floats(self) -> int:
        """One y slice: 3 z rows of both input blocks, every channel (16-byte multiple, so the
        weights after the ring are aligned for 16-byte copies)."""
        return _round4(self.region[1] + self.channels[1] * self.channel_stride(1))

    @property
    def stage_floats(self) -> int:
        """The segments' output staging: per output channel 16 scalar and 48 vector floats,
        padded (STAGE_PITCH)."""
        return (self.nx // SEG) * self.out_channels * sum(STAGE_PITCH)

    @property
    def smem_bytes(self) -> int:
        """Three y slices (a ring), the packed weights, the output staging (none of its own where
        `stage_in_weights`), the bias offsets."""
        stage = 0 if self.stage_in_weights else self.stage_floats
        return 4 * (3 * self.slice_floats + self.weight_floats + stage + 4 * self.out_channels)

    @property
    def threads(self) -> int:
        return 2 * 32 * (self.nx // SEG)


def layout(spec: ConvSpec, nx: int, n_groups: Optional[int] = None) -> Layout:
    """The layout of rows of nx pixels (its x window: `window`) in `n_groups` channel groups
    (None: `groups(spec, nx)`; where no allowed split fits, the allowed one of least shared
    memory, so the coverage reason names what it needs)."""
    w = window(spec, nx) or nx
    if n_groups is None:  # through `groups`: the one place the split is decided (tests patch it)
        n_groups = groups(spec, nx) or max(allowed_splits(spec), default=1)
    return dataclasses.replace(window_layout(spec, w, n_groups), row=nx)


X_WINDOWS_ENV = "GINJAX_CUDA_X_WINDOWS"


def x_windows_enabled() -> bool:
    """Whether a CTA may cover an x window of a row rather than the whole row (rows over 64
    pixels; rows of 64 whose ring does not fit whole): on unless GINJAX_CUDA_X_WINDOWS="0". Their GPU tests passed on the
    H200 and they took a ResNet step at N = 128 from 134.8 to 91.3 ms (bench/NOTES.md, "Session 21")."""
    return env_choice(X_WINDOWS_ENV, ("0", "1"), "1") == "1"


WINDOWS_COVERED = (64, 32)  # x window widths compiled for rows longer than their window (kWin)


def window_choices(nx: int) -> tuple[int, ...]:
    """The x windows a row of nx pixels can be split into, widest first: the whole row (nx <= 64),
    and with x windows on, the widths of WINDOWS_COVERED dividing nx."""
    if nx % SEG or nx < SEG:
        return ()
    whole = (nx,) if nx <= max(NX_COVERED) else ()
    if not x_windows_enabled():
        return whole
    return whole + tuple(w for w in WINDOWS_COVERED if w < nx and nx % w == 0)


NARROW_WINDOWS_ENV = "GINJAX_CUDA_NARROW_WINDOWS"


def narrow_windows_enabled() -> bool:
    """Whether the forward may split a row of at most 64 pixels into x windows where the whole
    row's ring does not fit shared memory (e.g. 32 + 32 inputs at dilation 2: windows of 32, one
    4-warp CTA an SM): on unless GINJAX_CUDA_NARROW_WINDOWS="0", which leaves such layers' forward
    and input gradient to Triton's kernel (measured on dilation 8 at x 64 when its rows took windows:
    1.10 ms a launch at fffb5eb against the windows' 1.20; bench/NOTES.md, "Session 22"). The
    weight gradient's own layout is not affected."""
    return env_choice(NARROW_WINDOWS_ENV, ("0", "1"), "1") == "1"


def forward_rows_whole(nx: int) -> bool:
    """Whether the forward keeps rows of nx pixels whole whatever shared memory they need: rows of
    at most 64 pixels with `narrow_windows_enabled` off."""
    return nx <= max(NX_COVERED) and not narrow_windows_enabled()


def window(spec: ConvSpec, nx: int, smem=None) -> Optional[int]:
    """The x window of rows of nx pixels: the widest choice (`window_choices`) whose layout fits
    SMEM_LIMIT in an allowed channel split (`smem(w)`, if given, instead: another kernel's shared
    memory), else the widest (so the coverage reason names what it needs); None where nx has none.
    The forward's (`smem` None) rows stay whole where `forward_rows_whole`."""
    choices = window_choices(nx)
    if smem is None and forward_rows_whole(nx):
        choices = choices[:1]
    if smem is None:
        fits = lambda w: _groups_at(spec, w) is not None  # noqa: E731
    else:
        fits = lambda w: smem(w) <= SMEM_LIMIT  # noqa: E731
    return next((w for w in choices if fits(w)), choices[0] if choices else None)


def _groups_at(spec: ConvSpec, w: int) -> Optional[int]:
    return next((g for g in allowed_splits(spec) if window_layout(spec, w, g).smem_bytes <= SMEM_LIMIT), None)


def window_layout(spec: ConvSpec, nx: int, n_groups: int = 1) -> Layout:
    """The shared-memory layout of one CTA's x window of nx pixels in `n_groups` channel groups."""
    (c0, c1), o = (tuple(c for _, _, c in spec.in_keys), spec.out_keys[0][2])
    if n_groups != 1 and n_groups not in splits(spec):
        raise ValueError(f"`n_groups` (={n_groups}) must split both input blocks (={c0}, {c1} channels) into "
                         f"groups of a multiple of {CHANNELS_PER_ROUND}: one of {(1,) + splits(spec)[1:]}")
    c = (c0 // n_groups, c1 // n_groups)
    _, phs = phases(spec)
    d = dilation(spec) or 1
    p0, s0, t0 = row_layout(nx, 1, d)
    p1, s1, t1 = row_layout(nx, 3, d)
    weights = sum(len(ph.tiles) * c[ph.key] * o for ph in phs)
    vector = sum(len(ph.tiles) * c[ph.key] * o for ph in phs if ph.key == 1)
    return Layout(nx, c, (p0, p1), (s0, s1), weights, o, n_groups, d, stride=(t0, t1), vector_weight_floats=vector)


def splits(spec: ConvSpec) -> tuple[int, ...]:
    """The channel-group counts the kernel can pass over: G splitting both input blocks into
    groups of whole chunk rounds (multiples of CHANNELS_PER_ROUND), ascending."""
    c0, c1 = (c for _, _, c in spec.in_keys)
    return tuple(g for g in range(1, min(c0, c1) // CHANNELS_PER_ROUND + 1)
                 if not c0 % (g * CHANNELS_PER_ROUND) and not c1 % (g * CHANNELS_PER_ROUND))


CHANNEL_GROUPS_ENV = "GINJAX_CUDA_CHANNEL_GROUPS"


def channel_groups_enabled() -> bool:
    """Whether the forward may pass over several channel groups: on unless
    GINJAX_CUDA_CHANNEL_GROUPS="0" (then a layer that needs them stays on the Triton fallback).
    Their GPU tests passed on the H200 and they took a UNet step from 41.8 to 40.1 ms
    (bench/NOTES.md, "Channel-group passes")."""
    return env_choice(CHANNEL_GROUPS_ENV, ("0", "1"), "1") == "1"


DILATED_ENV = "GINJAX_CUDA_DILATED"


def dilated_enabled() -> bool:
    """Whether the CUDA kernels run dilated layers (rhs_dilation 2, 4, 8; the weight gradient too):
    on unless GINJAX_CUDA_DILATED="0" (then such a layer stays on Triton). Their GPU tests passed on
    the H200 and they took a DilResNet step from 77.0 to 58.8 ms (bench/NOTES.md, "Session 21")."""
    return env_choice(DILATED_ENV, ("0", "1"), "1") == "1"


FP32_ENV = "GINJAX_CUDA_FP32"


def fp32_enabled() -> bool:
    """Whether the `triton` backend runs fp32 calls of the layers `fp32_coverage` takes on the CUDA
    forward's 3xTF32 instantiation: on unless GINJAX_CUDA_FP32="0", which leaves fp32 on Triton's
    kernel. Its GPU tests pass on the H200 and it took d3_n64_b4_c16 at fp32 from Triton's 2.04 to
    1.19 ms forward, 7.23 to 5.72 fwd_bwd (bench/NOTES.md, "Session 25")."""
    return env_choice(FP32_ENV, ("0", "1"), "1") == "1"


BF16_ENV = "GINJAX_CUDA_BF16"


def bf16_enabled() -> bool:
    """Whether the `triton` backend runs bf16 calls of the layers the CUDA kernels cover on their
    TF32 instantiations: on unless GINJAX_CUDA_BF16="0", which leaves bf16 on Triton's bf16 dots.
    tf32 operands meet bf16's tolerance (2e-2) with ~70x to spare (3.0e-4 on the standard layer),
    and Triton's bf16 kernel runs at its tf32 speed (5.63 against 5.46 ms in its first version),
    which is about half the CUDA kernels' (bench/NOTES.md, "Session 26")."""
    return env_choice(BF16_ENV, ("0", "1"), "1") == "1"


def fp32_coverage(spec: ConvSpec, spatial, dtype=None) -> tuple[bool, str]:
    """`coverage` of the fp32 (3xTF32) forward, compiled at dilation 1 on whole rows (no x windows)."""
    return split_coverage("forward", coverage(spec, spatial, dtype), spec, spatial, layout)


def split_coverage(what: str, covered: tuple[bool, str], spec: ConvSpec, spatial, layout_of) -> tuple[bool, str]:
    """A kernel's (`what`) fp32 (3xTF32) instantiations, compiled at dilation 1 on whole rows: its
    TF32 coverage (`covered`), then the dilation and the x windows of `layout_of(spec, nx)`."""
    ok, why = covered
    if not ok:
        return ok, why
    if dilation(spec) != 1:
        return False, f"the fp32 (3xTF32) {what} is compiled at dilation 1 only"
    if spatial is not None and layout_of(spec, int(tuple(spatial)[2])).windows > 1:
        return False, f"the fp32 (3xTF32) {what} takes whole rows (x extent {tuple(spatial)[2]} needs x windows)"
    return True, ""


def allowed_splits(spec: ConvSpec) -> tuple[int, ...]:
    """`splits`, or only the single group where channel-group passes are off or the layer is
    dilated (the group passes are compiled at dilation 1 only)."""
    return splits(spec) if channel_groups_enabled() and dilation(spec) == 1 else splits(spec)[:1]


def groups(spec: ConvSpec, nx: int) -> Optional[int]:
    """The number of channel groups the kernel passes over at x extent nx (in its x window): the
    smallest allowed split (`allowed_splits`) whose layout fits SMEM_LIMIT (each group past the
    first costs a read and a write of the outputs and a ring refill), None where none fits."""
    w = window(spec, nx)
    return None if w is None else _groups_at(spec, w)


# ---- weights ----------------------------------------------------------------------------------
def round_tf32(x, xp=np):
    """float32 rounded to tf32 (10 mantissa bits; to nearest, ties away from zero, as
    cvt.rna.tf32.f32), the low 13 bits zero; inf and nan unchanged."""
    x = xp.asarray(x, xp.float32)
    if xp is np:
        bits = x.view(np.uint32)
        out = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    else:
        from jax import lax

        bits = lax.bitcast_convert_type(x, xp.uint32)
        out = lax.bitcast_convert_type((bits + xp.uint32(0x1000)) & xp.uint32(0xFFFFE000), xp.float32)
    return xp.where(xp.isfinite(x), out, x)


# The mean relative error of truncating a float to tf32 (what the mma does with the raw bits the
# kernels hand it, common.cuh's tf32_bits): the dropped 13 bits are uniform in [0, 2^-10) of the
# mantissa m, so the mean is 2^-11 E[1 / m] = 2^-12 / ln 2 (3.52e-4) for log-uniform mantissas
# (a product of data spread over a few octaves), at most 2^-11 (m = 1), at least 2^-12. Scaling
# the other operand by 1 / (1 - bias) takes it out: on the lane emulation of the standard layer the
# error against `reference` is then 3.0e-4 rel L2 against 2.9e-4 rounded and 4.6e-4 truncated.
TF32_TRUNCATION_BIAS = 2.0**-12 / float(np.log(2.0))


def truncate_tf32(x, xp=np):
    """float32 truncated to tf32 (the low 13 bits cleared), as the mma reads a float's bits; NaN
    stays NaN (a NaN with only low mantissa bits would read as inf: the arithmetic makes none)."""
    x = xp.asarray(x, xp.float32)
    if xp is np:
        return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)
    from jax import lax

    return lax.bitcast_convert_type(lax.bitcast_convert_type(x, xp.uint32) & xp.uint32(0xFFFFE000), xp.float32)


def pack_weights(spec: ConvSpec, weights, xp=np, tf32: bool = True):
    """The mma B fragments, flat and rounded to tf32 (the kernel copies them as they are) after a
    scale of 1 / (1 - TF32_TRUNCATION_BIAS), which takes out the mean error of Z's truncation: per
    phase (vector, then scalar), [chunk h][tile T][lane][n-tile][r] = w_t[o = 8 n + lane / 4,
    c = 8 h + lane % 4 + 4 r, f] of tile T = (t, f). One read per lane and tile (16 bytes for
    both n-tiles of 16 output channels). `tf32` False keeps the float32 values (the fp32 kernels
    split them themselves; the CPU emulation's exact check of the index arithmetic)."""
    _, phs = phases(spec)
    parts = []
    for ph in phs:
        w = xp.stack([weights[t.term][:, :, t.f] for t in ph.tiles])  # (T, o, c)
        n_t, o, c = w.shape
        w = w.reshape(n_t, o // 8, 8, c // CHUNK, 2, 4)  # T, n, g, h, r, tid
        parts.append(w.transpose(3, 0, 2, 5, 1, 4).reshape(-1))  # h, T, g, tid, n, r
    packed = xp.concatenate(parts)
    if not tf32:
        return packed
    # in float32 on both paths (numpy and traced), so they round alike
    return round_tf32(xp.asarray(packed, xp.float32) * xp.float32(1.0 / (1.0 - TF32_TRUNCATION_BIAS)), xp)
