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


def conv_general_channels_last(
    x: jax.Array,
    w: jax.Array,
    *,
    stride,
    padding,
    lhs_dilation,
    rhs_dilation,
    feature_group_count: int = 1,
    precision=None,
    out_dtype=None,
    dimension_numbers_=None,
) -> jax.Array:
    """lax.conv_general_dilated of x (N, *spatial, Cin) with w (*taps, Cin/groups, Cout), explicit
    non-negative `padding` ((lo, hi) per spatial axis) applied to the lhs-dilated input
    (`dimension_numbers_`: channels-last strings for D outside 2 and 3).

    Where an axis pads more than the dilated filter spans (lo > (M - 1) r), the input gradient that
    JAX derives is a convolution with a negative low padding, and XLA:CPU's f32 convolution gets
    that wrong (openxla/xla#48713: it reads past the cropped edge). There the padding and the
    lhs dilation are done by one lax.pad and the convolution is VALID, whose transposes pad by
    non-negative amounts only. Elsewhere the padding stays in the convolution (cuDNN pads for free).
    """
    D = x.ndim - 2
    lhs_dilation = tuple(lhs_dilation or (1,) * D)
    rhs_dilation = tuple(rhs_dilation or (1,) * D)
    padding = tuple(tuple(p) for p in padding)
    spans = [(m - 1) * r for m, r in zip(w.shape[:D], rhs_dilation)]
    if any(lo > span or hi > span for (lo, hi), span in zip(padding, spans)):
        pads = [(0, 0, 0)] + [(lo, hi, s - 1) for (lo, hi), s in zip(padding, lhs_dilation)] + [(0, 0, 0)]
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
        padding, lhs_dilation = ((0, 0),) * D, (1,) * D
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=tuple(stride),
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers_ or dimension_numbers(D),
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=out_dtype,
    )


def conv_channels_last(
    x: jax.Array,
    w: jax.Array,
    spec: ConvSpec,
    precision,
    feature_group_count: int = 1,
    out_dtype=jnp.float32,
) -> jax.Array:
    """lax conv of x (1, *spatial, Cin) [already wrapped] with w (*taps, Cin/groups, Cout)."""
    return conv_general_channels_last(
        x,
        w,
        stride=spec.stride,
        padding=spec.zero_pad,
        lhs_dilation=spec.lhs_dilation,
        rhs_dilation=spec.rhs_dilation,
        feature_group_count=feature_group_count,
        precision=precision,
        out_dtype=out_dtype,
    )


def compute_dtype(*arrays) -> jnp.dtype:
    """float32, or float64 when the operands are (x64 oracles); never lower than float32."""
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)
