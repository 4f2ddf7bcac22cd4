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
        orientation: "op" accumulates (out channels, pixels), "po" (pixels, out channels).
        vector_loads: let Triton vectorise the loads of unshifted taps. Its coalescing pass then
            gives every load and store of the same tile shape 4 pixels per thread (the widest
            vectorisable access sets it for all of them), so a warp's lanes stride 16 bytes (48 for
            vectors) and each load instruction touches 4x more cache lines; off by default.
        pixels_first: tiles as (pixels, channels) rather than (channels, pixels); None picks
            what puts the lanes along pixels for the installed Triton (see
            `triton_prefers_first_dim`).
    """

    tile: Optional[tuple[int, ...]] = None
    block_c: int = 16
    block_o: int = 32
    num_warps: int = 8
    num_stages: int = 1
    orientation: str = "op"
    vector_loads: bool = False
    pixels_first: Optional[bool] = None

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
    w_batched: tuple[bool, ...]


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
    """Generate the kernel source for one layer, input shape and precision mode.

    `aliased` adds one unused pointer per output before the outputs: jax-triton passes the
    buffers of `input_output_aliases` (the poisoned outputs of the tests) both ways.
    `bf16_dot_in_fp32` (for Triton's interpreter, whose tl.dot multiplies bf16 operands as raw
    uint16 words) rounds the bf16 operands and multiplies them in fp32: the same products.
    `layout_barrier` passes each Z through an opaque identity (inline PTX, so GPU only) before
    its dot. Without it Triton moves the dot-operand layout conversion up through the FMAs to
    every loaded tile: 108 shared-memory round trips per chunk instead of 40 on the standard layer.
    """
    blocks.check(spec.D)
    check_sizes(spec, geometry.spatial)
    D = spec.D
    spatial = geometry.spatial
    out_spatial = spec.out_spatial(spatial)
    tile = blocks.resolved_tile(D)
    BP = math.prod(tile)
    BC = blocks.block_c
    npix, nout = math.prod(spatial), math.prod(out_spatial)
    in_stride = [math.prod(spatial[ax + 1 :]) for ax in range(D)]
    out_stride = [math.prod(out_spatial[ax + 1 :]) for ax in range(D)]
    n_tiles = [-(-n // t) for n, t in zip(out_spatial, tile)]
    BO = [min(max(_next_pow2(o), 16), blocks.block_o) for _, _, o in spec.out_keys]
    n_otiles = max(-(-o // bo) for (_, _, o), bo in zip(spec.out_keys, BO))
    programs_per_batch = n_otiles * math.prod(n_tiles)
    n_chunks = max(-(-c // BC) for _, _, c in spec.in_keys)
    dk_in = [D**k for k, _, _ in spec.in_keys]
    dk_out = [D**k for k, _, _ in spec.out_keys]
    op = blocks.orientation == "op"
    # Input and Z tiles are (pixels, channels) or (channels, pixels): whichever dimension
    # Triton's coalescing puts on the lanes when it cannot tell them apart (the stride-3 loads
    # of vector blocks): lanes must run along pixels. Pixel-index vectors have that tile layout.
    pf = blocks.pixels_first if blocks.pixels_first is not None else triton_prefers_first_dim()
    c_bcast = "c_ok[None, :]" if pf else "c_ok[:, None]"
    as_row = lambda e: f"tl.trans({e})" if pf else f"({e})"
    as_col = lambda e: f"({e})" if pf else f"tl.trans({e})"

    # sparse terms per input key: (tap, component) -> terms
    terms_by_key: list[dict[tuple[int, int], list[_Term]]] = [dict() for _ in spec.in_keys]
    for t, pair in enumerate(spec.pairs):
        for key, terms in _pair_terms(spec, t).items():
            terms_by_key[pair.in_index].setdefault(key, []).extend(terms)
    nonzeros = sum(len(v) for d in terms_by_key for v in d.values())

    src = _Source()
    name = "conv_contract_fwd_" + hashlib.sha1(
        repr((hash(spec), geometry, mode, blocks, aliased, bf16_dot_in_fp32, layout_barrier)).encode()
    ).hexdigest()[:12]
    xs = [f"x{a}" for a in range(len(spec.in_keys))]
    ws = [f"w{t}" for t in range(len(spec.pairs))]
    ys = [f"y{b}" for b in range(len(spec.out_keys))]
    aliases = [f"y{b}_in" for b in range(len(spec.out_keys))] if aliased else []
    header = [
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
        f"def {name}({', '.join(xs + ws + aliases + ys)}):",
    ]

    # -- which program: (out-channel tile, pixel tile per axis, batch), out-channel tile fastest
    src("pid = tl.program_id(0)")
    src(f"o_tile = pid % {n_otiles}")
    src(f"rest = pid // {n_otiles}")
    for ax in reversed(range(D)):
        src(f"t{ax} = rest % {n_tiles[ax]}")
        src(f"rest = rest // {n_tiles[ax]}")
    src("bat = rest.to(tl.int64)  # 64-bit: batch offsets may pass 2^31")
    # pixel indices as (1, BP) rows from the start: 1D vectors would need layout conversions
    src(f"r = tl.arange(0, {BP}){'[:, None]' if pf else '[None, :]'}")
    for ax in range(D):
        inner = math.prod(tile[ax + 1 :])
        expr = "r" if inner == 1 else f"(r // {inner})"
        if ax > 0:
            expr = f"{expr} % {tile[ax]}"
        src(f"q{ax} = t{ax} * {tile[ax]} + {expr}")
    p_ok = [f"(q{ax} < {out_spatial[ax]})" for ax in range(D) if out_spatial[ax] % tile[ax]]
    if p_ok:
        src(f"p_ok = {' & '.join(p_ok)}")
    src("q = " + " + ".join(f"q{ax} * {out_stride[ax]}" if out_stride[ax] != 1 else f"q{ax}" for ax in range(D)))
    if not blocks.vector_loads:
        # Triton gives every load and store of one tile shape the vector width of the widest
        # aligned one (the unshifted tap, the stores): 4 pixels per thread, lanes 16 bytes apart
        # and 4x the cache lines per warp load. A zero the compiler cannot prove aligned keeps
        # every access scalar with lanes along pixels. See BlockSizes.
        src("unaligned = pid >> 31  # 0, of unknown divisibility")
        src("q = q + unaligned")

    # -- per axis and filter shift: input offset (in pixels) and validity, by index arithmetic.
    # Padded coordinate u = q + s * rhs_dilation - zero_lo lies in the wrapped frame of
    # n + wrap_lo + wrap_hi cells (zero outside); the source cell is (u - wrap_lo) mod n.
    ok_names: dict[tuple[int, int], Optional[str]] = {}
    for ax in range(D):
        n, m, rd = spatial[ax], spec.filter_shape[ax], spec.rhs_dilation[ax]
        (wlo, whi), (zlo, _) = spec.torus_pad[ax], spec.zero_pad[ax]
        for s in range(m):
            shift = s * rd - zlo
            u_lo, u_hi = shift, out_spatial[ax] - 1 + shift
            conds = []
            if u_lo < 0:
                conds.append(f"(u >= 0)")
            if u_hi >= n + wlo + whi:
                conds.append(f"(u < {n + wlo + whi})")
            v = f"q{ax} + {shift - wlo}" if shift != wlo else f"q{ax}"
            src(f"u = q{ax} + {shift}" if conds else "")
            src(f"v = {v}")
            if ax == D - 1 and not blocks.vector_loads:
                src("v = v + unaligned")
            if wlo or whi:
                if u_lo - wlo < 0:
                    src(f"v = tl.where(v < 0, v + {n}, v)")
                if u_hi - wlo >= n:
                    src(f"v = tl.where(v >= {n}, v - {n}, v)")
            scale = f" * {in_stride[ax]}" if in_stride[ax] != 1 else ""
            src(f"off{ax}_{s} = v{scale}")
            if conds:
                src(f"ok{ax}_{s} = {' & '.join(conds)}")
                ok_names[(ax, s)] = f"ok{ax}_{s}"
            else:
                ok_names[(ax, s)] = None

    # -- base pointers (batch offsets), channel and output-channel index vectors
    for a, (k, _, c) in enumerate(spec.in_keys):
        block = c * npix * dk_in[a]
        src(f"x{a}b = x{a} + bat * {block}" if geometry.x_batched[a] else f"x{a}b = x{a}")
    for t, pair in enumerate(spec.pairs):
        o, c, F = spec.out_keys[pair.out_index][2], spec.in_keys[pair.in_index][2], pair.basis.n_filters
        src(f"w{t}b = w{t} + bat * {o * c * F}" if geometry.w_batched[t] else f"w{t}b = w{t}")
    src(f"cr = tl.arange(0, {BC})")
    for b, (k, _, o) in enumerate(spec.out_keys):
        src(f"o{b} = o_tile * {BO[b]} + tl.arange(0, {BO[b]})")
        src(f"o{b}_ok = o{b} < {o}")
    for b in range(len(spec.out_keys)):
        shape = f"({BO[b]}, {BP})" if op else f"({BP}, {BO[b]})"
        for j in range(dk_out[b]):
            src(f"acc{b}_{j} = tl.zeros({shape}, tl.float32)")

    precision = {"tf32": "tf32", "fp32": "tf32x3"}.get(mode)
    to_bf16 = ""
    if mode == "bf16":
        to_bf16 = ".to(tl.bfloat16).to(tl.float32)" if bf16_dot_in_fp32 else ".to(tl.bfloat16)"
        precision = "ieee" if bf16_dot_in_fp32 else None
    dot_kw = f", input_precision=\"{precision}\"" if precision else ""

    def tap_coords(y: int) -> tuple[int, ...]:
        return tuple(int(s) for s in np.unravel_index(y, spec.filter_shape))

    peak_live = 0
    for a, (k_a, _, c_a) in enumerate(spec.in_keys):
        terms = terms_by_key[a]
        if not terms:
            continue
        by_tap: dict[int, set] = {}
        for (y, i), ts in terms.items():
            by_tap.setdefault(y, set()).update((tm.pair, tm.f, tm.j) for tm in ts)
        wide = c_a * npix * dk_in[a] > INT32_MAX
        c_mask = c_a % BC != 0 or n_chunks * BC > c_a
        for seg in _schedule(by_tap):
            # the (tap, component) sequence of this segment and the last use of each Z
            steps = [(y, i) for y in seg for i in range(dk_in[a]) if (y, i) in terms]
            last = {}
            for n_step, key in enumerate(steps):
                for tm in terms[key]:
                    last[(tm.pair, tm.f, tm.j)] = n_step
            src(f"# input {a}, taps {[tap_coords(y) for y in seg]}")
            if n_chunks > 1:
                src(f"for ch in range({n_chunks}):")
                src.depth += 1
                src(f"cc = ch * {BC} + cr")
            else:
                src("cc = cr")
            coff = "cc.to(tl.int64)" if wide else "cc"
            # input tiles are (channels, pixels) in both orientations: lanes run along pixels
            src(f"xrow = x{a}b + ({coff} * {npix * dk_in[a]}){'[None, :]' if pf else '[:, None]'}")
            if c_mask:
                src(f"c_ok = cc < {c_a}")
            started: set = set()
            loaded_w: set = set()
            live = 0
            current_tap = None
            for n_step, (y, i) in enumerate(steps):
                if y != current_tap:
                    current_tap = y
                    s = tap_coords(y)
                    src(f"pix = {' + '.join(f'off{ax}_{s[ax]}' for ax in range(D))}")
                    oks = [ok_names[(ax, s[ax])] for ax in range(D) if ok_names[(ax, s[ax])]]
                    if p_ok:
                        oks = ["p_ok"] + oks
                    tap_mask = " & ".join(oks) if oks else None
                pos = f"pix * {dk_in[a]} + {i}" if dk_in[a] > 1 else "pix"
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
                        peak_live = max(peak_live, live)
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
                    pair = spec.pairs[tm.pair]
                    b = pair.out_index
                    wname = f"wt{tm.pair}_{tm.f}"
                    if (tm.pair, tm.f) not in loaded_w:
                        loaded_w.add((tm.pair, tm.f))
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
                        src(f"{wname} = tl.load({wptr}, mask={wmask}, other=0.0).to(tl.float32){to_bf16}")
                    z = f"z{tm.pair}_{tm.f}_{tm.j}"
                    if layout_barrier:
                        src(f"{z} = _keep_layout({z})")
                    zval = f"{z}{to_bf16}"
                    acc = f"acc{b}_{tm.j}"
                    z_cp = f"tl.trans({zval})" if pf else zval  # (channels, pixels)
                    z_pc = zval if pf else f"tl.trans({zval})"  # (pixels, channels)
                    if op:
                        src(f"{acc} = tl.dot({wname}, {z_cp}, {acc}{dot_kw})")
                    else:
                        src(f"{acc} = tl.dot({z_pc}, {wname}, {acc}{dot_kw})")
            assert not last, "every Z must be reduced"
            if n_chunks > 1:
                src.depth -= 1

    # -- write every output block in its native layout
    for b, (k_b, _, o) in enumerate(spec.out_keys):
        block = o * nout * dk_out[b]
        wide = block > INT32_MAX
        ooff = f"o{b}.to(tl.int64)" if wide else f"o{b}"
        src(f"yb = y{b} + bat * {block}")
        for j in range(dk_out[b]):
            pos = f"q * {dk_out[b]} + {j}" if dk_out[b] > 1 else "q"
            if op:
                ptr = f"yb + ({ooff} * {nout * dk_out[b]})[:, None] + {as_row(pos)}"
                mask = f"o{b}_ok[:, None]" + (f" & {as_row('p_ok')}" if p_ok else "")
            else:
                ptr = f"yb + {as_col(pos)} + ({ooff} * {nout * dk_out[b]})[None, :]"
                mask = f"o{b}_ok[None, :]" + (f" & {as_col('p_ok')}" if p_ok else "")
            src(f"tl.store({ptr}, acc{b}_{j}, mask={mask})")

    body = [line for line in src.lines if line.strip()]
    source = "\n".join(header + body) + "\n"
    return KernelPlan(
        name=name,
        source=source,
        programs_per_batch=programs_per_batch,
        out_spatial=out_spatial,
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        nonzeros=nonzeros,
        peak_live_z=peak_live,
    )


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
