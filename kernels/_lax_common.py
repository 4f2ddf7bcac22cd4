"""Pieces shared by the lax backends: torus wrap and the conv call in channels-last layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._spec import ConvSpec


def wrap_pad(x: jax.Array, spec: ConvSpec, lead: int) -> jax.Array:
    """Wrap the torus axes of `x` (spatial axes start after `lead` axes)."""
    if not any(lo or hi for lo, hi in spec.torus_pad):
        return x
    pads = [(0, 0)] * x.ndim
    for ax, (lo, hi) in enumerate(spec.torus_pad):
        pads[lead + ax] = (lo, hi)
    return jnp.pad(x, pads, mode="wrap")


def dimension_numbers(D: int) -> tuple[str, str, str]:
    return ("NHWC", "HWIO", "NHWC") if D == 2 else ("NHWDC", "HWDIO", "NHWDC")


def conv_channels_last(
    x: jax.Array,
    w: jax.Array,
    spec: ConvSpec,
    precision,
    feature_group_count: int = 1,
    out_dtype=jnp.float32,
) -> jax.Array:
    """lax conv of x (1, *spatial, Cin) [already wrapped] with w (*taps, Cin/groups, Cout)."""
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=spec.stride,
        padding=spec.zero_pad,
        lhs_dilation=spec.lhs_dilation,
        rhs_dilation=spec.rhs_dilation,
        dimension_numbers=dimension_numbers(spec.D),
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=out_dtype,
    )


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when the operands are (x64 oracles); never lower than float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
