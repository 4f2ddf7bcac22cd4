"""The ConvContract configurations a step really runs, found by tracing it.

    uses = conv_configs(step_fn, *args, batch=4)       # [LayerUse], one per distinct configuration

Tracing (`jax.eval_shape`, nothing is computed) runs the step with `kernels.conv_contract` wrapped:
every call records its ConvSpec, spatial size and dtype. A model applies its layers to unbatched
blocks under `jax.vmap`, so the batch is not visible at the call: pass it. Calls that name a backend
themselves (not 'auto') are not `auto`'s to choose and are left out.

`signature(spec, spatial, dtype)` is the exact key `auto`'s measured table (kernels/_measured.py)
looks configurations up by; `layer_function` builds the vmapped layer (forward, or value_and_grad
of a linear loss) on one backend, batched as in the model, for `python -m bench measure-auto`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

import kernels
from kernels._measured import signature


@dataclasses.dataclass
class LayerUse:
    """One distinct ConvContract configuration of a step and how often the step runs it."""

    spec: kernels.ConvSpec
    spatial: tuple[int, ...]
    dtype: str
    batch: int
    counts: dict = dataclasses.field(default_factory=dict)  # step name -> calls per step

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(self.counts)

    @property
    def weight(self) -> float:
        """Dense-equivalent FLOPs of all its calls: what measuring it first is worth."""
        return self.count * self.batch * self.spec.dense_flops(self.spatial)

    @property
    def signature(self) -> str:
        return signature(self.spec, self.spatial, self.dtype)

    def describe(self) -> str:
        spec = self.spec
        keys = lambda ks: "+".join(f"{c}x{spec.D}^{k}" if k else f"{c}" for k, _, c in ks)  # noqa: E731
        geometry = []
        if any(s != 1 for s in spec.stride):
            geometry.append(f"stride {spec.stride[0]}")
        if any(d != 1 for d in spec.lhs_dilation):
            geometry.append(f"lhs_dilation {spec.lhs_dilation[0]}")
        if any(d != 1 for d in spec.rhs_dilation):
            geometry.append(f"dilation {spec.rhs_dilation[0]}")
        return (
            f"D={spec.D} N={'x'.join(map(str, self.spatial))} B={self.batch} {keys(spec.in_keys)} -> {keys(spec.out_keys)} "
            f"(Cin {spec.cin}, Cout {spec.cout}) M={spec.filter_shape[0]}" + (f" {', '.join(geometry)}" if geometry else "")
            + f" {self.dtype} x{self.count}"
        )


@contextlib.contextmanager
def recording():
    """Within the block, calls of kernels.conv_contract with backend None/'auto' are appended to
    the yielded list as (spec, spatial, dtype)."""
    calls: list = []
    original = kernels.conv_contract

    def wrapped(spec, inputs, weights, *, backend=None, precision=None, **kwargs):
        if backend in (None, "auto"):
            first = inputs[0]
            k0 = spec.in_keys[0][0]
            spatial = tuple(int(n) for n in first.shape[first.ndim - k0 - spec.D : first.ndim - k0])
            # the bias is measured with the layer's convolution elsewhere; the exact key ignores it
            calls.append((spec.without_bias(), spatial, str(jnp.dtype(first.dtype))))
        return original(spec, inputs, weights, backend=backend, precision=precision, **kwargs)

    kernels.conv_contract = wrapped
    try:
        yield calls
    finally:
        kernels.conv_contract = original


def conv_configs(fn: Callable, *args: Any, batch: int, source: str = "step") -> list[LayerUse]:
    """The distinct ConvContract configurations of `fn(*args)`, in first-use order."""
    if batch < 1:
        raise ValueError(f"`batch` (={batch}) must be >= 1")
    from kernels.triton._compile import no_prefetch

    with recording() as calls, no_prefetch():  # traced only: no kernel compiles in the background
        # a fresh function: eval_shape caches traces by function, and a cached one calls nothing
        jax.eval_shape(lambda *a: fn(*a), *args)
    uses: dict[str, LayerUse] = {}
    for spec, spatial, dtype in calls:
        use = LayerUse(spec, spatial, dtype, batch)
        use = uses.setdefault(use.signature, use)
        use.counts[source] = use.counts.get(source, 0) + 1
    return list(uses.values())


def merge(groups: list[list[LayerUse]]) -> list[LayerUse]:
    """One LayerUse per (signature, batch) over several steps; counts add up, sources collect."""
    out: dict[tuple[str, int], LayerUse] = {}
    for uses in groups:
        for use in uses:
            key = (use.signature, use.batch)
            merged = out.setdefault(key, dataclasses.replace(use, counts={}))
            for source, n in use.counts.items():
                merged.counts[source] = merged.counts.get(source, 0) + n
    return list(out.values())


def layer_function(use: LayerUse, backend: str, mode: str, seed: int = 0) -> tuple[Callable, tuple]:
    """(f, args) of one configuration on `backend`, vmapped over `use.batch`: `fwd` is the layer,
    `fwd_bwd` value_and_grad of <layer(x, w), cotangent> w.r.t. inputs and weights."""
    from bench import _cases

    if mode not in ("fwd", "fwd_bwd"):
        raise ValueError(f"`mode` (={mode!r}) must be 'fwd' or 'fwd_bwd'")
    spec = use.spec
    xs, ws, cots = _cases.spec_operands(spec, use.spatial, use.batch, seed, use.dtype)
    run = lambda x, w: kernels.conv_contract(spec, x, w, backend=backend)  # noqa: E731
    return _cases.layer_functions(run)[mode], (xs, ws, cots)


def runs_itself(use: LayerUse, backend: str) -> tuple[bool, str]:
    """Whether `backend` runs this configuration itself here (not by falling back), and why not."""
    try:
        choice = kernels.explain(use.spec, use.spatial, backend=backend)
    except ValueError as err:
        return False, str(err)
    return choice.backend == backend, choice.reason


def model_uses(config_names, *, on: Optional[str] = None) -> list[LayerUse]:
    """conv_configs of the `step` of bench model configurations, merged; a name of
    `_configs.AUTO_LAYER_GRID` is its one layer (the standard keys and invariant filters)."""
    from bench import _cases, _configs

    groups = []
    for name in config_names:
        grid = _configs.AUTO_LAYER_GRID.get(name)
        if grid is not None:
            groups.append([LayerUse(_cases.fixture_spec(grid), grid.spatial, "float32", grid.B, {name: 1})])
            continue
        cfg = _configs.CONFIGS[name]
        if cfg.kind != "model":
            raise ValueError(f"`configs` (={name!r}) must name model configurations or layers of the CPU grid")
        fn, args = _cases.build_case(cfg).function("step")
        groups.append(conv_configs(fn, *args, batch=cfg.B, source=name))
    return merge(groups)
