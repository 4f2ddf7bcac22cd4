"""The input gradient of a ConvContract as the forward of a transposed layer.

The operation's transpose in X is again a ConvContract, with the roles of the keys swapped,
every basis flipped in space and its tensor indices transposed, and the weights transposed in
their channel axes:

    dX_a[c, x, i] = sum_b sum_{o, f} w[o, c, f] sum_{y', j} B'_f[y', j, i] G_b[o, x + y' * r - pad', j]
    B'_f[y', j, i] = B_f[M - 1 - y', i, j],     w'[c, o, f] = w[o, c, f]

so every fused backend computes the input gradient with its forward kernel on `transposed_spec`
(no dense filter, no padded copy). Padding transposes per axis: a torus wrap (lo, hi) becomes
(hi, lo); zeros (lo, hi) become (R - lo, R - hi) with R = (M - 1) * rhs_dilation (negative means
cropping, which the kernels' index arithmetic handles).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._spec import ConvSpec, FilterBasis, Pair


def transpose_blocker(spec: ConvSpec) -> str:
    """Why `spec`'s input gradient is not the forward of a plain layer, or "" if it is: stride
    or lhs_dilation, an axis that both wraps and zero-pads, or one that wraps other than the
    (M - 1) * rhs_dilation cells that keep its size."""
    if not spec.is_default_stride:
        return f"stride {spec.stride} / lhs_dilation {spec.lhs_dilation} (the transpose needs 1 and 1)"
    for ax, (tp, zp, m, r) in enumerate(zip(spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation)):
        if any(tp) and any(zp):
            return f"axis {ax} both wraps and zero-pads"
        if any(tp) and tp[0] + tp[1] != (m - 1) * r:
            return f"axis {ax} wraps by {tp}, not the {(m - 1) * r} cells that keep its size"
    return ""


@functools.lru_cache(maxsize=256)
def transposed_spec(spec: ConvSpec) -> Optional[tuple[ConvSpec, tuple[int, ...]]]:
    """The layer whose forward is `spec`'s input gradient, and which input keys it produces.

    Returns None where `transpose_blocker` gives a reason (the input gradient then runs through
    `dense`). Input keys that no pair reads get no output block (their gradient is zero).
    """
    if transpose_blocker(spec):
        return None
    torus_pad, zero_pad = [], []
    for (wlo, whi), (zlo, zhi), m, rd in zip(spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation):
        reach = (m - 1) * rd
        if wlo or whi:
            torus_pad.append((whi, wlo))
            zero_pad.append((0, 0))
        else:
            torus_pad.append((0, 0))
            zero_pad.append((reach - zlo, reach - zhi))
    used = tuple(sorted({p.in_index for p in spec.pairs}))
    index = {a: n for n, a in enumerate(used)}
    D = spec.D
    pairs = []
    for p in spec.pairs:
        k_a, k_b = spec.in_keys[p.in_index][0], spec.out_keys[p.out_index][0]
        arr = p.basis.array
        arr = np.flip(arr, axis=tuple(range(1, 1 + D)))
        tensor_a = list(range(1 + D, 1 + D + k_a))
        tensor_b = list(range(1 + D + k_a, 1 + D + k_a + k_b))
        arr = np.transpose(arr, [0] + list(range(1, 1 + D)) + tensor_b + tensor_a)
        pairs.append(Pair(p.out_index, index[p.in_index], FilterBasis(arr)))
    spec_t = dataclasses.replace(
        spec,
        in_keys=spec.out_keys,
        out_keys=tuple(spec.in_keys[a] for a in used),
        pairs=tuple(pairs),
        torus_pad=tuple(torus_pad),
        zero_pad=tuple(zero_pad),
        bias_modes=(),  # the input gradient has no bias (and other output keys)
    )
    return spec_t, used


def transposed_weights(weights: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    """w'[..., c, o, f] = w[..., o, c, f] (small: the weights, not the filters)."""
    return tuple(jnp.swapaxes(w, -3, -2) for w in weights)


def scatter_input_grads(used: Sequence[int], grads: Sequence[jax.Array], inputs: Sequence[jax.Array], dtype=None):
    """Per input key, the transposed layer's output for it, or zeros for a key no pair reads."""
    by_key = dict(zip(used, grads))
    return tuple(
        by_key[a] if a in by_key else jnp.zeros(x.shape, dtype or x.dtype) for a, x in enumerate(inputs)
    )


def signed_permutation(target: FilterBasis, source: FilterBasis) -> Optional[tuple[tuple[int, ...], tuple[float, ...]]]:
    """(perm, signs) with target[f] == signs[f] * source[perm[f]] for every filter f, or None.

    The transposed layer of an invariant basis is often the same filters up to signs (a vector ->
    scalar filter is odd under the point reflection the flip is): then a kernel built for the
    forward's basis computes the input gradient too, with the weights moved by `permute_filters`."""
    a, b = target.array, source.array
    if a.shape != b.shape:
        return None
    perm, signs, free = [], [], set(range(b.shape[0]))
    for f in range(a.shape[0]):
        hit = next(((g, s) for g in sorted(free) for s in (1.0, -1.0) if np.array_equal(a[f], s * b[g])), None)
        if hit is None:
            return None
        free.discard(hit[0])
        perm.append(hit[0])
        signs.append(hit[1])
    return tuple(perm), tuple(signs)


def with_bases_of(spec: ConvSpec, like: ConvSpec):
    """`spec` rewritten on the bases of `like`'s pairs with the same (input, output) keys, and the
    weight map that keeps the layer the same: (spec', fn(weights) -> weights'), or None where some
    pair's basis is not a signed permutation of `like`'s."""
    bases = {(p.in_index, p.out_index): p.basis for p in like.pairs}
    maps, pairs = [], []
    for p in spec.pairs:
        source = bases.get((p.in_index, p.out_index))
        found = None if source is None else signed_permutation(p.basis, source)
        if found is None:
            return None
        maps.append(found)
        pairs.append(Pair(p.in_index, p.out_index, source))

    def weights_for(weights: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        out = []
        for w, (perm, signs) in zip(weights, maps):
            # sum_f w[f] B[f] = sum_f w[f] s_f A[perm f]: w'[perm f] = s_f w[f]
            moved = jnp.zeros_like(w).at[..., jnp.asarray(perm)].set(w * jnp.asarray(signs, w.dtype))
            out.append(moved)
        return tuple(out)

    return dataclasses.replace(spec, pairs=tuple(pairs)), weights_for
