"""The `triton` backend's entry point: custom_jvp for gradients, custom_vmap for one batched launch.

    outputs = conv_contract_triton(spec, inputs, weights, mode)

Forward: the fused kernel of `_kernel.py`. Derivatives: for now those of the `dense` backend, as
a custom_jvp (see below; the fused backward is the next step). Under `jax.vmap` the kernel is launched once for the whole batch
(jax-triton calls do not batch by themselves): `custom_vmap` folds every vmapped axis into the
kernel's batch axis, broadcasting unbatched operands with a zero batch stride.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .._lax_common import compute_dtype
from .._spec import ConvSpec
from ..dense import conv_contract_dense
from ._kernel import BlockSizes, check_sizes
from ._launch import interpreting, launch

_KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def default_blocks(spec: ConvSpec, spatial: tuple[int, ...]) -> BlockSizes:
    """The tiling used when none is given.

    On the interpreter one program covers up to 512 output pixels: every program is a Python
    loop over numpy ops, so fewer, larger programs are much faster there.
    """
    if not interpreting():
        return BlockSizes()
    tile = [_pow2_at_least(n) for n in spec.out_spatial(spatial)]
    for ax in range(len(tile)):
        while math.prod(tile) > 512 and tile[ax] > 1:
            tile[ax] //= 2
    while math.prod(tile) < 16:
        tile[-1] *= 2
    return BlockSizes(tile=tuple(tile))


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def conv_contract_triton(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    mode: str,
    *,
    blocks: Optional[BlockSizes] = None,
    poison: Optional[float] = None,
) -> tuple[jax.Array, ...]:
    """ConvContract on unbatched blocks with the fused Triton forward.

    Args:
        spec, inputs, weights, mode: as for `kernels.conv_contract` (operands already checked).
        blocks: the kernel's tiling (None: `default_blocks(spec)`).
        poison: tests only: outputs start filled with this value before the kernel writes them.
    """
    inputs, weights = tuple(inputs), tuple(weights)
    for name, arrays in (("inputs", inputs), ("weights", weights)):
        for n, a in enumerate(arrays):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"`{name}[{n}]` has dtype {a.dtype}; ConvContract needs floating point")
    if compute_dtype(*inputs, *weights) != jnp.float32:
        # float64 (x64 oracles) is beyond the kernel's fp32 accumulation: the lax path is exact
        return conv_contract_dense(spec, inputs, weights, mode)
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    blocks = default_blocks(spec, spatial) if blocks is None else blocks
    blocks.check(spec.D)
    check_sizes(spec, spatial)
    poison = None if poison is None else repr(float(poison))  # a hashable static (NaN != NaN)
    return _conv_contract(spec, mode, blocks, poison, inputs, weights)


# ---- differentiation: the kernel's forward, dense's tangents --------------------------------------------
# A custom_jvp rather than a custom_vjp: the operation is bilinear, so its tangent is
# dense(dX, w) + dense(X, dw), plain lax convolutions that JAX transposes into dense's own backward
# (its VJP, i.e. the backward "through dense"). Under vmap those convolutions batch like any lax
# op; a custom_vjp's backward would instead be vmapped as a function, and the weight gradient of
# a vmapped convolution is per example (a batch-grouped convolution, ~6x slower on the H200).
@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _conv_contract(spec, mode, blocks, poison, inputs, weights):
    return _forward(spec, mode, blocks, poison, inputs, weights)


def _forward(spec, mode, blocks, poison, inputs, weights):
    op = _batched_forward(spec, mode, blocks, poison)
    outs = op(tuple(x[None] for x in inputs), tuple(w[None] for w in weights))
    return tuple(o[0] for o in outs)


@_conv_contract.defjvp
def _conv_contract_jvp(spec, mode, blocks, poison, primals, tangents):
    inputs, weights = primals
    d_inputs, d_weights = tangents
    outs = _forward(spec, mode, blocks, poison, inputs, weights)
    via_inputs = conv_contract_dense(spec, d_inputs, weights, mode)
    via_weights = conv_contract_dense(spec, inputs, d_weights, mode)
    return outs, tuple(a + b for a, b in zip(via_inputs, via_weights))


# ---- batching: custom_vmap into one launch ------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _batched_forward(spec: ConvSpec, mode: str, blocks: BlockSizes, poison):
    """The kernel on operands with a leading batch axis of size 1 (broadcast) or B."""

    @jax.custom_batching.custom_vmap
    def op(xs, ws):
        return launch(spec, mode, blocks, xs, ws, None if poison is None else float(poison))

    @op.def_vmap
    def _rule(axis_size, in_batched, xs, ws):
        x_batched, w_batched = in_batched
        operands = list(xs) + list(ws)
        flags = list(x_batched) + list(w_batched)
        # each operand is (n, L, ...) if vmapped, else (L, ...), with L in {1, inner}
        inner = max(a.shape[1] if f else a.shape[0] for a, f in zip(operands, flags))
        merged = []
        for a, f in zip(operands, flags):
            lead = a.shape[1] if f else a.shape[0]
            if f and lead == inner:
                merged.append(a.reshape((axis_size * inner,) + a.shape[2:]))
            elif not f and lead == 1:
                merged.append(a)  # shared by the whole merged batch: zero batch stride
            else:
                # vmapped but broadcast inside, or shared but batched inside: index (m, b) needs
                # a real copy (weights in practice, which are small)
                tail = a.shape[2:] if f else a.shape[1:]
                full = a if f else a[None]
                full = jnp.broadcast_to(full, (axis_size, inner) + tail)
                merged.append(full.reshape((axis_size * inner,) + tail))
        n_x = len(xs)
        outs = op(tuple(merged[:n_x]), tuple(merged[n_x:]))
        outs = tuple(o.reshape((axis_size, inner) + o.shape[1:]) for o in outs)
        return outs, tuple(True for _ in outs)

    return op
