"""Our own launcher of the generated Triton kernels: a JAX primitive lowered to jaxlib's
`triton_kernel_call` custom call with explicit operand and result layouts.

jax-triton's `triton_call` lowers to the same custom call but always asks for row-major
operands. Here each operand and result carries a physical axis order (major to minor, None for
row-major) that becomes the custom call's `operand_layouts` / `result_layouts` (XLA's
minor-to-major lists). XLA then assigns those layouts to the fusions that produce the operands
and consume the results, so a planar block written by one kernel is read by the next with no
copy; only at a jit boundary that hands over row-major arrays does XLA insert a relayout.

Compilation reuses jax-triton's compile helper (Triton source -> TTIR -> PTX, and jaxlib's
`TritonKernel`); the serialised `TritonKernelCall` and the custom call are built here. The
lowering imports jaxlib's GPU Triton module and jax-triton lazily: this module imports on a
CPU-only jaxlib (the interpreter path never lowers through it).
"""

from __future__ import annotations

import functools
import time
import zlib
from typing import Optional, Sequence

import jax
import numpy as np
from jax.interpreters import mlir, xla

from . import _compile_cache
from ._kernel import compile_plan
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
    kernel, aligned = _compiled_kernel(plan, tuple(_triton_type(a.dtype) for a in avals))
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


_compile_log: list[tuple[str, float]] = []  # (kernel name, seconds) of _compiled_kernel's misses


def compile_seconds() -> float:
    """Seconds this process has spent compiling Triton kernels to PTX (while lowering; the
    cubin is jaxlib's at the first launch), for a bench's compile-time split."""
    return sum(s for _, s in _compile_log)


def compile_log() -> list[tuple[str, float]]:
    """(kernel name, seconds) of every Triton kernel this process compiled, in order."""
    return list(_compile_log)


@functools.lru_cache(maxsize=256)
def _compiled_kernel(plan: KernelPlan, arg_types: tuple[str, ...]):
    """jaxlib's TritonKernel for `plan` and, per pointer argument, whether Triton assumed it
    16-byte aligned (XLA's buffers are). Through jax-triton's compile helper; a register cap
    (`plan.max_registers`) goes into the CUDA backend's options as `maxnreg`."""
    start = time.perf_counter()
    try:
        return _compile_kernel(plan, arg_types)
    finally:
        _compile_log.append((getattr(plan, "name", str(plan)), time.perf_counter() - start))


def _compile_kernel(plan: KernelPlan, arg_types: tuple[str, ...]):
    import jax_triton
    import triton
    from jax_triton import triton_lib

    def backend_init(device, compute_capability):
        backend = triton_lib.get_cuda_backend(device, compute_capability)
        if plan.max_registers is not None:
            parse = backend.parse_options
            backend.parse_options = lambda opts: parse({**opts, "maxnreg": plan.max_registers})
        return backend

    with _compile_cache.around(triton_lib, (triton.__version__, getattr(jax_triton, "__version__", "?"))):
        kernel, attrs = triton_lib.get_or_create_triton_kernel(
            backend_init,
            "cuda",
            compile_plan(plan),
            list(arg_types),
            [],
            num_warps=plan.num_warps,
            num_stages=plan.num_stages,
            num_ctas=1,
            compute_capability=None,
            enable_fp_fusion=True,
            metaparams={},
            dump=False,
        )
    aligned = [["tt.divisibility", 16] in attrs.get((i,), []) for i in range(len(arg_types))]
    return kernel, aligned
