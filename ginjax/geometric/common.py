"""Groups of operators and the invariant-filter bases built from them by group averaging."""

from __future__ import annotations

import contextlib
import itertools
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp

from ginjax.geometric.constants import TINY, FilterScaling, LeviCivitaSymbol
from ginjax.geometric.functional_geometric_image import (
    _permute_pixels,
    _signed_permutation,
    times_group_element,
)
from ginjax.geometric.geometric_image import GeometricFilter
from ginjax.geometric.multi_image import MultiImage

# ------------------------------------------------------------------------------------------
# Groups


def permutation_matrix_from_sequence(seq: Sequence[int]) -> np.ndarray:
    """The matrix whose row i is the unit vector e_{seq[i]}."""
    D = len(seq)
    if sorted(int(s) for s in seq) != list(range(D)):
        raise ValueError(f"permutation_matrix_from_sequence: `seq` (={seq}) must permute 0..{D - 1}")
    matrix = np.zeros((D, D), dtype=int)
    matrix[np.arange(D), np.asarray(seq, dtype=int)] = 1
    return matrix


def _check_D(D: int, name: str) -> None:
    if not isinstance(D, (int, np.integer)) or D < 1:
        raise ValueError(f"{name}: `D` (={D}) must be a positive int")


def make_all_operators(D: int) -> list[np.ndarray]:
    """The hyperoctahedral group: every signed permutation matrix of size D (2^D D! elements),
    ordered by permutation (itertools order), then by sign pattern (+ before -, first axis
    slowest)."""
    _check_D(D, "make_all_operators")
    sign_flips = [np.diag(signs) for signs in itertools.product([1, -1], repeat=D)]
    return [
        permutation_matrix_from_sequence(seq) @ flip
        for seq in itertools.permutations(range(D))
        for flip in sign_flips
    ]


def make_D8_group(D: int) -> list[np.ndarray]:
    """Rotations by multiples of 45 degrees and the matching reflections (D=2); C2 for D=1."""
    if D == 1:
        return make_C2_group(D)
    if D != 2:
        raise NotImplementedError(f"make_D8_group: only D=1 or D=2, got `D` (={D})")
    angles = [2 * np.pi * i / 8 for i in range(8)]
    rotations = [
        np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]], dtype=np.float32)
        for a in angles
    ]
    reflections = [
        np.array([[np.cos(a), np.sin(a)], [np.sin(a), -np.cos(a)]], dtype=np.float32)
        for a in angles
    ]
    return rotations + reflections


def make_C2_group(D: int) -> list[np.ndarray]:
    """C2 x ... x C2: the 2^D diagonal sign flips."""
    _check_D(D, "make_C2_group")
    return [np.diag(signs) for signs in itertools.product([1, -1], repeat=D)]


# ------------------------------------------------------------------------------------------
# Bases for group averaging

basis_cache: dict = {}


def _single_entry(shape: tuple[int, ...], entries: dict) -> np.ndarray:
    element = np.zeros(shape)
    for index, value in entries.items():
        element[index] = value
    return element


def get_k2_irrep_basis(M: int, k: int, D: int) -> list[jax.Array]:
    """Bases of the three O(D) irreducible parts of 2-tensor filters, one element per pixel
    each: [trace (identity), antisymmetric, symmetric traceless]. For D=1 a single standard
    basis."""
    shape = (M,) * D + (D,) * k
    cache_key = "k2_irrep_basis:" + str(shape)
    if cache_key in basis_cache:
        return basis_cache[cache_key]
    if D == 1:
        basis_cache[cache_key] = [jnp.eye(M**D).reshape((M**D,) + shape)]
        return basis_cache[cache_key]
    if D not in (2, 3):
        raise NotImplementedError(f"get_k2_irrep_basis: D must be 1, 2 or 3, got `D` (={D})")

    if D == 2:
        antisym_parts = [np.asarray(LeviCivitaSymbol.get(2), dtype=float)]
        sym_parts = [
            _single_entry((2, 2), {(0, 0): 1, (1, 1): -1}),
            _single_entry((2, 2), {(0, 1): 1, (1, 0): 1}),
        ]
    else:
        antisym_parts = [
            _single_entry((3, 3), {(a, b): 1, (b, a): -1}) for a, b in [(0, 1), (0, 2), (1, 2)]
        ]
        sym_parts = [
            _single_entry((3, 3), {(0, 0): 1, (2, 2): -1}),
            _single_entry((3, 3), {(1, 1): 1, (2, 2): -1}),
        ] + [_single_entry((3, 3), {(a, b): 1, (b, a): 1}) for a, b in [(0, 1), (0, 2), (1, 2)]]

    trace_basis, antisym_basis, sym_basis = [], [], []
    for pixel in itertools.product(range(M), repeat=D):
        for parts, out in [([np.eye(D)], trace_basis), (antisym_parts, antisym_basis)]:
            for part in parts:
                element = np.zeros(shape)
                element[pixel] = part
                out.append(element)
        for part in sym_parts:
            element = np.zeros(shape)
            element[pixel] = part
            sym_basis.append(element)
    basis_cache[cache_key] = [
        jnp.array(np.stack(trace_basis)),
        jnp.array(np.stack(antisym_basis)),
        jnp.array(np.stack(sym_basis)),
    ]
    return basis_cache[cache_key]


def get_basis(key: str, shape: tuple[int, ...]) -> jax.Array:
    """The standard basis of arrays of the given shape, (prod(shape),) + shape, cached."""
    cache_key = key + ":" + str(shape)
    if cache_key not in basis_cache:
        size = int(np.prod(shape, dtype=int))
        basis_cache[cache_key] = jnp.eye(size).reshape((size,) + tuple(shape))
    return basis_cache[cache_key]


# ------------------------------------------------------------------------------------------
# Scaling


def _is_center_only(ff: GeometricFilter) -> bool:
    idxs = ff.nonempty_pixel_idxs()
    return bool(jnp.allclose(idxs, jnp.zeros(ff.D), rtol=TINY, atol=TINY))


def _centred_pixel_offsets(M: int, D: int) -> np.ndarray:
    grids = np.meshgrid(*((np.arange(M),) * D), indexing="ij")
    return np.stack(grids, axis=-1) - (M - 1) / 2  # (M,)*D + (D,)


def scale_filters(
    filters: list[GeometricFilter], scale: FilterScaling, k2_irreps_basis: bool
) -> list[GeometricFilter]:
    """Rescale filters (same D, size, k and parity) by the given strategy. NORMALIZE: largest
    pixel norm 1. ONE: largest entry magnitude 1. GAUSSIAN: NORMALIZE, then weight pixels by
    exp(-distance from centre). ZERO_SUM*: filters sum to zero about a centre filter. STENCIL,
    INVERSE_COUNT, OONA_PURI_SCALED: finite-difference style scalings."""
    if not isinstance(scale, FilterScaling):
        raise TypeError(f"scale_filters: `scale` (={scale!r}) must be a FilterScaling")
    if len(filters) == 0:
        return filters

    M = len(filters[0].data)
    D, k = filters[0].D, filters[0].k

    if scale is FilterScaling.ONE:
        return [ff * float(1 / jnp.max(jnp.abs(ff.data))) for ff in filters]
    if scale is FilterScaling.NORMALIZE:
        return [ff.normalize() for ff in filters]
    if scale is FilterScaling.GAUSSIAN:
        distances = np.linalg.norm(_centred_pixel_offsets(M, D).reshape((-1, D)), axis=1)
        weights = GeometricFilter(jnp.exp(-jnp.array(distances)).reshape((M,) * D), 0, D)
        return [ff.normalize() * weights for ff in filters]
    if scale in (
        FilterScaling.ZERO_SUM,
        FilterScaling.ZERO_SUM_L2_DIST,
        FilterScaling.ZERO_SUM_GAUSSIAN_DIST,
    ):
        if k == 2 and not k2_irreps_basis:
            raise ValueError(
                f"scale_filters: `scale` (={scale}) for k=2 needs `k2_irreps_basis` (=False) True"
            )
        filters = [ff.normalize() for ff in filters]
        if M == 2:
            return [ff * (1 / (M**D)) for ff in filters]
        if not _is_center_only(filters[0]):
            return filters
        center_ff = filters[0] * -1
        offcenter = filters[1:]
        distances = np.linalg.norm(_centred_pixel_offsets(M, D), axis=-1).ravel()
        if scale is FilterScaling.ZERO_SUM:
            pixel_weights = np.ones(M**D)
        elif scale is FilterScaling.ZERO_SUM_L2_DIST:
            pixel_weights = 1 / (distances + 1e-5)
        else:
            pixel_weights = np.exp(-0.25 * distances**2)
        pixel_weights = jnp.array(pixel_weights, dtype=jnp.float32)
        offcenter = [
            ff * (1 / float(jnp.sum(pixel_weights * ff.nonempty_pixels()) * len(offcenter)))
            for ff in offcenter
        ]
        filters = [center_ff] + offcenter
        total = jnp.sum(
            jnp.stack([ff.data.reshape((M**D,) + (D,) * k) for ff in filters]), axis=(0, 1)
        )
        if not bool(jnp.allclose(total, 0, rtol=1e-3, atol=1e-3)):
            raise ValueError(
                f"scale_filters: `scale` (={scale}) could not make the filters sum to zero "
                f"(max residual {float(jnp.max(jnp.abs(total)))})"
            )
        return filters
    if scale is FilterScaling.OONA_PURI_SCALED:
        if k != 0:
            raise NotImplementedError(f"scale_filters: OONA_PURI_SCALED needs k=0, got k={k}")
        if M != 3:
            raise ValueError(f"scale_filters: OONA_PURI_SCALED needs M=3, got M={M}")
        coefficients = {
            1: [-4 / 3, 2 / 3],
            2: [-8 / 9, 4 / 9, -2 / 9],
            # the D=3 filter order puts the face-diagonal filter after the corner one
            3: [-16 / 27, 8 / 27, 2 / 27, -4 / 27],
        }
        if D not in coefficients:
            raise NotImplementedError(f"scale_filters: OONA_PURI_SCALED needs D<=3, got D={D}")
        return [ff.normalize() * c for ff, c in zip(filters, coefficients[D])]
    if scale is FilterScaling.STENCIL:
        if not _is_center_only(filters[0]):
            return filters
        center_ff = filters[0]
        scaled = [center_ff]
        for ff in filters[1:]:
            count = int(jnp.sum(ff.nonempty_pixels()))
            scaled.append((ff + center_ff * (-count)) * (1 / (count * (count + 1))))
        return scaled
    if scale is FilterScaling.INVERSE_COUNT:
        normalized = [ff.normalize() for ff in filters]
        return [ff * (1 / int(jnp.sum(ff.nonempty_pixels()))) for ff in normalized]
    raise ValueError(f"scale_filters: unsupported `scale` (={scale})")


# ------------------------------------------------------------------------------------------
# Invariant filters


def _check_filter_args(M: int, k: int, parity: int, D: int, operators) -> None:
    _check_D(D, "get_unique_invariant_filters")
    if not isinstance(M, (int, np.integer)) or M < 1:
        raise ValueError(f"get_unique_invariant_filters: `M` (={M}) must be a positive int")
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"get_unique_invariant_filters: `k` (={k}) must be a non-negative int")
    if parity not in (0, 1):
        raise ValueError(f"get_unique_invariant_filters: `parity` (={parity}) must be 0 or 1")
    for gg in operators:
        if np.shape(gg) != (D, D):
            raise ValueError(
                f"get_unique_invariant_filters: every operator must be ({D}, {D}), got shape "
                f"{np.shape(gg)}"
            )


def _group_sum(
    D: int, basis: np.ndarray, parity: int, operators: Sequence[np.ndarray], k: int
) -> np.ndarray:
    """Sum of every basis element's images under the operators, as times_group_element
    computes them. Done in NumPy: the entries are small integers, so the sum is exact and
    many eager XLA compilations (one per operator) are avoided."""
    covariant_axes = (False,) * k
    total = np.zeros_like(basis)
    flat = basis.reshape(len(basis), -1)
    # the image basis is the identity: an operator's images of it are one signed entry a column
    is_identity = flat.shape[0] == flat.shape[1] and np.array_equal(flat, np.eye(len(flat), dtype=flat.dtype))
    for gg in operators:
        gg = np.asarray(gg)
        perm = _signed_permutation(gg)
        if perm is None:  # general operators: use the jax implementation
            total = total + np.asarray(
                times_group_element(
                    D, jnp.asarray(basis), parity, gg, covariant_axes, jax.lax.Precision.HIGHEST
                )
            )
            continue
        # a signed permutation moves each entry of a filter to one place with a sign: found once
        # on the entries' indices, then one gather of every basis element (exact: small integers,
        # and `total` starts at +0, so neither the order of the sums nor zeros' signs matter)
        index, sign = _signed_permutation_of_entries(D, basis.shape[1:], *perm)
        scaled = sign * np.float32(np.sign(np.linalg.det(gg)) ** parity)
        if is_identity:
            np.add.at(total.reshape(flat.shape), (index, np.arange(len(index))), scaled)
            continue
        moved = flat[:, index]
        moved *= scaled
        total += moved.reshape(basis.shape)
    return total


def _signed_permutation_of_entries(
    D: int, shape: tuple[int, ...], sources: list[int], signs: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(index, sign) over a filter's flattened entries such that the operator (rows: entry
    sources[i] times signs[i]) maps a filter f to sign * f.ravel()[index]: its pixel axes are
    permuted and flipped, each tensor axis permuted with signs."""
    index = _permute_pixels(np, np.arange(int(np.prod(shape))).reshape(shape), 0, sources, signs)
    sign = np.ones(shape, dtype=np.float32)  # moving pixels changes no sign
    sign_row = np.asarray(signs, dtype=np.float32)
    for axis in range(D, len(shape)):
        along = [1] * len(shape)
        along[axis] = D
        index = np.take(index, sources, axis=axis)
        sign = np.take(sign, sources, axis=axis) * sign_row.reshape(along)
    return index.ravel(), sign.ravel()


def get_unique_irrep_filters(
    M: int,
    k: int,
    parity: int,
    D: int,
    operators: Sequence[np.ndarray],
    basis: jax.Array,
    scale: FilterScaling = FilterScaling.NORMALIZE,
    max_pixel_l1: int | None = None,
    k2_irreps_basis: bool = True,
    combine_equal_l1: bool = False,
) -> list[GeometricFilter]:
    """Group-average every basis element, deduplicate up to sign and scale, and return the
    distinct invariant filters, sorted, sign-rectified and scaled."""
    _check_filter_args(M, k, parity, D, operators)
    shape = (M,) * D + (D,) * k
    averaged = _group_sum(D, np.asarray(basis, dtype=np.float32), parity, operators, k)
    # float32 NumPy throughout: identical IEEE results to ginjax's eager jnp steps here, with
    # no per-shape XLA compilation
    filter_matrix = averaged.reshape((len(basis), -1)).astype(np.float32)
    row_l1 = np.sum(np.abs(filter_matrix), axis=1)
    filter_matrix = filter_matrix[~np.isclose(row_l1, 0.0, rtol=TINY, atol=TINY)]
    if filter_matrix.shape[0] == 0:
        return []
    filter_matrix = filter_matrix / np.sum(np.abs(filter_matrix), axis=1, keepdims=True)
    # rounding merges rows that differ only by float noise
    filter_matrix = np.round(filter_matrix, 5)
    first_nonzero = np.argmax(filter_matrix != 0, axis=1)
    leading_signs = np.sign(filter_matrix[np.arange(len(filter_matrix)), first_nonzero])
    filter_matrix = filter_matrix * leading_signs[:, None]
    amps = np.unique(filter_matrix, axis=0)

    # rows can sum to ~0 up to float noise; the XLA reduction order decides the sign as in
    # ginjax, so this sum stays in jnp
    signs = np.sign(np.asarray(jnp.sum(jnp.asarray(amps), axis=1, keepdims=True)))
    amps = amps * np.where(signs == 0, np.float32(1.0), signs)
    amps = amps / np.max(np.abs(amps), axis=1, keepdims=True)

    filters = sorted(GeometricFilter(jnp.asarray(row.reshape(shape)), parity, D) for row in amps)
    filters = [ff.rectify() for ff in filters]

    max_l1 = [float(jnp.max(jnp.sum(jnp.abs(ff.nonempty_pixel_idxs()), axis=1))) for ff in filters]
    if max_pixel_l1 is not None:
        kept = [(ff, l1) for ff, l1 in zip(filters, max_l1) if l1 <= max_pixel_l1]
        filters = [ff for ff, _ in kept]
        max_l1 = [l1 for _, l1 in kept]

    if combine_equal_l1:
        by_l1: dict = {}
        for ff, l1 in zip(filters, max_l1):
            l1_key = round(l1, 5)
            by_l1[l1_key] = by_l1[l1_key] + ff if l1_key in by_l1 else ff
        filters = list(by_l1.values())

    return scale_filters(filters, scale, k2_irreps_basis)


def _on_cpu() -> contextlib.AbstractContextManager:
    try:
        return jax.default_device(jax.devices("cpu")[0])
    except RuntimeError:  # no CPU backend configured (JAX_PLATFORMS excludes it)
        return contextlib.nullcontext()


def get_unique_invariant_filters(
    M: int,
    k: int,
    parity: int,
    D: int,
    operators: Sequence[np.ndarray],
    scale: FilterScaling = FilterScaling.NORMALIZE,
    max_pixel_l1: int | None = None,
    k2_irreps_basis: bool = True,
    combine_equal_l1: bool = False,
) -> list[GeometricFilter]:
    """All distinct invariant filters of side M, tensor order k and parity for the operator
    group. For k=2 (with k2_irreps_basis) each irreducible part is averaged separately and the
    union is re-sorted."""
    if not isinstance(scale, FilterScaling):
        raise TypeError(
            f"get_unique_invariant_filters: `scale` (={scale!r}) must be a FilterScaling"
        )
    args = (scale, max_pixel_l1, k2_irreps_basis, combine_equal_l1)
    # Signs and tie-breaks depend on float noise in a few reductions; computing on the CPU
    # makes the filters the same whatever the default device is.
    with _on_cpu():
        if k == 2 and k2_irreps_basis:
            filters = []
            for irrep_basis in get_k2_irrep_basis(M, k, D):
                filters += get_unique_irrep_filters(
                    M, k, parity, D, operators, irrep_basis, *args
                )
            return sorted(filters)
        basis = get_basis("image", (M,) * D + (D,) * k)
        return get_unique_irrep_filters(M, k, parity, D, operators, basis, *args)


def get_invariant_filters_dict(
    Ms: Sequence[int],
    ks: Sequence[int],
    parities: Sequence[int],
    D: int,
    operators: Sequence[np.ndarray],
    scale: FilterScaling = FilterScaling.NORMALIZE,
    max_pixel_l1: int | None = None,
    k2_irreps_basis: bool = True,
    combine_equal_l1: bool = False,
) -> tuple[dict[tuple[int, int, int, int], list[GeometricFilter]], dict[tuple[int, int], int]]:
    """Invariant filters keyed (D, M, k, parity), and the largest filter count per (D, M)."""
    all_filters: dict = {}
    max_count: dict = {}
    for M in Ms:
        max_count[(D, M)] = 0
        for k in ks:
            for parity in parities:
                found = get_unique_invariant_filters(
                    M,
                    k,
                    parity,
                    D,
                    operators,
                    scale,
                    max_pixel_l1,
                    k2_irreps_basis,
                    combine_equal_l1,
                )
                all_filters[(D, M, k, parity)] = found
                max_count[(D, M)] = max(max_count[(D, M)], len(found))
    return all_filters, max_count


def get_invariant_filters_list(
    Ms: Sequence[int],
    ks: Sequence[int],
    parities: Sequence[int],
    D: int,
    operators: Sequence[np.ndarray],
    scale: FilterScaling = FilterScaling.NORMALIZE,
    max_pixel_l1: int | None = None,
    k2_irreps_basis: bool = True,
    combine_equal_l1: bool = False,
) -> list[GeometricFilter]:
    """The filters of get_invariant_filters_dict as one list, in key order."""
    all_filters, _ = get_invariant_filters_dict(
        Ms, ks, parities, D, operators, scale, max_pixel_l1, k2_irreps_basis, combine_equal_l1
    )
    return [ff for filters in all_filters.values() for ff in filters]


def get_invariant_filters(
    Ms: Sequence[int],
    ks: Sequence[int],
    parities: Sequence[int],
    D: int,
    operators: Sequence[np.ndarray],
    scale: FilterScaling = FilterScaling.NORMALIZE,
    max_pixel_l1: int | None = None,
    k2_irreps_basis: bool = True,
    combine_equal_l1: bool = False,
) -> MultiImage:
    """Invariant filters as a MultiImage: one block (n_filters, M..., D...) per
    ((False,)*k, parity) key that has filters."""
    filters = get_invariant_filters_list(
        Ms, ks, parities, D, operators, scale, max_pixel_l1, k2_irreps_basis, combine_equal_l1
    )
    if len(filters) == 0:
        raise ValueError(
            f"get_invariant_filters: no invariant filters for `Ms` (={Ms}), `ks` (={ks}), "
            f"`parities` (={parities}), `D` (={D})"
        )
    return MultiImage.from_images(filters)


def tensor_name(k: int, parity: int) -> str:
    """Human-readable name of a tensor type, e.g. 'vector', 'pseudoscalar'."""
    if k == 0:
        name = "scalar"
    elif k == 1:
        name = "vector"
    else:
        name = "tensor"
    if k < 2:
        return ("pseudo" + name) if parity % 2 == 1 else name
    sign = "{(+)}" if parity == 0 else "{(-)}"
    return f"${k}_{sign}-$" + name
