"""The layer bias of a ConvContract, in pure lax (differentiable by JAX autodiff, vmappable).

Per output block b, `spec.bias_modes[b]` says what `bias[b]` (shape (o_b,)) does:
    "none": nothing;
    "add":  out_b[o, x, j] += bias[o]                       (ginjax's scalar bias);
    "mean": out_b[o, x, j] += bias[o] * mean_x out_b[o, x, j] (ginjax's 'auto'/'mean' bias).

The "mean" mode needs the spatial mean of the output, which naively is a second pass over the
whole output after the convolution. When every spatial axis wraps (torus padding that returns an
output of the input's size, no zero padding, stride 1, lhs_dilation 1) every input pixel meets
every filter tap exactly once, so the output's spatial mean is the filter applied to the inputs'
spatial means:

    mean(out_b)[o, j] = sum_a sum_{c, i} mean(X_a)[c, i] * sum_y W_ab[o, c, y, i, j]

which costs one read of the inputs (that XLA fuses with their producer) and a tiny contraction;
an input whose filters' tap sums into every "mean" block are zero (a change of tensor order by
one: odd filters) is not read at all (`input_means_needed`), and one whose producer already
added it up (the VectorNeuron's forward kernel: `given` means, `known_mean`) is not read either.
A fused kernel can then add the per-block offset in its epilogue (`bias_offsets`). Elsewhere the
output's own mean is used after the convolution.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._fused.basis import pair_basis
from ._reduce import add_spatial_offset, spatial_mean
from ._spec import ConvSpec

Bias = Sequence[Optional[jax.Array]]


def check_bias(spec: ConvSpec, bias: Optional[Bias]) -> Optional[tuple]:
    """Validate `bias` against `spec.bias_modes`; returns it as a tuple (None when no mode is set).

    Raises ValueError naming `bias` and the offending value.
    """
    if not spec.has_bias:
        if bias is None or all(b is None for b in bias):
            return None
        raise ValueError(
            f"`bias` (={_describe(bias)}) is given, but every bias mode of the spec is 'none': "
            "build the spec with make_spec(..., bias_modes=...)"
        )
    if bias is None or isinstance(bias, (str, jax.Array, np.ndarray)) or len(bias) != len(spec.out_keys):
        raise ValueError(
            f"`bias` (={_describe(bias)}) must be a sequence of {len(spec.out_keys)} entries, one "
            f"per output block (bias modes {spec.bias_modes})"
        )
    out = []
    for b, (mode, (k, p, o)) in enumerate(zip(spec.bias_modes, spec.out_keys)):
        entry = bias[b]
        if mode == "none":
            if entry is not None:
                raise ValueError(
                    f"`bias[{b}]` (={_describe(entry)}) must be None: output block {b} has bias mode 'none'"
                )
            out.append(None)
            continue
        if entry is None or tuple(getattr(entry, "shape", ())) != (o,):
            raise ValueError(
                f"`bias[{b}]` (={_describe(entry)}) must be an array of shape ({o},) for output "
                f"block {b} (k={k}, parity={p}, bias mode {mode!r})"
            )
        out.append(entry)
    return tuple(out)


def _describe(value) -> str:
    if hasattr(value, "shape"):
        return f"array of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_describe(v) for v in value) + "]"
    return repr(value)


def means_shortcut_exact(spec: ConvSpec) -> bool:
    """Whether the output's spatial mean equals the filter applied to the inputs' spatial means.

    True when every axis wraps and the output has the input's size: every input pixel is then read
    through every tap exactly once over the output grid. (The output size is spatial +
    wrap + zero pad - extent + 1 on every axis, so no zero padding and wrap == extent - 1.)
    """
    if not all(spec.is_torus) or not spec.is_default_stride:
        return False
    for (lo, hi), zero, m, rd in zip(spec.torus_pad, spec.zero_pad, spec.filter_shape, spec.rhs_dilation):
        if zero != (0, 0) or lo + hi != (m - 1) * rd:
            return False
    return True


def takes_input_means(spec: ConvSpec) -> bool:
    """Whether the layer's offsets need its inputs' spatial means: a "mean" bias block that takes
    the shortcut (`means_shortcut_exact`)."""
    return "mean" in spec.bias_modes and means_shortcut_exact(spec)


def tap_sums(spec: ConvSpec, t: int) -> np.ndarray:
    """Pair t's basis summed over the taps, (F, D^k_a, D^k_b) in float64."""
    return np.asarray(pair_basis(spec, t), np.float64).sum(axis=1)


def input_means_needed(spec: ConvSpec) -> tuple[bool, ...]:
    """Per input key whether its spatial mean reaches a "mean" block's offset: some pair from it
    into such a block has a filter whose taps do not sum to exactly zero. An invariant filter that
    changes the tensor order by one (scalar to vector, vector to scalar) is odd under a reflection,
    so its taps sum to zero: ginjax's layers (scalar "add", vector "mean") never need their scalar
    inputs' means, and that block's reduction pass is not run."""
    need = [False] * len(spec.in_keys)
    for t, pair in enumerate(spec.pairs):
        if spec.bias_modes[pair.out_index] == "mean" and np.any(tap_sums(spec, t) != 0.0):
            need[pair.in_index] = True
    return tuple(need)


def input_means(spec: ConvSpec, inputs: Sequence[jax.Array], given: Optional[Sequence] = None,
                sums: Optional[Callable[[list[int]], dict]] = None) -> Optional[tuple]:
    """Per input key its spatial mean (c, *(D,)*k) in the compute dtype (at least float32), where
    `takes_input_means`; else None. A key whose mean reaches no offset (`input_means_needed`) gets
    zeros, a constant: no pass over it. `given` (`check_given_means`): per key None or the mean its
    producer computed, taken as is (`known_mean`: no pass over that input either). `sums`: None
    (XLA's reductions), or a function from the indices of the inputs still to reduce to their
    spatial sums by index (a kernel reading them in a layout of its own)."""
    if not takes_input_means(spec):
        return None
    dtype = jnp.promote_types(jnp.result_type(*inputs), jnp.float32)
    given = tuple(given) if given is not None else (None,) * len(inputs)
    needed = input_means_needed(spec)
    wanted = [a for a, (need, m) in enumerate(zip(needed, given)) if need and m is None]
    summed = sums(wanted) if sums is not None and wanted else {}
    pixels = math.prod(inputs[0].shape[1 : 1 + spec.D])
    return tuple(unread_mean(x, spec.D, dtype) if not need
                 else (summed[a] / pixels).astype(dtype) if a in summed
                 else spatial_mean(x.astype(dtype), spec.D) if m is None
                 else known_mean(x, m.astype(dtype), spec.D)
                 for a, (x, need, m) in enumerate(zip(inputs, needed, given)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def known_mean(x: jax.Array, mean: jax.Array, D: int) -> jax.Array:
    """`mean`, standing for the spatial mean of the unbatched block `x` (c, *spatial[D], *tensor)
    that its producer already computed: the value is `mean` (x is not read), the derivative that
    of the spatial mean of x (so a gradient reaches x at every pixel, as through
    `spatial_mean`), and `mean` itself carries none (it is a function of x, counted through x)."""
    return mean


@known_mean.defjvp
def _known_mean_jvp(D, primals, tangents):
    x, mean = primals
    return mean, spatial_mean(tangents[0], D).astype(mean.dtype)


def check_given_means(spec: ConvSpec, inputs: Sequence[jax.Array], given) -> Optional[tuple]:
    """`given` (None, or per input key None or that input's spatial mean (c_a, *(D,)*k_a), as its
    producer computed it) as a tuple of float arrays, None when it holds none. Raises ValueError
    naming `input_means` and the offending entry."""
    if given is None:
        return None
    if isinstance(given, (jax.Array, np.ndarray)) or len(given) != len(inputs):
        raise ValueError(
            f"`input_means` (={_describe(given)}) must be a sequence of {len(inputs)} entries, one per input key"
        )
    out = []
    for a, (m, x) in enumerate(zip(given, inputs)):
        if m is None:
            out.append(None)
            continue
        k = spec.in_keys[a][0]
        want = (x.shape[0],) + (spec.D,) * k
        if tuple(getattr(m, "shape", ())) != want or not jnp.issubdtype(m.dtype, jnp.floating):
            raise ValueError(
                f"`input_means[{a}]` (={_describe(m)}) must be a floating-point array of shape {want}: "
                f"the spatial mean of input {a}"
            )
        out.append(m)
    return tuple(out) if any(m is not None for m in out) else None


def unread_mean(x: jax.Array, D: int, dtype) -> jax.Array:
    """The zeros that stand for an unbatched block's spatial mean where no offset reads it."""
    return jnp.zeros((x.shape[0],) + tuple(x.shape[1 + D :]), dtype)


def means_to_outputs(spec: ConvSpec, in_means: Sequence[jax.Array], weights: Sequence[jax.Array]) -> tuple:
    """Per output block its spatial mean (o_b, *(D,)*k_b) from the inputs' spatial means (valid
    where `means_shortcut_exact`): the filters' tap sums applied to the means."""
    D = spec.D
    dtype = jnp.promote_types(jnp.result_type(*in_means, *weights), jnp.float32)
    outs: list = [None] * len(spec.out_keys)
    for t, (pair, w) in enumerate(zip(spec.pairs, weights)):
        k_a = spec.in_keys[pair.in_index][0]
        k_b = spec.out_keys[pair.out_index][0]
        tap_sum = tap_sums(spec, t)  # (F, i, j)
        m = in_means[pair.in_index].astype(dtype).reshape(-1, D**k_a)  # (c, i)
        # tiny contractions as products and sums (exact fp32 products, no tf32 rounding): XLA
        # fuses them with the means' last stage instead of launching a GEMM and its transposes
        per_filter = jnp.sum(m[:, None, :, None] * jnp.asarray(tap_sum, dtype)[None], axis=2)  # (c, F, j)
        term = jnp.sum(w.astype(dtype)[..., None] * per_filter[None], axis=(1, 2))  # (o, j)
        term = term.reshape((term.shape[0],) + (D,) * k_b)
        prev = outs[pair.out_index]
        outs[pair.out_index] = term if prev is None else prev + term
    return tuple(outs)


def output_means(spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array]) -> tuple:
    """Per output block, its spatial mean (o_b, *(D,)*k_b) from the inputs' spatial means, or None
    for every block when the shortcut is not exact for this spec (`means_shortcut_exact`).

    Unbatched blocks, like kernels.conv_contract; the result has the inputs' compute dtype.
    """
    if not means_shortcut_exact(spec):
        return (None,) * len(spec.out_keys)
    dtype = jnp.promote_types(jnp.result_type(*inputs), jnp.float32)
    return means_to_outputs(spec, [spatial_mean(x.astype(dtype), spec.D) for x in inputs], weights)


def offsets_from_means(spec: ConvSpec, in_means: Optional[Sequence[jax.Array]], weights: Sequence[jax.Array],
                       bias: Optional[Bias]) -> tuple:
    """`bias_offsets` from the inputs' spatial means (`input_means`; None where no "mean" block
    takes the shortcut): only tiny arrays, so a backend may differentiate it by itself and route
    the means' gradient (a per-channel constant over the pixels) where it costs no pass."""
    bias = check_bias(spec, bias)
    if bias is None:
        return (None,) * len(spec.out_keys)
    means = means_to_outputs(spec, in_means, weights) if in_means is not None else None
    offsets = []
    for b, (mode, (k, _, o)) in enumerate(zip(spec.bias_modes, spec.out_keys)):
        if mode == "add":
            offsets.append(jnp.broadcast_to(bias[b].reshape((o,) + (1,) * k), (o,) + (spec.D,) * k))
        elif mode == "mean" and means is not None and means[b] is not None:
            offsets.append(bias[b].reshape((o,) + (1,) * k).astype(means[b].dtype) * means[b])
        else:
            offsets.append(None)
    return tuple(offsets)


def float32_offsets_from_means(spec: ConvSpec, in_means: Optional[Sequence[jax.Array]],
                               weights: Sequence[jax.Array], bias: Optional[Bias]) -> tuple:
    """`offsets_from_means` in float32, what the kernels' epilogues add (None where a block has
    no offset)."""
    offsets = offsets_from_means(spec, in_means, weights, bias)
    return tuple(None if o is None else o.astype(jnp.float32) for o in offsets)


def bias_offsets(
    spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array], bias: Optional[Bias],
    given_means: Optional[Sequence] = None,
) -> tuple:
    """Per output block the additive offset (o_b, *(D,)*k_b) that the bias amounts to, or None.

    "add": b broadcast over the components; "mean": b * output_means. None for "none" blocks and
    for "mean" blocks where the shortcut is not exact (the caller then uses the output's own mean
    after the convolution, as `apply_bias` does). Adding an offset to every pixel has the spatial
    sum of the output cotangent as its gradient. `given_means`: as `input_means`' `given`.
    """
    if check_bias(spec, bias) is None:
        return (None,) * len(spec.out_keys)
    return offsets_from_means(spec, input_means(spec, inputs, given_means), weights, bias)


def apply_bias(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    outputs: Sequence[jax.Array],
    bias: Optional[Bias],
    given_means: Optional[Sequence] = None,
) -> tuple:
    """`outputs` (unbatched, spec.out_keys order) with the bias of `spec.bias_modes` added
    (`given_means`: as `input_means`' `given`)."""
    outputs = tuple(outputs)
    offsets = bias_offsets(spec, inputs, weights, bias, given_means)
    bias = check_bias(spec, bias)
    D = spec.D
    result = []
    for b, (out, off, mode) in enumerate(zip(outputs, offsets, spec.bias_modes)):
        if mode == "none":
            result.append(out)
            continue
        k = spec.out_keys[b][0]
        if off is None:  # "mean" without the shortcut: the output's own mean
            mean = spatial_mean(out, D)
            off = bias[b].reshape((-1,) + (1,) * k).astype(mean.dtype) * mean
        result.append(add_spatial_offset(out, off, D))
    return tuple(result)
