"""ConvContract as a function of plain arrays, with interchangeable backends.

    outputs = kernels.conv_contract(spec, inputs, weights, bias=None, backend="auto", precision=None)

`spec` (a `ConvSpec`, from `make_spec`) is the static part of a layer: keys, channel counts, the
invariant filter bases of every (input key, output key) pair, padding, stride and dilations.
`inputs` are the unbatched blocks (c_a, *spatial, *(D,)*k_a); `weights` the per-pair
(o_b, c_a, n_filters) coefficient arrays. Batch with jax.vmap. This package never imports ginjax.

Backends: `reference` (ginjax 0.1.8's per-pair algorithm, the oracle), `dense` (one convolution),
and the fused GPU kernels `triton` and `pallas` when they can run. See `explain` for which one runs.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax

from . import _registry
from ._bias import check_bias, check_given_means
from ._precision import MODES, TOLERANCE, resolve_precision
from ._registry import (
    Backend,
    Choice,
    available_backends,
    register_backend,
    registered_backends,
    use_backend,
)
from ._sharding import SpatialSharding, active_spatial_sharding, sharded_conv_contract, spatial_sharding
from ._spec import (
    FLOAT_DTYPES,
    ConvSpec,
    FilterBasis,
    Pair,
    check_float_dtype,
    check_operands,
    check_residual,
    make_spec,
    resolve_padding,
)
from .dense import assemble_dense_filter, conv_contract_dense, describe_dense
from .reference import conv_contract_reference

__all__ = [
    "Backend",
    "Choice",
    "ConvSpec",
    "FLOAT_DTYPES",
    "FilterBasis",
    "MODES",
    "Pair",
    "TOLERANCE",
    "assemble_dense_filter",
    "available_backends",
    "check_float_dtype",
    "conv_contract",
    "explain",
    "make_spec",
    "register_backend",
    "registered_backends",
    "resolve_padding",
    "resolve_precision",
    "SpatialSharding",
    "spatial_sharding",
    "use_backend",
]


def _always() -> tuple[bool, str]:
    return True, "pure lax, runs everywhere"


def _covers_all(spec, spatial, dtype) -> tuple[bool, str]:
    return True, "covers every configuration"


register_backend(Backend("reference", conv_contract_reference, _always, _covers_all, priority={}))
register_backend(
    Backend(
        "dense",
        conv_contract_dense,
        _always,
        _covers_all,
        priority={"cpu": 10, "gpu": 10, "tpu": 10},
        describe=describe_dense,
    )
)


def _register_optional() -> None:
    # Fused backends register themselves on import; a missing optional dependency only means the
    # backend reports itself unavailable, never that `import kernels` fails.
    for module in ("kernels.triton", "kernels.pallas", "kernels.native"):
        try:
            __import__(module)
        except ModuleNotFoundError as err:
            if not err.name or not err.name.startswith("kernels."):
                raise


_register_optional()


def conv_contract(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    *,
    bias: Optional[Sequence[Optional[jax.Array]]] = None,
    backend: Optional[str] = None,
    precision=None,
    input_means: Optional[Sequence[Optional[jax.Array]]] = None,
    residual: Optional[Sequence[Optional[jax.Array]]] = None,
) -> tuple[jax.Array, ...]:
    """Run one ConvContract on unbatched blocks; returns the output blocks in `spec.out_keys` order.

    Args:
        spec: the layer's static description (`make_spec`).
        inputs: per input key, (c_a, *spatial, *(D,)*k_a).
        weights: per pair of `spec.pairs`, (o_b, c_a, n_filters).
        bias: per output key, an (o_b,) array where `spec.bias_modes` is not "none", else None
            ("add": out += b; "mean": out += b * spatial mean of out). None when no mode is set.
        backend: a registered name or "auto"/None (then `use_backend`, $GINJAX_BACKEND, auto).
        precision: None (JAX's default matmul precision), "fp32", "tf32" or "bf16".
        input_means: None, or per input key None or that input's spatial mean (c_a, *(D,)*k_a)
            as its producer already computed it (e.g. `ginjax.layers.VectorNeuronNonlinear`'s
            kernel adds it up as it writes the block): where a "mean" bias reads the inputs'
            means, these are used instead of another pass over the inputs. They must be the
            inputs' means: they are taken as given, and the gradient reaches the inputs as
            through their own means (`kernels._bias.known_mean`), none reaches these arrays.
        residual: None, or per output key None or an array of that output's shape
            (o_b, *out_spatial, *(D,)*k_b) added to it after the bias: out_b + residual_b (e.g. a
            residual block's input). Backends that can add it as they write the outputs do (the
            `triton` backend's CUDA forward, in its epilogue), so no pass of its own runs over
            the output; elsewhere it is one add. Its gradient is the output's cotangent.

    dtypes: inputs and weights must be floating point (`FLOAT_DTYPES`; anything else raises a
    ValueError); the outputs have the inputs' dtype, accumulated in at least float32.
    """
    inputs = _as_sequence(inputs, "inputs")
    weights = _as_sequence(weights, "weights")
    spatial = check_operands(spec, inputs, weights)
    residual = check_residual(spec, spatial, residual)
    bias = check_bias(spec, bias)
    input_means = check_given_means(spec, inputs, input_means)
    if bias is None:  # nothing reads them
        input_means = None
    mode = resolve_precision(precision)
    out_dtype = jax.numpy.result_type(*inputs)
    layout = active_spatial_sharding()
    if layout is not None:  # split over a device mesh: halo exchange, local backend per shard
        outs = sharded_conv_contract(spec, inputs, weights, layout, backend=backend, mode=mode, bias=bias)
        outs = _registry.add_residual(outs, residual)
    else:
        choice = _registry.choose(spec, spatial, inputs[0].dtype, backend, _registry.traced_batch(inputs[0]))
        outs = _registry.run_backend(choice.backend, spec, inputs, weights, mode, bias, input_means, residual)
    return tuple(o.astype(out_dtype) for o in outs)


def _as_sequence(value, name: str) -> tuple:
    if hasattr(value, "shape") or not isinstance(value, Sequence):
        raise TypeError(
            f"`{name}` (={type(value).__name__}) must be a list or tuple of arrays, one per "
            + ("input key" if name == "inputs" else "pair of the spec")
        )
    return tuple(value)


def explain(layer_or_spec, x=None, *, backend: Optional[str] = None) -> Choice:
    """Say which backend runs for a layer (or ConvSpec) on input `x`, and why.

    Args:
        layer_or_spec: a `ConvSpec`, or an object with a `conv_spec()` method (e.g.
            ginjax.layers.ConvContract) and optionally a `backend` attribute.
        x: the input: a MultiImage-like mapping of blocks, a sequence of blocks, or the spatial
            dims as a tuple. Leading batch axes are allowed: their product is the batch `auto`
            ranks at (as a vmapped call's). None means a generic size.
        backend: override the layer's backend.
    """
    if isinstance(layer_or_spec, ConvSpec):
        spec = layer_or_spec
    else:
        spec = layer_or_spec.conv_spec(x if hasattr(x, "is_torus") else None)
        if backend is None:
            backend = getattr(layer_or_spec, "backend", None)
    dtype, batch = None, None
    if x is None:
        spatial = (16,) * spec.D
    elif isinstance(x, tuple) and all(isinstance(n, int) for n in x):
        spatial = x
    else:
        blocks = list(x.values()) if hasattr(x, "values") else list(x)
        k0 = spec.in_keys[0][0]
        first = blocks[0]
        spatial = tuple(first.shape[first.ndim - k0 - spec.D : first.ndim - k0])
        dtype = first.dtype
        lead = first.shape[: max(first.ndim - k0 - spec.D - 1, 0)]  # axes before the channel axis
        batch = math.prod(lead) if lead else _registry.traced_batch(first)
    return _registry.choose(spec, spatial, dtype, backend, batch)
