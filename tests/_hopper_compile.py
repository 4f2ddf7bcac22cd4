"""Offline compilation of generated Triton plans for sm_90 on a host without a GPU: catches what
the interpreter accepts but the compiler rejects (or spills) before a GPU session spends time on
it. The compiles run in a subprocess (`run_offline`): the interpreter the other tests use patches
triton.language process-wide. Also nvcc's resource report of a kernels/cuda source
(`ptxas_report`) and the host build of its device code (`host_build`)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from bench._offline import OfflineUnavailable, compile_for_hopper  # noqa: F401 (run_offline's subprocess imports them here)
from bench._offline import cuobjdump, resource_usage, written_cubin


def stack_bytes(compiled):
    """The kernel's stack frame in bytes (spills) from the cuobjdump Triton ships, or None."""
    if not cuobjdump().is_file():
        return None
    with written_cubin(compiled) as fh:
        found = re.search(r"STACK:(\d+)", resource_usage(fh.name))
    return int(found.group(1)) if found else None


def run_offline(body: str, timeout: int = 600) -> list[str]:
    """Run `body` (Python with `compile_for_hopper` and `stack_bytes` in scope) in a subprocess
    without the interpreter; its printed lines, or a pytest skip where the offline API is missing."""
    pytest.importorskip("triton")
    code = ("import sys\n"
            f"sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})\n"
            "from _hopper_compile import OfflineUnavailable, compile_for_hopper, stack_bytes\n"
            "try:\n" + "".join(f"    {line}\n" for line in body.strip("\n").splitlines()) +
            "except OfflineUnavailable as err:\n"
            "    print('skip:', err)\n")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("skip:"):
        pytest.skip(done.stdout.strip())
    return done.stdout.splitlines()


def ptxas_report(source, out_dir) -> str:
    """nvcc 13's resource report (-Xptxas -v) of compiling the CUDA library source `source` for
    sm_90a as the library's build does (-c: the host pass too; a device-only -cubin skips it),
    the object written under `out_dir`; fails the test where nvcc fails."""
    import jax

    source = pathlib.Path(source)
    cmd = ["nvcc", "-std=c++17", "-O3", "-arch=sm_90a", "-c", "-Xptxas", "-v", f"-I{jax.ffi.include_dir()}",
           f"-I{source.parent}", "-o", str(pathlib.Path(out_dir) / (source.stem + ".o")), str(source)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)  # conv_contract.cu: 15-19 min on 2 cores beside other compiles
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


def ptxas_entries(report: str, mangled: str) -> list[tuple]:
    """Per entry function in a `ptxas_report` whose mangled name contains the regex `mangled`
    (its groups: the template arguments), those groups followed by its spill stores and loads
    (bytes, as strings), in the report's order."""
    return re.findall(r"Compiling entry function '\S*" + mangled
                      + r"[^\n]*\n(?:[^\n]*\n)*?[^\n]*?(\d+) bytes spill stores, (\d+) bytes spill loads", report)


def row_loop_moves(obj, mangled: str) -> dict[tuple, tuple[int, int]]:
    """Per kernel of the compiled object `obj` whose mangled name contains the regex `mangled` (its
    groups: the template arguments): (register moves, instructions) of its largest loop, the row
    loop, in SASS (bench.sass_loop). Skips the calling test, saying why, without cuobjdump."""
    from bench import sass_loop

    tool, why = sass_loop.find_cuobjdump()
    if tool is None:
        pytest.skip(why)
    out = {}
    for name, instructions in sass_loop.functions(sass_loop.disassemble(obj, tool)).items():
        m = re.search(mangled, name)
        loop = sass_loop.largest_loop(name, instructions) if m else None
        if loop is not None:
            out[m.groups()] = (loop.moves(), len(loop.instructions))
    return out


def host_build(source, harness, out_dir, replace=()) -> pathlib.Path:
    """The device code of the kernels/cuda source `source` (between its "// ---- device code" and
    "// ---- host side" lines), each (old, new, count) of `replace` substituted (old found exactly
    count times), compiled by g++ with the host harness `harness` (a tests/*_host.cpp on
    tests/cuda_host.h): the executable. Skips where g++ is missing."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed (the host build of the CUDA kernels' device code)")
    src = pathlib.Path(source).read_text()
    device = src[src.index("// ---- device code"): src.index("// ---- host side")]
    for old, new, count in replace:
        assert device.count(old) == count, (old, device.count(old))
        device = device.replace(old, new)
    out_dir = pathlib.Path(out_dir)
    (out_dir / "device.inc").write_text(device)
    exe = out_dir / pathlib.Path(harness).stem
    cmd = ["g++", "-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
           f'-DGJ_DEVICE_CODE="{out_dir / "device.inc"}"', str(harness), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe
