"""Rolling a one-step model forward in time.

An autoregressive input has, for each key, `c * past_steps` dynamic channels laid out
(field, step) with the oldest step first, followed by that key's constant fields.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp


def _normalise_key(key: Any) -> tuple[tuple[bool, ...], int]:
    k, parity = key
    if isinstance(k, int):
        k = (False,) * k
    return tuple(k), parity % 2


def autoregressive_step(
    input: Any,
    output: Any,
    past_steps: int,
    constant_fields_dict: dict = {},
    future_steps: int = 1,
) -> Any:
    """The next input: each field drops its oldest step and gains the model's output as newest.

    Args:
        input: the model input, blocks (c * past_steps + n_constant, *spatial, *tensor)
        output: the model output for one time step, blocks (c, *spatial, *tensor)
        past_steps: number of time steps per field in `input`
        constant_fields_dict: {key: number of constant fields at the end of that key's channels}
        future_steps: steps in `output`; only 1 is supported, as in ginjax 0.1.8

    Returns:
        the new input, same keys, order and shapes as `input`
    """
    if future_steps != 1:
        raise ValueError(f"`future_steps` (={future_steps!r}) must be 1")
    if not isinstance(past_steps, int) or past_steps < 1:
        raise ValueError(f"`past_steps` (={past_steps!r}) must be a positive int")
    n_constant = {_normalise_key(key): n for key, n in constant_fields_dict.items()}

    new_input = input.empty()
    for key, block in input.items():
        n_const = n_constant.get(key, 0)
        n_dynamic = block.shape[0] - n_const
        if n_const < 0 or n_dynamic < 0:
            raise ValueError(
                f"`constant_fields_dict` gives key {key} {n_const} constant fields but the input "
                f"has only {block.shape[0]} channels of it"
            )
        if n_dynamic % past_steps:
            raise ValueError(
                f"key {key} has {n_dynamic} dynamic channels, not a multiple of `past_steps` "
                f"(={past_steps})"
            )
        parts = []
        if n_dynamic:
            if key not in output:
                raise ValueError(f"key {key} has dynamic fields in the input but not in the output")
            n_fields = n_dynamic // past_steps
            newest = output[key]
            if newest.shape[0] != n_fields * future_steps:
                raise ValueError(
                    f"the output has {newest.shape[0]} channels of key {key}, the input "
                    f"{n_fields} fields of it: they must match"
                )
            history = block[:n_dynamic].reshape((n_fields, past_steps) + block.shape[1:])
            shifted = jnp.concatenate([history[:, future_steps:], newest[:, None]], axis=1)
            parts.append(shifted.reshape((n_dynamic,) + block.shape[1:]))
        if n_const:
            parts.append(block[n_dynamic:])
        new_block = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)
        new_input.append(key[0], key[1], new_block)
    return new_input


def autoregressive_map(
    model: Any,
    x: Any,
    aux_data: Optional[Any] = None,
    past_steps: int = 1,
    autoregressive_steps: int = 1,
    constant_fields: dict = {},
) -> tuple[Any, Optional[Any]]:
    """Apply a one-step model `autoregressive_steps` times, feeding each output back in.

    Args:
        model: called as `model(x, aux_data) -> (one_step_output, aux_data)`
        x: the first input, one sample (no batch axis; vmap this function for a batch)
        aux_data: passed to and returned by the model
        past_steps: time steps per field in `x`
        autoregressive_steps: how many steps to predict
        constant_fields: {key: number of constant fields}, see `autoregressive_step`

    Returns:
        (predictions, aux_data): blocks (c * autoregressive_steps, ...) laid out (field, step)
    """
    if not isinstance(autoregressive_steps, int) or autoregressive_steps < 1:
        raise ValueError(
            f"`autoregressive_steps` (={autoregressive_steps!r}) must be a positive int"
        )
    predictions = []
    for _ in range(autoregressive_steps):
        one_step, aux_data = model(x, aux_data)
        x = autoregressive_step(x, one_step, past_steps, constant_fields)
        predictions.append(one_step)

    out = predictions[0].empty()
    for key in predictions[0].keys():
        # (fields, steps, ...) flattened so that each field's steps are contiguous
        stacked = jnp.stack([p[key] for p in predictions], axis=1)
        out.append(key[0], key[1], stacked.reshape((-1,) + stacked.shape[2:]))
    return out, aux_data
