"""The invariant bases' nonzeros: the sparse stencil every fused kernel unrolls.

Pair t's basis B[f, y, i, j] (filter f, tap y, input component i, output component j) is mostly
zeros, and its nonzeros are few and mostly +-1; the fused kernels compute

    Z[c, f, j, x] = sum over the nonzeros (y, i) of B[f, y, i, j] * X_a[c, x + y * rhs_dilation - pad, i]

once per pair, then contract Z with the weights. Taps are flattened row-major over the D axes.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .._spec import ConvSpec


def pair_basis(spec: ConvSpec, t: int) -> np.ndarray:
    """Pair t's basis as (F, taps, I, J): filters, flattened taps, input and output components."""
    pair = spec.pairs[t]
    k_a = spec.in_keys[pair.in_index][0]
    k_b = spec.out_keys[pair.out_index][0]
    return pair.basis.array.reshape(pair.basis.n_filters, spec.taps, spec.D**k_a, spec.D**k_b)


@dataclasses.dataclass(frozen=True)
class Nonzero:
    """One nonzero B[f, tap, i, j] = value of pair `pair`, whose input key is `key`."""

    pair: int
    key: int
    f: int
    tap: int
    i: int
    j: int
    value: float


@functools.lru_cache(maxsize=256)
def basis_nonzeros(spec: ConvSpec) -> tuple[Nonzero, ...]:
    """Every basis nonzero of the layer, ordered by (pair, f, tap, i, j); values in float64."""
    out = []
    for t, pair in enumerate(spec.pairs):
        basis = pair_basis(spec, t)
        for f, y, i, j in zip(*np.nonzero(basis)):
            out.append(Nonzero(t, pair.in_index, int(f), int(y), int(i), int(j), float(basis[f, y, i, j])))
    return tuple(out)


def count_nonzeros(spec: ConvSpec) -> int:
    return len(basis_nonzeros(spec))


@functools.lru_cache(maxsize=256)
def nonzeros_by_read(spec: ConvSpec) -> dict[tuple[int, int, int], tuple[Nonzero, ...]]:
    """The nonzeros grouped by the input tile they read, (input key, tap, component i), in
    (pair, f, j) order inside a group: each such tile is loaded once and feeds every Z[(pair, f, j)]
    of its group. Groups are ordered by (key, tap, i). Read-only (cached)."""
    groups: dict[tuple[int, int, int], list[Nonzero]] = {}
    for nz in basis_nonzeros(spec):
        groups.setdefault((nz.key, nz.tap, nz.i), []).append(nz)
    return {read: tuple(groups[read]) for read in sorted(groups)}
