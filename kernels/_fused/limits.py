"""Index limits and tile sizes the fused kernels share.

The Triton-family kernels (`triton`, `pallas` through Pallas' Triton lowering) index with int32
and need power-of-two tile sides with every tensor-core dot dimension at least 16.
"""

from __future__ import annotations

import math
from typing import Sequence

from .._spec import ConvSpec

INT32_MAX = 2**31 - 1
# Triton's tensor-core dot needs every matrix dimension >= 16 (and powers of two)
MIN_DOT_TILE = 16


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def dot_tile(n: int) -> int:
    """The tile side that holds n channels in a tensor-core dot: a power of two >= 16."""
    return max(MIN_DOT_TILE, next_pow2(n))


def int32_overflow(spec: ConvSpec, spatial: Sequence[int], backend: str, *, per_channel: bool) -> str:
    """Why some block's int32 offsets would overflow, or "" if none would.

    Input blocks have `spatial` pixels, output blocks `spec.out_spatial(spatial)`. With
    `per_channel` the limit applies to one channel of a block (kernels that offset channels in
    int64 where they must), else to the whole block.
    """
    npix = math.prod(spatial)
    nout = math.prod(spec.out_spatial(spatial))
    blocks = [("input", a, k, c, npix) for a, (k, _, c) in enumerate(spec.in_keys)]
    blocks += [("output", b, k, o, nout) for b, (k, _, o) in enumerate(spec.out_keys)]
    for kind, n, k, channels, pixels in blocks:
        per = pixels * spec.D**k
        size = per if per_channel else per * channels
        if size > INT32_MAX:
            what = "elements per channel" if per_channel else "elements"
            return (
                f"{kind} block {n} has {size} {what} ({pixels} pixels, tensor order {k}"
                + ("" if per_channel else f", {channels} channels")
                + f"); the {backend} backend supports at most 2^31 - 1"
                + (" per channel" if per_channel else " (32-bit offsets)")
            )
    return ""
