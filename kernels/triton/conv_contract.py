"""The `triton` backend's entry point: custom_vjp for gradients, custom_vmap for one batched launch.

    outputs = conv_contract_triton(spec, inputs, weights, precision=..., block_sizes=...)

Forward: the fused kernel of `_kernel.py`. Backward (custom_vjp): the input gradient is the same
forward kernel on the transposed layer and the weight gradient its own kernel (`_backward.py`).
Each direction runs on kernels/cuda's kernels instead where `_cuda_dispatch` takes the call.
Forward-mode differentiation (jax.jvp) is not defined for a custom_vjp: use `dense` for it.
Under `jax.vmap` each kernel is launched once for the whole batch (the custom calls do not batch
by themselves): `custom_vmap` folds every vmapped axis into the kernels' batch axis,
broadcasting unbatched operands with a zero batch stride.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .. import _bias
from .._bias import bias_offsets, check_bias, check_given_means, float32_offsets_from_means
from .._env import env_choice
from .._fused import resolve_block_sizes, scatter_input_grads, transposed_spec, transposed_weights
from .._lax_common import compute_dtype
from .._precision import resolve_precision
from .._registry import add_residual
from .._reduce import fused_sums_cover, middle_sum
from .._spec import ConvSpec
from ..dense import conv_contract_dense
from . import _compile, _cuda_dispatch
from ._backward import weight_grad_launch
from ._filter_groups import filter_groups
from ._stencil import check_sizes
from ._tiling import BlockSizes
from ._launch import launch
from .parity_conv import conv_contract_parity, parity_runs


def conv_contract_triton(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    *,
    precision=None,
    block_sizes: Optional[BlockSizes] = None,
    poison: Optional[float] = None,
    backward: str = "fused",
    offsets: Optional[Sequence[Optional[jax.Array]]] = None,
    bias: Optional[Sequence[Optional[jax.Array]]] = None,
    input_means: Optional[Sequence[Optional[jax.Array]]] = None,
    residual: Optional[Sequence[Optional[jax.Array]]] = None,
) -> tuple[jax.Array, ...]:
    """ConvContract on unbatched blocks with the fused Triton kernels (forward and gradients).

    Args:
        spec, inputs, weights, precision: as for `kernels.conv_contract` (operands already checked).
        block_sizes: the kernels' tiling (None: `BlockSizes.for_layer(spec, spatial)`).
        poison: tests only: outputs start filled with this value before the kernel writes them.
        backward: "fused" (the input- and weight-gradient kernels) or "dense" (dense's VJP, for A/B);
            a layer on the parity-blocked path (`parity_conv.parity_runs`) has its own backward.
        offsets: per output key, None or an (o, *(D,)*k) array added to every pixel of that
            output in the kernel's epilogue (`kernels._bias.bias_offsets`); differentiable: its
            gradient is the spatial sum of the output's cotangent.
        bias: the layer's bias for `spec.bias_modes` (kernels._bias; not with `offsets`): its
            offsets go into the forward's epilogue; a "mean" block's offset is a function of the
            inputs' spatial means, whose gradient (a constant per channel and component over the
            pixels) goes into the input-gradient kernel's epilogue, so no pass over the input
            gradient adds it. A "mean" block without the means shortcut (not a full torus) gets
            nothing here: the caller adds the output's own mean (kernels.triton._run).
        input_means: with `bias`, per input key None or its spatial mean as its producer
            computed it (`kernels.conv_contract`'s): used in place of a pass over that input.
        residual: per output key None or an array of that output's shape added to it
            (`kernels.conv_contract`'s, checked): the forward kernel's epilogue adds it where
            the CUDA forward runs the layer (read beside the bias offsets, no pass of its own),
            Triton's kernel as the prior it adds to in place; its gradient is the cotangent.
    """
    bias = None if bias is None else check_bias(spec, bias)
    given = check_given_means(spec, inputs, input_means) if bias is not None else None
    if bias is not None and offsets is not None and any(off is not None for off in offsets):
        raise ValueError("`offsets` and `bias` are exclusive: give the layer's bias, or offsets of your own")
    bias_spec, spec = (spec if bias is not None else None), spec.without_bias()
    offsets = tuple(offsets) if offsets is not None else (None,) * len(spec.out_keys)
    if len(offsets) != len(spec.out_keys):
        raise ValueError(f"`offsets` has {len(offsets)} entries; the layer has {len(spec.out_keys)} output keys")
    for b, (off, (k, _, o)) in enumerate(zip(offsets, spec.out_keys)):
        if off is not None and tuple(off.shape) != (o,) + (spec.D,) * k:
            raise ValueError(f"`offsets[{b}]` has shape {tuple(off.shape)}; output key {b} needs {(o,) + (spec.D,) * k}")
    mode = resolve_precision(precision)
    inputs, weights = tuple(inputs), tuple(weights)
    none = (None,) * len(spec.out_keys)
    residual = none if residual is None else tuple(residual)
    if len(residual) != len(spec.out_keys):
        raise ValueError(f"`residual` has {len(residual)} entries; the layer has {len(spec.out_keys)} output keys")
    for name, arrays in (("inputs", inputs), ("weights", weights)):
        for n, a in enumerate(arrays):
            if not jnp.issubdtype(a.dtype, jnp.floating):
                raise ValueError(f"`{name}[{n}]` has dtype {a.dtype}; ConvContract needs floating point")
    if compute_dtype(*inputs, *weights) != jnp.float32:
        # float64 (x64 oracles) is beyond the kernel's fp32 accumulation: the lax path is exact
        outs = conv_contract_dense(spec, inputs, weights, mode)
        if bias is not None:
            offsets = bias_offsets(bias_spec, inputs, weights, bias, given)
        return add_residual(_add_offsets(outs, offsets, spec.D), residual)
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    blocks = resolve_block_sizes(block_sizes, BlockSizes, spec, spatial)
    check_sizes(spec, spatial)
    if backward not in ("fused", "dense"):
        raise ValueError(f"`backward` (={backward!r}) must be 'fused' or 'dense'")
    poison = None if poison is None else repr(float(poison))  # a hashable static (NaN != NaN)
    offsets = tuple(None if off is None else off.astype(jnp.float32) for off in offsets)
    # float32 before the custom_vjp, whose cotangents are float32 (autodiff casts them back)
    residual = tuple(None if r is None else r.astype(jnp.float32) for r in residual)
    groups = filter_groups(spec, spatial, mode, blocks)
    if parity_runs(spec, spatial, groups is not None):  # tensor-core GEMMs; bias and residual in its epilogue
        return conv_contract_parity(spec, inputs, weights, mode, offsets=offsets, priors=residual, bias_spec=bias_spec,
                                    bias=bias, given_means=given)
    if groups is None:
        given = given or _none_given(inputs)
        return _conv_contract(spec, mode, blocks, poison, backward, bias_spec, inputs, weights, offsets, residual,
                              bias, given)
    if bias is not None:  # each group its own custom_vjp: the means' gradient goes through autodiff
        offsets = float32_offsets_from_means(bias_spec, _bias.input_means(bias_spec, inputs, given), weights, bias)
    return _by_filter_groups(groups, len(spec.out_keys), lambda sub, xs, ws, offs, priors: _conv_contract(
        sub, mode, resolve_block_sizes(block_sizes, BlockSizes, sub, spatial), poison, backward, None, xs, ws, offs,
        priors, None, _none_given(xs)), inputs, weights, offsets, residual)


def _none_given(inputs) -> tuple:
    """No input's mean given (`_conv_contract`'s `given`)."""
    return (None,) * len(inputs)


def _by_filter_groups(groups, n_outputs: int, call, inputs, weights, offsets, residual) -> tuple[jax.Array, ...]:
    """The layer as the sum of its filter groups' launches (`_filter_groups`): `call(sub, inputs,
    weights, offsets, priors)` per group with its inputs, its weights' filter columns, for the
    first group that writes an output that output's offset (the bias is added once) and its
    residual (None or the array) as its prior, and for a later one the output so far as its
    prior: the group's kernel adds to it in place, so no partial output is kept and no separate
    sum runs."""
    outputs: list = list(residual)
    written: set = set()
    for group in groups:
        ws = tuple(weights[t][..., f[0]:f[-1] + 1] for t, f in group.filters)  # runs are consecutive
        offs = tuple(None if b in written else offsets[b] for b in group.outputs)
        priors = tuple(outputs[b] for b in group.outputs)
        ys = call(group.spec, tuple(inputs[a] for a in group.inputs), ws, offs, priors)
        for b, y in zip(group.outputs, ys):
            outputs[b] = y
            written.add(b)
    return tuple(outputs)


def _add_offsets(outs, offsets, D: int) -> tuple[jax.Array, ...]:
    """Each output plus its key's (o, *tensor) offset at every pixel, where the kernel that made
    it has no bias epilogue."""
    return tuple(y if off is None else y + _over_space(off, D) for y, off in zip(outs, offsets))


def _over_space(offset: jax.Array, D: int) -> jax.Array:
    """An (o, *tensor) offset shaped to broadcast over (o, *spatial, *tensor)."""
    return offset.reshape(offset.shape[:1] + (1,) * D + offset.shape[1:])


# ---- differentiation: custom_vjp with the fused backward kernels ------------------------------------
# The input gradient is the forward kernel on the transposed layer (_fused.transposed_spec);
# the weight gradient is its own kernel. Both are custom_vmap ops like the forward, so under vmap
# each is one batched launch; the weight kernel returns per-example gradients (cheap: they are
# summed in registers per program, not a grouped convolution), which JAX adds up for shared
# weights. Residuals: the inputs and weights only (Z is recomputed from X, not stored). `priors`
# (per output key None or an output-shaped array the forward adds to: the caller's residual, or a
# filter group's output so far) pass their cotangent through unchanged. With `bias_spec` (the layer with its bias modes) the offsets come
# from `bias` and the inputs' means (`_bias_offsets`) and the means' gradient, a constant over the
# pixels, is the input-gradient kernel's epilogue offset. `given` (per input None or its mean, as
# its producer computed it) stands in for that input's means: constants here, whose gradient is
# the inputs' (the same epilogue offset), so none goes back to them (kernels._bias.known_mean).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _conv_contract(spec, mode, blocks, poison, backward, bias_spec, inputs, weights, offsets, priors, bias, given):
    if bias_spec is not None:
        means = _input_means(spec, mode, poison, bias_spec, inputs, given)
        offsets = float32_offsets_from_means(bias_spec, means, weights, bias)
    return _forward(spec, mode, blocks, poison, inputs, weights, offsets, priors=priors)


def _bias_offsets(spec, mode, poison, bias_spec, inputs, weights, bias, given):
    """The layer's bias as float32 epilogue offsets, and the VJP of the tiny map from the inputs'
    spatial means, the weights and the bias to them (the means' reduction stays outside it)."""
    means = _input_means(spec, mode, poison, bias_spec, inputs, given)
    return jax.vjp(functools.partial(float32_offsets_from_means, bias_spec), means, weights, bias)


INPUT_MEANS_ENV = "GINJAX_INPUT_MEANS"
INPUT_MEANS_IMPLS = ("xla", "triton")


def input_means_impl() -> str:
    """How a "mean" bias takes its inputs' spatial means where the CUDA forward runs the layer:
    $GINJAX_INPUT_MEANS, "xla" (the default: `middle_sum`, two XLA reductions a block) or "triton"
    (the per-channel sums kernel, reading the blocks in the CUDA kernels' layout, as the backward's
    bias sums do). Opt-in: timed in session 23 at -0.2 ms a ResNet step and within the noise of a
    DilResNet one (bench/NOTES.md, "Session 23")."""
    return env_choice(INPUT_MEANS_ENV, INPUT_MEANS_IMPLS, "xla")


def _input_means(spec, mode, poison, bias_spec, inputs, given):
    """`kernels._bias.input_means` (`given`: per input None or its mean as its producer computed
    it, used as is), on the sums kernel in the CUDA kernels' layout where `input_means_impl` asks
    for it and the CUDA forward runs this call (so the inputs already lie in that layout); the
    same sums either way (the layout only decides where XLA transposes)."""
    if input_means_impl() != "triton" or _cuda_dispatch.cuda_forward_plan(spec, mode, poison, inputs) is None:
        return _bias.input_means(bias_spec, inputs, given)
    from ..cuda.conv_contract import layout as cuda_layout

    return _bias.input_means(bias_spec, inputs, given,
                             sums=lambda wanted: _spatial_sums(inputs, wanted, spec.D, fixed_layout=cuda_layout()))


def _forward(spec, mode, blocks, poison, inputs, weights, offsets=None, like=None, priors=None):
    offsets = offsets or (None,) * len(spec.out_keys)
    priors = priors or (None,) * len(spec.out_keys)
    outs = _cuda_dispatch.cuda_forward(spec, mode, poison, inputs, weights, like, offsets, priors)
    if outs is not None:
        return outs
    biased = tuple(b for b, off in enumerate(offsets) if off is not None)
    carried = tuple(b for b, p in enumerate(priors) if p is not None)
    op = _batched_forward(spec, mode, blocks, poison, biased, carried)
    # offsets go to the kernel as (o, D^k): one contiguous row of components per channel
    flat = tuple(offsets[b].reshape(1, offsets[b].shape[0], -1) for b in biased)
    outs = op(tuple(x[None] for x in inputs), tuple(w[None] for w in weights), flat,
              tuple(priors[b][None] for b in carried))
    return tuple(o[0] for o in outs)


def _conv_contract_fwd(spec, mode, blocks, poison, backward, bias_spec, inputs, weights, offsets, priors, bias,
                       given):
    bias_vjp = None
    if bias_spec is not None:
        offsets, bias_vjp = _bias_offsets(spec, mode, poison, bias_spec, inputs, weights, bias, given)
    outs = _forward(spec, mode, blocks, poison, inputs, weights, offsets, priors=priors)
    return outs, (inputs, weights, offsets, tuple(p is not None for p in priors), bias_vjp,
                  tuple(m is not None for m in given))


def _conv_contract_bwd(spec, mode, blocks, poison, backward, bias_spec, residuals, cotangents):
    inputs, weights, offsets, carried, bias_vjp, given = residuals
    cotangents = tuple(g.astype(jnp.float32) for g in cotangents)
    # an offset added to every pixel: its gradient is the spatial sum of the cotangent
    biased = tuple(b for b, off in enumerate(offsets) if off is not None)
    transposed = transposed_spec(spec) if backward == "fused" else None
    if transposed is None:  # dense's VJP (asked for, or a padding the transpose does not cover)
        _, vjp = jax.vjp(lambda x, w: conv_contract_dense(spec, x, w, mode), inputs, weights)
        d_inputs, d_weights = vjp(cotangents)
        sums = _spatial_sums(cotangents, biased, spec.D)
    else:
        cuda_dw = _cuda_dispatch.cuda_weight_grad(spec, mode, poison, inputs, cotangents)
        if cuda_dw is not None:  # its kernel also adds up the cotangents from the rows it stages
            d_weights, block_sums = cuda_dw
            sums = {b: block_sums[b] for b in biased}
        else:  # the weight kernels also add up the biased keys' cotangents from the tiles they load
            op = _batched_weight_grad(spec, mode, blocks, biased)
            outs = op(tuple(x[None] for x in inputs), tuple(g[None] for g in cotangents))
            d_weights = tuple(d[0] for d in outs[: len(spec.pairs)])
            sums = {b: d[0] for b, d in zip(biased, outs[len(spec.pairs) :])}
    d_offsets = tuple(None if off is None else sums[b].astype(off.dtype) for b, off in enumerate(offsets))
    d_bias, in_offsets = None, None
    if bias_vjp is not None:  # through the tiny map to the inputs' means, the weights and the bias
        d_means, d_w_bias, d_bias = bias_vjp(d_offsets)
        d_weights = tuple(d + e for d, e in zip(d_weights, d_w_bias))
        d_offsets = (None,) * len(offsets)
        if d_means is not None:  # d mean / d x = 1 / pixels at every pixel
            pixels = math.prod(inputs[0].shape[1 : 1 + spec.D])
            in_offsets = tuple((m / pixels).astype(jnp.float32) for m in d_means)
    if transposed is None:
        if in_offsets is not None:
            d_inputs = _add_offsets(d_inputs, in_offsets, spec.D)
    else:
        spec_t, used = transposed
        grads = _forward(spec_t, mode, blocks, None, cotangents, transposed_weights(weights), like=spec,
                         offsets=None if in_offsets is None else tuple(in_offsets[a] for a in used))
        d_inputs = scatter_input_grads(used, grads, inputs, jnp.float32)
    return (
        tuple(d.astype(x.dtype) for d, x in zip(d_inputs, inputs)),
        tuple(d.astype(w.dtype) for d, w in zip(d_weights, weights)),
        d_offsets,
        tuple(g if c else None for g, c in zip(cotangents, carried)),
        d_bias,
        tuple(None for _ in given),  # constants here: their gradient went to the inputs (above)
    )


def _spatial_sums(cotangents, biased, D: int, fixed_layout: Optional[str] = None) -> dict:
    """Per biased output key, its cotangent summed over the pixels: (o, *tensor). In the layout
    the cotangent has (`middle_sum`): a plain sum keeping the 3 components minor is a column
    reduction XLA ran in 1.0 ms on a 4 x 16 x 64^3 vector block on the H200, ~15x one read of it.
    `fixed_layout`: "planar" or "minor", the layout the cotangents' other readers (the CUDA
    kernels) fix, in which the Triton sums kernel (GINJAX_CHANNEL_SUMS=triton) reads them too."""
    sums = {}
    for b in biased:
        g = cotangents[b]
        flat = g.reshape((g.shape[0], math.prod(g.shape[1 : 1 + D]), -1)) if fixed_layout else None
        if flat is not None and fused_sums_cover(flat, products=False):
            from .channel_sums import channel_sums_triton

            first = channel_sums_triton(flat, products=False, planar=fixed_layout == "planar")[0]
            sums[b] = first.reshape((g.shape[0],) + g.shape[1 + D :])
        else:
            sums[b] = middle_sum(g, 1, 1 + D)
    return sums


_conv_contract.defvjp(_conv_contract_fwd, _conv_contract_bwd)


# ---- batching: custom_vmap into one launch ------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _batched_forward(spec: ConvSpec, mode: str, blocks: BlockSizes, poison, biased: tuple[int, ...] = (),
                     carried: tuple[int, ...] = ()):
    """The kernel on operands with a leading batch axis of size 1 (broadcast) or B; `biased`:
    the output keys whose (1 or B, o, D^k) offsets are the third operand group; `carried`: those
    whose priors (output-shaped, batch B) are the fourth, added to in place."""

    def body(xs, ws, bs, ps):
        offsets, priors = [None] * len(spec.out_keys), [None] * len(spec.out_keys)
        for b, off in zip(biased, bs):
            offsets[b] = off
        for b, prior in zip(carried, ps):
            priors[b] = prior
        return launch(spec, mode, blocks, xs, ws, None if poison is None else float(poison), offsets if bs else (),
                      priors if ps else ())

    return batched_op(body)


@functools.lru_cache(maxsize=256)
def _batched_weight_grad(spec: ConvSpec, mode: str, blocks: BlockSizes, sums: tuple[int, ...] = ()):
    """The weight-gradient kernel on inputs and cotangents with a leading batch axis (1 or B);
    per pair (B, o, c, F): per-example gradients, summed by the caller where weights are shared;
    then per output key in `sums` its cotangent summed over the pixels, (B, o, *tensor)."""

    return batched_op(lambda xs, gs: weight_grad_launch(spec, mode, blocks, xs, gs, sums=sums))


def batched_op(body):
    """A custom_vmap op running `body(*groups)` (tuples of arrays with a leading batch axis of 1
    or B) whose vmap rule folds the vmapped axis into that batch axis: one launch for the whole
    batch. The kernels of its unbatched trace are held back (`_compile.deferred_prefetch`); under
    vmap the rule's trace at the folded batch replaces them."""

    @jax.custom_batching.custom_vmap
    def op(*groups):
        with _compile.deferred_prefetch(_held_key(op, ((a.shape, a.dtype) for group in groups for a in group))):
            return body(*groups)

    op.def_vmap(functools.partial(_fold_batch_rule, op))
    return op


def _held_key(op, shapes) -> tuple:
    """The key of `op`'s held compiles (`_compile.deferred_prefetch`) from its operands' unbatched
    (shape, dtype) pairs: the op's body and its vmap rule both build it here, so that they agree."""
    return op, tuple((tuple(shape), str(dtype)) for shape, dtype in shapes)


def _fold_batch_rule(op, axis_size, in_batched, *groups):
    """custom_vmap rule of the batched ops: fold the vmapped axis into their leading batch axis."""
    operands = [a for group in groups for a in group]
    flags = [f for group in in_batched for f in group]
    # the op's unbatched trace planned kernels for shapes without the vmapped axis: not lowered
    _compile.supersede(_held_key(op, ((a.shape[1:] if f else a.shape, a.dtype) for a, f in zip(operands, flags))))
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
    regrouped, start = [], 0
    for group in groups:
        regrouped.append(tuple(merged[start : start + len(group)]))
        start += len(group)
    with _compile.eager_prefetch():
        outs = op(*regrouped)
    outs = tuple(o.reshape((axis_size, inner) + o.shape[1:]) for o in outs)
    return outs, tuple(True for _ in outs)
