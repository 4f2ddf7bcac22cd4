"""Losses on batched MultiImages: every block is (batch, channels, *spatial, *tensor).

Each loss computes one value per sample first, then reduces over the batch as `reduce` asks:
"mean" (the default), "sum", or None (the per-sample values, shape (batch,)).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

_BATCH_REDUCTIONS = ("mean", "sum", None)


def _check_reduce(name: str, reduce: Any, allowed: tuple = _BATCH_REDUCTIONS) -> None:
    if reduce not in allowed:
        raise ValueError(f"{name}: `reduce` (={reduce!r}) must be one of {allowed}")


def _reduce_batch(per_sample: jax.Array, reduce: Optional[str]) -> jax.Array:
    if reduce == "mean":
        return jnp.mean(per_sample, axis=0)
    if reduce == "sum":
        return jnp.sum(per_sample, axis=0)
    return per_sample


def _paired_blocks(name: str, x: Any, y: Any) -> Iterator[tuple[Any, jax.Array, jax.Array, int]]:
    """Yield (key, x_block, y_block, n_tensor_axes) for each key, after checking the layouts agree.

    Keys are matched by name rather than by position, so two MultiImages holding the same keys in a
    different insertion order still pair up correctly.
    """
    x_keys, y_keys = list(x.keys()), list(y.keys())
    if set(x_keys) != set(y_keys):
        raise ValueError(
            f"{name}: the prediction has keys {x_keys} but the target has keys {y_keys}; "
            "they must hold the same (k, parity) keys"
        )
    if not x_keys:
        raise ValueError(f"{name}: the MultiImages are empty, there is nothing to compare")
    D = x.D
    for key in x_keys:
        x_block, y_block = x[key], y[key]
        n_tensor_axes = len(key[0]) if isinstance(key[0], tuple) else int(key[0])
        expected_ndim = 2 + D + n_tensor_axes
        if x_block.ndim != expected_ndim or y_block.ndim != expected_ndim:
            raise ValueError(
                f"{name}: blocks must be (batch, channels, *spatial, *tensor), i.e. "
                f"{expected_ndim} axes for key {key} in D={D}, but got shapes {x_block.shape} "
                f"and {y_block.shape}"
            )
        if x_block.shape != y_block.shape:
            raise ValueError(
                f"{name}: shapes differ for key {key}: prediction {x_block.shape}, "
                f"target {y_block.shape}"
            )
        yield key, x_block, y_block, n_tensor_axes


def _spatial_size(x: Any) -> int:
    return int(np.prod(x.get_spatial_dims()))


def _tensor_norm(block: jax.Array, n_tensor_axes: int) -> jax.Array:
    """Frobenius norm of every pixel's tensor; a scalar's norm is its absolute value."""
    if n_tensor_axes == 0:
        return jnp.abs(block)
    axes = tuple(range(block.ndim - n_tensor_axes, block.ndim))
    return jnp.sqrt(jnp.sum(block**2, axis=axes))


def smse_loss(multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean") -> jax.Array:
    """Sum over channels and tensor components, mean over pixels, of the squared error.

    Args:
        multi_image_x: the prediction, blocks (batch, channels, *spatial, *tensor)
        multi_image_y: the target, same layout
        reduce: "mean" or "sum" over the batch, or None for the per-sample losses

    Returns:
        a scalar, or shape (batch,) when `reduce` is None
    """
    _check_reduce("smse_loss", reduce)
    spatial_size = _spatial_size(multi_image_x)
    per_sample = 0.0
    for _, a, b, _ in _paired_blocks("smse_loss", multi_image_x, multi_image_y):
        per_sample = per_sample + jnp.sum((a - b) ** 2, axis=tuple(range(1, a.ndim)))
    return _reduce_batch(per_sample / spatial_size, reduce)


def timestep_smse_loss(
    multi_image_x: Any, multi_image_y: Any, n_steps: int, reduce: Optional[str] = "mean"
) -> jax.Array:
    """The smse loss of each time step, for channels laid out as (fields, n_steps) flattened.

    Args:
        multi_image_x: the prediction, blocks (batch, fields * n_steps, *spatial, *tensor)
        multi_image_y: the target, same layout
        n_steps: the number of time steps; every block's channel count must be a multiple of it
        reduce: "mean" or "sum" over the batch; "max" keeps the sample whose summed loss over
            the steps is largest; None keeps every sample

    Returns:
        shape (n_steps,), or (batch, n_steps) when `reduce` is None
    """
    _check_reduce("timestep_smse_loss", reduce, ("mean", "sum", "max", None))
    if not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"timestep_smse_loss: `n_steps` (={n_steps!r}) must be a positive int")
    spatial_size = _spatial_size(multi_image_x)
    per_step = 0.0
    for key, a, b, _ in _paired_blocks("timestep_smse_loss", multi_image_x, multi_image_y):
        batch, channels = a.shape[:2]
        if channels % n_steps:
            raise ValueError(
                f"timestep_smse_loss: key {key} has {channels} channels, not a multiple of "
                f"`n_steps` (={n_steps})"
            )
        split = (batch, channels // n_steps, n_steps) + a.shape[2:]
        sq = (a.reshape(split) - b.reshape(split)) ** 2
        per_step = per_step + jnp.sum(sq, axis=(1,) + tuple(range(3, sq.ndim)))
    per_step = per_step / spatial_size  # (batch, n_steps)
    if reduce == "max":
        return per_step[jnp.argmax(jnp.sum(per_step, axis=1))]
    return _reduce_batch(per_step, reduce)


def normalized_smse_loss(
    multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean", eps: float = 1e-5
) -> jax.Array:
    """smse where each pixel's squared error is divided by the target's squared norm there.

    Args:
        multi_image_x: the prediction, blocks (batch, channels, *spatial, *tensor)
        multi_image_y: the target, same layout
        reduce: "mean" or "sum" over the batch, or None for the per-sample losses
        eps: added to the squared norm so that zero targets do not divide by zero

    Returns:
        a scalar, or shape (batch,) when `reduce` is None
    """
    _check_reduce("normalized_smse_loss", reduce)
    spatial_size = _spatial_size(multi_image_x)
    per_sample = 0.0
    for _, a, b, n_tensor in _paired_blocks("normalized_smse_loss", multi_image_x, multi_image_y):
        sq_norm = _tensor_norm(b, n_tensor) ** 2
        sq_norm = sq_norm.reshape(sq_norm.shape + (1,) * n_tensor)  # broadcast over components
        ratio = (a - b) ** 2 / (sq_norm + eps)
        per_sample = per_sample + jnp.sum(ratio, axis=tuple(range(1, a.ndim)))
    return _reduce_batch(per_sample / spatial_size, reduce)


def nrmse_loss(
    multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean", eps: float = 0
) -> jax.Array:
    """Normalised root mean squared error: ||x_c - y_c|| / (||y_c|| + eps) per channel, with the
    norm over the whole image of that channel (pixels and components), then the mean over all
    channels of all keys.

    Args:
        multi_image_x: the prediction, blocks (batch, channels, *spatial, *tensor)
        multi_image_y: the target, same layout
        reduce: "mean" or "sum" over the batch, or None for the per-sample losses
        eps: added to the denominator

    Returns:
        a scalar, or shape (batch,) when `reduce` is None
    """
    _check_reduce("nrmse_loss", reduce)
    ratios = []
    for _, a, b, _ in _paired_blocks("nrmse_loss", multi_image_x, multi_image_y):
        flat_a = a.reshape(a.shape[:2] + (-1,))
        flat_b = b.reshape(b.shape[:2] + (-1,))
        diff = jnp.sqrt(jnp.sum((flat_a - flat_b) ** 2, axis=2))
        target = jnp.sqrt(jnp.sum(flat_b**2, axis=2))
        ratios.append(diff / (target + eps))  # (batch, channels)
    per_sample = jnp.mean(jnp.concatenate(ratios, axis=1), axis=1)
    return _reduce_batch(per_sample, reduce)


def nrmse_per_pixel_loss(
    multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean", eps: float = 0
) -> jax.Array:
    """Per-pixel relative error ||x - y|| / (||y|| + eps), the norm over one pixel's tensor,
    averaged over every pixel of every channel of every key.

    Args:
        multi_image_x: the prediction, blocks (batch, channels, *spatial, *tensor)
        multi_image_y: the target, same layout
        reduce: "mean" or "sum" over the batch, or None for the per-sample losses
        eps: added to the denominator

    Returns:
        a scalar, or shape (batch,) when `reduce` is None
    """
    _check_reduce("nrmse_per_pixel_loss", reduce)
    ratios = []
    for _, a, b, n_tensor in _paired_blocks("nrmse_per_pixel_loss", multi_image_x, multi_image_y):
        rel = _tensor_norm(a - b, n_tensor) / (_tensor_norm(b, n_tensor) + eps)
        ratios.append(rel.reshape(rel.shape[0], -1))  # (batch, channels * pixels)
    per_sample = jnp.mean(jnp.concatenate(ratios, axis=1), axis=1)
    return _reduce_batch(per_sample, reduce)


def l2_rel_error(
    multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean", eps: float = 0
) -> jax.Array:
    """`nrmse_loss` as a percentage."""
    return 100.0 * nrmse_loss(multi_image_x, multi_image_y, reduce, eps)


def l2_per_pixel_rel_error(
    multi_image_x: Any, multi_image_y: Any, reduce: Optional[str] = "mean", eps: float = 0
) -> jax.Array:
    """`nrmse_per_pixel_loss` as a percentage."""
    return 100.0 * nrmse_per_pixel_loss(multi_image_x, multi_image_y, reduce, eps)
