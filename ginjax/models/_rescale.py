"""Weight transfer between dimensions: extending and rescaling ConvContract weights.

The functions behind AnyDimensionalModel's static methods (`_extend_weights`, the
`*_rescale_weights` family and `_transfer_conv_weights`) and the filter-sum helpers
`get_scaled_filters` and `get_filter_sum` of ginjax.models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ginjax import geometric as geom

Key = tuple[tuple[bool, ...], int]
Weights = dict[Key, dict[Key, jax.Array]]
FilterTriple = tuple[jax.Array, jax.Array, int]


def get_scaled_filters(D: int, filter_block: jax.Array, weights: jax.Array) -> jax.Array:
    """Every filter multiplied by every weight.

    Args:
        D: dimension of the space.
        filter_block: filters, shape (n_filters, *spatial, *tensor).
        weights: shape (out_c, in_c, n_filters).

    Returns:
        shape (out_c, in_c, n_filters, *spatial, *tensor).
    """
    if weights.shape[-1] != filter_block.shape[0]:
        raise ValueError(
            f"get_scaled_filters: `weights` (shape {tuple(weights.shape)}) must have one entry "
            f"per filter along its last axis (n_filters={filter_block.shape[0]})"
        )
    extra = filter_block.ndim - 1  # spatial and tensor axes of one filter
    return filter_block[None, None] * weights.reshape(weights.shape + (1,) * extra)


def get_filter_sum(D: int, filter_block: jax.Array, weights: jax.Array) -> jax.Array:
    """Norm of the total of the weighted filters, summed over filters and pixels.

    Args:
        D: dimension of the space.
        filter_block: filters, shape (n_filters, *spatial, *tensor).
        weights: shape (out_c, in_c, n_filters).

    Returns:
        shape (out_c, in_c): the Frobenius norm of sum_{f, pixel} weights[..., f] filter_f[pixel].
    """
    # (out_c, in_c, *tensor) = sum over filters and pixels of the weighted filters
    tensor_sum = jnp.tensordot(weights, jnp.sum(filter_block, axis=tuple(range(1, 1 + D))), axes=1)
    flat = tensor_sum.reshape(tensor_sum.shape[:2] + (-1,))
    return jnp.linalg.norm(flat, axis=-1)


def _filter_k(block: jax.Array, D: int) -> int:
    return block.ndim - 1 - D


def _tensor_norm(block: jax.Array, D: int) -> jax.Array:
    """(n, *spatial, *tensor) -> (n, *spatial): Frobenius norm of each pixel's tensor."""
    return jnp.linalg.norm(block.reshape(block.shape[: 1 + D] + (-1,)), axis=-1)


def _nonzero_sum_mask(filter_block: jax.Array, D: int) -> jax.Array:
    """(n_filters,) True where a filter's pixel sum is not the zero tensor (up to rounding:
    relative to the filter's norm, sums below TINY count as zero)."""
    n = filter_block.shape[0]
    total = jnp.sum(filter_block, axis=tuple(range(1, 1 + D))).reshape((n, -1))
    size = jnp.linalg.norm(filter_block.reshape((n, -1)), axis=1)
    return jnp.linalg.norm(total, axis=1) > geom.TINY * size


def _same_filter_order(
    function: str, old_filters: jax.Array, old_D: int, new_filters: jax.Array, new_D: int
) -> int:
    """The tensor order k shared by the old and new filters, which the compatibility rescalings
    need to be the same."""
    k_old, k_new = _filter_k(old_filters, old_D), _filter_k(new_filters, new_D)
    if k_old != k_new:
        raise ValueError(f"{function}: old filters have order k={k_old}, new k={k_new}")
    return k_old


def _added_dimensions(function: str, old_D: int, new_D: int) -> int:
    """new_D - old_D, which the compatibility rescalings need to be positive."""
    d_up = new_D - old_D
    if d_up <= 0:
        raise ValueError(f"{function}: new D (={new_D}) must exceed old D (={old_D})")
    return d_up


def _check_collapses_onto_old(function: str, achieved: jax.Array, target: jax.Array) -> None:
    """The compatibility rescalings' final check: the new weighted filters, collapsed onto the
    old dimension (`achieved`), equal the old weighted filters (`target`)."""
    diff = float(jnp.max(jnp.abs(achieved - target)))
    if not jnp.allclose(achieved, target, rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"{function}: the rescaled filters do not collapse onto the old ones (max abs "
            f"difference {diff}); are these orthoplex filters?"
        )


# ---------------------------------------------------------------------------------------------
# weights for the filters a higher dimension adds
# ---------------------------------------------------------------------------------------------
def extend_weights(
    old_weights_block: jax.Array,
    filter_key: Key,
    old_filters: geom.MultiImage,
    new_filters: geom.MultiImage,
) -> jax.Array:
    """Weights for `new_filters[filter_key]` from those of `old_filters[filter_key]`.

    The invariant filters of a key come in families: "unbalanced" ones that start with the
    centre filter (scalars, and the first filters of order-2 tensors, which follow the
    scalar ones) and "balanced" ones without a centre (vectors, the remaining order-2
    filters). Old weights are kept in place; each filter a family gains gets the mean of
    that family's old weights (the centre weight excluded).

    Args:
        old_weights_block: shape (out_c, in_c, n_old_filters).
        filter_key: the filters' key ((False,)*k, parity), k <= 2.
        old_filters, new_filters: the filter banks before and after.

    Returns:
        shape (out_c, in_c, n_new_filters).
    """
    k = len(filter_key[0])
    n_old = len(old_filters[filter_key])
    n_new = len(new_filters[filter_key])
    if old_weights_block.shape[-1] != n_old:
        raise ValueError(
            f"_extend_weights: `old_weights_block` (shape {tuple(old_weights_block.shape)}) "
            f"must have n_filters={n_old} for filter key {filter_key}"
        )
    lead = old_weights_block.shape[:2]

    def padded(family: jax.Array, n_add: int) -> jax.Array:
        if n_add < 0:
            raise ValueError(
                f"_extend_weights: the new filters of key {filter_key} have fewer filters "
                f"than the old ({n_new} < {n_old}); weights can only be extended"
            )
        if n_add == 0:
            return family
        if family.shape[2] == 0:  # nothing to average: the added filters start at zero
            return jnp.zeros(lead + (n_add,), family.dtype)
        fill = jnp.broadcast_to(jnp.mean(family, axis=2, keepdims=True), lead + (n_add,))
        return jnp.concatenate([family, fill], axis=2)

    if k == 0:
        centre = old_weights_block[:, :, :1]
        return jnp.concatenate(
            [centre, padded(old_weights_block[:, :, 1:], n_new - n_old)], axis=2
        )
    if k == 1:
        return padded(old_weights_block, n_new - n_old)
    if k == 2:
        scalar_key = ((), 0)
        if scalar_key not in old_filters or scalar_key not in new_filters:
            raise ValueError(
                "_extend_weights: extending order-2 filter weights needs the scalar filters "
                f"(key {scalar_key}) in both `old_filters` and `new_filters`"
            )
        n_unbalanced = len(old_filters[scalar_key])
        n_add_unbalanced = len(new_filters[scalar_key]) - n_unbalanced
        n_add_balanced = n_new - (n_old + n_add_unbalanced)
        if n_add_balanced < 0:
            raise ValueError(
                f"_extend_weights: cannot map {n_old} order-2 filters onto {n_new} (the "
                f"scalar filters grow by {n_add_unbalanced})"
            )
        centre = old_weights_block[:, :, :1]
        unbalanced = padded(old_weights_block[:, :, 1:n_unbalanced], n_add_unbalanced)
        balanced = padded(old_weights_block[:, :, n_unbalanced:], n_add_balanced)
        return jnp.concatenate([centre, unbalanced, balanced], axis=2)
    raise NotImplementedError(
        f"_extend_weights: only filters of order k <= 2 are supported, but `filter_key` "
        f"(={filter_key}) has k={k}"
    )


# ---------------------------------------------------------------------------------------------
# rescalings
# ---------------------------------------------------------------------------------------------
def volume_rescale_weights(
    old_filter_triple: FilterTriple,
    new_filter_triple: FilterTriple,
    verbose: bool = False,
) -> jax.Array:
    """Scale the new weights so that, per (out, in) channel pair, the norm of the summed
    weighted filters is the same in the new dimension as in the old one. Filters whose pixels
    sum to zero are left unscaled.

    Args:
        old_filter_triple: (filters (n, *spatial, *tensor), weights (out_c, in_c, n), D).
        new_filter_triple: the same for the new dimension.
        verbose: print the old weights and the ratios.

    Returns:
        the rescaled new weights, shape (out_c, in_c, n_new).
    """
    old_filters, old_weights, old_D = old_filter_triple
    new_filters, new_weights, new_D = new_filter_triple
    old_total = get_filter_sum(old_D, old_filters, old_weights)
    new_total = get_filter_sum(new_D, new_filters, new_weights)
    ratio = (old_total / (new_total + geom.TINY))[..., None]  # (out_c, in_c, 1)
    if len(old_filters) == len(new_filters):
        scalable = _nonzero_sum_mask(old_filters, old_D)
    else:  # filters added by the new dimension: judge by the new filters themselves
        scalable = _nonzero_sum_mask(new_filters, new_D)
    factors = jnp.where(scalable[None, None], ratio, 1.0)
    if verbose:
        print("old weights", old_weights.shape, old_weights)
        print("ratios", factors.shape, factors)
    return new_weights * factors


def spin_embed_rescale_weights(
    old_filter_triple: FilterTriple,
    new_filter_triple: FilterTriple,
    verbose: bool = False,
) -> jax.Array:
    """Not implemented in this package (ginjax 0.1.8 does not use it when converting)."""
    raise NotImplementedError(
        "spin_embed_rescale_weights is not implemented; use "
        "Rescaling.VOLUME, COMPATIBILITY or COMPAT_FLEX"
    )


def compat_flex_rescale_weights(
    old_filter_triple: FilterTriple,
    new_filter_triple: FilterTriple,
    verbose: bool = False,
) -> jax.Array:
    """Compatibility rescaling with one free parameter, for one added dimension.

    Defined for 3^D filters from D=1 to D=2 and from D=2 to D=3, and for 2^D filters
    (weights divided by 2).

    Args:
        old_filter_triple: (filters (n, *spatial, *tensor), weights (out_c, in_c, n), D).
        new_filter_triple: the same for the new dimension.
        verbose: unused.

    Returns:
        the new weights, shape (out_c, in_c, n_new).
    """
    old_filters, w, old_D = old_filter_triple
    new_filters, new_weights, new_D = new_filter_triple
    _same_filter_order("compat_flex_rescale_weights", old_filters, old_D, new_filters, new_D)
    if new_D - old_D != 1:
        raise ValueError(
            f"compat_flex_rescale_weights: needs new D = old D + 1, got {old_D} -> {new_D}"
        )
    old_side = old_filters.shape[1 : 1 + old_D]
    new_side = new_filters.shape[1 : 1 + new_D]
    if old_side == (2,) * old_D and new_side == (2,) * new_D:
        return w / 2.0
    if not (old_side == (3,) * old_D and new_side == (3,) * new_D):
        raise ValueError(
            "compat_flex_rescale_weights: needs filters of side 2 or 3 in both dimensions, "
            f"got {old_side} -> {new_side}"
        )
    if old_D == 1:
        if w.shape[2] != 2:
            raise ValueError(
                f"compat_flex_rescale_weights: D=1 side-3 filters have 2 weights, got "
                f"{w.shape[2]}"
            )
        r = 1.0 / 3.0
        a0, a1 = w[..., 0], w[..., 1]
        return jnp.stack([a0 + (4 * r - 2) * a1, (1 - 2 * r) * a1, r * a1], axis=-1)
    if old_D == 2:
        if w.shape[2] != 3 and w.shape[2] < 5:
            raise ValueError(
                "compat_flex_rescale_weights: from D=2 to D=3 needs 3 (scalar) or at least 5 "
                f"(order-2) weights per channel pair, got {w.shape[2]}"
            )
        a0, a1, a2 = w[..., 0], w[..., 1], w[..., 2]
        z = (4 * a2 - a1) / 9
        first = jnp.stack(
            [a0 - 2 * a1 + 4 * a2 - 8 * z, a1 - 2 * a2 + 4 * z, a2 - 2 * z, z], axis=-1
        )
        if w.shape[2] == 3:
            return first
        # order-2 filters: the two further families each repeat their single old weight
        pair = jnp.ones_like(w[..., :2])
        return jnp.concatenate([first, pair * w[..., 4:5], pair * w[..., 3:4]], axis=-1)
    raise ValueError(
        f"compat_flex_rescale_weights: side-3 filters only from D=1 or D=2, got D={old_D}"
    )


def compatibility_norm_rescale_weights(
    old_filter_triple: FilterTriple,
    new_filter_triple: FilterTriple,
    verbose: bool = False,
) -> jax.Array:
    """Older variant of `compatibility_rescale_weights` working on pixel tensor norms.

    Assumes orthoplex filters ordered from the innermost to the outermost shell, whose
    nonzero pixels differ only by norm and are positive. Going from the outermost filter
    inwards, each new weight is chosen so that the new filters, collapsed onto the old
    dimension, match the old weighted filters at that filter's outermost pixel.

    Args:
        old_filter_triple: (filters (n, *spatial, *tensor), weights (out_c, in_c, n), D).
        new_filter_triple: the same for the new dimension.
        verbose: print the new and updated weights.

    Returns:
        the new weights, shape (out_c, in_c, n).
    """
    old_filters, old_weights, old_D = old_filter_triple
    new_filters, new_weights, new_D = new_filter_triple
    d_up = _added_dimensions("compatibility_norm_rescale_weights", old_D, new_D)
    old_norm = _tensor_norm(old_filters, old_D)  # (n, *old_spatial)
    new_norm = _tensor_norm(new_filters, new_D)  # (n, *new_spatial)
    occupied = geom.nonempty_pixels(new_D, new_norm, 1)  # (n, *new_spatial)
    sizes = [int(s) for s in jnp.sum(occupied.reshape((len(occupied), -1)), axis=1)]
    if sizes != sorted(sizes):
        raise ValueError(
            "compatibility_norm_rescale_weights: the new filters must be ordered by "
            f"increasing number of nonzero pixels, got {sizes}"
        )
    collapse = tuple(range(1, 1 + d_up))
    occupied_collapsed = jnp.sum(occupied.astype(new_norm.dtype), axis=collapse)
    new_collapsed = jnp.sum(new_norm, axis=collapse)  # (n, *old_spatial)
    target = jnp.tensordot(old_weights, old_norm, axes=1)  # (out_c, in_c, *old_spatial)
    target_flat = target.reshape(target.shape[:2] + (-1,))

    updated = jnp.zeros(new_weights.shape[:2] + (len(new_filters),), new_weights.dtype)
    for i in reversed(range(len(new_filters))):
        pixels = geom.nonempty_pixels(old_D, occupied_collapsed[i]).ravel()
        outermost = int(jnp.max(jnp.nonzero(pixels)[0]))
        updated = updated.at[:, :, i].set(new_weights[:, :, i])
        current = jnp.tensordot(updated, new_collapsed, axes=1)
        current_val = current.reshape(current.shape[:2] + (-1,))[:, :, outermost]
        old_val = target_flat[:, :, outermost]
        filter_val = old_norm[i].ravel()[outermost]
        updated = updated.at[:, :, i].set((2 * old_val - current_val) / filter_val)

    achieved = jnp.tensordot(updated, new_collapsed, axes=1)
    _check_collapses_onto_old("compatibility_norm_rescale_weights", achieved, target)
    if verbose:
        print("new weights:", new_weights)
        print("updated weights:", updated)
    return updated


def compatibility_rescale_weights(
    old_filter_triple: FilterTriple,
    new_filter_triple: FilterTriple,
    verbose: bool = False,
) -> jax.Array:
    """Orthoplex filter weight scaling: choose the new weights so that the new weighted
    filters, summed over the added dimensions (and projected onto the old tensor
    components), equal the old weighted filters.

    The filters of a key must be orthoplex shells ell = 0..L of side 2L+1 in both dimensions
    (same count), or side-2 filters (weights divided by 2 per added dimension). Shells are
    solved from the outermost inwards along one axis.

    Args:
        old_filter_triple: (filters (n, *spatial, *tensor), weights (out_c, in_c, n), D).
        new_filter_triple: the same for the new dimension.
        verbose: print the old and updated weights.

    Returns:
        the new weights, shape (out_c, in_c, n).
    """
    old_filters, old_weights, old_D = old_filter_triple
    new_filters, new_weights, new_D = new_filter_triple
    k = _same_filter_order("compatibility_rescale_weights", old_filters, old_D, new_filters, new_D)
    d_up = _added_dimensions("compatibility_rescale_weights", old_D, new_D)
    if len(old_filters) != len(new_filters):
        raise ValueError(
            f"compatibility_rescale_weights: needs as many new filters as old, got "
            f"{len(old_filters)} old and {len(new_filters)} new (use orthoplex filters, e.g. "
            "get_invariant_filters(..., max_pixel_l1=(M - 1) // 2))"
        )
    n = len(old_filters)
    L = n - 1
    # the new filters' components along the old axes only
    projected = new_filters[(Ellipsis,) + (slice(0, old_D),) * k] if k > 0 else new_filters
    old_side = old_filters.shape[1 : 1 + old_D]
    new_side = new_filters.shape[1 : 1 + new_D]
    if old_side[0] == 2 or new_side[0] == 2:
        if old_side != (2,) * old_D or new_side != (2,) * new_D:
            raise ValueError(
                "compatibility_rescale_weights: side-2 filters must be side 2 on every axis, "
                f"got {old_side} -> {new_side}"
            )
        alpha = old_weights / (2**d_up)
    else:
        if old_side != (2 * L + 1,) * old_D or new_side != (2 * L + 1,) * new_D:
            raise ValueError(
                f"compatibility_rescale_weights: {n} orthoplex filters must have side "
                f"{2 * L + 1}, got {old_side} -> {new_side}"
            )
        proj_norm = _tensor_norm(projected, new_D)  # (n, *new_spatial)
        old_norm = _tensor_norm(old_filters, old_D)  # (n, *old_spatial)
        alpha = jnp.zeros(new_weights.shape[:2] + (n,), old_weights.dtype)
        for z in reversed(range(n)):
            at_old = (z + L,) + (L,) * (old_D - 1)
            at_new = (z + L,) + (L,) * (new_D - 1)
            # contribution of the shells already solved (z+1..L), collapsed to old_D axes
            collapsed = jnp.tensordot(alpha, jnp.sum(proj_norm, axis=tuple(range(1, 1 + d_up))), axes=1)
            value = (
                old_weights[:, :, z] * old_norm[(z,) + at_old]
                - collapsed[(slice(None), slice(None)) + at_old]
            ) / proj_norm[(z,) + at_new]
            alpha = alpha.at[:, :, z].set(value)

    # check: collapsed new weighted filters == old weighted filters
    achieved = jnp.tensordot(alpha, jnp.sum(projected, axis=tuple(range(1, 1 + d_up))), axes=1)
    target = jnp.tensordot(old_weights, old_filters, axes=1)
    _check_collapses_onto_old("compatibility_rescale_weights", achieved, target)
    if verbose:
        print("old weights:", old_weights)
        print("updated weights:", alpha)
    return alpha


def transfer_conv_weights(
    weights: Weights,
    old_filters: geom.MultiImage,
    new_filters: geom.MultiImage,
    rescale: geom.Rescaling,
    verbose: bool = False,
) -> Weights:
    """Map a ConvContract's `weights` from `old_filters` onto `new_filters` (any D).

    Weights are extended with `_extend_weights`, then rescaled: VOLUME (positive and negative
    parts separately), COMPATIBILITY (filters with a nonzero pixel sum), COMPAT_FLEX; any
    other Rescaling keeps the extended weights. SPIN_EMBED is not implemented.
    """
    if rescale is geom.Rescaling.SPIN_EMBED:
        return spin_embed_rescale_weights(None, None, verbose)  # raises
    new_weights: Weights = {}
    for (in_k, in_p), per_out in weights.items():
        new_weights[(in_k, in_p)] = {}
        for (out_k, out_p), old_block in per_out.items():
            fkey = (tuple(in_k) + tuple(out_k), (in_p + out_p) % 2)
            fkey = ((False,) * len(fkey[0]), fkey[1])
            new_block = extend_weights(
                old_block, fkey, old_filters, new_filters
            )
            old_f, new_f = old_filters[fkey], new_filters[fkey]
            if rescale is geom.Rescaling.VOLUME:
                relu = jax.nn.relu
                positive = volume_rescale_weights(
                    (old_f, relu(old_block), old_filters.D),
                    (new_f, relu(new_block), new_filters.D),
                    verbose,
                )
                negative = volume_rescale_weights(
                    (old_f, -relu(-old_block), old_filters.D),
                    (new_f, -relu(-new_block), new_filters.D),
                    verbose,
                )
                result = positive + negative
            elif rescale is geom.Rescaling.COMPATIBILITY:
                if len(old_f) != len(new_f):
                    raise ValueError(
                        f"COMPATIBILITY rescaling needs the same number of filters in both "
                        f"dimensions, but filter key {fkey} has {len(old_f)} old and "
                        f"{len(new_f)} new (use orthoplex filters: max_pixel_l1)"
                    )
                mask = np.asarray(_nonzero_sum_mask(new_f, new_filters.D))
                if mask.any():
                    solved = compatibility_rescale_weights(
                        (old_f[mask], old_block[:, :, mask], old_filters.D),
                        (new_f[mask], new_block[:, :, mask], new_filters.D),
                        verbose,
                    )
                    result = new_block.at[:, :, mask].set(solved)
                else:  # every filter sums to zero: nothing to match
                    result = new_block
            elif rescale is geom.Rescaling.COMPAT_FLEX:
                result = compat_flex_rescale_weights(
                    (old_f, old_block, old_filters.D),
                    (new_f, new_block, new_filters.D),
                    verbose,
                )
            else:
                result = new_block
            new_weights[(in_k, in_p)][(out_k, out_p)] = result
    return new_weights
