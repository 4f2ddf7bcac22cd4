"""Thin layers on the CUDA kernels by zero channels (on by default; GINJAX_CUDA_PAD_CHANNELS=0 turns it off).

A model's first layer lifts a few data channels into the hidden ones (2 + 2 -> 16 + 16 in the
benchmarked steps) and its last projects them back (16 + 16 -> 1 + 1). The CUDA kernels take input
channels in multiples of 16 and 8 or 16 output channels per key (kernels/cuda/_plan.py), so these
layers run on Triton's kernels, which pad them to their own 16-channel tiles anyway and measured
far from their floors on the H100: the first layer's weight gradient 1.49 ms, the last one's
forward 1.10 and weight gradient 1.63 (bench/NOTES.md, "Session 34"), where the CUDA kernels take
0.70-0.86 ms a launch on the 16-channel standard layer.

Here such a layer runs as the covered layer with zero channels added: the inputs' extra channels
are zeros, so the weights' extra input columns (zeros) meet nothing; the extra output channels are
computed from zero weights and dropped, and their cotangents are zeros, so they add nothing to the
input gradient or to the real weights' gradient. The cost is the padded copies (the first layer's
inputs at 16 channels: 268 MB at 64^3, batch 4) and the padded channels' arithmetic.

Measured on the H100 (bench/NOTES.md, "Session 35"): fwd_bwd 3.15 -> 2.41 ms (first layer) and
3.27 -> 2.35 (last) against Triton's kernels, -1.4 ms on the UNet and ResNet steps. The first
layer's forward alone is slower (0.73 -> 0.94 ms: sixteen input channels read where two are real),
which an inference-only model pays; a training step does not.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax.numpy as jnp

from .._env import env_choice
from .._spec import ConvSpec

PAD_CHANNELS_ENV = "GINJAX_CUDA_PAD_CHANNELS"


def enabled() -> bool:
    """$GINJAX_CUDA_PAD_CHANNELS: "1" (the default) runs thin layers on the CUDA kernels with zero
    channels, "0" leaves them on Triton's kernels."""
    return env_choice(PAD_CHANNELS_ENV, ("0", "1"), "1") == "1"


def padded_layer(spec: ConvSpec) -> Optional[ConvSpec]:
    """`spec` with every input key's channels raised to the same multiple of the CUDA kernels'
    CHANNELS_PER_ROUND and, where the outputs have at most the widest of their output channels per
    key (kernels/cuda/_plan.py's `out_channels`: 8 or 16 in 3D, 16 or 32 in 2D), every output key's
    to the next of them; None where that changes nothing
    (the layer is as covered as it gets without padding)."""
    from ..cuda._plan import CHANNELS_PER_ROUND, out_channels

    c = -(-max(ch for _, _, ch in spec.in_keys) // CHANNELS_PER_ROUND) * CHANNELS_PER_ROUND
    widest = max(o for _, _, o in spec.out_keys)
    o = next((n for n in out_channels(spec.D) if widest <= n), None)
    out_keys = spec.out_keys if o is None else tuple((k, p, o) for k, p, _ in spec.out_keys)
    padded = dataclasses.replace(spec, in_keys=tuple((k, p, c) for k, p, _ in spec.in_keys), out_keys=out_keys)
    return None if padded == spec else padded


def is_padded(spec: ConvSpec, layer: ConvSpec) -> bool:
    """Whether a CUDA plan's `layer` is `spec` with zero channels added."""
    return in_channels(layer) != in_channels(spec) or out_channels(layer) != out_channels(spec)


def pad_channels(blocks: Sequence[Optional[jnp.ndarray]], channels: Sequence[int]) -> tuple:
    """Each block (c, ...) with zero channels up to `channels` (None stays None)."""
    return tuple(None if b is None else _pad_axes(b, {0: n}) for b, n in zip(blocks, channels))


def pad_weights(padded: ConvSpec, weights: Sequence[jnp.ndarray]) -> tuple:
    """Per pair (o, c, F) weights with zero rows and columns up to `padded`'s channels."""
    return tuple(_pad_axes(w, {0: padded.out_keys[p.out_index][2], 1: padded.in_keys[p.in_index][2]})
                 for w, p in zip(weights, padded.pairs))


def crop_channels(blocks: Sequence[jnp.ndarray], channels: Sequence[int]) -> tuple:
    """Each block's first `channels` channels (axis 0)."""
    return tuple(b if b.shape[0] == n else b[:n] for b, n in zip(blocks, channels))


def crop_weights(spec: ConvSpec, weights: Sequence[jnp.ndarray]) -> tuple:
    """Per pair the (o, c, F) corner of padded weights (gradients) that `spec` has."""
    return tuple(w[: spec.out_keys[p.out_index][2], : spec.in_keys[p.in_index][2]]
                 for w, p in zip(weights, spec.pairs))


def in_channels(spec: ConvSpec) -> tuple[int, ...]:
    return tuple(c for _, _, c in spec.in_keys)


def out_channels(spec: ConvSpec) -> tuple[int, ...]:
    return tuple(o for _, _, o in spec.out_keys)


def _pad_axes(a: jnp.ndarray, sizes: dict) -> jnp.ndarray:
    widths = [(0, sizes.get(axis, n) - n) for axis, n in enumerate(a.shape)]
    if any(hi < 0 for _, hi in widths):
        raise ValueError(f"cannot pad an array of shape {a.shape} down to {sizes}")
    return a if not any(hi for _, hi in widths) else jnp.pad(a, widths)
