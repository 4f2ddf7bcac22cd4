"""The `triton` backend's CUDA dispatch: which of its directions run on kernels/cuda's kernels
(Hopper, where the library is built) rather than Triton's, and how.

- The forward (and the input gradient, the forward of the transposed layer) and the weight
  gradient each take the CUDA kernel where asked (GINJAX_TRITON_FORWARD, GINJAX_TRITON_WEIGHT_GRAD)
  and where it covers the layer: whole, in output-channel groups of `output_group` channels
  (`output_split`), or with zero channels added (`_cuda_padding`), in that order (`cuda_plan`).
- `cuda_forward` and `cuda_weight_grad` run the plan, or return None where Triton's kernels are
  to run the call; kernels/triton/conv_contract.py asks them first.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from .._env import env_choice
from .._fused import with_bases_of
from .._registry import add_residual
from .._spec import ConvSpec
from . import _cuda_padding


FORWARD_IMPLS = ("cuda", "triton")


def forward_impl() -> str:
    """Which kernel runs the backend's forward (and its input gradient, the forward of the
    transposed layer): GINJAX_TRITON_FORWARD, "cuda" (default: kernels/cuda's forward wherever it
    is built, runs and covers the call; triton's kernel elsewhere) or "triton" (always triton's).
    The CUDA forward is 1.9x triton's on the standard layer, and the ResNet and DilResNet train
    steps are 7% and 3% faster with it (bench/NOTES.md, "The CUDA forward in the train steps")."""
    return env_choice("GINJAX_TRITON_FORWARD", FORWARD_IMPLS, "cuda")


def cuda_forward_covers(spec: ConvSpec, spatial, dtype) -> tuple[bool, str]:
    """(whether, why) the forward of `spec` at `spatial` runs on kernels/cuda's kernel under this
    backend: asked for (GINJAX_TRITON_FORWARD), the library built, a Hopper GPU, a covered layer."""
    return _cuda_covers(forward_impl(), "GINJAX_TRITON_FORWARD", "coverage", spec, spatial, dtype)


def _cuda_covers(impl: str, env: str, coverage: str, spec, spatial, dtype) -> tuple[bool, str]:
    if impl != "cuda":
        return False, f"{env}=triton"
    from .. import cuda

    ok, why = cuda.availability()
    if not ok:
        return False, why
    return getattr(cuda, coverage)(spec, spatial, dtype)  # looked up per call: tests stand in for it


def cuda_forward(spec, mode, poison, inputs, weights, like=None, offsets=None, residuals=None):
    """The outputs of kernels.cuda's forward, `offsets` and `residuals` (per output key None or an
    output-shaped array) added in its epilogue, where it computes
    this call exactly as asked (TF32, no test poison, a layer it was compiled for: `spec` itself
    or, for an input gradient, `spec` on the bases of the forward layer `like` with
    the weights moved, `with_bases_of`; either one whole or, with `output_groups_enabled`, as
    launches of `output_group` output channels per key, `output_split`), else None."""
    plan = cuda_forward_plan(spec, mode, poison, inputs, like)
    if plan is None:
        return None
    from .. import cuda

    if offsets is not None and all(o is None for o in offsets):
        offsets = None
    layer, move, split, fp32 = plan
    weights = move(weights)
    padded = _cuda_padding.is_padded(spec, layer)
    if padded:  # a thin layer on the covered one with zero channels (kernels/triton/_cuda_padding.py)
        inputs = _cuda_padding.pad_channels(inputs, _cuda_padding.in_channels(layer))
        weights = _cuda_padding.pad_weights(layer, weights)
        if offsets is not None:
            offsets = _cuda_padding.pad_channels(offsets, _cuda_padding.out_channels(layer))
        if residuals is not None:
            residuals = _cuda_padding.pad_channels(residuals, _cuda_padding.out_channels(layer))
    # passed only where there are any (the launch without them is the plain kernel's) and the
    # kernels add them (dilation 1, TF32: `takes_residuals`); elsewhere added after the launch
    late = residuals if residuals is not None and any(r is not None for r in residuals) else None
    extra = {}
    if late is not None and cuda.takes_residuals(layer, fp32):
        extra, late = {"residuals": late}, None
    if split is None:
        outs = cuda.forward_call(layer, inputs, weights, offsets, fp32=fp32, **extra)
    else:
        outs = forward_by_output_groups(split, inputs, weights, offsets, fp32, **extra)
    outs = add_residual(outs, late)
    return _cuda_padding.crop_channels(outs, _cuda_padding.out_channels(spec)) if padded else outs


def cuda_forward_plan(spec, mode, poison, inputs, like=None):
    """How `cuda_forward` runs this call: (layer, weight move, None, fp32) for one launch of
    `layer`, (layer, move, output split, fp32) for launches per output group, or None where it does
    not (then Triton's kernel runs it); fp32: the 3xTF32 kernels (mode "fp32" where
    GINJAX_CUDA_FP32 is not "0" and `fp32_coverage` takes the layer), else TF32 (mode "tf32", and
    "bf16" unless GINJAX_CUDA_BF16 is "0"). Also what the inputs' means are read beside
    (conv_contract._input_means)."""
    layers = [(spec, lambda w: w)]
    if like is not None and (twin := with_bases_of(spec, like)) is not None:
        layers.append(twin)
    from ..cuda._plan import fp32_coverage

    return cuda_plan(cuda_forward_covers, layers, mode, poison, inputs, fp32_coverage)


def cuda_plan(covers_fn, layers, mode, poison, inputs, fp32_coverage):
    """`covered_launch` of `layers` by `covers_fn` (`cuda_forward_covers` or
    `cuda_weight_grad_covers`), with fp32 appended: (layer, move, split or None, fp32), a padded
    layer wider than the call's (the callers pad and crop); None where the call
    is not the CUDA kernels' (test poison, no covered layer, a precision they do not compute: they
    compute TF32, which also serves bf16 calls where GINJAX_CUDA_BF16 allows (more precise than
    bf16, and faster than Triton's bf16 kernel), and fp32 where GINJAX_CUDA_FP32 allows and
    `fp32_coverage` takes the layer: the kernels' 3xTF32 instantiations,
    `kernels.cuda._plan.fp32_coverage` or `_dw_plan.fp32_coverage`)."""
    from ..cuda._plan import bf16_enabled, fp32_enabled

    fp32 = mode == "fp32" and fp32_enabled()
    tf32 = mode == "tf32" or (mode == "bf16" and bf16_enabled())
    if not (tf32 or fp32) or poison is not None:
        return None
    spec = layers[0][0]
    spatial = tuple(int(n) for n in inputs[0].shape[1 : 1 + spec.D])
    dtype = inputs[0].dtype

    def covers(layer):
        return covers_fn(layer, spatial, dtype)[0] and (not fp32 or fp32_coverage(layer, spatial, dtype)[0])

    found = covered_launch(layers, covers)
    return None if found is None else (*found, fp32)


def covered_launch(layers, covers) -> Optional[tuple]:
    """How the CUDA kernels launch the first of `layers` ((layer, weight move) pairs, in order of
    preference) that `covers(layer)` takes: (layer, move, None) whole, else (layer, move, split)
    in `output_split`'s groups, else (unless GINJAX_CUDA_PAD_CHANNELS=0) the same for each one's
    `_cuda_padding.padded_layer` in turn, the returned layer then wider than the given one; None
    where none is taken. `cuda_plan` and `kernels.triton.describe` both ask it."""
    for layer, move in layers:
        if covers(layer):
            return layer, move, None
    for layer, move in layers:
        if (split := output_split(layer, covers)) is not None:
            return layer, move, split
    if _cuda_padding.enabled():  # a thin layer as a covered one with zero channels
        for layer, move in layers:
            if (padded := _cuda_padding.padded_layer(layer)) is None:
                continue
            if covers(padded):
                return padded, move, None
            if (split := output_split(padded, covers)) is not None:
                return padded, move, split
    return None


def forward_by_output_groups(split, inputs, weights, offsets, fp32=False, residuals=None):
    """The CUDA forward of `split`'s layer as one launch per output group, each writing its channel
    slice of the same results (the later launches alias the previous results: no concatenation),
    each adding its slice of the `residuals` (whole: the launch reads its own channels)."""
    from .. import cuda

    sub, n = split
    o = sub.out_keys[0][2]  # a launch's output channels per key (`output_group`)
    outs = None
    for g in range(n):
        rows = slice(g * o, (g + 1) * o)
        part = None if offsets is None else tuple(None if a is None else a[rows] for a in offsets)
        outs = cuda.forward_call(sub, inputs, tuple(w[rows] for w in weights), part, out_channels=n * o,
                                 first_channel=g * o, into=outs, fp32=fp32,
                                 **({} if residuals is None else {"residuals": residuals}))
    return outs


def output_group(spec: ConvSpec) -> int:
    """Output channels per key of one launch of `spec` split into output groups: the widest the
    kernels of its spatial dimensions are compiled for (kernels.cuda._plan.out_channels: 16 in 3D,
    32 in 2D)."""
    from ..cuda._plan import out_channels

    return max(out_channels(spec.D))
OUTPUT_GROUPS_ENV = "GINJAX_CUDA_OUTPUT_GROUPS"


def output_groups_enabled() -> bool:
    """Whether a layer with 16k output channels per key (k > 1) may run on the CUDA kernels as k
    launches of 16 each ($GINJAX_CUDA_OUTPUT_GROUPS: "1", the default, or "0"). Measured on the
    H200: d3_n64_b2_c32 fwd 1.73 ms and fwd_bwd 4.79 against dense's 2.13 / 7.15, the UNet step
    0.7 ms faster (bench/NOTES.md, "Output-channel groups")."""
    return env_choice(OUTPUT_GROUPS_ENV, ("0", "1"), "1") == "1"


def output_split(spec: ConvSpec, covers) -> Optional[tuple[ConvSpec, int]]:
    """(the layer with `output_group` output channels per key, the number of launches) where output
    groups are on, every output key has the same channels, a multiple of that group above it,
    and `covers` the smaller layer; else None. Each launch reads every input channel and writes
    its own slice of the outputs: the same result as one launch over all of them."""
    channels = {o for _, _, o in spec.out_keys}
    if not output_groups_enabled() or len(channels) != 1:
        return None
    (o,) = channels
    group = output_group(spec)
    if o <= group or o % group:
        return None
    sub = dataclasses.replace(spec, out_keys=tuple((k, p, group) for k, p, _ in spec.out_keys))
    return (sub, o // group) if covers(sub) else None


def weight_grad_by_output_groups(split, inputs, cotangents, fp32=False):
    """(per pair dW, per block cotangent sums) of `split`'s layer from one CUDA launch per output
    group: group g's cotangents (read in place: `first_channel`) against every input are rows g
    of each pair's dW and of each block's sums (small: concatenated)."""
    from .. import cuda

    sub, n = split
    o = sub.out_keys[0][2]
    results = [cuda.weight_gradient_and_sums(sub, inputs, cotangents, first_channel=g * o, fp32=fp32)
               for g in range(n)]
    join = lambda parts: tuple(jnp.concatenate(blocks, axis=0) for blocks in zip(*parts))  # noqa: E731
    return join([r[0] for r in results]), join([r[1] for r in results])


WEIGHT_GRAD_IMPLS = ("triton", "cuda")


def weight_grad_impl() -> str:
    """Which kernel runs the backend's weight gradient: GINJAX_TRITON_WEIGHT_GRAD, "cuda" (default:
    kernels/cuda's weight gradient wherever it is built, runs and covers the layer; triton's kernel
    elsewhere) or "triton" (always triton's). The CUDA weight gradient is 3.3x triton's on the
    standard layer, and the ResNet and DilResNet train steps are 6% and 9% faster with it
    (bench/NOTES.md, "The CUDA weight gradient measured")."""
    return env_choice("GINJAX_TRITON_WEIGHT_GRAD", WEIGHT_GRAD_IMPLS, "cuda")


def cuda_weight_grad_covers(spec: ConvSpec, spatial, dtype) -> tuple[bool, str]:
    """(whether, why) the weight gradient of `spec` at `spatial` runs on kernels/cuda's kernel under
    this backend: asked for (GINJAX_TRITON_WEIGHT_GRAD), the library built, a Hopper GPU, a covered
    layer."""
    return _cuda_covers(weight_grad_impl(), "GINJAX_TRITON_WEIGHT_GRAD", "weight_gradient_coverage", spec, spatial,
                        dtype)


def cuda_weight_grad(spec, mode, poison, inputs, cotangents):
    """(per pair dW, the cotangents' spatial sums per output block) from kernels.cuda's weight
    gradient where it computes this call as asked (TF32, bf16 on TF32, or fp32 by 3xTF32 where
    `_dw_plan.fp32_coverage` takes it; no test poison, `cuda_weight_grad_covers` the layer or its
    `output_split`), else None. The sums come from the gY rows the kernel stages anyway, so no
    other pass reads the cotangents for the bias gradient."""
    from ..cuda._dw_plan import fp32_coverage

    plan = cuda_plan(cuda_weight_grad_covers, [(spec, None)], mode, poison, inputs, fp32_coverage)
    if plan is None:
        return None
    from .. import cuda

    layer, _, split, fp32 = plan
    padded = _cuda_padding.is_padded(spec, layer)
    if padded:  # zero channels (`_cuda_padding`): their rows and columns of dW are dropped
        inputs = _cuda_padding.pad_channels(inputs, _cuda_padding.in_channels(layer))
        cotangents = _cuda_padding.pad_channels(cotangents, _cuda_padding.out_channels(layer))
    if split is None:
        d_weights, sums = cuda.weight_gradient_and_sums(layer, inputs, cotangents, fp32=fp32)
    else:
        d_weights, sums = weight_grad_by_output_groups(split, inputs, cotangents, fp32)
    if padded:
        return _cuda_padding.crop_weights(spec, d_weights), _cuda_padding.crop_channels(sums, _cuda_padding.out_channels(spec))
    return d_weights, sums
