"""Shared test helpers: fixture paths, relative error, float64 context."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

# Without an NVIDIA GPU, the Triton backend runs its kernels through Triton's interpreter on
# torch CPU tensors; the variable must be set before triton is imported.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"

import jax
import numpy as np
import pytest

FIXTURES = pathlib.Path(__file__).parent / "data" / "ginjax-0.1.8"


def rel_l2(actual, expected) -> float:
    """Relative L2 error ||a - e|| / ||e||, computed in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(e)
    assert denom > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm(a - e) / denom)


@contextlib.contextmanager
def float64():
    """Enable 64-bit arrays inside the block only (the oracle precision of ARCHITECTURE.md)."""
    with jax.enable_x64(True):
        yield


def fixture_filters(D: int, M: int) -> dict[tuple[int, int], np.ndarray]:
    """Invariant filter bases recorded from ginjax 0.1.8, keyed (k, parity)."""
    data = np.load(FIXTURES / "invariant_filters.npz")
    out = {}
    for name in data.files:
        if name.startswith(f"filters/D{D}M{M}/"):
            kp = name.rsplit("/", 1)[1]  # k{k}p{p}
            k, p = int(kp[1 : kp.index("p")]), int(kp[kp.index("p") + 1 :])
            out[(k, p)] = data[name]
    return out


def conv_contract_cases() -> list[str]:
    data = np.load(FIXTURES / "conv_contract.npz")
    return sorted({name.split("/")[0] for name in data.files})


def conv_contract_case(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(FIXTURES / "conv_contract.npz")
    arrays = {name[len(case) + 1 :]: data[name] for name in data.files if name.startswith(case + "/")}
    meta = json.loads(str(arrays.pop("meta")))
    return meta, arrays


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)
