"""Environment switches: one reader, one error for a value it does not know; and a block that
sets some for its duration (benchmarks' A/Bs, which read them as calls are traced); and the same
for a thread's own setting (`thread_setting`)."""

from __future__ import annotations

import contextlib
import os


def env_choice(env: str, choices: tuple[str, ...], default: str) -> str:
    """$env if set and not empty (one of `choices`, else a ValueError naming it and the value),
    else `default`."""
    value = os.environ.get(env, "")
    if not value:
        return default
    if value not in choices:
        raise ValueError(f"`{env}` (={value!r}) must be one of {choices}")
    return value


@contextlib.contextmanager
def environment(values: dict):
    """Within the block, os.environ holds `values` (name -> str); after it (also on error) each
    name is as it was, unset where it was unset."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        os.environ.update(values)
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def thread_setting(local, name: str, value):
    """Within the block, `local.<name>` (a threading.local's attribute) is `value`; after it (also
    on error) what it was, None where unset."""
    outer = getattr(local, name, None)
    setattr(local, name, value)
    try:
        yield
    finally:
        setattr(local, name, outer)
