"""Launching the generated kernels: our own `triton_kernel_call` custom call on a GPU, Triton's
interpreter on the host.

Both paths run the same generated source. On an NVIDIA GPU a kernel is jaxlib's
`triton_kernel_call` custom call (`_custom_call`), with explicit operand and result layouts:
vector and 2-tensor blocks are asked for component-planar (`block_order`), so XLA lays out the
fusions that produce them that way and the kernels' warp loads cover consecutive bytes of one
component. With TRITON_INTERPRET=1 a kernel runs inside a `jax.pure_callback` on torch CPU
tensors whose axes the callback moves into the same physical order, so CI tests the real kernel
without a GPU.

Operands carry a leading batch axis of size 1 or B (size 1 is broadcast with a zero batch stride,
e.g. weights shared by a vmapped batch); one launch covers the whole batch.
"""

from __future__ import annotations

import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._fused import INT32_MAX
from .._spec import ConvSpec
from ._kernel import compile_plan, plan_kernel
from ._tiling import BlockSizes, Geometry, KernelPlan, interpreting


def out_shapes(spec: ConvSpec, plan: KernelPlan, batch: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return tuple(
        jax.ShapeDtypeStruct((batch, o) + plan.out_spatial + (spec.D,) * k, jnp.float32)
        for k, _, o in spec.out_keys
    )


def batch_size(arrays: Sequence) -> int:
    """The common leading batch size of operands whose leading axis is 1 (broadcast) or B."""
    sizes = {int(a.shape[0]) for a in arrays}
    batch = max(sizes)
    if sizes - {1, batch}:
        raise ValueError(f"operands' leading batch sizes {sorted(sizes)} must each be 1 or {batch}")
    return batch


def batched_flags(arrays: Sequence, batch: int) -> tuple[bool, ...]:
    """Per operand, whether it carries the batch (else its size-1 axis is broadcast, stride 0)."""
    return tuple(batch > 1 and a.shape[0] == batch for a in arrays)


def launch_geometry(spec: ConvSpec, xs: Sequence, ws: Sequence = (), gs: Sequence = (), bs: Sequence = ()) -> tuple[int, Geometry]:
    """The batch size of a launch's operands (inputs xs, weights ws, cotangents gs, bias offsets
    bs (None where a block has none); each with a leading batch axis of 1 or B) and its Geometry."""
    present = [b for b in bs if b is not None]
    batch = batch_size(list(xs) + list(ws) + list(gs) + present)
    flags = iter(batched_flags(present, batch))
    spatial = tuple(int(n) for n in xs[0].shape[2 : 2 + spec.D])
    return batch, Geometry(
        spatial=spatial,
        x_batched=batched_flags(xs, batch),
        w_batched=batched_flags(ws, batch),
        y_batched=batched_flags(gs, batch),
        bias_batched=tuple(None if b is None else next(flags) for b in bs) if present else (),
    )


def launch(
    spec: ConvSpec,
    mode: str,
    blocks: BlockSizes,
    xs: Sequence[jax.Array],
    ws: Sequence[jax.Array],
    poison: Optional[float] = None,
    offsets: Sequence[Optional[jax.Array]] = (),
    priors: Sequence[Optional[jax.Array]] = (),
) -> tuple[jax.Array, ...]:
    """Run the fused forward on batched operands; returns float32 outputs (B, o, *spatial', *tensor).

    Args:
        xs: per input key, (1 or B, c, *spatial, *(D,)*k).
        ws: per pair, (1 or B, o, c, n_filters).
        offsets: per output key, None or a float32 (1 or B, o, D^k) offset added to every pixel
            in the kernel's epilogue (the layer's bias); () for none at all.
        priors: per output key, None or a float32 array of that output's shape (batch B) that the
            kernel adds to what it computes, into the same buffer on the GPU (a filter group
            accumulating into the previous group's outputs); () for none at all.
        poison: if set, outputs start filled with this value (tests check that every element is
            overwritten); on the interpreter path outputs always start as NaN.
    """
    offsets = tuple(offsets) or (None,) * len(spec.out_keys)
    priors = tuple(priors) or (None,) * len(spec.out_keys)
    present = [o for o in offsets if o is not None]
    carried = tuple(b for b, p in enumerate(priors) if p is not None)
    batch, geometry = launch_geometry(spec, xs, ws=ws, bs=offsets)
    aliased = poison is not None and not interpreting()
    # the interpreter runs no PTX (no layout barrier) and multiplies bf16 dot operands wrongly
    host = interpreting()
    plan = plan_kernel(spec, geometry, mode, blocks, aliased, bf16_dot_in_fp32=host, layout_barrier=not host,
                       carried=carried)
    grid = plan.programs_per_batch * batch
    if grid > INT32_MAX:
        raise ValueError(f"batch (={batch}) needs {grid} programs, more than a launch grid holds (2^31 - 1)")
    shapes = out_shapes(spec, plan, batch)
    for b in carried:
        if tuple(priors[b].shape) != shapes[b].shape:
            raise ValueError(f"`priors[{b}]` has shape {tuple(priors[b].shape)}; output key {b} is {shapes[b].shape}")
    in_orders = [block_order(spec.D, x.ndim, blocks.planar_in) for x in xs] + [WEIGHT_ORDER] * len(ws)
    in_orders += [None] * len(present)
    out_orders = [block_order(spec.D, len(s.shape), blocks.planar_out) for s in shapes]
    in_orders += [out_orders[b] for b in carried]
    args = list(xs) + list(ws) + present + [priors[b].astype(jnp.float32) for b in carried]
    first_prior = len(args) - len(carried)
    return run_plan(plan, shapes, grid, args, poison, in_orders, out_orders,
                    carried=tuple((first_prior + n, b) for n, b in enumerate(carried)))


# The forward's weights, logical (1 or B, o, c, n_filters), lie filter-major and output-channel
# minor in memory: the kernel's (out channels x in channels) tile of one filter then has 32
# consecutive output channels under each warp load. XLA transposes the small weight arrays.
WEIGHT_ORDER = (0, 3, 2, 1)


def block_order(D: int, ndim: int, planar: bool) -> Optional[tuple[int, ...]]:
    """Physical (major-to-minor) axis order of a (batch, channels, *spatial, *tensor) block:
    with `planar` its tensor axes go ahead of the spatial ones; None for row-major (also
    where there are no tensor axes, for which the two orders agree)."""
    k = ndim - 2 - D
    if not planar or k == 0:
        return None
    return (0, 1) + tuple(range(2 + D, ndim)) + tuple(range(2, 2 + D))


def run_plan(
    plan: KernelPlan,
    shapes,
    grid: int,
    args: Sequence[jax.Array],
    poison: Optional[float] = None,
    in_orders: Optional[Sequence[Optional[tuple[int, ...]]]] = None,
    out_orders: Optional[Sequence[Optional[tuple[int, ...]]]] = None,
    carried: tuple[tuple[int, int], ...] = (),
):
    """Launch a generated kernel on `args`, returning new float32 arrays of `shapes`.

    in_orders / out_orders: per operand / result, the physical axis order (major to minor) the
    kernel indexes it in, None for row-major. On the GPU XLA is asked for these layouts (it
    lays out the producers accordingly, or inserts a copy); on the host the callback moves axes.
    carried: (operand, result) pairs where the kernel reads the operand and writes the result
    element by element (a prior it adds to): on the GPU they share one buffer.
    With `poison`, the other outputs start filled with it (on the host every output starts as NaN)."""
    in_orders = tuple(in_orders) if in_orders is not None else (None,) * len(args)
    out_orders = tuple(out_orders) if out_orders is not None else (None,) * len(shapes)
    if len(in_orders) != len(args) or len(out_orders) != len(shapes):
        raise ValueError(f"{len(in_orders)} operand / {len(out_orders)} result orders for {len(args)} / {len(shapes)}")
    if interpreting():
        return _interpret(plan, shapes, grid, args, np.nan if poison is None else poison, in_orders, out_orders)
    from ._custom_call import triton_kernel_call

    args = list(args)
    aliases = list(carried)
    if poison is not None:  # the kernel's extra pointers ahead of its outputs: poisoned buffers, aliased
        carried_results = {r for _, r in carried}
        for n, s in enumerate(shapes):
            if n not in carried_results:
                aliases.append((len(args), n))
                args.append(jnp.full(s.shape, poison, s.dtype))
                in_orders = in_orders + (out_orders[n],)
    return triton_kernel_call(plan, tuple(shapes), grid, args, in_orders, out_orders, tuple(aliases))


# ---- host: Triton's interpreter on torch CPU tensors ---------------------------------------------------
def _to_torch(array: np.ndarray):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes bfloat16: torch cannot take it directly
        return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(array.copy())


# XLA may run independent callbacks of one program on several threads at once (the weight
# gradient's kernels are independent); Triton's interpreter patches triton.language globally
# and CPython 3.11's AST constructor is not thread-safe, so interpreted launches take turns.
_INTERPRETER_LOCK = threading.Lock()


def _interpret(plan, shapes, grid, args, poison, in_orders, out_orders):
    def host(*arrays):
        import torch

        with _INTERPRETER_LOCK:
            kernel = compile_plan(plan)
            tensors = [_to_torch(_physical(np.asarray(a), order)) for a, order in zip(arrays, in_orders)]
            outs = [torch.full(_physical_shape(s.shape, order), float(poison), dtype=torch.float32)
                    for s, order in zip(shapes, out_orders)]
            kernel[(grid,)](*tensors, *outs)
            return tuple(_logical(o.numpy(), order) for o, order in zip(outs, out_orders))

    # never vmapped: the custom_vmap rules of conv_contract.py turn vmap into one batched launch
    return tuple(jax.pure_callback(host, tuple(shapes), *args))


def _physical(array: np.ndarray, order) -> np.ndarray:
    """The array with its axes in memory order, contiguous (what the kernel indexes)."""
    return array if order is None else np.ascontiguousarray(np.transpose(array, order))


def _physical_shape(shape, order) -> tuple[int, ...]:
    return tuple(shape) if order is None else tuple(shape[ax] for ax in order)


def _logical(array: np.ndarray, order) -> np.ndarray:
    return array if order is None else np.ascontiguousarray(np.transpose(array, np.argsort(order)))
