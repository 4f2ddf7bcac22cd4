"""The fused ConvContract forward as a Triton kernel, generated per layer from its invariant basis.

The factorised form of ARCHITECTURE.md, for one tile of output pixels and one chunk of input
channels at a time:

    Z[c, f, j, x] = sum_{y, i} B[f, y, i, j] X[c, x + y, i]     sparse stencil, fp32 FMAs
    out[o, j, x] += sum_{c, f} w[o, c, f] Z[c, f, j, x]          tl.dot on tensor cores, fp32 acc

The basis is a constant of the layer, so the kernel source is generated with its nonzero taps and
coefficients unrolled as literals: each shifted input tile X[c, x + y, i] is loaded once and fed
to every Z that uses it, and each Z is reduced into the output accumulators (one `tl.dot` with the
weights of its filter) as soon as its last tap is in, so only a few Z tiles are ever live. The
taps are ordered to keep that number small (invariant filters live on symmetry orbits of the
taps, so the order walks orbit by orbit). All pairs of the layer run in one launch; each program
owns a box of output pixels, a block of output channels and one batch element, reads the blocks
in their native (c, *spatial, *tensor) layout, and resolves torus wrap and zero padding by index
arithmetic (no padded copy, no dense filter in HBM).

Geometry (sizes, strides, padding) is inlined as constants too: one compiled kernel per layer and
input shape, as XLA does for its own convolutions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import linecache
import math
from typing import Optional, Sequence

import numpy as np

from .._spec import ConvSpec

INT32_MAX = 2**31 - 1
# Unrolled source grows with the basis nonzeros; beyond this Triton's compile time gets silly.
MAX_NONZEROS = 6000


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the fused forward.

    Attributes:
        tile: output pixels per program along each spatial axis (powers of 2); None picks
            `default_tile(D)`.
        block_c: input channels per chunk (the K of each tl.dot; at least 16).
        block_o: most output channels per program and key (at least 16); wider keys get more
            programs, each recomputing the cheap stencil step.
        num_warps, num_stages: Triton launch options.
        max_registers: a cap on registers per thread (ptxas' `.maxnreg`), or None for ptxas' own
            choice. The stencil is latency-bound at 2 CTAs per SM: a cap trades a few spills (L1
            hits) for more resident warps. Only the GPU path applies it.
        orientation: "op" accumulates (out channels, pixels), "po" (pixels, out channels).
        vector_loads: let Triton vectorise the loads of unshifted taps. Its coalescing pass then
            gives every load and store of the same tile shape 4 pixels per thread (the widest
            vectorisable access sets it for all of them), so a warp's lanes stride 16 bytes (48 for
            vectors) and each load instruction touches 4x more cache lines; off by default.
        pixels_first: tiles as (pixels, channels) rather than (channels, pixels); None picks
            what puts the lanes along pixels for the installed Triton (see
            `triton_prefers_first_dim`).
        dw_tile, dw_num_warps, dw_units: the weight-gradient kernel's pixel tile (None: 32
            pixels along the last axis), warps and (pair, filter) accumulators per kernel. Its
            dots are (out channels x pixels) @ (pixels x in channels): with 16 x 16 results
            Triton gives every warp the whole result, so few warps and short tiles keep the
            registers in check. Defaults: the fastest of five tilings on the H200
            (bench/NOTES.md, "Backward"). dw_max_registers: max_registers of that kernel.
    """

    tile: Optional[tuple[int, ...]] = None
    block_c: int = 16
    block_o: int = 32
    num_warps: int = 8
    num_stages: int = 1
    orientation: str = "op"
    vector_loads: bool = False
    pixels_first: Optional[bool] = None
    dw_tile: Optional[tuple[int, ...]] = None
    dw_num_warps: int = 2
    dw_units: int = 4
    max_registers: Optional[int] = None
    dw_max_registers: Optional[int] = None

    def for_weight_grad(self, D: int) -> "BlockSizes":
        """The tiling of the weight-gradient kernel, as a BlockSizes of its own."""
        tile = self.dw_tile if self.dw_tile is not None else (1,) * (D - 1) + (32,)
        return dataclasses.replace(self, tile=tile, num_warps=self.dw_num_warps, max_registers=self.dw_max_registers)

    def resolved_tile(self, D: int) -> tuple[int, ...]:
        return self.tile if self.tile is not None else default_tile(D)

    def check(self, D: int) -> None:
        tile = self.resolved_tile(D)
        if len(tile) != D or any(t < 1 or t & (t - 1) for t in tile) or math.prod(tile) < 16:
            raise ValueError(f"`tile` (={self.tile!r}) must be {D} powers of 2 with at least 16 pixels")
        for name in ("block_c", "block_o"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"`{name}` (={v!r}) must be a power of 2 >= 16 (tl.dot's minimum)")
        if self.orientation not in ("op", "po"):
            raise ValueError(f"`orientation` (={self.orientation!r}) must be 'op' or 'po'")
        if self.num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"`num_warps` (={self.num_warps!r}) must be a power of 2 up to 32")
        if self.num_stages < 1:
            raise ValueError(f"`num_stages` (={self.num_stages!r}) must be >= 1")
        if self.dw_num_warps not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"`dw_num_warps` (={self.dw_num_warps!r}) must be a power of 2 up to 32")
        for name in ("max_registers", "dw_max_registers"):
            v = getattr(self, name)
            if v is not None and not 24 <= v <= 255:
                raise ValueError(f"`{name}` (={v!r}) must be None or between 24 and 255")
        if self.dw_units < 1:
            raise ValueError(f"`dw_units` (={self.dw_units!r}) must be >= 1")
        if self.dw_tile is not None:
            dataclasses.replace(self, tile=self.dw_tile, dw_tile=None).check(D)


def triton_prefers_first_dim() -> bool:
    """Whether Triton's coalescing, between dimensions of equal (unknown) contiguity, puts the
    lanes along the first one: up to 3.6 it does (a stable sort of the contiguities); 3.9 takes
    the last one. Without triton (plans built for the interpreter) it does not matter."""
    try:
        import triton
    except ImportError:
        return False
    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    return version < (3, 7)


def default_tile(D: int) -> tuple[int, ...]:
    return (1, 1, 64) if D == 3 else (1, 64)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a launch fixes beyond the spec: input sizes and which operands carry a batch axis."""

    spatial: tuple[int, ...]
    x_batched: tuple[bool, ...]
    w_batched: tuple[bool, ...] = ()
    y_batched: tuple[bool, ...] = ()  # the cotangents of the weight-gradient kernel


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    """A generated kernel and how to launch it."""

    name: str
    source: str
    programs_per_batch: int
    out_spatial: tuple[int, ...]
    num_warps: int
    num_stages: int
    nonzeros: int
    peak_live_z: int
    max_registers: Optional[int] = None


# ---- the sparse structure of the basis and the tap schedule -------------------------------------
@dataclasses.dataclass(frozen=True)
class _Term:
    """One nonzero B[f, y, i, j] of pair `pair`: Z(pair, f, j) += coef * X_a[:, x + y, i]."""

    pair: int
    f: int
    j: int
    coef: float


def _pair_terms(spec: ConvSpec, t: int) -> dict[tuple[int, int], list[_Term]]:
    """Nonzeros of pair t's basis, grouped by (tap, input component)."""
    pair = spec.pairs[t]
    k_a = spec.in_keys[pair.in_index][0]
    k_b = spec.out_keys[pair.out_index][0]
    basis = pair.basis.array.reshape(pair.basis.n_filters, spec.taps, spec.D**k_a, spec.D**k_b)
    out: dict[tuple[int, int], list[_Term]] = {}
    for f, y, i, j in zip(*np.nonzero(basis)):
        # the kernel computes in fp32, so the coefficients are fp32 literals
        coef = float(np.float32(basis[f, y, i, j]))
        out.setdefault((int(y), int(i)), []).append(_Term(t, int(f), int(j), coef))
    return out


def _schedule(taps: dict[int, set]) -> list[list[int]]:
    """Order taps so that few Z tiles are live at once; split where none is live.

    `taps` maps a tap to the Z ids it feeds. A Z is live from its first tap to its last. Greedy:
    take the tap that opens the fewest new Z tiles minus those it closes (ties: lowest index),
    which walks the symmetry orbits of an invariant basis one at a time.
    """
    remaining = dict(taps)
    pending: dict = {}
    for y, zs in taps.items():
        for z in zs:
            pending[z] = pending.get(z, 0) + 1
    live: set = set()
    segments: list[list[int]] = [[]]
    while remaining:
        def cost(y):
            zs = remaining[y]
            opened = len(zs - live)
            closed = sum(1 for z in zs if pending[z] == 1)
            return (opened - closed, opened, y)

        y = min(remaining, key=cost)
        zs = remaining.pop(y)
        segments[-1].append(y)
        live |= zs
        for z in zs:
            pending[z] -= 1
            if pending[z] == 0:
                live.discard(z)
        if not live and remaining:
            segments.append([])
    return [s for s in segments if s]


# ---- source generation --------------------------------------------------------------------------
class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 1

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)


def _literal(value: float) -> str:
    return repr(float(value))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_sizes(spec: ConvSpec, spatial: Sequence[int]) -> None:
    """Reject, before any launch, blocks whose per-channel offsets would overflow int32."""
    npix = math.prod(spatial)
    nout = math.prod(spec.out_spatial(spatial))
    for a, (k, _, c) in enumerate(spec.in_keys):
        if npix * spec.D**k > INT32_MAX:
            raise ValueError(
                f"input block {a} has {npix * spec.D**k} elements per channel (spatial {tuple(spatial)}, "
                f"tensor order {k}); the triton backend supports at most 2^31 - 1 per channel"
            )
    for b, (k, _, o) in enumerate(spec.out_keys):
        if nout * spec.D**k > INT32_MAX:
            raise ValueError(
                f"output block {b} has {nout * spec.D**k} elements per channel; the triton backend "
                f"supports at most 2^31 - 1 per channel"
            )


def count_nonzeros(spec: ConvSpec) -> int:
    return sum(int(np.count_nonzero(p.basis.array)) for p in spec.pairs)


class _Layer:
    """Sizes, tiling and the sparse basis terms shared by the forward and weight-gradient kernels."""

    def __init__(self, spec: ConvSpec, geometry: Geometry, mode: str, blocks: BlockSizes,
                 bf16_dot_in_fp32: bool, layout_barrier: bool, units: Optional[frozenset] = None) -> None:
        blocks.check(spec.D)
        check_sizes(spec, geometry.spatial)
        self.spec, self.geometry, self.blocks = spec, geometry, blocks
        self.layout_barrier = layout_barrier
        D = self.D = spec.D
        spatial = self.spatial = geometry.spatial
        self.out_spatial = spec.out_spatial(spatial)
        self.tile = blocks.resolved_tile(D)
        self.BP = math.prod(self.tile)
        self.BC = blocks.block_c
        self.npix, self.nout = math.prod(spatial), math.prod(self.out_spatial)
        self.in_stride = [math.prod(spatial[ax + 1 :]) for ax in range(D)]
        self.out_stride = [math.prod(self.out_spatial[ax + 1 :]) for ax in range(D)]
        self.n_tiles = [-(-n // t) for n, t in zip(self.out_spatial, self.tile)]
        self.BO = [min(max(_next_pow2(o), 16), blocks.block_o) for _, _, o in spec.out_keys]
        self.n_otiles = max(-(-o // bo) for (_, _, o), bo in zip(spec.out_keys, self.BO))
        self.n_chunks = max(-(-c // self.BC) for _, _, c in spec.in_keys)
        self.dk_in = [D**k for k, _, _ in spec.in_keys]
        self.dk_out = [D**k for k, _, _ in spec.out_keys]
        self.op = blocks.orientation == "op"
        # Input and Z tiles are (pixels, channels) or (channels, pixels): whichever dimension
        # Triton's coalescing puts on the lanes when it cannot tell them apart (the stride-3 loads
        # of vector blocks): lanes must run along pixels. Pixel-index vectors have that tile layout.
        self.pf = blocks.pixels_first if blocks.pixels_first is not None else triton_prefers_first_dim()
        # sparse terms per input key: (tap, component) -> terms
        self.terms_by_key: list[dict[tuple[int, int], list[_Term]]] = [dict() for _ in spec.in_keys]
        for t, pair in enumerate(spec.pairs):
            for key, terms in _pair_terms(spec, t).items():
                if units is not None:  # only these (pair, filter) units
                    terms = [tm for tm in terms if (tm.pair, tm.f) in units]
                if terms:
                    self.terms_by_key[pair.in_index].setdefault(key, []).extend(terms)
        self.nonzeros = sum(len(v) for d in self.terms_by_key for v in d.values())
        precision = {"tf32": "tf32", "fp32": "tf32x3"}.get(mode)
        self.mode = mode
        self.bf16_dot_in_fp32 = bf16_dot_in_fp32
        if mode == "bf16":
            precision = "ieee" if bf16_dot_in_fp32 else None
        self.dot_kw = f", input_precision=\"{precision}\"" if precision else ""
        self.peak_live = 0
        self.segment = 0

    def dot_operand(self, e: str) -> str:
        """A float32 tile as a tl.dot operand of this precision mode (bf16 rounds to nearest
        even, as the GPU does; Triton's interpreter would truncate, so it rounds by hand)."""
        if self.mode != "bf16":
            return e
        return f"_round_bf16({e})" if self.bf16_dot_in_fp32 else f"({e}).to(tl.bfloat16)"

    def as_row(self, e: str) -> str:  # a pixel-index expression as a (1, BP) row
        return f"tl.trans({e})" if self.pf else f"({e})"

    def as_col(self, e: str) -> str:  # ... as a (BP, 1) column
        return f"({e})" if self.pf else f"tl.trans({e})"

    def tap_coords(self, y: int) -> tuple[int, ...]:
        return tuple(int(s) for s in np.unravel_index(y, self.spec.filter_shape))

    # ---- emitters ---------------------------------------------------------------------------------
    def header(self, name: str, args: Sequence[str]) -> list[str]:
        return [
            "import triton",
            "import triton.language as tl",
            "",
            "",
            "@triton.jit",
            "def _keep_layout(z):",
            "    # identity with a side effect: Triton cannot rematerialise it in another layout",
            "    return tl.inline_asm_elementwise(",
            "        \"mov.b32 $0, $1;\", \"=r,r\", [z], dtype=tl.float32, is_pure=False, pack=1",
            "    )",
            "",
            "",
            "@triton.jit",
            "def _round_bf16(x):",
            "    # float32 rounded to the nearest bfloat16 (ties to even), kept in float32",
            "    b = x.to(tl.uint32, bitcast=True)",
            "    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000",
            "    return b.to(tl.float32, bitcast=True)",
            "",
            "",
            "@triton.jit",
            f"def {name}({', '.join(args)}):",
        ]

    def emit_pixels(self, src: _Source, tile_id: str, extra_ok: Optional[str] = None) -> None:
        """Output pixel indices q{ax} of pixel tile `tile_id` (an expression), the flat offset q,
        the mask p_ok (when tiles are ragged), then every tap's input offsets and validity."""
        D, tile, spec = self.D, self.tile, self.spec
        src(f"rest = {tile_id}")
        for ax in reversed(range(D)):
            src(f"t{ax} = rest % {self.n_tiles[ax]}")
            src(f"rest = rest // {self.n_tiles[ax]}")
        # pixel indices as (1, BP) rows from the start: 1D vectors would need layout conversions
        src(f"r = tl.arange(0, {self.BP}){'[:, None]' if self.pf else '[None, :]'}")
        for ax in range(D):
            inner = math.prod(tile[ax + 1 :])
            expr = "r" if inner == 1 else f"(r // {inner})"
            if ax > 0:
                expr = f"{expr} % {tile[ax]}"
            src(f"q{ax} = t{ax} * {tile[ax]} + {expr}")
        p_ok = [f"(q{ax} < {self.out_spatial[ax]})" for ax in range(D) if self.out_spatial[ax] % tile[ax]]
        if extra_ok:
            p_ok.append(f"({extra_ok})")
        self.has_p_ok = bool(p_ok)
        if p_ok:
            src(f"p_ok = {' & '.join(p_ok)}")
        src("q = " + " + ".join(f"q{ax} * {self.out_stride[ax]}" if self.out_stride[ax] != 1 else f"q{ax}" for ax in range(D)))
        if not self.blocks.vector_loads:
            # Triton gives every load and store of one tile shape the vector width of the widest
            # aligned one (the unshifted tap, the stores): 4 pixels per thread, lanes 16 bytes apart
            # and 4x the cache lines per warp load. A zero the compiler cannot prove aligned keeps
            # every access scalar with lanes along pixels. See BlockSizes.
            src("unaligned = tl.program_id(0) >> 31  # 0, of unknown divisibility")
            src("q = q + unaligned")
        # Per axis and filter shift: input offset (in pixels) and validity, by index arithmetic.
        # Padded coordinate u = q + s * rhs_dilation - zero_lo lies in the wrapped frame of
        # n + wrap_lo + wrap_hi cells (zero outside); the source cell is (u - wrap_lo) mod n.
        self.ok_names: dict[tuple[int, int], Optional[str]] = {}
        for ax in range(D):
            n, m, rd = self.spatial[ax], spec.filter_shape[ax], spec.rhs_dilation[ax]
            (wlo, whi), (zlo, _) = spec.torus_pad[ax], spec.zero_pad[ax]
            for s in range(m):
                shift = s * rd - zlo
                u_lo, u_hi = shift, self.out_spatial[ax] - 1 + shift
                conds = []
                if u_lo < 0:
                    conds.append("(u >= 0)")
                if u_hi >= n + wlo + whi:
                    conds.append(f"(u < {n + wlo + whi})")
                v = f"q{ax} + {shift - wlo}" if shift != wlo else f"q{ax}"
                if conds:
                    src(f"u = q{ax} + {shift}")
                src(f"v = {v}")
                if ax == D - 1 and not self.blocks.vector_loads:
                    src("v = v + unaligned")
                if wlo or whi:
                    if u_lo - wlo < 0:
                        src(f"v = tl.where(v < 0, v + {n}, v)")
                    if u_hi - wlo >= n:
                        src(f"v = tl.where(v >= {n}, v - {n}, v)")
                scale = f" * {self.in_stride[ax]}" if self.in_stride[ax] != 1 else ""
                src(f"off{ax}_{s} = v{scale}")
                if conds:
                    src(f"ok{ax}_{s} = {' & '.join(conds)}")
                    self.ok_names[(ax, s)] = f"ok{ax}_{s}"
                else:
                    self.ok_names[(ax, s)] = None

    def emit_input_bases(self, src: _Source) -> None:
        for a, (k, _, c) in enumerate(self.spec.in_keys):
            block = c * self.npix * self.dk_in[a]
            src(f"x{a}b = x{a} + bat * {block}" if self.geometry.x_batched[a] else f"x{a}b = x{a}")
        src(f"cr = tl.arange(0, {self.BC})")

    def emit_out_channels(self, src: _Source) -> None:
        for b, (k, _, o) in enumerate(self.spec.out_keys):
            src(f"o{b} = o_tile * {self.BO[b]} + tl.arange(0, {self.BO[b]})")
            src(f"o{b}_ok = o{b} < {o}")

    def emit_stencil(self, src: _Source, on_z_done, chunk_loop: bool) -> None:
        """The sparse stencil: every Z[c, f, j, x] of every pair, tap by tap; `on_z_done(src, term,
        z, c_a, c_mask)` emits what consumes a Z once its last tap is in. With `chunk_loop` the
        input channels are walked in chunks of BC inside; otherwise the chunk `ch` is given."""
        spec, D, BC = self.spec, self.D, self.BC
        c_bcast = "c_ok[None, :]" if self.pf else "c_ok[:, None]"
        for a, (k_a, _, c_a) in enumerate(spec.in_keys):
            terms = self.terms_by_key[a]
            if not terms:
                continue
            by_tap: dict[int, set] = {}
            for (y, i), ts in terms.items():
                by_tap.setdefault(y, set()).update((tm.pair, tm.f, tm.j) for tm in ts)
            wide = c_a * self.npix * self.dk_in[a] > INT32_MAX
            c_mask = c_a % BC != 0 or self.n_chunks * BC > c_a
            for seg in _schedule(by_tap):
                self.segment += 1
                # the (tap, component) sequence of this segment and the last use of each Z
                steps = [(y, i) for y in seg for i in range(self.dk_in[a]) if (y, i) in terms]
                last = {}
                for n_step, key in enumerate(steps):
                    for tm in terms[key]:
                        last[(tm.pair, tm.f, tm.j)] = n_step
                src(f"# input {a}, taps {[self.tap_coords(y) for y in seg]}")
                looping = chunk_loop and self.n_chunks > 1
                if looping:
                    src(f"for ch in range({self.n_chunks}):")
                    src.depth += 1
                src(f"cc = ch * {BC} + cr" if self.n_chunks > 1 else "cc = cr")
                coff = "cc.to(tl.int64)" if wide else "cc"
                src(f"xrow = x{a}b + ({coff} * {self.npix * self.dk_in[a]}){'[None, :]' if self.pf else '[:, None]'}")
                if c_mask:
                    src(f"c_ok = cc < {c_a}")
                started: set = set()
                live = 0
                current_tap = None
                tap_mask = None
                for n_step, (y, i) in enumerate(steps):
                    if y != current_tap:
                        current_tap = y
                        s = self.tap_coords(y)
                        src(f"pix = {' + '.join(f'off{ax}_{s[ax]}' for ax in range(D))}")
                        oks = [self.ok_names[(ax, s[ax])] for ax in range(D) if self.ok_names[(ax, s[ax])]]
                        if self.has_p_ok:
                            oks = ["p_ok"] + oks
                        tap_mask = " & ".join(oks) if oks else None
                    pos = f"pix * {self.dk_in[a]} + {i}" if self.dk_in[a] > 1 else "pix"
                    masks = []
                    if tap_mask:
                        masks.append(f"({tap_mask})")
                    if c_mask:
                        masks.append(c_bcast)
                    mask = f", mask={' & '.join(masks)}, other=0.0" if masks else ""
                    src(f"x = tl.load(xrow + ({pos}){mask}).to(tl.float32)")
                    for tm in terms[(y, i)]:
                        z = f"z{tm.pair}_{tm.f}_{tm.j}"
                        coef = tm.coef
                        term = "x" if coef == 1.0 else "-x" if coef == -1.0 else f"{_literal(coef)} * x"
                        if (tm.pair, tm.f, tm.j) not in started:
                            started.add((tm.pair, tm.f, tm.j))
                            live += 1
                            self.peak_live = max(self.peak_live, live)
                            src(f"{z} = {term}")
                        elif coef == -1.0:
                            src(f"{z} = {z} - x")
                        else:
                            src(f"{z} = {z} + {term}")
                    for tm in terms[(y, i)]:
                        zid = (tm.pair, tm.f, tm.j)
                        if last.get(zid) != n_step:
                            continue
                        del last[zid]
                        live -= 1
                        z = f"z{tm.pair}_{tm.f}_{tm.j}"
                        if self.layout_barrier:
                            src(f"{z} = _keep_layout({z})")
                        on_z_done(src, tm, z, c_a, c_mask)
                assert not last, "every Z must be reduced"
                if looping:
                    src.depth -= 1


@functools.lru_cache(maxsize=256)
def plan_kernel(
    spec: ConvSpec,
    geometry: Geometry,
    mode: str,
    blocks: BlockSizes,
    aliased: bool = False,
    bf16_dot_in_fp32: bool = False,
    layout_barrier: bool = True,
) -> KernelPlan:
    """Generate the forward kernel source for one layer, input shape and precision mode.

    `aliased` adds one unused pointer per output before the outputs: jax-triton passes the
    buffers of `input_output_aliases` (the poisoned outputs of the tests) both ways.
    `bf16_dot_in_fp32` (for Triton's interpreter, whose tl.dot multiplies bf16 operands as raw
    uint16 words) rounds the bf16 operands and multiplies them in fp32: the same products.
    `layout_barrier` passes each Z through an opaque identity (inline PTX, so GPU only) before
    its dot. Without it Triton moves the dot-operand layout conversion up through the FMAs to
    every loaded tile: 108 shared-memory round trips per chunk instead of 40 on the standard layer.
    """
    L = _Layer(spec, geometry, mode, blocks, bf16_dot_in_fp32, layout_barrier)
    D, op, pf = L.D, L.op, L.pf
    src = _Source()
    name = "conv_contract_fwd_" + hashlib.sha1(
        repr((hash(spec), geometry, mode, blocks, aliased, bf16_dot_in_fp32, layout_barrier)).encode()
    ).hexdigest()[:12]
    xs = [f"x{a}" for a in range(len(spec.in_keys))]
    ws = [f"w{t}" for t in range(len(spec.pairs))]
    ys = [f"y{b}" for b in range(len(spec.out_keys))]
    aliases = [f"y{b}_in" for b in range(len(spec.out_keys))] if aliased else []

    # -- which program: (out-channel tile, pixel tile, batch), out-channel tile fastest
    src("pid = tl.program_id(0)")
    src(f"o_tile = pid % {L.n_otiles}")
    src(f"rest = pid // {L.n_otiles}")
    src(f"bat = (rest // {math.prod(L.n_tiles)}).to(tl.int64)  # 64-bit: batch offsets may pass 2^31")
    L.emit_pixels(src, f"rest % {math.prod(L.n_tiles)}")
    L.emit_input_bases(src)
    for t, pair in enumerate(spec.pairs):
        o, c, F = spec.out_keys[pair.out_index][2], spec.in_keys[pair.in_index][2], pair.basis.n_filters
        src(f"w{t}b = w{t} + bat * {o * c * F}" if geometry.w_batched[t] else f"w{t}b = w{t}")
    L.emit_out_channels(src)
    for b in range(len(spec.out_keys)):
        shape = f"({L.BO[b]}, {L.BP})" if op else f"({L.BP}, {L.BO[b]})"
        for j in range(L.dk_out[b]):
            src(f"acc{b}_{j} = tl.zeros({shape}, tl.float32)")

    loaded_w: set = set()

    def reduce_z(src, tm, z, c_a, c_mask):
        # acc[b, j] += w[:, :, f] @ Z[:, f, j, :] on tensor cores
        pair = spec.pairs[tm.pair]
        b = pair.out_index
        wname = f"wt{tm.pair}_{tm.f}"
        if (tm.pair, tm.f, L.segment) not in loaded_w:  # once per segment (and chunk)
            loaded_w.add((tm.pair, tm.f, L.segment))
            F = pair.basis.n_filters
            ob_off = f"(o{b} * {c_a * F})"
            cc_off = f"(cc * {F} + {tm.f})"
            wmask = f"o{b}_ok[:, None]" if op else f"o{b}_ok[None, :]"
            if c_mask:
                wmask += " & c_ok[None, :]" if op else " & c_ok[:, None]"
            # op: (BO, BC) tile w[o, c, f]; po: its transpose (BC, BO)
            if op:
                wptr = f"w{tm.pair}b + {ob_off}[:, None] + {cc_off}[None, :]"
            else:
                wptr = f"w{tm.pair}b + {cc_off}[:, None] + {ob_off}[None, :]"
            src(f"{wname} = {L.dot_operand(f'tl.load({wptr}, mask={wmask}, other=0.0).to(tl.float32)')}")
        zval = L.dot_operand(z)
        acc = f"acc{b}_{tm.j}"
        if op:
            src(f"{acc} = tl.dot({wname}, {f'tl.trans({zval})' if pf else zval}, {acc}{L.dot_kw})")
        else:
            src(f"{acc} = tl.dot({zval if pf else f'tl.trans({zval})'}, {wname}, {acc}{L.dot_kw})")

    L.emit_stencil(src, reduce_z, chunk_loop=True)
    loaded_w.clear()

    # -- write every output block in its native layout
    for b, (k_b, _, o) in enumerate(spec.out_keys):
        block = o * L.nout * L.dk_out[b]
        ooff = f"o{b}.to(tl.int64)" if block > INT32_MAX else f"o{b}"
        src(f"yb = y{b} + bat * {block}")
        for j in range(L.dk_out[b]):
            pos = f"q * {L.dk_out[b]} + {j}" if L.dk_out[b] > 1 else "q"
            if op:
                ptr = f"yb + ({ooff} * {L.nout * L.dk_out[b]})[:, None] + {L.as_row(pos)}"
                mask = f"o{b}_ok[:, None]" + (f" & {L.as_row('p_ok')}" if L.has_p_ok else "")
            else:
                ptr = f"yb + {L.as_col(pos)} + ({ooff} * {L.nout * L.dk_out[b]})[None, :]"
                mask = f"o{b}_ok[None, :]" + (f" & {L.as_col('p_ok')}" if L.has_p_ok else "")
            src(f"tl.store({ptr}, acc{b}_{j}, mask={mask})")

    return _finish(L, src, name, xs + ws + aliases + ys, L.n_otiles * math.prod(L.n_tiles))


@functools.lru_cache(maxsize=256)
def plan_weight_grad_kernel(
    spec: ConvSpec,
    geometry: Geometry,
    mode: str,
    blocks: BlockSizes,
    groups: int,
    units: tuple[tuple[int, int], ...],
    bf16_dot_in_fp32: bool = False,
    layout_barrier: bool = True,
) -> KernelPlan:
    """Generate a weight-gradient kernel: per program, partial sums of

        dw[o, c, f] = sum_{x, j} G_b[o, x, j] Z[c, f, j, x],   Z as in the forward (recomputed)

    for the (pair, filter) `units` given, one block of output channels, one chunk of input
    channels, one batch element and one of `groups` interleaved shares of the pixel tiles. Each
    unit's (o, c) block accumulates in registers (a tl.dot with the pixels as K), so a kernel
    takes a few units: `weight_grad_units` splits a layer. Partials go to a (batch, groups, W)
    buffer, unit after unit, each (o_b, c_a); `plan_partial_sums` adds them in a fixed order
    (deterministic: no atomics).
    """
    L = _Layer(spec, geometry, mode, blocks, bf16_dot_in_fp32, layout_barrier, frozenset(units))
    pf = L.pf
    src = _Source()
    name = "conv_contract_dw_" + hashlib.sha1(
        repr((hash(spec), geometry, mode, blocks, groups, units, bf16_dot_in_fp32, layout_barrier)).encode()
    ).hexdigest()[:12]
    xs = [f"x{a}" for a in range(len(spec.in_keys))]
    gs = [f"g{b}" for b in range(len(spec.out_keys))]
    total_tiles = math.prod(L.n_tiles)
    n_iter = -(-total_tiles // groups)
    offsets, W = {}, 0
    for t, f in units:
        offsets[(t, f)] = W
        W += spec.out_keys[spec.pairs[t].out_index][2] * spec.in_keys[spec.pairs[t].in_index][2]

    src("pid = tl.program_id(0)")
    src(f"o_tile = pid % {L.n_otiles}")
    src(f"rest = pid // {L.n_otiles}")
    src(f"ch = rest % {L.n_chunks}")
    src(f"rest = rest // {L.n_chunks}")
    src(f"grp = rest % {groups}")
    src(f"bat = (rest // {groups}).to(tl.int64)")
    L.emit_input_bases(src)
    L.emit_out_channels(src)
    for t, f in units:
        src(f"dw{t}_{f} = tl.zeros(({L.BO[spec.pairs[t].out_index]}, {L.BC}), tl.float32)")
    for b, (k_b, _, o) in enumerate(spec.out_keys):
        block = o * L.nout * L.dk_out[b]
        src(f"g{b}b = g{b} + bat * {block}" if geometry.y_batched[b] else f"g{b}b = g{b}")
    ragged = total_tiles % groups != 0
    src(f"for it in range({n_iter}):")
    src.depth += 1
    src(f"tid = grp + it * {groups}")
    L.emit_pixels(src, f"tid % {total_tiles}" if ragged else "tid", extra_ok=f"tid + r * 0 < {total_tiles}" if ragged else None)  # r * 0: tile-shaped, not a scalar
    # cotangent tiles of this pixel tile, (out channels, pixels): the A operands of the dots
    used = sorted({(spec.pairs[tm.pair].out_index, tm.j) for d in L.terms_by_key for ts in d.values() for tm in ts})
    for b, j in used:
        block = spec.out_keys[b][2] * L.nout * L.dk_out[b]
        ooff = f"o{b}.to(tl.int64)" if block > INT32_MAX else f"o{b}"
        pos = f"q * {L.dk_out[b]} + {j}" if L.dk_out[b] > 1 else "q"
        mask = f"o{b}_ok[:, None]" + (f" & {L.as_row('p_ok')}" if L.has_p_ok else "")
        ptr = f"g{b}b + ({ooff} * {L.nout * L.dk_out[b]})[:, None] + {L.as_row(pos)}"
        src(f"gt{b}_{j} = {L.dot_operand(f'tl.load({ptr}, mask={mask}, other=0.0).to(tl.float32)')}")

    def reduce_z(src, tm, z, c_a, c_mask):
        # dw[o, c, f] += G_b[o, :, j] @ Z[c, f, j, :]^T  (pixels are the K of the dot)
        b = spec.pairs[tm.pair].out_index
        zval = L.dot_operand(z)
        src(f"dw{tm.pair}_{tm.f} = tl.dot(gt{b}_{tm.j}, {zval if pf else f'tl.trans({zval})'}, dw{tm.pair}_{tm.f}{L.dot_kw})")

    L.emit_stencil(src, reduce_z, chunk_loop=False)
    src.depth -= 1
    # -- partial sums, each (o, c) of this program's blocks written once
    src(f"pb = part + (bat * {groups} + grp) * {W}")
    src(f"cc = ch * {L.BC} + cr")
    for t, f in units:
        b, a = spec.pairs[t].out_index, spec.pairs[t].in_index
        c_a = spec.in_keys[a][2]
        ptr = f"pb + {offsets[(t, f)]} + (o{b} * {c_a})[:, None] + cc[None, :]"
        src(f"tl.store({ptr}, dw{t}_{f}, mask=o{b}_ok[:, None] & (cc < {c_a})[None, :])")
    programs = L.n_otiles * L.n_chunks * groups
    return _finish(L, src, name, xs + gs + ["part"], programs)


def _finish(L: _Layer, src: _Source, name: str, args: Sequence[str], programs_per_batch: int) -> KernelPlan:
    body = [line for line in src.lines if line.strip()]
    source = "\n".join(L.header(name, args) + body) + "\n"
    return KernelPlan(
        name=name,
        source=source,
        programs_per_batch=programs_per_batch,
        out_spatial=L.out_spatial,
        num_warps=L.blocks.num_warps,
        num_stages=L.blocks.num_stages,
        max_registers=L.blocks.max_registers,
        nonzeros=L.nonzeros,
        peak_live_z=L.peak_live,
    )


@functools.lru_cache(maxsize=64)
def plan_partial_sums(batch: int, groups: int, width: int, block: int = 1024) -> KernelPlan:
    """out[b, :] = sum_g part[b, g, :], g in increasing order: a deterministic reduction."""
    name = f"conv_contract_dw_sum_{batch}_{groups}_{width}"
    n_blocks = -(-width // block)
    source = "\n".join([
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}(part, out):",
        "    pid = tl.program_id(0)",
        f"    bat = (pid // {n_blocks}).to(tl.int64)",
        f"    cols = (pid % {n_blocks}) * {block} + tl.arange(0, {block})",
        f"    ok = cols < {width}",
        f"    acc = tl.zeros(({block},), tl.float32)",
        f"    base = part + bat * {groups * width}",
        f"    for g in range({groups}):",
        f"        acc += tl.load(base + g * {width} + cols, mask=ok, other=0.0)",
        f"    tl.store(out + bat * {width} + cols, acc, mask=ok)",
    ]) + "\n"
    return KernelPlan(name=name, source=source, programs_per_batch=n_blocks, out_spatial=(),
                      num_warps=4, num_stages=1, nonzeros=0, peak_live_z=0)


@functools.lru_cache(maxsize=256)
def compile_plan(plan: KernelPlan):
    """The `triton.jit` function of a plan (an interpreted one under TRITON_INTERPRET=1).

    Triton reads a kernel's source through `inspect`, so the generated text is registered in
    linecache under a unique pseudo file name before the module is executed.
    """
    import triton  # noqa: F401  (imported lazily: the package must import without triton)

    filename = f"<ginjax-triton {plan.name}>"
    linecache.cache[filename] = (len(plan.source), None, plan.source.splitlines(True), filename)
    namespace: dict = {"__name__": f"kernels.triton._generated.{plan.name}"}
    exec(compile(plan.source, filename, "exec"), namespace)
    return namespace[plan.name]
