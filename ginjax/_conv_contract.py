"""ConvContract: equivariant tensor convolution followed by contraction, on pluggable backends.

The layer keeps ginjax 0.1.8's constructor, fields and results; its hot path is one call of
`kernels.conv_contract`, so the backend (reference lax, dense lax, fused Triton or Pallas) is a
dispatch decision, not a different model. See `kernels.explain(layer, x)`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Optional, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as random
import numpy as np

import kernels
from kernels import ConvSpec

from ginjax import _init_random, geometric as geom
from ginjax._filter_bank import FilterBank, TracedFiltersError
from ginjax._validate import as_signature, check_key, residual_blocks

Key = tuple[tuple[bool, ...], int]
Weights = dict[Key, dict[Key, jax.Array]]

_BIAS_MODES = ("auto", "mean", "scalar")
_SCALAR: Key = ((), 0)


class MultiImageLayer(eqx.Module):
    """A layer from MultiImage to MultiImage (identity here; subclasses override `__call__`)."""

    def __call__(self, x: geom.MultiImage) -> geom.MultiImage:
        return x


def _filter_key(in_key: Key, out_key: Key) -> Key:
    # invariant filters are contravariant in every index
    return ((False,) * (len(in_key[0]) + len(out_key[0])), (in_key[1] + out_key[1]) % 2)


def _normalize_bias(use_bias: Union[str, bool]) -> Union[str, bool]:
    if isinstance(use_bias, bool):
        return "auto" if use_bias else False
    if isinstance(use_bias, str) and use_bias in _BIAS_MODES:
        return use_bias
    raise ValueError(f"`use_bias` (={use_bias!r}) must be a bool or one of {_BIAS_MODES}")


@functools.lru_cache(maxsize=512)
def _build_spec(
    D: int,
    in_keys: tuple,
    out_keys: tuple,
    pair_index: tuple,
    bases: tuple,
    is_torus: tuple,
    stride,
    padding,
    lhs_dilation,
    rhs_dilation,
    bias_modes: tuple = (),
) -> ConvSpec:
    pairs = [(a, b, bases[t]) for t, (a, b) in enumerate(pair_index)]
    return kernels.make_spec(
        D, in_keys, out_keys, pairs, is_torus, stride, padding, lhs_dilation, rhs_dilation,
        bias_modes=bias_modes or None,
    )


def _bias_mode(use_bias: Union[str, bool], out_key: Key) -> str:
    """The kernels bias mode of one output key under the layer's `use_bias` (ginjax 0.1.8's rules:
    'auto' adds the bias to the scalar key and a mean-scaled bias to the others, 'mean' a
    mean-scaled bias everywhere, 'scalar' only to the scalar key)."""
    if not use_bias:
        return "none"
    if out_key == _SCALAR and use_bias in ("auto", "scalar"):
        return "add"
    if use_bias == "mean" or (use_bias == "auto" and out_key != _SCALAR):
        return "mean"
    return "none"  # 'scalar' leaves the other outputs unbiased


def _pair_basis(bases: dict, in_key: Key, out_key: Key):
    fk = _filter_key(in_key, out_key)
    if fk not in bases:
        raise ValueError(
            f"`invariant_filters` has no filter for key {fk}, which the layer's weights "
            f"[{in_key}][{out_key}] need: the bank was replaced by one with keys {list(bases)}"
        )
    return bases[fk]


_WARNED_DROPS: set = set()


def _warn_dropped_keys(input_keys: tuple, target_keys: tuple, weights: Weights) -> None:
    """Warn (once per pair of signatures) about keys no invariant filter connects to the other side:
    ginjax 0.1.8 leaves them out silently (inputs ignored, outputs absent from the result)."""
    used_out = {o for pairs in weights.values() for o in pairs}
    dropped_in = tuple(k for k, _ in input_keys if not weights.get(k))
    dropped_out = tuple(k for k, _ in target_keys if k not in used_out)
    if not (dropped_in or dropped_out) or (input_keys, target_keys) in _WARNED_DROPS:
        return
    _WARNED_DROPS.add((input_keys, target_keys))
    parts = []
    if dropped_in:
        parts.append(f"input keys {list(dropped_in)} are ignored")
    if dropped_out:
        parts.append(f"target keys {list(dropped_out)} are left out of the output")
    warnings.warn(
        "ConvContract: no invariant filter joins these keys to the other side, so "
        + " and ".join(parts)
        + " (as in ginjax 0.1.8); add filters of the needed tensor order to keep them",
        UserWarning,
        stacklevel=3,
    )


def _same_dtype_as(x: geom.MultiImage, out: geom.MultiImage) -> geom.MultiImage:
    """The dtype policy: outputs in the inputs' dtype (the float32 bias would promote bf16/f16)."""
    dtype = jnp.result_type(*x.values())
    if all(b.dtype == dtype for b in out.values()):
        return out
    return geom.MultiImage({k: b.astype(dtype) for k, b in out.items()}, out.D, out.is_torus)


def _hashable(value):
    """Lists (e.g. from JSON configs) to tuples, so geometry arguments can key a cache."""
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, tuple):
        return tuple(_hashable(v) for v in value)
    return value


class ConvContract(MultiImageLayer):
    """Equivariant convolution of a MultiImage with learned combinations of invariant filters.

    For every input key a=(k_a, p_a) and target key b=(k_b, p_b) with an invariant filter of order
    k_a + k_b and parity p_a + p_b, the filter W_ab = sum_f weights[a][b][:, :, f] * filters[f] is
    convolved with the input block and its first k_a tensor indices are contracted with the input's;
    the terms for one target key are summed.

    Shapes (unbatched; use jax.vmap for a batch):
        input block a: (in_c, *spatial, *(D,)*k_a); output block b: (out_c, *spatial', *(D,)*k_b).
    Fields as ginjax 0.1.8: `weights[in_key][out_key]` of shape (out_c, in_c, n_filters),
    `bias[out_key]` of shape (out_c,), `invariant_filters`, `missing_filter`, ... plus `backend`.

    The filters: `invariant_filters` holds a `FilterBank`, an immutable MultiImage that JAX and
    equinox treat as one hashable non-array leaf. The layer computes with exactly what it holds:
    `eqx.tree_at(lambda m: m.invariant_filters, layer, new_filters)` takes effect (on every
    backend, jitted or not; the weights must still match the new bank's filter counts). Because
    the fused kernels specialise on the filter values, the filters are constants: they are not
    trained, have no gradient and are not written by `ginjax.ml.save`. A plain MultiImage put in
    their place is converted on the next eager call; under jit its arrays are tracers and the
    call raises a TypeError that says to wrap it in `FilterBank`.

    Keys that no invariant filter joins to any key on the other side (e.g. an order-3 input with
    filters up to order 2) are left out of the computation as in ginjax 0.1.8, with a warning
    that names them.

    dtypes: floating-point inputs only; float16/bfloat16 inputs give outputs of the same dtype
    (accumulated in float32); integer inputs raise a ValueError.
    """

    weights: Weights
    bias: dict[Key, jax.Array]
    invariant_filters: geom.MultiImage

    input_keys: geom.Signature = eqx.field(static=True)
    target_keys: geom.Signature = eqx.field(static=True)
    use_bias: Union[str, bool] = eqx.field(static=True)
    stride: Union[int, tuple[int, ...]] = eqx.field(static=True)
    padding: Optional[Union[str, int, tuple[tuple[int, int], ...]]] = eqx.field(static=True)
    lhs_dilation: Optional[tuple[int, ...]] = eqx.field(static=True)
    rhs_dilation: Union[int, tuple[int, ...]] = eqx.field(static=True)
    D: int = eqx.field(static=True)
    fast_mode: bool = eqx.field(static=True)
    missing_filter: bool = eqx.field(static=True)
    backend: str = eqx.field(static=True)

    def __init__(
        self,
        input_keys: geom.Signature,
        target_keys: geom.Signature,
        invariant_filters: geom.MultiImage,
        use_bias: Union[str, bool] = "auto",
        stride: Union[int, tuple[int, ...]] = 1,
        padding: Optional[Union[str, int, tuple[tuple[int, int], ...]]] = None,
        lhs_dilation: Optional[tuple[int, ...]] = None,
        rhs_dilation: Union[int, tuple[int, ...]] = 1,
        key: Any = None,
        *,
        backend: str = "auto",
    ):
        """
        Args:
            input_keys: signature of the input, ((k, parity), channels) per key.
            target_keys: signature of the output.
            invariant_filters: MultiImage of invariant filters, one (n_filters, *(M,)*D, *(D,)*k)
                block per filter key ((False,)*k, parity).
            use_bias: 'auto' (plain bias for scalars, mean-scaled bias for the rest), 'mean',
                'scalar' (plain bias for scalars, other outputs unbiased), True ('auto') or False.
            stride, padding, lhs_dilation, rhs_dilation: as ginjax.geometric.convolve; padding None
                means 'TORUS' if the input is a torus on any axis, else 'SAME'.
            key: a jax.random key for the initial weights and biases.
            backend: 'auto' or a kernels backend name ('reference', 'dense', 'triton', 'pallas').
        """
        check_key(key, "ConvContract")
        if not isinstance(invariant_filters, geom.MultiImage):
            raise TypeError(
                f"ConvContract: `invariant_filters` (={type(invariant_filters).__name__}) must be "
                "a geom.MultiImage"
            )
        if not isinstance(backend, str):
            raise ValueError(f"`backend` (={backend!r}) must be a string")
        if backend != "auto" and backend not in kernels.registered_backends():
            raise ValueError(
                f"`backend` (={backend!r}) is not a ConvContract backend; registered: "
                f"{sorted(kernels.registered_backends())}, available here: "
                f"{sorted(kernels.available_backends())} (or 'auto')"
            )
        # Signature normalises keys to ((False,)*k, parity) and checks the channel counts
        input_keys = as_signature(input_keys, "ConvContract", "input_keys")
        target_keys = as_signature(target_keys, "ConvContract", "target_keys")
        for name, signature in (("input_keys", input_keys), ("target_keys", target_keys)):
            if not signature:
                raise ValueError(f"ConvContract: `{name}` (={signature!r}) has no keys")
            for kp, c in signature:
                if c < 1:
                    raise ValueError(
                        f"ConvContract: `{name}` gives key {kp} {c} channels; every key needs "
                        "at least 1 channel (leave the key out instead)"
                    )

        self.input_keys = input_keys
        self.target_keys = target_keys
        self.invariant_filters = FilterBank(invariant_filters)
        self.use_bias = _normalize_bias(use_bias)
        self.stride = _hashable(stride)
        self.padding = _hashable(padding)
        self.lhs_dilation = _hashable(lhs_dilation)
        self.rhs_dilation = _hashable(rhs_dilation)
        self.D = invariant_filters.D
        self.backend = backend
        self.fast_mode = False

        filter_spatial = {tuple(np.asarray(b).shape[1 : 1 + self.D]) for _, b in invariant_filters.items()}
        if len(filter_spatial) > 1:
            raise ValueError(
                f"`invariant_filters` mixes filter sizes {sorted(filter_spatial)}; one ConvContract "
                "uses one filter size"
            )

        missing = False
        weights: Weights = {}
        bias: dict[Key, jax.Array] = {}
        for (in_k, in_p), in_c in input_keys:
            weights[(in_k, in_p)] = {}
            for (out_k, out_p), out_c in target_keys:
                key, w_key, b_key = random.split(key, num=3)
                fk = _filter_key((in_k, in_p), (out_k, out_p))
                if fk not in invariant_filters:
                    missing = True  # no invariant filter joins these two types
                    continue
                n_filters = invariant_filters[fk].shape[0]
                fan_in = in_c * math.prod(invariant_filters[fk].shape[1 : 1 + self.D]) * self.D ** len(in_k)
                bound = 1.0 / math.sqrt(fan_in)
                weights[(in_k, in_p)][(out_k, out_p)] = _init_random.uniform(
                    w_key, (out_c, in_c, n_filters), minval=-bound, maxval=bound
                )
                if self.use_bias:
                    bias[(out_k, out_p)] = _init_random.uniform(b_key, (out_c,), minval=-bound, maxval=bound)
        self.weights = weights
        self.bias = bias
        self.missing_filter = missing
        _warn_dropped_keys(input_keys, target_keys, weights)

    # ---- the operation -------------------------------------------------------------------------
    def _filter_bank(self) -> FilterBank:
        """The held filters as a FilterBank (a plain MultiImage put in by tree_at is converted)."""
        held = self.invariant_filters
        if isinstance(held, FilterBank):
            bank = held
        elif isinstance(held, geom.MultiImage):
            try:
                bank = FilterBank(held)
            except TracedFiltersError:
                raise TypeError(
                    "ConvContract: `invariant_filters` holds a plain geom.MultiImage, whose arrays "
                    "are traced under jit/vmap; the kernels specialise on the filter values, so "
                    "put the filters in as constants: ginjax.layers.FilterBank(filters)"
                ) from None
        else:
            raise TypeError(
                f"ConvContract: `invariant_filters` (={type(held).__name__}) must be a "
                "ginjax.layers.FilterBank or a geom.MultiImage"
            )
        if bank.D != self.D:
            raise ValueError(
                f"ConvContract: `invariant_filters` are for D={bank.D}, the layer for D={self.D}"
            )
        return bank

    def conv_spec(self, x: Optional[geom.MultiImage] = None) -> ConvSpec:
        """The static kernels.ConvSpec of this layer (bias included) for input `x` (key order
        and is_torus)."""
        if x is None:
            in_order = tuple(k for k, _ in self.input_keys)
            is_torus = (True,) * self.D
        else:
            in_order = tuple(x.keys())
            is_torus = tuple(x.is_torus)
        return self._spec(in_order, is_torus, self.weights, with_bias=True)[0]

    def _spec(
        self, in_order: tuple, is_torus: tuple, weights: Weights, with_bias: bool = False
    ) -> tuple[ConvSpec, list, list]:
        """Spec plus, in spec order, the output keys and the (in_key, out_key) of each pair.

        Output order follows ginjax: input keys in the order of `x`, then target keys in layer
        order; a target key appears when its first term does.
        """
        in_channels = dict(self.input_keys)
        out_channels = dict(self.target_keys)
        bases = self._filter_bank().bases
        out_order: list = []
        pair_keys: list = []
        pair_index = []
        for a, in_key in enumerate(in_order):
            present = weights.get(in_key, {})
            # target-key order, not dict order: pytree flattening sorts dict keys
            for out_key in (k for k, _ in self.target_keys if k in present):
                if out_key not in out_order:
                    out_order.append(out_key)
                pair_keys.append((in_key, out_key))
                pair_index.append((a, out_order.index(out_key)))
        spec = _build_spec(
            self.D,
            tuple((len(k), p, in_channels[(k, p)]) for k, p in in_order),
            tuple((len(k), p, out_channels[(k, p)]) for k, p in out_order),
            tuple(pair_index),
            tuple(_pair_basis(bases, i, o) for i, o in pair_keys),
            is_torus,
            self.stride,
            self.padding,
            self.lhs_dilation,
            self.rhs_dilation,
            tuple(_bias_mode(self.use_bias, k) for k in out_order) if with_bias else (),
        )
        return spec, out_order, pair_keys

    def _check_input(self, x: geom.MultiImage) -> None:
        if not isinstance(x, geom.MultiImage):
            raise TypeError(f"`x` (={type(x).__name__}) must be a geom.MultiImage")
        if x.D != self.D:
            raise ValueError(f"`x.D` (={x.D}) does not match the layer's D (={self.D})")
        expected = dict(self.input_keys)
        got = {k: v.shape[0] for k, v in x.items()}
        if set(got) != set(expected) or any(got[k] != expected[k] for k in got):
            raise ValueError(
                f"`x` has signature {tuple(got.items())}, but the layer expects "
                f"{tuple(expected.items())} (keys ((False,)*k, parity) -> channels; unbatched: "
                "use jax.vmap for a batch)"
            )
        for k, block in x.items():
            kernels.check_float_dtype(block, f"`x[{k}]`")

    def _convolve(
        self, x: geom.MultiImage, weights: Weights, backend: Optional[str], with_bias: bool = False,
        residual: Optional[geom.MultiImage] = None,
    ) -> geom.MultiImage:
        self._check_input(x)
        in_order = tuple(x.keys())
        spec, out_order, pair_keys = self._spec(in_order, tuple(x.is_torus), weights, with_bias)
        pair_weights = []
        for (in_key, out_key), pair in zip(pair_keys, spec.pairs):
            w = weights[in_key][out_key]
            expected = (spec.out_keys[pair.out_index][2], spec.in_keys[pair.in_index][2], pair.basis.n_filters)
            if tuple(w.shape) != expected:
                raise ValueError(
                    f"`weights[{in_key}][{out_key}]` has shape {tuple(w.shape)}; expected {expected}"
                )
            pair_weights.append(w)
        bias = None
        if spec.has_bias:
            bias = [self.bias[k] if m != "none" else None for k, m in zip(out_order, spec.bias_modes)]
        # the inputs' means where the layer that made a block added them up (the VectorNeuron):
        # a "mean" bias then reads no block again for them
        given = [x._block_mean(k) for k in in_order] if bias is not None else []
        # the backend adds a residual in the result's keys and the inputs' dtype (its block shapes
        # kernels.conv_contract checks); otherwise `+` after it
        blocks = residual_blocks(residual, x, out_order, dtype=jnp.result_type(*x.values()))
        fused = None if blocks is None else [blocks[k] for k in out_order]
        outs = kernels.conv_contract(
            spec,
            [x[k] for k in in_order],
            pair_weights,
            bias=bias,
            backend=backend,
            input_means=given if any(m is not None for m in given) else None,
            residual=fused,
        )
        out = geom.MultiImage(dict(zip(out_order, outs)), x.D, x.is_torus)
        return out if residual is None or fused is not None else _same_dtype_as(x, out) + residual

    def fast_convolve(self, input_multi_image: geom.MultiImage, weights: Weights) -> geom.MultiImage:
        """All pairs as one dense convolution (the `dense` backend), without bias."""
        return self._convolve(input_multi_image, weights, "dense")

    def individual_convolve(self, x: geom.MultiImage, weights: Weights) -> geom.MultiImage:
        """One convolve_contract per key pair, as ginjax 0.1.8 (the `reference` backend), without bias."""
        return self._convolve(x, weights, "reference")

    def __call__(self, x: geom.MultiImage, *, residual: Optional[geom.MultiImage] = None) -> geom.MultiImage:
        """Convolve-contract `x` (unbatched) on the selected backend, bias included (added by the
        backend's epilogue or after it; see kernels._bias).

        `residual` (an extension of ginjax 0.1.8's call): None, or a MultiImage added to the
        result, `layer(x) + residual` (e.g. a residual block's input). Where it has the result's
        keys, blocks and dtype the backend adds it as it writes the outputs (the `triton`
        backend's CUDA forward in its epilogue: no pass of its own); otherwise by `+`."""
        out = self._convolve(x, self.weights, self.backend, with_bias=True, residual=residual)
        return out if residual is not None else _same_dtype_as(x, out)
