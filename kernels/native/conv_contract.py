"""The `native` backend's entry point: XLA FFI calls into the C++ kernels, custom_vjp, vmap.

    outputs = conv_contract_native(spec, inputs, weights, precision=..., block_sizes=...)

Forward: one FFI call computes every output block from every input block (all pairs).
Backward (custom_vjp): the input gradient is the same forward kernel on the transposed layer
(kernels._fused.transposed_spec: keys swapped, bases flipped and transposed, weights
transposed in their channel axes); the weight gradient is its own kernel, which recomputes Z from
the inputs and sums in a fixed order (bit-identical run after run). Residuals: inputs and weights.
Batching: the FFI calls use vmap_method="broadcast_all", so a vmapped batch is one call whose
operands all carry the batch axes (weights are broadcast: small).
The kernels compute in float32 with fused multiply-adds (float64 when the operands are float64,
under x64), which meets every precision mode's tolerance: `precision` is checked, not needed.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .._fused import require_registered, resolve_block_sizes, scatter_input_grads, transposed_spec, transposed_weights
from .._lax_common import compute_dtype
from .._precision import resolve_precision
from .._spec import ConvSpec
from ..dense import conv_contract_dense
from ._ffi import registered
from ._plan import plan_attributes
from ._tiling import BlockSizes

_TARGETS = {
    ("forward", jnp.dtype(jnp.float32)): "ginjax_native_forward_f32",
    ("forward", jnp.dtype(jnp.float64)): "ginjax_native_forward_f64",
    ("weight_grad", jnp.dtype(jnp.float32)): "ginjax_native_weight_grad_f32",
    ("weight_grad", jnp.dtype(jnp.float64)): "ginjax_native_weight_grad_f64",
}


def conv_contract_native(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    *,
    precision=None,
    block_sizes: Optional[BlockSizes] = None,
) -> tuple[jax.Array, ...]:
    """ConvContract on unbatched blocks with the native kernels (forward and gradients).

    Args:
        spec, inputs, weights, precision: as for `kernels.conv_contract` (operands already checked).
        block_sizes: the kernels' tiling (None: `BlockSizes.for_layer(spec, spatial)`).
    """
    require_registered(registered, "native")
    resolve_precision(precision)  # a bad one is an error here too, though the kernels need none
    inputs, weights = tuple(inputs), tuple(weights)
    for name, arrays in (("inputs", inputs), ("weights", weights)):
        for n, a in enumerate(arrays):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"`{name}[{n}]` has dtype {a.dtype}; ConvContract needs floating point")
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    blocks = resolve_block_sizes(block_sizes, BlockSizes, spec, spatial)
    dtype = compute_dtype(*inputs, *weights)
    inputs, weights = tuple(x.astype(dtype) for x in inputs), tuple(w.astype(dtype) for w in weights)
    return _conv_contract(spec, blocks, inputs, weights)


def _forward(spec: ConvSpec, blocks: BlockSizes, inputs, weights):
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    out_spatial = spec.out_spatial(spatial)
    dtype = inputs[0].dtype
    shapes = [jax.ShapeDtypeStruct((o,) + out_spatial + (spec.D,) * k, dtype) for k, _, o in spec.out_keys]
    call = jax.ffi.ffi_call(_TARGETS[("forward", jnp.dtype(dtype))], shapes, vmap_method="broadcast_all")
    return tuple(call(*inputs, *weights, **plan_attributes(spec, spatial, blocks)))


def _weight_grad(spec: ConvSpec, blocks: BlockSizes, inputs, cotangents):
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    dtype = inputs[0].dtype
    shapes = [
        jax.ShapeDtypeStruct((spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2], p.basis.n_filters), dtype)
        for p in spec.pairs
    ]
    call = jax.ffi.ffi_call(_TARGETS[("weight_grad", jnp.dtype(dtype))], shapes, vmap_method="broadcast_all")
    return tuple(call(*inputs, *cotangents, **plan_attributes(spec, spatial, blocks)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv_contract(spec, blocks, inputs, weights):
    return _forward(spec, blocks, inputs, weights)


def _conv_contract_fwd(spec, blocks, inputs, weights):
    return _forward(spec, blocks, inputs, weights), (inputs, weights)


def _conv_contract_bwd(spec, blocks, residuals, cotangents):
    inputs, weights = residuals
    dtype = inputs[0].dtype
    cotangents = tuple(g.astype(dtype) for g in cotangents)
    transposed = transposed_spec(spec)
    if transposed is None:  # a padding whose transpose is not a plain layer: dense's VJP for dX
        _, vjp = jax.vjp(lambda x: conv_contract_dense(spec, x, weights, "fp32"), inputs)
        (d_inputs,) = vjp(cotangents)
    else:
        spec_t, used = transposed
        grads = _forward(spec_t, blocks, cotangents, transposed_weights(weights))
        d_inputs = scatter_input_grads(used, grads, inputs, dtype)
    d_weights = _weight_grad(spec, blocks, inputs, cotangents)
    return tuple(d_inputs), tuple(d_weights)


_conv_contract.defvjp(_conv_contract_fwd, _conv_contract_bwd)
