"""Pure functions on raw geometric-image arrays.

A geometric image block is an array of shape (lead..., spatial..., tensor...) where the D spatial
axes are followed by k tensor axes of length D. Functions take and return plain jax arrays, so
they compose with jit, vmap and grad.

Why one file past 600 lines: it is ginjax 0.1.8's public module of the same name, and users
import its functions from this path; helpers used by nothing else stay beside their callers.
"""

import functools
import itertools
import warnings
from typing import Optional, Union

import numpy as np
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ginjax.geometric.constants import TINY
from kernels._lax_common import conv_general_channels_last

PaddingType = Optional[Union[str, int, tuple[tuple[int, int], ...]]]

# Spatial axis letters for lax dimension-number strings (anything but N, C, I, O).
_SPATIAL_LETTERS = "HWDXYZ"


def parse_shape(shape: tuple[int, ...], D: int) -> tuple[tuple[int, ...], int]:
    """Split the shape of one geometric image (spatial..., tensor...) into (spatial dims, k)."""
    if not isinstance(shape, tuple):
        raise TypeError(f"parse_shape: `shape` (={shape!r}) must be a tuple")
    if len(shape) < D:
        raise ValueError(f"parse_shape: `shape` (={shape}) has fewer than `D` (={D}) axes")
    return shape[:D], len(shape) - D


def hash(D: int, spatial_dims: tuple[int, ...], indices: ArrayLike) -> tuple[jax.Array, ...]:
    """Wrap pixel indices of shape (n, D) onto the torus; returns D index arrays for gathering."""
    dims = jnp.array(spatial_dims).reshape((1, D))
    return tuple(jnp.remainder(jnp.asarray(indices), dims).astype(int).T)


def nonempty_pixels(D: int, data: jax.Array, n_lead: int = 0) -> jax.Array:
    """Boolean mask (lead..., spatial...) of pixels whose tensor has an entry away from 0."""
    n_tensor_axes = data.ndim - n_lead - D
    if n_tensor_axes < 0:
        raise ValueError(
            f"nonempty_pixels: `data` of shape {data.shape} has fewer than n_lead + D "
            f"(={n_lead} + {D}) axes"
        )
    nonzero = ~jnp.isclose(data, 0.0, rtol=TINY, atol=TINY)
    return jnp.any(nonzero, axis=tuple(range(data.ndim - n_tensor_axes, data.ndim)))


def pixel_idxs(spatial_dims: tuple[int, ...]) -> jax.Array:
    """Integer indices of every pixel, shape (prod(spatial_dims), D), in row-major (ij) order."""
    grids = np.meshgrid(*(np.arange(n) for n in spatial_dims), indexing="ij")
    return jnp.array(np.stack(grids, axis=-1).reshape((-1, len(spatial_dims))), dtype=int)


def _as_tuple(value: Union[int, tuple[int, ...]], D: int, name: str) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * D
    value = tuple(value)
    if len(value) != D:
        raise ValueError(f"`{name}` (={value}) must be an int or a tuple of length D={D}")
    return value


def _as_torus_tuple(is_torus: Union[bool, tuple[bool, ...]], D: int) -> tuple[bool, ...]:
    if isinstance(is_torus, (bool, np.bool_)):
        return (bool(is_torus),) * D
    if isinstance(is_torus, tuple) and len(is_torus) == D:
        return tuple(bool(t) for t in is_torus)
    raise ValueError(f"`is_torus` (={is_torus}) must be a bool or a tuple of {D} bools")


def get_same_padding(
    filter_spatial_dims: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
    pad_dims: Optional[tuple[bool, ...]] = None,
) -> tuple[tuple[int, int], ...]:
    """Per-axis (low, high) zero padding that keeps the spatial size ('SAME'), for odd filters."""
    if pad_dims is None:
        pad_dims = (True,) * len(filter_spatial_dims)
    if not len(filter_spatial_dims) == len(rhs_dilation) == len(pad_dims):
        raise ValueError(
            f"get_same_padding: `filter_spatial_dims` (={tuple(filter_spatial_dims)}), `rhs_dilation` "
            f"(={tuple(rhs_dilation)}) and `pad_dims` (={tuple(pad_dims)}) need one entry per spatial axis"
        )
    return tuple(
        (((m - 1) // 2) * dil,) * 2 if pad else (0, 0)
        for m, dil, pad in zip(filter_spatial_dims, rhs_dilation, pad_dims)
    )


def get_torus_expanded(
    image: jax.Array,
    is_torus: tuple[bool, ...],
    filter_spatial_dims: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """Wrap-pad the torus axes of a (batch, spatial..., channels) image for a 'VALID' convolution.

    Returns the padded image and the zero padding still needed on the non-torus axes.
    """
    if any(m % 2 == 0 for m in filter_spatial_dims):
        raise ValueError(
            f"get_torus_expanded: `filter_spatial_dims` (={filter_spatial_dims}) must all be odd "
            "for torus padding"
        )
    wrap = get_same_padding(filter_spatial_dims, rhs_dilation, is_torus)
    expanded = jnp.pad(image, ((0, 0),) + wrap + ((0, 0),), mode="wrap")
    zero_padding = get_same_padding(
        filter_spatial_dims, rhs_dilation, tuple(not t for t in is_torus)
    )
    return expanded, zero_padding


def pre_tensor_product_expand(
    D: int,
    image_a: jax.Array,
    image_b: jax.Array,
    a_offset: int = 0,
    b_offset: int = 0,
    dtype: Optional[np.dtype] = None,
) -> tuple[jax.Array, jax.Array]:
    """Broadcast two images to the tensor order k_a + k_b so an elementwise product is the
    pixelwise tensor product: a gets k_b trailing axes of ones, b gets k_a axes of ones inserted
    before its own tensor axes."""
    _, k_a = parse_shape(image_a.shape[a_offset:], D)
    _, k_b = parse_shape(image_b.shape[b_offset:], D)
    a_expanded = jnp.tensordot(image_a, jnp.ones((D,) * k_b), axes=0) if k_b > 0 else image_a
    if k_a > 0:
        b_expanded = jnp.tensordot(image_b, jnp.ones((D,) * k_a), axes=0)
        # move the new axes (at the end) in front of b's own tensor axes
        n_before = b_offset + D
        order = (
            tuple(range(n_before))
            + tuple(range(n_before + k_b, n_before + k_b + k_a))
            + tuple(range(n_before, n_before + k_b))
        )
        b_expanded = b_expanded.transpose(order)
    else:
        b_expanded = image_b
    if dtype is not None:
        a_expanded, b_expanded = a_expanded.astype(dtype), b_expanded.astype(dtype)
    return a_expanded, b_expanded


def conv_contract_image_expand(D: int, image: jax.Array, filter_k: int) -> jax.Array:
    """Append filter_k - k axes of ones to a (batch, in_c, spatial, tensor) image."""
    _, image_k = parse_shape(image.shape[2:], D)
    extra_k = filter_k - image_k
    if extra_k < 0:
        raise ValueError(
            f"conv_contract_image_expand: `filter_k` (={filter_k}) must be at least the image "
            f"tensor order (={image_k})"
        )
    return jnp.tensordot(image, jnp.ones((D,) * extra_k), axes=0)


def mul(
    D: int,
    image_a: jax.Array,
    image_b: jax.Array,
    a_offset: int = 0,
    b_offset: int = 0,
) -> jax.Array:
    """Pixelwise tensor product of two images (a's tensor axes first, then b's)."""
    a_expanded, b_expanded = pre_tensor_product_expand(D, image_a, image_b, a_offset, b_offset)
    return a_expanded * b_expanded


def _resolve_padding(
    D: int,
    image: jax.Array,
    filter_spatial_dims: tuple[int, ...],
    is_torus: tuple[bool, ...],
    padding: PaddingType,
    rhs_dilation: tuple[int, ...],
    lhs_dilation: Optional[tuple[int, ...]],
) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """Turn the user-facing `padding` into an (image, explicit lax padding) pair."""
    if any(m % 2 == 0 for m in filter_spatial_dims) and padding in (None, "TORUS", "SAME"):
        raise ValueError(
            f"convolve: filters with even side lengths {filter_spatial_dims} need explicit "
            f"`padding` (an int or per-axis pairs), not `padding` (={padding!r})"
        )
    if padding is None:
        padding = "TORUS" if any(is_torus) else "SAME"
    if lhs_dilation is not None and isinstance(padding, str):
        warnings.warn(
            "convolve: with lhs_dilation (transposed convolution) the padding should be given "
            f"explicitly, got `padding` (={padding!r})",
            stacklevel=3,
        )
    if padding == "TORUS":
        return get_torus_expanded(image, is_torus, filter_spatial_dims, rhs_dilation)
    if padding == "VALID":
        return image, ((0, 0),) * D
    if padding == "SAME":
        return image, get_same_padding(filter_spatial_dims, rhs_dilation)
    if isinstance(padding, str):
        raise ValueError(
            f"convolve: `padding` (={padding!r}) must be 'TORUS', 'VALID', 'SAME', an int, "
            "or per-axis (low, high) pairs"
        )
    if isinstance(padding, (int, np.integer)):
        return image, ((int(padding), int(padding)),) * D
    literal = tuple(tuple(int(p) for p in pair) for pair in padding)
    if len(literal) != D or any(len(pair) != 2 for pair in literal):
        raise ValueError(f"convolve: `padding` (={padding}) must hold D={D} (low, high) pairs")
    return image, literal


def convolve_ravel(
    D: int,
    image: jax.Array,
    filter_image: jax.Array,
    is_torus: Union[tuple[bool, ...], bool],
    stride: Union[int, tuple[int, ...]] = 1,
    padding: PaddingType = None,
    lhs_dilation: Optional[tuple[int, ...]] = None,
    rhs_dilation: Union[int, tuple[int, ...]] = 1,
) -> jax.Array:
    """Grouped correlation of image (batch, spatial..., channels) with filter
    (spatial..., in_c, out_channels); the number of groups is channels // in_c."""
    if not isinstance(D, int) or D < 1 or D > len(_SPATIAL_LETTERS):
        raise ValueError(f"convolve: `D` (={D}) must be an int in 1..{len(_SPATIAL_LETTERS)}")
    if image.ndim != D + 2 or filter_image.ndim != D + 2:
        raise ValueError(
            f"convolve_ravel: `image` (shape {image.shape}) and `filter_image` (shape "
            f"{filter_image.shape}) must both have D + 2 = {D + 2} axes"
        )
    is_torus = _as_torus_tuple(is_torus, D)
    stride = _as_tuple(stride, D, "stride")
    rhs_dilation = _as_tuple(rhs_dilation, D, "rhs_dilation")
    if lhs_dilation is not None:
        lhs_dilation = _as_tuple(lhs_dilation, D, "lhs_dilation")
    filter_spatial_dims = tuple(filter_image.shape[:D])
    image, padding_literal = _resolve_padding(
        D, image, filter_spatial_dims, is_torus, padding, rhs_dilation, lhs_dilation
    )
    filter_in = filter_image.shape[D]
    if image.shape[-1] % filter_in != 0:
        raise ValueError(
            f"convolve_ravel: image channels (={image.shape[-1]}) must be a multiple of the "
            f"filter's input channels (={filter_in})"
        )
    spatial = _SPATIAL_LETTERS[:D]
    return conv_general_channels_last(
        image,
        filter_image,
        stride=stride,
        padding=padding_literal,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        feature_group_count=image.shape[-1] // filter_in,
        dimension_numbers_=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
    )


def _check_conv_operands(D: int, image: jax.Array, filter_image: jax.Array) -> None:
    if image.ndim < D + 2 or filter_image.ndim < D + 2:
        raise ValueError(
            f"convolve: `image` (shape {image.shape}) must be (batch, in_c, spatial, tensor) and "
            f"`filter_image` (shape {filter_image.shape}) (out_c, in_c, spatial, tensor) with D={D}"
        )
    if image.shape[1] != filter_image.shape[1]:
        raise ValueError(
            f"convolve: in_c of `image` (shape {image.shape}) and `filter_image` (shape "
            f"{filter_image.shape}) must match on axis 1"
        )


def _floating(*arrays: jax.Array) -> np.dtype:
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _correlate_raveled(
    D: int,
    image_raveled: jax.Array,
    flat_filter: jax.Array,
    dtype: np.dtype,
    out_tensor: tuple[int, ...],
    out_c: int,
    is_torus: Union[bool, tuple[bool, ...]],
    stride: Union[int, tuple[int, ...]],
    padding: PaddingType,
    lhs_dilation: Optional[tuple[int, ...]],
    rhs_dilation: Union[int, tuple[int, ...]],
) -> jax.Array:
    """convolve_ravel of operands raveled by convolve / convolve_contract, in `dtype`; its output
    channels, ordered (*out_tensor, out_c), unravelled to (batch, out_c, spatial, *out_tensor)."""
    convolved = convolve_ravel(
        D,
        image_raveled.astype(dtype),
        flat_filter.astype(dtype),
        is_torus,
        stride,
        padding,
        lhs_dilation,
        rhs_dilation,
    )
    batch, out_spatial = convolved.shape[0], convolved.shape[1 : 1 + D]
    convolved = convolved.reshape((batch,) + out_spatial + out_tensor + (out_c,))
    return jnp.moveaxis(convolved, -1, 1)


def convolve(
    D: int,
    image: jax.Array,
    filter_image: jax.Array,
    is_torus: Union[tuple[bool, ...], bool],
    stride: Union[int, tuple[int, ...]] = 1,
    padding: PaddingType = None,
    lhs_dilation: Optional[tuple[int, ...]] = None,
    rhs_dilation: Union[int, tuple[int, ...]] = 1,
    tensor_expand: bool = True,
) -> jax.Array:
    """Tensor correlation of image (batch, in_c, spatial, k_img) with filter
    (out_c, in_c, spatial, k_f), summing over in_c.

    With tensor_expand the result is (batch, out_c, spatial, k_img + k_f): the pixelwise tensor
    product of image and filter values. Without it, image and filter must already share their
    leading tensor axes (the filter may have extra trailing ones) and each image component is
    correlated separately: (batch, out_c, spatial, k_f).
    """
    _check_conv_operands(D, image, filter_image)
    dtype = _floating(image, filter_image)
    out_c, in_c = filter_image.shape[:2]
    filter_spatial_dims, filter_k = parse_shape(filter_image.shape[2:], D)
    image_spatial_dims, image_k = parse_shape(image.shape[2:], D)
    batch = image.shape[0]
    if tensor_expand:
        n_groups = D**image_k  # one group per image tensor component
        n_filter_components = D**filter_k
        out_tensor = (D,) * (image_k + filter_k)
        group_filter = filter_image.reshape((out_c, in_c) + filter_spatial_dims + (-1,))
        # (out_c, in_c, spatial, Tf) -> (spatial, in_c, Tf, out_c), then repeat per group
        group_filter = jnp.moveaxis(jnp.moveaxis(group_filter, 0, -1), 0, D)
        group_filter = jnp.tile(group_filter[..., None, :, :], (1,) * (D + 1) + (n_groups, 1, 1))
        group_filter = group_filter.reshape(
            filter_spatial_dims + (in_c, n_groups * n_filter_components * out_c)
        )
    else:
        if filter_image.shape[2 + D : 2 + D + image_k] != (D,) * image_k or filter_k < image_k:
            raise ValueError(
                f"convolve: without tensor_expand the filter (shape {filter_image.shape}) must "
                f"start with the image's {image_k} tensor axes (image shape {image.shape})"
            )
        n_groups = D**image_k
        n_filter_components = D ** (filter_k - image_k)
        out_tensor = (D,) * filter_k
        group_filter = filter_image.reshape((out_c, in_c) + filter_spatial_dims + (n_groups, -1))
        # (out_c, in_c, spatial, G, Tf') -> (spatial, in_c, G, Tf', out_c)
        group_filter = jnp.moveaxis(jnp.moveaxis(group_filter, 0, -1), 0, D)
        group_filter = group_filter.reshape(
            filter_spatial_dims + (in_c, n_groups * n_filter_components * out_c)
        )
    # image channels ordered (component, in_c) so that group g holds component g of every channel
    image_raveled = jnp.moveaxis(image.reshape((batch, in_c) + image_spatial_dims + (-1,)), 1, -1)
    image_raveled = image_raveled.reshape((batch,) + image_spatial_dims + (n_groups * in_c,))
    return _correlate_raveled(
        D, image_raveled, group_filter, dtype, out_tensor, out_c,
        is_torus, stride, padding, lhs_dilation, rhs_dilation,
    )


def convolve_contract(
    D: int,
    image: jax.Array,
    filter_image: jax.Array,
    is_torus: Union[bool, tuple[bool, ...]],
    stride: Union[int, tuple[int, ...]] = 1,
    padding: PaddingType = None,
    lhs_dilation: Optional[tuple[int, ...]] = None,
    rhs_dilation: Union[int, tuple[int, ...]] = 1,
) -> jax.Array:
    """Correlate a k-image (batch, in_c, spatial, k) with a (k + k')-filter
    (out_c, in_c, spatial, k + k') and contract the image's k axes with the filter's first k:
    out[b, o, x, j] = sum_{c, y, i} image[b, c, x + y, i] * filter[o, c, y, i, j].
    Result shape (batch, out_c, spatial, k')."""
    _check_conv_operands(D, image, filter_image)
    dtype = _floating(image, filter_image)
    out_c, in_c = filter_image.shape[:2]
    filter_spatial_dims, filter_k = parse_shape(filter_image.shape[2:], D)
    image_spatial_dims, image_k = parse_shape(image.shape[2:], D)
    if filter_k < image_k or filter_image.shape[2 + D : 2 + D + image_k] != (D,) * image_k:
        raise ValueError(
            f"convolve_contract: `filter_image` (shape {filter_image.shape}) must have at least "
            f"the image's tensor order k={image_k} (image shape {image.shape})"
        )
    batch = image.shape[0]
    n_image_components = D**image_k
    out_k = filter_k - image_k
    # One dense correlation: input channels (in_c, i), output channels (j, out_c); the sum over
    # the input channels performs the contraction.
    image_raveled = jnp.moveaxis(image.reshape((batch, in_c) + image_spatial_dims + (-1,)), 1, -2)
    image_raveled = image_raveled.reshape((batch,) + image_spatial_dims + (in_c * n_image_components,))
    dense_filter = filter_image.reshape(
        (out_c, in_c) + filter_spatial_dims + (n_image_components, -1)
    )
    # (out_c, in_c, spatial, Ti, Tj) -> (spatial, Ti, in_c, Tj, out_c)
    dense_filter = jnp.moveaxis(jnp.moveaxis(dense_filter, 0, -1), 0, D + 1)
    dense_filter = jnp.swapaxes(dense_filter, D, D + 1).reshape(
        filter_spatial_dims + (in_c * n_image_components, -1)
    )
    return _correlate_raveled(
        D, image_raveled, dense_filter, dtype, (D,) * out_k, out_c,
        is_torus, stride, padding, lhs_dilation, rhs_dilation,
    )


def get_contraction_indices(
    initial_k: int,
    final_k: int,
    swappable_idxs: tuple[tuple[int, int], ...] = (),
) -> list[tuple[tuple[int, int], ...]]:
    """All distinct ways to contract a k=initial_k tensor down to final_k, as tuples of index
    pairs; pairs in swappable_idxs are treated as interchangeable."""
    if (initial_k + final_k) % 2 != 0 or final_k < 0 or initial_k < final_k:
        raise ValueError(
            f"get_contraction_indices: need 0 <= `final_k` (={final_k}) <= `initial_k` "
            f"(={initial_k}) with the same parity"
        )
    n_pairs = (initial_k - final_k) // 2
    rows = []
    for pairs in itertools.combinations(itertools.combinations(range(initial_k), 2), n_pairs):
        flat = [idx for pair in pairs for idx in pair]
        if len(set(flat)) == len(flat):  # every index used at most once
            rows.append(flat)
    rows_array = np.array(rows, dtype=int).reshape((len(rows), 2 * n_pairs))
    # identify the second member of each swappable pair with the first one
    for first, second in swappable_idxs:
        rows_array[rows_array == second] = first
    canonical = [
        [idx for pair in sorted(sorted(p) for p in zip(row[0::2], row[1::2])) for idx in pair]
        for row in rows_array.tolist()
    ]
    unique_rows = np.unique(np.array(canonical, dtype=int).reshape((-1, 2 * n_pairs)), axis=0)
    # give the swappable pair back both of its members where it is used
    for pair in swappable_idxs:
        for row in unique_rows:
            positions = np.nonzero(np.isin(row, pair))[0]
            if len(positions) > 0:
                row[positions.max()] = pair[1]
                row[positions.min()] = pair[0]
    return [
        tuple((int(a), int(b)) for a, b in zip(row[0::2], row[1::2])) for row in unique_rows
    ]


@functools.partial(jax.jit, static_argnums=[1, 2])
def multicontract(
    data: jax.Array, indices: tuple[tuple[int, int], ...], idx_shift: int = 0
) -> jax.Array:
    """Kronecker-delta contraction of the given pairs of tensor axes (shifted by idx_shift)."""
    if data.ndim < 2:
        raise ValueError(f"multicontract: `data` (shape {data.shape}) needs at least 2 axes")
    labels = list(range(data.ndim))
    contracted = set()
    for pair_number, (idx1, idx2) in enumerate(indices):
        a, b = idx1 + idx_shift, idx2 + idx_shift
        if not (0 <= a < data.ndim and 0 <= b < data.ndim) or a == b or {a, b} & contracted:
            raise ValueError(
                f"multicontract: `indices` (={indices}) with `idx_shift` (={idx_shift}) must name "
                f"distinct axes of data with {data.ndim} axes"
            )
        contracted |= {a, b}
        labels[a] = labels[b] = data.ndim + pair_number
    out_labels = [label for axis, label in enumerate(labels) if axis not in contracted]
    return jnp.einsum(data, labels, out_labels)


def raise_lower(
    data: jax.Array,
    metric_tensor: jax.Array,
    metric_tensor_inv: jax.Array,
    from_axes: tuple[bool, ...],
    to_axes: tuple[bool, ...],
    precision: Optional[jax.lax.Precision] = None,
) -> jax.Array:
    """Move tensor axes between covariant (True) and contravariant (False) with the metric:
    lowering an axis applies g_ij, raising applies g^ij."""
    if len(from_axes) != len(to_axes):
        raise ValueError(
            f"raise_lower: `from_axes` (={from_axes}) and `to_axes` (={to_axes}) differ in length"
        )
    k = len(from_axes)
    result = data
    for axis, (was_cov, to_cov) in enumerate(zip(from_axes, to_axes)):
        if was_cov == to_cov:
            continue
        metric = metric_tensor if to_cov else metric_tensor_inv
        tensor_axis = result.ndim - k + axis
        # new[..., n, ...] = sum_b metric[..., n, b] * old[..., b, ...]
        moved = jnp.moveaxis(result, tensor_axis, -1)
        extra = moved.ndim - 1 - (metric.ndim - 2)
        metric_b = metric.reshape(metric.shape[:-2] + (1,) * (extra) + metric.shape[-2:])
        new = jnp.einsum("...b,...nb->...n", moved, metric_b, precision=precision)
        result = jnp.moveaxis(new, -1, tensor_axis)
    return result


def _signed_permutation(gg: np.ndarray) -> Optional[tuple[list[int], list[int]]]:
    """If gg is a signed permutation matrix return (source axis, sign) per row, else None."""
    gg = np.asarray(gg)
    rounded = np.rint(gg)
    if not np.allclose(gg, rounded, atol=TINY):
        return None
    if not (np.all(np.abs(rounded).sum(axis=0) == 1) and np.all(np.abs(rounded).sum(axis=1) == 1)):
        return None
    sources = [int(np.argmax(np.abs(row))) for row in rounded]
    signs = [int(row[src]) for row, src in zip(rounded, sources)]
    return sources, signs


def _check_operator(D: int, gg: np.ndarray) -> np.ndarray:
    gg = np.asarray(gg)
    if gg.shape != (D, D):
        raise ValueError(f"`gg` (shape {gg.shape}) must be a D x D (D={D}) matrix")
    return gg


def _check_group_element(caller: str, D: int, gg: np.ndarray) -> np.ndarray:
    """gg as a NumPy array, after checking it is D x D (the error names the `caller`)."""
    gg = np.asarray(gg)
    if gg.shape != (D, D):
        raise ValueError(f"{caller}: `gg` (shape {gg.shape}) must be ({D}, {D})")
    return gg


def get_rotated_keys(D: int, spatial_dims: tuple[int, ...], gg: np.ndarray) -> np.ndarray:
    """Source pixel index (n_pixels, D) for every pixel of the image rotated by gg, in row-major
    order of the rotated spatial dims: out[x] = in[gg^-1 (x - c') + c]."""
    gg = _check_operator(D, gg)
    rotated_dims = tuple(np.abs(gg @ np.array(spatial_dims)))
    center = (np.array(spatial_dims).reshape((1, D)) - 1) / 2
    rotated_center = (np.array(rotated_dims).reshape((1, D)) - 1) / 2
    keys = np.array(list(itertools.product(*(range(int(n)) for n in rotated_dims)))).reshape(
        (-1, D)
    )
    return np.rint((keys - rotated_center) @ gg + center).astype(int)


def rotate_is_torus(is_torus: tuple[bool, ...], gg: np.ndarray) -> tuple[bool, ...]:
    """Which axes are toroidal after applying the signed permutation gg."""
    perm = _signed_permutation(_check_operator(len(is_torus), gg))
    if perm is None:
        raise ValueError(f"rotate_is_torus: `gg` (={np.asarray(gg).tolist()}) must permute axes")
    return tuple(is_torus[src] for src in perm[0])


def _act_on_tensor_axes(
    data: jax.Array, k: int, parity: int, gg: np.ndarray, precision: Optional[jax.lax.Precision]
) -> jax.Array:
    """Multiply each of the last k axes by gg (new_n = sum_a gg[n, a] old_a), times det(gg)
    for odd parity. On orthogonal gg the covariant action inv(gg).T equals gg, as in ginjax."""
    dtype = _floating(data)
    gg_array = jnp.asarray(gg, dtype=dtype)
    for axis in range(data.ndim - k, data.ndim):
        data = jnp.moveaxis(
            jnp.tensordot(gg_array, data, axes=([1], [axis]), precision=precision), 0, axis
        )
    parity_flip = np.sign(np.linalg.det(np.asarray(gg))) ** parity
    return data * jnp.asarray(parity_flip, dtype=dtype)


def tensor_times_gg(
    tensor: jax.Array,
    parity: int,
    gg: np.ndarray,
    precision: Optional[jax.lax.Precision] = None,
) -> jax.Array:
    """Act with gg on every axis of one tensor; pseudotensors (odd parity) get det(gg) too."""
    tensor = jnp.asarray(tensor)
    return _act_on_tensor_axes(tensor, tensor.ndim, parity, _check_operator(len(gg), gg), precision)


def _permute_pixels(xp, data, n_lead: int, sources: list[int], signs: list[int]):
    """The pixel move of a signed permutation (`_signed_permutation`'s sources and signs) on
    (lead..., spatial..., tensor...) data, with `xp` NumPy or jax.numpy: its spatial axes
    transposed and flipped, out[x] = data[gg^-1 x]."""
    axes = list(range(data.ndim))
    axes[n_lead : n_lead + len(sources)] = [n_lead + src for src in sources]
    moved = xp.transpose(data, axes)
    flip_axes = tuple(n_lead + j for j, s in enumerate(signs) if s < 0)
    return xp.flip(moved, axis=flip_axes) if flip_axes else moved


def _rotate_pixels(D: int, data: jax.Array, n_lead: int, gg: np.ndarray) -> jax.Array:
    """Move the pixels of (lead..., spatial..., tensor...) data: out[x] = data[gg^-1 x]."""
    spatial_dims = data.shape[n_lead : n_lead + D]
    perm = _signed_permutation(gg)
    if perm is not None:  # exact and cheap: transpose and flip spatial axes
        return _permute_pixels(jnp, data, n_lead, *perm)
    keys = get_rotated_keys(D, spatial_dims, gg)
    rotated_dims = tuple(np.abs(gg @ np.array(spatial_dims)).astype(int))
    flat = data.reshape((-1,) + spatial_dims + data.shape[n_lead + D :])
    gathered = jax.vmap(lambda x: x[hash(D, spatial_dims, keys)])(flat)
    return gathered.reshape(data.shape[:n_lead] + rotated_dims + data.shape[n_lead + D :])


def times_group_element(
    D: int,
    data: jax.Array,
    parity: int,
    gg: np.ndarray,
    covariant_axes: tuple[bool, ...],
    precision: Optional[jax.lax.Precision] = None,
) -> jax.Array:
    """Apply the O(D) element gg to image data (lead..., spatial..., tensor...): move the
    pixels, act on every tensor axis, and multiply by det(gg) for odd parity. The number of
    tensor axes is len(covariant_axes)."""
    gg = _check_operator(D, gg)
    k = len(covariant_axes)
    n_lead = data.ndim - D - k
    if n_lead < 0:
        raise ValueError(
            f"times_group_element: `data` (shape {data.shape}) has fewer than D + k "
            f"(={D} + {k}) axes"
        )
    if data.shape[data.ndim - k :] != (D,) * k:
        raise ValueError(
            f"times_group_element: the last k={k} axes of `data` (shape {data.shape}) must be D={D}"
        )
    rotated = _rotate_pixels(D, data, n_lead, gg)
    return _act_on_tensor_axes(rotated, k, parity, gg, precision)


def times_D8_element(
    D: int,
    data: jax.Array,
    parity: int,
    gg: np.ndarray,
    covariant_axes: tuple[bool, ...],
    precision: Optional[jax.lax.Precision] = None,
) -> jax.Array:
    """Like times_group_element for 3^D images only, treating the ring of pixels around the
    centre as equally spaced on a circle, so 45-degree rotations (make_D8_group) act on it."""
    gg = _check_operator(D, gg)
    k = len(covariant_axes)
    n_lead = data.ndim - D - k
    spatial_dims = tuple(data.shape[n_lead : n_lead + D])
    if n_lead < 0 or spatial_dims != (3,) * D:
        raise ValueError(
            f"times_D8_element: `data` (shape {data.shape}) must have spatial dims {(3,) * D}"
        )
    offsets = np.asarray(pixel_idxs(spatial_dims)) - 1.0
    rotated = offsets @ gg
    is_centre = np.all(np.isclose(rotated, 0, rtol=TINY, atol=TINY), axis=1, keepdims=True)
    # push every off-centre pixel out to the ring (max |coordinate| = 1)
    on_ring = rotated / np.max(np.abs(rotated) + 1e-5, axis=1, keepdims=True)
    keys = np.rint(np.where(is_centre, 0.0, on_ring) + 1.0).astype(int)
    flat = data.reshape((-1,) + spatial_dims + data.shape[n_lead + D :])
    moved = jax.vmap(lambda x: x[hash(D, spatial_dims, keys)])(flat).reshape(data.shape)
    return _act_on_tensor_axes(moved, k, parity, gg, precision)


def translate(D: int, data: jax.Array, tau: jax.Array, n_lead: int = 0) -> jax.Array:
    """Shift the image on the torus by tau (ij order): out[x] = data[x - tau]."""
    if len(tau) != D:
        raise ValueError(f"translate: `tau` (={tau}) must have length D={D}")
    result = data
    for axis in range(D):
        result = jnp.roll(result, tau[axis], axis=n_lead + axis)
    return result


def norm(idx_shift: int, data: jax.Array, keepdims: bool = False) -> jax.Array:
    """Frobenius norm over all axes after the first idx_shift ones."""
    if idx_shift > data.ndim:
        raise ValueError(
            f"norm: `idx_shift` (={idx_shift}) must be at most data.ndim (={data.ndim})"
        )
    if data.ndim == idx_shift:  # a scalar per entry: the norm is the absolute value
        return jnp.abs(data)
    normed = jnp.linalg.norm(data.reshape(data.shape[:idx_shift] + (-1,)), axis=idx_shift)
    if keepdims:
        return normed.reshape(normed.shape + (1,) * (data.ndim - idx_shift))
    return normed


def _to_patches(D: int, data: jax.Array, patch_len: int) -> tuple[jax.Array, tuple[int, ...]]:
    """(spatial..., rest) -> (n_patches..., patch_len**D, rest), dropping incomplete patches."""
    spatial_dims = data.shape[:D]
    rest = data.shape[D:]
    n_patches = tuple(n // patch_len for n in spatial_dims)
    cropped = data[tuple(slice(0, n * patch_len) for n in n_patches)]
    split = cropped.reshape(sum(((n, patch_len) for n in n_patches), ()) + rest)
    order = tuple(range(0, 2 * D, 2)) + tuple(range(1, 2 * D, 2)) + tuple(
        range(2 * D, split.ndim)
    )
    return split.transpose(order).reshape(n_patches + (patch_len**D,) + rest), n_patches


def max_pool(
    D: int,
    image_data: jax.Array,
    patch_len: int,
    use_norm: bool = True,
    comparator_image: Optional[jax.Array] = None,
) -> jax.Array:
    """Pick, in each patch_len**D patch of a (spatial..., tensor...) image, the pixel with the
    largest comparator: comparator_image if given, else the pixel norm if use_norm, else the
    (scalar) value itself. Ties go to the first pixel in row-major order."""
    spatial_dims, k = parse_shape(image_data.shape, D)
    if not isinstance(patch_len, int) or patch_len < 1:
        raise ValueError(f"max_pool: `patch_len` (={patch_len}) must be a positive int")
    if comparator_image is None and not use_norm and k != 0:
        raise ValueError(
            f"max_pool: with `use_norm` (=False) and no comparator the image must be scalar, "
            f"got k={k}"
        )
    patches, _ = _to_patches(D, image_data, patch_len)
    patches = patches.reshape(patches.shape[: D + 1] + (-1,))
    if comparator_image is not None:
        if comparator_image.shape != spatial_dims:
            raise ValueError(
                f"max_pool: `comparator_image` (shape {comparator_image.shape}) must have the "
                f"spatial shape {spatial_dims}"
            )
        comparator = _to_patches(D, comparator_image, patch_len)[0]
    elif use_norm:
        comparator = jnp.linalg.norm(patches, axis=-1)
    else:
        comparator = patches[..., 0]
    best = jnp.argmax(comparator, axis=D)
    picked = jnp.take_along_axis(patches, best[..., None, None], axis=D)[..., 0, :]
    return picked.reshape(picked.shape[:D] + (D,) * k)


def average_pool(D: int, image_data: jax.Array, patch_len: int) -> jax.Array:
    """Mean over each patch_len**D patch of a (spatial..., tensor...) image."""
    spatial_dims, _ = parse_shape(image_data.shape, D)
    if not isinstance(patch_len, int) or patch_len < 1:
        raise ValueError(f"average_pool: `patch_len` (={patch_len}) must be a positive int")
    if any(n % patch_len for n in spatial_dims):
        raise ValueError(
            f"average_pool: `patch_len` (={patch_len}) must divide every spatial dim "
            f"{spatial_dims}"
        )
    patches, _ = _to_patches(D, image_data, patch_len)
    return jnp.mean(patches, axis=D)
