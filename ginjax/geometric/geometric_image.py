"""GeometricImage (one image of k-tensors on a D-dimensional grid) and GeometricFilter."""

import functools
import itertools
from typing import Any, Callable, Generator, Optional, Sequence, Union

import numpy as np
import jax
import jax.numpy as jnp
from jax.tree_util import register_pytree_node_class
from jax.typing import ArrayLike
from typing_extensions import Self

from ginjax.geometric.constants import TINY, KroneckerDeltaSymbol, LeviCivitaSymbol
from ginjax.geometric.functional_geometric_image import (
    _as_torus_tuple,
    _check_group_element,
    average_pool,
    convolve,
    hash,
    max_pool,
    mul,
    multicontract,
    norm,
    parse_shape,
    pixel_idxs,
    raise_lower,
    rotate_is_torus,
    times_group_element,
    translate,
)


def _spatial_dims_from_N(N: Union[int, tuple[int, ...]], D: int) -> tuple[int, ...]:
    spatial_dims = tuple(N) if isinstance(N, tuple) else (N,) * D
    if len(spatial_dims) != D:
        raise ValueError(f"`N` (={N}) must be an int or a tuple of D={D} side lengths")
    return spatial_dims


@register_pytree_node_class
class GeometricImage:
    """An image whose every pixel is a k-tensor of parity p in D dimensions.

    data has shape (spatial..., D, ..., D); spatial sides need not be equal.
    """

    D: int
    spatial_dims: tuple[int, ...]
    k: int
    covariant_axes: tuple[bool, ...]
    data: jax.Array
    parity: int
    is_torus: tuple[bool, ...]

    @classmethod
    def zeros(
        cls,
        N: Union[int, tuple[int, ...]],
        k: int,
        parity: int,
        D: int,
        is_torus: Union[bool, tuple[bool]] = True,
        covariant_axes: Union[bool, tuple[bool, ...]] = False,
    ) -> Self:
        spatial_dims = _spatial_dims_from_N(N, D)
        return cls(jnp.zeros(spatial_dims + (D,) * k), parity, D, is_torus, covariant_axes)

    @classmethod
    def fill(
        cls,
        N: Union[int, tuple[int, ...]],
        parity: int,
        D: int,
        fill: Union[jax.Array, float],
        is_torus: Union[bool, tuple[bool, ...]] = True,
        covariant_axes: Union[bool, tuple[bool, ...]] = False,
    ) -> Self:
        spatial_dims = _spatial_dims_from_N(N, D)
        fill_array = jnp.asarray(fill)
        data = jnp.broadcast_to(fill_array, spatial_dims + fill_array.shape)
        return cls(data, parity, D, is_torus, covariant_axes)

    def __init__(
        self: Self,
        data: jax.Array,
        parity: int,
        D: int,
        is_torus: Union[bool, tuple[bool, ...]] = True,
        covariant_axes: Union[bool, tuple[bool, ...]] = False,
    ) -> None:
        if not isinstance(D, (int, np.integer)) or D < 1:
            raise ValueError(f"GeometricImage: `D` (={D}) must be a positive int")
        self.D = int(D)
        data = jnp.asarray(data)
        self.spatial_dims, self.k = parse_shape(tuple(data.shape), self.D)
        if data.shape[self.D :] != (self.D,) * self.k:
            raise ValueError(
                f"GeometricImage: every tensor axis of `data` (shape {data.shape}) after the "
                f"D={self.D} spatial axes must have length D"
            )
        if isinstance(covariant_axes, (bool, np.bool_)):
            covariant_axes = (bool(covariant_axes),) * self.k
        covariant_axes = tuple(covariant_axes)
        if len(covariant_axes) != self.k:
            raise ValueError(
                f"GeometricImage: `covariant_axes` (={covariant_axes}) must have k={self.k} entries"
            )
        self.covariant_axes = covariant_axes
        self.parity = parity % 2
        self.is_torus = _as_torus_tuple(is_torus, self.D)
        self.data = data

    def _like(self: Self, data: jax.Array, parity: Optional[int] = None, **changes: Any) -> Self:
        """A new image of this class with new data and otherwise the same attributes."""
        kwargs = dict(is_torus=self.is_torus, covariant_axes=self.covariant_axes)
        kwargs.update(changes)
        return self.__class__(
            data, self.parity if parity is None else parity, self.D, **kwargs
        )

    def copy(self: Self) -> Self:
        return self._like(self.data)

    def hash(self: Self, indices: ArrayLike) -> tuple[jax.Array, ...]:
        return hash(self.D, self.spatial_dims, indices)

    def __getitem__(self: Self, key: Any) -> jax.Array:
        return self.data[key]

    def __setitem__(self: Self, key: Any, val: Any) -> Self:
        self.data = self.data.at[key].set(val)
        return self

    def shape(self: Self) -> tuple[int, ...]:
        return self.data.shape

    def image_shape(self: Self, plus_Ns: Optional[tuple[int, ...]] = None) -> tuple[int, ...]:
        plus_Ns = (0,) * self.D if plus_Ns is None else plus_Ns
        return tuple(n + extra for n, extra in zip(self.spatial_dims, plus_Ns))

    def image_size(self: Self) -> int:
        return int(np.prod(self.image_shape(), dtype=int))

    def pixel_shape(self: Self) -> tuple[int, ...]:
        return (self.D,) * self.k

    def pixel_size(self: Self) -> int:
        return self.D**self.k

    def __str__(self: Self) -> str:
        return (
            f"<{self.__class__.__name__} D={self.D} spatial_dims={self.spatial_dims} k={self.k} "
            f"parity={self.parity} is_torus={self.is_torus} covariant_axes={self.covariant_axes}>"
        )

    __repr__ = __str__

    def keys(self: Self) -> Any:
        return itertools.product(*(range(n) for n in self.spatial_dims))

    def key_array(self: Self) -> jax.Array:
        return pixel_idxs(self.spatial_dims)

    def pixels(self: Self) -> Generator[jax.Array, None, None]:
        for key in self.keys():
            yield self[key]

    def items(self: Self) -> Generator[tuple[Any, jax.Array], None, None]:
        for key in self.keys():
            yield key, self[key]

    def __eq__(self: Self, other: object, rtol: float = TINY, atol: float = TINY) -> bool:
        if not isinstance(other, GeometricImage):
            return False
        return (
            self.D == other.D
            and self.spatial_dims == other.spatial_dims
            and self.k == other.k
            and self.parity == other.parity
            and self.is_torus == other.is_torus
            and self.covariant_axes == other.covariant_axes
            and self.data.shape == other.data.shape
            and bool(jnp.allclose(self.data, other.data, rtol=rtol, atol=atol))
        )

    __hash__ = None  # mutable (see __setitem__), so not hashable

    def _check_same_type(self: Self, other: Any, op: str) -> None:
        if not isinstance(other, GeometricImage):
            raise TypeError(f"GeometricImage.{op}: `other` (={other!r}) must be a GeometricImage")
        mine = (self.D, self.spatial_dims, self.k, self.parity, self.is_torus, self.covariant_axes)
        theirs = (
            other.D,
            other.spatial_dims,
            other.k,
            other.parity,
            other.is_torus,
            other.covariant_axes,
        )
        if mine != theirs:
            raise ValueError(
                f"GeometricImage.{op}: (D, spatial_dims, k, parity, is_torus, covariant_axes) "
                f"must match, got {mine} and `other` {theirs}"
            )

    def __add__(self: Self, other: Self) -> Self:
        self._check_same_type(other, "__add__")
        return self._like(self.data + other.data)

    def __sub__(self: Self, other: Self) -> Self:
        self._check_same_type(other, "__sub__")
        return self._like(self.data - other.data)

    def __mul__(self: Self, other: Union[Self, float, int]) -> Self:
        if isinstance(other, GeometricImage):
            if (self.D, self.spatial_dims, self.is_torus) != (
                other.D,
                other.spatial_dims,
                other.is_torus,
            ):
                raise ValueError(
                    "GeometricImage.__mul__: D, spatial_dims and is_torus must match, got "
                    f"{(self.D, self.spatial_dims, self.is_torus)} and `other` "
                    f"{(other.D, other.spatial_dims, other.is_torus)}"
                )
            return self._like(
                mul(self.D, self.data, other.data),
                self.parity + other.parity,
                covariant_axes=self.covariant_axes + other.covariant_axes,
            )
        return self._like(self.data * other)

    def __rmul__(self: Self, other: Union[float, int]) -> Self:
        return self * other

    def transpose(self: Self, axes_permutation: Sequence[int]) -> Self:
        """Permute the tensor axes, keeping the spatial axes in place."""
        if sorted(axes_permutation) != list(range(self.k)):
            raise ValueError(
                f"GeometricImage.transpose: `axes_permutation` (={axes_permutation}) must be a "
                f"permutation of range({self.k})"
            )
        order = tuple(range(self.D)) + tuple(self.D + axis for axis in axes_permutation)
        return self._like(
            jnp.transpose(self.data, order),
            covariant_axes=tuple(self.covariant_axes[axis] for axis in axes_permutation),
        )

    def convolve_with(
        self: Self,
        filter_image: Self,
        stride: Union[int, tuple[int, ...]] = 1,
        padding: Optional[tuple[tuple[int, int]]] = None,
        lhs_dilation: Optional[tuple[int, ...]] = None,
        rhs_dilation: Union[int, tuple[int, ...]] = 1,
    ) -> Self:
        """Tensor convolution with one filter; see functional `convolve`."""
        convolved = convolve(
            self.D,
            self.data[None, None],
            filter_image.data[None, None],
            self.is_torus,
            stride,
            padding,
            lhs_dilation,
            rhs_dilation,
        )
        return self._like(
            convolved[0, 0],
            self.parity + filter_image.parity,
            covariant_axes=self.covariant_axes + filter_image.covariant_axes,
        )

    def max_pool(self: Self, patch_len: int, use_norm: bool = True) -> Self:
        return self._like(max_pool(self.D, self.data, patch_len, use_norm))

    def average_pool(self: Self, patch_len: int) -> Self:
        return self._like(average_pool(self.D, self.data, patch_len))

    def unpool(self: Self, patch_len: int) -> Self:
        """Nearest-neighbour upsampling: every pixel becomes a patch_len**D block."""
        repeated = self.data
        for axis in range(self.D):
            repeated = jnp.repeat(repeated, patch_len, axis=axis)
        return self._like(repeated)

    def times_scalar(self: Self, scalar: float) -> Self:
        return self * scalar

    def norm(self: Self) -> Self:
        """Pixelwise Frobenius norm, a scalar image."""
        return self.__class__(norm(self.D, self.data), 0, self.D, self.is_torus)

    def normalize(self: Self) -> Self:
        """Scale so that the largest pixel norm is 1 (unchanged if all pixels are ~0)."""
        max_norm = float(jnp.max(self.norm().data))
        return self.times_scalar(1.0 / max_norm if max_norm > TINY else 1.0)

    def activation_function(self: Self, function: Callable[[jax.Array], jax.Array]) -> Self:
        if self.k != 0:
            raise ValueError(
                f"GeometricImage.activation_function: needs a scalar image (k=0), got k={self.k}"
            )
        return self._like(function(self.data))

    def contract(self: Self, i: int, j: int) -> Self:
        """Contract tensor axes i and j with the Kronecker delta."""
        if self.k < 2:
            raise ValueError(f"GeometricImage.contract: needs k >= 2, got k={self.k}")
        return self.multicontract(((i, j),))

    def multicontract(self: Self, indices: tuple[tuple[int, int], ...]) -> Self:
        if self.k < 2:
            raise ValueError(f"GeometricImage.multicontract: needs k >= 2, got k={self.k}")
        indices = tuple((int(a), int(b)) for a, b in indices)
        used = {axis for pair in indices for axis in pair}
        new_covariant_axes = tuple(
            cov for axis, cov in enumerate(self.covariant_axes) if axis not in used
        )
        return self._like(
            multicontract(self.data, indices, self.D), covariant_axes=new_covariant_axes
        )

    def levi_civita_contract(self: Self, indices: Union[tuple[int, ...], int]) -> Self:
        """Tensor product with the Levi-Civita symbol followed by D-1 contractions of the given
        axes with its first D-1 axes; flips parity, k becomes k - D + 2."""
        if not isinstance(indices, tuple):
            indices = (indices,)
        if self.k < self.D - 1 or len(indices) != self.D - 1:
            raise ValueError(
                f"GeometricImage.levi_civita_contract: needs k >= D-1 (k={self.k}, D={self.D}) "
                f"and D-1 `indices` (={indices})"
            )
        outer = jnp.tensordot(self.data, LeviCivitaSymbol.get(self.D), axes=0)
        pairs = tuple(
            (i + self.D, j + self.D) for i, j in zip(indices, range(self.k, self.k + len(indices)))
        )
        return self._like(
            multicontract(outer, pairs),
            self.parity + 1,
            covariant_axes=self.covariant_axes[: self.k - self.D + 2],
        )

    def raise_lower(
        self: Self,
        metric_tensor: Self,
        metric_tensor_inv: Self,
        axes: tuple[bool, ...],
        precision: Optional[jax.lax.Precision] = None,
    ) -> Self:
        new_data = raise_lower(
            self.data,
            metric_tensor.data,
            metric_tensor_inv.data,
            self.covariant_axes,
            axes,
            precision,
        )
        return self._like(new_data, covariant_axes=axes)

    def raise_lower_precise(
        self: Self, metric_tensor: Self, metric_tensor_inv: Self, axes: tuple[bool, ...]
    ) -> Self:
        return self.raise_lower(metric_tensor, metric_tensor_inv, axes, jax.lax.Precision.HIGHEST)

    def times_group_element(
        self: Self, gg: np.ndarray, precision: Optional[jax.lax.Precision] = None
    ) -> Self:
        """Apply the O(D) element gg (acting on contravariant vectors as gg @ v)."""
        gg = _check_group_element("GeometricImage.times_group_element", self.D, gg)
        return self._like(
            times_group_element(
                self.D, self.data, self.parity, gg, self.covariant_axes, precision
            ),
            is_torus=rotate_is_torus(self.is_torus, gg),
        )

    def times_gg_precise(self: Self, gg: np.ndarray) -> Self:
        return self.times_group_element(gg, jax.lax.Precision.HIGHEST)

    def translate(self: Self, tau: jax.Array) -> Self:
        """Shift on the torus by tau (ij order)."""
        if self.is_torus != (True,) * self.D:
            raise ValueError(
                f"GeometricImage.translate: image must be a torus, `is_torus` (={self.is_torus})"
            )
        return self._like(translate(self.D, self.data, tau, 0))

    def plot(self: Self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("GeometricImage.plot is not implemented in this package yet")

    def tree_flatten(self: Self) -> tuple[tuple[jax.Array], dict[str, Any]]:
        aux_data = {
            "D": self.D,
            "parity": self.parity,
            "is_torus": self.is_torus,
            "covariant_axes": self.covariant_axes,
        }
        return (self.data,), aux_data

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        obj = object.__new__(cls)
        # bypass __init__: under jit/vmap the leaves may be tracers or batched placeholders
        obj.data = children[0]
        obj.D = aux_data["D"]
        obj.parity = aux_data["parity"]
        obj.is_torus = aux_data["is_torus"]
        obj.covariant_axes = aux_data["covariant_axes"]
        obj.k = len(obj.covariant_axes)
        shape = getattr(obj.data, "shape", None)
        obj.spatial_dims = tuple(shape[: obj.D]) if shape is not None else ()
        return obj


@functools.total_ordering
@register_pytree_node_class
class GeometricFilter(GeometricImage):
    """A GeometricImage with equal spatial sides, used as a convolution filter."""

    def __init__(
        self: Self,
        data: jax.Array,
        parity: int,
        D: int,
        is_torus: Union[bool, tuple[bool, ...]] = True,
        covariant_axes: Union[bool, tuple[bool, ...]] = False,
    ) -> None:
        super().__init__(data, parity, D, is_torus, covariant_axes)
        if len(set(self.spatial_dims)) > 1:
            raise ValueError(
                f"GeometricFilter: spatial dims (={self.spatial_dims}) must all be equal"
            )

    @classmethod
    def from_image(cls, geometric_image: GeometricImage) -> Self:
        return cls(
            geometric_image.data,
            geometric_image.parity,
            geometric_image.D,
            geometric_image.is_torus,
            geometric_image.covariant_axes,
        )

    def bigness(self: Self) -> float:
        """Norm-weighted mean distance of the pixels from pixel index 0 (a size measure)."""
        norms = np.asarray(self.norm().data).reshape(-1)
        keys = np.asarray(self.key_array())
        numerator = float(np.sum(np.linalg.norm(keys, axis=1) * np.abs(norms)))
        return numerator / float(np.sum(norms))

    def nonempty_pixels(self: Self) -> jax.Array:
        """Flat (image_size,) boolean mask of pixels with any entry away from 0."""
        data = np.asarray(self.data)
        nonzero = ~np.isclose(data, 0.0, rtol=TINY, atol=TINY)
        return jnp.asarray(np.any(nonzero.reshape((self.image_size(), -1)), axis=1))

    def nonempty_pixel_idxs(self: Self) -> jax.Array:
        """Centred indices (n_nonempty, D) of the nonempty pixels, in row-major order."""
        centred = np.asarray(pixel_idxs(self.spatial_dims)) - (
            np.array(self.spatial_dims).reshape((1, self.D)) - 1
        ) / 2
        return jnp.array(centred[np.asarray(self.nonempty_pixels())], dtype=jnp.float32)

    def _k2_parts(self: Self) -> tuple[float, float, float, int]:
        """Totals of the symmetric-traceless, antisymmetric and trace parts of a 2-tensor
        filter, and a code saying which of them are present (trace 1, antisym 10, sym 100)."""
        pixels = np.asarray(self.data, dtype=np.float32).reshape((-1, self.D, self.D))
        trace = np.einsum("pii->p", pixels) / self.D
        antisym = (pixels - np.transpose(pixels, (0, 2, 1))) / 2
        sym = (pixels + np.transpose(pixels, (0, 2, 1))) / 2 - trace[:, None, None] * np.eye(
            self.D
        )
        upper = np.triu_indices(self.D)
        strict_upper = np.triu_indices(self.D, 1)
        # symmetric: upper triangle incl. diagonal, minus the last diagonal entry (redundant)
        sym_total = float(np.sum(np.linalg.norm(sym[:, upper[0], upper[1]][:, :-1], axis=1)))
        antisym_total = float(
            np.sum(np.linalg.norm(antisym[:, strict_upper[0], strict_upper[1]], axis=1))
        )
        trace_total = float(np.sum(np.abs(trace)))
        code = int(trace_total != 0) + 10 * int(antisym_total != 0) + 100 * int(sym_total != 0)
        return sym_total, antisym_total, trace_total, code

    def __lt__(self: Self, other: Self) -> bool:
        """Order by D, spatial shape, k, parity, (k=2) which irreducible parts are present,
        max L1 then L2 distance of nonempty pixels from the centre, (k=2) part totals, and
        finally the summed pixel norms."""
        if not isinstance(other, GeometricFilter):
            return NotImplemented
        if self.D != other.D:
            return self.D < other.D
        if self.image_shape() != other.image_shape():
            return self.image_shape() < other.image_shape()
        if self.k != other.k:
            return self.k < other.k
        if self.parity != other.parity:
            return self.parity < other.parity

        if self.k == 2:
            self_parts, other_parts = self._k2_parts(), other._k2_parts()
            if self_parts[3] != other_parts[3]:
                return self_parts[3] < other_parts[3]

        self_idxs = np.asarray(self.nonempty_pixel_idxs())
        other_idxs = np.asarray(other.nonempty_pixel_idxs())
        self_l1 = float(np.max(np.sum(np.abs(self_idxs), axis=1)))
        other_l1 = float(np.max(np.sum(np.abs(other_idxs), axis=1)))
        self_l2 = float(np.max(np.linalg.norm(self_idxs, axis=1)))
        other_l2 = float(np.max(np.linalg.norm(other_idxs, axis=1)))
        if abs(self_l1 - other_l1) > TINY:
            return self_l1 < other_l1
        if abs(self_l2 - other_l2) > TINY:
            return self_l2 < other_l2

        if self.k == 2:
            for mine, theirs in zip(self_parts[:3], other_parts[:3]):
                if abs(mine - theirs) > TINY:
                    return mine < theirs

        return float(jnp.sum(self.norm().data)) < float(jnp.sum(other.norm().data))

    def rectify(self: Self) -> Self:
        """Fix the overall sign of a filter (filters are defined up to a scalar): scalars sum
        positive; vectors point outward (D=2 pseudovectors: circulate positively)."""
        keys = np.asarray(self.key_array()).reshape(self.spatial_dims + (self.D,))
        data = np.asarray(self.data)
        if self.k == 0:
            flip = np.sum(data) < 0
        elif self.k == 1 and self.parity == 0:
            flip = np.sum(np.einsum("...i,...i", keys, data)) < 0
        elif self.k == 1 and self.D == 2:
            flip = np.sum(keys[..., 0] * data[..., 1] - keys[..., 1] * data[..., 0]) < 0
        else:
            flip = False
        return self.times_scalar(-1) if flip else self


def get_kronecker_delta_image(N: int, D: int) -> GeometricImage:
    """A scalar-parity 2-tensor image with the identity matrix in every pixel."""
    delta = jnp.asarray(KroneckerDeltaSymbol.get(D, 2), dtype=jnp.float32)
    data = jnp.broadcast_to(delta, (N,) * D + (D, D))
    return GeometricImage(data, 0, D, covariant_axes=(True, False))


def get_metric_inverse(metric_tensor: GeometricImage, eps: float = TINY) -> GeometricImage:
    """Pixelwise inverse of a symmetric metric tensor image (g_ij -> g^ij), regularised by eps
    on the eigenvalues."""
    eigvals, eigvecs = jnp.linalg.eigh(metric_tensor.data, symmetrize_input=False)
    inv_eigvals = 1.0 / (eigvals + eps)
    inverse = jnp.einsum("...ij,...j,...kj->...ik", eigvecs, inv_eigvals, eigvecs)
    return GeometricImage(
        inverse, 0, metric_tensor.D, metric_tensor.is_torus, (False, False)
    )
