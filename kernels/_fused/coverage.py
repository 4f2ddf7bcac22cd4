"""The coverage rules every fused backend shares, with the reason a configuration is left out."""

from __future__ import annotations

import numpy as np

from .._spec import ConvSpec


def fused_coverage(spec: ConvSpec, spatial, dtype, dtypes, max_order: int = 2) -> tuple[bool, str]:
    """The rules every fused backend (triton, native, pallas) shares: tensor orders up to
    `max_order`, stride 1, no lhs_dilation (transposed layers run on dense's sub-pixel form),
    operands of one of `dtypes`, and no torus wrap wider than its axis. (ok, reason)."""
    orders = [k for k, _, _ in spec.in_keys + spec.out_keys]
    if max(orders) > max_order:
        return False, f"tensor orders up to {max_order} are covered, this layer has order {max(orders)}"
    if any(s != 1 for s in spec.stride):
        return False, f"stride {spec.stride} is not covered (stride 1 only)"
    if any(d != 1 for d in spec.lhs_dilation):
        return False, f"lhs_dilation {spec.lhs_dilation} is not covered"
    if dtype is not None and np.dtype(dtype) not in tuple(np.dtype(d) for d in dtypes):
        names = ", ".join(np.dtype(d).name for d in dtypes)
        return False, f"{np.dtype(dtype).name} operands are not covered ({names} only)"
    if why := torus_wrap_exceeds(spec, spatial):
        return False, why
    return True, ""


def torus_wrap_exceeds(spec: ConvSpec, spatial) -> str:
    """Why a torus wrap is wider than its axis (the wrap then repeats the axis), or "" if none is.

    The lax backends compute the wider wrap; kernels that read each wrapped neighbour once (the
    fused ones) return this from their coverage, so the registry falls back and `explain` says why.
    """
    for ax, (n, (lo, hi)) in enumerate(zip(spatial or (), spec.torus_pad)):
        if lo > n or hi > n:
            return (
                f"the torus wrap ({lo}, {hi}) on spatial axis {ax} is wider than its {n} cells "
                "(the wrap repeats the axis)"
            )
    return ""
