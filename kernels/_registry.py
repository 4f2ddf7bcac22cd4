"""Backend registry and selection.

Selection order: the `backend` argument, then `use_backend(...)` context, then the environment
variable GINJAX_BACKEND, then "auto". "auto" takes, among the registered backends that can run
here and cover the configuration, the fastest one measured on this device kind
(kernels/measured/, see _measured.py; on a CPU a backend's compile counts, spread over
_measured.CALLS_PER_COMPILE calls), else the one with the highest priority for the platform (on a
GPU with no table to rank by, a backend whose `unmeasured_caveat` names a structural cost for the
configuration comes after those without one). A named
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

from . import _bias, _measured
from ._env import thread_setting
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
        fused_bias: `run` takes a fifth argument, the bias (kernels._bias), and adds it itself
            as `spec.bias_modes` say, and a keyword `input_means` (the inputs' spatial means
            where their producer computed them, `kernels.conv_contract`'s); otherwise `run` gets
            a spec without bias modes and the registry adds the bias after it (`run_backend`).
        fused_residual: `run` takes a keyword `residual` (per output key None or an array of
            that output's shape, `kernels.conv_contract`'s) and adds it itself after the bias
            (with `fused_bias` only); otherwise the registry adds it after `run` (`run_backend`).
        describe: optional (spec, spatial) -> how the backend computes this configuration
            (e.g. "sub-pixel GEMM ..."), appended to `explain`'s reason; "" says nothing.
        unmeasured_caveat: optional (spec, spatial) -> why, on a GPU with no measured table
            to rank by, `auto` should rank this backend after those without a caveat for the
            configuration, whatever its priority (a structural cost that does not depend on the
            GPU); "" for none.
    """

    name: str
    run: RunFn
    availability: Callable[[], tuple[bool, str]]
    coverage: Callable[[ConvSpec, tuple, object], tuple[bool, str]]
    priority: dict
    fused_bias: bool = False
    fused_residual: bool = False
    describe: Optional[Callable[[ConvSpec, tuple], str]] = None
    unmeasured_caveat: Optional[Callable[[ConvSpec, tuple], str]] = None


_BACKENDS: dict[str, Backend] = {}
# how an error names where a backend name came from (see requested_backend)
_SOURCE_LABEL = {
    "argument": "`backend`",
    "use_backend()": "`use_backend` name",
    f"${ENV_VAR}": f"environment variable {ENV_VAR}",
}
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


def device_capability() -> str:
    """The first device's compute capability ("9.0" on Hopper), "" where it has none (a CPU)."""
    try:
        return str(getattr(jax.devices()[0], "compute_capability", "") or "")
    except RuntimeError:
        return ""


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ConvContract layers whose backend is "auto" use `name`."""
    if not isinstance(name, str):
        raise ValueError(f"`use_backend` name (={name!r}) must be a string")
    _check_name(name, "`use_backend` name")
    with thread_setting(_local, "forced", name):
        yield


def _check_name(name: str, source: str = "`backend`") -> None:
    """Raise a ValueError naming `source` (the argument or $GINJAX_BACKEND) unless `name` runs here."""
    if name == "auto":
        return
    if name not in _BACKENDS:
        raise ValueError(
            f"{source} (={name!r}) is not a ConvContract backend; registered: {sorted(_BACKENDS)}, "
            f"available here: {sorted(available_backends())} (or 'auto')"
        )
    ok, why = _BACKENDS[name].availability()
    if not ok:
        raise ValueError(
            f"{source} (={name!r}) names a ConvContract backend that cannot run here: {why}. "
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
        if not isinstance(backend, str):
            raise ValueError(f"`backend` (={backend!r}) must be a backend name (a string) or None")
        return backend, "argument"
    forced = getattr(_local, "forced", None)
    if forced is not None:
        return forced, "use_backend()"
    # shells and .env files leave stray spaces and capitals; the names are lower-case words
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        return env, f"${ENV_VAR}"
    return "auto", "default"


def traced_batch(x) -> Optional[int]:
    """The batch one call of the operation runs at: the product of the sizes of the vmap axes
    that `x` is traced under (None outside vmap). Models call the layer on one sample and vmap
    it, so the shapes alone do not say it; the batching tracers do (a private jax structure,
    read defensively: anything unexpected means unknown)."""
    try:
        from jax._src.interpreters import ad, batching
    except ImportError:  # pragma: no cover
        return None
    size, seen = 1, False
    for _ in range(64):  # nested transformations; bounded so a cycle cannot hang dispatch
        if isinstance(x, batching.BatchTracer):
            dim = getattr(x, "batch_dim", None)
            if type(dim) is int:
                size *= int(jax.numpy.shape(x.val)[dim])
                seen = True
            x = x.val
        elif isinstance(x, ad.JVPTracer):
            x = x.primal
        else:
            break
    return size if seen else None


def choose(spec: ConvSpec, spatial: tuple, dtype, backend: Optional[str] = None, batch: Optional[int] = None) -> Choice:
    """Pick the backend for one call (see the module docstring for the rules); `batch`: the
    batch the call runs at when known (`traced_batch`), which `auto`'s measured table may rank by."""
    choice = _choose(spec, spatial, dtype, backend, batch)
    describe = _BACKENDS[choice.backend].describe
    how = describe(spec, spatial) if describe is not None else ""
    if not how:
        return choice
    return dataclasses.replace(choice, reason=f"{choice.reason}; {choice.backend} runs it as {how}")


def _choose(spec: ConvSpec, spatial: tuple, dtype, backend: Optional[str], batch: Optional[int] = None) -> Choice:
    name, source = requested_backend(backend)
    _check_name(name, _SOURCE_LABEL.get(source, source))
    if name != "auto":
        ok, why = _BACKENDS[name].coverage(spec, spatial, dtype)
        if ok:
            return Choice(name, name, source, "requested, and it covers this configuration")
        return Choice(FALLBACK, name, source, f"{name!r} does not cover this configuration ({why}); using {FALLBACK!r}")
    plat = platform()
    # "cpu" on a CPU (kernels/measured/cpu.json); a GPU's own rows go over those of the table of
    # its compute capability (_measured.device_table)
    kind, table, stand_in = _measured.device_table(device_kind(), device_capability())
    dtype_name = str(jax.numpy.dtype(dtype)) if dtype is not None else None
    measured, rule = _measured.ranking(kind, spec, spatial, dtype_name, batch=batch, table=table) if table else ({}, "")
    untabled = plat == "gpu" and table is None
    checked: dict[str, tuple[bool, str]] = {}

    def runs(b: Backend) -> tuple[bool, str]:
        """(ok, why not): available here and covering the configuration, asked once per call."""
        if b.name not in checked:
            ok, why = b.availability()
            checked[b.name] = b.coverage(spec, spatial, dtype) if ok else (False, why)
        return checked[b.name]

    caveats = {}  # with no table on a GPU: backends ranked after the others here, and why
    if untabled and spatial is not None:
        for b in _BACKENDS.values():
            # asked only of a backend that could run the layer: a caveat may plan its kernels
            if b.unmeasured_caveat is not None and plat in b.priority and runs(b)[0]:
                if why := b.unmeasured_caveat(spec, tuple(spatial)):
                    caveats[b.name] = why
    # measured-fastest first; unmeasured backends after, by their priority, those with a caveat last
    ranked = sorted(
        (b for b in _BACKENDS.values() if plat in b.priority),
        key=lambda b: (measured.get(b.name, math.inf), b.name in caveats, -b.priority[plat]),
    )
    skipped = []
    for b in ranked:
        ok, why = runs(b)
        if not ok:
            skipped.append(f"{b.name}: {why}")
            continue
        if b.name in measured:
            reason = _measured_reason(kind, b.name, measured, rule) + (f" ({stand_in})" if stand_in else "")
        else:
            reason = f"highest-priority backend on {plat} that covers this configuration"
            passed = {n: why for n, why in caveats.items() if _BACKENDS[n].priority[plat] > b.priority[plat]}
            if passed:
                reason += " without a caveat (" + "; ".join(f"{n}: {why}" for n, why in passed.items()) + ")"
            if untabled:
                reason += (f" (no measured table for {kind or 'this device'} or its compute capability: "
                           "`python -m bench measure-auto` makes one)")
        if skipped:
            reason += " (skipped " + "; ".join(skipped) + ")"
        return Choice(b.name, "auto", source, reason)
    return Choice(FALLBACK, "auto", source, f"no ranked backend on {plat} covers it; using {FALLBACK!r}")


def _measured_reason(kind: str, name: str, measured: dict, rule: str) -> str:
    """Why the measured table put `name` first: its time, the others', and which rule matched."""
    if rule.startswith("nothing similar"):
        return f"no configuration like this one was measured on {kind}, so {name} (a fused backend only where measured faster)"
    others = ", ".join(f"{n} {ms} ms" for n, ms in sorted(measured.items(), key=lambda nm: nm[1]) if n != name)
    against = f" against {others}" if others else f" (no fused backend beat {_measured.BASELINE} on all of them)"
    mean = "; geometric means over them" if "similar" in rule or rule.startswith("exact match,") else ""
    unit = "ms per fwd_bwd call (compile included)" if _measured.COMPILE_RULE in rule else "ms fwd_bwd"
    return f"fastest measured on {kind} ({rule}{mean}): {measured[name]} {unit}{against}"


def get(name: str) -> Backend:
    return _BACKENDS[name]


def run_backend(name: str, spec: ConvSpec, inputs, weights, mode: str, bias=None, input_means=None,
                residual=None) -> tuple:
    """Run backend `name` on checked operands, the bias (checked against spec) included;
    `input_means` (checked: `_bias.check_given_means`) stand in for the inputs' own where the
    bias reads them; `residual` (checked: `_spec.check_residual`) is added to the outputs last."""
    backend = _BACKENDS[name]
    extra = {}
    if input_means is not None:
        extra["input_means"] = input_means
    if backend.fused_bias:
        if residual is not None and backend.fused_residual:
            extra["residual"], residual = residual, None
        outputs = tuple(backend.run(spec, inputs, weights, mode, _bias.check_bias(spec, bias), **extra))
    else:
        # the backend sees a spec without bias, so its caches do not split by bias mode
        outputs = tuple(backend.run(spec.without_bias(), inputs, weights, mode))
        if spec.has_bias:
            outputs = _bias.apply_bias(spec, inputs, weights, outputs, bias, input_means)
    return add_residual(outputs, residual)


def add_residual(outputs, residual) -> tuple:
    """Each output plus its residual where one is given (None: the outputs as they are)."""
    if residual is None:
        return tuple(outputs)
    return tuple(y if r is None else y + r for y, r in zip(outputs, residual))
