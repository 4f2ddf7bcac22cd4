"""Filter groups: a layer whose forward kernel would keep too many Z tiles live runs as several
launches, each over a group of its pairs' filters, each adding into the outputs the groups before
it wrote.

The forward kernel keeps a Z tile (BP x BC, one per pair, filter and filter component) in
registers from its first tap to its last (`_stencil._schedule`). The standard layer peaks at 10;
a layer with 2-tensors (d3_n64_b2_c8_k2: 9 pairs, 50 filters on the 2-tensor pair alone) peaks at
86, which spills and takes minutes to compile (bench/NOTES.md, "d3_n64_b2_c8_k2"). ConvContract
is a sum over pairs and over each pair's filters, so any partition of the filters gives the same
outputs as the sum of the partial layers' outputs. Each group is a layer of its own (its own
custom_vjp: the input gradients add up, each weight gradient is that group's slice of the
filters), so the three directions all run on kernels of bounded size.

Cost: a group reads the input keys it touches and writes the output keys it touches; a group
after the first to write an output key also reads it (its kernel's epilogue adds the output so far,
its `priors`, in the same buffer: no partial outputs are kept and no separate sum runs). Groups
are packed so that a launch does as much as its Z budget allows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import numpy as np

from .._spec import ConvSpec, FilterBasis, Pair
from ._kernel import plan_kernel
from ._tiling import BlockSizes, Geometry

# Z tiles live at once that a group may reach: the standard layer's 10 plus headroom. Past ~16 the
# forward kernel's Z tiles and accumulators no longer fit the register file at the default tiling.
LIVE_Z_CAP = 16


@dataclasses.dataclass(frozen=True)
class FilterGroup:
    """One launch of a split layer.

    Attributes:
        spec: the partial layer (its own key and pair indices, no bias modes).
        inputs: per input key of `spec`, the layer's input index.
        outputs: per output key of `spec`, the layer's output index.
        filters: per pair of `spec`, (the layer's pair index, the filter indices it takes).
    """

    spec: ConvSpec
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    filters: tuple[tuple[int, tuple[int, ...]], ...]


def _group(spec: ConvSpec, chunks: Sequence[tuple[int, tuple[int, ...]]]) -> FilterGroup:
    ins = sorted({spec.pairs[t].in_index for t, _ in chunks})
    outs = sorted({spec.pairs[t].out_index for t, _ in chunks})
    pairs = tuple(
        Pair(ins.index(spec.pairs[t].in_index), outs.index(spec.pairs[t].out_index),
             FilterBasis(np.asarray(spec.pairs[t].basis.array)[list(f)]))
        for t, f in chunks
    )
    sub = dataclasses.replace(spec, in_keys=tuple(spec.in_keys[a] for a in ins),
                              out_keys=tuple(spec.out_keys[b] for b in outs), pairs=pairs, bias_modes=())
    return FilterGroup(sub, tuple(ins), tuple(outs), tuple((t, tuple(f)) for t, f in chunks))


def peak_live_z(spec: ConvSpec, spatial: tuple[int, ...], mode: str, blocks: BlockSizes) -> int:
    """The most Z tiles the forward kernel of `spec` keeps live at once (from its generated plan)."""
    geometry = Geometry(tuple(spatial), (False,) * len(spec.in_keys), (False,) * len(spec.pairs))
    return plan_kernel(spec, geometry, mode, blocks).peak_live_z


@functools.lru_cache(maxsize=64)
def filter_groups(spec: ConvSpec, spatial: tuple[int, ...], mode: str, blocks: BlockSizes,
                  cap: int = LIVE_Z_CAP) -> Optional[tuple[FilterGroup, ...]]:
    """The launches of `spec` where its forward kernel would keep more than `cap` Z tiles live,
    else None (one launch).

    The filters, in pair order, are cut into consecutive runs: each run is the longest that
    keeps its kernel within `cap` (doubling, then bisecting; a single filter always makes a run:
    its Z tiles are its components). Runs may span pairs: a group of small pairs is one launch.
    """
    if peak_live_z(spec, spatial, mode, blocks) <= cap:
        return None
    items = [(t, f) for t, pair in enumerate(spec.pairs) for f in range(pair.basis.n_filters)]

    def fits(start: int, stop: int) -> bool:
        return peak_live_z(_group(spec, _chunks(items[start:stop])).spec, spatial, mode, blocks) <= cap

    groups, start = [], 0
    while start < len(items):
        good, step = start + 1, 1  # [start, good) fits (one filter always counts as fitting)
        while good + step <= len(items) and fits(start, good + step):
            good, step = good + step, 2 * step
        bad = min(good + step, len(items) + 1)  # [start, bad) does not fit (or runs past the end)
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if fits(start, mid) else (good, mid)
        groups.append(_group(spec, _chunks(items[start:good])))
        start = good
    return tuple(groups)


def _chunks(items: Sequence[tuple[int, int]]) -> list[tuple[int, tuple[int, ...]]]:
    """(pair, filter) items -> per pair, in order, its filter indices."""
    chunks: list = []
    for t, f in items:
        if chunks and chunks[-1][0] == t:
            chunks[-1] = (t, chunks[-1][1] + (f,))
        else:
            chunks.append((t, (f,)))
    return chunks
