"""Data parallelism with jax.sharding: a batch is split along its first axis over a 1D device mesh,
the model and optimizer state are replicated, and jit (GSPMD) inserts the gradient all-reduce.
This replaces ginjax 0.1.8's pmap reshaping, so batches keep their plain (batch, ...) shape."""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_BATCH_AXIS = "batch"


def resolve_devices(devices: Optional[Sequence[jax.Device]]) -> Optional[tuple[jax.Device, ...]]:
    """Check a user's `devices` argument; None (one device, JAX's default) stays None."""
    if devices is None:
        return None
    if isinstance(devices, jax.Device):
        devices = [devices]
    devices = tuple(devices)
    if not devices:
        raise ValueError("`devices` (=[]) must name at least one device, or be None")
    for device in devices:
        if not isinstance(device, jax.Device):
            raise TypeError(f"`devices` must hold jax.Device objects, got {device!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"`devices` (={list(devices)}) names a device more than once")
    return devices


@functools.lru_cache(maxsize=None)
def _mesh(devices: tuple[jax.Device, ...]) -> Mesh:
    device_grid = np.empty(len(devices), dtype=object)
    device_grid[:] = devices
    return Mesh(device_grid, (_BATCH_AXIS,))


def batch_sharding(devices: tuple[jax.Device, ...]) -> NamedSharding:
    return NamedSharding(_mesh(devices), PartitionSpec(_BATCH_AXIS))


def replicated_sharding(devices: tuple[jax.Device, ...]) -> NamedSharding:
    return NamedSharding(_mesh(devices), PartitionSpec())


def _is_multi_image(tree: Any) -> bool:
    return all(hasattr(tree, name) for name in ("items", "empty", "append", "get_L"))


def _map_batch_blocks(tree: Any, fn) -> Any:
    """Apply `fn` to every array with a leading batch axis: a MultiImage's blocks (its other
    fields, such as a metric tensor, have no batch axis) or the array leaves of any other pytree."""
    if _is_multi_image(tree):
        out = tree.empty()
        for (k, parity), block in tree.items():
            out.append(k, parity, fn(block))
        return out
    if isinstance(tree, (tuple, list)) and any(_is_multi_image(t) for t in tree):
        return type(tree)(_map_batch_blocks(t, fn) for t in tree)
    return jax.tree.map(lambda leaf: fn(leaf) if eqx.is_array(leaf) else leaf, tree)


def shard_batch(tree: Any, devices: Optional[tuple[jax.Device, ...]], what: str = "batch") -> Any:
    """Split `tree`'s batch axis over `devices`; with `devices` None it is returned unchanged."""
    if devices is None:
        return tree
    sharding = batch_sharding(devices)

    def put(block):
        if block.ndim == 0 or block.shape[0] % len(devices):
            raise ValueError(
                f"the {what} has a leading axis of {block.shape[:1]} samples, which must divide "
                f"evenly over the {len(devices)} devices in `devices`"
            )
        return jax.device_put(block, sharding)

    return _map_batch_blocks(tree, put)


def replicate(tree: Any, devices: Optional[tuple[jax.Device, ...]]) -> Any:
    """Place a full copy of every array leaf of `tree` on each of `devices`."""
    if devices is None or tree is None:
        return tree
    sharding = replicated_sharding(devices)
    return jax.tree.map(
        lambda leaf: jax.device_put(leaf, sharding) if eqx.is_array(leaf) else leaf, tree
    )
