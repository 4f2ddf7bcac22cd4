"""The static plan of the CUDA weight gradient (kernels/cuda/weight_gradient.cu): pure Python and
numpy, so its tables, shared-memory layout, scratch size and the unpacking of its per-CTA
partials are checked on a CPU.

    dW_t[o, c, f] = sum over pixels p and the forward's tiles T = (group (b, j), t, f):
                    Z_T[p, c] * gY_(b,j)[p, o]

The Z tiles are the forward's (kernels/cuda/_plan.py: phases, symmetric row groups); the walk is
split into *passes* by input component (the vector phase's 27 tiles as 3 passes of 13, the
scalar phase as 1 of 13), each ending in the mma of its tiles into per-weight accumulators: a
(t, f) shared by the three vector output components accumulates their three tiles (each with its
own gY_j) into one accumulator, 18 distinct weights for the standard layer (the forward's 40
tiles). Z is linear, so a tile touched by several passes is simply mma'd once per pass.

Lane mapping (the forward's transposed): mma.m16n8k8 with M = output channel, N = input channel,
K = pixel. Lane (g, tid) owns input channel g of its warp's chunk and the pixels 2 tid, 2 tid + 1
(k-step 0) and 8 + 2 tid, 9 + 2 tid (k-step 1) of its 16-pixel segment, so the forward's walk
(ROW / ZC / XC / NZ with the channel pair replaced by the k-step pair) runs unchanged on a
different per-lane base; that needs its own conflict-free row layout (`row_layout`: 8 channels x
4 pixel pairs a wavefront instead of 4 channels x 8).

Dilated layers (rhs_dilation d = 2, 4, 8, as the forward): a lane's pixel pair is x and x + d with
x = `k_pixel(tid, d)`, and k-step 1 is k-step 0 shifted by `kstep_shift(d)` pixels (8, or 4 at
d = 8), so the walk's four reads x - d .. x + 2d serve both pixels; a CTA slides over the rows of
one y phase, as the forward's does.

D = 2 layers (weight_gradient_d2.cu, on weight_gradient_d2.inc): the same kernel on the 2D walk, a
y slice holding one row a channel (`_plan.slice_rows`), vector blocks of two components, and up to
32 output channels a launch (two m16 tiles of A: `m_tiles`), since a 2D pass keeps 7 Z tiles live
where a 3D one keeps 13: the B fragments of a Z tile then serve both m-tiles.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

from .._env import env_choice
from .._spec import ConvSpec
from . import _plan
from ._plan import CHUNK, DILATIONS, NX_COVERED, SEG, RowGroup, dilation, lane_pixel, phases, row_groups

INCLUDE = pathlib.Path(__file__).with_name("weight_gradient_d3.inc")
INCLUDES = {3: INCLUDE, 2: INCLUDE.with_name("weight_gradient_d2.inc")}
PLAN_TESTS = {3: "test_conv_contract_cuda_dw.py", 2: "test_conv_contract_cuda_dw_d2.py"}  # each file's up-to-date check
CHANNELS = 2 * CHUNK  # input channels per block one CTA walks (a chunk per warp half)
DEFAULT_STRIP = 64  # y rows a CTA slides over: few, long CTAs keep the partials' scratch small
# The fp32 (3xTF32) kernels' strip: an accumulator sums its products over the whole strip inside the
# tensor cores, whose fp32 accumulation does not round to nearest; 64-row strips missed fp32's
# tolerance on the H200 (2.7e-5 on d3_n64_b4_c16, bench/NOTES.md "Session 25"), 2-5 rows met it.
FP32_STRIP = 4
# A CTA's share of the cotangents' spatial sums after its partial dW (weight_gradient_kernel.cuh's
# GySum): `sum_channels` scalar channels, then as many x D vector channel components (o-major),
# zero past the launch's


def sum_channels(dims: int = 3) -> int:
    """Output channels per key the sums part of a CTA's result has room for: the widest launch."""
    return max(_plan.out_channels(dims))


def sum_floats(dims: int = 3) -> int:
    return (1 + _plan.vector_comps(dims)) * sum_channels(dims)


def m_tiles(o: int) -> int:
    """m16 tiles of the mma's A operand (output channels) a launch of o output channels holds: 8 or
    16 in one (8: its upper rows zero), 32 in two."""
    return -(-o // 16)


@dataclasses.dataclass(frozen=True)
class Pass:
    """A phase's row groups of one input component i and the phase's tiles they touch (pass-local
    index -> (phase tile, output group, weight index)); uses renumbered to pass-local tiles."""

    key: int
    i: int
    tiles: tuple[int, ...]
    group: tuple[int, ...]  # output group (block, component) of each pass tile: its gY
    weight: tuple[int, ...]  # index into `weights(spec)` of each pass tile: its accumulator
    groups: tuple[RowGroup, ...]
    last: bool  # the phase's last pass: its MID hook frees the oldest y slice


@functools.lru_cache(maxsize=32)
def weights(spec: ConvSpec) -> tuple[tuple[int, int], ...]:
    """The distinct (term, f) of the forward's tiles, sorted: one accumulator each."""
    _, phs = phases(spec)
    return tuple(sorted({(t.term, t.f) for ph in phs for t in ph.tiles}))


@functools.lru_cache(maxsize=32)
def passes(spec: ConvSpec) -> tuple[Pass, ...]:
    _, phs = phases(spec)
    index = {w: k for k, w in enumerate(weights(spec))}
    out = []
    for ph in phs:
        groups = row_groups(ph)
        comps = sorted({g.i for g in groups})
        for i in comps:
            mine = [g for g in groups if g.i == i]
            tiles = tuple(sorted({t for g in mine for t, _, _, _ in g.uses}))
            local = {t: k for k, t in enumerate(tiles)}
            renum = tuple(dataclasses.replace(g, uses=tuple((local[t], zk, xk, c) for t, zk, xk, c in g.uses))
                          for g in mine)
            out.append(Pass(ph.key, i, tiles, tuple(ph.tiles[t].group for t in tiles),
                            tuple(index[ph.tiles[t].term, ph.tiles[t].f] for t in tiles), renum, i == comps[-1]))
    return tuple(out)


def mma_count(spec: ConvSpec) -> int:
    """mma.sync per warp and output row: every pass tile, two k-steps of 8 pixels."""
    return sum(2 * len(p.tiles) for p in passes(spec))


# ---- lane mapping -----------------------------------------------------------------------------
def k_pixel(tid, d: int = 1):
    """The x (within the warp's 16-pixel segment) of k-step 0's B row tid at dilation d; row
    tid + 4's is that + d, and k-step 1's are these + `kstep_shift(d)` (d = 1: 2 tid, 2 tid + 1
    and + 8)."""
    return lane_pixel(tid, d)


def kstep_shift(d: int = 1) -> int:
    """Pixels between k-step 0's and k-step 1's: 8, or 4 at d = 8 (k-step 0 then holds x = 0..3
    and 8..11)."""
    return 4 if d == 8 else 8


# ---- shared-memory layout ---------------------------------------------------------------------
def bank_conflict_free(pitch: int, skew: tuple[int, ...], comps: int, d: int = 1, rows: int = 3) -> bool:
    """Whether one warp's stencil read hits 32 distinct banks: lane (g, tid) reads channel g at
    float rows g pitch + skew[g] + comps * k_pixel(tid, d) (+ a uniform shift for dz, s, i and the
    k-step; rows: a slice's rows a channel, `_plan.slice_rows`)."""
    seen = {(rows * g * pitch + skew[g] + comps * k_pixel(t, d)) % 32 for g in range(8) for t in range(4)}
    return len(seen) == 32


@functools.lru_cache(maxsize=64)
def row_layout(nx: int, comps: int, d: int = 1, rows: int = 3) -> tuple[int, tuple[int, ...]]:
    """(row pitch, skew per channel mod 8): the smallest pitch, then the lexicographically
    smallest skews (each <= pitch - row, and < 16: 4 bits a channel), with conflict-free reads;
    a row is x = -d .. nx + d - 1."""
    need = (nx + 2 * d) * comps

    def extend(pitch, skew):
        if len(skew) == 8:
            return skew
        for s in range(min(pitch - need + 1, 16)):
            cand = skew + (s,)
            banks = [(rows * g * pitch + cand[g] + comps * k_pixel(t, d)) % 32 for g in range(len(cand)) for t in range(4)]
            if len(set(banks)) == len(banks) and (found := extend(pitch, cand)):
                return found
        return None

    for pitch in range(need, need + 64):
        if skew := extend(pitch, ()):
            return pitch, skew
    raise ValueError(f"no bank-conflict-free row layout for nx={nx}, comps={comps}, d={d}, rows={rows}")


def gy_pitch(nx: int, comps: int = 3) -> tuple[int, int]:
    """Floats per output channel of the staged gY rows (scalar [o][x], vector [o][x][comps] or
    planar [o][comps][x]): the smallest >= the row with pitch = 8 (mod 32), so the fragment reads
    (float2 at o = g, pixel 2 tid; vector: float2 per component) are conflict-free per half warp."""
    return tuple(-(-(n - 8) // 32) * 32 + 8 for n in (nx, comps * nx))


@dataclasses.dataclass(frozen=True)
class Layout:
    nx: int
    pitch: tuple[int, int]
    skew: tuple[tuple[int, ...], tuple[int, ...]]
    n_weights: int
    dilation: int = 1
    row: int = 0  # the rows' x extent (0: nx, one window); nx is a CTA's x window
    dims: int = 3  # the layer's spatial dimensions
    m_tiles: int = 1  # m16 tiles of output channels a launch holds (`m_tiles`)

    @property
    def windows(self) -> int:
        return (self.row or self.nx) // self.nx

    @property
    def rows(self) -> int:
        return _plan.slice_rows(self.dims)

    @property
    def comps(self) -> int:
        return _plan.vector_comps(self.dims)

    @property
    def region(self) -> tuple[int, int]:
        return 0, self.rows * CHANNELS * self.pitch[0]

    @property
    def slice_floats(self) -> int:
        """One y slice: the rows (3 z rows in 3D, 1 in 2D) of the CTA's 16 channels of both
        blocks, 16-byte multiple."""
        return -(-(self.region[1] + self.rows * CHANNELS * self.pitch[1]) // 4) * 4

    @property
    def gy_floats(self) -> int:
        """One staged gY row (`sum_channels` output channels, both blocks)."""
        return sum_channels(self.dims) * sum(gy_pitch(self.nx, self.comps))

    @property
    def partial_floats(self) -> int:
        """One CTA's partial dW, fragment order: 2 warp halves x weights x m-tiles x 4 x 32 lanes."""
        return 2 * self.n_weights * self.m_tiles * 4 * 32

    @property
    def result_floats(self) -> int:
        """One CTA's row of the kernel's result: its partial dW, then its cotangent sums."""
        return self.partial_floats + sum_floats(self.dims)

    @property
    def threads(self) -> int:
        return 4 * self.nx

    @property
    def reduction_floats(self) -> int:
        """The segments' partials meeting in shared memory at the end, from float 0 (over the
        ring, and in 2D at 32 outputs past it); the threads' cotangent sums follow them."""
        return max(3 * self.slice_floats, (self.nx // SEG) * self.partial_floats)

    @property
    def smem_bytes(self) -> int:
        """The ring of three y slices and two gY rows (the next one lands during this one), or the
        segments' partials and the threads' sums at the end where they need more."""
        return 4 * max(3 * self.slice_floats + 2 * self.gy_floats, self.reduction_floats + self.threads)


def layout(spec: ConvSpec, nx: int) -> Layout:
    """The layout of rows of nx pixels: a CTA's x window (`_plan.window` on this kernel's shared
    memory) and its row layouts."""
    w = _plan.window(spec, nx, smem=lambda w: window_layout(spec, w).smem_bytes) or nx
    return dataclasses.replace(window_layout(spec, w), row=nx)


def window_layout(spec: ConvSpec, nx: int) -> Layout:
    """The shared-memory layout of one CTA's x window of nx pixels."""
    d = dilation(spec) or 1
    rows = _plan.slice_rows(spec.D)
    p0, s0 = row_layout(nx, 1, d, rows)
    p1, s1 = row_layout(nx, _plan.vector_comps(spec.D), d, rows)
    return Layout(nx, (p0, p1), (s0, s1), len(weights(spec)), d, dims=spec.D, m_tiles=m_tiles(spec.out_keys[0][2]))


def grid(spec: ConvSpec, spatial, strip: int) -> tuple[int, int, int]:
    """CTAs per batch element: (x windows x y phases x y strips, z, channel groups of 16); at
    dilation d a strip holds rows of one phase (y mod d), d phases of ny / d rows. `spatial`:
    (nz, ny, nx), or a 2D layer's (ny, nx)."""
    nz, ny, nx = _plan.kernel_spatial(spec, spatial)
    d = dilation(spec) or 1
    return layout(spec, nx).windows * d * -(-(ny // d) // strip), nz, spec.in_keys[0][2] // CHANNELS


def scratch_bytes(spec: ConvSpec, spatial, strip: int, batch: int = 1) -> int:
    """The per-CTA partials (dW and the cotangent sums) the kernel returns (XLA sums them over
    the CTAs)."""
    strips, nz, groups = grid(spec, spatial, strip)
    return 4 * batch * strips * nz * groups * layout(spec, spatial[-1]).result_floats


# ---- coverage ---------------------------------------------------------------------------------
def coverage(spec: ConvSpec, spatial, dtype=None) -> tuple[bool, str]:
    """The forward's layers (which have both input blocks with the same channel count, so a CTA
    walks 16 channels of each) within this kernel's shared memory, which holds one channel group
    (so 32 + 32 input channels at x extent 64 fit here, not in the forward), and the weight
    gradient's compiled passes. D = 2 layers as the 2D forward's (component-planar blocks, 16 or 32
    outputs; `spatial` (ny, nx)), 32 outputs on x windows of 32 or 64 (the cotangent sums' split)."""
    if spec.D not in INCLUDES:
        return False, f"D={spec.D}; the CUDA weight gradient is compiled for D=3 and D=2 layers"
    d = dilation(spec)
    if d > 1 and not _plan.dilated_enabled():
        return False, f"the dilated weight gradient is turned off ({_plan.DILATED_ENV}=0)"
    spatial = _plan.kernel_spatial(spec, spatial)
    ok, why = _plan.layer_coverage(spec, spatial, dtype, smem=lambda nx: layout(spec, nx).smem_bytes,
                                   dilations=DILATIONS)
    if not ok:
        return False, why
    if dw_source(_plan.undilated(spec)) != compiled_source(spec.D):
        return False, f"the layer's basis is not the one kernels/cuda/{INCLUDES[spec.D].name} was generated for"
    o = spec.out_keys[0][2]
    if spatial is not None and (w := layout(spec, int(spatial[2])).nx) % o:
        return False, (f"{o} output channels a launch need x windows of a multiple of {o} pixels (the cotangent "
                       f"sums' split); rows of {spatial[2]} have {w}")
    return True, (f"CUDA weight gradient: D={spec.D} {{scalar, vector}} torus layer"
                  + (f", dilation {d}" if d > 1 else "") + ", tf32 mma.sync")


FP32_ENV = "GINJAX_CUDA_FP32_WEIGHT_GRAD"


def fp32_enabled() -> bool:
    """Whether the fp32 (3xTF32) weight gradient may run: GINJAX_CUDA_FP32_WEIGHT_GRAD="1" (and
    the forward's GINJAX_CUDA_FP32 not "0"); "0", the default, leaves fp32 weight gradients on
    Triton's kernel. Its GPU tests pass on small grids, but on the standard layer (64^3, batch 4)
    with 64-row strips it missed fp32's tolerance (2.7e-5 against 1e-5 on the H200, bench/NOTES.md
    "Session 25"), though it took that layer's fp32 fwd_bwd from 5.72 to 3.86 ms; `FP32_STRIP`
    (not yet run on a GPU) is the fix to check before it is turned on."""
    return env_choice(FP32_ENV, ("0", "1"), "0") == "1"


def fp32_coverage(spec: ConvSpec, spatial, dtype=None) -> tuple[bool, str]:
    """`coverage` of the fp32 (3xTF32) weight gradient, compiled at dilation 1 on whole rows, where
    `fp32_enabled`."""
    if not fp32_enabled():
        return False, f"the fp32 (3xTF32) weight gradient is turned off ({FP32_ENV}=0, the default)"
    return _plan.split_coverage("weight gradient", coverage(spec, spatial, dtype), spec, spatial, layout)


@functools.lru_cache(maxsize=2)
def compiled_source(dims: int = 3) -> str:
    """The committed walk the weight gradient of `dims` spatial dimensions was compiled from ("" if
    absent)."""
    path = INCLUDES[dims]
    return path.read_text() if path.exists() else ""


# ---- generated source -------------------------------------------------------------------------
def dw_source(spec: ConvSpec) -> str:
    """The generated C++ of the weight gradient's passes, tables and row layouts
    (kernels/cuda/weight_gradient_d3.inc, weight_gradient_d2.inc)."""
    ps = passes(spec)
    comps, rows = _plan.vector_comps(spec.D), _plan.slice_rows(spec.D)
    taps = "x".join(["3"] * spec.D)
    keys = [p.key for p in ps]
    assert keys == sorted(keys, reverse=True) and keys[-1] == 0, "the vector passes, then the scalar one"
    lines = [
        f"// Generated by kernels/cuda/_dw_plan.py (dw_source) for the D={spec.D} {{scalar, vector}} layer with",
        f"// {taps} invariant filters; tests/{PLAN_TESTS[spec.D]} checks it is up to date.",
        f"// GJ_DW_P<k>_STENCIL(ROW, ZC, XC, NZ, MID): pass k's walk (stencil_d{spec.D}.inc's hooks; the channel",
        "// pair ch of ROW / NZ is the k-step here), MID() after the dy = -1 rows of a phase's last pass.",
        "// kDwP<k>Group / kDwP<k>Weight: each pass tile's output group (its gY) and accumulator.",
        "// GJ_DW_COMPS: a vector block's components; GJ_DW_ROWS: rows a y slice holds per channel;",
        "// GJ_DW_SUM_CHANNELS: output channels a CTA's cotangent sums have room for (the widest launch).",
        f"#define GJ_DW_COMPS {comps}",
        f"#define GJ_DW_ROWS {rows}",
        f"#define GJ_DW_SUM_CHANNELS {sum_channels(spec.D)}",
        f"#define GJ_DW_WEIGHTS {len(weights(spec))}",
        f"#define GJ_DW_PASSES {len(ps)}",
        "#define GJ_DW_WALK " + " ".join(f"GJ_DW_PASS({k})" for k in range(len(ps))),
        "// Row layouts per dilation 1, 2, 4, 8 and x extent 16, 32, 48, 64 (row_layout): pitch, skew by",
        f"// channel mod 8 packed 4 bits each, for the scalar (S: comps 1) and vector (V: comps {comps}) block;",
        "// gY staging pitches per x extent.",
    ]
    shape = f"[{len(DILATIONS)}][{len(NX_COVERED)}]"
    for name, c in (("S", 1), ("V", comps)):
        lays = [[row_layout(nx, c, d, rows) for nx in NX_COVERED] for d in DILATIONS]
        assert all(max(sk) < 16 for row in lays for _, sk in row)
        lines.append(f"constexpr int kDwPitch{name}{shape} = {{"
                     + ", ".join("{" + ", ".join(str(p) for p, _ in row) + "}" for row in lays) + "};")
        lines.append(f"constexpr unsigned kDwSkew{name}{shape} = {{"
                     + ", ".join("{" + ", ".join(f"{sum(s << (4 * k) for k, s in enumerate(sk))}u" for _, sk in row) + "}"
                                 for row in lays) + "};")
    for b in (0, 1):
        lines.append(f"constexpr int kGyPitch{b}[4] = {{"
                     + ", ".join(str(gy_pitch(nx, comps)[b]) for nx in NX_COVERED) + "};")
    for k, p in enumerate(ps):
        lines += [
            f"#define GJ_DW_P{k}_TILES {len(p.tiles)}",
            f"#define GJ_DW_P{k}_KEY {p.key}",
            f"__device__ constexpr int kDwP{k}Group[GJ_DW_P{k}_TILES] = {{" + ", ".join(map(str, p.group)) + "};",
            f"__device__ constexpr int kDwP{k}Weight[GJ_DW_P{k}_TILES] = {{" + ", ".join(map(str, p.weight)) + "};",
            f"#define GJ_DW_P{k}_STENCIL(ROW, ZC, XC, NZ, MID) \\",
        ]
        mid = not p.last
        for grp in p.groups:
            if grp.dy > -1 and not mid:
                lines.append("  MID() \\")
                mid = True
            parts = [f"ROW({dz}, {grp.dy}, {grp.i})" for dz in grp.dzs]
            parts += [f"ZC({zk})" for zk in grp.zc] + [f"XC({zk}, {xk})" for zk, xk in grp.xc]
            parts += [f"NZ({t}, {zk}, {xk}, {_plan._float(c)})" for t, zk, xk, c in grp.uses]
            lines.append("  " + " ".join(parts) + " \\")
        if not mid:
            lines.append("  MID() \\")
        lines.append("  /* end */")
    return "\n".join(lines) + "\n"


# ---- the partials back to weights -------------------------------------------------------------
def unpack(spec: ConvSpec, partial, xp=np) -> tuple:
    """Per pair (o, c, F) from the partials summed over a batch element's CTAs, shaped
    (channel groups, 2 halves, weights, m-tiles, 4, 32): fragment k of m-tile m of lane (g, tid) is
    D[o = 16 m + g + 8 (k >> 1)][c = 2 tid + (k & 1)] of half h's chunk, c = 16 group + 8 h + that."""
    n_groups, _, n_w, n_m, _, _ = partial.shape
    d = partial.reshape(n_groups, 2, n_w, n_m, 2, 2, 8, 4)  # group, half, w, m-tile, o-high, c-low, g, tid
    d = d.transpose(2, 3, 4, 6, 0, 1, 7, 5).reshape(n_w, 16 * n_m, n_groups * CHANNELS)  # w, o, c
    index = {w: k for k, w in enumerate(weights(spec))}
    out = []
    for t, pair in enumerate(spec.pairs):
        o = spec.out_keys[pair.out_index][2]
        out.append(xp.stack([d[index[t, f], :o] for f in range(pair.basis.n_filters)], axis=-1))
    return tuple(out)


def unpack_sums(o: int, summed, dims: int = 3) -> tuple:
    """The cotangents' spatial sums, (o,) scalar and (o, D) vector, from the sums part of the
    CTAs' rows summed over the CTAs (`sum_floats`, leading axes kept)."""
    n, comps = sum_channels(dims), _plan.vector_comps(dims)
    vector = summed[..., n : n + comps * o]
    return summed[..., :o], vector.reshape(summed.shape[:-1] + (o, comps))
