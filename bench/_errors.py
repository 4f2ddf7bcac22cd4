"""Error metrics against the oracle: relative L2 error of pytrees, per array or as one vector."""

from __future__ import annotations

import math
import re

import numpy as np

import jax
import jax.numpy as jnp


@jax.jit
def _leaf_errors(actual: list, expected: list):
    nums, dens = [], []
    for a, e in zip(actual, expected):
        a = a.astype(jnp.float32)
        e = e.astype(jnp.float32)
        nums.append(jnp.linalg.norm((a - e).ravel()))
        dens.append(jnp.linalg.norm(e.ravel()))
    return jnp.stack(nums), jnp.stack(dens)


def rel_err(actual, expected, per_array: bool = True) -> float:
    """Relative L2 error ||a - e|| / ||e|| of two pytrees: the largest over the arrays, or with
    per_array=False that of all arrays as one vector.

    An array whose expected value is all zeros (e.g. the gradient of the fixed filter bank) counts
    as 0 when the actual one is zero too and as inf otherwise.
    """
    return rel_err_detail(actual, expected, per_array)[0]


def _readable(path: str) -> str:
    # value_and_grad results are (value, grads): name the parts; MultiImage leaves carry no keys
    for prefix, name in (("[0]", "value"), ("[1][0]", "grad[params]"), ("[1][1]", "grad[x]"), ("[1]", "grad")):
        if path.startswith(prefix):
            path = name + path[len(prefix):]
            break
    return re.sub(r"\[<flat index (\d+)>\]", r"[\1]", path) or "output"


def rel_err_detail(actual, expected, per_array: bool = True) -> tuple[float, str]:
    """`rel_err` and the pytree path of the array that sets it ('all' when per_array=False)."""
    a_leaves = jax.tree_util.tree_leaves(actual)
    e_paths, _ = jax.tree_util.tree_flatten_with_path(expected)
    if len(a_leaves) != len(e_paths) or not a_leaves:
        raise ValueError(f"results have {len(a_leaves)} arrays but the reference has {len(e_paths)}")
    nums, dens = (np.asarray(v, dtype=np.float64) for v in _leaf_errors(a_leaves, [e for _, e in e_paths]))
    names = [_readable(jax.tree_util.keystr(path)) for path, _ in e_paths]
    if not per_array:
        nums, dens = np.sqrt(np.sum(nums**2, keepdims=True)), np.sqrt(np.sum(dens**2, keepdims=True))
        names = ["all"]
    worst, worst_name = 0.0, names[0]
    for num, den, name in zip(nums, dens, names):
        if not np.isfinite(num):
            return math.inf, name
        err = (0.0 if num == 0.0 else math.inf) if den == 0.0 else float(num / den)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name
