"""Backend registry and selection.

Selection order: the `backend` argument, then `use_backend(...)` context, then the environment
variable GINJAX_BACKEND, then "auto". "auto" takes, among the registered backends that can run here and cover the
configuration, the fastest one measured on this GPU kind (kernels/measured/, see _measured.py),
else the one with the highest priority for the platform. A named
backend that cannot run on this machine raises ValueError; a named backend that runs here but
does not cover a configuration (say stride 2 on a fused kernel) falls back to `dense`, and
`explain` says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import threading
from typing import Callable, Optional, Sequence

import jax

from . import _measured
from ._spec import ConvSpec

ENV_VAR = "GINJAX_BACKEND"
FALLBACK = "dense"

# (spec, inputs, weights, precision) -> outputs
RunFn = Callable[[ConvSpec, Sequence[jax.Array], Sequence[jax.Array], str], tuple]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A ConvContract implementation.

    Attributes:
        name: registry key.
        run: the operation on unbatched blocks; must be differentiable and vmappable.
        availability: () -> (ok, reason): can it run on this machine at all.
        coverage: (spec, spatial, dtype) -> (ok, reason): does it cover this configuration.
        priority: platform ("cpu", "gpu", "tpu") -> rank for "auto"; higher wins, absent = never.
    """

    name: str
    run: RunFn
    availability: Callable[[], tuple[bool, str]]
    coverage: Callable[[ConvSpec, tuple, object], tuple[bool, str]]
    priority: dict


_BACKENDS: dict[str, Backend] = {}
_local = threading.local()


def register_backend(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def registered_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def available_backends() -> tuple[str, ...]:
    """The registered backends that can run on this machine."""
    return tuple(name for name, b in _BACKENDS.items() if b.availability()[0])


def platform() -> str:
    return jax.default_backend()


def device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except RuntimeError:  # no device initialised
        return ""


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ConvContract layers whose backend is "auto" use `name`."""
    _check_name(name)
    prev = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = prev


def _check_name(name: str) -> None:
    if name == "auto":
        return
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown ConvContract backend {name!r}; registered: {sorted(_BACKENDS)}, "
            f"available here: {sorted(available_backends())} (or 'auto')"
        )
    ok, why = _BACKENDS[name].availability()
    if not ok:
        raise ValueError(
            f"ConvContract backend {name!r} cannot run here: {why}. "
            f"Available here: {sorted(available_backends())} (or 'auto')"
        )


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which backend runs, the one asked for, and why."""

    backend: str
    requested: str
    source: str
    reason: str

    def __str__(self) -> str:
        return f"backend={self.backend!r} (requested {self.requested!r} via {self.source}): {self.reason}"


def requested_backend(backend: Optional[str]) -> tuple[str, str]:
    """The name asked for and where it came from."""
    if backend is not None and backend != "auto":
        return backend, "argument"
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced, "use_backend()"
    env = os.environ.get(ENV_VAR)
    if env:
        return env, f"${ENV_VAR}"
    return "auto", "default"


def choose(spec: ConvSpec, spatial: tuple, dtype, backend: Optional[str] = None) -> Choice:
    """Pick the backend for one call (see the module docstring for the rules)."""
    name, source = requested_backend(backend)
    _check_name(name)
    if name != "auto":
        ok, why = _BACKENDS[name].coverage(spec, spatial, dtype)
        if ok:
            return Choice(name, name, source, "requested, and it covers this configuration")
        return Choice(FALLBACK, name, source, f"{name!r} does not cover this configuration ({why}); using {FALLBACK!r}")
    plat = platform()
    kind = device_kind()  # "cpu" on a CPU: kernels/measured/cpu.json
    measured = _measured.measured_ms(kind, spec, spatial) if kind else {}
    # measured-fastest first; unmeasured backends after, by their priority
    ranked = sorted(
        (b for b in _BACKENDS.values() if plat in b.priority),
        key=lambda b: (measured.get(b.name, math.inf), -b.priority[plat]),
    )
    skipped = []
    for b in ranked:
        ok, why = b.availability()
        if not ok:
            skipped.append(f"{b.name}: {why}")
            continue
        ok, why = b.coverage(spec, spatial, dtype)
        if not ok:
            skipped.append(f"{b.name}: {why}")
            continue
        if b.name in measured:
            reason = f"fastest measured on {kind} for the nearest benchmarked configuration ({measured[b.name]} ms fwd_bwd)"
        else:
            reason = f"highest-priority backend on {plat} that covers this configuration"
        if skipped:
            reason += " (skipped " + "; ".join(skipped) + ")"
        return Choice(b.name, "auto", source, reason)
    return Choice(FALLBACK, "auto", source, f"no ranked backend on {plat} covers it; using {FALLBACK!r}")


def get(name: str) -> Backend:
    return _BACKENDS[name]
