"""Measured backend speeds, committed per device kind, that `auto` ranks GPU backends by.

Each `kernels/measured/<device-slug>.json` holds, per standard bench configuration, the median
milliseconds of every backend for `fwd` and `fwd_bwd` (copied from a committed
bench/results/<device-slug>/*.json run). For a layer, `auto` looks up the measured configuration
nearest to it (same D, same tensor order when available, closest log Cin*Cout, then closest grid size) and ranks backends
by their `fwd_bwd` median there (training is what users run); backends without a measurement rank
after the measured ones, by priority. No table for the device: priorities alone decide.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib
import re
from typing import Optional

from ._spec import ConvSpec

_DIR = pathlib.Path(__file__).parent / "measured"


def device_slug(device_kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")


@functools.lru_cache(maxsize=None)
def table_for(device_kind: str) -> Optional[dict]:
    path = _DIR / f"{device_slug(device_kind)}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())["configs"]


def measured_ms(device_kind: str, spec: ConvSpec, spatial=None, mode: str = "fwd_bwd") -> dict[str, float]:
    """Backend -> median ms on the measured configuration nearest to `spec` ({} if none)."""
    table = table_for(device_kind)
    if not table:
        return {}
    k_max = max(k for k, _, _ in spec.in_keys + spec.out_keys)
    size = math.log(max(spec.cin * spec.cout, 1))
    candidates = [c for c in table.values() if c["D"] == spec.D and c.get(mode)]
    if not candidates:
        return {}
    pixels = math.log(math.prod(spatial)) if spatial else 0.0

    def distance(c):
        return (c["k_max"] != k_max, abs(math.log(c["cin"] * c["cout"]) - size), abs(math.log(c["pixels"]) - pixels))

    nearest = min(candidates, key=distance)
    return dict(nearest[mode])
