"""The sparse stencil shared by the generated kernels: the basis nonzeros (kernels._fused.basis)
grouped by the (tap, component) tile they read, the tap schedule that keeps few Z tiles live, and `_Layer`, the source
emitters (pixel indices, tap offsets with torus wrap and zero padding, input and output bases,
the stencil itself) that the forward and weight-gradient generators in `_kernel` share."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

from .._fused import INT32_MAX, Nonzero, axes, dot_tile, int32_overflow, nonzeros_by_read
from .._spec import ConvSpec
from ._tiling import BlockSizes, Geometry, triton_prefers_first_dim

# ---- the tap schedule -----------------------------------------------------------------------------
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


def check_sizes(spec: ConvSpec, spatial: Sequence[int]) -> None:
    """Reject, before any launch, blocks whose per-channel offsets would overflow int32."""
    if why := int32_overflow(spec, spatial, "triton", per_channel=True):
        raise ValueError(why)


class _Layer:
    """Sizes, tiling and the sparse basis terms shared by the forward and weight-gradient kernels."""

    def __init__(self, spec: ConvSpec, geometry: Geometry, mode: str, blocks: BlockSizes,
                 bf16_dot_in_fp32: bool, layout_barrier: bool, units: Optional[frozenset] = None) -> None:
        blocks.validate(spec.D)
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
        self.BO = [min(dot_tile(o), blocks.block_o) for _, _, o in spec.out_keys]
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
        # the basis nonzeros per input key, grouped by the tile they read: (tap, component) ->
        # Z(pair, f, j) += value * X_a[:, x + tap, i]. The kernel computes in fp32, so the values
        # are fp32 literals; with `units`, only those (pair, filter) units.
        self.terms_by_key: list[dict[tuple[int, int], list[Nonzero]]] = [dict() for _ in spec.in_keys]
        for (a, y, i), nonzeros in nonzeros_by_read(spec).items():
            terms = [
                dataclasses.replace(nz, value=float(np.float32(nz.value)))
                for nz in nonzeros
                if units is None or (nz.pair, nz.f) in units
            ]
            if terms:
                self.terms_by_key[a][(y, i)] = terms
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

    def component_offset(self, pixel: str, dk: int, i: int, npix: int, planar: bool) -> str:
        """Offset inside one channel of component i at flat pixel offset `pixel`: planar blocks
        hold each component's pixels contiguously, interleaved ones each pixel's components."""
        if dk == 1:
            return pixel
        if planar:
            return f"{pixel} + {i * npix}" if i else pixel
        return f"{pixel} * {dk} + {i}"

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
        # Per axis and filter shift: input offset (in pixels) and validity, by index arithmetic
        # (kernels._fused.geometry): padded coordinate u = q + s * rhs_dilation - zero_lo lies in
        # the wrapped frame (zero outside); the source cell is (u - wrap_lo) mod n.
        self.ok_names: dict[tuple[int, int], Optional[str]] = {}
        for ax, geo in enumerate(axes(spec, self.spatial)):
            n, wlo, whi = geo.n, geo.wrap_lo, geo.wrap_hi
            for s in range(geo.taps):
                shift = s * geo.dilation - geo.zero_lo
                u_lo, u_hi = shift, geo.n_out - 1 + shift
                conds = []
                if u_lo < 0:
                    conds.append("(u >= 0)")
                if u_hi >= geo.frame:
                    conds.append(f"(u < {geo.frame})")
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
                    loop = "tl.static_range" if self.blocks.unroll_chunks else "range"
                    src(f"for ch in {loop}({self.n_chunks}):")
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
                    pos = self.component_offset("pix", self.dk_in[a], i, self.npix, self.blocks.planar_in)
                    masks = []
                    if tap_mask:
                        masks.append(f"({tap_mask})")
                    if c_mask:
                        masks.append(c_bcast)
                    mask = f", mask={' & '.join(masks)}, other=0.0" if masks else ""
                    src(f"x = tl.load(xrow + ({pos}){mask}).to(tl.float32)")
                    for tm in terms[(y, i)]:
                        z = f"z{tm.pair}_{tm.f}_{tm.j}"
                        coef = tm.value
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
