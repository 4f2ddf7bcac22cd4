"""Launching the generated forward kernel: jax-triton on a GPU, Triton's interpreter on the host.

Both paths run the same generated source. On an NVIDIA GPU the kernel is a jax-triton custom call
(XLA owns the buffers; nothing is copied). With TRITON_INTERPRET=1 it runs inside a
`jax.pure_callback` on torch CPU tensors, so CI tests the real kernel without a GPU.

Operands carry a leading batch axis of size 1 or B (size 1 is broadcast with a zero batch stride,
e.g. weights shared by a vmapped batch); one launch covers the whole batch.
"""

from __future__ import annotations

import os
import threading
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._spec import ConvSpec
from ._kernel import compile_plan, plan_kernel
from ._tiling import INT32_MAX, BlockSizes, Geometry, KernelPlan


def interpreting() -> bool:
    """True when kernels run through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def launch_geometry(spec: ConvSpec, xs: Sequence, ws: Sequence = (), gs: Sequence = ()) -> tuple[int, Geometry]:
    """The batch size of a launch's operands (inputs xs, weights ws, cotangents gs; each with a
    leading batch axis of 1 or B) and its Geometry."""
    batch = batch_size(list(xs) + list(ws) + list(gs))
    spatial = tuple(int(n) for n in xs[0].shape[2 : 2 + spec.D])
    return batch, Geometry(
        spatial=spatial,
        x_batched=batched_flags(xs, batch),
        w_batched=batched_flags(ws, batch),
        y_batched=batched_flags(gs, batch),
    )


def launch(
    spec: ConvSpec,
    mode: str,
    blocks: BlockSizes,
    xs: Sequence[jax.Array],
    ws: Sequence[jax.Array],
    poison: Optional[float] = None,
) -> tuple[jax.Array, ...]:
    """Run the fused forward on batched operands; returns float32 outputs (B, o, *spatial', *tensor).

    Args:
        xs: per input key, (1 or B, c, *spatial, *(D,)*k).
        ws: per pair, (1 or B, o, c, n_filters).
        poison: if set, outputs start filled with this value (tests check that every element is
            overwritten); on the interpreter path outputs always start as NaN.
    """
    batch, geometry = launch_geometry(spec, xs, ws=ws)
    aliased = poison is not None and not interpreting()
    # the interpreter runs no PTX (no layout barrier) and multiplies bf16 dot operands wrongly
    host = interpreting()
    plan = plan_kernel(spec, geometry, mode, blocks, aliased, bf16_dot_in_fp32=host, layout_barrier=not host)
    grid = plan.programs_per_batch * batch
    if grid > INT32_MAX:
        raise ValueError(f"batch (={batch}) needs {grid} programs, more than a launch grid holds (2^31 - 1)")
    return run_plan(plan, out_shapes(spec, plan, batch), grid, list(xs) + list(ws), poison)


def run_plan(plan: KernelPlan, shapes, grid: int, args: Sequence[jax.Array], poison: Optional[float] = None):
    """Launch a generated kernel on `args`, returning new float32 arrays of `shapes`.

    With `poison`, outputs start filled with it (on the host they always start as NaN)."""
    if interpreting():
        return _interpret(plan, shapes, grid, args, np.nan if poison is None else poison)
    return _gpu(plan, shapes, grid, args, poison)


# ---- GPU: jax-triton --------------------------------------------------------------------------------
def _gpu(plan, shapes, grid, args, poison):
    import jax_triton  # lazily: it fails to import on a CPU-only jaxlib

    kernel = compile_plan(plan)
    if plan.max_registers is not None:
        _cap_registers(jax_triton, plan.name, plan.max_registers)
    args = list(args)
    aliases = {}
    if poison is not None:
        for n, s in enumerate(shapes):
            aliases[len(args)] = n
            args.append(jnp.full(s.shape, poison, s.dtype))
    outs = jax_triton.triton_call(
        *args,
        kernel=kernel,
        out_shape=list(shapes),
        grid=(grid,),
        num_warps=plan.num_warps,
        num_stages=plan.num_stages,
        input_output_aliases=aliases or None,
        name=plan.name,
    )
    return tuple(outs)


_REGISTER_CAPS: dict[str, int] = {}


def _cap_registers(jax_triton, name: str, cap: int) -> None:
    """Compile kernel `name` with at most `cap` registers per thread.

    jax-triton 0.3 passes no `maxnreg` to Triton, so its kernel factory is wrapped once: for a
    kernel with a cap, the backend's parsed options get `maxnreg` (a CUDAOptions field since
    Triton 3.0). Plans are named by a hash of their tiling, so each name has one cap. If the
    factory is not where 0.3 keeps it, kernels compile uncapped (slower, never wrong)."""
    _REGISTER_CAPS[name] = cap
    lib = getattr(jax_triton, "triton_lib", None)
    original = getattr(lib, "get_or_create_triton_kernel", None)
    if original is None or getattr(original, "_ginjax_register_caps", False):
        return

    def get_or_create_triton_kernel(backend_init_func, platform, fn, *args, **kwargs):
        limit = _REGISTER_CAPS.get(getattr(fn, "__name__", ""))
        if limit is not None:
            def backend_with_cap(*a, _init=backend_init_func, **kw):
                backend = _init(*a, **kw)
                parse = backend.parse_options
                backend.parse_options = lambda opts: parse({**opts, "maxnreg": limit})
                return backend

            backend_init_func = backend_with_cap
        return original(backend_init_func, platform, fn, *args, **kwargs)

    get_or_create_triton_kernel._ginjax_register_caps = True
    lib.get_or_create_triton_kernel = get_or_create_triton_kernel


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


def _interpret(plan, shapes, grid, args, poison):
    def host(*arrays):
        import torch

        with _INTERPRETER_LOCK:
            kernel = compile_plan(plan)
            tensors = [_to_torch(np.asarray(a)) for a in arrays]
            outs = [torch.full(s.shape, float(poison), dtype=torch.float32) for s in shapes]
            kernel[(grid,)](*tensors, *outs)
            return tuple(o.numpy() for o in outs)

    # never vmapped: the custom_vmap rules of conv_contract.py turn vmap into one batched launch
    return tuple(jax.pure_callback(host, tuple(shapes), *args))
