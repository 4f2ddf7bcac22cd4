"""Saving and loading model parameters: a checked file format around equinox's leaf serialisation.

A file is three parts:

    GINJAX-SAVE 1\\n                      magic line with the format version
    {"kind": ..., "leaves": ..., ...}\\n  one line of JSON: what wrote it ("save" or "save_plus"),
                                          the saved leaves (tree path, shape, dtype), the payload's
                                          length and SHA-256, and save_plus' `further_args`
    payload                               eqx.tree_serialise_leaves of the model

Loading checks all of it before any leaf is read: the magic and version, which function wrote the
file, that the model given to `load` has the same leaves (paths, shapes, dtypes), the payload's
length (truncation, trailing bytes) and its checksum (corruption). Every failure is a ValueError
(`SaveFileError`) naming the file and what is wrong. Writes go to a temporary file in the same
directory that replaces the target only when complete (os.replace), so a crash never leaves a
half-written file under the target name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Optional, Union

import equinox as eqx
import jax
import numpy as np

PathLike = Union[str, pathlib.Path]

MAGIC = b"GINJAX-SAVE"
VERSION = 1


class SaveFileError(ValueError):
    """A file that `load`/`load_plus` cannot read: names the file and says what is wrong."""


def _leaf_table(model: Any) -> list:
    """[path, shape, dtype] of every leaf tree_serialise_leaves writes (arrays, Python scalars)."""
    table = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if eqx.is_array(leaf):
            table.append([jax.tree_util.keystr(path), list(np.shape(leaf)), str(np.dtype(leaf.dtype))])
        elif isinstance(leaf, (bool, int, float, complex, np.generic)):
            table.append([jax.tree_util.keystr(path), [], type(leaf).__name__])
    return table


def _write(filename: PathLike, model: Any, kind: str, further_args: Optional[dict]) -> None:
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    payload = buffer.getvalue()
    header = {
        "kind": kind,
        "leaves": _leaf_table(model),
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    if further_args is not None:
        header["further_args"] = further_args
    header_line = json.dumps(header).encode()  # json.dumps never emits raw newlines
    target = pathlib.Path(filename)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + b" " + str(VERSION).encode() + b"\n" + header_line + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(filename: PathLike, model: Any, function: str, expected_kind: str) -> tuple[Any, dict]:
    def fail(what: str) -> SaveFileError:
        return SaveFileError(f"{function}: `filename` (={str(filename)!r}) {what}")

    with open(filename, "rb") as f:
        data = f.read()
    first, _, rest = data.partition(b"\n")
    if not data:
        raise fail("is empty (0 bytes): not a saved model")
    if not first.startswith(MAGIC + b" "):
        raise fail(
            f"is not a ginjax save file: it does not start with {MAGIC.decode()!r} (files written "
            "before format version 1, or by other programs, are not read)"
        )
    version = first[len(MAGIC) + 1 :].decode(errors="replace")
    if version != str(VERSION):
        raise fail(f"has format version {version!r}; this version reads version {VERSION}")
    header_line, newline, payload = rest.partition(b"\n")
    try:
        header = json.loads(header_line.decode()) if newline else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or not {"kind", "leaves", "payload_bytes", "sha256"} <= set(header):
        raise fail("has a damaged or truncated header line")
    if header["kind"] != expected_kind:
        other = "load_plus" if header["kind"] == "save_plus" else "load"
        raise fail(f"was written by {header['kind']}; read it with {other}")
    expected_leaves = _leaf_table(model)
    if header["leaves"] != expected_leaves:
        raise fail(
            f"holds another architecture than `model`: {_first_difference(header['leaves'], expected_leaves)}"
        )
    size = header["payload_bytes"]
    if len(payload) < size:
        raise fail(f"is truncated: the payload has {len(payload)} of its {size} bytes")
    if len(payload) > size:
        raise fail(f"has {len(payload) - size} unexpected bytes after its {size}-byte payload")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise fail("is corrupted: the payload's SHA-256 does not match the one recorded when it was saved")
    return eqx.tree_deserialise_leaves(io.BytesIO(payload), model), header


def _first_difference(saved: list, expected: list) -> str:
    for i, (a, b) in enumerate(zip(saved, expected)):
        if a != b:
            return f"leaf {i} is {a[0]} {tuple(a[1])} {a[2]} in the file, {b[0]} {tuple(b[1])} {b[2]} in the model"
    return f"the file has {len(saved)} leaves, the model {len(expected)}"


def save(filename: PathLike, model: Any) -> None:
    """Write `model`'s array leaves to `filename` (load them back with `load` and a model of the
    same structure). The write is atomic; see the module docstring for the format."""
    _write(filename, model, "save", None)


def load(filename: PathLike, model: Any) -> Any:
    """`model` (any instance of the saved structure) with its leaves read from `filename`.

    Raises SaveFileError (a ValueError) naming the file if it is empty, truncated, corrupted, has
    trailing bytes, was written by `save_plus`, or holds a different architecture.
    """
    return _read(filename, model, "ml.load", "save")[0]


def save_plus(filename: PathLike, model: Any, further_args: dict = {}) -> None:
    """Like `save`, also storing `further_args`, a JSON-serialisable dict (e.g. hyperparameters)."""
    if not isinstance(further_args, dict):
        raise ValueError(f"ml.save_plus: `further_args` (={type(further_args).__name__}) must be a dict")
    try:
        # round trip, so what load_plus returns is what was stored (tuples come back as lists)
        stored = json.loads(json.dumps(further_args))
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"ml.save_plus: `further_args` cannot be stored as JSON ({err}); use str, int, float, "
            "bool, None, lists and dicts with string keys"
        ) from None
    _write(filename, model, "save_plus", stored)


def load_plus(filename: PathLike, model: Any) -> tuple[Any, dict]:
    """Read a file written by `save_plus`: returns (model with loaded leaves, the dict)."""
    loaded, header = _read(filename, model, "ml.load_plus", "save_plus")
    return loaded, header.get("further_args", {})
