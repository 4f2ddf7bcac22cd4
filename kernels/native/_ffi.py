"""Loading the compiled module and registering its XLA FFI targets (once, for the CPU)."""

from __future__ import annotations

import functools
import importlib

import jax


@functools.lru_cache(maxsize=None)
def registered() -> tuple[bool, str]:
    """Import kernels.native._ginjax_native and register its targets; (ok, why not)."""
    try:
        module = importlib.import_module("kernels.native._ginjax_native")
    except ImportError as err:
        return False, (
            f"the compiled module kernels.native._ginjax_native is not built ({err}); "
            "`pip install -e .` builds it (needs a C++17 compiler)"
        )
    for name, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return True, ""
