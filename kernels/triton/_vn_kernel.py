"""Triton source of the VectorNeuron nonlinearity of one non-scalar block: one forward kernel and
one backward kernel (input gradient plus per-program partial sums of the weight gradient), each
reading its operands once and writing its results once.

In kernel terms a block is (c, T, S) per batch element, T = D^k components of S pixels, laid
out either component-planar (`VNGeometry.planar`: a plane of S pixels contiguous per channel and
component, as the Triton ConvContract kernels keep vector blocks) or components-minor (the T
components of a pixel adjacent, (c, S, T), as the CUDA ConvContract kernels keep them). A
program owns one batch element and a tile of P pixels (the backward: a share of the tiles,
walked in a loop, so that its (c, c) weight gradient partial stays in registers). Per tile, for
each component t, x_t is a (C, P) tile (channels padded to a power of 2 >= 16, tl.dot's
minimum) and d_t = W x_t one fp32 `tl.dot` ("ieee": no TF32, so the result is the fp32 GEMM's);
the rest is elementwise across the T tiles (the math is in kernels/triton/vector_neuron.py's
docstring). Sizes, eps and the activation are
literals of the generated source: one compiled kernel per (c, T, S, P, activation, eps).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Optional

from .._env import env_choice
from .._fused import next_pow2
from .._precision import resolve_precision
from .._vn_args import ACTIVATIONS
from ._tiling import KernelPlan, interpreting

PRECISIONS = ("ieee", "tf32x3", "tf32")
# sqrt(2 / pi) and the cubic coefficient of jax.nn.gelu's tanh form (approximate=True)
_GELU_C = repr(math.sqrt(2.0 / math.pi))
_GELU_A = "0.044715"


@dataclasses.dataclass(frozen=True)
class VNBlocks:
    """Tiling of the VectorNeuron kernels; None picks `default_tiling`.

    Attributes:
        pixels, num_warps: pixels per tile (a power of 2 >= 16) and warps of the forward.
        bwd_pixels, bwd_num_warps: the same for the backward.
        groups: backward programs per batch element (each walks every groups-th pixel tile and
            writes one (c, c) weight-gradient partial); None fills the GPU (a few programs per SM).
        bwd_stages: Triton's software-pipelining depth of the backward's loop over tiles (None: 1).
        precision: the channel-mixing dots' `input_precision`: "ieee" (None; fp32 FMA dots),
            "tf32x3" (tensor cores, three TF32 products: about fp32's accuracy) or "tf32".
        save_mix: under differentiation, the forward also writes d = W x (a block-sized
            residual) and the backward reads it instead of recomputing it: three of the
            backward's nine dots per tile traded for one more block written and read (None:
            False, recompute).
    """

    pixels: Optional[int] = None
    num_warps: Optional[int] = None
    bwd_pixels: Optional[int] = None
    bwd_num_warps: Optional[int] = None
    groups: Optional[int] = None
    bwd_stages: Optional[int] = None
    precision: Optional[str] = None
    save_mix: Optional[bool] = None

    def validate(self) -> None:
        for name in ("pixels", "bwd_pixels"):
            v = getattr(self, name)
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"`blocks.{name}` (={v!r}) must be None or a power of 2 >= 16")
        for name in ("num_warps", "bwd_num_warps"):
            v = getattr(self, name)
            if v is not None and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"`blocks.{name}` (={v!r}) must be None or a power of 2 up to 16")
        if self.groups is not None and self.groups < 1:
            raise ValueError(f"`blocks.groups` (={self.groups!r}) must be None or >= 1")
        if self.bwd_stages is not None and self.bwd_stages < 1:
            raise ValueError(f"`blocks.bwd_stages` (={self.bwd_stages!r}) must be None or >= 1")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"`blocks.precision` (={self.precision!r}) must be None or one of {PRECISIONS}")
        if self.save_mix not in (None, True, False):
            raise ValueError(f"`blocks.save_mix` (={self.save_mix!r}) must be None, True or False")


@dataclasses.dataclass(frozen=True)
class VNGeometry:
    """What one launch fixes: channels, components, pixels and which operands carry the batch."""

    channels: int
    components: int
    pixels: int
    x_batched: bool
    w_batched: bool
    g_batched: bool = False  # the cotangent (backward only)
    planar: bool = True  # (c, T, S) per example; False: components minor, (c, S, T)
    # the block is x and the nonlinearity's input y = M_c (x - shift_c) + v_c (`affine_row`)
    affine: bool = False
    a_batched: bool = False  # the affine coefficients carry the batch

    @property
    def strides(self) -> tuple[int, int]:
        """(pixel, component) strides in floats within a channel."""
        return (1, self.pixels) if self.planar else (self.components, 1)


# Default (pixels, warps) of the forward and the backward by (padded channels, components <= 3 or
# more). Triton's fp32 ("ieee") dot hands every thread whole operand rows, so registers jump with
# the tile and the warps, and not monotonically; the register counts in brackets are ptxas' for
# sm_90a (cuobjdump --dump-resource-usage). Timed on the H200 only at C=16, T=3 (d3_n64_b4_c16,
# bench/NOTES.md "VectorNeuron as one Triton kernel"): the backward is bound by L1/shared-memory
# traffic (ncu: 94% L1/TEX throughput at P=32, 4 warps; the FMA dots read their operands through
# shared memory, each thread whole rows), and one warp on 16 pixels reads the least per product:
# 5.60 ms for 8 chained fwd+bwd against 6.83 at (32, 4), 6.60 at (32, 1), 7.15 at (16, 2);
# pipelining the loop or tensor-core dots (tf32x3) were slower. At C=32, T=3 (the d3_n64_b2_c32
# block, H100, bench.vector_neuron_spike, session 34) the backward at (32, 4) took fwd_bwd from
# 2.31 to 1.44 ms against the (16, 8) register pick ((16, 4) 1.50, (64, 8) 1.87, (32, 8) 2.14).
# The other rows are register picks.
_DEFAULT_TILING = {
    (16, False): ((64, 4), (16, 1)),  # forward [96]
    (16, True): ((16, 8), (16, 8)),  # [48], [102]
    (32, False): ((32, 8), (32, 4)),  # [48], measured
    (32, True): ((16, 8), (16, 8)),
    (64, False): ((16, 8), (16, 8)),  # [117], [254]
    (64, True): ((16, 8), (16, 8)),
}
MAX_CHANNELS = 64  # wider blocks take the XLA path: the fp32 dot's operands outgrow the registers


PRECISION_ENV = "GINJAX_VN_TRITON_PRECISION"
# "auto" runs the dots in TF32 on blocks of at least TF32_MIN_CHANNELS channels and at most
# TF32_MAX_COMPONENTS components where JAX's default matmul precision is TF32. On an H100 (session 45,
# `-env-ab-vn-precision-*`) TF32 in every Triton VectorNeuron kernel took the 2D UNet step from
# 34.23 / 33.96 to 32.43 / 32.47 ms (two rounds in alternation) and the 3D one from 31.13 to 31.83:
# with 3 components TF32 spills (ptxas: 488 stack bytes at (32, 3), 112 at (64, 3); none at (64, 2),
# 248 registers against ieee's 254), so only 2D vector blocks of 64 channels and more take it.
TF32_MIN_CHANNELS: Optional[int] = 64
TF32_MAX_COMPONENTS = 2


def default_precision(channels: int, components: int) -> str:
    """The channel-mixing dots' precision where `VNBlocks.precision` is None, read as a call is
    traced: $GINJAX_VN_TRITON_PRECISION "ieee", "tf32" or "tf32x3" as given, or "auto" (the
    default): "tf32" for blocks of at least `TF32_MIN_CHANNELS` channels and at most
    `TF32_MAX_COMPONENTS` components when JAX's default matmul precision is TF32
    (`kernels._precision.resolve_precision(None)`: the XLA path's dots then run in TF32 too), else
    "ieee"."""
    choice = env_choice(PRECISION_ENV, ("auto",) + PRECISIONS, "auto")
    if choice != "auto":
        return choice
    wide = TF32_MIN_CHANNELS is not None and channels >= TF32_MIN_CHANNELS and components <= TF32_MAX_COMPONENTS
    return "tf32" if wide and resolve_precision(None) == "tf32" else "ieee"


def fits(channels: int, components: int) -> bool:
    """Whether the default tiling keeps a block of these sizes in registers (ptxas, above): up to
    64 channels for vectors, 32 for more components (64 with 9 spill in the backward)."""
    return _padded(channels) <= (MAX_CHANNELS if components <= 3 else MAX_CHANNELS // 2)
# the interpreter runs programs one after another: few large tiles are faster there
_HOST_PIXELS = 1024
# backward programs over all batch elements the automatic `groups` aims for (8 per H200 SM)
_BWD_PROGRAMS = 132 * 8


def default_tiling(g: VNGeometry, backward: bool) -> tuple[int, int]:
    """(pixels per tile, warps) of the forward or backward kernel for a launch's geometry."""
    if interpreting():
        return max(16, min(_HOST_PIXELS, next_pow2(g.pixels))), 4
    key = (min(max(_padded(g.channels), 16), MAX_CHANNELS), g.components > 3)
    return _DEFAULT_TILING[key][1 if backward else 0]


def tiling(blocks: VNBlocks, g: VNGeometry, backward: bool) -> tuple[int, int]:
    pixels, warps = default_tiling(g, backward)
    given_p, given_w = (blocks.bwd_pixels, blocks.bwd_num_warps) if backward else (blocks.pixels, blocks.num_warps)
    pixels = given_p if given_p is not None else min(pixels, max(16, next_pow2(g.pixels)))
    return pixels, given_w if given_w is not None else warps


def backward_groups(blocks: VNBlocks, g: VNGeometry, batch: int, pixels: int) -> int:
    tiles = -(-g.pixels // pixels)
    if blocks.groups is not None:
        return min(blocks.groups, tiles)
    if interpreting():
        return 1
    target = max(1, min(tiles, -(-_BWD_PROGRAMS // batch)))
    # a divisor of the tile count near the target spares the last round its masks
    divisor = max(d for d in range(1, target + 1) if tiles % d == 0)
    return divisor if 2 * divisor >= target else target


def _padded(c: int) -> int:
    return max(16, next_pow2(c))


class _Emit:
    """Source lines at an indentation depth."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 1

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)


def _header(name: str, args) -> list[str]:
    return ["import triton", "import triton.language as tl", "", "", "@triton.jit", f"def {name}({', '.join(args)}):"]


def _emit_channels_and_weights(e: _Emit, g: VNGeometry, transposed: bool, mixing: bool = True) -> None:
    """The channel indices and their mask, W (where the kernel forms d = W x: `mixing`), W^T (the
    backward: `transposed`) and x's batch base: what both kernels set up once per program, after
    `bat`."""
    C = g.channels
    e(f"ch = tl.arange(0, {_padded(C)})")
    e(f"c_ok = ch < {C}")
    e(f"wb = w + bat * {C * C}" if g.w_batched else "wb = w")
    wmask = ", mask=c_ok[:, None] & c_ok[None, :], other=0.0" if _padded(C) != C else ""
    if mixing:
        e(f"wm = tl.load(wb + ch[:, None] * {C} + ch[None, :]{wmask})")
    if transposed:
        e(f"wt = tl.load(wb + ch[None, :] * {C} + ch[:, None]{wmask})")
    e(f"xb = x + bat * {C * g.components * g.pixels}" if g.x_batched else "xb = x")


def affine_row(components: int) -> int:
    """Floats per channel of the affine coefficients: M (T x T, row-major), v (T), shift (T)."""
    return components * components + 2 * components


def _emit_affine_coefficients(e: _Emit, g: VNGeometry) -> None:
    """The program's row of affine coefficients, `ab` (loaded where `_emit_affine` uses them)."""
    e(f"ab = aff + bat * {g.channels * affine_row(g.components)}" if g.a_batched else "ab = aff")


def _emit_affine(e: _Emit, g: VNGeometry) -> None:
    """x{t} <- y{t} = sum_j m{t}{j} (x{j} - sh{j}) + v{t}, in registers (the tile's x is not kept).
    The coefficients are loaded here, per tile, as (C, 1) columns (padded channels 0, so their y
    is 0 as their x is): held across the backward's pixel loop, the 15 columns of 3D vectors
    pushed its 16-channel kernel into spilling (compiled offline for sm_90); reloaded per tile
    they are L1 hits and live only through these lines."""
    C, T = g.channels, g.components
    K = affine_row(T)
    lm = ", mask=c_ok, other=0.0" if _padded(C) != C else ""
    col = lambda n: f"tl.load(ab + ch * {K} + {n}{lm})[:, None]"  # noqa: E731
    for j in range(T):
        e(f"xs{j} = x{j} - {col(T * T + T + j)}")
    for i in range(T):
        e(f"pre{i} = " + " + ".join(f"{col(i * T + j)} * xs{j}" for j in range(T)) + f" + {col(T * T + i)}")
    for i in range(T):
        e(f"x{i} = pre{i}")


def reads_whole_pixels(channels: int, components: int) -> bool:
    """Whether a components-minor block of these sizes is read a whole pixel at a time
    (`_packed`), the case in which "minor" beat "planar" in a ResNet step on the H200."""
    return components in (2, 3, 4) and _padded(channels) <= 32


def _packed(g: VNGeometry) -> bool:
    """Whether a components-minor block is read and written a whole pixel at a time: one
    (C, P, T') load of T' = 2 or 4 (T = 3 padded, the fourth masked) consecutive floats per pixel,
    split into the T component tiles (`tl.split`), instead of T loads at stride T, each of whose
    warp loads touches T times the cache lines of one component's 32 pixels, for every operand.
    Compiled offline for sm_90 (Triton 3.9), the (C, P, 4) loads are laid out 4 threads along the
    pixel's floats and 8 along the pixels: a warp load reads 8 whole pixels, 96 contiguous bytes.
    Not past 32 (padded) channels: there the backward's packed tiles spill (280 bytes of stack at
    64 channels, none planar or strided)."""
    return not g.planar and reads_whole_pixels(g.channels, g.components)


def _emit_tile(e: _Emit, g: VNGeometry, P: int, ragged: bool, operands) -> str:
    """Pixel indices of the tile `tile` and loads of each (name, pointer) operand's T component
    tiles name0 .. name{T-1}, (C, P) each; returns the mask of the tile's stores (`_emit_store`)."""
    C, T, S = g.channels, g.components, g.pixels
    e(f"p = tile * {P} + tl.arange(0, {P})")
    if ragged:
        e(f"p_ok = p < {S}")
    if _packed(g):
        TP = 2 if T == 2 else 4
        e(f"k = tl.arange(0, {TP})")
        masks = (["c_ok[:, None, None]"] if _padded(C) != C else []) + (["p_ok[None, :, None]"] if ragged else [])
        masks += [f"(k < {T})[None, None, :]"] if TP != T else []
        mask = " & ".join(masks)
        e(f"rows = (ch * {T * S})[:, None, None] + (p * {T})[None, :, None] + k[None, None, :]")
        for name, ptr in operands:
            lm = f", mask={mask}, other=0.0" if mask else ""
            e(f"{name}_px = tl.load({ptr} + rows{lm})")
            if TP == 2:
                e(f"{name}0, {name}1 = tl.split({name}_px)")
            else:  # (C, P, 4) -> (C, P, 2, 2): [i, j] is component 2 i + j
                e(f"{name}_e, {name}_o = tl.split(tl.reshape({name}_px, ({_padded(C)}, {P}, 2, 2)))")
                e(f"{name}0, {name}2 = tl.split({name}_e)")
                e(f"{name}1, {name}3 = tl.split({name}_o)")
        return mask
    masks = []
    if _padded(C) != C:
        masks.append("c_ok[:, None]")
    if ragged:
        masks.append("p_ok[None, :]")
    mask = " & ".join(masks)
    sp, st = g.strides
    e(f"rows = (ch * {T * S})[:, None] + " + ("p[None, :]" if sp == 1 else f"(p * {sp})[None, :]"))
    for name, ptr in operands:
        for t in range(T):
            lm = f", mask={mask}, other=0.0" if mask else ""
            e(f"{name}{t} = tl.load({ptr} + rows + {t * st}{lm})")
    return mask


def _emit_store(e: _Emit, g: VNGeometry, P: int, base: str, values: dict, mask: str) -> None:
    """Store component tiles of the tile at `base` with the tile's `mask` (`_emit_tile`'s):
    `values` maps a component to an expression, (C, P); a packed block takes all T at once."""
    sm = f", mask={mask}" if mask else ""
    if not _packed(g):
        for t, v in values.items():
            e(f"tl.store({base} + rows + {t * g.strides[1]}, {v}{sm})")
        return
    if sorted(values) != list(range(g.components)):
        raise ValueError(f"a packed store takes every component at once (got {sorted(values)})")
    for t, v in values.items():
        e(f"st{t} = {v}")
    if g.components == 2:
        e(f"tl.store({base} + rows, tl.join(st0, st1){sm})")
        return
    if g.components == 3:
        e("st3 = tl.zeros_like(st0)")  # the masked fourth float of each pixel
    e(f"tl.store({base} + rows, tl.reshape(tl.join(tl.join(st0, st2), tl.join(st1, st3)), "
      f"({_padded(g.channels)}, {P}, 4)){sm})")


def _emit_local(e: _Emit, g: VNGeometry, activation: str, eps: str, derivative: bool, precision: str,
                saved_mix: bool = False) -> None:
    """d_t = W x_t (with `saved_mix`: the tiles dm_t loaded beside x_t), then n, u_t, s and h(s)
    (and h'(s) with `derivative`)."""
    T = g.components
    for t in range(T):
        e(f"d{t} = dm{t}" if saved_mix else f"d{t} = tl.dot(wm, x{t}, input_precision=\"{precision}\")")
    e("nsq = " + " + ".join(f"d{t} * d{t}" for t in range(T)))
    e("pos = nsq > 0")
    e("n = tl.where(pos, tl.sqrt_rn(tl.where(pos, nsq, 1.0)), 0.0)")
    e(f"inv = 1.0 / (n + {eps})")
    for t in range(T):
        e(f"u{t} = d{t} * inv")
    e("s = " + " + ".join(f"x{t} * u{t}" for t in range(T)))
    if activation == "relu":
        e("act = tl.where(s > 0, s, 0.0)")
        if derivative:
            e("dact = tl.where(s > 0, 1.0, 0.0)")
    elif activation == "gelu":
        e(f"z = {_GELU_C} * (s + {_GELU_A} * (s * s * s))")
        # tanh(z) from exp(-2|z|) <= 1: no overflow at either end
        e("ez = tl.exp(-2.0 * tl.abs(z))")
        e("th = (1.0 - ez) / (1.0 + ez)")
        e("th = tl.where(z < 0, -th, th)")
        e("cdf = 0.5 * (1.0 + th)")
        e("act = s * cdf")
        if derivative:
            e(f"dact = cdf + s * 0.5 * (1.0 - th * th) * {_GELU_C} * (1.0 + {3 * float(_GELU_A)!r} * (s * s))")
    else:
        raise ValueError(f"`activation` (={activation!r}) must be one of {ACTIVATIONS}")
    e(f"q = tl.abs(s) + {eps}")
    e("gain = act / q")
    e("h = (gain - 1.0) * s")
    if derivative:
        # d/ds of (act(s) / (|s| + eps) - 1) s, with d|s|/ds = sign(s) (0 at 0, as jnp.abs)
        e("sgn = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))")
        e("dh = (dact / q - act * sgn / (q * q)) * s + (gain - 1.0)")


def _name(kind: str, key) -> str:
    return f"vector_neuron_{kind}_" + hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def _finish(name, args, e: _Emit, programs: int, warps: int, stages: int = 1) -> KernelPlan:
    source = "\n".join(_header(name, args) + e.lines) + "\n"
    return KernelPlan(name=name, source=source, programs_per_batch=programs, out_spatial=(),
                      num_warps=warps, num_stages=stages, nonzeros=0, peak_live_z=0)


@functools.lru_cache(maxsize=128)
def plan_forward(g: VNGeometry, activation: str, eps: float, pixels: int, warps: int,
                 precision: str = "ieee", save_mix: bool = False, sums: bool = False,
                 residual: bool = False) -> KernelPlan:
    """y = x + h(s) u for one tile of `pixels` pixels per program: kernel(x, w, y), or with
    `save_mix` kernel(x, w, y, dm), also storing d = W x into dm (the block's shape and layout).
    With `g.affine` kernel(x, w, aff, y[, dm]): the nonlinearity of M (x - shift) + v, its
    coefficients (c, `affine_row`) per example in aff. With `sums` a last result part
    (B, tiles, C * T): each program's sums of y over its tile's pixels, per channel and component
    ([c * T + t]), for the caller to add up (XLA's column sum): the block's spatial means (a consumer's
    "mean" bias reads them, kernels._bias) without another pass over y. With `residual` an operand
    `resid` after the block's (and the coefficients'): a block of y's shape, layout and batch added
    to y (y = x + h(s) u + resid; the sums include it), e.g. a residual block's input."""
    C, T, S = g.channels, g.components, g.pixels
    P = pixels
    tiles = -(-S // P)
    e = _Emit()
    e("pid = tl.program_id(0)")
    e(f"tile = pid % {tiles}")
    e(f"bat = (pid // {tiles}).to(tl.int64)  # 64-bit: batch offsets may pass 2^31")
    _emit_channels_and_weights(e, g, transposed=False)
    e(f"yb = y + bat * {C * T * S}")
    if residual:
        e(f"resb = resid + bat * {C * T * S}")
    if save_mix:
        e(f"dmb = dm + bat * {C * T * S}")
    if g.affine:
        _emit_affine_coefficients(e, g)
    mask = _emit_tile(e, g, P, S % P != 0, [("x", "xb")] + ([("res", "resb")] if residual else []))
    if g.affine:
        _emit_affine(e, g)
    _emit_local(e, g, activation, repr(float(eps)), derivative=False, precision=precision)
    for t in range(T):
        e(f"y{t} = x{t} + h * u{t}" + (f" + res{t}" if residual else ""))
    _emit_store(e, g, P, "yb", {t: f"y{t}" for t in range(T)}, mask)
    if save_mix:
        _emit_store(e, g, P, "dmb", {t: f"d{t}" for t in range(T)}, mask)
    if sums:
        # pixels past the block's end: x loads as 0, but the affine map makes their y v - M shift
        ragged = S % P != 0
        e(f"sb = part + (bat * {tiles} + tile) * {C * T} + ch * {T}")
        sm = ", mask=c_ok" if _padded(C) != C else ""
        for t in range(T):
            y = f"tl.where(p_ok[None, :], y{t}, 0.0)" if ragged else f"y{t}"
            e(f"tl.store(sb + {t}, tl.sum({y}, axis=1){sm})")
    key = (g, activation, eps, P, warps) + ((precision,) if precision != "ieee" else ())
    key += ("save_mix",) if save_mix else ()
    key += ("sums",) if sums else ()
    key += ("residual",) if residual else ()
    args = (["x", "w"] + (["aff"] if g.affine else []) + (["resid"] if residual else []) + ["y"]
            + (["dm"] if save_mix else []) + (["part"] if sums else []))
    return _finish(_name("fwd", key), args, e, tiles, warps)


@functools.lru_cache(maxsize=128)
def plan_backward(g: VNGeometry, activation: str, eps: float, pixels: int, warps: int, groups: int,
                  precision: str = "ieee", stages: int = 1, saved_mix: bool = False) -> KernelPlan:
    """gx and the weight gradient's partials for one share of the pixel tiles per program:
    kernel(x, w, gy, gx, part), part (B, groups, C * C), summed in a fixed order afterwards; with
    `saved_mix` kernel(x, w, gy, dm, gx, part), d = W x read from dm (batched like gx). With
    `g.affine` aff follows w (as in `plan_forward`) and gx is the gradient in y = M (x - shift) + v,
    the nonlinearity's input (the affine map's own backward is the caller's)."""
    C, T, S = g.channels, g.components, g.pixels
    P = pixels
    tiles = -(-S // P)
    n_iter = -(-tiles // groups)
    e = _Emit()
    e("pid = tl.program_id(0)")
    e(f"grp = pid % {groups}")
    e(f"bat = (pid // {groups}).to(tl.int64)")
    _emit_channels_and_weights(e, g, transposed=True, mixing=not saved_mix)
    e(f"gb = gy + bat * {C * T * S}" if g.g_batched else "gb = gy")
    if saved_mix:
        e(f"dmb = dm + bat * {C * T * S}")
    e(f"gxb = gx + bat * {C * T * S}")
    if g.affine:
        _emit_affine_coefficients(e, g)
    e(f"gw = tl.zeros(({_padded(C)}, {_padded(C)}), tl.float32)")
    e(f"for it in range({n_iter}):")
    e.depth += 1
    e(f"tile = grp + it * {groups}")
    # a share past the last tile has p >= S everywhere: masked loads give zeros, whose gradient
    # terms are all zero
    ragged = S % P != 0 or tiles % groups != 0
    mask = _emit_tile(e, g, P, ragged, [("x", "xb"), ("gy", "gb")] + ([("dm", "dmb")] if saved_mix else []))
    if g.affine:  # masked pixels get y = v - M shift, but gy = 0 there: no gradient terms
        _emit_affine(e, g)
    _emit_local(e, g, activation, repr(float(eps)), derivative=True, precision=precision, saved_mix=saved_mix)
    e("gs = (" + " + ".join(f"gy{t} * u{t}" for t in range(T)) + ") * dh")
    for t in range(T):
        e(f"gu{t} = h * gy{t} + gs * x{t}")
    # d|d|/dd = d / |d|, 0 at d = 0
    e("inv_n = tl.where(pos, 1.0 / tl.where(pos, n, 1.0), 0.0)")
    e("coef = (" + " + ".join(f"gu{t} * d{t}" for t in range(T)) + ") * (inv * inv * inv_n)")
    for t in range(T):
        e(f"gd{t} = gu{t} * inv - coef * d{t}")
        e(f"gx{t} = gy{t} + gs * u{t} + tl.dot(wt, gd{t}, input_precision=\"{precision}\")")
        if not _packed(g):  # stored as it is made (a packed store takes all T at once, below)
            _emit_store(e, g, P, "gxb", {t: f"gx{t}"}, mask)
        e(f"gw = tl.dot(gd{t}, tl.trans(x{t}), gw, input_precision=\"{precision}\")")
    if _packed(g):
        _emit_store(e, g, P, "gxb", {t: f"gx{t}" for t in range(T)}, mask)
    e.depth -= 1
    wmask = ", mask=c_ok[:, None] & c_ok[None, :]" if _padded(C) != C else ""
    e(f"tl.store(part + (bat * {groups} + grp) * {C * C} + ch[:, None] * {C} + ch[None, :], gw{wmask})")
    key = (g, activation, eps, P, warps, groups) + ((precision, stages) if (precision, stages) != ("ieee", 1) else ())
    key += ("saved_mix",) if saved_mix else ()
    args = ["x", "w"] + (["aff"] if g.affine else []) + ["gy"] + (["dm"] if saved_mix else []) + ["gx", "part"]
    return _finish(_name("bwd", key), args, e, groups, warps, stages)
