"""Thin layers (few channels on one side) in two lax stages: the factorised form, in its order or
with the contraction first. `dense` runs a layer this way where `thin_form` picks one.

A model's first layer lifts a few data channels into the hidden ones (2 + 2 -> 16 + 16 in the
benchmarked steps) and its last projects them back (16 + 16 -> 1 + 1). As one convolution
(`dense`) their filter gradient is a cuDNN weight gradient with 8 input or 4 output channels, and
the fused kernels pad the thin side to their smallest tile (16 channels): both took 3.2-5.0 ms
fwd_bwd on the H200 for layers whose HBM floor is ~0.2 ms (bench/NOTES.md, "Session 26").
Splitting the layer at its factorised form keeps every stage efficient:

    stencil first (few inputs):   Z_ab[c, p, f, j] = sum_{tap, i} B_ab[f, tap, i, j] X_a[c, p + tap, i]
                                  out_b[o, p, j]   = sum_a sum_{c, f} w_ab[o, c, f] Z_ab[c, p, f, j]
    contract first (few outputs): V_ab[o, p, f, i] = sum_c w_ab[o, c, f] X_a[c, p, i]
                                  out_b[o, p, j]   = sum_a sum_{tap, f, i} B_ab[f, tap, i, j] V_ab[o, p + tap, f, i]

one convolution and one GEMM per pair (a -> b), the pairs into an output block summed.

The convolutions' filters are the filter bases, constants, so autodiff makes no convolution
weight gradient; the weights meet the data only in the GEMMs, whose gradients are GEMMs that
reduce over the pixels. The intermediate (Z or V) has `fields` floats a pixel, written once and
read once (twice under differentiation): the form is taken only where that is at most THIN_RATIO
times the layer's own channels in and out, i.e. where it costs about as much HBM traffic as
reading the input and writing the output once more.

By name (GINJAX_DENSE_THIN=<form>, for timing: bench.thin_spike --layers) a form runs any stride-1
layer, wide ones included, and a third form is there: stencil first with the convolution grouped
by channel (`_grouped_stencil_first`), which leaves Z as the GEMM reads it. On the UNets' wide
layers the two forms lost to one convolution by 1.3-6.4x (session 44); the grouped one is untimed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ._env import env_choice
from ._fused.basis import pair_basis
from ._lax_common import conv_channels_last, wrap_pad
from ._precision import lax_operands
from ._spec import ConvSpec

THIN_RATIO = 1.5
WIDE = 32  # channels (Cin or Cout) the wide side needs: narrower layers stay one convolution
THIN_ENV = "GINJAX_DENSE_THIN"
FORMS = ("stencil-first", "contract-first")
# a form only by name (GINJAX_DENSE_THIN): stencil first, the convolution grouped by channel (`_grouped_stencil_first`)
GROUPED = "grouped-stencil-first"
NAMED_FORMS = FORMS + (GROUPED,)


def fields(spec: ConvSpec) -> dict[str, int]:
    """Floats a pixel of each form's intermediate: Z (stencil first) and V (contract first)."""
    D = spec.D
    z = v = 0
    for p in spec.pairs:
        k_a, _, c = spec.in_keys[p.in_index]
        k_b, _, o = spec.out_keys[p.out_index]
        z += c * p.basis.n_filters * D**k_b
        v += o * p.basis.n_filters * D**k_a
    return {"stencil-first": z, "contract-first": v}


def thin_form(spec: ConvSpec) -> Optional[str]:
    """The two-stage form `dense` runs `spec` in, or None (one convolution). GINJAX_DENSE_THIN:
    "0" (default) none; "1" `candidate_form`; one of NAMED_FORMS: that form for every layer it can
    run (stride 1, no lhs dilation), wide ones included, for measuring it (bench.thin_spike
    --layers). Off by default: on the H100 (bench.thin_spike, session 34) the two
    stages lost to one convolution in five of the six rows of the benchmarked thin layers (the
    first layer's fwd 2.44 against 0.91 ms, fwd_bwd 7.29 against 4.05; the last's fwd_bwd 4.58
    against 4.69, its one win), and Triton's kernels beat both in fwd_bwd (3.27 and 3.39). Named
    forms on the UNets' wide layers lost too (session 44: 1.3-6.4x `dense`'s fwd_bwd)."""
    choice = env_choice(THIN_ENV, ("0", "1") + NAMED_FORMS, "0")
    if choice == "0":
        return None
    if choice == "1":
        return candidate_form(spec)
    return choice if spec.pairs and spec.is_default_stride else None


def candidate_form(spec: ConvSpec) -> Optional[str]:
    """The two-stage form that suits `spec`'s shape, or None: the form of the smaller
    intermediate where it is at most THIN_RATIO x (Cin + Cout) floats a pixel and the wide side
    has at least WIDE channels (a small layer on both sides is one cheap convolution), for layers
    of stride 1 without lhs dilation."""
    if not spec.pairs or not spec.is_default_stride or max(spec.cin, spec.cout) < WIDE:
        return None
    size, form = min((n, f) for f, n in fields(spec).items())
    return form if size <= THIN_RATIO * (spec.cin + spec.cout) else None


def describe(spec: ConvSpec) -> str:
    form = thin_form(spec)
    if form is None:
        return ""
    n = fields(spec)["stencil-first" if form == GROUPED else form]
    kind = "thin layer" if candidate_form(spec) == form else f"layer ({THIN_ENV}={form})"
    return (f"{kind} in two stages, {form} ({n} intermediate floats a pixel against {spec.cin} in, "
            f"{spec.cout} out; {THIN_ENV}=0: one convolution)")


def _basis(spec: ConvSpec, t: int, dtype) -> jax.Array:
    """Pair t's basis as (taps, I, F, J)."""
    return jnp.transpose(jnp.asarray(pair_basis(spec, t), dtype), (1, 2, 0, 3))


def conv_contract_thin(spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array], mode: str,
                       dtype, form: str) -> tuple[jax.Array, ...]:
    """The layer on unbatched blocks (c_a, *spatial, *i) in `form` (one of NAMED_FORMS)."""
    if form not in NAMED_FORMS:
        raise ValueError(f"`form` (={form!r}) must be one of {NAMED_FORMS}")
    run = {"stencil-first": _stencil_first, "contract-first": _contract_first, GROUPED: _grouped_stencil_first}[form]
    outs = run(spec, [x.astype(dtype) for x in inputs], [w.astype(dtype) for w in weights], mode, dtype)
    D = spec.D
    spatial = spec.out_spatial(tuple(inputs[0].shape[1 : 1 + D]))
    return tuple(
        y if y is not None else jnp.zeros((o,) + tuple(spatial) + (D,) * k, dtype)
        for y, (k, _, o) in zip(outs, spec.out_keys)
    )


def _stencil_first(spec, inputs, weights, mode, dtype) -> list:
    """Per pair, one convolution of its input block's channels (as the batch) with its basis,
    then a GEMM over (c, f) into its output block. A pair's own convolution (the input block,
    small here, read once per pair) leaves each Z as the GEMM reads it: no slicing copy."""
    D, taps = spec.D, spec.filter_shape
    padded = [wrap_pad(x.reshape(x.shape[: 1 + D] + (-1,)), spec, lead=1) for x in inputs]
    outs: list = [None] * len(spec.out_keys)
    for t, p in enumerate(spec.pairs):
        basis = _basis(spec, t, dtype)  # (taps, I, F, J)
        n_f, n_j = basis.shape[2], basis.shape[3]
        precision, (xs, filt) = lax_operands(mode, padded[p.in_index], basis.reshape(taps + (basis.shape[1], -1)))
        z = conv_channels_last(xs, filt, spec, precision, out_dtype=dtype)  # (c, *out, F J)
        z = z.reshape(z.shape[:-1] + (n_f, n_j))
        precision, (z, w) = lax_operands(mode, z, weights[t])
        y = jnp.einsum("c...fj,ocf->o...j", z, w, precision=precision, preferred_element_type=dtype)
        y = y.reshape(y.shape[: 1 + D] + (D,) * spec.out_keys[p.out_index][0])
        outs[p.out_index] = y if outs[p.out_index] is None else outs[p.out_index] + y
    return outs


def _grouped_stencil_first(spec, inputs, weights, mode, dtype) -> list:
    """Stencil first without transposes of Z: each input block channels last, (1, *spatial, c I);
    per pair and output component j, one convolution grouped by channel (c groups of I inputs, F
    outputs each, the basis' column j in every group), whose output (1, *out, c F) is the GEMM's
    left operand with K = (c, f) contiguous, and one GEMM with the weights as (c F, o). (`_stencil_first`
    puts c in the convolution's batch and K's two axes apart, so XLA transposes Z for the GEMM:
    session 44 measured that form 1.3-6.4x `dense` on the UNets' wide layers.)"""
    D, taps = spec.D, spec.filter_shape
    lasts = []
    for x in inputs:  # (c, *spatial, *i) -> (1, *spatial, c i)
        x = jnp.moveaxis(x.reshape(x.shape[: 1 + D] + (-1,)), 0, D)
        lasts.append(wrap_pad(x.reshape(x.shape[:D] + (-1,))[None], spec, lead=1))
    outs: list = [None] * len(spec.out_keys)
    for t, p in enumerate(spec.pairs):
        basis = _basis(spec, t, dtype)  # (taps, I, F, J)
        n_i, n_f, n_j = basis.shape[1:]
        c, o = spec.in_keys[p.in_index][2], spec.out_keys[p.out_index][2]
        w = jnp.transpose(weights[t], (1, 2, 0)).reshape(c * n_f, o)  # (c f, o)
        ys = []
        for j in range(n_j):
            filt = jnp.tile(basis[..., j], (1, 1, c)).reshape(taps + (n_i, c * n_f))
            precision, (xs, filt) = lax_operands(mode, lasts[p.in_index], filt)
            z = conv_channels_last(xs, filt, spec, precision, feature_group_count=c, out_dtype=dtype)[0]
            precision, (z, wj) = lax_operands(mode, z, w)
            ys.append(jnp.einsum("...k,ko->...o", z, wj, precision=precision, preferred_element_type=dtype))
        y = jnp.moveaxis(jnp.stack(ys, axis=-1), D, 0)  # (*out, o, J) -> (o, *out, J): one transpose a pair
        y = y.reshape(y.shape[: 1 + D] + (D,) * spec.out_keys[p.out_index][0])
        outs[p.out_index] = y if outs[p.out_index] is None else outs[p.out_index] + y
    return outs


def _contract_first(spec, inputs, weights, mode, dtype) -> list:
    """Per pair, the GEMM of its weights against its input block's channels for each filter,
    V (o, *spatial, F I), then one convolution of V (its outputs as the batch) with the pair's
    basis into its output block."""
    D, taps = spec.D, spec.filter_shape
    outs: list = [None] * len(spec.out_keys)
    for t, p in enumerate(spec.pairs):
        x = inputs[p.in_index]
        precision, (xs, w) = lax_operands(mode, x.reshape(x.shape[: 1 + D] + (-1,)), weights[t])
        v = jnp.einsum("ocf,c...i->o...fi", w, xs, precision=precision, preferred_element_type=dtype)
        v = wrap_pad(v.reshape(v.shape[: 1 + D] + (-1,)), spec, lead=1)  # (o, *spatial, F I)
        basis = _basis(spec, t, dtype)  # (taps, I, F, J)
        filt = jnp.transpose(basis, (0, 2, 1, 3)).reshape(taps + (-1, basis.shape[3]))
        precision, (v, filt) = lax_operands(mode, v, filt)
        y = conv_channels_last(v, filt, spec, precision, out_dtype=dtype)  # (o, *out, J)
        y = y.reshape(y.shape[: 1 + D] + (D,) * spec.out_keys[p.out_index][0])
        outs[p.out_index] = y if outs[p.out_index] is None else outs[p.out_index] + y
    return outs
