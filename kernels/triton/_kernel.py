"""The fused ConvContract kernels as Triton source, generated per layer from its invariant basis:
the forward (which also serves the input gradient, run on the transposed layer) and the weight
gradient with its deterministic partial sums.

The factorised form of docs/ARCHITECTURE.md, for one tile of output pixels and one chunk of input
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

This module holds the generators (forward, weight gradient, the partial sums' fixed-order
reduction) and `compile_plan`; the stencil emitters they share are in `_stencil`, the tiling
and plan records in `_tiling`.
"""

from __future__ import annotations

import functools
import hashlib
import linecache
import math
from typing import Sequence

from .._fused import INT32_MAX, next_pow2
from .._spec import ConvSpec
from ._stencil import _Layer, _Source
from ._tiling import BlockSizes, Geometry, KernelPlan


@functools.lru_cache(maxsize=256)
def plan_kernel(
    spec: ConvSpec,
    geometry: Geometry,
    mode: str,
    blocks: BlockSizes,
    aliased: bool = False,
    bf16_dot_in_fp32: bool = False,
    layout_barrier: bool = True,
    carried: tuple[int, ...] = (),
) -> KernelPlan:
    """Generate the forward kernel source for one layer, input shape and precision mode.

    `carried`: output keys whose previous value (a `y{b}_prev` operand in the output's layout,
    after the bias offsets) the kernel adds to what it computes: a filter group's launch
    accumulating into the previous group's outputs (on the GPU the operand and the output share
    one buffer: each element is loaded and stored by the same program).
    `aliased` adds one unused pointer per output that is not carried, before the outputs: the
    launcher passes the buffers of `input_output_aliases` (the poisoned outputs of the tests)
    both ways.
    `bf16_dot_in_fp32` (for Triton's interpreter, whose tl.dot multiplies bf16 operands as raw
    uint16 words) rounds the bf16 operands and multiplies them in fp32: the same products.
    `layout_barrier` passes each Z through an opaque identity (inline PTX, so GPU only) before
    its dot. Without it Triton moves the dot-operand layout conversion up through the FMAs to
    every loaded tile: 108 shared-memory round trips per chunk instead of 40 on the standard layer.
    """
    L = _Layer(spec, geometry, mode, blocks, bf16_dot_in_fp32, layout_barrier)
    op, pf = L.op, L.pf
    src = _Source()
    name = "conv_contract_fwd_" + hashlib.sha1(
        repr((spec.digest(), geometry, mode, blocks, aliased, bf16_dot_in_fp32, layout_barrier, carried)).encode()
    ).hexdigest()[:12]
    xs = [f"x{a}" for a in range(len(spec.in_keys))]
    ws = [f"w{t}" for t in range(len(spec.pairs))]
    ys = [f"y{b}" for b in range(len(spec.out_keys))]
    biased = dict(enumerate(geometry.bias_batched))
    offs = [f"bias{b}" for b in range(len(spec.out_keys)) if biased.get(b) is not None]
    if sorted(set(carried)) != list(carried) or any(not 0 <= b < len(spec.out_keys) for b in carried):
        raise ValueError(f"`carried` (={carried!r}) must be increasing output key indices below {len(spec.out_keys)}")
    prevs = [f"y{b}_prev" for b in carried]
    aliases = [f"y{b}_in" for b in range(len(spec.out_keys)) if b not in carried] if aliased else []

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
            # w[o, c, f] lies output-channel minor (`launch` asks for WEIGHT_ORDER): a warp's lanes
            # along o read one 128-byte line (row-major (o, c, f) would give each lane its own line)
            n_out = spec.out_keys[b][2]
            ob_off = f"o{b}"
            cc_off = f"(cc * {n_out} + {tm.f * c_a * n_out})"
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

    # -- the bias offsets (o, D^k per example) added to every pixel, then every output block written
    for b, (k_b, _, o) in enumerate(spec.out_keys):
        if biased.get(b) is None:
            continue
        src(f"ob = bias{b} + bat * {o * L.dk_out[b]}" if biased[b] else f"ob = bias{b}")
        for j in range(L.dk_out[b]):
            off = f"tl.load(ob + o{b} * {L.dk_out[b]} + {j}, mask=o{b}_ok, other=0.0)"
            src(f"acc{b}_{j} = acc{b}_{j} + {off}{'[:, None]' if op else '[None, :]'}")
    for b, (k_b, _, o) in enumerate(spec.out_keys):
        block = o * L.nout * L.dk_out[b]
        ooff = f"o{b}.to(tl.int64)" if block > INT32_MAX else f"o{b}"
        src(f"yb = y{b} + bat * {block}")
        if b in carried:
            src(f"pb = y{b}_prev + bat * {block}")
        for j in range(L.dk_out[b]):
            pos = L.component_offset("q", L.dk_out[b], j, L.nout, L.blocks.planar_out)
            if op:
                ptr = f"yb + ({ooff} * {L.nout * L.dk_out[b]})[:, None] + {L.as_row(pos)}"
                mask = f"o{b}_ok[:, None]" + (f" & {L.as_row('p_ok')}" if L.has_p_ok else "")
            else:
                ptr = f"yb + {L.as_col(pos)} + ({ooff} * {L.nout * L.dk_out[b]})[None, :]"
                mask = f"o{b}_ok[None, :]" + (f" & {L.as_col('p_ok')}" if L.has_p_ok else "")
            if b in carried:
                before = "pb" + ptr[len("yb"):]
                src(f"acc{b}_{j} = acc{b}_{j} + tl.load({before}, mask={mask}, other=0.0)")
            src(f"tl.store({ptr}, acc{b}_{j}, mask={mask})")

    return _finish(L, src, name, xs + ws + offs + prevs + aliases + ys, L.n_otiles * math.prod(L.n_tiles))


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
    sums: tuple[int, ...] = (),
) -> KernelPlan:
    """Generate a weight-gradient kernel: per program, partial sums of

        dw[o, c, f] = sum_{x, j} G_b[o, x, j] Z[c, f, j, x],   Z as in the forward (recomputed)

    and, for each output key b in `sums`, of the cotangent over the pixels, sum_x G_b[o, x, j]
    (the gradient of an offset added at every pixel: the layer's bias), from the tiles the
    kernel loads anyway; the programs of channel chunk 0 write those, so each is written once.

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
        repr((spec.digest(), geometry, mode, blocks, groups, units, bf16_dot_in_fp32, layout_barrier, sums)).encode()
    ).hexdigest()[:12]
    xs = [f"x{a}" for a in range(len(spec.in_keys))]
    gs = [f"g{b}" for b in range(len(spec.out_keys))]
    total_tiles = math.prod(L.n_tiles)
    n_iter = -(-total_tiles // groups)
    offsets, W = {}, 0
    for t, f in units:
        offsets[(t, f)] = W
        W += spec.out_keys[spec.pairs[t].out_index][2] * spec.in_keys[spec.pairs[t].in_index][2]
    summed = [(b, j) for b in sums for j in range(L.dk_out[b])]
    for b, j in summed:
        offsets[("sum", b, j)] = W
        W += spec.out_keys[b][2]

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
    for b, j in summed:
        # summed over the pixels once, after the loop: a per-iteration tl.sum across the lanes
        # (5 shuffles and adds per register) nearly doubled the kernel's instructions
        src(f"gs{b}_{j} = tl.zeros(({L.BO[b]}, {L.BP}), tl.float32)")
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
    for b, j in sorted(set(used) | set(summed)):
        block = spec.out_keys[b][2] * L.nout * L.dk_out[b]
        ooff = f"o{b}.to(tl.int64)" if block > INT32_MAX else f"o{b}"
        pos = L.component_offset("q", L.dk_out[b], j, L.nout, L.blocks.planar_in)  # cotangents: operands
        mask = f"o{b}_ok[:, None]" + (f" & {L.as_row('p_ok')}" if L.has_p_ok else "")
        ptr = f"g{b}b + ({ooff} * {L.nout * L.dk_out[b]})[:, None] + {L.as_row(pos)}"
        load = f"tl.load({ptr}, mask={mask}, other=0.0).to(tl.float32)"
        if (b, j) in summed:  # the sum in fp32, before any rounding for the dot
            src(f"graw{b}_{j} = {load}")
            src(f"gs{b}_{j} += graw{b}_{j}")
            load = f"graw{b}_{j}"
        if (b, j) in used:
            src(f"gt{b}_{j} = {L.dot_operand(load)}")

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
    for b, j in summed:
        # (o * 0 + ch): a tile-shaped test, as Triton's interpreter wants masks of the store's shape
        src(f"tl.store(pb + {offsets[('sum', b, j)]} + o{b}, tl.sum(gs{b}_{j}, axis=1), mask=o{b}_ok & ((o{b} * 0 + ch) == 0))")
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
def plan_partial_sums(batch: int, groups: int, width: int, block: int = 64, group_tile: int = 32,
                      prefix: str = "conv_contract_dw_sum") -> KernelPlan:
    """out[b, :] = sum_g part[b, g, :] in a fixed order: a deterministic reduction.

    A program owns `block` columns of one batch element and reads the groups `group_tile` rows at
    a time into a (group_tile, block) accumulator (row r sums groups r, r + group_tile, ...),
    then adds its rows by `tl.sum`'s fixed tree: bit-identical run after run. Many narrow
    programs with wide independent loads, because the buffer is small (a few MB) and a handful of
    programs each walking all groups one row at a time is latency-bound (4 programs for
    (4, 512, 1024) took 0.15 ms on the H200 for 2 MB).
    """
    name = f"{prefix}_{batch}_{groups}_{width}"  # the profiler attributes kernels by name prefix
    n_blocks = -(-width // block)
    group_tile = min(group_tile, next_pow2(groups))
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
        f"    rows = tl.arange(0, {group_tile})",
        f"    acc = tl.zeros(({group_tile}, {block}), tl.float32)",
        f"    base = part + bat * {groups * width}",
        f"    for g0 in range(0, {groups}, {group_tile}):",
        "        g = g0 + rows",
        f"        mask = (g < {groups})[:, None] & ok[None, :]",
        f"        acc += tl.load(base + (g * {width})[:, None] + cols[None, :], mask=mask, other=0.0)",
        f"    tl.store(out + bat * {width} + cols, tl.sum(acc, axis=0), mask=ok)",
    ]) + "\n"
    return KernelPlan(name=name, source=source, programs_per_batch=n_blocks, out_spatial=(),
                      num_warps=4, num_stages=3, nonzeros=0, peak_live_z=0)


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
