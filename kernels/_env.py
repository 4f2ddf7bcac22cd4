"""Environment switches: one reader, one error for a value it does not know."""

from __future__ import annotations

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
