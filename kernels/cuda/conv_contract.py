"""The CUDA forward's entry point: one XLA FFI call per (batched) forward, dense's VJP backward.

    outputs = conv_contract_cuda(spec, inputs, weights, precision=..., block_sizes=...)

Forward: kernels/cuda/forward_kernel.cuh, launched by conv_contract.cu (TF32 mma.sync, or fp32 by 3xTF32; fp32 accumulation), all pairs in one
launch, the layer's bias offsets (`forward_call`'s) added in its epilogue. The vector blocks in
and out are component-planar or components minor in memory (`layout()`: kernels/_layout.py's
switch, GINJAX_CUDA_LAYOUT overriding it); the custom call asks XLA for that layout. Batching: vmap_method="broadcast_all", so a vmapped batch is one launch (grid z axis)
whose operands all carry the batch axes; the packed weights (40 KB) are broadcast with them.
Backward (custom_vjp): `dense`'s VJP (this issue's kernel is the forward only).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._env import env_choice
from .._fused import require_registered, resolve_block_sizes
from .._layout import block_layout
from .._precision import resolve_precision
from .._registry import traced_batch
from .._spec import ConvSpec
from ..dense import conv_contract_dense
from . import _plan
from ._ffi import ADD_TARGET, INTO_ADD_TARGET, INTO_TARGET, INTO_TARGET_2D, TARGET, TARGET_2D, registered
from ._plan import LAYOUT_ENV
from ._tiling import BlockSizes

# a vector block (c, nz, ny, nx, 3) component-planar: physical axis order, major to minor; a D = 2
# one (c, ny, nx, 2)
PLANAR_VECTOR = (0, 4, 1, 2, 3)
PLANAR_VECTOR_2D = (0, 3, 1, 2)


def layout() -> str:
    """The vector blocks' layout in memory of the CUDA kernels' launches traced now: $GINJAX_CUDA_LAYOUT
    if set, else kernels._layout.block_layout() ("planar" on a GPU)."""
    return block_layout(LAYOUT_ENV)


def vector_layouts(planar: bool, n: int, dims: int = 3) -> list:
    """ffi_call layouts (major to minor; None: row-major) of n (scalar, vector) block pairs of a
    layer of `dims` spatial dimensions."""
    return [None, (PLANAR_VECTOR if dims == 3 else PLANAR_VECTOR_2D) if planar else None] * n


def conv_contract_cuda(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    *,
    precision=None,
    block_sizes: Optional[BlockSizes] = None,
) -> tuple[jax.Array, ...]:
    """ConvContract forward on unbatched blocks with the CUDA kernel (gradients through dense).

    Args:
        spec, inputs, weights: as for `kernels.conv_contract` (operands already checked).
        precision: None or a mode: "tf32" (and "bf16", whose tolerance TF32 meets) or "fp32"
            (3xTF32, `_plan.fp32_coverage`: dilation 1, whole rows).
        block_sizes: the kernel's tiling (None: `BlockSizes.for_layer(spec, spatial)`).
    """
    require_registered(registered, "cuda")
    split = resolve_precision(precision) == "fp32"
    inputs, weights = tuple(inputs), tuple(weights)
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    ok, why = (_plan.fp32_coverage if split else _plan.coverage)(spec, spatial, inputs[0].dtype)
    if not ok:
        raise ValueError(f"`spec` is not covered by the CUDA kernel{' in fp32' if split else ''}: {why}")
    blocks = resolve_block_sizes(block_sizes, BlockSizes, spec, spatial)
    return _conv_contract(spec, blocks, split, inputs, tuple(w.astype(jnp.float32) for w in weights))


def forward_call(spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array],
                 offsets: Optional[Sequence[Optional[jax.Array]]] = None, *, out_channels: Optional[int] = None,
                 first_channel: int = 0, into: Optional[Sequence[jax.Array]] = None,
                 fp32: bool = False, residuals: Optional[Sequence[Optional[jax.Array]]] = None) -> tuple[jax.Array, ...]:
    """The kernel's outputs with no gradient rule of their own, for a backend that defines the
    gradients itself (the `triton` backend); the caller has checked `coverage` (`fp32`: the 3xTF32
    kernels, `_plan.fp32_coverage`; else TF32). `offsets`: per output key None or its (o, *tensor) offset, added to
    every pixel in the kernel's epilogue (the layer's bias, kernels._bias.bias_offsets). Batches
    under vmap like the custom call.

    Output groups (conv_contract.cu's header): with `out_channels` O (a multiple of the layer's o),
    the results have O channels per key and this launch writes channels `first_channel` ..
    `first_channel` + o - 1 of them; `into` are the previous group's results, which this launch's
    results alias (the slices written before stay; the first group passes None and its other
    slices hold garbage until the later groups have written them).

    `residuals`: per output key None or an array of the results' shape (O channels), of which this
    launch adds its channels to what it writes, in the epilogue, read (not aliased) in the
    results' layout: a layer's output plus a block of the same shape without a pass of its own
    (where `takes_residuals`; elsewhere a ValueError)."""
    require_registered(registered, "cuda")  # a direct call registers the FFI targets too
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    blocks = BlockSizes.for_layer(spec, spatial, traced_batch(inputs[0]))
    return _forward(spec, blocks, tuple(inputs), tuple(w.astype(jnp.float32) for w in weights), offsets,
                    out_channels, first_channel, into, fp32, residuals)


RESIDUAL_ENV = "GINJAX_CUDA_RESIDUAL"


def residuals_enabled() -> bool:
    """GINJAX_CUDA_RESIDUAL: "1" (default) lets the kernels add a layer's residuals in their
    epilogue (`takes_residuals`), "0" leaves the add to XLA after the launch (the A/B)."""
    return env_choice(RESIDUAL_ENV, ("1", "0"), "1") == "1"


def takes_residuals(spec: ConvSpec, fp32: bool = False) -> bool:
    """Whether the `triton` backend hands a layer's residuals to `forward_call`, which adds them in
    the kernel's epilogue: `residuals_enabled` and the layer one the kernels with residuals are
    compiled for (dilation 1, TF32: `fp32` False)."""
    return residuals_enabled() and not fp32 and spec.D == 3 and all(d == 1 for d in spec.rhs_dilation)


def geometry(spec: ConvSpec, spatial: tuple[int, ...], blocks: BlockSizes,
             n_groups: Optional[int] = None, out_channels: Optional[int] = None, first_channel: int = 0,
             planar: bool = False, fp32: bool = False) -> list[int]:
    """The kernel's `geom` attribute (conv_contract.cu's header lists the entries): the layer's
    channel and weight totals, the channel groups `_plan.groups` picks (`n_groups` forces a
    split: the tests' way to run several groups where one would fit), the results' output
    channels and the first one this launch writes (`forward_call`'s output groups), whether
    the vector blocks are component-planar, the dilation, the x window (`_plan.window`) and the
    precision (1: fp32 by 3xTF32) and whether it runs on twin rings (`_plan.twin`). A D = 2 grid
    (ny, nx) is the kernel's (1, ny, nx)."""
    spatial = _plan.kernel_spatial(spec, spatial)
    lay = _plan.layout(spec, spatial[2], n_groups)
    g = lay.groups
    (c0, c1), o = (g * c for c in lay.channels), spec.out_keys[0][2]
    total = output_slice(spec, out_channels, first_channel)
    return [*spatial, c0, c1, o, blocks.strip_rows, *lay.pitch, *lay.skew[0], *lay.skew[1], g * lay.weight_floats, g,
            total, first_channel, int(planar), lay.dilation, lay.nx, int(fp32), int(_plan.twin(spec, spatial, fp32, n_groups))]


def output_slice(spec: ConvSpec, out_channels: Optional[int], first_channel: int) -> int:
    """The outputs' (or cotangents') channels O of an output group's launch (None: the layer's o),
    checked to hold the launch's o channels from `first_channel` on a whole group."""
    o = spec.out_keys[0][2]
    total = o if out_channels is None else int(out_channels)
    if total % o or not 0 <= first_channel <= total - o or first_channel % o:
        raise ValueError(f"`first_channel` (={first_channel}) must be a multiple of the layer's {o} output channels "
                         f"below `out_channels` (={total}, a multiple of {o})")
    return total


def flat_offsets(spec: ConvSpec, offsets: Optional[Sequence[Optional[jax.Array]]]) -> jax.Array:
    """The kernel's `off` operand: ((1 + D) o,) floats, the scalar key's (o,) offsets then the
    vector key's (o, D), zeros for a key without one (under vmap a batched key's batch axis is
    jax's)."""
    o = spec.out_keys[0][2]
    parts = [jnp.zeros(n, jnp.float32) if off is None else off.astype(jnp.float32).reshape(n)
             for off, n in zip(offsets or (None, None), (o, spec.D * o))]
    return jnp.concatenate(parts)


def _forward(spec: ConvSpec, blocks: BlockSizes, inputs, weights, offsets=None, out_channels=None, first_channel=0,
             into=None, fp32=False, residuals=None):
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    planar = layout() == "planar"
    geom = geometry(spec, spatial, blocks, out_channels=out_channels, first_channel=first_channel, planar=planar,
                    fp32=fp32)
    total, dims = geom[19], spec.D
    shapes = [jax.ShapeDtypeStruct((total,) + spatial, jnp.float32),
              jax.ShapeDtypeStruct((total,) + spatial + (dims,), jnp.float32)]
    packed = _plan.pack_weights(spec, weights, xp=jnp, tf32=not fp32)  # fp32: the kernel splits them
    operands = [*inputs, packed, flat_offsets(spec, offsets)]
    layouts = dict(input_layouts=vector_layouts(planar, 1, dims) + [None, None],
                   output_layouts=vector_layouts(planar, 1, dims))
    attrs = dict(geom=np.asarray(geom, np.int64))
    aliases = {}
    if into is not None:
        if [tuple(a.shape) for a in into] != [s.shape for s in shapes]:
            raise ValueError(f"`into` has shapes {[tuple(a.shape) for a in into]}; the results are {[s.shape for s in shapes]}")
        layouts["input_layouts"] += vector_layouts(planar, 1, dims)  # an aliased operand has its result's layout
        aliases = {len(operands): 0, len(operands) + 1: 1}
        operands += list(into)
    if residuals is not None and any(r is not None for r in residuals):
        if fp32 or dims != 3 or any(d != 1 for d in spec.rhs_dilation):
            raise ValueError("`residuals` are added by the D=3 kernels at dilation 1 in TF32 only; "
                             f"this launch has D={dims}, dilation {spec.rhs_dilation} and fp32={fp32}")
        if len(residuals) != 2 or any(r is not None and tuple(r.shape) != s.shape for r, s in zip(residuals, shapes)):
            raise ValueError(f"`residuals` must be (scalar, vector) entries None or of the results' shapes "
                             f"{[s.shape for s in shapes]}; got {[None if r is None else tuple(r.shape) for r in residuals]}")
        layouts["input_layouts"] += vector_layouts(planar, 1)  # read as the results are written
        # a key without one gets a one-float placeholder, which the kernel never reads
        operands += [jnp.zeros((1,), jnp.float32) if r is None else r.astype(jnp.float32) for r in residuals]
        if residuals[0] is None:
            layouts["input_layouts"][-2] = None
        if residuals[1] is None:
            layouts["input_layouts"][-1] = None
        attrs["residual"] = np.int64(sum(1 << k for k, r in enumerate(residuals) if r is not None))
        target = ADD_TARGET if into is None else INTO_ADD_TARGET
    elif dims == 2:
        target = TARGET_2D if into is None else INTO_TARGET_2D
    else:
        target = TARGET if into is None else INTO_TARGET
    if aliases:
        layouts["input_output_aliases"] = aliases
    call = jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all", **layouts)
    return tuple(call(*operands, **attrs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _conv_contract(spec, blocks, fp32, inputs, weights):
    return _forward(spec, blocks, inputs, weights, fp32=fp32)


def _conv_contract_fwd(spec, blocks, fp32, inputs, weights):
    return _forward(spec, blocks, inputs, weights, fp32=fp32), (inputs, weights)


def _conv_contract_bwd(spec, blocks, fp32, residuals, cotangents):
    inputs, weights = residuals
    _, vjp = jax.vjp(lambda x, w: conv_contract_dense(spec, x, w, "fp32" if fp32 else "tf32"), inputs, weights)
    return vjp(tuple(cotangents))


_conv_contract.defvjp(_conv_contract_fwd, _conv_contract_bwd)
