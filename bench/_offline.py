"""Offline compilation of a generated Triton plan for sm_90 on a host without a GPU, and the
resource report of the cuobjdump that Triton's wheel ships (bench.parity_sass; the tests'
_hopper_compile.py).

Run it in a process whose triton was imported without TRITON_INTERPRET: the interpreter patches
triton.language process-wide (its standard library then fails Triton's code generator on a cold
cache), so the tests compile in a subprocess."""

from __future__ import annotations

import pathlib
import subprocess
import tempfile


class OfflineUnavailable(Exception):
    """This Triton has no offline compile API of the shape used here (says nothing of the kernels)."""


def compile_for_hopper(plan):
    """Triton's compiled kernel of a generated `KernelPlan` (all pointer arguments fp32) for sm_90."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as err:
        raise OfflineUnavailable(str(err)) from err
    from kernels.triton._kernel import compile_plan

    fn = compile_plan(plan)
    try:
        source = ASTSource(fn=fn, signature={name: "*fp32" for name in fn.arg_names}, constexprs={})
    except TypeError as err:
        raise OfflineUnavailable(str(err)) from err
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=plan.num_warps, num_stages=plan.num_stages))


def cuobjdump() -> pathlib.Path:
    """The cuobjdump Triton's wheel ships (it may be absent)."""
    import triton

    return pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def resource_usage(cubin_path: str) -> str:
    """`cuobjdump --dump-resource-usage` of a cubin file: REG:, STACK:, SHARED: per kernel."""
    return subprocess.run([str(cuobjdump()), "--dump-resource-usage", cubin_path], capture_output=True,
                          text=True).stdout


def written_cubin(compiled):
    """A named temporary .cubin holding the compiled kernel (a context manager)."""
    fh = tempfile.NamedTemporaryFile(suffix=".cubin")
    fh.write(compiled.asm["cubin"])
    fh.flush()
    return fh
