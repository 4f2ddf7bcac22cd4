"""The static plan of the Mosaic GPU forward spike (kernels/pallas/mosaic_fwd.py): pure Python and
numpy, so the geometry, the TMA box arithmetic and the weight packing are checked on a CPU.

The kernel evaluates the factorised form (docs/ARCHITECTURE.md) for one output row of 64 pixels
(one z, one y, every x) per program and a chunk of CHUNK input channels at a time:

    Z_g[p, c]      = sum over the basis nonzeros (tap, i, coef) of g:  coef * X_a[c, shifted p, i]
    out_(b,j)[p, o] += sum over g in group (b, j), c:   Z_g[p, c] * w_t[o, c, f]

A *group* is one output block b and component j (scalar out; vector out j = 0, 1, 2); its Z tiles
are the (term, f) with a nonzero coefficient into (b, j). The group's GEMM is one wgmma with
M = 64 pixels, K = (Z tiles of the group) x CHUNK, N = the output channels.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import numpy as np

from .._spec import ConvSpec
from ._plan import forward_plan, term_table

ROW = 64  # pixels per program: one x row (the wgmma M)
CHUNK = 8  # input channels per pass: one (8, 8) tf32 tile column of the A operand
SWIZZLE = 32  # bytes; tf32 tiles are (8, SWIZZLE // 4)
TMA_ALIGN_FLOATS = 4  # innermost TMA box starts and row strides are multiples of 16 bytes
PAD = TMA_ALIGN_FLOATS  # pixels of wrap before an x row: whole pixels keep a vector row a
# (pixels, 3) array, and 4 pixels keep every row start 16-byte aligned
PAD_RIGHT = 2 * PAD  # pixels of wrap after it: 4 more than needed make the row pitch 76 (scalar)
# and 228 (vector) floats, for which the tile reads below hit 32 distinct banks (72 and 216: 2-way)
ROW_PIXELS = ROW + PAD + PAD_RIGHT


@dataclasses.dataclass(frozen=True)
class Group:
    """Z tiles into one output block `dst` at component `j`: per tile (term, f) and its basis
    nonzeros ((dz, dy, dx), source block, component i, coefficient)."""

    dst: int
    j: int
    tiles: tuple[tuple[int, int], ...]
    entries: tuple[tuple[tuple[tuple[int, int, int], int, int, float], ...], ...]

    @property
    def k(self) -> int:
        return len(self.tiles) * CHUNK


@dataclasses.dataclass(frozen=True)
class MosaicPlan:
    spatial: tuple[int, int, int]
    channels: int  # input channels per key (every key)
    out_channels: int
    groups: tuple[Group, ...]

    @property
    def n_chunks(self) -> int:
        return self.channels // CHUNK

    def row_floats(self, k: int) -> int:
        """Floats of one x row of a block of tensor order k, wrap-padded on both sides."""
        return ROW_PIXELS * 3**k


def coverage(spec: ConvSpec, spatial) -> tuple[bool, str]:
    """What the spike covers: the standard 3D {scalar, vector} layer on a torus with 3^3 filters,
    x extent 64, channels a multiple of 8 (input) and 8 (output, at most 256), float32."""
    if spec.D != 3:
        return False, f"D={spec.D}; the Mosaic spike covers D=3"
    ks_in = [k for k, _, _ in spec.in_keys]
    ks_out = [k for k, _, _ in spec.out_keys]
    if ks_in != [0, 1] or ks_out != [0, 1]:
        return False, f"keys of orders {ks_in} -> {ks_out}; the spike covers [0, 1] -> [0, 1]"
    cin = {c for _, _, c in spec.in_keys}
    cout = {c for _, _, c in spec.out_keys}
    if len(cin) != 1 or len(cout) != 1:
        return False, "every key must have the same channel count (in and out)"
    (c,), (o,) = cin, cout
    if c % CHUNK or o % 8 or o > 256:
        return False, f"channels in (={c}) must be a multiple of {CHUNK}, out (={o}) of 8 and <= 256"
    if spec.filter_shape != (3, 3, 3) or spec.rhs_dilation != (1, 1, 1) or not spec.is_default_stride:
        return False, "3x3x3 filters, stride 1, no dilation only"
    if not all(spec.is_torus) or spec.torus_pad != ((1, 1),) * 3 or any(any(z) for z in spec.zero_pad):
        return False, "torus padding (1, 1) on every axis only"
    if spatial is not None and tuple(spatial)[2] != ROW:
        return False, f"the x extent (={tuple(spatial)[2]}) must be {ROW}"
    return True, "D=3 {scalar, vector} torus layer, x extent 64"


@functools.lru_cache(maxsize=32)
def make_plan(spec: ConvSpec, spatial: tuple[int, int, int]) -> MosaicPlan:
    ok, why = coverage(spec, spatial)
    if not ok:
        raise ValueError(f"`spec` is not covered by the Mosaic GPU spike: {why}")
    plan = forward_plan(spec, tuple(spatial))
    tables = [term_table(plan, t) for t in plan.terms]  # (taps, I, J, F)
    groups = []
    for dst, (k_out, _) in enumerate(plan.dst):
        for j in range(3**k_out):
            tiles, entries = [], []
            for t, term in enumerate(plan.terms):
                if term.dst != dst:
                    continue
                for f in range(term.n_filters):
                    col = tables[t][:, :, j, f]  # (taps, I)
                    nz = [
                        (tuple(int(d) - 1 for d in np.unravel_index(tap, (3, 3, 3))), term.src, i, float(col[tap, i]))
                        for tap, i in zip(*np.nonzero(col))
                    ]
                    if nz:
                        tiles.append((t, f))
                        entries.append(tuple(nz))
            groups.append(Group(dst, j, tuple(tiles), tuple(entries)))
    c = spec.in_keys[0][2]
    o = spec.out_keys[0][2]
    return MosaicPlan(tuple(spatial), c, o, tuple(groups))


def shared_reads(plan: MosaicPlan):
    """The stencil walked by source tile: per distinct (offset (dz, dy, dx), source block, component
    i), the (group, tile, coefficient) it feeds. Each shifted tile is then read from shared memory
    once per chunk instead of once per nonzero (108 reads instead of 342 for the standard layer)."""
    reads: dict = {}
    for gi, g in enumerate(plan.groups):
        for ti, entries in enumerate(g.entries):
            for offset, a, i, coef in entries:
                reads.setdefault((offset, a, i), []).append((gi, ti, coef))
    return tuple((key, tuple(uses)) for key, uses in sorted(reads.items()))


def halo_row(coord, d: int, n: int, rem=operator.mod):
    """Source row of offset d in {-1, 0, 1} on a torus axis of n cells; the kernel passes lax.rem
    (a non-negative dividend, so truncating and flooring remainders agree)."""
    return rem(coord + (d + n), n)


def bank_conflicts(row_floats: int, pixel_stride: int) -> int:
    """Largest number of distinct addresses that share a bank in one warp's read of a tile: the
    tiles' register layout (Mosaic's 32-bit WGMMA accumulator layout) gives a warp 8 consecutive
    pixels x 4 channels 2 apart; a channel is `row_floats` floats from the next."""
    banks: dict[int, set[int]] = {}
    for lane in range(32):
        p, c = lane // 4, 2 * (lane % 4)
        addr = c * row_floats + p * pixel_stride
        banks.setdefault(addr % 32, set()).add(addr)
    return max(len(a) for a in banks.values())


def pixel_start(dx: int) -> int:
    """First pixel of the shifted x window inside a wrap-padded row."""
    return PAD + dx


def weight_sets(plan: MosaicPlan) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The distinct tile lists of the groups (the vector components share one): one packed weight
    operand each."""
    return tuple(dict.fromkeys(g.tiles for g in plan.groups))


def pack_weights(plan: MosaicPlan, weights, xp=np):
    """Per weight set, W^T chunks (n_chunks, out channels, K) with K index = tile * CHUNK + channel
    in the chunk: the wgmma B operand, stored K-major as tf32 needs."""
    out = []
    for tiles in weight_sets(plan):
        cols = [weights[t][:, :, f] for t, f in tiles]  # each (o, c)
        w = xp.stack(cols, axis=1)  # (o, tiles, c)
        o, n_tiles, c = w.shape
        w = w.reshape(o, n_tiles, c // CHUNK, CHUNK).transpose(2, 0, 1, 3)
        out.append(w.reshape(c // CHUNK, o, n_tiles * CHUNK))
    return out


def smem_bytes(plan: MosaicPlan) -> int:
    """Shared memory of one program: the 3x3 halo rows of one channel chunk of both blocks, one A
    tile per group, the packed weights of every chunk, the output rows."""
    halo = 9 * CHUNK * (plan.row_floats(0) + plan.row_floats(1))
    a_tiles = sum(ROW * g.k for g in plan.groups)
    w = plan.n_chunks * plan.out_channels * CHUNK * sum(len(t) for t in weight_sets(plan))
    out = plan.out_channels * (ROW + 3 * ROW)
    return 4 * (halo + a_tiles + w + out)


def tma_box_ok(start_floats: int, box_floats: int, row_floats: int) -> bool:
    """Whether an innermost TMA box is legal: 16-byte aligned start and extent, at most 256
    elements, and a 16-byte multiple row pitch (the strides of every outer axis)."""
    return (
        start_floats % TMA_ALIGN_FLOATS == 0
        and box_floats % TMA_ALIGN_FLOATS == 0
        and 0 < box_floats <= 256
        and row_floats % TMA_ALIGN_FLOATS == 0
    )
