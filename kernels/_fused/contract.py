"""The launcher contract every fused backend keeps.

Entry point: `conv_contract_<backend>(spec, inputs, weights, *, precision=None,
block_sizes=None, ...)` on unbatched blocks. Tiling: a frozen `BlockSizes` dataclass per backend
(in its `_tiling` module) with `BlockSizes.for_layer(spec, spatial)`, the tiling used when none
is given, and `.validate(D)`, which raises a ValueError naming the bad field. Backends built as
XLA FFI libraries (`native`, `cuda`) report their availability and refuse to run unbuilt in one
way: `ffi_availability`, `require_registered`.
"""

from __future__ import annotations

from typing import Callable

import jax

from .._spec import ConvSpec


def resolve_block_sizes(block_sizes, cls: type, spec: ConvSpec, spatial: tuple[int, ...]):
    """The tiling of one call: `block_sizes`, or `cls.for_layer(spec, spatial)` when it is None;
    checked to be a `cls` and validated."""
    blocks = cls.for_layer(spec, spatial) if block_sizes is None else block_sizes
    if not isinstance(blocks, cls):
        raise ValueError(f"`block_sizes` (={block_sizes!r}) must be a {cls.__module__.rsplit('._', 1)[0]}.BlockSizes or None")
    blocks.validate(spec.D)
    return blocks


def ffi_availability(registered: Callable[[], tuple[bool, str]], platform: str, runs_on: str, what: str) -> tuple[bool, str]:
    """(ok, why) of an XLA FFI backend: its library loaded and registered (`registered()` says
    why not), and JAX's default backend `platform` ("cpu", "gpu"); `runs_on` names that platform
    in the reason, `what` describes the backend when it can run."""
    ok, why = registered()
    if not ok:
        return False, why
    if jax.default_backend() != platform:
        return False, f"runs on {runs_on}; JAX's default backend here is {jax.default_backend()!r}"
    return True, what


def require_registered(registered: Callable[[], tuple[bool, str]], backend: str) -> None:
    """Raise a ValueError saying why `backend` cannot run unless its FFI library is registered."""
    ok, why = registered()
    if not ok:
        raise ValueError(f"ConvContract backend {backend!r} cannot run here: {why}")
