"""The CUDA forward's stencil walk counted for any layer of 3^D filters (D = 2 or 3): how much
FP32 and shared-memory work the kernel's design (kernels/cuda/forward_kernel.cuh) would do on a
layer it does not cover yet, e.g. the 2-tensor layer d3_n64_b2_c8_k2 or the 2D layer
d2_n256_b16_c32, against the standard layer it runs today. A 2D layer's taps are the 3D walk's
dz = 0 plane: its row groups load one row each and form no z classes.

Each input key's Z tiles (output key, component j, pair, filter) are cut, in order, into
sub-phases of at most `cap` tiles, since a phase's tiles are all live in registers (27 is the
vector phase's 108 registers today). Each sub-phase is walked in the filters' symmetric basis, as
`kernels.cuda._walk.row_groups` walks the kernel's phases, and counted per warp, output row of
16 pixels and chunk of 8 channels:
  - FP32: `_walk.walk_cost`, 4 a tile use, 8 a z class, 4 an x class;
  - LDS: 8 shared loads a z row a row group loads (4 x positions x 2 channels).
A sub-phase re-reads the rows an earlier one of the same key read, so a smaller cap costs
shared-memory loads. At cap >= 27 the standard layer gives today's two phases exactly
(948 FP32 instructions; tests/test_bench_walk_cost.py).

    python -m bench.walk_cost --configs d3_n64_b4_c16,d3_n64_b2_c8_k2,d2_n256_b16_c32 --caps 20,27,40
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from kernels._spec import ConvSpec
from kernels.cuda._walk import Phase, PhaseTile, output_groups, row_groups, walk_cost

CHUNK = 8  # channels a warp's mma k-step takes (m16n8k8)
SEGMENT = 16  # pixels a warp's row covers


@dataclasses.dataclass(frozen=True)
class WalkCost:
    """Counts of one layer's walk at one cap (per warp, row and chunk; `*_total`: the layer's)."""

    cap: int
    phases: int
    tiles: int
    fp32: int
    lds: int
    fp32_total: int
    lds_total: int


def sub_phases(spec: ConvSpec, cap: int) -> tuple[Phase, ...]:
    """Every input key's tiles in sub-phases of at most `cap`, the keys highest order first (as
    the kernel walks the vector block before the scalar one); rows (dz, dy, i) dy-major."""
    if spec.D not in (2, 3) or tuple(spec.filter_shape) != (3,) * spec.D:
        raise ValueError(f"`spec` has D={spec.D} and filters {tuple(spec.filter_shape)}; the CUDA forward's "
                         "walk takes 3x3x3 (D=3) or 3x3 (D=2) filters")
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"`cap` (={cap!r}) must be a positive int")
    groups = output_groups(spec)  # the kernel's tiles, in its order, each with its nonzeros
    out = []
    for key in sorted({p.in_index for p in spec.pairs}, key=lambda a: -spec.in_keys[a][0]):
        tiles = [entries for _, _, group in groups for (t, _), entries in group if spec.pairs[t].in_index == key]
        for start in range(0, len(tiles), cap):
            rows: dict[tuple[int, int, int], list] = {}
            for index, entries in enumerate(tiles[start:start + cap]):
                for (dz, dy, dx), i, coef in entries:  # D = 2: the plane dz = 0
                    rows.setdefault((dz, dy, i), []).append((index, dx, coef))
            order = sorted(rows, key=lambda r: (r[1], r[0], r[2]))
            out.append(Phase(key, tuple(PhaseTile(0, 0, i) for i in range(len(tiles[start:start + cap]))),
                             tuple((r, tuple(rows[r])) for r in order)))
    return tuple(out)


def walk_counts(spec: ConvSpec, cap: int, channels: int, batch: int, spatial: tuple[int, ...]) -> WalkCost:
    """The walk's counts for `spec` at `cap`, and the layer's totals for `batch` grids of
    `spatial` with `channels` input channels a key (a multiple of CHUNK)."""
    if channels % CHUNK:
        raise ValueError(f"`channels` (={channels}) must be a multiple of {CHUNK}")
    phases = sub_phases(spec, cap)
    fp32 = sum(walk_cost(p) for p in phases)
    lds = sum(8 * len(g.dzs) for p in phases for g in row_groups(p))
    warp_rows = batch * int(np.prod(spatial)) // SEGMENT * (channels // CHUNK)
    return WalkCost(cap, len(phases), sum(len(p.tiles) for p in phases), fp32, lds, fp32 * warp_rows, lds * warp_rows)


def main(argv=None) -> int:
    from bench import _cases, _configs

    parser = argparse.ArgumentParser(prog="python -m bench.walk_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="d3_n64_b4_c16,d3_n64_b2_c8_k2,d2_n256_b16_c32")
    parser.add_argument("--caps", default="27")
    args = parser.parse_args(argv)
    caps = [int(c) for c in args.caps.split(",")]
    print("| config | cap | phases | tiles | FP32 / warp-row | LDS / warp-row | layer FP32 / LDS (M warp-instr.) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        cfg = _configs.CONFIGS[name]
        spec = _cases.layer_spec(cfg)
        for cap in caps:
            w = walk_counts(spec, cap, cfg.c, cfg.B, cfg.spatial)
            print(f"| {name} | {cap} | {w.phases} | {w.tiles} | {w.fp32:,} | {w.lds:,} | "
                  f"{w.fp32_total / 1e6:,.0f} / {w.lds_total / 1e6:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
