"""Transposed and strided convolutions of the `dense` backend without dilated or strided lax convs.

A convolution with lhs_dilation s (a transposed convolution: the UNet's upsampling) reads, per
output pixel, only the taps that land on an input pixel rather than in a dilation hole. Cuts of
the output by residue j mod s ("phases") each see a fixed subset of taps, every s-th one, so
each phase is a stride-1 correlation of the *undilated* input with that sub-filter (sub-pixel
decomposition). When the filter side equals s on every axis each phase has exactly one tap:
the whole layer is ONE GEMM of the input with the s^D taps stacked along the output channels,
then an interleave of the phases (depth-to-space), and no convolution at all. lax's dilated form
does s^D times that work, mostly on zeros, and cuDNN runs it on a slow indexed kernel.

A convolution with stride s reads input position j*s + t*r for output j and tap t. Writing
position p as (p // s, p % s) folds the s^D residues into the channels (space-to-depth); tap t
then reads block j + (t*r)//s at residue (t*r) % s, a stride-1 correlation with a filter of
(M-1)*r//s + 1 taps per axis, a pure GEMM when that is 1 (M <= s, r = 1).

A convolution with rhs_dilation r (DilResNet's atrous layers) reads input i + r*t for output i
and tap t. Writing both as (cell // r, cell % r) splits them into r^D phases that never mix:
output phase rho reads input phase rho, undilated, so the layer is r^D stride-1 convolutions of
1/r^D of the grid each, run as one convolution with the phases in its batch (a GPU's default;
$GINJAX_DENSE_DILATED=lax / phases picks either). Where it applies, the output extent of every
dilated axis must divide by r; elsewhere the lax dilated convolution stays. cuDNN's dilated
backward is its slow path: on the H100 a 2D DilResNet layer (256^2, batch 8, 96 -> 96 channels)
took 22.4 ms fwd_bwd dilated, 3.0-3.2 ms as phases (bench/NOTES.md, "Session 37").

All three rewrites are pads, reshapes, transposes, slices, GEMMs and stride-1 VALID convolutions,
so JAX's autodiff of them contains no dilated or strided convolution either: the transpose of a
stride-1 convolution is a stride-1 convolution, of a GEMM a GEMM.

Per axis, with the wrapped input x of n cells, zero padding (lo, hi), lhs_dilation s (spec
docstring: the padded, then dilated, then zero-padded input):
    dilated+padded position q = s*i + lo holds x[i]; output j reads q = j + t (rhs_dilation 1).
    Output j = phi + s*J, tap t contributes iff (phi + t - lo) % s == 0, reading
    x[J + (phi + t - lo) // s]; the taps of phase phi are t0, t0+s, ... with t0 = (lo - phi) % s.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import string
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._env import env_choice
from ._lax_common import conv_general_channels_last, dimension_numbers
from ._spec import ConvSpec

# The one-GEMM sub-pixel form's product order: "channels-last" (`_subpixel`) is (*J, *s, Cout),
# whose depth-to-space and the blocks' unpacking after it (channels first) read with a stride of
# s^D Cout floats; "channels-first" (`conv_channels_first`) is (*s, Cout, *J), where they read
# rows of J contiguous floats. On the H200 the UNet step's relayouts of the first order took
# ~0.9 ms (loop_slice_fusion and _depth_to_space's transpose, -083f1f8-profile-unet_d3_n64_b4.*);
# on an H100 the second order took 0.58 ms off the UNet step (twice, in alternation, session 33),
# so it is a GPU's default. Unmeasured on a CPU, which keeps the first.
SUBPIXEL_ORDER_ENV = "GINJAX_SUBPIXEL_ORDER"
# rhs-dilated layers: "lax" (one dilated lax convolution) or "phases" (`_dilated_phases`). cuDNN runs
# a dilated layer's forward at 0.8-0.9 ms but its backward at ~21.5 ms (2D, 32+32 channels, 256^2,
# batch 8, H100); as phases the layer's fwd_bwd is 3.0-3.2 ms, and the dense DilResNet steps went
# from 253.1 to 55.4 ms (2D) and from 535.6 to 151.5 ms (3D): so a GPU's default. A CPU showed no
# gain (XLA's CPU convolution has no slow dilated path) and keeps lax.
DILATED_ENV = "GINJAX_DENSE_DILATED"


def dilated_form() -> str:
    """$GINJAX_DENSE_DILATED: "lax" or "phases", read at trace time; by default phases on a GPU,
    lax elsewhere."""
    default = "phases" if jax.default_backend() == "gpu" else "lax"
    return env_choice(DILATED_ENV, ("lax", "phases"), default)


def subpixel_order() -> str:
    """$GINJAX_SUBPIXEL_ORDER: "channels-last" or "channels-first", read at trace time; by
    default channels-first on a GPU, channels-last elsewhere."""
    default = "channels-first" if jax.default_backend() == "gpu" else "channels-last"
    return env_choice(SUBPIXEL_ORDER_ENV, ("channels-last", "channels-first"), default)


@dataclasses.dataclass(frozen=True)
class Phase:
    """One residue class phi of the output along an axis of a transposed convolution.

    Attributes:
        first_tap: t0, the first filter tap the phase reads (then every s-th).
        n_taps: how many taps it reads (0: the phase is all zeros).
        offset: output J of the phase reads x[J + offset] through its first tap.
    """

    first_tap: int
    n_taps: int
    offset: int


def method(spec: ConvSpec) -> str:
    """How `dense` runs the spec: 'plain' (stride 1, no dilation), 'subpixel', 'space_to_depth',
    'dilated_phases' (rhs_dilation where `dilated_form` is phases, a GPU's default;
    `dilated_phases_fit` says whether a grid splits), or 'lax' (lhs_dilation with a stride or an
    rhs_dilation, or rhs_dilation alone elsewhere: one dilated lax convolution)."""
    upsample = any(d != 1 for d in spec.lhs_dilation)
    strided = any(s != 1 for s in spec.stride)
    if not upsample and not strided:
        if all(r == 1 for r in spec.rhs_dilation):
            return "plain"
        return "dilated_phases" if dilated_form() == "phases" else "lax"
    if upsample:
        if strided or any(r != 1 for r in spec.rhs_dilation):
            return "lax"
        return "subpixel"
    return "space_to_depth"


def axis_phases(s: int, M: int, lo: int) -> tuple[Phase, ...]:
    """The s phases of one axis with lhs_dilation s, filter side M and zero padding lo before."""
    phases = []
    for phi in range(s):
        t0 = (lo - phi) % s
        phases.append(Phase(t0, len(range(t0, M, s)), (phi + t0 - lo) // s))
    return tuple(phases)


def spec_phases(spec: ConvSpec) -> list[tuple[Phase, ...]]:
    """Each axis's phases (`axis_phases`) for the spec's lhs_dilation, filter and low padding."""
    return [axis_phases(s, m, lo) for s, m, (lo, _) in zip(spec.lhs_dilation, spec.filter_shape, spec.zero_pad)]


def _fmt(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else str(values)


def describe(spec: ConvSpec, spatial=None) -> str:
    """A line saying how `dense` computes this spec (empty for a plain stride-1 convolution);
    `spatial`, the input's grid, where the form depends on it."""
    how = method(spec)
    if how == "plain":
        return ""
    if how == "dilated_phases":
        r = spec.rhs_dilation
        if spatial is not None and not dilated_phases_fit(spec, spatial):
            return (f"one lax convolution with rhs_dilation {_fmt(r)} (the output extent "
                    f"{_fmt(spec.out_spatial(spatial))} does not divide into its phases)")
        return (f"dilation phases (rhs_dilation {_fmt(r)}: {math.prod(r)} undilated stride-1 "
                "convolutions in one batch)" + ("" if spatial is not None else ", where the output extent divides by it"))
    if how == "lax" and all(d == 1 for d in spec.lhs_dilation):  # rhs_dilation alone (the other 'lax' upsamples)
        return (f"one lax convolution with rhs_dilation {_fmt(spec.rhs_dilation)} (cuDNN's backward "
                f"takes a slow path: a GPU splits it into undilated phases, {DILATED_ENV}=phases anywhere)")
    if how == "lax":
        return (
            f"one lax convolution with lhs_dilation {_fmt(spec.lhs_dilation)}, stride "
            f"{_fmt(spec.stride)}, rhs_dilation {_fmt(spec.rhs_dilation)} (no sub-pixel form for "
            "lhs_dilation together with a stride or an rhs_dilation; cuDNN may take a slow path)"
        )
    if how == "subpixel":
        per_axis = spec_phases(spec)
        n_phases = math.prod(len(p) for p in per_axis)
        counts = [math.prod(c) for c in itertools.product(*[[p.n_taps for p in ax] for ax in per_axis])]
        if one_gemm(spec):
            order = ", product channels first" if subpixel_order() == "channels-first" else ""
            return (
                f"sub-pixel GEMM (lhs_dilation {_fmt(spec.lhs_dilation)}, {n_phases} phases, "
                f"1 tap each{order}; no convolution)"
            )
        empty = sum(1 for c in counts if c == 0)
        return (
            f"sub-pixel decomposition (lhs_dilation {_fmt(spec.lhs_dilation)}, {n_phases} phases "
            f"of {min(counts)}-{max(counts)} taps{f', {empty} all zero' if empty else ''}: "
            "stride-1 convolutions, GEMMs where a phase has 1 tap)"
        )
    K = _s2d_taps(spec)
    if all(k == 1 for k in K):
        return (
            f"space-to-depth GEMM (stride {_fmt(spec.stride)}, {math.prod(spec.stride)} residues "
            "folded into the channels, 1 tap; no convolution)"
        )
    return (
        f"space-to-depth + stride-1 convolution (stride {_fmt(spec.stride)}, "
        f"{math.prod(spec.stride)} residues folded into the channels, {'x'.join(map(str, K))} taps)"
    )


def one_gemm(spec: ConvSpec) -> bool:
    """Whether the spec's sub-pixel form is one GEMM: every phase of every axis reads one tap
    (filter side = lhs_dilation, the UNet's upsampling)."""
    if method(spec) != "subpixel":
        return False
    return all(p.n_taps == 1 for ax in spec_phases(spec) for p in ax)


def gives_channels_first(spec: ConvSpec) -> bool:
    """Whether `conv_channels_first` runs this spec: its one-GEMM form, with
    $GINJAX_SUBPIXEL_ORDER channels-first."""
    return one_gemm(spec) and subpixel_order() == "channels-first"


def conv(spec: ConvSpec, x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    """The spec's convolution of the wrapped input x (*spatial, Cin) with w (*taps, Cin, Cout).

    Only for method(spec) in ('subpixel', 'space_to_depth', 'dilated_phases'); returns
    (*out_spatial, Cout).
    """
    how = method(spec)
    if how == "subpixel":
        return _subpixel(spec, x, w, precision, out_dtype)
    if how == "space_to_depth":
        return _space_to_depth(spec, x, w, precision, out_dtype)
    if how == "dilated_phases":
        return _dilated_phases(spec, x, w, precision, out_dtype)
    raise ValueError(f"kernels._resample.conv: `spec` needs method 'subpixel', 'space_to_depth' or "
                     f"'dilated_phases', not {how!r}")


# ---- shared pieces -----------------------------------------------------------------------------
def _gemm(x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    """(*spatial, Cin) @ (Cin, Cout) -> (*spatial, Cout)."""
    return lax.dot_general(
        x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, preferred_element_type=out_dtype
    )


def _valid_conv(x: jax.Array, w: jax.Array, precision, out_dtype, batched: bool = False) -> jax.Array:
    """Stride-1, undilated, unpadded correlation of x (*spatial, Cin), or with `batched` of each
    x[n] of x (N, *spatial, Cin), with w (*taps, Cin, Cout)."""
    if all(m == 1 for m in w.shape[:-2]):
        return _gemm(x, w.reshape(w.shape[-2:]), precision, out_dtype)
    D = x.ndim - 1 - batched
    y = lax.conv_general_dilated(
        x if batched else x[None],
        w,
        window_strides=(1,) * D,
        padding="VALID",
        dimension_numbers=dimension_numbers(D),
        precision=precision,
        preferred_element_type=out_dtype,
    )
    return y if batched else y[0]


def _pad(x: jax.Array, pads) -> jax.Array:
    """Zero-pad (negative: crop) the leading spatial axes by (lo, hi) pairs; channels untouched."""
    return lax.pad(x, jnp.zeros((), x.dtype), [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])


# ---- transposed: sub-pixel decomposition ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _SubpixelPlan:
    per_axis: list  # each axis's phases
    out: list  # the output's cells per axis
    J: list  # cells every phase is computed on: ceil(out / s); the interleave is cropped to `out`
    e_lo: list  # x is padded once to cover every phase's reads: x index e_lo .. J - 1 + e_hi


def _subpixel_plan(spec: ConvSpec, n) -> _SubpixelPlan:
    s = spec.lhs_dilation
    per_axis = spec_phases(spec)
    out = [(nd - 1) * sd + 1 + lo + hi - m + 1 for nd, sd, m, (lo, hi) in zip(n, s, spec.filter_shape, spec.zero_pad)]
    return _SubpixelPlan(per_axis, out, [-(-o // sd) for o, sd in zip(out, s)],
                         [min(p.offset for p in ax if p.n_taps) for ax in per_axis])


def _subpixel_input(plan: _SubpixelPlan, x: jax.Array) -> jax.Array:
    D = len(plan.out)
    e_hi = [max(p.offset + p.n_taps - 1 for p in ax if p.n_taps) for ax in plan.per_axis]
    return _pad(x, [(-lo, j - 1 + hi - (nd - 1)) for lo, hi, j, nd in zip(plan.e_lo, e_hi, plan.J, x.shape[:D])])


def _one_gemm_filter(plan: _SubpixelPlan, w: jax.Array) -> jax.Array:
    """w (*taps, Cin, Cout) -> (Cin, (*s, Cout)): every phase's single tap along the output channels."""
    D = len(plan.out)
    for d, ax in enumerate(plan.per_axis):
        w = jnp.concatenate([lax.slice_in_dim(w, p.first_tap, p.first_tap + 1, axis=d) for p in ax], axis=d)
    return jnp.moveaxis(w, D, 0).reshape(w.shape[D], -1)


def conv_channels_first(spec: ConvSpec, x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    """`conv` of a spec that `gives_channels_first`, returning (Cout, *out_spatial): the GEMM's
    product is (*s, Cout, *J), so the phases' interleave reads rows of J contiguous floats, and
    the blocks are sliced off the leading channel axis (`kernels.dense.unpack_channels_first`)."""
    if not one_gemm(spec):
        raise ValueError("kernels._resample.conv_channels_first: `spec` has no one-GEMM sub-pixel form")
    D = spec.D
    plan = _subpixel_plan(spec, x.shape[:D])
    xp = _subpixel_input(plan, x)
    # the filter split into (Cin, *s, Cout) before the GEMM, so that its product needs no reshape:
    # under vmap a reshape would move the batch axis (a free axis of xp, behind Cout in the product)
    # to the front in a pass of its own, where the interleave's transpose below moves it for free
    w_phases = _one_gemm_filter(plan, w).reshape((w.shape[D],) + tuple(spec.lhs_dilation) + (w.shape[-1],))
    y = lax.dot_general(w_phases, xp, (((0,), (D,)), ((), ())), precision=precision, preferred_element_type=out_dtype)
    y = _phase_windows(y, plan.per_axis, plan.e_lo, plan.J, cell_axis=D + 1, phase_axis=0)
    s, C, J = y.shape[:D], y.shape[D], y.shape[D + 1 :]
    order = [D] + [a for d in range(D) for a in (D + 1 + d, d)]
    y = y.transpose(order).reshape((C,) + tuple(j * sd for j, sd in zip(J, s)))
    return y[(slice(None),) + tuple(slice(0, o) for o in plan.out)]


def _subpixel(spec: ConvSpec, x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    D = spec.D
    s = spec.lhs_dilation
    plan = _subpixel_plan(spec, x.shape[:D])
    per_axis, out, J, e_lo = plan.per_axis, plan.out, plan.J, plan.e_lo
    xp = _subpixel_input(plan, x)
    cout = w.shape[-1]

    if one_gemm(spec):
        # one GEMM of the input with every phase's single tap, phases along the output channels
        y = _gemm(xp, _one_gemm_filter(plan, w), precision, out_dtype).reshape(xp.shape[:D] + tuple(s) + (cout,))
        y = _phase_windows(y, per_axis, e_lo, J, cell_axis=0, phase_axis=D)
    else:
        parts = []
        for combo in itertools.product(*per_axis):
            if any(p.n_taps == 0 for p in combo):  # every tap of this phase hits a dilation hole
                parts.append(jnp.zeros(tuple(J) + (cout,), out_dtype))
                continue
            sub = w
            window = xp
            for d, p in enumerate(combo):
                sub = lax.slice_in_dim(sub, p.first_tap, spec.filter_shape[d], stride=s[d], axis=d)
                start = p.offset - e_lo[d]
                window = lax.slice_in_dim(window, start, start + J[d] + p.n_taps - 1, axis=d)
            parts.append(_valid_conv(window, sub, precision, out_dtype))
        y = jnp.stack(parts, axis=D).reshape(tuple(J) + tuple(s) + (cout,))
    return _depth_to_space(y, out)


def _phase_windows(y: jax.Array, per_axis, e_lo, J, cell_axis: int, phase_axis: int) -> jax.Array:
    """Per axis d, each phase's window of J[d] cells of the one-GEMM product y (cell axes from
    `cell_axis`, phase axes from `phase_axis`), shifted by the phase's offset into the padded input."""
    for d, ax in enumerate(per_axis):
        starts = [p.offset - e_lo[d] for p in ax]
        if len(set(starts)) == 1:
            y = lax.slice_in_dim(y, starts[0], starts[0] + J[d], axis=cell_axis + d)
        else:
            y = jnp.concatenate(
                [
                    lax.slice_in_dim(lax.slice_in_dim(y, phi, phi + 1, axis=phase_axis + d), st, st + J[d],
                                     axis=cell_axis + d)
                    for phi, st in enumerate(starts)
                ],
                axis=phase_axis + d,
            )
    return y


def _depth_to_space(y: jax.Array, out) -> jax.Array:
    """(*J, *s, C) -> (*out, C): output cell phi + s*J of an axis comes from phase phi of cell J."""
    D = len(out)
    J, s = y.shape[:D], y.shape[D : 2 * D]
    order = [a for d in range(D) for a in (d, D + d)] + [2 * D]
    y = y.transpose(order).reshape(tuple(j * sd for j, sd in zip(J, s)) + (y.shape[-1],))
    return y[tuple(slice(0, o) for o in out)]


# ---- strided: space-to-depth ----------------------------------------------------------------------
def _s2d_taps(spec: ConvSpec) -> tuple[int, ...]:
    """Taps per axis of the stride-1 convolution after space-to-depth: (M-1)*r // s + 1."""
    return tuple((m - 1) * r // s + 1 for m, r, s in zip(spec.filter_shape, spec.rhs_dilation, spec.stride))


def _s2d_selector(M: int, r: int, s: int) -> np.ndarray:
    """(K, s, M) 0/1: tap t of a stride-s axis reads block (t*r)//s at residue (t*r)%s."""
    K = (M - 1) * r // s + 1
    sel = np.zeros((K, s, M))
    for t in range(M):
        sel[(t * r) // s, (t * r) % s, t] = 1.0
    return sel


def _space_to_depth(spec: ConvSpec, x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    D = spec.D
    n = x.shape[:D]
    s, K = spec.stride, _s2d_taps(spec)
    out = [
        (nd + lo + hi - ((m - 1) * r + 1)) // sd + 1
        for nd, (lo, hi), m, r, sd in zip(n, spec.zero_pad, spec.filter_shape, spec.rhs_dilation, s)
    ]
    Q = [o + k - 1 for o, k in zip(out, K)]
    # zero-pad (or crop) to exactly Q*s cells so every axis splits into (Q, s)
    xp = _pad(x, [(lo, q * sd - nd - lo) for (lo, _), q, sd, nd in zip(spec.zero_pad, Q, s, n)])
    cin = x.shape[-1]
    split = xp.reshape(tuple(v for q, sd in zip(Q, s) for v in (q, sd)) + (cin,))
    order = [2 * d for d in range(D)] + [2 * d + 1 for d in range(D)] + [2 * D]
    z = split.transpose(order).reshape(tuple(Q) + (math.prod(s) * cin,))
    # the filter regrouped the same way: (*K, *s, Cin, Cout), each tap moved to its (block, residue)
    letters = iter(string.ascii_letters)
    blk, res, tap = ([next(letters) for _ in range(D)] for _ in range(3))
    ci, co = next(letters), next(letters)
    operands = [
        jnp.asarray(_s2d_selector(m, r, sd), w.dtype)
        for m, r, sd in zip(spec.filter_shape, spec.rhs_dilation, s)
    ]
    subs = [f"{blk[d]}{res[d]}{tap[d]}" for d in range(D)] + ["".join(tap) + ci + co]
    w_s2d = jnp.einsum(
        ",".join(subs) + "->" + "".join(blk) + "".join(res) + ci + co,
        *operands,
        w,
        precision=lax.Precision.HIGHEST,  # a selection: keep the weights exact
    ).reshape(tuple(K) + (math.prod(s) * cin, w.shape[-1]))
    return _valid_conv(z, w_s2d, precision, out_dtype)



# ---- rhs-dilated: phases ---------------------------------------------------------------------------
def _padded_out(spec: ConvSpec, wrapped) -> tuple[list[int], list[int]]:
    """(zero-padded extent, output extent) per axis of a stride-1 rhs-dilated convolution of the
    wrapped input grid (the torus wrap included)."""
    padded = [n + lo + hi for n, (lo, hi) in zip(wrapped, spec.zero_pad)]
    return padded, [p - (m - 1) * r for p, m, r in zip(padded, spec.filter_shape, spec.rhs_dilation)]


def _splits(out, r) -> bool:
    return all(o > 0 and o % rd == 0 for o, rd in zip(out, r))


def dilated_phases_fit(spec: ConvSpec, spatial) -> bool:
    """Whether the phases apply to the input grid `spatial` (before the torus wrap): every axis's
    output extent divides by its rhs_dilation."""
    return _splits(spec.out_spatial(spatial), spec.rhs_dilation)


def _dilated_phases(spec: ConvSpec, x: jax.Array, w: jax.Array, precision, out_dtype) -> jax.Array:
    """x (*wrapped, Cin) -> (*out, Cout): zero-pad, split each axis of P cells into (P/r, r), move
    the residues into one batch axis, one undilated VALID convolution, and interleave the output
    phases back (output cell r q + rho is phase rho's cell q, which read input cells r (q + t) + rho).
    Grids whose output extent does not divide by r take the lax dilated convolution."""
    D, r = spec.D, spec.rhs_dilation
    padded, out = _padded_out(spec, x.shape[:D])
    if not _splits(out, r):
        return conv_general_channels_last(x[None], w, stride=(1,) * D, padding=spec.zero_pad, lhs_dilation=None,
                                          rhs_dilation=r, precision=precision, out_dtype=out_dtype)[0]
    cin, cout = x.shape[-1], w.shape[-1]
    cells = tuple(p // rd for p, rd in zip(padded, r))
    split = _pad(x, spec.zero_pad).reshape(tuple(v for c, rd in zip(cells, r) for v in (c, rd)) + (cin,))
    residues_first = [2 * d + 1 for d in range(D)] + [2 * d for d in range(D)] + [2 * D]
    phases = split.transpose(residues_first).reshape((math.prod(r),) + cells + (cin,))
    y = _valid_conv(phases, w, precision, out_dtype, batched=True)  # (R, *out / r, Cout)
    y = y.reshape(tuple(r) + tuple(o // rd for o, rd in zip(out, r)) + (cout,))  # (*rho, *q, Cout)
    return _depth_to_space(jnp.moveaxis(y, tuple(range(D)), tuple(range(D, 2 * D))), out)
