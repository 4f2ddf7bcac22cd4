"""An on-disk cache of the PTX our Triton kernels compile to, opt-in: GINJAX_TRITON_CACHE_DIR=DIR.

Why: a process's first model step spends 24-28 s compiling the Triton kernels that every model
shares (bench/NOTES.md, "Session 33": the compile split), and JAX's persistent compilation cache
cannot spare it, since its key is the lowered program, which lowering builds by compiling them.

What is cached: jax-triton's TTIR -> PTX step (`triton_lib.compile_ttir_inplace`, the expensive
part; the AST -> TTIR before it takes milliseconds), which kernels/triton/_compile.py wraps with
`cached_compile` where the variable is set. The key is a SHA-256 of the TTIR text, the
backend options, the compute capability, the platform and the Triton and jax-triton versions:
equal keys give equal PTX. A hit skips the compile; jax-triton then builds jaxlib's kernel object
from the cached PTX, name and shared-memory size exactly as after a compile. Entries are written
whole (a temporary file renamed into place), so concurrent processes never read half an entry;
an unreadable entry counts as a miss.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import tempfile
import warnings
from typing import Callable, Optional

CACHE_ENV = "GINJAX_TRITON_CACHE_DIR"


def cache_dir() -> Optional[pathlib.Path]:
    """$GINJAX_TRITON_CACHE_DIR as a path, or None (no cache) when unset or empty."""
    value = os.environ.get(CACHE_ENV, "")
    return pathlib.Path(value).expanduser() if value else None


def cache_key(ttir: str, options, compute_capability, platform: str, versions: tuple) -> str:
    text = "\n".join([ttir, repr(options), repr(compute_capability), platform, repr(versions)])
    return hashlib.sha256(text.encode()).hexdigest()


def cached_compile(compile_fn: Callable, result_type: type, directory: pathlib.Path, versions: tuple) -> Callable:
    """`compile_fn(ttir, backend, options, compute_capability, platform)` -> a result with
    `binary`, `name` and `shared_mem_bytes`, wrapped to read and write `directory`."""

    def compile_or_load(ttir, backend, options, compute_capability, platform):
        key = cache_key(str(ttir), options, compute_capability, platform, versions)
        path = directory / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
            return result_type(binary=entry["binary"], name=entry["name"],
                               shared_mem_bytes=int(entry["shared_mem_bytes"]), ttgir=None, llir=None)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        result = compile_fn(ttir, backend, options, compute_capability, platform)
        entry = {"binary": result.binary, "name": result.name, "shared_mem_bytes": int(result.shared_mem_bytes)}
        _write(directory, path, entry)
        return result

    return compile_or_load


_warned: set = set()  # the directories a failed write was reported for


def _write(directory: pathlib.Path, path: pathlib.Path, entry: dict) -> None:
    """`entry` as `path`, whole or not at all: a read-only or full disk costs the cache, not the
    compile (with one warning per directory)."""
    temporary = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as fh:
            temporary = fh.name
            json.dump(entry, fh)
        os.replace(temporary, path)
    except OSError as err:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        if directory not in _warned:
            _warned.add(directory)
            warnings.warn(f"`{CACHE_ENV}` (={os.environ.get(CACHE_ENV, '')!r}): cannot write the Triton compile "
                          f"cache there ({err}); compiling without it", RuntimeWarning, stacklevel=2)
