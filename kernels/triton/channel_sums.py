"""Per-channel sums over the pixels of a block, and of its component products, as one Triton
kernel that reads the block once (plus a fixed-order sum of the per-program partials).

    first, products = channel_sums_triton(a)        # sum_p a[c, p, i], sum_p a[c, p, i] a[c, p, j]
    first, products = channel_sums_triton(a, b)     # sum_p a[c, p, i], sum_p a[c, p, i] b[c, p, j]
    first, _ = channel_sums_triton(a, products=False)
    first, products = channel_sums_triton(a, shift=s)  # of d = a - s[:, None, :]: d is never written

a and b are (c, P, T) float32, read in row-major order (components minor, the CUDA ConvContract
kernels' layout under GINJAX_BLOCK_LAYOUT=minor) or, with `planar=True`, component-planar (every
block kernel's layout on a GPU by default, kernels/_layout.py): the same logical
array laid out (c, T, P) in memory, each component's pixels contiguous, which the launch asks XLA
for (as the Triton ConvContract and VectorNeuron kernels ask for theirs), so that XLA needs no
transpose between the sums and planar neighbours. The sums are the norms' statistics, the norms'
affine gradient and the layers' bias gradients. XLA runs them as column reductions with a
3-wide (or, for the products, a 9-wide computed) kept axis and its emitter reads the block at a
fraction of HBM speed: on the H200, ResNet step profile at fffb5eb, ~0.2 ms per 201 MB vector
block where one read takes ~0.05 ms (bench/NOTES.md, "Session 14").

A program owns one (example, channel) and a run of pixels. It loads the T components of
`block` pixels with T stride-T loads (the loads of one tile touch the same cache lines, so HBM
is read once; planar: T contiguous runs, component t of pixel p at t P + p) and keeps T (+ T^2,
or T (T + 1) / 2 for a = b) register accumulators. It writes one partial row per program, and
`plan_partial_sums` adds the rows in a fixed order: the result is bit-identical run after run
(no atomics). Under `jax.vmap` one launch covers the batch (custom_vmap, as the other kernels).
With TRITON_INTERPRET=1 the same source runs on the host (planar operands' axes moved there).

Not differentiable by itself: the callers (ginjax._norm_stats, the triton backend's bias
gradient) use it inside their own custom_vjp rules.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from .._fused import INT32_MAX
from ._kernel import plan_partial_sums
from ._launch import batch_size, batched_flags, block_order, run_plan
from ._tiling import KernelPlan
from .conv_contract import batched_op

__all__ = ["channel_sums_triton", "products_fit"]

# components whose products the kernel keeps in registers (T (T + 1) / 2 + T accumulators)
_MAX_PRODUCT_COMPONENTS = 4
# programs a launch aims at: a few per SM slot on a 132-SM GPU, each still a long run of pixels
_TARGET_PROGRAMS = 4096


def products_fit(T: int) -> bool:
    """Whether the kernel sums component products for T components (vectors up to D = 4)."""
    return 1 <= T <= _MAX_PRODUCT_COMPONENTS


def channel_sums_triton(a: jax.Array, b: Optional[jax.Array] = None, *, products: bool = True,
                        shift: Optional[jax.Array] = None, planar: bool = False):
    """(sum_p a[c, p, :] (c, T), sum_p a[c, p, :, None] b[c, p, None, :] (c, T, T) or None).

    Args:
        a: (c, P, T) float32.
        b: (c, P, T) float32, or None for b = a (read once; the products are symmetric).
        products: also sum the products (T <= 4); False: the first sums only (b must be None).
        shift: (c, T) float32 or None, subtracted from every pixel of `b` as it is loaded (of `a`
            too where `b` is None, for both sums): the sums of a shifted block without writing it.
        planar: index `a` and `b` component-planar, physically (c, T, P), and ask XLA for that
            layout (False: row-major (c, P, T)). The shapes and sums are the same either way;
            the layout XLA gives the operands around the call differs. For T = 1 the two
            layouts are one and the row-major kernel runs.
    """
    if a.ndim != 3:
        raise ValueError(f"`a` (shape {a.shape}) must be (channels, pixels, components)")
    if a.dtype != jnp.float32:
        raise ValueError(f"`a` (dtype {a.dtype}) must be float32")
    if b is not None:
        if not products:
            raise ValueError("`b` (given) needs `products`=True: the first sums read `a` only")
        if b.shape != a.shape or b.dtype != a.dtype:
            raise ValueError(f"`b` (shape {b.shape}, {b.dtype}) must match `a` (shape {a.shape}, {a.dtype})")
    T = int(a.shape[2])
    if shift is not None and (shift.shape != (a.shape[0], T) or shift.dtype != a.dtype):
        raise ValueError(f"`shift` (shape {shift.shape}, {shift.dtype}) must be ({a.shape[0]}, {T}) {a.dtype}")
    if products and not products_fit(T):
        raise ValueError(f"`a` has T (={T}) components; products are summed for 1 <= T <= {_MAX_PRODUCT_COMPONENTS}")
    if int(a.shape[1]) * T > INT32_MAX:
        raise ValueError(f"`a` (shape {a.shape}) has more than 2^31 elements per channel")
    operands = (a[None],) if b is None else (a[None], b[None])
    operands += () if shift is None else (shift[None],)
    planar = bool(planar) and T > 1
    (total,) = _batched(bool(products), b is not None, shift is not None, planar)(operands)
    c = int(a.shape[0])
    total = total[0].reshape(c, -1)
    first = total[:, :T]
    return first, (total[:, T:].reshape(c, T, T) if products else None)


@functools.lru_cache(maxsize=16)
def _batched(products: bool, two: bool, shifted: bool, planar: bool):
    return batched_op(lambda operands: (_launch(products, two, shifted, planar, operands),))


def _launch(products: bool, two: bool, shifted: bool, planar: bool, operands) -> jax.Array:
    """operands: a (and b), each (1 or B, c, P, T), (and the shift, (1 or B, c, T)) -> (B, c * n_out)
    sums, n_out = T (+ T^2). `planar`: a and b are read (and asked of XLA) as (1 or B, c, T, P)."""
    batch = batch_size(operands)
    flags = batched_flags(operands, batch)
    _, c, P, T = (int(n) for n in operands[0].shape)
    plan, chunks = plan_channel_sums(c, P, T, batch, products, two, flags, shifted, planar)
    width = c * _outputs(T, products)
    part_shape = jax.ShapeDtypeStruct((batch, chunks, width), jnp.float32)
    blocks = 2 if two else 1
    # a (batch, c, P, T) block, P one flattened spatial axis: planar is (batch, c, T, P) in memory
    in_orders = [block_order(1, 4, planar)] * blocks + [None] * (len(operands) - blocks)
    (part,) = run_plan(plan, [part_shape], plan.programs_per_batch * batch, list(operands), in_orders=in_orders)
    sums = plan_partial_sums(batch, chunks, width, prefix="channel_sums_total")
    (total,) = run_plan(sums, [jax.ShapeDtypeStruct((batch, width), jnp.float32)], sums.programs_per_batch * batch,
                        [part])
    return total


def _outputs(T: int, products: bool) -> int:
    return T + (T * T if products else 0)


def _tile(T: int) -> int:
    return 512 if T <= 4 else 128


def chunking(c: int, P: int, T: int, batch: int) -> tuple[int, int]:
    """(pixels per program, programs per (example, channel)): about _TARGET_PROGRAMS programs in
    all, each a whole number of tiles."""
    tile = _tile(T)
    tiles = -(-P // tile)
    chunks = max(1, min(tiles, -(-_TARGET_PROGRAMS // (batch * c))))
    per = -(-tiles // chunks) * tile
    return per, -(-P // per)


def plan_channel_sums(c: int, P: int, T: int, batch: int, products: bool, two: bool,
                      batched: tuple[bool, ...], shifted: bool = False,
                      planar: bool = False) -> tuple[KernelPlan, int]:
    """The generated kernel and the number of pixel runs per (example, channel).

    Partials go to part[bat, chunk, ch * n_out + k]: k < T the sums of a, then the T x T
    products row-major. `shifted`: a last operand `shift` (c, T) is subtracted from b's loads
    (from a's where b is a), masked pixels staying 0. `planar`: a and b are indexed (batch, c,
    T, P), component i of pixel p at i * P + p within a channel (the row-major kernel's source is
    unchanged by the option; the planar one's name says `_planar`)."""
    tile = _tile(T)
    per, chunks = chunking(c, P, T, batch)
    n_out = _outputs(T, products)
    tag = (f"{'ab' if two else 'aa' if products else 'a'}{'_shifted' if shifted else ''}"
           f"{'_planar' if planar else ''}_{c}_{P}_{T}_{batch}_"
           f"{''.join('1' if f else '0' for f in batched)}")
    name = f"channel_sums_{tag}"  # the profiler attributes kernels by name prefix
    args = (["a", "b"] if two else ["a"]) + (["shift"] if shifted else []) + ["part"]
    pairs = [(i, j) for i in range(T) for j in range(T) if two or j >= i] if products else []
    lines = [
        "import triton",
        "import triton.language as tl",
        "",
        "",
        "@triton.jit",
        f"def {name}({', '.join(args)}):",
        "    pid = tl.program_id(0)",
        f"    ch = pid % {c}",
        f"    chunk = (pid // {c}) % {chunks}",
        f"    bat = (pid // {c * chunks}).to(tl.int64)",
        f"    row = ch.to(tl.int64) * {P * T}",
        f"    a_row = a + {'bat * ' + str(c * P * T) + ' + ' if batched[0] else ''}row",
    ]
    if two:
        lines.append(f"    b_row = b + {'bat * ' + str(c * P * T) + ' + ' if batched[1] else ''}row")
    if shifted:
        shift_row = f"shift + {'bat * ' + str(c * T) + ' + ' if batched[-1] else ''}ch.to(tl.int64) * {T}"
        lines += [f"    shift{i} = tl.load({shift_row} + {i})" for i in range(T)]
    if planar:  # one base per component run: int64 pointers, the loop's offsets stay p < 2^31
        for i in range(T):
            lines.append(f"    a_row{i} = a_row + {i * P}")
            if two:
                lines.append(f"    b_row{i} = b_row + {i * P}")
    lines.append(f"    offs = tl.arange(0, {tile})")
    for i in range(T):
        lines.append(f"    f{i} = tl.zeros(({tile},), tl.float32)")
    for i, j in pairs:
        lines.append(f"    q{i}{j} = tl.zeros(({tile},), tl.float32)")
    lines += [
        f"    start = chunk * {per}",
        f"    for p0 in range(start, start + {per}, {tile}):",
        "        p = p0 + offs",
        f"        m = p < {P}",
    ]
    for i in range(T):
        for x in ("a", "b") if two else ("a",):
            offset = f"{x}_row{i} + p" if planar else f"{x}_row + p * {T} + {i}"
            lines.append(f"        {x}{i} = tl.load({offset}, mask=m, other=0.0)")
        if shifted:  # masked pixels must add nothing: the shift is applied where m only
            lines.append(f"        {'b' if two else 'a'}{i} = tl.where(m, {'b' if two else 'a'}{i} - shift{i}, 0.0)")
    for i in range(T):
        lines.append(f"        f{i} += a{i}")
    for i, j in pairs:
        lines.append(f"        q{i}{j} += a{i} * {'b' if two else 'a'}{j}")
    lines.append(f"    out = part + ((bat * {chunks} + chunk) * {c} + ch) * {n_out}")
    for i in range(T):
        lines.append(f"    tl.store(out + {i}, tl.sum(f{i}, axis=0))")
    for i, j in pairs:
        lines.append(f"    s{i}{j} = tl.sum(q{i}{j}, axis=0)")
        lines.append(f"    tl.store(out + {T + i * T + j}, s{i}{j})")
        if not two and j != i:
            lines.append(f"    tl.store(out + {T + j * T + i}, s{i}{j})")
    source = "\n".join(lines) + "\n"
    plan = KernelPlan(name=name, source=source, programs_per_batch=c * chunks, out_spatial=(), num_warps=4,
                      num_stages=3, nonzeros=0, peak_live_z=0)
    return plan, chunks
