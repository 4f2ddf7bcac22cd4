"""The CUDA weight gradient's entry point: one XLA FFI call (kernels/cuda/weight_gradient.cu, or
weight_gradient_d2.cu for a D = 2 layer) for the per-CTA partial dW and cotangent sums, summed over the CTAs by XLA in a fixed order (no
atomics: deterministic).

    d_weights = weight_gradient_call(spec, inputs, cotangents)
    d_weights, (gy0_sum, gy1_sum) = weight_gradient_and_sums(spec, inputs, cotangents)

The same layer as the forward (`_plan.coverage`), with equal channel counts in both input blocks
(`_dw_plan.coverage`). Batching: vmap_method="broadcast_all", so a vmapped batch is one launch
(grid z axis) and, like the triton backend's weight-gradient kernel, gives one dW per batch
element of the vmapped axis, which the caller sums where the weights are shared.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._fused import require_registered
from .._registry import traced_batch
from .._spec import ConvSpec
from . import _dw_plan
from ._ffi import DW_TARGET, DW_TARGET_2D, registered
from ._plan import TF32_TRUNCATION_BIAS, kernel_spatial
from ._tiling import strip_for
from .conv_contract import layout, output_slice, vector_layouts


# Both mma operands (gY and Z) reach the tensor cores truncated to tf32 (common.cuh's tf32_bits):
# the sums of the partials are scaled by this to take out their mean error.
TRUNCATION_SCALE = 1.0 / (1.0 - TF32_TRUNCATION_BIAS) ** 2


def geometry(spec: ConvSpec, spatial: tuple[int, int, int], strip: int, out_channels: Optional[int] = None,
             first_channel: int = 0, planar: bool = False, fp32: bool = False) -> list[int]:
    """The kernel's `geom` attribute (weight_gradient_kernel.cuh's header lists the entries);
    `spatial` (nz, ny, nx), a 2D layer's with nz = 1."""
    lay = _dw_plan.layout(spec, spatial[2])
    packed = [sum(s << (4 * k) for k, s in enumerate(sk)) for sk in lay.skew]
    total = output_slice(spec, out_channels, first_channel)
    return [*spatial, spec.in_keys[0][2], spec.out_keys[0][2], strip, *lay.pitch, *packed, lay.n_weights, total,
            first_channel, int(planar), lay.dilation, lay.nx, int(fp32)]


def weight_gradient_call(
    spec: ConvSpec, inputs: Sequence[jax.Array], cotangents: Sequence[jax.Array], strip: Optional[int] = None,
    *, first_channel: int = 0, fp32: bool = False
) -> tuple[jax.Array, ...]:
    """Per pair, dW (o, c, F): `weight_gradient_and_sums` without the sums."""
    return weight_gradient_and_sums(spec, inputs, cotangents, strip, first_channel=first_channel, fp32=fp32)[0]


def weight_gradient_and_sums(
    spec: ConvSpec, inputs: Sequence[jax.Array], cotangents: Sequence[jax.Array], strip: Optional[int] = None,
    *, first_channel: int = 0, fp32: bool = False
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, jax.Array]]:
    """(per pair dW (o, c, F), (gy0's sum over the pixels (o,), gy1's (o, D))) in float32, of
    unbatched inputs x0 (c, nz, ny, nx), x1 (c, nz, ny, nx, 3) and output cotangents gy0 (O, nz,
    ny, nx), gy1 (O, nz, ny, nx, 3) (a D = 2 layer's: (c, ny, nx), (c, ny, nx, 2), ...): dW in the `weights` layout of `conv_contract_cuda`, the sums
    (the layer's bias gradient, of this launch's o channels) taken by the kernel from the gY rows
    it stages anyway, in fp32. The caller has checked `_dw_plan.coverage` (with `fp32`,
    `_dw_plan.fp32_coverage`) and the precision: TF32 (gY and Z truncated to tf32, their mean
    error scaled out), or with `fp32` fp32 by 3xTF32 (each split into a rounded tf32 part and
    remainder, three mma); fp32 accumulation either way.

    Args:
        strip: y rows per CTA (None: `_dw_plan.DEFAULT_STRIP`, or with `fp32` the shorter
            `_dw_plan.FP32_STRIP`, halved while the launch would have fewer than `_tiling.MIN_CTAS`
            CTAs); fewer, longer CTAs write fewer partials (`_dw_plan.scratch_bytes`).
        first_channel: the cotangents' first of the layer's o output channels (O a multiple of o,
            an output group's launch: `kernels.triton._cuda_dispatch.output_split`); the kernel
            reads those rows where they lie, so no channel slice of the cotangents is copied out.
    """
    if spec.D not in _dw_plan.INCLUDES:
        raise ValueError(f"`spec` has D={spec.D}: the CUDA weight gradient is compiled for D=3 and D=2 layers")
    require_registered(registered, "cuda")  # a direct call registers the FFI targets too
    spatial = kernel_spatial(spec, inputs[0].shape[1 : 1 + spec.D])
    lay = _dw_plan.layout(spec, spatial[2])
    if strip is None:  # shorter where the default would leave SMs idle (a small batch or grid)
        # a strip holds rows of one y phase, of one x window
        strip = strip_for(spatial[0] * lay.dilation * lay.windows, spatial[1] // lay.dilation,
                          traced_batch(inputs[0]) or 1, _dw_plan.FP32_STRIP if fp32 else _dw_plan.DEFAULT_STRIP)
    _check_strip(strip)
    strips, nz, groups = _dw_plan.grid(spec, spatial, strip)
    parts = partials(spec, inputs, cotangents, strip, first_channel, fp32).reshape(groups, nz * strips, -1)
    n_dw = lay.partial_floats
    scale = jnp.float32(1.0 if fp32 else TRUNCATION_SCALE)
    fragments = parts[..., :n_dw].reshape(groups, nz * strips, 2, lay.n_weights, lay.m_tiles, 4, 32)
    dws = _dw_plan.unpack(spec, scale * jnp.sum(fragments, axis=1), xp=jnp)
    # the sums are exact fp32 (no tf32 operand, no scale); only channel group 0's CTAs take them
    sums = _dw_plan.unpack_sums(spec.out_keys[0][2], jnp.sum(parts[0, :, n_dw:], axis=0), spec.D)
    return dws, sums


def partials(spec: ConvSpec, inputs, cotangents, strip: int, first_channel: int = 0, fp32: bool = False) -> jax.Array:
    """The kernel's result: per CTA (channel group, z, strip) its partial dW in fragment order
    (`_dw_plan.unpack`) and its share of the cotangent sums (`_dw_plan.unpack_sums`), (CTAs,
    `result_floats`); the vector blocks in `layout()`."""
    _check_strip(strip)
    x0, x1 = (jnp.asarray(x, jnp.float32) for x in inputs)
    g0, g1 = (jnp.asarray(g, jnp.float32) for g in cotangents)
    spatial = kernel_spatial(spec, x0.shape[1 : 1 + spec.D])
    lay = _dw_plan.layout(spec, spatial[2])
    strips, nz, groups = _dw_plan.grid(spec, spatial, strip)
    shape = jax.ShapeDtypeStruct((groups * nz * strips, lay.result_floats), jnp.float32)
    planar = layout() == "planar"
    geom = geometry(spec, spatial, strip, int(g0.shape[0]), first_channel, planar, fp32)
    target = DW_TARGET_2D if spec.D == 2 else DW_TARGET
    call = jax.ffi.ffi_call(target, shape, vmap_method="broadcast_all", input_layouts=vector_layouts(planar, 2, spec.D))
    return call(x0, x1, g0, g1, geom=np.asarray(geom, np.int64))


def _check_strip(strip) -> None:
    if not isinstance(strip, int) or isinstance(strip, bool) or strip < 1:
        raise ValueError(f"`strip` (={strip!r}) must be an int >= 1")
