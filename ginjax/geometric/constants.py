"""Constants, enums and small symbolic tensors shared by the geometric package."""

import enum
import itertools
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp

TINY = 1.0e-5
# Einsum index letters. The duplicated "x" (and missing "z") matches ginjax 0.1.8 on purpose.
LETTERS = "abcdefghijklmnopqrstuvwxyxABCDEFGHIJKLMNOPQRSTUVWXYZ"


@enum.unique
class FilterScaling(enum.Enum):
    NORMALIZE = enum.auto()
    ONE = enum.auto()
    GAUSSIAN = enum.auto()
    ZERO_SUM = enum.auto()
    ZERO_SUM_L2_DIST = enum.auto()
    ZERO_SUM_GAUSSIAN_DIST = enum.auto()
    OONA_PURI_SCALED = enum.auto()
    STENCIL = enum.auto()
    INVERSE_COUNT = enum.auto()


@enum.unique
class Rescaling(enum.Enum):
    VOLUME = enum.auto()
    COMPATIBILITY = enum.auto()
    COMPAT_FLEX = enum.auto()
    SPIN_EMBED = enum.auto()
    COPY = enum.auto()
    ZEROS = enum.auto()
    NEPO = enum.auto()
    NO_SCALING = enum.auto()


@enum.unique
class Losses(enum.Enum):
    SMSE = enum.auto()
    NRMSE = enum.auto()
    NRMSE_PER_PIXEL = enum.auto()
    L2_REL = enum.auto()
    L2_REL_PER_PIXEL = enum.auto()


class KroneckerDeltaSymbol:
    """The order-k Kronecker delta in D dimensions (1 where all indices agree), cached."""

    symbol_dict: dict = {}

    @classmethod
    def get(cls, D: int, k: int) -> np.ndarray:
        if not isinstance(D, int) or D < 2:
            raise ValueError(f"KroneckerDeltaSymbol.get: `D` (={D}) must be an int >= 2")
        if not isinstance(k, int) or k < 2:
            raise ValueError(f"KroneckerDeltaSymbol.get: `k` (={k}) must be an int >= 2")
        if (D, k) not in cls.symbol_dict:
            delta = np.zeros((D,) * k, dtype=int)
            for i in range(D):
                delta[(i,) * k] = 1
            cls.symbol_dict[(D, k)] = delta
        return cls.symbol_dict[(D, k)]


def permutation_parity(pi: Sequence[int]) -> int:
    """Sign of a permutation of 0..n-1: +1 even, -1 odd, 0 if an entry repeats."""
    n = len(pi)
    if len(set(int(p) for p in pi)) != n:
        return 0
    visited = [False] * n
    n_cycles = 0
    for start in range(n):
        if visited[start]:
            continue
        n_cycles += 1
        idx = start
        while not visited[idx]:
            visited[idx] = True
            idx = int(pi[idx])
    # a permutation is odd exactly when n minus its number of cycles is odd
    return -1 if (n - n_cycles) % 2 else 1


class LeviCivitaSymbol:
    """The totally antisymmetric D-tensor with entry +1 on (0, 1, ..., D-1), cached."""

    symbol_dict: dict = {}

    @classmethod
    def get(cls, D: int) -> jax.Array:
        if not isinstance(D, int) or D < 2:
            raise ValueError(f"LeviCivitaSymbol.get: `D` (={D}) must be an int >= 2")
        if D not in cls.symbol_dict:
            symbol = np.zeros((D,) * D, dtype=int)
            for index in itertools.product(range(D), repeat=D):
                symbol[index] = permutation_parity(index)
            cls.symbol_dict[D] = jnp.array(symbol)
        return cls.symbol_dict[D]
