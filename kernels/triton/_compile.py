"""Compiling the generated Triton kernels for our custom call (kernels/triton/_custom_call.py):
jax-triton's compile helper (Triton source -> TTIR -> PTX, and jaxlib's kernel object), timed per
kernel, optionally on worker threads started as the kernels are traced, optionally from the
on-disk cache (kernels/triton/_compile_cache.py).

Why threads: a process's first model step spent 24-36 s here, one kernel after another, while
lowering (bench/NOTES.md, "Session 33" and "Session 34"). Triton's MLIR and LLVM passes release the
GIL, so `prefetch`, called as a kernel's custom call is traced, starts its compile on one of
GINJAX_TRITON_COMPILE_THREADS worker threads (default: the CPU count, at most 16), and the lowering
waits for it; every kernel of a program is traced before the first is lowered, so they compile
side by side. On the H100's 16 cores the ResNet step's first compile fell from 36.3 to 22.2 s, and
the GPU tests of the Triton kernels pass with them (session 34). The Python front end (the
generated source executed, its AST turned into TTIR) takes turns under a lock; only the TTIR ->
PTX step runs in parallel. GINJAX_TRITON_COMPILE_THREADS=1 compiles each kernel as it is lowered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time

from .._env import thread_setting
from . import _compile_cache
from ._kernel import compile_plan
from ._tiling import KernelPlan

THREADS_ENV = "GINJAX_TRITON_COMPILE_THREADS"

_log: list[tuple[str, float]] = []  # (kernel name, seconds) of every compile, in the order they ended
_futures: dict[tuple, concurrent.futures.Future] = {}  # (plan, argument types) -> its compile
_lock = threading.Lock()  # _futures, the pool and the hook's installation
_frontend = threading.Lock()  # the Python front end, one thread at a time
_local = threading.local()  # per thread: whether it holds _frontend, its `no_prefetch` depth
_pool = None
# compiles held back (`deferred_prefetch`): key -> {(plan, argument types): None}, started when a
# lowering first asks for a kernel unless a vmap rule drops them first (`supersede`)
_pending: dict = {}


MAX_DEFAULT_THREADS = 16  # measured on the H100's 16 cores; more threads share the same cores


def compile_threads() -> int:
    """$GINJAX_TRITON_COMPILE_THREADS: threads compiling kernels ahead of the lowering (default:
    the CPU count, at most MAX_DEFAULT_THREADS; 1: none, each kernel compiled when lowered)."""
    value = os.environ.get(THREADS_ENV, "")
    if not value:
        return max(1, min(MAX_DEFAULT_THREADS, os.cpu_count() or 1))
    n = int(value) if value.strip().isdigit() else 0
    if n < 1:
        raise ValueError(f"`{THREADS_ENV}` (={value!r}) must be an integer >= 1")
    return n


def compile_log() -> list[tuple[str, float]]:
    """(kernel name, seconds) of every Triton kernel this process compiled (on several threads
    their sum is more than the wall time it took), for a bench's compile-time split."""
    return list(_log)


@contextlib.contextmanager
def no_prefetch():
    """Within the block (this thread), traced kernels start no compiles: for traces that are never
    lowered (`jax.eval_shape` of a step to list its layers, bench/model_layers.py), whose kernels
    would otherwise compile in the background for nothing."""
    depth = getattr(_local, "no_prefetch", 0)
    _local.no_prefetch = depth + 1
    try:
        yield
    finally:
        _local.no_prefetch = depth


@contextlib.contextmanager
def deferred_prefetch(key):
    """Within the block (this thread, outside `eager_prefetch`), kernels traced are held under
    `key` instead of starting to compile. For the body of a custom_vmap op, keyed by the op and
    its operands' shapes: JAX traces that body at the unbatched shapes first, and under vmap the
    op's rule replaces that trace with one at the folded batch (a new plan), so the first trace's
    kernels would compile for nothing: half the kernels of a vmapped model step (bench/NOTES.md,
    "Session 36"). The rule drops them (`supersede`) and runs its own trace under
    `eager_prefetch`; what is still held starts when a lowering first asks for a kernel
    (`compiled_kernel`): the kernels of calls that were never vmapped."""
    with thread_setting(_local, "hold", None if getattr(_local, "eager", None) else key):
        yield


@contextlib.contextmanager
def eager_prefetch():
    """Within the block (this thread), `deferred_prefetch` holds nothing back: a vmap rule's own
    trace of its op, the one that is lowered."""
    with thread_setting(_local, "eager", True), thread_setting(_local, "hold", None):
        yield


def supersede(key) -> None:
    """Drop the compiles held under `key` (a vmap rule replacing its op's unbatched trace)."""
    with _lock:
        _pending.pop(key, None)


def prefetch(plan: KernelPlan, arg_types: tuple[str, ...]) -> None:
    """Start compiling `plan` for `arg_types` on a worker thread (with more than one thread,
    outside `no_prefetch`; within `deferred_prefetch`, hold it instead)."""
    if compile_threads() <= 1 or getattr(_local, "no_prefetch", 0):
        return
    hold = getattr(_local, "hold", None)
    if hold is not None:
        with _lock:
            if (plan, arg_types) not in _futures:
                _pending.setdefault(hold, {})[plan, arg_types] = None
        return
    _submit(plan, arg_types)


def _submit(plan: KernelPlan, arg_types: tuple[str, ...]) -> None:
    global _pool
    with _lock:
        if (plan, arg_types) in _futures:
            return
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(compile_threads(), thread_name_prefix="ginjax-triton-compile")
            _at_exit(_pool)
        _futures[plan, arg_types] = _pool.submit(_timed, plan, arg_types)


def _start_held() -> None:
    """Start every compile still held (`deferred_prefetch`)."""
    with _lock:
        held = [k for entries in _pending.values() for k in entries]
        _pending.clear()
    for plan, arg_types in held:
        _submit(plan, arg_types)


def _at_exit(pool) -> None:
    """At the interpreter's exit, drop the compiles not yet started. A program traced but never
    lowered (`jax.eval_shape` of a step) leaves its kernels queued, and the pool's own exit hook
    would run every one of them before the process ends. Registered with threading's exit hooks,
    which run before that one (in reverse order of registration; concurrent.futures registers
    its hook when it is imported)."""
    register = getattr(threading, "_register_atexit", None)  # CPython >= 3.9
    if register is not None:
        register(lambda: pool.shutdown(wait=False, cancel_futures=True))


def compiled_kernel(plan: KernelPlan, arg_types: tuple[str, ...]):
    """jaxlib's TritonKernel for `plan` and, per pointer argument, whether Triton assumed it
    16-byte aligned (XLA's buffers are): compiled once per process, here or by `prefetch`."""
    if _pending:
        _start_held()
    key = (plan, arg_types)
    with _lock:
        future = _futures.get(key)
        mine = future is None
        if mine:
            future = _futures[key] = concurrent.futures.Future()
    if mine:
        try:
            future.set_result(_timed(plan, arg_types))
        except BaseException as err:  # handed to every caller; a compile error stays one
            future.set_exception(err)
    return future.result()


def forget() -> None:
    """Drop every compiled kernel of this process (tests)."""
    with _lock:
        _futures.clear()
        _pending.clear()


def _timed(plan, arg_types):
    start = time.perf_counter()
    try:
        return _compile(plan, arg_types)
    finally:
        _log.append((getattr(plan, "name", str(plan)), time.perf_counter() - start))


def _compile(plan: KernelPlan, arg_types: tuple[str, ...]):
    """Through jax-triton's compile helper; a register cap (`plan.max_registers`) goes into the
    CUDA backend's options as `maxnreg`."""
    import jax_triton
    import triton
    from jax_triton import triton_lib

    install_backend_step(triton_lib, (triton.__version__, getattr(jax_triton, "__version__", "?")))
    install_python_specializer(triton_lib)

    def backend_init(device, compute_capability):
        backend = triton_lib.get_cuda_backend(device, compute_capability)
        if plan.max_registers is not None:
            parse = backend.parse_options
            backend.parse_options = lambda opts: parse({**opts, "maxnreg": plan.max_registers})
        return backend

    with _frontend:
        _local.frontend = True
        try:
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
        finally:
            _local.frontend = False
    aligned = [["tt.divisibility", 16] in attrs.get((i,), []) for i in range(len(arg_types))]
    return kernel, aligned


def install_backend_step(triton_lib, versions: tuple) -> None:
    """Once per process: jax-triton's TTIR -> PTX step (`triton_lib.compile_ttir_inplace`, a
    module global its helper looks up at each call) wrapped to run outside the front-end lock,
    and to read and write the on-disk cache (`_compile_cache.cache_dir`: on unless
    GINJAX_TRITON_CACHE_DIR turns it off)."""
    with _lock:
        real = getattr(triton_lib, "compile_ttir_inplace", None)
        if real is None or getattr(real, "_ginjax_step", False):
            return  # installed, or a jax-triton without that step: compiles run as it has them

        def backend_step(ttir, backend, options, compute_capability, platform):
            step = real
            directory = _compile_cache.cache_dir()
            if directory is not None:
                step = _compile_cache.cached_compile(real, triton_lib.CompilationResult, directory, versions)
            if not getattr(_local, "frontend", False):
                return step(ttir, backend, options, compute_capability, platform)
            _frontend.release()
            try:
                return step(ttir, backend, options, compute_capability, platform)
            finally:
                _frontend.acquire()

        backend_step._ginjax_step = True
        triton_lib.compile_ttir_inplace = backend_step


class _PythonSpecializer:
    """libtriton as jax-triton's helper sees it (`triton_lib._triton`), but with
    `native_specialize_impl` answered in Python for the arguments that helper builds (an object
    with `data_ptr()` and a dtype name in DTYPES, never constant): ("*" + dtype, "D" where
    `align` and the pointer is 16-byte aligned, else ""), what Triton's C++ returns for them
    (tests/test_triton_compile_cache.py compares the two). Why: on its first call Triton's C++
    specializer imports torch, where torch is installed, to recognise its tensors, and the
    first kernel a process compiled took ~5 s with every kernel a disk-cache hit (H100,
    bench/NOTES.md "Session 36"). Anything else goes to the C++ function."""

    def __init__(self, lib):
        self._lib = lib

    def __getattr__(self, name):
        return getattr(self._lib, name)

    # element types whose names Triton keeps as given (it renames some, e.g. i1 to u1)
    DTYPES = frozenset({"fp16", "bf16", "fp32", "fp64", "i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"})

    def native_specialize_impl(self, backend, arg, is_const, specialize_value, align):
        dtype = getattr(arg, "dtype", None)
        if is_const or dtype not in self.DTYPES or not callable(getattr(arg, "data_ptr", None)):
            return self._lib.native_specialize_impl(backend, arg, is_const, specialize_value, align)
        return "*" + dtype, ("D" if align and arg.data_ptr() % 16 == 0 else "")


def install_python_specializer(triton_lib) -> None:
    """Once per process: jax-triton's module reference to libtriton wrapped in
    `_PythonSpecializer` (a jax-triton without that reference is left as it is)."""
    with _lock:
        lib = getattr(triton_lib, "_triton", None)
        if lib is None or isinstance(lib, _PythonSpecializer) or not hasattr(lib, "native_specialize_impl"):
            return
        triton_lib._triton = _PythonSpecializer(lib)
