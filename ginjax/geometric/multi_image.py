"""MultiImage: a collection of geometric-image blocks keyed by tensor type, and Signature.

Why one file past 600 lines: it is ginjax 0.1.8's public module of the same name (users import
MultiImage and Signature from this path), and most of its length is MultiImage's API methods.
"""

from collections.abc import ItemsView, KeysView, Mapping, ValuesView
import numbers
from typing import Any, Optional, Sequence, Union

import numpy as np
import jax
import jax.numpy as jnp
from jax.tree_util import register_pytree_node_class
from typing_extensions import Self

from ginjax.geometric.constants import TINY
from ginjax.geometric.functional_geometric_image import (
    _check_group_element,
    average_pool,
    norm,
    rotate_is_torus,
    times_group_element,
)
from ginjax.geometric.geometric_image import GeometricImage

KeyType = tuple[tuple[bool, ...], int]


def normalize_key(key: Any) -> KeyType:
    """((False,)*k, parity % 2) from a key given as (k, parity) or (k_tuple, parity)."""
    if not isinstance(key, tuple) or len(key) != 2:
        raise ValueError(
            f"MultiImage key `key` (={key!r}) must be a pair (k, parity) or ((bool,)*k, parity)"
        )
    k, parity = key
    if isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)):
        if k < 0:
            raise ValueError(f"MultiImage key `key` (={key!r}): tensor order k must be >= 0")
        k_tuple = (False,) * int(k)
    elif isinstance(k, tuple) and all(isinstance(a, (bool, np.bool_)) for a in k):
        k_tuple = tuple(bool(a) for a in k)
    else:
        raise ValueError(
            f"MultiImage key `key` (={key!r}): k must be an int or a tuple of bools"
        )
    if not isinstance(parity, (int, np.integer)) or isinstance(parity, (bool, np.bool_)):
        raise ValueError(f"MultiImage key `key` (={key!r}): parity must be an int")
    return k_tuple, int(parity) % 2


def Signature(
    signature: Union[Sequence[tuple[Any, int]], Mapping[Any, int]],
) -> tuple[tuple[KeyType, int], ...]:
    """The layout of a MultiImage: a tuple of ((k_tuple, parity), channels) pairs. Keys may be
    given with an int k; they are stored as ((False,)*k, parity). A mapping {(k, parity):
    channels} is taken in its iteration order."""
    if isinstance(signature, Mapping):
        signature = tuple(signature.items())
    if signature is None or isinstance(signature, (str, bytes)):
        raise ValueError(
            f"Signature: `signature` (={signature!r}) must be a sequence of ((k, parity), "
            "channels) pairs or a mapping {(k, parity): channels}"
        )
    try:
        entries = tuple(signature)
    except TypeError:
        raise ValueError(
            f"Signature: `signature` (={signature!r}) must be a sequence of ((k, parity), "
            "channels) pairs or a mapping {(k, parity): channels}"
        ) from None
    out = []
    for entry in entries:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ValueError(
                f"Signature: entry (={entry!r}) must be a pair ((k, parity), channels)"
            )
        key, channels = entry
        if not isinstance(channels, (int, np.integer)) or isinstance(channels, bool) or channels < 0:
            raise ValueError(f"Signature: channels of entry (={entry!r}) must be an int >= 0")
        out.append((normalize_key(key), int(channels)))
    return tuple(out)


def signature_union(
    signature_a: tuple, signature_b: tuple, num_channels: int
) -> tuple[tuple[KeyType, int], ...]:
    """Every key of either signature, each with num_channels channels."""
    keys = {key for key, _ in Signature(signature_a)} | {key for key, _ in Signature(signature_b)}
    return Signature(tuple((key, num_channels) for key in keys))


def _torus_tuple(is_torus: Union[bool, tuple[bool, ...]], D: int) -> tuple[bool, ...]:
    if isinstance(is_torus, (bool, np.bool_)):
        return (bool(is_torus),) * D
    if isinstance(is_torus, tuple) and len(is_torus) == D:
        return tuple(bool(t) for t in is_torus)
    raise ValueError(f"MultiImage: `is_torus` (={is_torus}) must be a bool or a tuple of D={D} bools")


@register_pytree_node_class
class MultiImage:
    """Blocks of geometric images keyed by ((False,)*k, parity), in insertion order.

    Each block has shape (lead..., spatial..., tensor...): the leading axes (channels; batch in
    front of them under vmap) and the spatial dims are the same for every block.
    """

    D: int
    is_torus: tuple[bool, ...]
    data: dict[KeyType, jax.Array]
    metric_tensor: Optional[GeometricImage]
    metric_tensor_inv: Optional[GeometricImage]

    def __init__(
        self: Self,
        data: Union[dict[KeyType, jax.Array], dict[tuple[int, int], jax.Array]],
        D: int,
        is_torus: Union[bool, tuple[bool, ...]] = True,
        metric_tensor: Optional[GeometricImage] = None,
        metric_tensor_inv: Optional[GeometricImage] = None,
    ) -> None:
        if not isinstance(D, (int, np.integer)) or isinstance(D, bool) or D < 1:
            raise ValueError(f"MultiImage: `D` (={D}) must be a positive int")
        if not isinstance(data, dict):
            raise TypeError(f"MultiImage: `data` (={type(data).__name__}) must be a dict")
        self.D = int(D)
        self.is_torus = _torus_tuple(is_torus, self.D)
        if metric_tensor is not None and (
            metric_tensor.k != 2
            or metric_tensor.parity != 0
            or metric_tensor.covariant_axes != (True, True)
        ):
            raise ValueError(
                "MultiImage: `metric_tensor` must be a k=2, parity 0 image with covariant axes "
                f"(True, True), got {metric_tensor}"
            )
        self.metric_tensor = metric_tensor
        self.metric_tensor_inv = metric_tensor_inv
        self.data = {}
        for key, block in data.items():
            self[key] = block

    # --- construction -----------------------------------------------------------------------

    def copy(self: Self) -> Self:
        return self.__class__(
            self.data, self.D, self.is_torus, self.metric_tensor, self.metric_tensor_inv
        )

    def empty(self: Self, same_metric: bool = True) -> Self:
        """A MultiImage with no blocks and the same D, is_torus (and metric if same_metric)."""
        return self.__class__(
            {},
            self.D,
            self.is_torus,
            self.metric_tensor if same_metric else None,
            self.metric_tensor_inv if same_metric else None,
        )

    @classmethod
    def from_images(
        cls,
        images: Sequence[GeometricImage],
        n_lead_axes: int = 1,
        axis=0,
        metric_tensor: Optional[GeometricImage] = None,
    ) -> Self:
        """Stack GeometricImages (same D and is_torus) into blocks by (k, parity), each image
        given n_lead_axes leading axes of length 1 and concatenated along `axis`."""
        if len(images) == 0:
            raise ValueError("MultiImage.from_images: `images` (=[]) must not be empty")
        out = cls({}, images[0].D, images[0].is_torus, metric_tensor)
        for image in images:
            if image.D != out.D or image.is_torus != out.is_torus:
                raise ValueError(
                    f"MultiImage.from_images: every image needs D={out.D}, is_torus="
                    f"{out.is_torus}, got {image}"
                )
            out.append(
                image.covariant_axes,
                image.parity,
                image.data.reshape((1,) * n_lead_axes + image.data.shape),
                axis=axis,
            )
        return out

    @classmethod
    def from_vector(cls, vector: jax.Array, multi_image: Self) -> Self:
        """Inverse of to_vector, using multi_image for the keys and block shapes."""
        if vector.shape != (multi_image.size(),):
            raise ValueError(
                f"MultiImage.from_vector: `vector` (shape {vector.shape}) must have shape "
                f"({multi_image.size()},)"
            )
        out = multi_image.empty()
        start = 0
        for key, block in multi_image.items():
            out[key] = vector[start : start + block.size].reshape(block.shape)
            start += block.size
        return out

    def __str__(self: Self) -> str:
        lines = [f"{self.__class__.__name__} D: {self.D}, is_torus: {self.is_torus}"]
        lines += [f"\t{key}: {block.shape}" for key, block in self.items()]
        if self.metric_tensor is not None:
            lines.append(f"\tmetric tensor: {self.metric_tensor.shape()}")
        return "\n".join(lines)

    __repr__ = __str__

    # --- basic info -------------------------------------------------------------------------

    def size(self: Self) -> int:
        return int(sum(block.size for block in self.values()))

    def get_spatial_dims(self: Self) -> tuple[int, ...]:
        for (k, _), block in self.items():
            n_lead = block.ndim - len(k) - self.D
            return tuple(block.shape[n_lead : n_lead + self.D])
        return ()

    def keys(self: Self) -> KeysView[KeyType]:
        return self.data.keys()

    def values(self: Self) -> ValuesView[jax.Array]:
        return self.data.values()

    def items(self: Self) -> ItemsView[KeyType, jax.Array]:
        return self.data.items()

    def __getitem__(self: Self, idx: KeyType) -> jax.Array:
        key = normalize_key(idx)
        if key not in self.data:
            raise KeyError(f"MultiImage: key `idx` (={idx!r}) not in keys {list(self.keys())}")
        return self.data[key]

    def __setitem__(self: Self, idx: KeyType, val: jax.Array) -> jax.Array:
        key = normalize_key(idx)
        self._check_block(key, val)
        self.data[key] = val
        return val

    def __contains__(self: Self, idx: object) -> bool:
        try:
            return normalize_key(idx) in self.data
        except ValueError:
            return False

    def __iter__(self):
        raise TypeError("MultiImage is not iterable; use keys(), values() or items()")

    def _check_block(self: Self, key: KeyType, block: Any) -> None:
        """A block must end in (spatial..., D^k) and agree with the other blocks on the
        number of leading axes and the spatial dims."""
        shape = getattr(block, "shape", None)
        if shape is None:
            raise TypeError(f"MultiImage: block for key {key} must be an array, got {block!r}")
        k = len(key[0])
        if len(shape) < self.D + k or tuple(shape[len(shape) - k :]) != (self.D,) * k:
            raise ValueError(
                f"MultiImage: block for key {key} (shape {tuple(shape)}) must end with D={self.D} "
                f"spatial axes and {k} tensor axes of length {self.D}"
            )
        others = [(other_key, b) for other_key, b in self.items() if other_key != key]
        if not others:
            return
        n_lead = len(shape) - k - self.D
        spatial = tuple(shape[n_lead : n_lead + self.D])
        if n_lead != self.get_n_leading() or spatial != self.get_spatial_dims():
            raise ValueError(
                f"MultiImage: block for key {key} (shape {tuple(shape)}) has {n_lead} leading "
                f"axes and spatial dims {spatial}, but the other blocks have "
                f"{self.get_n_leading()} and {self.get_spatial_dims()}"
            )

    def __eq__(self: Self, other: object, rtol: float = TINY, atol: float = TINY) -> bool:
        if not isinstance(other, MultiImage):
            return False
        if (
            self.D != other.D
            or self.is_torus != other.is_torus
            or set(self.keys()) != set(other.keys())
            or self.metric_tensor != other.metric_tensor
        ):
            return False
        return all(
            self[key].shape == other[key].shape
            and bool(jnp.allclose(self[key], other[key], rtol=rtol, atol=atol))
            for key in self.keys()
        )

    __hash__ = None

    # --- combining --------------------------------------------------------------------------

    def append(
        self: Self,
        k: Union[tuple[bool, ...], int],
        parity: int,
        image_block: jax.Array,
        axis: int = 0,
    ) -> Self:
        """Add a block at (k, parity); if the key exists, concatenate along leading `axis`."""
        key = normalize_key((k, parity))
        if key in self.data:
            n_lead = self.get_n_leading()
            if not 0 <= axis < n_lead:
                raise ValueError(
                    f"MultiImage.append: `axis` (={axis}) must be one of the {n_lead} leading axes"
                )
            existing = self.data[key]
            if existing.ndim != image_block.ndim or any(
                a != b for i, (a, b) in enumerate(zip(existing.shape, image_block.shape))
                if i != axis
            ):
                raise ValueError(
                    f"MultiImage.append: `image_block` (shape {image_block.shape}) cannot be "
                    f"concatenated to key {key} (shape {existing.shape}) along axis {axis}"
                )
            self.data[key] = jnp.concatenate((existing, image_block), axis=axis)
        else:
            self[key] = image_block
        return self

    def _check_compatible(self: Self, other: Any, op: str, same_keys: bool = True) -> None:
        if not isinstance(other, MultiImage):
            raise TypeError(f"MultiImage.{op}: `other` (={type(other).__name__}) must be a MultiImage")
        if self.D != other.D or self.is_torus != other.is_torus:
            raise ValueError(
                f"MultiImage.{op}: D and is_torus must match, got ({self.D}, {self.is_torus}) "
                f"and `other` ({other.D}, {other.is_torus})"
            )
        if same_keys and set(self.keys()) != set(other.keys()):
            raise ValueError(
                f"MultiImage.{op}: keys must match, got {list(self.keys())} and `other` "
                f"{list(other.keys())}"
            )
        if self.metric_tensor != other.metric_tensor:
            raise ValueError(f"MultiImage.{op}: metric tensors do not match")

    def _blockwise(self: Self, other: Self, op: str, fn) -> Self:
        self._check_compatible(other, op)
        out = self.empty()
        for key, block in self.items():
            if block.shape != other[key].shape:
                raise ValueError(
                    f"MultiImage.{op}: block {key} shapes differ: {block.shape} and `other` "
                    f"{other[key].shape}"
                )
            out[key] = fn(block, other[key])
        return out

    def __add__(self: Self, other: Self) -> Self:
        return self._with_block_means(other, self._blockwise(other, "__add__", jnp.add), jnp.add)

    def __sub__(self: Self, other: Self) -> Self:
        return self._with_block_means(other, self._blockwise(other, "__sub__", jnp.subtract), jnp.subtract)

    # --- spatial means that a block's producer computed (private: the layers' fast path) ------

    def _set_block_mean(self: Self, idx: KeyType, mean: jax.Array) -> None:
        """Record `mean`, the spatial mean (channels, *tensor) of the block now at `idx`, as the
        layer that made the block computed it (e.g. the VectorNeuron's kernel, as it wrote the
        block), so that a ConvContract's bias need not read the block again for it. The record
        holds for that very block only: once the key holds another array it is ignored."""
        key = normalize_key(idx)
        self.__dict__.setdefault("_block_means", {})[key] = (self.data[key], mean)

    def _block_mean(self: Self, idx: KeyType) -> Optional[jax.Array]:
        """The mean `_set_block_mean` recorded for the block at `idx`, if the key still holds
        that block; else None (pytree flattening, copies and new blocks drop the record)."""
        key = normalize_key(idx)
        entry = self.__dict__.get("_block_means", {}).get(key)
        return entry[1] if entry is not None and self.data.get(key) is entry[0] else None

    def _with_block_means(self: Self, other: Self, out: Self, fn) -> Self:
        """`out` = fn(self, other) blockwise, with fn(mean, mean) recorded where both operands
        have their block's mean (the mean is linear)."""
        for key in out.keys():
            a, b = self._block_mean(key), other._block_mean(key)
            if a is not None and b is not None:
                out._set_block_mean(key, fn(a, b))
        return out

    def __mul__(self: Self, other: Union[Self, float]) -> Self:
        if isinstance(other, MultiImage):
            raise TypeError("MultiImage.__mul__: `other` must be a number, not a MultiImage")
        out = self.empty()
        for key, block in self.items():
            out[key] = block * other
        return out

    __rmul__ = __mul__

    def __truediv__(self: Self, other: float) -> Self:
        return self * (1.0 / other)

    def concat(self: Self, other: Self, axis: int = 0) -> Self:
        """Append every block of other (along `axis` where the key already exists)."""
        self._check_compatible(other, "concat", same_keys=False)
        out = self.copy()
        for (k, parity), block in other.items():
            out.append(k, parity, block, axis)
        return out

    def concat_inverse(
        self: Self,
        signature: Union[tuple, dict[KeyType, int]],
        axis: int = 0,
    ) -> tuple[Self, Self]:
        """Split into (a, b) where b takes the last signature[key] entries along `axis` of each
        block, so that a.concat(b, axis).concat_inverse(b's signature, axis) gives a and b."""
        if isinstance(signature, dict):
            sizes = {normalize_key(key): n for key, n in signature.items()}
        else:
            sizes = {key: n for key, n in Signature(signature)}
        a, b = self.empty(), self.empty()
        for key, block in self.items():
            size = sizes.get(key, 0)
            axis_len = block.shape[axis]
            if not 0 <= size <= axis_len:
                raise ValueError(
                    f"MultiImage.concat_inverse: size for key {key} (={size}) must be in "
                    f"[0, {axis_len}]"
                )
            head = (slice(None),) * (axis % block.ndim)
            if size < axis_len:
                a.append(*key, block[head + (slice(0, axis_len - size),)], axis)
            if size > 0:
                b.append(*key, block[head + (slice(axis_len - size, axis_len),)], axis)
        return a, b

    # --- conversions ------------------------------------------------------------------------

    def to_images(self: Self) -> list[GeometricImage]:
        images = []
        spatial = self.get_spatial_dims()
        for (k, parity), block in self.items():
            for image in block.reshape((-1,) + spatial + (self.D,) * len(k)):
                images.append(GeometricImage(image, parity, self.D, self.is_torus, k))
        return images

    def to_vector(self: Self) -> jax.Array:
        """All blocks raveled and concatenated in key order."""
        if len(self.data) == 0:
            return jnp.zeros(0)
        return jnp.concatenate([block.reshape(-1) for block in self.values()])

    def to_scalar_multi_image(self: Self) -> Self:
        """One scalar block whose channels are every (channel, component) of every block."""
        n_batch = self.get_n_leading() - 1
        if n_batch < 0:
            raise ValueError("MultiImage.to_scalar_multi_image: needs at least a channel axis")
        out = self.empty()
        for (k, _), block in self.items():
            # (..., c, spatial, tensor) -> (..., spatial, c * tensor) -> (..., c * tensor, spatial)
            moved = jnp.moveaxis(block, n_batch, block.ndim - 1 - len(k))
            moved = moved.reshape(moved.shape[: n_batch + self.D] + (-1,))
            out.append(0, 0, jnp.moveaxis(moved, -1, n_batch), axis=n_batch)
        return out

    def from_scalar_multi_image(self: Self, layout: tuple) -> Self:
        """Inverse of to_scalar_multi_image for the given signature."""
        if list(self.keys()) != [((), 0)]:
            raise ValueError(
                f"MultiImage.from_scalar_multi_image: needs only the scalar key, got {list(self.keys())}"
            )
        spatial = self.get_spatial_dims()
        n_batch = self.get_n_leading() - 1
        scalars = jnp.moveaxis(self[((), 0)], n_batch, -1)  # (..., spatial, c * tensor)
        out = self.empty()
        start = 0
        for (k, parity), n_channels in Signature(layout):
            length = n_channels * self.D ** len(k)
            piece = scalars[..., start : start + length].reshape(
                scalars.shape[:n_batch] + spatial + (n_channels,) + (self.D,) * len(k)
            )
            out.append(k, parity, jnp.moveaxis(piece, piece.ndim - 1 - len(k), n_batch))
            start += length
        if start != scalars.shape[-1]:
            raise ValueError(
                f"MultiImage.from_scalar_multi_image: `layout` (={layout}) uses {start} of "
                f"{scalars.shape[-1]} scalar channels"
            )
        return out

    def raise_lower(
        self: Self,
        new_signature: tuple,
        channel_axis: Optional[int] = None,
        precision: Optional[jax.lax.Precision] = None,
    ) -> Self:
        raise NotImplementedError(
            "MultiImage.raise_lower: metric tensors are not supported in this version yet"
        )

    def raise_all(self: Self, precision: Optional[jax.lax.Precision] = None) -> Self:
        raise NotImplementedError(
            "MultiImage.raise_all: metric tensors are not supported in this version yet"
        )

    def lower_all(self: Self, precision: Optional[jax.lax.Precision] = None) -> Self:
        raise NotImplementedError(
            "MultiImage.lower_all: metric tensors are not supported in this version yet"
        )

    # --- group action and pointwise ops -----------------------------------------------------

    def times_group_element(
        self: Self, gg: np.ndarray, precision: Optional[jax.lax.Precision] = None
    ) -> Self:
        """Apply the O(D) element gg to every block (and the metric tensors, if any)."""
        gg = _check_group_element("MultiImage.times_group_element", self.D, gg)
        out = self.__class__(
            {},
            self.D,
            rotate_is_torus(self.is_torus, gg),
            None if self.metric_tensor is None else self.metric_tensor.times_group_element(gg, precision),
            None
            if self.metric_tensor_inv is None
            else self.metric_tensor_inv.times_group_element(gg, precision),
        )
        for (k, parity), block in self.items():
            out[(k, parity)] = times_group_element(self.D, block, parity, gg, k, precision)
        return out

    def times_gg_precise(self: Self, gg: np.ndarray) -> Self:
        return self.times_group_element(gg, jax.lax.Precision.HIGHEST)

    def norm(self: Self) -> Self:
        """Pixel norms of every block, concatenated as channels of one scalar block."""
        n_lead = self.get_n_leading()
        if n_lead < 1:
            raise ValueError("MultiImage.norm: blocks need at least one channel axis")
        out = self.empty()
        for _, block in self.items():
            out.append(0, 0, norm(n_lead + self.D, block), axis=n_lead - 1)
        return out

    def average_pool(self: Self, patch_len: int) -> Self:
        out = self.empty(same_metric=False)
        n_lead = self.get_n_leading()
        pool = jax.vmap(average_pool, in_axes=(None, 0, None))
        for key, block in self.items():
            pooled = pool(self.D, block.reshape((-1,) + block.shape[n_lead:]), patch_len)
            out[key] = pooled.reshape(block.shape[:n_lead] + pooled.shape[1:])
        return out

    def get_component(self: Self, component: Union[int, slice], future_steps: int = 1) -> Self:
        """With blocks (channels * future_steps, spatial, tensor), lay all fields side by side
        as (future_steps, spatial, fields) and keep field `component` as a scalar image."""
        if self.get_n_leading() != 1:
            raise ValueError(
                f"MultiImage.get_component: needs exactly 1 leading axis, got {self.get_n_leading()}"
            )
        spatial = self.get_spatial_dims()
        fields = []
        for (k, _), block in self.items():
            expanded = block.reshape((-1, future_steps) + spatial + (self.D,) * len(k))
            expanded = jnp.moveaxis(expanded, 0, 1 + self.D)  # (time, spatial, c, tensor)
            fields.append(expanded.reshape((future_steps,) + spatial + (-1,)))
        if not fields:
            raise ValueError("MultiImage.get_component: the MultiImage has no blocks")
        data = jnp.concatenate(fields, axis=-1)
        picked = data[..., component].reshape((future_steps,) + spatial + (-1,))
        picked = jnp.moveaxis(picked, -1, 0).reshape((-1,) + spatial)
        return self.__class__(
            {(0, 0): picked}, self.D, self.is_torus, self.metric_tensor, self.metric_tensor_inv
        )

    def batch_get_component(self: Self, component: Union[int, slice], future_steps: int = 1) -> Self:
        """get_component mapped over a leading batch axis."""
        return jax.vmap(lambda x: x.get_component(component, future_steps))(self)

    def expand(self: Self, axis: int, size: int) -> Self:
        """Split leading `axis` into (-1, size) in every block."""
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"MultiImage.expand: `size` (={size!r}) must be a positive int")
        out = self.empty()
        for key, block in self.items():
            if block.shape[axis] % size:
                raise ValueError(
                    f"MultiImage.expand: `size` (={size}) must divide axis {axis} of length "
                    f"{block.shape[axis]}"
                )
            out[key] = block.reshape(block.shape[:axis] + (-1, size) + block.shape[axis + 1 :])
        return out

    def combine_axes(self: Self, axes: Sequence[int]) -> Self:
        """Merge the adjacent axes `axes` of every block into one."""
        axes = list(axes)
        if len(axes) == 0 or axes != list(range(axes[0], axes[-1] + 1)):
            raise ValueError(f"MultiImage.combine_axes: `axes` (={axes}) must be consecutive")
        out = self.empty()
        for key, block in self.items():
            out[key] = block.reshape(block.shape[: axes[0]] + (-1,) + block.shape[axes[-1] + 1 :])
        return out

    def merge_axes(self: Self, axes: Sequence[int]) -> Self:
        if len(axes) < 2:
            raise ValueError(f"MultiImage.merge_axes: `axes` (={axes}) must name at least 2 axes")
        return self.combine_axes(axes)

    # --- signature and leading axes ---------------------------------------------------------

    def get_signature(self: Self) -> tuple[tuple[KeyType, int], ...]:
        """((key, channels), ...) with channels the last leading axis of each block."""
        n_lead = self.get_n_leading()
        if self.data and n_lead < 1:
            raise ValueError("MultiImage.get_signature: blocks need at least one channel axis")
        return tuple((key, int(block.shape[n_lead - 1])) for key, block in self.items())

    def get_signature_dict(self: Self) -> dict[KeyType, int]:
        return dict(self.get_signature())

    def get_n_leading(self: Self) -> int:
        for (k, _), block in self.items():
            return block.ndim - self.D - len(k)
        return 0

    def get_L(self: Self) -> int:
        for block in self.values():
            return int(block.shape[0])
        return 0

    def reshape_pmap(self: Self, devices: list, axis: int = 0) -> Self:
        """Split the batch axis into (n_devices, batch / n_devices)."""
        n_devices = len(devices)
        if self.get_L() % n_devices:
            raise ValueError(
                f"MultiImage.reshape_pmap: {n_devices} devices must divide the batch {self.get_L()}"
            )
        return self.expand(axis, self.get_L() // n_devices)

    def get_subset(self: Self, idxs: jax.Array) -> Self:
        """Select entries idxs (a 1-D integer array) of the first axis of every block; numpy
        indices out of range are refused (jax arrays are indexed as jax does: clamped)."""
        if not isinstance(idxs, (jax.Array, np.ndarray)) or np.ndim(idxs) < 1:
            raise TypeError(
                f"MultiImage.get_subset: `idxs` (={idxs!r}) must be an array with at least 1 axis"
            )
        # host indices are checked (jax would clamp them to the ends: a silent wrong subset); a
        # jax array is not, since reading it would wait for the device (the batching loops pass
        # slices of an on-device permutation, and a wait there would stall every train step)
        if isinstance(idxs, np.ndarray) and len(self.data):
            n = next(iter(self.values())).shape[0]
            bad = idxs[(idxs < -n) | (idxs >= n)]
            if bad.size:
                raise ValueError(
                    f"MultiImage.get_subset: `idxs` holds {bad.ravel()[:5].tolist()}, out of range "
                    f"for the {n} entries of the first axis"
                )
        return self.__class__(
            {key: block[idxs] for key, block in self.items()},
            self.D,
            self.is_torus,
            self.metric_tensor,
            self.metric_tensor_inv,
        )

    def get_one(self: Self, idx: int = 0, keepdims=True) -> Self:
        if keepdims:
            return self.get_subset(jnp.array([idx]))
        return self.__class__(
            {key: block[idx] for key, block in self.items()},
            self.D,
            self.is_torus,
            self.metric_tensor,
            self.metric_tensor_inv,
        )

    def plot(self: Self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("MultiImage.plot is not implemented in this package yet")

    # --- pytree -----------------------------------------------------------------------------

    def tree_flatten(self):
        children = (tuple(self.data.values()), self.metric_tensor, self.metric_tensor_inv)
        aux_data = (tuple(self.data.keys()), self.D, self.is_torus)
        return children, aux_data

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        keys, D, is_torus = aux_data
        blocks, metric_tensor, metric_tensor_inv = children
        obj = object.__new__(cls)
        # no validation: under jit/vmap the leaves may be tracers or placeholders
        obj.D = D
        obj.is_torus = is_torus
        obj.metric_tensor = metric_tensor
        obj.metric_tensor_inv = metric_tensor_inv
        obj.data = dict(zip(keys, blocks))
        return obj
