"""The opt-in on-disk cache of our Triton kernels' PTX (kernels/triton/_compile_cache.py), around a
stand-in for jax-triton's TTIR -> PTX step (jax-triton runs on a GPU machine only); the GPU tests
and a bench run with GINJAX_TRITON_CACHE_DIR set check it there."""

from __future__ import annotations

import dataclasses
import types
import warnings

import pytest

from kernels.triton import _compile_cache


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


def _compile(lib, ttir="module @a {}", options="opts(num_warps=4)", cc=90):
    return lib.compile_ttir_inplace(ttir, "backend", options, cc, "cuda")


def test_off_without_the_variable(monkeypatch, tmp_path):
    monkeypatch.delenv(_compile_cache.CACHE_ENV, raising=False)
    lib, calls = _stand_in()
    real = lib.compile_ttir_inplace
    with _compile_cache.around(lib, ("3.6.0", "0.3.1")):
        assert lib.compile_ttir_inplace is real
        _compile(lib)
        _compile(lib)
    assert len(calls) == 2 and not any(tmp_path.iterdir())
    monkeypatch.setenv(_compile_cache.CACHE_ENV, "")
    assert _compile_cache.cache_dir() is None


def test_a_second_process_loads_what_the_first_compiled(monkeypatch, tmp_path):
    """The first block compiles and writes one entry; a later block (the module's function
    restored in between, as in a new process) returns the same PTX, name and shared-memory size
    without compiling. Another TTIR, options, GPU or Triton version is a miss."""
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(tmp_path / "cache"))
    lib, calls = _stand_in()
    real = lib.compile_ttir_inplace
    with _compile_cache.around(lib, ("3.6.0", "0.3.1")):
        first = _compile(lib)
    assert lib.compile_ttir_inplace is real and len(calls) == 1
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".json"
    with _compile_cache.around(lib, ("3.6.0", "0.3.1")):
        again = _compile(lib)
    assert len(calls) == 1
    assert (again.binary, again.name, again.shared_mem_bytes) == (first.binary, first.name, first.shared_mem_bytes)
    assert again.ttgir is None and again.llir is None
    with _compile_cache.around(lib, ("3.6.0", "0.3.1")):
        _compile(lib, ttir="module @b {}")
        _compile(lib, options="opts(num_warps=8)")
        _compile(lib, cc=100)
    with _compile_cache.around(lib, ("3.7.0", "0.3.1")):
        _compile(lib)
    assert len(calls) == 5 and len(list((tmp_path / "cache").glob("*.json"))) == 5
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_damaged_entry_is_compiled_again_and_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(tmp_path))
    lib, calls = _stand_in()
    with _compile_cache.around(lib, ("v",)):
        first = _compile(lib)
    (entry,) = tmp_path.glob("*.json")
    entry.write_text('{"binary": "half an ent')
    with _compile_cache.around(lib, ("v",)):
        again = _compile(lib)
    assert len(calls) == 2 and again.binary == first.binary
    with _compile_cache.around(lib, ("v",)):
        _compile(lib)
    assert len(calls) == 2  # the rewritten entry is whole


def test_an_unwritable_file_costs_the_cache_not_the_compile(monkeypatch, tmp_path):
    """The cache path is a file, not a directory: every write fails, the compile still answers."""
    blocker = tmp_path / "cache"
    blocker.write_text("not a directory")
    monkeypatch.setenv(_compile_cache.CACHE_ENV, str(blocker))
    lib, calls = _stand_in()
    with _compile_cache.around(lib, ("v",)):
        with pytest.warns(RuntimeWarning, match=r"`GINJAX_TRITON_CACHE_DIR` \(='.*cache'\): cannot write"):
            assert _compile(lib).binary.startswith("// ptx")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once per directory
            assert _compile(lib).binary.startswith("// ptx")
    assert len(calls) == 2 and blocker.read_text() == "not a directory"


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
