"""Our own launcher of the generated Triton kernels: a JAX primitive lowered to jaxlib's
`triton_kernel_call` custom call with explicit operand and result layouts.

jax-triton's `triton_call` lowers to the same custom call but always asks for row-major
operands. Here each operand and result carries a physical axis order (major to minor, None for
row-major) that becomes the custom call's `operand_layouts` / `result_layouts` (XLA's
minor-to-major lists). XLA then assigns those layouts to the fusions that produce the operands
and consume the results, so a planar block written by one kernel is read by the next with no
copy; only at a jit boundary that hands over row-major arrays does XLA insert a relayout.

Compilation (kernels/triton/_compile.py) reuses jax-triton's compile helper (Triton source ->
TTIR -> PTX, and jaxlib's `TritonKernel`); the serialised `TritonKernelCall` and the custom call
are built here. The
lowering imports jaxlib's GPU Triton module and jax-triton lazily: this module imports on a
CPU-only jaxlib (the interpreter path never lowers through it).
"""

from __future__ import annotations

import functools
import zlib
from typing import Optional, Sequence

import jax
import numpy as np
from jax.interpreters import mlir, xla

from . import _compile
from ._tiling import KernelPlan

from jax.extend.core import Primitive

TARGET = "triton_kernel_call"  # the custom-call target jaxlib registers for CUDA

_triton_p = Primitive("ginjax_triton_kernel_call")
_triton_p.multiple_results = True


def triton_kernel_call(
    plan: KernelPlan,
    shapes: Sequence[jax.ShapeDtypeStruct],
    grid: int,
    args: Sequence[jax.Array],
    in_orders: Sequence[Optional[tuple[int, ...]]],
    out_orders: Sequence[Optional[tuple[int, ...]]],
    aliases: tuple[tuple[int, int], ...] = (),
) -> tuple[jax.Array, ...]:
    """Run `plan` on `args` (all arrays, passed as pointers, then one pointer per result).

    aliases: (operand index, result index) pairs whose buffers XLA shares."""
    # with GINJAX_TRITON_COMPILE_THREADS > 1 the kernel starts compiling now, beside the others
    _compile.prefetch(plan, tuple(_triton_type(a.dtype) for a in list(args) + list(shapes)))
    return tuple(
        _triton_p.bind(
            *args,
            plan=plan,
            shapes=tuple(jax.ShapeDtypeStruct(tuple(s.shape), s.dtype) for s in shapes),
            grid=int(grid),
            in_orders=tuple(None if o is None else tuple(o) for o in in_orders),
            out_orders=tuple(None if o is None else tuple(o) for o in out_orders),
            aliases=tuple(aliases),
        )
    )


def _abstract_eval(*avals, plan, shapes, grid, in_orders, out_orders, aliases):
    return [jax.core.ShapedArray(s.shape, s.dtype) for s in shapes]


_triton_p.def_abstract_eval(_abstract_eval)
_triton_p.def_impl(functools.partial(xla.apply_primitive, _triton_p))  # eager: a one-op program


def minor_to_major(order: Optional[tuple[int, ...]], ndim: int) -> tuple[int, ...]:
    """XLA's layout (minor-to-major dimension list) of a physical axis order (major to minor)."""
    if order is None:
        return tuple(range(ndim - 1, -1, -1))
    if sorted(order) != list(range(ndim)):
        raise ValueError(f"`order` (={order!r}) must be a permutation of range({ndim})")
    return tuple(reversed(order))


def _lowering(ctx, *operands, plan, shapes, grid, in_orders, out_orders, aliases):
    from jax._src.lib import gpu_triton  # jaxlib's CUDA Triton bindings (GPU jaxlib only)

    avals = list(ctx.avals_in) + list(ctx.avals_out)
    kernel, aligned = _compile.compiled_kernel(plan, tuple(_triton_type(a.dtype) for a in avals))
    params = [gpu_triton.create_array_parameter(0, 16 if ok else 0) for ok in aligned]
    call = gpu_triton.TritonKernelCall(kernel, grid, 1, 1, params)
    proto = call.to_proto(plan.name, b"")
    rule = jax.ffi.ffi_lowering(
        TARGET,
        api_version=2,  # the status-returning custom call jaxlib registers for this target
        backend_config=zlib.compress(proto),
        operand_layouts=[minor_to_major(o, a.ndim) for o, a in zip(in_orders, ctx.avals_in)],
        result_layouts=[minor_to_major(o, a.ndim) for o, a in zip(out_orders, ctx.avals_out)],
        operand_output_aliases=dict(aliases),
    )
    return rule(ctx, *operands)


mlir.register_lowering(_triton_p, _lowering, platform="cuda")


_TRITON_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32"}


def _triton_type(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _TRITON_TYPES:
        raise ValueError(f"`dtype` (={name}) of a kernel operand is not one of {sorted(_TRITON_TYPES)}")
    return "*" + _TRITON_TYPES[name]
