"""The static description of one ConvContract: keys, channels, filter bases and geometry.

Everything in a `ConvSpec` is known when the layer is built, is hashable, and is passed to the
backends as a static argument, so a fused kernel can specialise on it (on the nonzeros of the
invariant basis in particular). Arrays that change during training (inputs, weights) are not here.

Conventions (those of ginjax 0.1.8):
    input block a:   (c_a, *spatial, *(D,) * k_a)
    weights of pair: (o_b, c_a, F)          for input key a and output key b
    basis of pair:   (F, *(M,) * D, *(D,) * (k_a + k_b))   input tensor indices first
    output block b:  (o_b, *out_spatial, *(D,) * k_b)

    out_b[o, x, j] = sum_a sum_{c, y, i} X_a[c, x * stride + y * rhs_dilation - pad, i] * W[o, c, y, i, j]
    W[o, c, y, i, j] = sum_f w[o, c, f] * B[f, y, i, j]

This is a correlation (no filter flip), as lax.conv_general_dilated computes it. Torus axes are
padded by wrapping, the others with zeros; `lhs_dilation` dilates the (padded) input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Optional, Sequence, Union

import numpy as np

Padding = Union[str, int, Sequence[Sequence[int]], None]

# operand dtypes ConvContract takes; outputs come back in the inputs' dtype
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class FilterBasis:
    """A read-only, hashable invariant filter basis of shape (F, *(M,)*D, *(D,)*k).

    Hashing by content lets a basis sit in a static `ConvSpec` (jit caches and custom_vjp
    non-differentiable arguments need hashable, comparable statics).
    """

    __slots__ = ("array", "_hash", "digest")

    def __init__(self, array) -> None:
        arr = np.array(array, dtype=np.float64, copy=True)
        arr.setflags(write=False)
        self.array = arr
        # by content, the same in every process (`hash` of a str is salted per process)
        self.digest = hashlib.sha1(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
        self._hash = hash((arr.shape, self.digest))

    @property
    def n_filters(self) -> int:
        return self.array.shape[0]

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FilterBasis)
            and self._hash == other._hash
            and self.array.shape == other.array.shape
            and bool(np.array_equal(self.array, other.array))
        )

    def __repr__(self) -> str:
        return f"FilterBasis(shape={self.array.shape})"


@dataclasses.dataclass(frozen=True)
class Pair:
    """One (input key, output key) term of the layer: its filter basis and indices."""

    in_index: int
    out_index: int
    basis: FilterBasis


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """Static geometry of a ConvContract.

    Attributes:
        D: spatial dimension (2 or 3).
        in_keys: per input block, `(k, parity, channels)`.
        out_keys: per output block, `(k, parity, channels)`; every output has at least one pair.
        pairs: the terms of the sum, in evaluation order.
        filter_shape: the filters' spatial extent, `(M,) * D`.
        is_torus: per axis, whether the input wraps around.
        stride, lhs_dilation, rhs_dilation: per axis.
        torus_pad: per axis `(lo, hi)` cells added by wrapping around (torus axes only).
        zero_pad: per axis `(lo, hi)` zero cells added (after wrapping).
        bias_modes: per output block, "none", "add" (out += b[o]) or "mean" (out += b[o] * the
            spatial mean of out, per channel and component); see kernels._bias. Empty: all "none".
    """

    D: int
    in_keys: tuple[tuple[int, int, int], ...]
    out_keys: tuple[tuple[int, int, int], ...]
    pairs: tuple[Pair, ...]
    filter_shape: tuple[int, ...]
    is_torus: tuple[bool, ...]
    stride: tuple[int, ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    torus_pad: tuple[tuple[int, int], ...]
    zero_pad: tuple[tuple[int, int], ...]
    bias_modes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # normalised here (not only in make_spec) so dataclasses.replace keeps one canonical form,
        # which jit caches and custom_vjp statics compare by equality
        modes = self.bias_modes or ("none",) * len(self.out_keys)
        object.__setattr__(self, "bias_modes", _check_bias_modes(modes, len(self.out_keys)))

    @property
    def has_bias(self) -> bool:
        return any(m != "none" for m in self.bias_modes)

    def digest(self) -> str:
        """A SHA-1 of every field (the bases by content), the same in every process: what a
        generated kernel's name is made from, so that its source, and the compile cache's key
        (kernels/triton/_compile_cache.py), do not change from one process to the next, as
        `hash(spec)` would (Python salts the hashes of strings per process)."""
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "pairs"]
        pairs = [(p.in_index, p.out_index, p.basis.digest) for p in self.pairs]
        return hashlib.sha1(repr((fields, pairs)).encode()).hexdigest()

    def without_bias(self) -> "ConvSpec":
        """This spec with every bias mode "none" (what a backend without fused bias runs)."""
        if not self.has_bias:
            return self
        return dataclasses.replace(self, bias_modes=())

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def cin(self) -> int:
        """Channels of the equivalent dense convolution: sum_a c_a * D^k_a."""
        return sum(c * self.D**k for k, _, c in self.in_keys)

    @property
    def cout(self) -> int:
        """Output channels of the equivalent dense convolution: sum_b o_b * D^k_b."""
        return sum(c * self.D**k for k, _, c in self.out_keys)

    @property
    def taps(self) -> int:
        return math.prod(self.filter_shape)

    @property
    def is_default_stride(self) -> bool:
        return all(s == 1 for s in self.stride) and all(d == 1 for d in self.lhs_dilation)

    def in_shape(self, a: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
        k, _, c = self.in_keys[a]
        return (c,) + tuple(spatial) + (self.D,) * k

    def out_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial dims for input spatial dims, as lax.conv_general_dilated computes them."""
        out = []
        for n, tp, zp, m, s, ld, rd in zip(
            spatial,
            self.torus_pad,
            self.zero_pad,
            self.filter_shape,
            self.stride,
            self.lhs_dilation,
            self.rhs_dilation,
        ):
            n_in = n + tp[0] + tp[1]
            n_in = (n_in - 1) * ld + 1 + zp[0] + zp[1]
            extent = (m - 1) * rd + 1
            out.append(max(0, (n_in - extent) // s + 1))
        return tuple(out)

    def dense_flops(self, spatial: Sequence[int]) -> int:
        """FLOPs of the equivalent dense convolution (2 * out pixels * taps * Cin * Cout)."""
        return 2 * math.prod(self.out_spatial(spatial)) * self.taps * self.cin * self.cout


BIAS_MODES = ("none", "add", "mean")


def _check_bias_modes(modes, n_out: int) -> tuple[str, ...]:
    if isinstance(modes, str) or len(modes) != n_out or any(m not in BIAS_MODES for m in modes):
        raise ValueError(
            f"`bias_modes` (={modes!r}) must give one of {BIAS_MODES} per output block "
            f"({n_out} blocks)"
        )
    return tuple(modes)


def _per_axis(value, D: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * D
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * D
    elif isinstance(value, (tuple, list)) and len(value) == D:
        out = tuple(int(v) for v in value)
    else:
        raise ValueError(f"`{name}` (={value!r}) must be an int or a tuple of {D} ints")
    if any(v < 1 for v in out):
        raise ValueError(f"`{name}` (={value!r}) must be >= 1 on every axis")
    return out


def resolve_padding(
    padding: Padding,
    is_torus: tuple[bool, ...],
    filter_shape: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Turn a ginjax padding argument into per-axis (wrap, zero) cell counts.

    None means 'TORUS' if any axis is a torus, else 'SAME'. 'TORUS' wraps the torus axes and
    zero-pads the others as 'SAME' does; 'SAME' pads (M-1)//2 * rhs_dilation zeros on both sides;
    'VALID' pads nothing; an int pads that many zeros on both sides of every axis; explicit
    `((lo, hi),) * D` pairs are used as they are.
    """
    D = len(filter_shape)
    if padding is None:
        padding = "TORUS" if any(is_torus) else "SAME"
    no_pad = ((0, 0),) * D
    if isinstance(padding, str):
        mode = padding.upper()
        if mode not in ("TORUS", "SAME", "VALID"):
            raise ValueError(
                f"`padding` (={padding!r}) must be 'TORUS', 'SAME', 'VALID', an int or "
                f"{D} (lo, hi) pairs"
            )
        if mode == "VALID":
            return no_pad, no_pad
        even = [m for m in filter_shape if m % 2 == 0]
        if even:
            raise ValueError(
                f"`padding` (={padding!r}) needs odd filter sizes, but the filters are "
                f"{filter_shape}: give explicit (lo, hi) pairs instead"
            )
        half = tuple(((m - 1) // 2) * r for m, r in zip(filter_shape, rhs_dilation))
        if mode == "SAME":
            return no_pad, tuple((h, h) for h in half)
        wrap = tuple((h, h) if t else (0, 0) for h, t in zip(half, is_torus))
        zero = tuple((0, 0) if t else (h, h) for h, t in zip(half, is_torus))
        return wrap, zero
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"`padding` (={padding!r}) must be >= 0")
        return no_pad, ((int(padding), int(padding)),) * D
    try:
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(
            f"`padding` (={padding!r}) must be 'TORUS', 'SAME', 'VALID', an int or {D} (lo, hi) pairs"
        ) from None
    if len(pairs) != D:
        raise ValueError(f"`padding` (={padding!r}) must have {D} (lo, hi) pairs, one per axis")
    return no_pad, pairs


def make_spec(
    D: int,
    in_keys: Sequence[tuple[int, int, int]],
    out_keys: Sequence[tuple[int, int, int]],
    pairs: Sequence[tuple[int, int, np.ndarray]],
    is_torus: Union[bool, Sequence[bool]],
    stride=1,
    padding: Padding = None,
    lhs_dilation=None,
    rhs_dilation=1,
    bias_modes: Sequence[str] | None = None,
) -> ConvSpec:
    """Validate and build a `ConvSpec`.

    Args:
        D: 2 or 3.
        in_keys, out_keys: `(k, parity, channels)` per block, in block order.
        pairs: `(in_index, out_index, basis)` with basis of shape (F, *(M,)*D, *(D,)*(k_a+k_b)).
        is_torus: bool or per-axis bools.
        stride, padding, lhs_dilation, rhs_dilation: as in ginjax.
        bias_modes: per output block "none", "add" or "mean"; None: all "none".
    """
    if D not in (2, 3):
        raise ValueError(f"`D` (={D!r}) must be 2 or 3")
    if isinstance(is_torus, (bool, np.bool_)):
        torus = (bool(is_torus),) * D
    else:
        torus = tuple(bool(t) for t in is_torus)
        if len(torus) != D:
            raise ValueError(f"`is_torus` (={is_torus!r}) must be a bool or {D} bools")
    for name, keys in (("in_keys", in_keys), ("out_keys", out_keys)):
        for i, entry in enumerate(keys):
            if (
                not isinstance(entry, (tuple, list))
                or len(entry) != 3
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in entry)
                or entry[0] < 0
                or entry[2] < 1
            ):
                raise ValueError(
                    f"`{name}[{i}]` (={entry!r}) must be (k, parity, channels): ints with k >= 0 "
                    "and channels >= 1"
                )
    if not pairs:
        raise ValueError("a ConvContract needs at least one (input key, output key) pair with a filter")

    built_pairs = []
    filter_shape = None
    for t, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 3:
            raise ValueError(f"`pairs[{t}]` must be (in_index, out_index, basis), got {type(pair).__name__}")
        a, b, basis = pair
        for name, index, n in (("in_index", a, len(in_keys)), ("out_index", b, len(out_keys))):
            if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or not 0 <= index < n:
                raise ValueError(f"`pairs[{t}]` {name} (={index!r}) must be an int in [0, {n})")
        basis = basis if isinstance(basis, FilterBasis) else FilterBasis(basis)
        k_a, _, _ = in_keys[a]
        k_b, _, _ = out_keys[b]
        arr = basis.array
        expected_tail = (D,) * (k_a + k_b)
        if arr.ndim != 1 + D + k_a + k_b or arr.shape[1 + D :] != expected_tail:
            raise ValueError(
                f"filter basis for pair ({a}, {b}) has shape {arr.shape}; expected "
                f"(n_filters, *(M,)*{D}, *{expected_tail})"
            )
        fs = arr.shape[1 : 1 + D]
        if filter_shape is None:
            filter_shape = fs
        elif fs != filter_shape:
            raise ValueError(
                f"all filters of one layer must share a spatial size, got {filter_shape} and {fs}"
            )
        built_pairs.append(Pair(int(a), int(b), basis))
    assert filter_shape is not None
    used_out = {p.out_index for p in built_pairs}
    if used_out != set(range(len(out_keys))):
        missing = sorted(set(range(len(out_keys))) - used_out)
        raise ValueError(f"output blocks {missing} receive no pair; drop them from `out_keys`")

    stride_t = _per_axis(stride, D, "stride")
    lhs_t = _per_axis(lhs_dilation, D, "lhs_dilation")
    rhs_t = _per_axis(rhs_dilation, D, "rhs_dilation")
    wrap, zero = resolve_padding(padding, torus, tuple(filter_shape), rhs_t)
    return ConvSpec(
        D=D,
        in_keys=tuple((int(k), int(p) % 2, int(c)) for k, p, c in in_keys),
        out_keys=tuple((int(k), int(p) % 2, int(c)) for k, p, c in out_keys),
        pairs=tuple(built_pairs),
        filter_shape=tuple(filter_shape),
        is_torus=torus,
        stride=stride_t,
        lhs_dilation=lhs_t,
        rhs_dilation=rhs_t,
        torus_pad=wrap,
        zero_pad=zero,
        bias_modes=() if bias_modes is None else bias_modes if isinstance(bias_modes, str) else tuple(bias_modes),
    )


def check_operands(spec: ConvSpec, inputs: Sequence, weights: Sequence) -> tuple[int, ...]:
    """Check input and weight shapes against the spec; return the input spatial dims.

    Raises ValueError naming the offending argument and its shape.
    """
    if not isinstance(spec, ConvSpec):
        raise TypeError(f"`spec` (={type(spec).__name__}) must be a kernels.ConvSpec (from kernels.make_spec)")
    for name, arrays in (("inputs", inputs), ("weights", weights)):
        for i, x in enumerate(arrays):
            if not hasattr(x, "shape") or not hasattr(x, "dtype"):
                raise TypeError(
                    f"`{name}[{i}]` (={type(x).__name__}) must be an array (jax or numpy), not a "
                    "nested Python sequence: wrap it in jnp.asarray"
                )
            check_float_dtype(x, f"`{name}[{i}]`")
    if len(inputs) != len(spec.in_keys):
        raise ValueError(
            f"`inputs` has {len(inputs)} blocks but the layer expects {len(spec.in_keys)} "
            f"(keys (k, parity, channels) = {spec.in_keys})"
        )
    if len(weights) != len(spec.pairs):
        raise ValueError(f"`weights` has {len(weights)} arrays but the layer has {len(spec.pairs)} pairs")
    D = spec.D
    spatial = None
    for a, (x, (k, p, c)) in enumerate(zip(inputs, spec.in_keys)):
        shape = tuple(x.shape)
        if len(shape) != 1 + D + k or shape[0] != c or shape[1 + D :] != (D,) * k:
            raise ValueError(
                f"input block {a} (k={k}, parity={p}) has shape {shape}; expected "
                f"({c}, *spatial[{D}], *{(D,) * k})"
            )
        sp = shape[1 : 1 + D]
        if spatial is None:
            spatial = sp
        elif sp != spatial:
            raise ValueError(f"input block {a} has spatial dims {sp}, others have {spatial}")
    for t, (w, pair) in enumerate(zip(weights, spec.pairs)):
        expected = (spec.out_keys[pair.out_index][2], spec.in_keys[pair.in_index][2], pair.basis.n_filters)
        if tuple(w.shape) != expected:
            raise ValueError(f"weights of pair {t} have shape {tuple(w.shape)}; expected {expected}")
    assert spatial is not None
    # a torus wrap wider than the axis repeats the axis (as jnp.pad's 'wrap' does): allowed
    out_spatial = spec.out_spatial(spatial)
    for ax, n_out in enumerate(out_spatial):
        if n_out > 0:
            continue
        m, rd, ld = spec.filter_shape[ax], spec.rhs_dilation[ax], spec.lhs_dilation[ax]
        reach = (m - 1) * rd + 1
        n = spatial[ax]
        padded = (n + sum(spec.torus_pad[ax]) - 1) * ld + 1 + sum(spec.zero_pad[ax])
        raise ValueError(
            f"input spatial axis {ax} is too small: it has {n} cells, {padded} after padding (wrap "
            f"{spec.torus_pad[ax]}, zeros {spec.zero_pad[ax]}"
            + (f", lhs_dilation {ld}" if ld != 1 else "")
            + f"), fewer than the {reach} cells the filter reaches (size {m}"
            + (f" dilated by rhs_dilation {rd}" if rd != 1 else "")
            + f"): give at least {n + reach - padded} more cells on that axis or pad more "
            "('SAME', 'TORUS' or explicit pairs)"
        )
    return spatial


def check_residual(spec: ConvSpec, spatial: Sequence[int], residual) -> Optional[tuple]:
    """`residual` (None, or per output key None or an array of that output's shape, added to it)
    as a tuple, None when it holds no array. Raises ValueError naming `residual` and the entry."""
    if residual is None:
        return None
    if hasattr(residual, "shape") or not isinstance(residual, Sequence) or len(residual) != len(spec.out_keys):
        raise ValueError(
            f"`residual` (={type(residual).__name__}) must be a sequence of {len(spec.out_keys)} entries, one per "
            "output key (None or an array of that output's shape)"
        )
    out_spatial = spec.out_spatial(spatial)
    for b, (r, (k, _, o)) in enumerate(zip(residual, spec.out_keys)):
        if r is None:
            continue
        want = (o,) + tuple(out_spatial) + (spec.D,) * k
        if not hasattr(r, "shape") or tuple(r.shape) != want:
            raise ValueError(f"`residual[{b}]` (shape {tuple(getattr(r, 'shape', ()))}) must have output {b}'s shape {want}")
        check_float_dtype(r, f"`residual[{b}]`")
    return tuple(residual) if any(r is not None for r in residual) else None


def check_float_dtype(x, name: str) -> None:
    """The dtype policy: ConvContract operands are floating point (float16, bfloat16, float32,
    float64); anything else raises a ValueError naming the operand."""
    dtype = np.dtype(x.dtype)
    if dtype.name not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} has dtype {dtype.name}; ConvContract takes floating-point arrays "
            "(float16, bfloat16, float32 or float64): cast it, e.g. with .astype(jnp.float32)"
        )

