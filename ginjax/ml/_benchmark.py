"""Running several models over a range of one setting, several times, collecting their scores."""

from __future__ import annotations

import enum
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ginjax.ml._progress import import_wandb

BENCHMARK_DATA = "benchmark_data"
BENCHMARK_MODEL = "benchmark_model"
BENCHMARK_NONE = "benchmark_none"
_BENCHMARK_TYPES = (BENCHMARK_DATA, BENCHMARK_MODEL, BENCHMARK_NONE)


def _config_value(value: Any) -> Any:
    # wandb configs hold plain values; show anything else by its enum name or type
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or type(value) in (str, int, float, bool):
        return value
    return type(value)


def benchmark(
    get_data: Callable,
    models: list[tuple[str, Callable, dict]],
    rand_key: Any,
    benchmark: str,
    benchmark_range: Sequence,
    benchmark_type: str = BENCHMARK_DATA,
    num_trials: int = 1,
    num_results: int = 1,
    is_wandb: bool = False,
    wandb_project: str = "",
    wandb_entity: str = "",
    args: dict = {},
) -> np.ndarray:
    """Score every model for every value of a benchmark setting, `num_trials` times.

    Args:
        get_data: `get_data(key, **kw) -> data`; kw is `{benchmark: value}` for BENCHMARK_DATA
        models: (name, fn, kwargs) triples; `fn(data, key, run_name, **kwargs)` returns one score
            or `num_results` scores (kwargs gets `{benchmark: value}` for BENCHMARK_MODEL)
        rand_key: PRNG key
        benchmark: the name of the setting varied
        benchmark_range: its values
        benchmark_type: BENCHMARK_DATA (vary the data), BENCHMARK_MODEL (vary a model argument)
            or BENCHMARK_NONE (one run per model and trial)
        num_trials: repetitions with fresh keys
        num_results: scores per model run
        is_wandb: start one wandb run per model run (needs wandb installed)
        wandb_project: wandb project
        wandb_entity: wandb entity
        args: extra config logged to each wandb run

    Returns:
        scores, shape (num_trials, len(benchmark_range), len(models), num_results)
    """
    if benchmark_type not in _BENCHMARK_TYPES:
        raise ValueError(
            f"`benchmark_type` (={benchmark_type!r}) must be one of {_BENCHMARK_TYPES}"
        )
    wandb = import_wandb() if is_wandb else None
    if benchmark_type == BENCHMARK_NONE:
        benchmark, benchmark_range = "", [0]

    results = np.zeros((num_trials, len(benchmark_range), len(models), num_results))
    for trial in range(num_trials):
        for j, value in enumerate(benchmark_range):
            data_kwargs = {benchmark: value} if benchmark_type == BENCHMARK_DATA else {}
            rand_key, data_key = jax.random.split(rand_key)
            data = get_data(data_key, **data_kwargs)
            for m, (model_name, model_fn, model_kwargs) in enumerate(models):
                print(f"trial {trial} {benchmark}: {value} {model_name}")
                run_name = f"{model_name}_{benchmark}{value}_t{trial}"
                if benchmark_type == BENCHMARK_MODEL:
                    model_kwargs = {**model_kwargs, benchmark: value}
                if wandb is not None:
                    wandb.init(project=wandb_project, entity=wandb_entity, name=run_name)
                    wandb.config.update(args)
                    wandb.config.update(
                        {k: _config_value(v) for k, v in model_kwargs.items()},
                        allow_val_change=True,
                    )
                    wandb.config.update({"model_name": model_name})
                rand_key, model_key = jax.random.split(rand_key)
                scores = model_fn(data, model_key, run_name, **model_kwargs)
                if wandb is not None:
                    wandb.finish()
                results[trial, j, m] = np.reshape(np.asarray(scores, dtype=float), (num_results,))
    return results


def benchmark_lr(
    get_data: Callable,
    models: list[tuple[str, Callable, dict]],
    rand_key: Any,
    lr_range: Sequence[float],
    num_trials: int = 1,
    num_results: int = 1,
    is_wandb: bool = False,
    wandb_project: str = "",
    wandb_entity: str = "",
    args: dict = {},
) -> np.ndarray:
    """`benchmark` over learning rates passed to each model as `lr=`; an empty `lr_range` runs
    each model once per trial instead."""
    benchmark_type = BENCHMARK_MODEL if len(lr_range) else BENCHMARK_NONE
    return benchmark(
        get_data,
        models,
        rand_key,
        "lr",
        lr_range,
        benchmark_type,
        num_trials,
        num_results,
        is_wandb,
        wandb_project,
        wandb_entity,
        args,
    )
