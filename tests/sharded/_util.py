"""Helpers of the sharded cases: meshes over simulated CPU devices, halo counting, comparisons.

These modules run in a subprocess started by tests/test_sharding.py with
XLA_FLAGS=--xla_force_host_platform_device_count=4 (the flag must be set before jax starts).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from kernels import _sharding

from conftest import rel_l2

TOL = 1e-5  # same algorithm on both sides: only the summation order differs


def require_devices(n: int) -> None:
    if jax.device_count() < n:
        raise RuntimeError(
            f"these cases need {n} devices, jax sees {jax.device_count()}: run them through "
            "tests/test_sharding.py (it sets XLA_FLAGS=--xla_force_host_platform_device_count=4)"
        )


def mesh(shape: tuple[int, ...], names: tuple[str, ...], explicit: bool = False):
    require_devices(int(np.prod(shape)))
    kind = AxisType.Explicit if explicit else AxisType.Auto
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape), devices=devices)


class HaloSpy:
    """Counts halo exchanges traced: proves a run went through the sharded path (a stale jit
    trace, or a layer that bypassed the sharded path, would give the right numbers through XLA's own partitioning)."""

    def __init__(self) -> None:
        self.calls = 0
        self._plain = _sharding.exchange_halos

    def __enter__(self) -> "HaloSpy":
        def counting(*args, **kwargs):
            self.calls += 1
            return self._plain(*args, **kwargs)

        _sharding.exchange_halos = counting
        return self

    def __exit__(self, *exc) -> None:
        _sharding.exchange_halos = self._plain


def check_close(actual, expected, what: str, tol: float = TOL, whole: bool = False) -> None:
    """Every array leaf of `actual` matches `expected` in relative L2.

    whole: measure each leaf's error against the norm of all of `expected` (for gradients of deep
    models, where some leaves are analytically zero and hold only rounding noise).
    """
    a_leaves = jax.tree_util.tree_leaves(eqx.filter(actual, eqx.is_array))
    e_leaves = jax.tree_util.tree_leaves(eqx.filter(expected, eqx.is_array))
    assert len(a_leaves) == len(e_leaves) > 0, what
    assert any(np.any(np.asarray(e)) for e in e_leaves), f"{what}: all zeros proves nothing"
    scale = np.sqrt(sum(np.sum(np.asarray(e, np.float64) ** 2) for e in e_leaves))
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        assert a.shape == e.shape, (what, i, a.shape, e.shape)
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        if whole:
            err = float(np.linalg.norm(a - e) / scale)
        elif not np.any(e):  # e.g. the gradient of a layer's fixed filter bank
            assert not np.any(a), f"{what}: leaf {i} should be zero"
            continue
        else:
            err = rel_l2(a, e)
        assert err <= tol, f"{what}: leaf {i} of shape {a.shape} differs by rel. L2 {err:.2e}"


def weighted_sum(tree) -> jax.Array:
    """A scalar that weighs every output entry differently (so each gradient entry matters)."""
    total = jnp.zeros((), jnp.float32)
    for i, leaf in enumerate(jax.tree_util.tree_leaves(tree)):
        w = jnp.cos(0.7 * jnp.arange(leaf.size, dtype=leaf.dtype) + i).reshape(leaf.shape)
        total = total + jnp.sum(w * jnp.sin(leaf))
    return total


def hlo_text(fn, *args) -> str:
    """The compiled HLO of fn(*args); modules' non-array leaves (a layer's FilterBank) stay static."""
    arrays, static = eqx.partition(args, eqx.is_array)
    return jax.jit(lambda a: fn(*eqx.combine(a, static))).lower(arrays).compile().as_text()
