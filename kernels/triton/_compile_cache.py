"""An on-disk cache of the PTX our Triton kernels compile to: GINJAX_TRITON_CACHE_DIR=DIR (default
`$XDG_CACHE_HOME/ginjax/triton`, else `~/.cache/ginjax/triton`; "off" turns it off).

Why: a process's first model step spends 24-28 s compiling the Triton kernels that every model
shares (bench/NOTES.md, "Session 33": the compile split), and JAX's persistent compilation cache
cannot spare it, since its key is the lowered program, which lowering builds by compiling them.

What is cached: jax-triton's TTIR -> PTX step (`triton_lib.compile_ttir_inplace`, the expensive
part: 3-4.5 s for a thin layer's forward offline, against 0.1-0.2 s for the AST -> TTIR before it),
which kernels/triton/_compile.py wraps with `cached_compile`. The key is a SHA-256 of the TTIR
text, the backend options, the compute capability, the platform and the Triton and jax-triton
versions: equal keys give equal PTX. The TTIR holds the kernel's name, so the generated names
must not change between processes (`ConvSpec.digest`, not `hash`, which Python salts per
process: until session 34 every ConvContract kernel missed). A hit skips the compile; jax-triton
then builds jaxlib's kernel object from the cached PTX, name and shared-memory size exactly as
after a compile. Entries are written whole (a temporary file renamed into place), so concurrent
processes never read half an entry; an unreadable entry counts as a miss, and an unwritable
directory costs the cache (one warning), not the compile.
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


OFF = ("off", "0", "none")  # GINJAX_TRITON_CACHE_DIR values that turn the cache off


def default_dir() -> Optional[pathlib.Path]:
    """$XDG_CACHE_HOME/ginjax/triton, else ~/.cache/ginjax/triton; None where there is no home
    directory to put it in (a container without HOME): then no cache, rather than a failed compile."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    try:
        return (pathlib.Path(base) if base else pathlib.Path("~/.cache").expanduser()) / "ginjax" / "triton"
    except RuntimeError:  # expanduser: "Could not determine home directory"
        return None


def cache_dir() -> Optional[pathlib.Path]:
    """$GINJAX_TRITON_CACHE_DIR as a path (unset or empty: `default_dir()`), or None (no cache)
    where it is one of OFF."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF:
        return None
    if not value:
        return default_dir()
    try:
        return pathlib.Path(value).expanduser()
    except RuntimeError:  # "~/..." with no home directory: the path as given
        return pathlib.Path(value)


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
