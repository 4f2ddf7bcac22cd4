"""Layers that map a MultiImage to a MultiImage (the ginjax 0.1.8 `ginjax.layers` interface).

Every layer is an `equinox.Module` with an unbatched `__call__`: a MultiImage block has shape
(channels, *spatial, *(D,)*k) and a batch is added with `jax.vmap` / `eqx.filter_vmap`.

`ConvContract`, the equivariant convolution, lives in `ginjax._conv_contract` (it dispatches to
the `kernels` backends) and is re-exported here so that `ginjax.layers.ConvContract` works.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as random
from jaxtyping import ArrayLike

from ginjax import _init_random, geometric as geom
from ginjax._conv_contract import ConvContract, MultiImageLayer
from ginjax._validate import residual_blocks
from ginjax._filter_bank import FilterBank
from ginjax._norm_stats import scalar_group_norm, vector_group_norm, vector_group_norm_coefficients
from ginjax._vector_neuron import vector_neuron

__all__ = [
    "ConvContract",
    "FilterBank",
    "GroupNorm",
    "LayerNorm",
    "LayerWrapper",
    "LayerWrapperAux",
    "MaxNormPool",
    "MultiImageLayer",
    "VectorNeuronNonlinear",
]

Key = tuple[tuple[bool, ...], int]
_SCALAR: Key = ((), 0)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _check_dimension(layer: str, x: geom.MultiImage, D: int) -> None:
    if not isinstance(x, geom.MultiImage):
        raise TypeError(f"{layer}: `x` (={type(x).__name__}) must be a geom.MultiImage")
    if x.D != D:
        raise ValueError(f"{layer}: `x.D` (={x.D}) does not match the layer's `D` (={D})")


def _missing_key(layer: str, key: Key, known) -> KeyError:
    return KeyError(
        f"{layer}: input key {key} was not in the `input_keys` the layer was built with "
        f"(known keys: {sorted(known, key=str)})"
    )


def _group_norm_K1(
    D: int, image_block: jax.Array, groups: int, method: str = "eigh", eps: float = 1e-5
) -> jax.Array:
    """Whiten a block of vector images, channel group by channel group.

    Within each group the vectors of all its channels and pixels are centred on their mean and
    multiplied by a whitening matrix built from their (biased) D x D covariance C:
    - "eigh": C^(-1/2) = U diag(1/sqrt(lambda + eps)) U^T, which commutes with rotations and
      reflections, so the result is equivariant;
    - "cholesky": solves y (L + eps I) = x with C = L L^T; cheaper but not equivariant.

    Args:
        D: dimension of the space.
        image_block: vector images, shape (channels, *spatial, D).
        groups: number of channel groups; must divide `channels`.
        method: "eigh" or "cholesky".
        eps: added to the eigenvalues ("eigh") or to the Cholesky factor's diagonal ("cholesky").

    Returns:
        The whitened block, shape (channels, *spatial, D).
    """
    _check_vector_block(D, image_block, groups)
    return vector_group_norm(image_block, groups, D, eps, method)


def _check_vector_block(D: int, image_block: jax.Array, groups: int) -> None:
    k = image_block.ndim - 1 - D
    if k != 1:
        raise ValueError(
            f"_group_norm_K1: `image_block` (shape {tuple(image_block.shape)}) must be a block of "
            f"vector images (channels, *spatial, D) with D={D}, but its tensor order is k={k}"
        )
    if image_block.shape[-1] != D:
        raise ValueError(
            f"_group_norm_K1: the last axis of `image_block` (shape {tuple(image_block.shape)}) "
            f"must have length D (={D})"
        )
    channels = image_block.shape[0]
    if not isinstance(groups, int) or groups <= 0 or channels % groups != 0:
        raise ValueError(
            f"_group_norm_K1: `groups` (={groups}) must be a positive int dividing the number of "
            f"channels (={channels})"
        )


# ---------------------------------------------------------------------------------------------
# normalisation
# ---------------------------------------------------------------------------------------------
class GroupNorm(MultiImageLayer):
    """Group normalisation of a MultiImage, equivariant for scalars and vectors.

    Scalars (k=0) use `equinox.nn.GroupNorm`. Vectors (k=1) are whitened per channel group with
    `_group_norm_K1` ("eigh"), then scaled per channel and shifted by `bias` times the channel's
    spatial mean vector. Tensors of order k > 1 are not supported.

    groups = channels gives instance norm, groups = 1 layer norm.

    Shapes: input and output blocks (channels, *spatial, *(D,)*k), unbatched.
    """

    scale: dict[Key, jax.Array]
    bias: dict[Key, jax.Array]
    vanilla_norm: dict[Key, eqx.nn.GroupNorm]

    D: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        input_keys: geom.Signature,
        D: int,
        groups: int,
        eps: float = 1e-5,
    ) -> None:
        """
        Args:
            input_keys: signature of the input, ((k, parity), channels) per key.
            D: dimension of the space.
            groups: number of channel groups; must divide every key's channel count.
            eps: added to the variance (scalars) or eigenvalues (vectors).
        """
        if not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"GroupNorm: `groups` (={groups}) must be a positive int")
        self.D = D
        self.groups = groups
        self.eps = eps
        self.scale = {}
        self.bias = {}
        self.vanilla_norm = {}
        for (k, p), channels in input_keys:
            if channels % groups != 0:
                raise ValueError(
                    f"GroupNorm: `groups` (={groups}) must divide the channels (={channels}) of "
                    f"input key {(k, p)}"
                )
            if len(k) == 0:
                self.vanilla_norm[(k, p)] = eqx.nn.GroupNorm(groups, channels, eps)
            elif len(k) == 1:
                self.scale[(k, p)] = jnp.ones(channels)
                self.bias[(k, p)] = jnp.zeros(channels)
            else:
                raise NotImplementedError(
                    f"GroupNorm: equivariant normalisation of tensors of order k>1 is not "
                    f"implemented, but `input_keys` has key {(k, p)} (k={len(k)})"
                )

    def __call__(self, x: geom.MultiImage) -> geom.MultiImage:
        """Normalise `x`, a MultiImage with blocks (channels, *spatial, *(D,)*k), k <= 1."""
        _check_dimension(type(self).__name__, x, self.D)
        out = x.empty()
        for (k, p), block in x.items():
            out.append(k, p, self._normalize_block(k, p, block))
        return out

    def _normalize_block(self, k, p, block: jax.Array) -> jax.Array:
        """One block normalised; vector blocks as `_vector_affine`'s map."""
        if len(k) == 0:
            if (k, p) not in self.vanilla_norm:
                raise _missing_key(type(self).__name__, (k, p), self._known_keys())
            return scalar_group_norm(self.vanilla_norm[(k, p)], block)
        self._check_vector_key(k, p, block)
        # whitening, scale and the mean-vector bias as one per-channel affine map
        return vector_group_norm(block, self.groups, self.D, self.eps, "eigh", self.scale[(k, p)], self.bias[(k, p)])

    def _vector_affine(self, k, p, block: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """A vector block's normalisation as its per-channel affine map (M, v, shift): whitening,
        scale and the mean-vector bias (`vector_group_norm_coefficients`)."""
        self._check_vector_key(k, p, block)
        return vector_group_norm_coefficients(
            block, self.groups, self.D, self.eps, "eigh", self.scale[(k, p)], self.bias[(k, p)]
        )

    def _check_vector_key(self, k, p, block: jax.Array) -> None:
        if len(k) != 1:
            raise NotImplementedError(
                f"{type(self).__name__}: equivariant normalisation of tensors of order k>1 is "
                f"not implemented, but `x` has key {(k, p)} (k={len(k)})"
            )
        if (k, p) not in self.scale:
            raise _missing_key(type(self).__name__, (k, p), self._known_keys())
        _check_vector_block(self.D, block, self.groups)

    def _known_keys(self) -> list:
        return list(self.vanilla_norm) + list(self.scale)


class LayerNorm(GroupNorm):
    """`GroupNorm` with a single group: each key is normalised over all channels and pixels."""

    def __init__(self, input_keys: geom.Signature, D: int, eps: float = 1e-5) -> None:
        """
        Args:
            input_keys: signature of the input, ((k, parity), channels) per key.
            D: dimension of the space.
            eps: added to the variance (scalars) or eigenvalues (vectors).
        """
        super().__init__(input_keys, D, 1, eps)


# ---------------------------------------------------------------------------------------------
# nonlinearity
# ---------------------------------------------------------------------------------------------
class VectorNeuronNonlinear(MultiImageLayer):
    """The Vector Neurons nonlinearity (Deng et al. 2021, arXiv:2104.12229) for tensor images.

    Scalars get `scalar_activation` directly. For any other key, a learned channel mixing
    d = weights @ x gives a direction per pixel; the component of x along d/|d| is rescaled by
    scalar_activation(<x, d/|d|>) / |<x, d/|d|>| and the orthogonal part is kept, so the layer
    commutes with rotations and reflections.

    Shapes: input and output blocks (channels, *spatial, *(D,)*k); `weights[key]` is
    (channels, channels) for every non-scalar key.
    """

    weights: dict[Key, jax.Array]

    eps: float = eqx.field(static=True)
    D: int = eqx.field(static=True)
    scalar_activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        input_keys: geom.Signature,
        D: int,
        scalar_activation: Callable[[ArrayLike], jax.Array] = jax.nn.relu,
        eps: float = 1e-5,
        key: Any = None,
    ) -> None:
        """
        Args:
            input_keys: signature of the input, ((k, parity), channels) per key.
            D: dimension of the space.
            scalar_activation: elementwise nonlinearity, e.g. jax.nn.relu or jax.nn.gelu.
            eps: keeps the divisions by |d| and |<x, d/|d|>| finite.
            key: jax.random key for the channel mixing weights (needed unless every key is a
                plain scalar).
        """
        if not callable(scalar_activation):
            raise TypeError(
                f"VectorNeuronNonlinear: `scalar_activation` (={scalar_activation!r}) must be "
                "callable"
            )
        self.eps = eps
        self.D = D
        self.scalar_activation = scalar_activation
        self.weights = {}
        for (k, p), channels in input_keys:
            if (k, p) == _SCALAR:
                continue
            if key is None:
                raise ValueError(
                    "VectorNeuronNonlinear: `key` (=None) must be a jax.random key, input key "
                    f"{(k, p)} needs initial weights"
                )
            bound = 1.0 / math.sqrt(channels)
            key, subkey = random.split(key)
            self.weights[(k, p)] = _init_random.uniform(subkey, (channels, channels), minval=-bound, maxval=bound)

    def __call__(self, x: geom.MultiImage, *, residual: Optional[geom.MultiImage] = None) -> geom.MultiImage:
        """Apply the nonlinearity to `x`, a MultiImage with blocks (channels, *spatial, *tensor).

        `residual` (an extension of ginjax 0.1.8's call): None, or a MultiImage added to the
        result, `layer(x) + residual` (a residual block's input); where it has the result's keys
        and block shapes, the VectorNeuron kernels add it as they write each block."""
        _check_dimension("VectorNeuronNonlinear", x, self.D)
        blocks = residual_blocks(residual, x, x.keys(), shapes={k: b.shape for k, b in x.items()})
        out = x.empty()
        for (k, p), block in x.items():
            self._append_activated(out, k, p, block, residual=None if blocks is None else blocks[(k, p)])
        return out if residual is None or blocks is not None else out + residual

    def _append_activated(self, out: geom.MultiImage, k, p, block: jax.Array, affine: Optional[tuple] = None,
                          residual: Optional[jax.Array] = None) -> None:
        """Append the activated block (plus `residual`, if given) to `out`, with its spatial mean
        where the kernel added it up (read by a following ConvContract's bias:
        `MultiImage._set_block_mean`)."""
        if (k, p) == _SCALAR:
            y = self.scalar_activation(block)
            out.append(k, p, y if residual is None else y + residual)
            return
        y, mean = self._activate_block(k, p, block, affine=affine, with_means=True, residual=residual)
        out.append(k, p, y)
        if mean is not None:
            out._set_block_mean((k, p), mean)

    def _activate_block(self, k, p, block: jax.Array, affine: Optional[tuple] = None, with_means: bool = False,
                        residual: Optional[jax.Array] = None):
        """One block through the nonlinearity; `affine` (M, v, shift), for non-scalar blocks:
        the nonlinearity of M (block - shift) + v (`vector_neuron`); `with_means` (non-scalar
        blocks): (y, its spatial mean or None), as `vector_neuron`'s."""
        if (k, p) == _SCALAR:
            return self.scalar_activation(block)
        if (k, p) not in self.weights:
            raise _missing_key("VectorNeuronNonlinear", (k, p), list(self.weights) + [_SCALAR])
        weight = self.weights[(k, p)]
        if weight.shape[1] != block.shape[0]:
            raise ValueError(
                f"VectorNeuronNonlinear: key {(k, p)} of `x` has {block.shape[0]} channels, "
                f"but the layer was built for {weight.shape[1]}"
            )
        # one custom-VJP operation: the mixing is a batched GEMM under vmap, the rest one
        # elementwise pass forward and one backward (ginjax._vector_neuron)
        return vector_neuron(weight, block, self.D, self.scalar_activation, self.eps, affine=affine,
                             with_means=with_means, **({} if residual is None else {"residual": residual}))


def normalize_and_activate(
    norm: GroupNorm, nonlinearity: VectorNeuronNonlinear, x: geom.MultiImage,
    residual: Optional[geom.MultiImage] = None,
) -> geom.MultiImage:
    """nonlinearity(norm(x)), equal to the two layers one after the other, with each vector
    block's normalisation handed to the VectorNeuron as its affine map: where the fused Triton
    kernels run it they apply the map in registers, so the normalised block is never written
    out nor kept for the backward (ginjax._vector_neuron).
    `residual`: None, or a MultiImage added to the result, as `VectorNeuronNonlinear`'s."""
    _check_dimension(type(norm).__name__, x, norm.D)
    _check_dimension("VectorNeuronNonlinear", x, nonlinearity.D)
    out = x.empty()
    blocks = residual_blocks(residual, x, x.keys(), shapes={k: b.shape for k, b in x.items()})
    for (k, p), block in x.items():
        res = None if blocks is None else blocks[(k, p)]
        if len(k) == 1:
            nonlinearity._append_activated(out, k, p, block, affine=norm._vector_affine(k, p, block), residual=res)
        else:
            nonlinearity._append_activated(out, k, p, norm._normalize_block(k, p, block), residual=res)
    return out if residual is None or blocks is not None else out + residual


# ---------------------------------------------------------------------------------------------
# pooling
# ---------------------------------------------------------------------------------------------
def _norm_max_pool(D: int, block: jax.Array, patch_len: int, use_norm: bool) -> jax.Array:
    """Max pool (channels, *spatial, *tensor) over non-overlapping patch_len^D patches.

    The winning pixel of a patch is the one of largest tensor norm (use_norm) or, for scalars
    without use_norm, of largest value; its whole tensor is kept. Ties go to the first pixel in
    row-major patch order (and a NaN score wins, the first NaN, as jnp.argmax decides).

    Computed in the block's own layout, (channels, n_0, p, n_1, p, ..., *tensor), with a one-hot
    mask of the winners: reductions and a select, so neither the forward nor its gradient
    transposes the block or runs a gather, scatter or select-and-scatter.
    """
    channels = block.shape[0]
    spatial = block.shape[1 : 1 + D]
    tensor_shape = block.shape[1 + D :]
    split_shape = (channels,)
    for n in spatial:
        split_shape += (n // patch_len, patch_len)
    split = block.reshape(split_shape + tensor_shape)
    patch_axes = tuple(2 + 2 * i for i in range(D))
    tensor_axes = tuple(range(1 + 2 * D, split.ndim))
    values = jax.lax.stop_gradient(split)  # the choice of winner carries no gradient
    if use_norm:
        score = jnp.sum(values * values, axis=tensor_axes) if tensor_axes else values * values
    else:
        score = values
    # row-major position of every pixel inside its patch, broadcast over (channels, *coarse)
    position = jnp.zeros((), jnp.int32)
    for i, ax in enumerate(patch_axes):
        shape = [1] * score.ndim
        shape[ax] = patch_len
        step = patch_len ** (D - 1 - i)
        position = position + step * jnp.arange(patch_len, dtype=jnp.int32).reshape(shape)
    best = jnp.max(score, axis=patch_axes, keepdims=True)
    hit = (score == best) | jnp.isnan(score)
    first = jnp.min(jnp.where(hit, position, patch_len**D), axis=patch_axes, keepdims=True)
    winner = (position == first).reshape(score.shape + (1,) * len(tensor_shape))
    return jnp.sum(jnp.where(winner, split, jnp.zeros((), split.dtype)), axis=patch_axes)


class MaxNormPool(MultiImageLayer):
    """Max pooling over non-overlapping patches, choosing the pixel of largest tensor norm.

    With use_norm=False only scalar images can be pooled (plain max pooling). Every spatial size
    must be divisible by `patch_len`.

    Shapes: input block (channels, *spatial, *tensor) -> (channels, *(spatial // patch_len),
    *tensor).
    """

    patch_len: int = eqx.field(static=True)
    use_norm: bool = eqx.field(static=True)

    def __init__(self, patch_len: int, use_norm: bool = True) -> None:
        """
        Args:
            patch_len: side length of the square (cubic) patches.
            use_norm: compare pixels by tensor norm; False compares raw scalar values.
        """
        if not isinstance(patch_len, int) or patch_len <= 0:
            raise ValueError(f"MaxNormPool: `patch_len` (={patch_len}) must be a positive int")
        self.patch_len = patch_len
        self.use_norm = use_norm

    def __call__(self, x: geom.MultiImage) -> geom.MultiImage:
        """Pool every block of `x` (unbatched MultiImage)."""
        if not isinstance(x, geom.MultiImage):
            raise TypeError(f"MaxNormPool: `x` (={type(x).__name__}) must be a geom.MultiImage")
        D = x.D
        out = x.empty()
        for (k, p), block in x.items():
            spatial = tuple(block.shape[1 : 1 + D])
            if any(n % self.patch_len != 0 for n in spatial):
                raise ValueError(
                    f"MaxNormPool: `patch_len` (={self.patch_len}) must divide every spatial "
                    f"size, but key {(k, p)} has spatial shape {spatial}"
                )
            if not self.use_norm and len(k) > 0:
                raise ValueError(
                    f"MaxNormPool: `use_norm` (=False) only pools scalar images, but `x` has key "
                    f"{(k, p)} of order k={len(k)}"
                )
            out.append(k, p, _norm_max_pool(D, block, self.patch_len, self.use_norm))
        return out


# ---------------------------------------------------------------------------------------------
# wrappers for plain (non-equivariant) modules
# ---------------------------------------------------------------------------------------------
class LayerWrapper(MultiImageLayer):
    """Apply a plain module or function to each block of a MultiImage.

    The module maps an unbatched block (channels, *spatial, ...) to a block of the same tensor
    type (it may change channels and spatial size, e.g. a convolution on a scalar image).
    """

    modules: dict[Key, Callable[..., Any]]

    def __init__(self, module: Callable[..., Any], input_keys: geom.Signature) -> None:
        """
        Args:
            module: a callable (module or activation) on one block.
            input_keys: signature of the MultiImages it will process, one entry per key.
        """
        if not callable(module):
            raise TypeError(f"LayerWrapper: `module` (={module!r}) must be callable")
        self.modules = {}
        for (k, p), _ in input_keys:
            self.modules[(k, p)] = module

    def __call__(self, x: geom.MultiImage) -> geom.MultiImage:
        """Apply the wrapped module to every block of `x`."""
        if not isinstance(x, geom.MultiImage):
            raise TypeError(f"LayerWrapper: `x` (={type(x).__name__}) must be a geom.MultiImage")
        out = type(x)({}, x.D, x.is_torus)
        for (k, p), block in x.items():
            if (k, p) not in self.modules:
                raise _missing_key("LayerWrapper", (k, p), self.modules)
            out.append(k, p, self.modules[(k, p)](block))
        return out


class LayerWrapperAux(eqx.Module):
    """Like `LayerWrapper`, for modules taking and returning auxiliary state (e.g. BatchNorm).

    The module is called as module(block, aux_data) -> (block, aux_data) on each block in turn.
    """

    modules: dict[Key, Callable[..., Any]]

    def __init__(self, module: Callable[..., Any], input_keys: geom.Signature):
        """
        Args:
            module: a callable (block, aux_data) -> (block, aux_data), e.g. eqx.nn.BatchNorm.
            input_keys: signature of the MultiImages it will process, one entry per key.
        """
        if not callable(module):
            raise TypeError(f"LayerWrapperAux: `module` (={module!r}) must be callable")
        self.modules = {}
        for (k, p), _ in input_keys:
            self.modules[(k, p)] = module

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State]
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the wrapped module to every block of `x`, threading `aux_data` through."""
        if not isinstance(x, geom.MultiImage):
            raise TypeError(
                f"LayerWrapperAux: `x` (={type(x).__name__}) must be a geom.MultiImage"
            )
        out = type(x)({}, x.D, x.is_torus)
        for (k, p), block in x.items():
            if (k, p) not in self.modules:
                raise _missing_key("LayerWrapperAux", (k, p), self.modules)
            new_block, aux_data = self.modules[(k, p)](block, aux_data)
            out.append(k, p, new_block)
        return out, aux_data
