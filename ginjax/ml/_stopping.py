"""Stop conditions for `train`: asked once per epoch whether to stop, they also keep the model to
return (`best_model`) and print the progress line at their `verbose` level."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence


def _as_float(value: Any) -> Optional[float]:
    return None if value is None else float(value)


class StopCondition:
    """Base stop condition: stops at once. Subclasses override `stop`.

    Args:
        verbose: 0 prints nothing; 1 prints some epochs (each condition says which); 2 prints every
            epoch
    """

    best_model: Any
    verbose: int

    def __init__(self, verbose: int = 0) -> None:
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` (={verbose!r}) must be 0, 1 or 2")
        self.best_model = None
        self.verbose = verbose

    def stop(
        self,
        model: Any,
        current_epoch: int,
        train_loss: Any,
        val_loss: Any,
        epoch_time: float,
    ) -> bool:
        """Whether training should stop now, `current_epoch` epochs having run."""
        return True

    def log_status(self, epoch: int, train_loss: Any, val_loss: Any, epoch_time: float) -> None:
        """Print one progress line; nothing before the first epoch has a training loss."""
        if train_loss is None:
            return
        line = f"Epoch {epoch} Train: {float(train_loss):.7f}"
        if val_loss is not None:
            line += f" Val: {float(val_loss):.7f}"
        print(f"{line} Epoch time: {epoch_time:.5f}")


class EpochStop(StopCondition):
    """Stop once `epochs` epochs have run. The model kept is always the latest one.

    Args:
        epochs: the number of epochs to train
        verbose: 1 prints about ten evenly spaced epochs, 2 prints every epoch
    """

    epochs: int

    def __init__(self, epochs: int, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
            raise ValueError(f"`epochs` (={epochs!r}) must be a non-negative int")
        self.epochs = epochs

    def stop(self, model, current_epoch, train_loss, val_loss, epoch_time) -> bool:
        self.best_model = model
        # verbose=1 prints roughly ten lines over the whole run
        every = max(1, self.epochs // max(1, min(10, self.epochs)))
        if self.verbose == 2 or (self.verbose == 1 and current_epoch % every == 0):
            self.log_status(current_epoch, train_loss, val_loss, epoch_time)
        return current_epoch >= self.epochs


class _PlateauStop(StopCondition):
    """Stop when a monitored loss has not improved by more than `min_delta` for more than
    `patience` epochs in a row; keeps the model with the best monitored loss."""

    patience: int
    min_delta: float
    epochs_since_best: int

    def __init__(self, patience: int = 0, min_delta: float = 0, verbose: int = 0) -> None:
        super().__init__(verbose=verbose)
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
            raise ValueError(f"`patience` (={patience!r}) must be a non-negative int")
        if not min_delta >= 0:
            raise ValueError(f"`min_delta` (={min_delta!r}) must be >= 0")
        self.patience = patience
        self.min_delta = min_delta
        self.epochs_since_best = 0
        self._best_loss = math.inf

    def _monitored(self, train_loss: Any, val_loss: Any) -> Any:
        raise NotImplementedError

    def stop(self, model, current_epoch, train_loss, val_loss, epoch_time) -> bool:
        loss = _as_float(self._monitored(train_loss, val_loss))
        if loss is None:  # nothing measured yet (before the first epoch)
            return False
        if loss < self._best_loss - self.min_delta:
            self._best_loss = loss
            self.best_model = model
            self.epochs_since_best = 0
            if self.verbose >= 1:
                self.log_status(current_epoch, train_loss, val_loss, epoch_time)
        else:
            self.epochs_since_best += 1
        return self.epochs_since_best > self.patience


class TrainLoss(_PlateauStop):
    """Stop when the training loss stops improving (see `patience`, `min_delta`).

    Args:
        patience: how many epochs without improvement to allow before stopping
        min_delta: the decrease that counts as an improvement
        verbose: 1 prints the epochs that improved
    """

    @property
    def best_train_loss(self) -> float:
        return self._best_loss

    @best_train_loss.setter
    def best_train_loss(self, value: float) -> None:
        self._best_loss = float(value)

    def _monitored(self, train_loss, val_loss):
        return train_loss


class ValLoss(_PlateauStop):
    """Stop when the validation loss stops improving (see `patience`, `min_delta`); `train`
    needs validation data for it.

    Args:
        patience: how many epochs without improvement to allow before stopping
        min_delta: the decrease that counts as an improvement
        verbose: 1 prints the epochs that improved
    """

    @property
    def best_val_loss(self) -> float:
        return self._best_loss

    @best_val_loss.setter
    def best_val_loss(self, value: float) -> None:
        self._best_loss = float(value)

    def _monitored(self, train_loss, val_loss):
        return val_loss


class AnyStop(StopCondition):
    """Stop as soon as any of `stop_conditions` says so (all are asked every epoch, so each keeps
    its own state and prints at its own verbosity). The model kept is the first condition's.

    Args:
        stop_conditions: one or more stop conditions
    """

    stop_conditions: list[StopCondition]

    def __init__(self, stop_conditions: Sequence[StopCondition]) -> None:
        super().__init__(verbose=0)
        stop_conditions = list(stop_conditions)
        if not stop_conditions:
            raise ValueError("`stop_conditions` (=[]) must hold at least one StopCondition")
        for condition in stop_conditions:
            if not isinstance(condition, StopCondition):
                raise TypeError(
                    f"`stop_conditions` must hold StopCondition instances, got {condition!r}"
                )
        self.stop_conditions = stop_conditions

    def stop(self, model, current_epoch, train_loss, val_loss, epoch_time) -> bool:
        answers = [
            condition.stop(model, current_epoch, train_loss, val_loss, epoch_time)
            for condition in self.stop_conditions
        ]
        self.best_model = self.stop_conditions[0].best_model
        return any(answers)


def needs_validation(stop_condition: StopCondition) -> bool:
    """Whether `stop_condition` can only ever stop on a validation loss."""
    if isinstance(stop_condition, ValLoss):
        return True
    if isinstance(stop_condition, AnyStop):
        return all(needs_validation(c) for c in stop_condition.stop_conditions)
    return False
