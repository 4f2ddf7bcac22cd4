"""The static plan the native kernels read: geometry, padding index tables and the basis nonzeros.

Everything here depends on the `ConvSpec`, the input spatial size and the tiling only; it is passed to the
XLA FFI call as attributes (int64 and float64 arrays), so the C++ side holds no state.

Index tables. Per axis, for q = out_pixel + tap * rhs_dilation (stride 1), the input cell to read
or -1 for a zero (kernels._fused.geometry).

Basis nonzeros. Per pair, its (f, j) rows in order, each a run of (flattened tap, input
component i, value) entries: Z[(c, f), j] = sum over the run of value * X[c, shifted by tap, i].
"""

from __future__ import annotations

import functools

import numpy as np

from .._fused import axes, basis_nonzeros
from .._spec import ConvSpec
from ._tiling import BlockSizes


@functools.lru_cache(maxsize=256)
def _basis_entries(spec: ConvSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pairs, rows, entries, values): per pair (in key, out key, F, first row); per (pair, f, j)
    row the start of its run of entries, (tap, i) and values, in the shared nonzeros' order."""
    runs: dict[tuple[int, int, int], list] = {}
    for nz in basis_nonzeros(spec):
        runs.setdefault((nz.pair, nz.f, nz.j), []).append(nz)
    pairs, rows, entries, values = [], [0], [], []
    for t, pair in enumerate(spec.pairs):
        J = spec.D ** spec.out_keys[pair.out_index][0]
        pairs.extend([pair.in_index, pair.out_index, pair.basis.n_filters, len(rows) - 1])
        for f in range(pair.basis.n_filters):
            for j in range(J):
                for nz in runs.get((t, f, j), ()):
                    entries.extend((nz.tap, nz.i))
                    values.append(nz.value)
                rows.append(len(values))
    as_i64 = lambda v: np.asarray(v, dtype=np.int64)
    return as_i64(pairs), as_i64(rows), as_i64(entries), np.asarray(values, dtype=np.float64)


@functools.lru_cache(maxsize=256)
def _plan(spec: ConvSpec, spatial: tuple[int, ...], blocks: BlockSizes) -> tuple[tuple[str, np.ndarray], ...]:
    out_spatial = spec.out_spatial(spatial)
    geom = [spec.D, blocks.tile_rows(out_spatial), *spatial, *out_spatial, *spec.filter_shape, *spec.rhs_dilation]
    tables = [axis.source_table() for axis in axes(spec, spatial)]
    keys = [len(spec.in_keys), len(spec.out_keys)]
    for k, _, c in spec.in_keys + spec.out_keys:
        keys.extend([c, spec.D**k])
    pairs, rows, entries, values = _basis_entries(spec)
    return (
        ("geom", np.asarray(geom, dtype=np.int64)),
        ("tables", np.concatenate(tables)),
        ("keys", np.asarray(keys, dtype=np.int64)),
        ("pairs", pairs),
        ("rows", rows),
        ("entries", entries),
        ("values", values),
    )


def plan_attributes(spec: ConvSpec, spatial: tuple[int, ...], blocks: BlockSizes = BlockSizes()) -> dict[str, np.ndarray]:
    """The FFI attributes of `spec` on inputs of `spatial` size (stride 1, lhs_dilation 1)."""
    return dict(_plan(spec, tuple(int(n) for n in spatial), blocks))

