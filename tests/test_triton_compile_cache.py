"""How our Triton kernels compile (kernels/triton/_compile.py): the on-disk cache of their PTX
(kernels/triton/_compile_cache.py) and the worker threads, around a stand-in for jax-triton's
TTIR -> PTX step (jax-triton runs on a GPU machine only); the GPU tests and the bench's
compile-check stage check them there."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import threading
import time
import types
import warnings

import pytest

from kernels.triton import _compile, _compile_cache


@pytest.fixture(autouse=True)
def _no_user_cache(monkeypatch, tmp_path):
    """The cache is on by default (in the user's cache directory): these tests write only under
    their own temporary directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-default"))
    monkeypatch.setenv(_compile_cache.CACHE_ENV, "off")


@dataclasses.dataclass
class _Result:  # jax-triton's CompilationResult's fields
    binary: str
    name: str
    shared_mem_bytes: int
    ttgir: object
    llir: object


def _stand_in():
    """A module like jax_triton.triton_lib whose compile step counts its calls."""
    calls = []

    def compile_ttir_inplace(ttir, backend, options, compute_capability, platform):
        calls.append(str(ttir))
        return _Result(f"// ptx of {ttir} at {options} sm_{compute_capability}", f"kernel_{len(calls)}", 1024 * len(calls),
                       "ttgir", "llir")

    return types.SimpleNamespace(compile_ttir_inplace=compile_ttir_inplace, CompilationResult=_Result), calls


def _compile_with(step, ttir="module @a {}", options="opts(num_warps=4)", cc=90):
    return step(ttir, "backend", options, cc, "cuda")


def _cached(lib, directory, versions=("3.6.0", "0.3.1")):
    return _compile_cache.cached_compile(lib.compile_ttir_inplace, _Result, directory, versions)


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    """The first compile writes one entry; a later one (as in a new process) returns the same
    PTX, name and shared-memory size without compiling. Another TTIR, options, GPU or Triton
    version is a miss."""
    lib, calls = _stand_in()
    first = _compile_with(_cached(lib, tmp_path / "cache"))
    entries = list((tmp_path / "cache").iterdir())
    assert len(calls) == 1 and len(entries) == 1 and entries[0].suffix == ".json"
    again = _compile_with(_cached(lib, tmp_path / "cache"))
    assert len(calls) == 1
    assert (again.binary, again.name, again.shared_mem_bytes) == (first.binary, first.name, first.shared_mem_bytes)
    assert again.ttgir is None and again.llir is None
    step = _cached(lib, tmp_path / "cache")
    _compile_with(step, ttir="module @b {}")
    _compile_with(step, options="opts(num_warps=8)")
    _compile_with(step, cc=100)
    _compile_with(_cached(lib, tmp_path / "cache", ("3.7.0", "0.3.1")))
    assert len(calls) == 5 and len(list((tmp_path / "cache").glob("*.json"))) == 5
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_damaged_entry_is_compiled_again_and_replaced(tmp_path):
    lib, calls = _stand_in()
    first = _compile_with(_cached(lib, tmp_path))
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"binary": "half an ent')
    again = _compile_with(_cached(lib, tmp_path))
    assert len(calls) == 2 and again.binary == first.binary
    _compile_with(_cached(lib, tmp_path))
    assert len(calls) == 2  # the rewritten entry is whole


def test_an_unwritable_path_costs_the_cache_not_the_compile(monkeypatch, tmp_path):
    """The cache path is a file, not a directory: every write fails, the compile still answers,
    and a warning names the variable once."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(blocker))
    lib, calls = _stand_in()
    step = _cached(lib, _compile_cache.cache_dir())
    with pytest.warns(RuntimeWarning, match=r"`GINJAX_TRITON_CACHE_DIR` \(='.*cache'\): cannot write"):
        assert _compile_with(step).binary.startswith("// ptx")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per directory
        assert _compile_with(step).binary.startswith("// ptx")
    assert len(calls) == 2 and blocker.read_text() == "not a directory"


def test_the_installed_step_uses_the_cache_where_the_variable_says(monkeypatch, tmp_path):
    """`install_backend_step` wraps jax-triton's step once; the wrapper reads the variable at
    each compile: "off", it compiles and writes nothing; unset, it caches in the user's cache
    directory; set to a path, it caches there."""
    lib, calls = _stand_in()
    home, chosen = tmp_path / "xdg", tmp_path / "chosen"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setenv(_compile_cache.CACHE_ENV, "off")
    _compile.install_backend_step(lib, ("v",))
    step = lib.compile_ttir_inplace
    _compile.install_backend_step(lib, ("v",))
    assert lib.compile_ttir_inplace is step  # not wrapped twice
    _compile_with(step)
    _compile_with(step)
    assert len(calls) == 2 and not home.exists()
    monkeypatch.delenv(_compile_cache.CACHE_ENV)
    assert _compile_cache.cache_dir() == home / "ginjax" / "triton"
    _compile_with(step)
    _compile_with(step)
    assert len(calls) == 3 and len(list((home / "ginjax" / "triton").glob("*.json"))) == 1
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(chosen))
    _compile_with(step, ttir="module @b {}")
    _compile_with(step, ttir="module @b {}")
    assert len(calls) == 4 and len(list(chosen.glob("*.json"))) == 1
    for off in ("off", "0", "None", " OFF "):
        monkeypatch.setenv(_compile_cache.CACHE_ENV, off)
        assert _compile_cache.cache_dir() is None
    monkeypatch.setenv(_compile_cache.CACHE_ENV, "")
    assert _compile_cache.cache_dir() == home / "ginjax" / "triton"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _compile_cache.cache_dir() == pathlib.Path("~/.cache/ginjax/triton").expanduser()

    def homeless(self):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pathlib.Path, "expanduser", homeless)  # a container without HOME: no cache
    assert _compile_cache.cache_dir() is None
    _compile.install_backend_step(types.SimpleNamespace(), ("v",))  # a jax-triton without that step


def test_the_backend_step_runs_outside_the_front_end_lock():
    """A compile holds the front-end lock while jax-triton builds the TTIR and lets it go for the
    TTIR -> PTX step, so another thread's front end proceeds meanwhile; it holds it again after."""
    lib, _ = _stand_in()
    seen = []

    def real(ttir, backend, options, cc, platform):
        taken = _compile._frontend.acquire(blocking=False)
        seen.append(taken)
        if taken:
            _compile._frontend.release()
        return _Result("ptx", "k", 0, None, None)

    lib.compile_ttir_inplace = real
    _compile.install_backend_step(lib, ("v",))
    with _compile._frontend:
        _compile._local.frontend = True
        try:
            _compile_with(lib.compile_ttir_inplace)
            assert not _compile._frontend.acquire(blocking=False)  # held again
        finally:
            _compile._local.frontend = False
    assert seen == [True]


def test_compile_threads_are_read_from_the_variable(monkeypatch):
    monkeypatch.delenv(_compile.THREADS_ENV, raising=False)
    monkeypatch.setattr(_compile.os, "cpu_count", lambda: 64)
    assert _compile.compile_threads() == _compile.MAX_DEFAULT_THREADS == 16
    monkeypatch.setattr(_compile.os, "cpu_count", lambda: 2)
    assert _compile.compile_threads() == 2
    monkeypatch.setattr(_compile.os, "cpu_count", lambda: None)
    assert _compile.compile_threads() == 1
    monkeypatch.setenv(_compile.THREADS_ENV, "1")
    assert _compile.compile_threads() == 1
    monkeypatch.setenv(_compile.THREADS_ENV, "8")
    assert _compile.compile_threads() == 8
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv(_compile.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=rf"`GINJAX_TRITON_COMPILE_THREADS` \(='{bad}'\) must be an integer >= 1"):
            _compile.compile_threads()


def test_prefetched_kernels_compile_side_by_side_once_each(monkeypatch):
    """With 3 threads, three kernels prefetched as they are traced compile at once (0.3 s each,
    ~0.3 s in all); the lowering's `compiled_kernel` waits for each and compiles none again. A
    kernel never prefetched compiles in the caller; a failed compile raises there, every time."""
    monkeypatch.setenv(_compile.THREADS_ENV, "3")
    monkeypatch.setattr(_compile, "_pool", None)
    _compile.forget()
    calls, threads = [], set()

    def slow(plan, types_):
        calls.append(plan)
        threads.add(threading.current_thread().name)
        time.sleep(0.3)
        if plan == "broken":
            raise RuntimeError("TTIR->TTGIR pass failed!")
        return f"kernel {plan}", [True] * len(types_)

    monkeypatch.setattr(_compile, "_compile", slow)
    start = time.perf_counter()
    for plan in ("a", "b", "c"):
        _compile.prefetch(plan, ("*fp32",))
        _compile.prefetch(plan, ("*fp32",))  # traced twice (vmap): one compile
    got = [_compile.compiled_kernel(plan, ("*fp32",)) for plan in ("a", "b", "c")]
    assert time.perf_counter() - start < 0.75  # 0.9 s one after another
    assert got == [("kernel a", [True]), ("kernel b", [True]), ("kernel c", [True])]
    assert sorted(calls) == ["a", "b", "c"] and all(t.startswith("ginjax-triton-compile") for t in threads)
    assert _compile.compiled_kernel("d", ("*fp32",) * 2) == ("kernel d", [True, True])
    assert threading.current_thread().name in threads
    _compile.prefetch("broken", ("*fp32",))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="TTIR->TTGIR pass failed"):
            _compile.compiled_kernel("broken", ("*fp32",))
    assert calls.count("broken") == 1
    monkeypatch.setenv(_compile.THREADS_ENV, "1")
    _compile.prefetch("e", ("*fp32",))  # one thread: nothing starts early
    assert "e" not in calls
    _compile.forget()


def test_no_prefetch_holds_the_compiles_of_a_trace_that_is_never_lowered(monkeypatch):
    """Inside `no_prefetch` (bench/model_layers.py's eval_shape of a step) a traced kernel starts
    no compile; after it, and on another thread meanwhile, it does; nested blocks keep it off."""
    monkeypatch.setenv(_compile.THREADS_ENV, "2")
    monkeypatch.setattr(_compile, "_pool", None)
    _compile.forget()
    started = []
    monkeypatch.setattr(_compile, "_compile", lambda plan, types_: started.append(plan) or (plan, []))
    with _compile.no_prefetch():
        with _compile.no_prefetch():
            _compile.prefetch("inner", ("*fp32",))
        _compile.prefetch("outer", ("*fp32",))
        elsewhere = threading.Thread(target=_compile.prefetch, args=("other thread", ("*fp32",)))
        elsewhere.start()
        elsewhere.join()
    _compile.prefetch("after", ("*fp32",))
    assert _compile.compiled_kernel("after", ("*fp32",)) == ("after", [])
    assert _compile.compiled_kernel("other thread", ("*fp32",)) == ("other thread", [])
    assert sorted(started) == ["after", "other thread"]
    _compile.forget()


def test_listing_a_steps_layers_starts_no_compiles(monkeypatch):
    """bench/model_layers.conv_configs traces the step inside `no_prefetch`."""
    from bench import model_layers

    entered = []
    original = _compile.no_prefetch

    def recording():
        entered.append(True)
        return original()

    monkeypatch.setattr(_compile, "no_prefetch", recording)
    import jax.numpy as jnp

    assert model_layers.conv_configs(lambda x: x * 2, jnp.ones(3), batch=1) == []
    assert entered == [True]


_QUEUED_AT_EXIT = """
import time
from kernels.triton import _compile
def slow(plan, types_):
    time.sleep(1.0)
    return plan, []
_compile._compile = slow
for n in range(8):
    _compile.prefetch(f"k{n}", ("*fp32",))  # traced (eval_shape), never lowered
time.sleep(0.2)
print("done", flush=True)
"""


def test_a_process_exits_without_compiling_what_it_only_traced():
    """Eight 1 s compiles queued on 2 threads would hold the exit for 4 s; the queued ones are
    dropped at exit, and only the two running finish (~1 s)."""
    root = pathlib.Path(__file__).parent.parent
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _QUEUED_AT_EXIT], cwd=root, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **{_compile.THREADS_ENV: "2"}))
    took = time.perf_counter() - start
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-2000:]
    start = time.perf_counter()  # the same process's start and imports alone
    assert subprocess.run([sys.executable, "-c", "import kernels.triton._compile"], cwd=root, timeout=120).returncode == 0
    baseline = time.perf_counter() - start
    assert took < baseline + 0.2 + 2.0, (took, baseline)  # its 0.2 s sleep, and the running compiles' 1 s (+1 of slack)


_TTIR_OF_A_PLAN = """
import hashlib
from kernels.triton.channel_sums import plan_channel_sums

plan, _ = plan_channel_sums(16, 64**3, 3, 4, True, False, (True,), False, True)
compiled = compile_for_hopper(plan)
print("ttir", hashlib.sha256(compiled.asm["ttir"].encode()).hexdigest(), plan.name)
"""


def test_a_generated_kernels_ttir_is_the_same_in_another_process():
    """The cache's key holds the TTIR text: two processes compiling the same generated plan get
    the same text (the plan's pseudo file name is its own, no temporary path leaks in), so a
    second process hits what the first wrote."""
    from _hopper_compile import run_offline

    first, second = (run_offline(_TTIR_OF_A_PLAN, timeout=300) for _ in range(2))
    assert first == second and first[0].startswith("ttir "), (first, second)


_PLANS_OF_THE_STANDARD_LAYER = """
import hashlib
from kernels.triton import _backward, _kernel
from kernels.triton._tiling import BlockSizes
from bench import _cases, _configs
spec = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
fwd = _kernel.plan_kernel(spec, _kernel.Geometry((64,) * 3, (True, True), (False,) * 4), "tf32", BlockSizes())
units = _backward.weight_grad_units(spec, 4)[0]
dw = _kernel.plan_weight_grad_kernel(spec, _kernel.Geometry((64,) * 3, (True, True), (), (True, True)), "tf32",
                                     BlockSizes().for_weight_grad(3), 8, units)
for plan in (fwd, dw):
    print(plan.name, hashlib.sha256(plan.source.encode()).hexdigest())
"""


def test_a_layers_kernels_have_the_same_name_and_source_in_every_process():
    """The compile cache's key holds the TTIR, which holds the kernel's name: a name made from
    `hash(spec)` changed from one process to the next (Python salts str hashes), so every
    ConvContract kernel missed the cache a second process should have hit (H100, session 34:
    24.2 s of Triton compiles left in the warm run). Two processes with different hash seeds
    generate the same names and sources."""
    root = pathlib.Path(__file__).parent.parent
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run([sys.executable, "-c", _PLANS_OF_THE_STANDARD_LAYER], cwd=root, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, PYTHONHASHSEED=seed))
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout.split())
    assert len(outputs[0]) == 4 and outputs[0][0].startswith("conv_contract_fwd_"), outputs
    assert outputs[0][2].startswith("conv_contract_dw_"), outputs
    assert outputs[0] == outputs[1]


def _cuda_backend():
    """Triton's CUDA backend for sm_90 (needs no GPU) and libtriton, or a skip naming what is missing."""
    libtriton = pytest.importorskip("triton._C.libtriton", reason="needs triton")
    if not hasattr(libtriton, "native_specialize_impl"):
        pytest.skip("this triton has no native_specialize_impl (the function replaced here)")
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    return CUDABackend(GPUTarget("cuda", 90, 32)), libtriton


def test_the_python_specializer_answers_as_tritons_cpp():
    """For the arguments jax-triton's helper builds (pointers of every dtype, aligned or not, and
    its scalars, which it passes the same way with alignment 0), the Python answer is Triton's;
    anything else goes to the C++ function."""
    backend, libtriton = _cuda_backend()
    mine = _compile._PythonSpecializer(libtriton)
    for dtype in sorted(_compile._PythonSpecializer.DTYPES) + ["i1", "fp8e4nv"]:
        for pointer in (0, 8, 16, 32, 48, 4):
            for align in (True, False):
                arg = types.SimpleNamespace(data_ptr=lambda p=pointer: p, dtype=dtype)
                want = libtriton.native_specialize_impl(backend, arg, False, True, align)
                assert mine.native_specialize_impl(backend, arg, False, True, align) == tuple(want), (dtype, pointer, align)
    for other in (7, 2.5, None):  # not what jax-triton builds: Triton's own answer
        assert mine.native_specialize_impl(backend, other, False, True, True) == \
            libtriton.native_specialize_impl(backend, other, False, True, True)
    assert mine.ir is libtriton.ir  # everything else is libtriton's


def test_the_python_specializer_imports_no_torch():
    """The reason for it: Triton's C++ specializer (3.6, the GPU machine's) imports torch on its
    first call where torch is installed; the Python one imports nothing."""
    _cuda_backend()
    script = """
import sys, types
import triton._C.libtriton as libtriton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from kernels.triton._compile import _PythonSpecializer
backend = CUDABackend(GPUTarget("cuda", 90, 32))
arg = types.SimpleNamespace(data_ptr=lambda: 16, dtype="fp32")
assert "torch" not in sys.modules, "imported before the call"
spec = _PythonSpecializer(libtriton).native_specialize_impl
assert tuple(spec(backend, arg, False, True, True)) == ("*fp32", "D")
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=pathlib.Path(__file__).parents[1], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"  # with Triton's own in its place, 3.6 prints True here


def test_the_python_specializer_is_installed_once_and_only_where_it_fits():
    calls = []
    lib = types.SimpleNamespace(native_specialize_impl=lambda *a: calls.append(a) or ("*x", ""), ir="ir")
    triton_lib = types.SimpleNamespace(_triton=lib)
    _compile.install_python_specializer(triton_lib)
    wrapped = triton_lib._triton
    assert isinstance(wrapped, _compile._PythonSpecializer) and wrapped.ir == "ir"
    _compile.install_python_specializer(triton_lib)
    assert triton_lib._triton is wrapped  # not wrapped twice
    assert wrapped.native_specialize_impl(None, 3, False, True, True) == ("*x", "") and len(calls) == 1
    for without in (types.SimpleNamespace(), types.SimpleNamespace(_triton=types.SimpleNamespace(ir="ir"))):
        before = dict(vars(without))
        _compile.install_python_specializer(without)  # a jax-triton or triton of another shape: left alone
        assert vars(without) == before


def test_held_compiles_start_at_the_first_lowering_unless_superseded(monkeypatch):
    """`deferred_prefetch` holds what is traced under its key; `supersede` drops a key's held
    compiles; `eager_prefetch` starts them at once even inside a deferring block; the first
    `compiled_kernel` (a lowering) starts everything still held."""
    monkeypatch.setenv(_compile.THREADS_ENV, "2")
    monkeypatch.setattr(_compile, "_pool", None)
    _compile.forget()
    started = []
    monkeypatch.setattr(_compile, "_compile", lambda plan, types_: started.append(plan) or (f"kernel {plan}", []))
    with _compile.deferred_prefetch("op at (1, 8)"):
        _compile.prefetch("unbatched", ("*fp32",))
        with _compile.eager_prefetch():
            with _compile.deferred_prefetch("inner"):  # a vmap rule's own trace: not held
                _compile.prefetch("folded", ("*fp32",))
    with _compile.deferred_prefetch("never vmapped"):
        _compile.prefetch("alone", ("*fp32",))
    assert set(_compile._pending) == {"op at (1, 8)", "never vmapped"}
    _compile.supersede("op at (1, 8)")
    assert set(_compile._pending) == {"never vmapped"}
    assert _compile.compiled_kernel("folded", ("*fp32",)) == ("kernel folded", [])
    assert _compile.compiled_kernel("alone", ("*fp32",)) == ("kernel alone", [])
    assert not _compile._pending and sorted(started) == ["alone", "folded"]  # "unbatched" never compiled
    _compile.forget()


def _every_kernel_call(jaxpr) -> set:
    """The plan names of every Triton custom call in a jaxpr, sub-jaxprs included."""
    from conftest import jaxpr_equations

    return {e.params["plan"].name for e in jaxpr_equations(jaxpr) if e.primitive.name == "ginjax_triton_kernel_call"}


def test_a_vmapped_trace_starts_only_the_kernels_its_program_runs(monkeypatch):
    """A custom_vmap op's body is traced at the unbatched shapes first, and under vmap its rule
    traces it again at the folded batch: only the second trace's kernels are in the program.
    Traced as on a GPU (the interpreter's switch patched off; nothing is lowered or run): under
    vmap every compile started is one the program runs and nothing is left held (before this,
    the unbatched traces' kernels compiled too: half of them); without vmap nothing starts while
    tracing and the held compiles are the program's."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kernels
    from kernels.triton import _backward, _launch, _tiling, _vn_kernel, conv_contract_triton
    from kernels.triton import vector_neuron as vn
    from conftest import fixture_filters, invariant_pairs, random_operands

    for module in (_backward, _launch, _tiling, _vn_kernel, sys.modules["kernels.triton"]):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setenv(_compile.THREADS_ENV, "2")
    _compile.forget()
    started = []
    monkeypatch.setattr(_compile, "_submit", lambda plan, types_: started.append(plan.name))
    filters = fixture_filters(3, 3)
    ins = [(0, 0, 4), (1, 0, 4)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 4), (1, 0, 4)])
    spec = kernels.make_spec(3, ins, outs, pairs, True)
    xs, ws = random_operands(spec, (8,) * 3, 1, batch=2, dtype=np.float32)
    xs, ws = [jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws]
    w, block = jnp.ones((16, 16)), jnp.ones((2, 16, 8, 8, 8, 3))

    def conv(xs, ws):
        return sum(jnp.sum(o) for o in jax.vmap(lambda x: conv_contract_triton(spec, x, ws))(xs))

    def vector_neuron(w, block):
        return jnp.sum(jax.vmap(lambda b: vn.vector_neuron_triton(w, b, 3, jax.nn.gelu, 1e-5))(block))

    for f, args in ((conv, (xs, ws)), (vector_neuron, (w, block))):
        started.clear()
        program = _every_kernel_call(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(*args).jaxpr)
        assert program and set(started) == program, (sorted(started), sorted(program))
        assert not _compile._pending
    started.clear()
    unbatched = lambda w, b: jnp.sum(vn.vector_neuron_triton(w, b, 3, jax.nn.gelu, 1e-5))
    program = _every_kernel_call(jax.make_jaxpr(jax.grad(unbatched, argnums=(0, 1)))(w, block[0]).jaxpr)
    held = {plan.name for entries in _compile._pending.values() for plan, _ in entries}
    assert not started and held == program
    _compile.forget()
