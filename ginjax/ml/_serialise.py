"""Saving and loading model parameters with equinox's leaf serialisation."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Union

import equinox as eqx

PathLike = Union[str, pathlib.Path]


def save(filename: PathLike, model: Any) -> None:
    """Write `model`'s array leaves to `filename` (load them back with `load` and a model of the
    same structure)."""
    with open(filename, "wb") as f:
        eqx.tree_serialise_leaves(f, model)


def load(filename: PathLike, model: Any) -> Any:
    """`model` (any instance of the saved structure) with its leaves read from `filename`."""
    with open(filename, "rb") as f:
        return eqx.tree_deserialise_leaves(f, model)


def save_plus(filename: PathLike, model: Any, further_args: dict = {}) -> None:
    """Like `save`, with a JSON-serialisable dict (e.g. hyperparameters) stored in front.

    The file is one line of JSON followed by the serialised leaves.
    """
    header = json.dumps(further_args)  # raises TypeError on values JSON cannot hold
    if "\n" in header:  # json.dumps never emits raw newlines, but the format depends on it
        raise ValueError("`further_args` must serialise to a single line of JSON")
    with open(filename, "wb") as f:
        f.write(header.encode() + b"\n")
        eqx.tree_serialise_leaves(f, model)


def load_plus(filename: PathLike, model: Any) -> tuple[Any, dict]:
    """Read a file written by `save_plus`: returns (model with loaded leaves, the dict)."""
    with open(filename, "rb") as f:
        header = f.readline()
        try:
            further_args = json.loads(header.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"`filename` (={str(filename)!r}) does not start with a JSON line: was it written "
                "by save_plus? (files from `save` load with `load`)"
            ) from error
        return eqx.tree_deserialise_leaves(f, model), further_args
