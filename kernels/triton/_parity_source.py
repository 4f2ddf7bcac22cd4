"""The generated Triton source of the parity-blocked convolution's kernels (`parity_conv.py`; the
plan they walk: `_parity_plan.py`).

The kernels read packed operands: (batch, rows, *spatial), rows ordered by class (`ParityPlan`),
the input with `halo` cells a side along x so that every shifted load is a contiguous run. The
forward loads, per input chunk of 16 rows, the (2r+1)^D shifted tiles once, forms the
combinations by sums and differences axis by axis (`_butterfly`) and accumulates, per run of the
chunk's dots into one output class, one tl.dot (`_concat_runs`: the run's tiles concatenated
along K). It writes either packed rows or, with a `BlockEpilogue`, the layer's blocks themselves
(component-planar), each plus its bias offset and its prior (a residual) where it has them. The
weight gradient forms the same combinations and accumulates A^T dY over a slab of pixels, one
kernel per input class, the runs concatenated along M.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Optional

import numpy as np

from .._fused import INT32_MAX
from ._parity_plan import CHUNK, ParityPlan, group_combos, paired_axes
from ._tiling import KernelPlan
from ._vn_kernel import _header


def _name(o: int) -> str:
    return f"m{-o}" if o < 0 else f"p{o}"


class _Source:
    def __init__(self):
        self.lines: list[str] = []

    @classmethod
    def kernel(cls, name: str, args: tuple[str, ...]) -> "_Source":
        """A kernel's source so far: its imports, its signature and its program id `pid`."""
        e = cls()
        for line in _header(name, args):
            e(line, 0)
        e("pid = tl.program_id(0)")
        return e

    def __call__(self, line: str, depth: int = 1) -> None:
        self.lines.append("    " * depth + line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _axis_offsets(plan: ParityPlan) -> list[list[int]]:
    return [[g * plan.dilation[a] * s for g in range(plan.r + 1) for s in ((1,) if g == 0 else (-1, 1))]
            for a in range(plan.D)]


def _coordinates(e: _Source, plan: ParityPlan, spatial, depth: int, masked_x: bool) -> None:
    """Shifted coordinates of the program's pixels: leading axes `c{a}_{o}` (scalars, wrapped or
    with validity `v{a}_{o}`, a vector), the x axis `xo_{o}` (vectors; `xm`, the pixels inside
    the row, where a block overhangs it)."""
    for a, offsets in enumerate(_axis_offsets(plan)[:-1]):
        n = spatial[a]
        for o in offsets:
            nm = f"c{a}_{_name(o)}"
            if o == 0:
                e(f"{nm} = c{a}", depth)
            elif plan.wraps[a]:
                e(f"{nm} = (c{a} + {o + n}) % {n}", depth)
            else:
                e(f"{nm} = c{a} + {o}", depth)
                # a vector: the interpreter rejects a scalar validity and-ed into a vector mask
                e(f"v{a}_{_name(o)} = (xs * 0 + {nm} >= 0) & (xs * 0 + {nm} < {n})", depth)
    h = halo(plan)
    for o in _axis_offsets(plan)[-1]:  # the packed input carries h halo cells a side along x
        e(f"xo_{_name(o)} = xs + {o + h}", depth)
    if masked_x:
        e(f"xm = xs < {spatial[-1]}", depth)


def halo(plan: ParityPlan) -> int:
    """Cells the packed input carries on each side of the x axis (wrapped or zero), so that every
    shifted x load is a contiguous run: Triton then coalesces it along x (a wrap or a mask on x
    hid the contiguity and it laid the tile out along the rows, one cache line a lane)."""
    return plan.r * plan.dilation[-1]


def in_spatial(plan: ParityPlan, spatial) -> tuple[int, ...]:
    """The packed input's spatial shape: the x axis with its halo."""
    return tuple(spatial[:-1]) + (spatial[-1] + 2 * halo(plan),)


def _tap_load(plan: ParityPlan, spatial, base: str, rows: str, offs: tuple[int, ...], rmask: Optional[str],
              masked_x: bool) -> str:
    """A [BLOCK_X, rows] tile of `base` at the shifted pixel `offs` (one offset per axis)."""
    D = plan.D
    padded = in_spatial(plan, spatial)
    strides = [math.prod(padded[a + 1:]) for a in range(D)]
    lead = " + ".join(f"c{a}_{_name(o)} * {strides[a]}" for a, o in enumerate(offs[:-1])) or "0"
    xo = _name(offs[-1])
    masks = [f"v{a}_{_name(o)}" for a, o in enumerate(offs[:-1]) if o != 0 and not plan.wraps[a]]
    masks += ["xm"] if masked_x else []
    mask_terms = [f"({' & '.join(masks)})[:, None]"] if masks else []  # every term a vector over the pixels
    if rmask:
        mask_terms.append(f"{rmask}[None, :]")
    mask = f", mask={' & '.join(mask_terms)}, other=0.0" if mask_terms else ""
    return f"tl.load({base} + {rows} + ({lead} + xo_{xo})[:, None]{mask})"


def _butterfly(e: _Source, prefix: str, nz_axes: list[int], depth: int) -> dict:
    """Sums and differences of the 2^k tiles `{prefix}_<m|p per nonzero axis>` axis by axis:
    returns {per-axis 's'/'d' tuple: variable}."""
    states = {pat: f"{prefix}_{''.join(pat)}" for pat in itertools.product("mp", repeat=len(nz_axes))}
    for n in range(len(nz_axes)):
        new = {}
        for pat, var in states.items():
            if pat[n] != "p":
                continue
            minus = states[pat[:n] + ("m",) + pat[n + 1:]]
            for kind, op in (("s", "+"), ("d", "-")):
                pat2 = pat[:n] + (kind,) + pat[n + 1:]
                name = f"{prefix}_{''.join(pat2)}"
                e(f"{name} = {var} {op} {minus}", depth)
                new[pat2] = name
        states = new
    return states


def _pattern_offsets(plan: ParityPlan, groups: tuple[int, ...], pat: tuple[str, ...]) -> list[int]:
    """Per axis, the tap offset of one sign pattern ('m' / 'p' per paired axis) of a group tuple."""
    offs = [0] * plan.D
    for n, a in enumerate(paired_axes(groups)):
        offs[a] = groups[a] * plan.dilation[a] * (-1 if pat[n] == "m" else 1)
    return offs


def _pixel_offset(spatial, skip: int = 0) -> str:
    """A program's output pixels (`xs` along x, `c{a}` on the leading axes) as element offsets in
    an operand of this spatial shape whose x axis starts `skip` cells in (a halo)."""
    lead = " + ".join(f"c{a} * {math.prod(spatial[a + 1:])}" for a in range(len(spatial) - 1)) or "0"
    return f"({lead} + xs{f' + {skip}' if skip else ''})[:, None]"


def _combo_of(groups: tuple[int, ...], nz_axes: list[int], pat: tuple[str, ...]) -> tuple[int, ...]:
    combo = [0] * len(groups)
    for n, a in enumerate(nz_axes):
        combo[a] = 2 * groups[a] - 1 if pat[n] == "s" else 2 * groups[a]
    return tuple(combo)


def _row_offsets(rows: str, extent: int, S: int) -> str:
    """Element offsets of rows of S elements: int32 where a batch element's `extent` elements
    fit (64-bit offsets cost two registers an element of every [BLOCK_X, K] address tile)."""
    return f"({rows}).to(tl.int64) * {S}" if extent > INT32_MAX else f"({rows}) * {S}"


def _dot_kw(precision: str) -> str:
    return f", input_precision=\"{precision}\""


def _chunk_tiles(e: _Source, plan: ParityPlan, spatial, wanted: dict, runs: list[list[int]], rmask, masked_x: bool,
                 depth: int):
    """A chunk's combination tiles, group tuple by group tuple (its 2^k shifted loads, then
    `_butterfly`), for the combinations in `wanted` ({combo: dot index}); after each group tuple,
    yields ({dot index: tile variable} so far, the indices of the runs whose last tile just
    appeared): each run's dot goes right after it, so that its tiles live no longer than that."""
    tiles_of, done = {}, set()
    for gi, groups in enumerate(itertools.product(range(plan.r + 1), repeat=plan.D)):
        if not any(c in wanted for c in group_combos(groups)):
            continue
        nz = paired_axes(groups)
        prefix = f"t{gi}"
        for pat in itertools.product("mp", repeat=len(nz)):
            offs = tuple(_pattern_offsets(plan, groups, pat))
            load = _tap_load(plan, spatial, 'xbase', 'rows[None, :]', offs, rmask, masked_x)
            e(f"{prefix}_{''.join(pat)} = {load}", depth)
        for pat, var in _butterfly(e, prefix, nz, depth).items():
            n = wanted.get(_combo_of(groups, nz, pat))
            if n is not None:
                tiles_of[n] = var
        ready = [j for j, run in enumerate(runs) if j not in done and all(n in tiles_of for n in run)]
        done.update(ready)
        yield tiles_of, ready


def _concat_runs(plan: ParityPlan, dots: list[int], concat: int) -> list[list[int]]:
    """Consecutive dots of one chunk into one output class, in runs of a power of two <= concat:
    each run one tl.dot with its tiles' K concatenated."""
    runs, cur = [], []
    for n in dots:
        if cur and (n != cur[-1] + 1 or plan.dots[n][2] != plan.dots[cur[0]][2]):
            runs.append(cur)
            cur = []
        cur.append(n)
    if cur:
        runs.append(cur)
    out = []
    for run in runs:
        while run:
            m = min(concat, 1 << (len(run).bit_length() - 1))
            out.append(run[:m])
            run = run[m:]
    return out


def join_order(m: int) -> list[int]:
    """The leaf order of `_emit_dot`'s join tree that puts tile s at trailing index s of the
    reshaped [BLOCK_X, CHUNK * m] operand (K index = row * m + s)."""
    level = [np.array(i) for i in range(m)]
    while len(level) > 1:
        level = [np.stack([a, b], axis=-1) for a, b in zip(level[::2], level[1::2])]
    flat = level[0].reshape(-1)  # flat[s] = the leaf at trailing index s
    order = [0] * m
    for s, leaf in enumerate(flat):
        order[int(leaf)] = s
    return order


def _concat(tiles: list[str], block_x: int) -> str:
    """[block_x, CHUNK] tiles concatenated along K (index row * m + s: tile s's row), as an
    expression."""
    m = len(tiles)
    if m == 1:
        return tiles[0]
    level = [tiles[s] for s in join_order(m)]
    while len(level) > 1:
        level = [f"tl.join({a}, {c})" for a, c in zip(level[::2], level[1::2])]
    return f"tl.reshape({level[0]}, ({block_x}, {CHUNK * m}))"


def _interleaved_rows(k: str, m: int) -> str:
    """The (dot, CHUNK row) row, dot-major, of index k of an operand whose m dots' tiles are
    concatenated (`_concat`: index row * m + s takes dot s's row), as an expression."""
    return f"(({k} % {m}) * {CHUNK} + {k} // {m})"


def _weight_tile(plan: ParityPlan, n0: int, m: int, p: int) -> str:
    """The [CHUNK * m, p] weight operand of dots n0 .. n0 + m - 1, K index row * m + s taking dot
    n0 + s's row: a self-contained expression (`_hoist_weights` moves it)."""
    wmax = plan.max_out_pad
    if m == 1:
        return f"tl.load(wbase + {n0 * CHUNK * wmax} + wk{p})"
    k = f"tl.arange(0, {CHUNK * m})"
    return (f"tl.load(wbase + {n0 * CHUNK * wmax} + {_interleaved_rows(k, m)}[:, None] * {wmax}"
            f" + tl.arange(0, {p})[None, :])")


_WEIGHT_LOAD = "# weight load"


def _emit_dot(e: _Source, plan: ParityPlan, tiles: list[str], n0: int, block_x: int, precision: str) -> None:
    """acc_b += [tiles concatenated along K] @ the weight tiles of dots n0 .. n0 + len - 1; the
    weight load on a line of its own, tagged for `_hoist_weights`."""
    b = plan.dots[n0][2]
    e(f"wt{n0} = {_weight_tile(plan, n0, len(tiles), plan.out_pad(b))}  {_WEIGHT_LOAD}")
    e(f"acc{b} = tl.dot({_concat(tiles, block_x)}, wt{n0}, acc{b}{_dot_kw(precision)})")


def _hoist_weights(lines: list[str], lookahead: int) -> list[str]:
    """Each dot's weight load moved up to just before the dot `lookahead` dots earlier (the first
    ones to the `_WEIGHT_LOAD` marker line): its L2 round trip then overlaps that many dots
    instead of stalling its own (num_stages=1 kernels issue loads where they stand)."""
    if lookahead == 0:
        return [line.replace(f"  {_WEIGHT_LOAD}", "") for line in lines if line.strip() != _WEIGHT_LOAD]
    loads = [i for i, line in enumerate(lines) if line.endswith(_WEIGHT_LOAD) and line.strip() != _WEIGHT_LOAD]
    start = next(i for i, line in enumerate(lines) if line.strip() == _WEIGHT_LOAD)
    before: dict[int, list[str]] = {}
    for k, i in enumerate(loads):
        anchor = loads[k - lookahead] if k >= lookahead else start
        before.setdefault(anchor, []).append(lines[i].replace(f"  {_WEIGHT_LOAD}", ""))
    out = []
    for i, line in enumerate(lines):
        out += before.get(i, [])
        if i not in loads and i != start:
            out.append(line)
    return out


@dataclasses.dataclass(frozen=True)
class BlockEpilogue:
    """The forward's results as the layer's blocks (B, c, *spatial, *(D,)*k), read component-planar
    (B, c, D^k, *spatial): per packed output row its (block, plane), plane = channel x D^k +
    component; per block its planes (c x D^k), whether an offset operand (B|1, planes) is added to
    every pixel (the bias) and whether a prior operand of the block's shape is (a residual, the
    same buffer as the result on the GPU)."""

    rows: tuple[tuple[int, int], ...]
    planes: tuple[int, ...]
    offsets: tuple[bool, ...]
    priors: tuple[bool, ...]

    def __post_init__(self):
        if not len(self.planes) == len(self.offsets) == len(self.priors):
            raise ValueError(f"{len(self.planes)} blocks, {len(self.offsets)} offset and {len(self.priors)} "
                             "prior flags")

    def operands(self) -> tuple[str, ...]:
        """The kernel's pointer arguments after x and w: offsets, priors, then the results."""
        return (tuple(f"off{b}" for b, o in enumerate(self.offsets) if o)
                + tuple(f"pr{b}" for b, p in enumerate(self.priors) if p)
                + tuple(f"y{b}" for b in range(len(self.planes))))

    def pieces(self, start: int, rows: int) -> list[tuple[int, int, list[int]]]:
        """Packed rows start .. start + rows - 1 as runs in one block: (block, first column, planes)."""
        out: list[tuple[int, int, list[int]]] = []
        for j in range(rows):
            blk, plane = self.rows[start + j]
            if not out or out[-1][0] != blk:
                out.append((blk, j, []))
            out[-1][2].append(plane)
        return out


def index_expression(values: list[int], v: str) -> str:
    """An expression of the int tensor `v` that is values[v] for 0 <= v < len(values) (anything
    elsewhere): periodic with a constant step between periods, each period affine or a chain of
    selects. A class's rows of one block are channel-major and component-minor, so for them the
    period is the class's components in the block and the step D^k."""
    n = len(values)
    period, step = n, 0
    for L in range(1, n + 1):
        deltas = {values[j + L] - values[j] for j in range(n - L)}
        if len(deltas) <= 1:
            period, step = L, (deltas.pop() if deltas else 0)
            break
    base = values[:period]
    within = v if period >= n else f"({v} % {period})"
    diffs = {b - a for a, b in zip(base, base[1:])}
    if period == 1:
        expr = str(base[0])
    elif len(diffs) == 1:
        expr = f"{base[0]} + {within} * {diffs.pop()}"
    else:
        expr = str(base[-1])
        for i in reversed(range(period - 1)):
            expr = f"tl.where({within} == {i}, {base[i]}, {expr})"
    if period < n and step:
        expr = f"{expr} + ({v} // {period}) * {step}"
    elif period == 1:  # one plane: still a tensor over the columns
        expr = f"{expr} + {v} * 0"
    return f"({expr})"


def _packed_stores(e: _Source, plan: ParityPlan, group, width: int, S: int, masked_x: bool) -> None:
    """Each output class's accumulator into the packed result y (B, width, *spatial)."""
    row0 = plan.out_classes[group[0]][1]
    e(f"ybase = y + b * {width * S}")
    for b in group:
        _, start, rows = plan.out_classes[b]
        p = plan.out_pad(b)
        mask = []
        if rows < p:
            mask.append(f"(tl.arange(0, {p}) < {rows})[None, :]")
        if masked_x:
            mask.append("xm[:, None]")
        m = f", mask={' & '.join(mask)}" if mask else ""
        cols = _row_offsets(f"tl.arange(0, {p}) + {start - row0}", width * S, S)
        e(f"tl.store(ybase + ({cols})[None, :] + pix, acc{b}{m})")


def _block_stores(e: _Source, plan: ParityPlan, group, out: BlockEpilogue, offsets_batched: tuple[bool, ...], S: int,
                  masked_x: bool) -> None:
    """Each output class's accumulator into the blocks its rows belong to (`BlockEpilogue`): per
    run of the class's columns in one block, its planes' offsets (static), the bias offset and
    the prior added, one masked store."""
    flags = iter(offsets_batched)
    for blk, planes in enumerate(out.planes):
        e(f"y{blk}b = y{blk} + b * {planes * S}")
        if out.offsets[blk]:
            e(f"o{blk}b = off{blk}{f' + b * {planes}' if next(flags) else ''}")
        if out.priors[blk]:
            e(f"r{blk}b = pr{blk} + b * {planes * S}")
    for b in group:
        _, start, rows = plan.out_classes[b]
        p = plan.out_pad(b)
        e(f"jj = tl.arange(0, {p})")
        for blk, j0, planes in out.pieces(start, rows):
            j1 = j0 + len(planes)
            e(f"pl = {index_expression(planes, f'(jj - {j0})' if j0 else 'jj')}")
            cond = ([f"(jj >= {j0})"] if j0 else []) + ([f"(jj < {j1})"] if j1 < p else [])
            pm = " & ".join(cond)
            masks = ([f"({pm})[None, :]"] if cond else []) + (["xm[:, None]"] if masked_x else [])
            mask = f", mask={' & '.join(masks)}" if masks else ""
            value = f"acc{b}"
            if out.offsets[blk]:
                lm = f", mask={pm}, other=0.0" if cond else ""
                e(f"val = {value} + tl.load(o{blk}b + pl{lm})[None, :]")
                value = "val"
            at = f"({_row_offsets('pl', out.planes[blk] * S, S)})[None, :] + pix"
            if out.priors[blk]:
                e(f"val = {value} + tl.load(r{blk}b + {at}{mask}{', other=0.0' if masks else ''})")
                value = "val"
            e(f"tl.store(y{blk}b + {at}, {value}{mask})")


def forward_source(plan: ParityPlan, spatial: tuple[int, ...], group: tuple[int, ...], block_x: int,
                   batched: tuple[bool, ...], precision: str, name: str, concat: int = 1,
                   lookahead: int = 0, out: Optional[BlockEpilogue] = None) -> tuple[str, int]:
    """The forward kernel of output classes `group`: (source, programs per batch element).
    Operands x (B|1, cin, *in_spatial), w (B|1, dots, CHUNK, max_out_pad); result y (B, width of
    the group's classes, *spatial). With `out` (every output class in `group`): operands x, w,
    the offsets and the priors, results the blocks (`BlockEpilogue`); `batched` then flags x, w
    and each offset operand."""
    D, S = plan.D, math.prod(spatial)
    n_x = spatial[-1]
    nxb = -(-n_x // block_x)
    masked_x = n_x % block_x != 0
    programs = nxb * math.prod(spatial[:-1])
    wmax = plan.max_out_pad
    index = plan.dot_index()
    width = sum(plan.out_classes[b][2] for b in group)
    if out is not None and len(group) != len(plan.out_classes):
        raise ValueError(f"a block epilogue needs every output class in one launch; the group has {len(group)} of "
                         f"{len(plan.out_classes)}")
    e = _Source.kernel(name, ("x", "w") + (out.operands() if out is not None else ("y",)))
    e(f"xb = pid % {nxb}")
    e(f"t = pid // {nxb}")
    for a in reversed(range(D - 1)):
        e(f"c{a} = t % {spatial[a]}")
        e(f"t = t // {spatial[a]}")
    e("b = t.to(tl.int64)")
    e(f"xs = xb * {block_x} + tl.arange(0, {block_x})")
    e(f"kk = tl.arange(0, {CHUNK})")
    S_in = math.prod(in_spatial(plan, spatial))
    e(f"xbase = x{f' + b * {plan.cin * S_in}' if batched[0] else ''}")
    e(f"wbase = w{f' + b * {len(plan.dots) * CHUNK * wmax}' if batched[1] else ''}")
    _coordinates(e, plan, spatial, 1, masked_x)
    for b in group:
        e(f"acc{b} = tl.zeros(({block_x}, {plan.out_pad(b)}), tl.float32)")
    pads = sorted({plan.out_pad(b) for b in group})
    for p in pads:
        e(f"wk{p} = kk[:, None] * {wmax} + tl.arange(0, {p})[None, :]")
    e(_WEIGHT_LOAD)
    for ch, (cls, start, rows) in enumerate(plan.chunks):
        wanted = {combo: n for (c2, combo), n in index.items() if c2 == ch and plan.dots[n][2] in group}
        if not wanted:
            continue
        e(f"rows = {_row_offsets(f'kk + {start}', plan.cin * S_in, S_in)}")
        rmask = None
        if rows < CHUNK:
            e(f"rmask = kk < {rows}")
            rmask = "rmask"
        runs = _concat_runs(plan, sorted(wanted.values()), concat)
        for tiles_of, ready in _chunk_tiles(e, plan, spatial, wanted, runs, rmask, masked_x, 1):
            for j in ready:
                _emit_dot(e, plan, [tiles_of[n] for n in runs[j]], runs[j][0], block_x, precision)
    e(f"pix = {_pixel_offset(spatial)}")
    if out is None:
        _packed_stores(e, plan, group, width, S, masked_x)
    else:
        _block_stores(e, plan, group, out, tuple(batched[2:]), S, masked_x)
    e.lines = _hoist_weights(e.lines, lookahead)
    return e.text(), programs


def _slab_loops(e: _Source, plan: ParityPlan, spatial, per: int, block_x: int) -> None:
    """The weight gradient's loops over a program's slab (`per` rows of pixels from `slab * per`)
    and each row's blocks of block_x pixels: their bodies at depth 3, with the shifted
    coordinates (`_coordinates`) and the pixels' offsets `pix`."""
    n_rows = math.prod(spatial[:-1])
    e(f"for row in range(slab * {per}, tl.minimum(slab * {per} + {per}, {n_rows})):")
    t = "row"
    for a in reversed(range(plan.D - 1)):
        e(f"c{a} = {t} % {spatial[a]}", 2)
        if a:
            e(f"r{a} = {t} // {spatial[a]}", 2)
            t = f"r{a}"
    e(f"for xb in range({-(-spatial[-1] // block_x)}):", 2)
    e(f"xs = xb * {block_x} + tl.arange(0, {block_x})", 3)
    _coordinates(e, plan, spatial, 3, spatial[-1] % block_x != 0)
    e(f"pix = {_pixel_offset(spatial)}", 3)


def class_chunks(plan: ParityPlan, c: int) -> tuple[int, int, list[int]]:
    """(first chunk, chunks, the first chunk's dot indices) of input class index c. The chunks
    are consecutive and so are their dots, every chunk of the class with the same dots in the same
    order: the class has chunks x len(dots) dots, the next chunk's following the first's."""
    chs = [ch for ch, chunk in enumerate(plan.chunks) if chunk[0] == plan.in_classes[c][0]]
    return chs[0], len(chs), [n for n, d in enumerate(plan.dots) if d[0] == chs[0]]


def weight_grad_source(plan: ParityPlan, spatial: tuple[int, ...], c: int, block_x: int, slabs: int,
                       concat: int, batched: tuple[bool, bool], precision: str, name: str,
                       g_halo: bool = False) -> tuple[str, int]:
    """The weight gradient of input class index c's dots: (source, programs per batch element).
    Operands x (B|1, cin, *in_spatial), g (B|1, cout, *spatial), or with `g_halo` (B|1, cout,
    *in_spatial), the cotangent as the input gradient reads it, its halo skipped; result part
    (B, slabs, dots of the class, CHUNK, max_out_pad), every entry written. A program owns one chunk of the class and
    one slab of pixel rows; per block of pixels it forms the chunk's combinations once, loads each
    output class's cotangent tile once, and accumulates A_cat^T dY per run of the chunk's dots
    into one output class (`_concat_runs`: the run's tiles concatenated, M = CHUNK x run)."""
    masked_x = spatial[-1] % block_x != 0
    per = -(-math.prod(spatial[:-1]) // slabs)
    wmax = plan.max_out_pad
    S, S_in = math.prod(spatial), math.prod(in_spatial(plan, spatial))
    S_g = S_in if g_halo else S
    _, n_ch, ch_dots = class_chunks(plan, c)
    _, cstart, crows = plan.in_classes[c]
    per_chunk = len(ch_dots)
    runs = _concat_runs(plan, ch_dots, concat)
    e = _Source.kernel(name, ("x", "g", "part"))
    e(f"ci = pid % {n_ch}")
    e(f"slab = (pid // {n_ch}) % {slabs}")
    e(f"b = (pid // {n_ch * slabs}).to(tl.int64)")
    e(f"kk = tl.arange(0, {CHUNK})")
    e(f"xbase = x{f' + b * {plan.cin * S_in}' if batched[0] else ''}")
    e(f"gbase = g{f' + b * {plan.cout * S_g}' if batched[1] else ''}")
    e(f"rows = {_row_offsets(f'kk + {cstart} + ci * {CHUNK}', plan.cin * S_in, S_in)}")
    rmask = None
    if crows % CHUNK:
        e(f"rmask = kk < {crows} - ci * {CHUNK}")
        rmask = "rmask"
    outs = sorted({plan.dots[n][2] for n in ch_dots})
    for ob in outs:
        _, ostart, orows = plan.out_classes[ob]
        p = plan.out_pad(ob)
        e(f"gcol{ob} = ({_row_offsets(f'tl.arange(0, {p}) + {ostart}', plan.cout * S_g, S_g)})[None, :]")
        if orows < p:
            e(f"gm{ob} = (tl.arange(0, {p}) < {orows})[None, :]")
    for j, run in enumerate(runs):
        e(f"a{j} = tl.zeros(({CHUNK * len(run)}, {plan.out_pad(plan.dots[run[0]][2])}), tl.float32)")
    _slab_loops(e, plan, spatial, per, block_x)
    gpix = "pix"
    if g_halo:
        e(f"gpix = {_pixel_offset(in_spatial(plan, spatial), halo(plan))}", 3)
        gpix = "gpix"
    wanted = {plan.dots[n][1]: n for n in ch_dots}
    loaded = set()
    for tiles_of, ready in _chunk_tiles(e, plan, spatial, wanted, runs, rmask, masked_x, 3):
        for j in ready:
            run = runs[j]
            ob = plan.dots[run[0]][2]
            if ob not in loaded:
                masks = [f"gm{ob}"] if plan.out_classes[ob][2] < plan.out_pad(ob) else []
                masks += ["xm[:, None]"] if masked_x else []
                m = f", mask={' & '.join(masks)}, other=0.0" if masks else ""
                e(f"gy{ob} = tl.load(gbase + gcol{ob} + {gpix}{m})", 3)
                loaded.add(ob)
            e(f"a{j} = tl.dot(tl.trans({_concat([tiles_of[n] for n in run], block_x)}), gy{ob}, a{j}"
              f"{_dot_kw(precision)})", 3)
    e(f"pbase = part + ((b * {slabs} + slab) * {n_ch} + ci) * {per_chunk * CHUNK * wmax}")
    for j, run in enumerate(runs):
        k, p = CHUNK * len(run), plan.out_pad(plan.dots[run[0]][2])
        tile = f"pbase + {(run[0] - ch_dots[0]) * CHUNK * wmax}"
        e(f"k_cat = tl.arange(0, {k})")
        e(f"tl.store({tile} + {_interleaved_rows('k_cat', len(run))}[:, None] * {wmax} + tl.arange(0, {p})[None, :], "
          f"a{j})")
        if p < wmax:  # zeros in the columns past the run's output class (its CHUNK x 2^i rows: a tile)
            e(f"wcol = tl.arange(0, {wmax})[None, :]")
            e(f"tl.store({tile} + k_cat[:, None] * {wmax} + wcol, tl.zeros(({k}, {wmax}), tl.float32), "
              f"mask=wcol >= {p})")
    return e.text(), n_ch * slabs


def kernel_plan(name: str, source: str, programs: int, num_warps: int = 4) -> KernelPlan:
    return KernelPlan(name=name, source=source, programs_per_batch=programs, out_spatial=(), num_warps=num_warps,
                      num_stages=1, nonzeros=0, peak_live_z=0)
