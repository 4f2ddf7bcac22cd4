"""Cutting time series of fields into (input, target) training pairs.

A dynamic field block stores its time steps in the channel axis, laid out (field, time) with the
time index fastest: (fields * total_steps, *spatial, *tensor). A pair's input holds `past_steps`
consecutive steps (every `delta_t`), its target the `future_steps` steps that follow, both laid out
(field, step) the same way; constant fields are appended after each input key's dynamic channels.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` (={value!r}) must be a positive int")


def _check_non_negative(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` (={value!r}) must be a non-negative int")


def time_series_idxs(
    past_steps: int, future_steps: int, delta_t: int, total_steps: int
) -> tuple[jax.Array, jax.Array]:
    """Time indices of every (input, target) window of a series of `total_steps` steps.

    Window i reads steps i, i + delta_t, ..., i + (past_steps - 1) * delta_t and predicts the
    `future_steps` steps that follow, again `delta_t` apart.

    Args:
        past_steps: steps in each input window
        future_steps: steps in each target window
        delta_t: stride in time between the steps of a window
        total_steps: length of the series

    Returns:
        (input_idxs, output_idxs), integer arrays of shapes (n_windows, past_steps) and
        (n_windows, future_steps)
    """
    for name, value in [
        ("past_steps", past_steps),
        ("future_steps", future_steps),
        ("delta_t", delta_t),
    ]:
        _check_positive(name, value)
    _check_non_negative("total_steps", total_steps)
    window_span = (past_steps + future_steps - 1) * delta_t  # first input step to last target step
    n_windows = total_steps - window_span
    if n_windows < 1:
        raise ValueError(
            f"`total_steps` (={total_steps}) is too short for one window of `past_steps` "
            f"(={past_steps}) + `future_steps` (={future_steps}) steps `delta_t` (={delta_t}) "
            f"apart: it needs at least {window_span + 1} steps"
        )
    starts = jnp.arange(n_windows)[:, None]
    input_idxs = starts + delta_t * jnp.arange(past_steps)[None, :]
    output_idxs = starts + delta_t * (past_steps + jnp.arange(future_steps))[None, :]
    return input_idxs, output_idxs


def _average_pool_by_2(block: jax.Array, n_leading: int, D: int) -> jax.Array:
    """Mean over 2^D pixel patches; spatial axes follow `n_leading` leading axes."""
    spatial = block.shape[n_leading : n_leading + D]
    if any(n % 2 for n in spatial):
        raise ValueError(f"`downsample` halves the spatial size, but it is {spatial}: not all even")
    split_shape = block.shape[:n_leading]
    for n in spatial:
        split_shape += (n // 2, 2)
    split_shape += block.shape[n_leading + D :]
    patch_axes = tuple(n_leading + 2 * d + 1 for d in range(D))
    return jnp.mean(block.reshape(split_shape), axis=patch_axes)


def _windows(
    dynamic_fields: Any,
    constant_fields: Optional[Any],
    total_steps: int,
    past_steps: int,
    future_steps: int,
    skip_initial: int,
    delta_t: int,
    downsample: int,
    batched: bool,
) -> tuple[Any, Any]:
    _check_positive("total_steps", total_steps)
    _check_non_negative("skip_initial", skip_initial)
    _check_non_negative("downsample", downsample)
    if len(list(dynamic_fields.keys())) == 0:
        raise ValueError("`dynamic_fields` is empty: there is no time series to cut")
    if skip_initial >= total_steps:
        raise ValueError(
            f"`skip_initial` (={skip_initial}) leaves no steps of `total_steps` (={total_steps})"
        )
    input_idxs, output_idxs = time_series_idxs(
        past_steps, future_steps, delta_t, total_steps - skip_initial
    )
    n_windows = input_idxs.shape[0]
    D = dynamic_fields.D
    lead = 1 if batched else 0  # the batch axis, if any, sits in front of the channel axis

    def cut(block: jax.Array, key: Any, idxs: jax.Array) -> jax.Array:
        batch = block.shape[:lead]
        channels = block.shape[lead]
        if channels % total_steps:
            raise ValueError(
                f"`dynamic_fields` key {key} has {channels} channels, not a multiple of "
                f"`total_steps` (={total_steps})"
            )
        rest = block.shape[lead + 1 :]
        series = block.reshape(batch + (channels // total_steps, total_steps) + rest)
        series = series[(slice(None),) * (lead + 1) + (slice(skip_initial, None),)]
        # (batch, fields, windows, steps, ...) -> (batch, windows, fields, steps, ...)
        picked = jnp.moveaxis(jnp.take(series, idxs, axis=lead + 1), lead + 1, lead)
        return picked.reshape((-1, picked.shape[lead + 1] * idxs.shape[1]) + rest)

    x, y = dynamic_fields.empty(), dynamic_fields.empty()
    for key, block in dynamic_fields.items():
        x.append(key[0], key[1], cut(block, key, input_idxs))
        y.append(key[0], key[1], cut(block, key, output_idxs))

    if constant_fields is not None:
        for key, block in constant_fields.items():
            # the same constant fields go with every window of their series
            batch, rest = block.shape[:lead], block.shape[lead:]
            repeated = jnp.broadcast_to(
                jnp.expand_dims(block, lead), batch + (n_windows,) + rest
            ).reshape((-1,) + rest)
            x.append(key[0], key[1], repeated, axis=1)

    for _ in range(downsample):
        x, y = (_pool_multi_image(m, D) for m in (x, y))
    return x, y


def _pool_multi_image(multi_image: Any, D: int) -> Any:
    out = multi_image.empty()
    for key, block in multi_image.items():
        out.append(key[0], key[1], _average_pool_by_2(block, 2, D))
    return out


def times_series_to_multi_images(
    dynamic_fields: Any,
    constant_fields: Any,
    total_steps: int,
    past_steps: int,
    future_steps: int,
    skip_initial: int = 0,
    delta_t: int = 1,
    downsample: int = 0,
) -> tuple[Any, Any]:
    """Cut one time series into (input, target) windows.

    Args:
        dynamic_fields: blocks (fields * total_steps, *spatial, *tensor), laid out (field, time)
        constant_fields: blocks (fields, *spatial, *tensor) added to every input (may be empty)
        total_steps: time steps in the series
        past_steps: steps per input window
        future_steps: steps per target window
        skip_initial: steps dropped from the start of the series first
        delta_t: stride in time between the steps of a window
        downsample: how many times to halve the spatial size by 2x...x2 average pooling

    Returns:
        (X, Y): blocks (n_windows, fields * past_steps [+ constant fields], ...) and
        (n_windows, fields * future_steps, ...)
    """
    return _windows(
        dynamic_fields,
        constant_fields,
        total_steps,
        past_steps,
        future_steps,
        skip_initial,
        delta_t,
        downsample,
        batched=False,
    )


def batch_time_series(
    dynamic_fields: Any,
    constant_fields: Any,
    total_steps: int,
    past_steps: int,
    future_steps: int,
    skip_initial: int = 0,
    delta_t: int = 1,
    downsample: int = 0,
) -> tuple[Any, Any]:
    """`times_series_to_multi_images` for a batch of series, windows of all series concatenated
    (all windows of series 0 first).

    Args:
        dynamic_fields: blocks (batch, fields * total_steps, *spatial, *tensor)
        constant_fields: blocks (batch, fields, *spatial, *tensor)
        (the rest as in `times_series_to_multi_images`)

    Returns:
        (X, Y) with batch * n_windows samples
    """
    return _windows(
        dynamic_fields,
        constant_fields,
        total_steps,
        past_steps,
        future_steps,
        skip_initial,
        delta_t,
        downsample,
        batched=True,
    )
