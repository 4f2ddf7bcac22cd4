"""`dense` backend: the whole layer as ONE lax.conv_general_dilated.

Basis expansion and index contraction fold into the channel GEMM: input channels are
Cin = sum_a c_a D^k_a (ordered block by block, (c, i) within a block), output channels
Cout = sum_b o_b D^k_b, and the filter W[*taps, (c,i), (o,j)] = sum_f w[o,c,f] B[f,*taps,i,j] is
assembled in HBM (small: taps * Cin * Cout). Pairs without a filter leave zero blocks.

Transposed (lhs_dilation) and strided layers do not run as a dilated or strided lax convolution
(cuDNN's slow path on the GPU): `_resample` rewrites them as GEMMs and stride-1 convolutions
(sub-pixel decomposition, space-to-depth), and on a GPU (GINJAX_DENSE_DILATED) rhs-dilated ones
as undilated phases in one batch. Thin layers (few channels on one side: a model's
first and last) can run in two stages, a convolution with the filter bases and GEMMs with the
weights (`_thin`, with GINJAX_DENSE_THIN=1; measured slower than one convolution on the H100, so
off by default). `describe_dense` says which form runs.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from . import _resample, _thin
from ._fused.basis import pair_basis
from ._lax_common import compute_dtype, conv_channels_last, wrap_pad
from ._precision import lax_operands
from ._spec import ConvSpec


def assemble_dense_filter(spec: ConvSpec, weights: Sequence[jax.Array], dtype=jnp.float32) -> jax.Array:
    """The dense filter (*taps, Cin, Cout) of the layer (differentiable in the weights)."""
    D, taps = spec.D, spec.filter_shape
    n_taps = math.prod(taps)
    blocks = {}
    for t, (pair, w) in enumerate(zip(spec.pairs, weights)):
        k_a, _, c = spec.in_keys[pair.in_index]
        k_b, _, o = spec.out_keys[pair.out_index]
        basis = jnp.asarray(pair_basis(spec, t), dtype=dtype)
        # (o, c, F) x (F, taps, i, j) -> (taps, c, i, o, j)
        blk = jnp.einsum("ocf,ftij->tcioj", w.astype(dtype), basis, precision=jax.lax.Precision.HIGHEST)
        blk = blk.reshape((n_taps, c * D**k_a, o * D**k_b))
        key = (pair.in_index, pair.out_index)
        blocks[key] = blk if key not in blocks else blocks[key] + blk
    rows = []
    for a, (k_a, _, c) in enumerate(spec.in_keys):
        row = []
        for b, (k_b, _, o) in enumerate(spec.out_keys):
            blk = blocks.get((a, b))
            row.append(blk if blk is not None else jnp.zeros((n_taps, c * D**k_a, o * D**k_b), dtype))
        rows.append(jnp.concatenate(row, axis=2))
    return jnp.concatenate(rows, axis=1).reshape(taps + (spec.cin, spec.cout))


def pack_channels_last(spec: ConvSpec, inputs: Sequence[jax.Array]) -> jax.Array:
    """Blocks (c, *spatial, *i) -> (*spatial, Cin) with channel index c * D^k + i."""
    D = spec.D
    parts = []
    for x, (k, _, c) in zip(inputs, spec.in_keys):
        spatial = x.shape[1 : 1 + D]
        parts.append(jnp.moveaxis(x.reshape((c,) + spatial + (D**k,)), 0, D).reshape(spatial + (-1,)))
    return jnp.concatenate(parts, axis=-1)


def unpack_channels_last(spec: ConvSpec, y: jax.Array) -> tuple[jax.Array, ...]:
    """(*spatial, Cout) -> blocks (o, *spatial, *j)."""
    D = spec.D
    spatial = y.shape[:D]
    outs, start = [], 0
    for k, _, o in spec.out_keys:
        width = o * D**k
        blk = y[..., start : start + width].reshape(spatial + (o,) + (D,) * k)
        outs.append(jnp.moveaxis(blk, D, 0))
        start += width
    return tuple(outs)


def unpack_channels_first(spec: ConvSpec, y: jax.Array) -> tuple[jax.Array, ...]:
    """(Cout, *spatial) -> blocks (o, *spatial, *j): each block's channels are a leading slice."""
    D = spec.D
    spatial = y.shape[1:]
    outs, start = [], 0
    for k, _, o in spec.out_keys:
        width = o * D**k
        blk = y[start : start + width].reshape((o,) + (D,) * k + spatial)
        outs.append(jnp.moveaxis(blk, tuple(range(1, 1 + k)), tuple(range(1 + D, 1 + D + k))))
        start += width
    return tuple(outs)


def conv_contract_dense(
    spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array], mode: str
) -> tuple[jax.Array, ...]:
    dtype = compute_dtype(*inputs, *weights)
    if (form := _thin.thin_form(spec)) is not None:
        return _thin.conv_contract_thin(spec, inputs, weights, mode, dtype, form)
    w_dense = assemble_dense_filter(spec, weights, dtype)
    x = wrap_pad(pack_channels_last(spec, [x.astype(dtype) for x in inputs])[None], spec, lead=1)
    precision, (x, w_dense) = lax_operands(mode, x, w_dense)
    if _resample.gives_channels_first(spec):
        return unpack_channels_first(spec, _resample.conv_channels_first(spec, x[0], w_dense, precision, dtype))
    if _resample.method(spec) in ("subpixel", "space_to_depth", "dilated_phases"):
        y = _resample.conv(spec, x[0], w_dense, precision, dtype)
    else:
        y = conv_channels_last(x, w_dense, spec, precision, out_dtype=dtype)[0]
    return unpack_channels_last(spec, y)


def describe_dense(spec: ConvSpec, spatial: tuple) -> str:
    """How `dense` computes this configuration (empty for one plain stride-1 convolution)."""
    return _thin.describe(spec) or _resample.describe(spec, spatial)
