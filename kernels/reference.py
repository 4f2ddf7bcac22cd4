"""`reference` backend: ginjax 0.1.8's own algorithm, one key pair at a time. The correctness oracle.

For each pair (a, b) it assembles the (o, c, *taps, D^k_a, D^k_b) filter from the weights and the
basis, broadcasts the input block against a tensor of ones to the filter's order k_a + k_b, runs a
grouped convolution with one group per tensor component, and sums out the k_a input indices.
Slow and memory-hungry by design (the D^k_b-fold image copy); it is what ginjax users run today.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from ._lax_common import compute_dtype, conv_channels_last, wrap_pad
from ._precision import lax_operands
from ._spec import ConvSpec


def _pair_term(spec: ConvSpec, x: jax.Array, w: jax.Array, basis: jax.Array, k_a: int, k_b: int, mode: str):
    D = spec.D
    spatial = x.shape[1 : 1 + D]
    c, o = x.shape[0], w.shape[0]
    # (o, c, F) x (F, *taps, *i, *j) -> (o, c, *taps, *i, *j)
    dtype = x.dtype
    filt = jnp.einsum("ocf,f...->oc...", w, basis.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    # broadcast the image to the filter's tensor order: (c, *spatial, *i) -> (c, *spatial, *i, *j)
    x_full = jnp.broadcast_to(x.reshape(x.shape + (1,) * k_b), x.shape + (D,) * k_b)
    n_comp = D ** (k_a + k_b)
    # channels-last, one group per tensor component: (1, *spatial, comp * c)
    x_cl = jnp.moveaxis(x_full.reshape((c,) + spatial + (n_comp,)), 0, -1)
    x_cl = wrap_pad(x_cl.reshape((1,) + spatial + (n_comp * c,)), spec, lead=1)
    # filter (o, c, *taps, comp) -> (*taps, c, comp * o)
    taps = spec.filter_shape
    f_cl = jnp.moveaxis(filt.reshape((o, c) + taps + (n_comp,)), (0, 1), (-1, D))
    f_cl = f_cl.reshape(taps + (c, n_comp * o))
    precision, (x_cl, f_cl) = lax_operands(mode, x_cl, f_cl)
    out = conv_channels_last(x_cl, f_cl, spec, precision, feature_group_count=n_comp, out_dtype=dtype)[0]
    out_spatial = out.shape[:D]
    out = out.reshape(out_spatial + (D,) * (k_a + k_b) + (o,))
    out = jnp.sum(out, axis=tuple(range(D, D + k_a)))  # the contraction over the input indices
    return jnp.moveaxis(out, -1, 0)


def conv_contract_reference(
    spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array], mode: str
) -> tuple[jax.Array, ...]:
    dtype = compute_dtype(*inputs, *weights)
    outs: list = [None] * len(spec.out_keys)
    for pair, w in zip(spec.pairs, weights):
        k_a = spec.in_keys[pair.in_index][0]
        k_b = spec.out_keys[pair.out_index][0]
        basis = jnp.asarray(pair.basis.array, dtype=dtype)
        x = inputs[pair.in_index].astype(dtype)
        term = _pair_term(spec, x, w.astype(dtype), basis, k_a, k_b, mode)
        prev = outs[pair.out_index]
        outs[pair.out_index] = term if prev is None else prev + term
    return tuple(outs)
