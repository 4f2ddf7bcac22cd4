"""Training utilities for MultiImage models: losses, stop conditions, batching, training loops.

The public names of ginjax 0.1.8's `ginjax.ml`, implemented without torch or wandb (wandb is
imported only when `is_wandb=True`).
"""

from ginjax.ml._autoregressive import autoregressive_map, autoregressive_step
from ginjax.ml._batching import MultiImageDataset, get_batches, loss_reducer, multi_image_reducer
from ginjax.ml._benchmark import (
    BENCHMARK_DATA,
    BENCHMARK_MODEL,
    BENCHMARK_NONE,
    benchmark,
    benchmark_lr,
)
from ginjax.ml._losses import (
    l2_per_pixel_rel_error,
    l2_rel_error,
    normalized_smse_loss,
    nrmse_loss,
    nrmse_per_pixel_loss,
    smse_loss,
    timestep_smse_loss,
)
from ginjax.ml._mapper import Mapper
from ginjax.ml._serialise import SaveFileError, load, load_plus, save, save_plus
from ginjax.ml._stopping import AnyStop, EpochStop, StopCondition, TrainLoss, ValLoss
from ginjax.ml._training import (
    evaluate,
    map_loss_in_batches,
    map_loss_in_batches_dl,
    map_plus_loss_in_batches,
    train,
    train_dl,
    train_step,
)

__all__ = [
    "AnyStop",
    "BENCHMARK_DATA",
    "BENCHMARK_MODEL",
    "BENCHMARK_NONE",
    "EpochStop",
    "Mapper",
    "MultiImageDataset",
    "SaveFileError",
    "StopCondition",
    "TrainLoss",
    "ValLoss",
    "autoregressive_map",
    "autoregressive_step",
    "benchmark",
    "benchmark_lr",
    "evaluate",
    "get_batches",
    "l2_per_pixel_rel_error",
    "l2_rel_error",
    "load",
    "load_plus",
    "loss_reducer",
    "map_loss_in_batches",
    "map_loss_in_batches_dl",
    "map_plus_loss_in_batches",
    "multi_image_reducer",
    "normalized_smse_loss",
    "nrmse_loss",
    "nrmse_per_pixel_loss",
    "save",
    "save_plus",
    "smse_loss",
    "timestep_smse_loss",
    "train",
    "train_dl",
    "train_step",
]
