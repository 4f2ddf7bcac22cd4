"""Sizes of a case: dense-equivalent FLOPs of the convolutions in a jaxpr, bytes of a pytree; the
equations of a jaxpr with its nested programs."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.extend
import jax.numpy as jnp


def tree_bytes(tree) -> int:
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def conv_flops(fn: Callable, *args) -> int:
    """FLOPs of the conv_general_dilated ops in fn's forward jaxpr (2 * out elements * window)."""
    closed = jax.make_jaxpr(fn)(*args)
    total = 0
    for eqn in equations(closed.jaxpr):
        if eqn.primitive.name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
            window = math.prod(rhs[d] for d in rhs_spec[1:])  # in-features per group * taps
            total += 2 * math.prod(out) * window
    return total


def equations(jaxpr):
    """Every equation of `jaxpr` and of the programs nested in its equations' parameters (jit,
    custom_vjp, custom_vmap, ...), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from equations(sub)


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)
