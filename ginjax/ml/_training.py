"""Training and evaluation loops.

A `map_and_loss` is any callable `(model, x_batch, y_batch, aux_data) -> (loss, aux_data)`
(`Mapper` is one); for `return_map=True` it returns `(loss, aux_data, prediction)`. Batches are
plain (batch, ...) MultiImages; with `devices=` they are split over the devices and the model is
replicated, so one jitted step runs data parallel.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ginjax.ml._batching import EpochBatches, get_batches, loss_reducer, multi_image_reducer
from ginjax.ml._devices import replicate, resolve_devices, shard_batch
from ginjax.ml._progress import ProgressBar, import_wandb
from ginjax.ml._serialise import save
from ginjax.ml._stopping import StopCondition, needs_validation

MapAndLoss = Callable[..., Any]

# `save_model` checkpoints every this many epochs, as ginjax 0.1.8 does
_SAVE_EVERY = 10


def _inference_mode(model: Any) -> Any:
    switch = getattr(eqx.nn, "inference_mode", None) or getattr(eqx, "tree_inference")
    return switch(model, True)


def _trainable(model: Any) -> Any:
    # exactly the leaves filter_value_and_grad differentiates, so grads and params line up
    return eqx.filter(model, eqx.is_inexact_array)


@eqx.filter_jit
def _jit_train_step(map_and_loss, model, optim, opt_state, x, y, aux_data):
    value_and_grad = eqx.filter_value_and_grad(map_and_loss, has_aux=True)
    (loss, aux_data), grads = value_and_grad(model, x, y, aux_data)
    updates, opt_state = optim.update(grads, opt_state, _trainable(model))
    return eqx.apply_updates(model, updates), opt_state, loss, aux_data


@eqx.filter_jit
def _jit_map_and_loss(map_and_loss, model, x, y, aux_data):
    return map_and_loss(model, x, y, aux_data)


def train_step(
    map_and_loss: MapAndLoss,
    model: Any,
    optim: optax.GradientTransformation,
    opt_state: Any,
    x: Any,
    y: Any,
    aux_data: Optional[Any] = None,
) -> tuple[Any, Any, jax.Array, Optional[Any]]:
    """One jitted gradient step on the batch (x, y).

    If x and y are split over several devices (see `get_batches(devices=...)`) the model and
    `opt_state` must be replicated on them (as `train` does); the gradient is then the full
    batch's.

    Args:
        map_and_loss: `(model, x, y, aux_data) -> (scalar loss, aux_data)`
        model: the model; its floating-point array leaves are trained
        optim: an optax optimizer
        opt_state: its state, from `optim.init(eqx.filter(model, eqx.is_inexact_array))`
        x: the input batch
        y: the target batch
        aux_data: state for stateful layers (batch norm), passed through `map_and_loss`

    Returns:
        (model, opt_state, loss, aux_data) after the step
    """
    return _jit_train_step(map_and_loss, model, optim, opt_state, x, y, aux_data)


def evaluate(
    model: Any,
    map_and_loss: MapAndLoss,
    x: Any,
    y: Any,
    aux_data: Optional[Any] = None,
    return_map: bool = False,
) -> Any:
    """`map_and_loss` on one batch with the model in inference mode (jitted).

    Args:
        model: the model
        map_and_loss: `(model, x, y, aux_data) -> (loss, aux_data)`, or `-> (loss, aux_data,
            prediction)` when `return_map` is set
        x: the input batch
        y: the target batch
        aux_data: state for stateful layers
        return_map: also return the prediction

    Returns:
        the loss, or (loss, prediction)
    """
    outputs = _jit_map_and_loss(map_and_loss, _inference_mode(model), x, y, aux_data)
    expected = 3 if return_map else 2
    if not isinstance(outputs, tuple) or len(outputs) < expected:
        got = f"a tuple of {len(outputs)}" if isinstance(outputs, tuple) else type(outputs).__name__
        raise ValueError(
            f"`map_and_loss` must return (loss, aux_data{', prediction' if return_map else ''}) "
            f"with return_map={return_map}, but it returned {got}"
        )
    return (outputs[0], outputs[2]) if return_map else outputs[0]


def _check_finite(losses: list, epoch: int, validation: bool = False) -> None:
    """Stop training on a NaN/inf loss: continuing would return NaN parameters, or (with a
    loss-watching stop condition) silently the untrained model. One device sync per epoch."""
    finite = np.asarray(jnp.stack([jnp.all(jnp.isfinite(loss)) for loss in losses]))
    if finite.all():
        return
    first = int(np.argmin(finite))
    value = np.asarray(losses[first])
    where = "validation loss" if validation else f"training loss of batch {first + 1} of {len(losses)}"
    raise FloatingPointError(
        f"ml.train: the {where} in epoch {epoch} is {value} (not finite); training stopped "
        "instead of returning non-finite or untrained parameters. Check the data for NaN/inf, "
        "lower the learning rate, or clip gradients (optax.clip_by_global_norm)"
    )


def _unpack_batch(batch: Any, source: str) -> tuple[Any, Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(
            f"`{source}` must yield (X_batch, Y_batch) pairs, got {type(batch).__name__}"
        )
    return batch[0], batch[1]


def map_loss_in_batches_dl(
    map_and_loss: MapAndLoss,
    model: Any,
    dataloader: Iterable,
    aux_data: Optional[Any] = None,
    reduce: Optional[str] = "mean",
    devices: Optional[Sequence[jax.Device]] = None,
) -> jax.Array:
    """`evaluate` every (X_batch, Y_batch) of `dataloader` and combine the losses.

    Args:
        map_and_loss: `(model, x, y, aux_data) -> (loss, aux_data)`
        model: the model
        dataloader: any iterable of (X_batch, Y_batch) pairs
        aux_data: state for stateful layers
        reduce: "mean" averages the batch losses; None concatenates them (use a map_and_loss
            that returns per-sample losses)
        devices: devices to split each batch over

    Returns:
        the combined loss
    """
    if reduce not in ("mean", None):
        raise ValueError(f"`reduce` (={reduce!r}) must be 'mean' or None")
    devices = resolve_devices(devices)
    model, aux_data = replicate(model, devices), replicate(aux_data, devices)
    losses = []
    for batch in dataloader:
        X_batch, Y_batch = _unpack_batch(batch, "dataloader")
        X_batch = shard_batch(X_batch, devices, "X batch")
        Y_batch = shard_batch(Y_batch, devices, "Y batch")
        losses.append(evaluate(model, map_and_loss, X_batch, Y_batch, aux_data))
    if not losses:
        raise ValueError("`dataloader` yielded no batches, so there is no loss to report")
    if reduce == "mean":
        return loss_reducer(losses)
    return jnp.concatenate([jnp.atleast_1d(loss) for loss in losses], axis=0)


def map_loss_in_batches(
    map_and_loss: MapAndLoss,
    model: Any,
    x: Any,
    y: Any,
    batch_size: int,
    rand_key: Any,
    devices: Optional[Sequence[jax.Device]] = None,
    aux_data: Optional[Any] = None,
    reduce: Optional[str] = "mean",
) -> jax.Array:
    """The loss over a whole data set, evaluated `batch_size` samples at a time to bound memory.

    Batches are taken in the stored order, as ginjax 0.1.8 does (`rand_key` is accepted for
    compatibility and unused); the last `L % batch_size` samples are left out.

    Args:
        map_and_loss: `(model, x, y, aux_data) -> (loss, aux_data)`
        model: the model
        x: inputs, blocks (L, channels, *spatial, *tensor)
        y: targets, same length
        batch_size: samples per evaluation batch
        rand_key: unused
        devices: devices to split each batch over
        aux_data: state for stateful layers
        reduce: "mean" averages the batch losses; None concatenates them

    Returns:
        the combined loss
    """
    devices = resolve_devices(devices)
    batches = EpochBatches(x, y, batch_size, None, devices, "x")
    return map_loss_in_batches_dl(map_and_loss, model, batches, aux_data, reduce, devices)


def map_plus_loss_in_batches(
    map_and_loss: MapAndLoss,
    model: Any,
    x: Any,
    y: Any,
    batch_size: int,
    rand_key: Any,
    devices: Optional[Sequence[jax.Device]] = None,
    aux_data: Optional[Any] = None,
) -> tuple[jax.Array, Any]:
    """Like `map_loss_in_batches`, also returning the predictions; `map_and_loss` must return
    (loss, aux_data, prediction).

    The batches follow `get_batches(rand_key)`: with a key the predictions come back in that
    shuffled order (as in ginjax 0.1.8); pass None to keep the order of `x`.

    Returns:
        (mean batch loss, predictions concatenated along the batch axis)
    """
    devices = resolve_devices(devices)
    X_batches, Y_batches = get_batches((x, y), batch_size, rand_key, devices)
    model, aux_data = replicate(model, devices), replicate(aux_data, devices)
    losses, predictions = [], []
    for X_batch, Y_batch in zip(X_batches, Y_batches):
        loss, prediction = evaluate(model, map_and_loss, X_batch, Y_batch, aux_data, True)
        losses.append(loss)
        predictions.append(prediction)
    return loss_reducer(losses), multi_image_reducer(predictions)


def train_dl(
    train_dataloader: Iterable,
    map_and_loss: MapAndLoss,
    model: Any,
    stop_condition: StopCondition,
    optimizer: optax.GradientTransformation,
    val_dataloader: Optional[Iterable] = None,
    val_map_and_loss: Optional[MapAndLoss] = None,
    save_model: Optional[str] = None,
    aux_data: Optional[Any] = None,
    is_wandb: bool = False,
    devices: Optional[Sequence[jax.Device]] = None,
) -> tuple[Any, Optional[Any], Optional[jax.Array], Optional[jax.Array], float]:
    """Train over the batches of `train_dataloader` until `stop_condition` says stop.

    Args:
        train_dataloader: a re-iterable of (X_batch, Y_batch) pairs, one pass per epoch (a list,
            a torch DataLoader whose collate gives MultiImages, ...; not a one-shot generator)
        map_and_loss: `(model, x, y, aux_data) -> (scalar loss, aux_data)`
        model: the model to train
        stop_condition: asked before every epoch; also keeps the model to return and prints
        optimizer: an optax optimizer
        val_dataloader: validation batches, evaluated after every epoch
        val_map_and_loss: the validation map_and_loss, `map_and_loss` by default
        save_model: a path to save the model to every 10 epochs
        aux_data: initial state for stateful layers (batch norm)
        is_wandb: log train/loss and val/loss to an active wandb run (needs wandb installed)
        devices: devices to split every batch over (data parallel); None uses JAX's default

    Returns:
        (stop_condition's best model, aux_data, last epoch's mean train loss, last validation
        loss, total training time in seconds excluding validation)

    Raises:
        FloatingPointError: a training (or validation) loss is NaN or infinite; the message
            names the epoch and the first such batch. Checked once per epoch.
    """
    if not isinstance(stop_condition, StopCondition):
        raise TypeError(f"`stop_condition` (={stop_condition!r}) must be a StopCondition")
    if val_dataloader is None and needs_validation(stop_condition):
        raise ValueError(
            f"`stop_condition` ({type(stop_condition).__name__}) stops on the validation loss, "
            "but no validation data was given"
        )
    wandb = import_wandb() if is_wandb else None
    devices = resolve_devices(devices)
    if val_map_and_loss is None:
        val_map_and_loss = map_and_loss

    model, aux_data = replicate(model, devices), replicate(aux_data, devices)
    opt_state = replicate(optimizer.init(_trainable(model)), devices)
    n_batches_hint = len(train_dataloader) if hasattr(train_dataloader, "__len__") else None

    epoch, epoch_time, total_train_time = 0, 0.0, 0.0
    train_loss = val_loss = None
    stop_condition.best_model = model
    while not stop_condition.stop(model, epoch, train_loss, val_loss, epoch_time):
        start = time.perf_counter()
        progress = ProgressBar(n_batches_hint, f"epoch {epoch + 1}")
        batch_losses = []
        for batch in train_dataloader:
            X_batch, Y_batch = _unpack_batch(batch, "train_dataloader")
            X_batch = shard_batch(X_batch, devices, "X batch")
            Y_batch = shard_batch(Y_batch, devices, "Y batch")
            model, opt_state, loss, aux_data = train_step(
                map_and_loss, model, optimizer, opt_state, X_batch, Y_batch, aux_data
            )
            batch_losses.append(loss)
            progress.update()
        progress.close()
        n_batches = len(batch_losses)
        if n_batches == 0:
            raise ValueError(
                f"`train_dataloader` yielded no batches in epoch {epoch + 1}: it must be "
                "re-iterable (a list, a DataLoader), not a one-shot iterator, and hold at least "
                "one batch"
            )
        train_loss = jax.block_until_ready(loss_reducer(batch_losses))  # so the timing is real
        total_train_time += time.perf_counter() - start
        epoch += 1
        _check_finite(batch_losses, epoch)

        if val_dataloader is not None:
            val_loss = map_loss_in_batches_dl(
                val_map_and_loss, model, val_dataloader, aux_data=aux_data, devices=devices
            )
            _check_finite([val_loss], epoch, validation=True)
        if wandb is not None:
            log = {"train/loss": float(train_loss)}
            if val_loss is not None:
                log["val/loss"] = float(val_loss)
            wandb.log(log)
        if save_model and epoch % _SAVE_EVERY == 0:
            save(save_model, model)
        epoch_time = time.perf_counter() - start

    # a condition watching a loss that never improved has no best model: return the latest
    best_model = stop_condition.best_model if stop_condition.best_model is not None else model
    return best_model, aux_data, train_loss, val_loss, total_train_time


def train(
    X: Any,
    Y: Any,
    map_and_loss: MapAndLoss,
    model: Any,
    rand_key: Any,
    stop_condition: StopCondition,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    validation_X: Optional[Any] = None,
    validation_Y: Optional[Any] = None,
    val_map_and_loss: Optional[MapAndLoss] = None,
    save_model: Optional[str] = None,
    devices: Optional[Sequence[jax.Device]] = None,
    aux_data: Optional[Any] = None,
    is_wandb: bool = False,
) -> tuple[Any, Optional[Any], Optional[jax.Array], Optional[jax.Array], float]:
    """Mini-batch training on in-memory data until `stop_condition` says stop.

    Each epoch visits the samples in a fresh random order drawn from `rand_key` (None keeps the
    stored order), in batches of `batch_size`; the last `L % batch_size` are skipped that epoch.

    Args:
        X: inputs, blocks (L, channels, *spatial, *tensor)
        Y: targets, same length L
        map_and_loss: `(model, x, y, aux_data) -> (scalar loss, aux_data)`, e.g. a `Mapper`
        model: the model to train
        rand_key: PRNG key for shuffling, or None
        stop_condition: EpochStop, TrainLoss, ValLoss, AnyStop, ...
        batch_size: samples per step; must divide evenly over `devices`
        optimizer: an optax optimizer
        validation_X: validation inputs (evaluated after every epoch in batches of `batch_size`)
        validation_Y: validation targets
        val_map_and_loss: the validation map_and_loss, `map_and_loss` by default
        save_model: a path to save the model to every 10 epochs
        devices: devices to split every batch over (data parallel); None uses JAX's default
        aux_data: initial state for stateful layers (batch norm)
        is_wandb: log to an active wandb run (needs wandb installed)

    Returns:
        (best model, aux_data, last epoch's mean train loss, last validation loss or None,
        total training time in seconds excluding validation)

    Raises:
        FloatingPointError: a non-finite loss, naming the epoch and batch (see `train_dl`).
    """
    if (validation_X is None) != (validation_Y is None):
        raise ValueError(
            "pass both `validation_X` and `validation_Y`, or neither "
            f"(got validation_X={'None' if validation_X is None else 'given'}, "
            f"validation_Y={'None' if validation_Y is None else 'given'})"
        )
    devices = resolve_devices(devices)
    train_batches = EpochBatches(X, Y, batch_size, rand_key, devices, "X")
    val_batches = None
    if validation_X is not None:
        val_batches = EpochBatches(
            validation_X, validation_Y, batch_size, None, devices, "validation_X"
        )
    return train_dl(
        train_batches,
        map_and_loss,
        model,
        stop_condition,
        optimizer,
        val_batches,
        val_map_and_loss,
        save_model,
        aux_data,
        is_wandb,
        devices,
    )
