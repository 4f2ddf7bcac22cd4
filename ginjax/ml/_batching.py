"""Splitting MultiImages into mini-batches, and merging per-batch results back together."""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ginjax.geometric import MultiImage
from ginjax.ml._devices import resolve_devices, shard_batch


def _check_batch_size(batch_size: Any, n_samples: int, devices: Optional[tuple], what: str) -> None:
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(f"`batch_size` (={batch_size!r}) must be a positive int")
    if batch_size > n_samples:
        raise ValueError(
            f"`batch_size` (={batch_size}) is larger than the {n_samples} samples of {what}: "
            "not even one full batch fits (partial batches are dropped)"
        )
    if devices is not None and batch_size % len(devices):
        raise ValueError(
            f"`batch_size` (={batch_size}) must be divisible by the number of devices "
            f"(={len(devices)}) so that every device gets an equal share"
        )


def _common_length(multi_images: Sequence[Any], names: Optional[Sequence[str]] = None) -> int:
    names = names or [f"multi_images[{i}]" for i in range(len(multi_images))]
    for m, name in zip(multi_images, names):
        if not isinstance(m, MultiImage) or m.get_n_leading() < 1:
            what = type(m).__name__ if not isinstance(m, MultiImage) else "a MultiImage without a batch axis"
            raise ValueError(
                f"`{name}` (={what}) must be a geom.MultiImage with a leading batch axis "
                "(blocks (L, channels, *spatial, *tensor))"
            )
    lengths = [m.get_L() for m in multi_images]
    if len(set(lengths)) != 1:
        raise ValueError(f"the MultiImages to batch together have different lengths {lengths}")
    return lengths[0]


def _batch_order(n_samples: int, rand_key: Any) -> jax.Array:
    if rand_key is None:
        return jnp.arange(n_samples)
    return jax.random.permutation(rand_key, n_samples)


def get_batches(
    multi_images: Union[Sequence[Any], Any],
    batch_size: int,
    rand_key: Any,
    devices: Optional[Sequence[jax.Device]] = None,
) -> list[list[Any]]:
    """Split MultiImages that share a batch axis (typically `(X, Y)`) into the same mini-batches.

    Every sample lands in at most one batch per call; the last `L % batch_size` samples (in the
    chosen order) are dropped, as ginjax does, so all batches have the same shape.

    Args:
        multi_images: one MultiImage or a sequence of them, all of the same length L
        batch_size: samples per batch; must divide evenly over `devices`
        rand_key: PRNG key for a random order, or None for the stored order
        devices: devices to spread every batch over (data parallel); None keeps JAX's default
            device. Unlike ginjax 0.1.8 no device axis is added: a batch stays (batch, ...).

    Returns:
        one list of batches per input MultiImage
    """
    single = not isinstance(multi_images, (tuple, list))
    multi_images = [multi_images] if single else list(multi_images)
    if not multi_images:
        raise ValueError("`multi_images` is empty: pass a MultiImage or a sequence of them")
    devices = resolve_devices(devices)
    n_samples = _common_length(multi_images)
    _check_batch_size(batch_size, n_samples, devices, "the data")

    order = _batch_order(n_samples, rand_key)
    batches: list[list[Any]] = [[] for _ in multi_images]
    for start in range(0, n_samples - batch_size + 1, batch_size):
        idxs = order[start : start + batch_size]
        for out, multi_image in zip(batches, multi_images):
            out.append(shard_batch(multi_image.get_subset(idxs), devices))
    return batches


class MultiImageDataset:
    """Map-style dataset over in-memory X and Y for a batch-sampling DataLoader.

    `dataset[idxs]` with a list of indices returns the batch `(X[idxs], Y[idxs])`, spread over
    `devices` when `use_devices` is set. Works with a torch `DataLoader(dataset,
    sampler=BatchSampler(...), collate_fn=lambda b: b[0])`, but torch is not needed.

    Args:
        X: inputs, blocks (L, channels, *spatial, *tensor)
        Y: targets, same length L
        devices: devices to spread each batch over; None keeps JAX's default device
        use_devices: whether to place batches on `devices`
    """

    def __init__(
        self,
        X: Any,
        Y: Any,
        devices: Optional[Sequence[jax.Device]] = None,
        use_devices: bool = True,
    ) -> None:
        _common_length([X, Y], ["X", "Y"])
        self.D = X.D
        self.X = X
        self.Y = Y
        self.devices = resolve_devices(devices)
        self.use_devices = use_devices

    def __len__(self) -> int:
        return self.X.get_L()

    def __getitem__(self, idx: Any) -> tuple[Any, Any]:
        idxs = jnp.atleast_1d(jnp.asarray(idx))
        X_batch, Y_batch = self.X.get_subset(idxs), self.Y.get_subset(idxs)
        if self.use_devices:
            X_batch = shard_batch(X_batch, self.devices, "X batch")
            Y_batch = shard_batch(Y_batch, self.devices, "Y batch")
        return X_batch, Y_batch

    def get_N(self) -> int:
        return self.X.get_spatial_dims()[0]


class EpochBatches:
    """A re-iterable over (X_batch, Y_batch) pairs: each pass is one epoch. With a key the order
    is reshuffled every pass (the key is split once per epoch), otherwise it is the stored order."""

    def __init__(
        self, X: Any, Y: Any, batch_size: int, rand_key: Any, devices: Optional[tuple], what: str
    ) -> None:
        self.X, self.Y = X, Y
        y_name = {"X": "Y", "x": "y", "validation_X": "validation_Y"}.get(what, "Y")
        self.n_samples = _common_length([X, Y], [what, y_name])
        _check_batch_size(batch_size, self.n_samples, devices, what)
        self.batch_size = batch_size
        self.rand_key = rand_key
        self.devices = devices

    def __len__(self) -> int:
        return self.n_samples // self.batch_size

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        epoch_key = None
        if self.rand_key is not None:
            self.rand_key, epoch_key = jax.random.split(self.rand_key)
        order = _batch_order(self.n_samples, epoch_key)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            idxs = order[start : start + self.batch_size]
            yield (
                shard_batch(self.X.get_subset(idxs), self.devices),
                shard_batch(self.Y.get_subset(idxs), self.devices),
            )


def loss_reducer(ls: Sequence[jax.Array]) -> jax.Array:
    """The mean of per-batch losses (elementwise, so vector losses stay vectors)."""
    if len(ls) == 0:
        raise ValueError("loss_reducer: `ls` is empty, there are no losses to average")
    return jnp.mean(jnp.stack(list(ls)), axis=0)


def multi_image_reducer(ls: Sequence[Any]) -> Any:
    """Concatenate per-batch MultiImages along the batch axis."""
    if len(ls) == 0:
        raise ValueError("multi_image_reducer: `ls` is empty, there are no MultiImages to merge")
    return functools.reduce(lambda merged, part: merged.concat(part), ls, ls[0].empty())
