"""The layer as a parity-blocked convolution on the tensor cores: one Triton forward, the same
kernel on the transposed plan for the input gradient, and a weight-gradient kernel.

    outputs = conv_contract_parity(spec, inputs, weights, mode)

`_parity_plan.py` says why the layer's dense filter, rewritten from taps to sums and differences
of opposite taps, splits into one small GEMM per (input component class, tap combination);
`_parity_source.py` generates the kernels. Here: packing the blocks into class-ordered rows, the
filter's rewrite (plain jnp, differentiated by autodiff down to the layer's weights), the
launches and a custom_vjp. The tests compare it with `reference` and with `kernels.dense` (the
same filter as one convolution), whose autodiff is the gradients' oracle.

The input is packed by XLA (one pass over the inputs, with the x halo). Where one launch holds
every output class, the forward writes the layer's blocks itself (component-planar), its bias
offsets and residual added in the epilogue, and the input gradient writes the input's blocks
(`BlockEpilogue`); otherwise (narrow output groups, the CUDA forward) the kernel writes packed
rows that XLA unpacks, adding offsets and residual. Under `jax.vmap` each kernel is one launch for
the batch (`batched_op`). With GINJAX_PARITY_CUDA=on the forward and the input gradient run
kernels/cuda's mma.sync kernel where it covers the plan (`cuda_forward_runs`; opt-in until a GPU
has measured it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._bias import float32_offsets_from_means, input_means
from .._env import env_choice
from .._fused import MIN_DOT_TILE, next_pow2
from .._reduce import add_spatial_offset, middle_sum
from ..dense import assemble_dense_filter
from .._spec import ConvSpec
from .._registry import add_residual
from ._launch import batch_size, batched_flags, block_order, run_plan
from ._parity_plan import (
    CHUNK,
    MAX_OUT_WIDTH,
    PackedLayer,
    ParityPlan,
    combo_matrix,
    combo_q,
    component_class,
    packed_layer,
    unsupported,
)
from ._parity_source import (
    BlockEpilogue,
    class_chunks,
    forward_source,
    halo,
    kernel_plan,
    weight_grad_source,
)

__all__ = ["PARITY_ENV", "conv_contract_parity", "parity_runs", "parity_supported", "packed_layer"]

# "auto": the layers Triton's factorised kernels would run in filter groups (2-tensor layers,
# where they lose to `dense`); "on": every layer the form covers; "off": never
PARITY_ENV = "GINJAX_TRITON_PARITY"
PARITY_CHOICES = ("auto", "on", "off")

# programs a weight-gradient launch aims at: a few per SM slot of a 132-SM GPU
_TARGET_PROGRAMS = 1024
_PRECISION = {"fp32": "tf32x3", "tf32": "tf32", "bf16": "tf32"}  # bf16 calls run at tf32 (no slower)
# the dots' input_precision in place of the mode's, for spikes ("ieee": FMA dots)
PRECISION_ENV = "GINJAX_PARITY_PRECISION"
PRECISIONS = ("tf32", "tf32x3", "ieee")


def parity_supported(spec: ConvSpec, spatial: tuple[int, ...]):
    """None where `conv_contract_parity` runs this layer on these sizes, else why not."""
    return unsupported(spec, spatial)


def parity_runs(spec: ConvSpec, spatial: tuple[int, ...], grouped: bool) -> bool:
    """Whether the `triton` backend runs this layer (without its bias) as the parity-blocked
    convolution: $GINJAX_TRITON_PARITY, and `grouped`, whether its factorised kernels would take
    several filter-group launches."""
    choice = env_choice(PARITY_ENV, PARITY_CHOICES, "auto")
    if choice == "off" or (choice == "auto" and not grouped):
        return False
    return unsupported(spec, tuple(spatial)) is None


def conv_contract_parity(spec: ConvSpec, inputs: Sequence[jax.Array], weights: Sequence[jax.Array], mode: str,
                         offsets: Optional[Sequence[Optional[jax.Array]]] = None,
                         priors: Optional[Sequence[Optional[jax.Array]]] = None, bias_spec: Optional[ConvSpec] = None,
                         bias: Optional[Sequence[Optional[jax.Array]]] = None,
                         given_means: Optional[Sequence[Optional[jax.Array]]] = None) -> tuple[jax.Array, ...]:
    """ConvContract of unbatched blocks (c, *spatial, *(D,)*k) as the parity-blocked
    convolution; float32 outputs (o, *spatial, *(D,)*k). Differentiable (custom_vjp); `spec`'s
    own bias modes are ignored (give `bias_spec` and `bias` for the layer's bias).

    offsets: per output key None or an (o, *(D,)*k) array added at every pixel; its gradient is
        the cotangent's spatial sum.
    priors: per output key None or an array of that output's shape added to it (a residual);
        its gradient is the cotangent.
    bias_spec, bias, given_means: the layer's bias (checked by `kernels._bias.check_bias`; not with
        `offsets`), its modes in `bias_spec`, and per input None or its spatial mean as its producer
        computed it: the offsets are computed inside (`kernels._bias.offsets_from_means`, "mean"
        blocks from the inputs' means where that is exact), so the means' gradient, a constant
        over the pixels, goes into the input gradient's epilogue instead of a pass over it.
    """
    D = spec.D
    spatial = tuple(int(n) for n in inputs[0].shape[1:1 + D])
    why = unsupported(spec, spatial)
    if why is not None:
        raise ValueError(f"the parity-blocked form cannot run this layer: {why}")
    n_out = len(spec.out_keys)
    offsets = tuple(offsets) if offsets is not None else (None,) * n_out
    priors = tuple(priors) if priors is not None else (None,) * n_out
    for name, given in (("offsets", offsets), ("priors", priors)):
        if len(given) != n_out:
            raise ValueError(f"`{name}` has {len(given)} entries; the layer has {n_out} output keys")
    for b, (k, _, o) in enumerate(spec.out_keys):
        if offsets[b] is not None and tuple(offsets[b].shape) != (o,) + (D,) * k:
            raise ValueError(f"`offsets[{b}]` has shape {tuple(offsets[b].shape)}; output key {b} needs "
                             f"{(o,) + (D,) * k}")
        if priors[b] is not None and tuple(priors[b].shape) != (o,) + spatial + (D,) * k:
            raise ValueError(f"`priors[{b}]` has shape {tuple(priors[b].shape)}; output key {b} is "
                             f"{(o,) + spatial + (D,) * k}")
    given_means = tuple(given_means) if given_means is not None else (None,) * len(inputs)
    if bias is not None:
        if bias_spec is None:
            raise ValueError("`bias` needs `bias_spec`, the layer with its bias modes")
        if any(off is not None for off in offsets):
            raise ValueError("`offsets` and `bias` are exclusive: give the layer's bias, or offsets of your own")
        bias = tuple(bias)
        # which outputs the bias reaches (shapes only: nothing is computed)
        means = lambda: input_means(bias_spec, _float32(inputs), given_means)  # noqa: E731
        reached = jax.eval_shape(lambda: float32_offsets_from_means(bias_spec, means(), weights, bias))
        has_off = _present(reached)
    else:
        bias_spec, has_off = None, _present(offsets)
    layer = packed_layer(spec)
    precision = env_choice(PRECISION_ENV, PRECISIONS, _PRECISION[mode])
    epilogue = env_choice(BLOCK_EPILOGUE_ENV, ("on", "off"), "on") == "on"
    return _parity_conv(spec, layer, spatial, (precision, epilogue), has_off, _present(priors), bias_spec,
                        _float32(inputs), tuple(weights), _float32(offsets), _float32(priors), bias,
                        _float32(given_means))


def _float32(arrays) -> tuple:
    return tuple(None if a is None else jnp.asarray(a).astype(jnp.float32) for a in arrays)


def _present(arrays) -> tuple[bool, ...]:
    return tuple(a is not None for a in arrays)


# ---- packing: blocks <-> class-ordered rows ----------------------------------------------------------
def _class_slices(D: int, keys, order: tuple[int, ...]):
    """Per packed class run and block: (block, components of that class, in order). Rows of one
    (class, block) are channel-major, component-minor, as `_parity_plan._classes_of` sorts them."""
    runs, prev = [], None
    for n in order:
        block, comp = _locate(D, keys, n)
        c_cls = component_class(D, keys[block][0], keys[block][1], comp)
        if prev != (c_cls, block):
            runs.append((c_cls, block, []))
            prev = (c_cls, block)
        if comp not in runs[-1][2]:
            runs[-1][2].append(comp)
    return [(c, b, tuple(sorted(comps))) for c, b, comps in runs]


def _locate(D: int, keys, n: int) -> tuple[int, int]:
    """(block, component) of dense channel index n."""
    for b, (k, _, c) in enumerate(keys):
        width = c * D**k
        if n < width:
            return b, n % D**k
        n -= width
    raise IndexError(n)


def _components(a: jax.Array, comps: tuple[int, ...]) -> jax.Array:
    """a[:, comps] for a static component list: a strided slice where they are evenly spaced."""
    if len(comps) == 1 or len({j - i for i, j in zip(comps, comps[1:])}) == 1:
        step = comps[1] - comps[0] if len(comps) > 1 else 1
        return a[:, comps[0]:comps[-1] + 1:step]
    return jnp.take(a, np.array(comps), axis=1)


@dataclasses.dataclass(frozen=True)
class BlockRows:
    """One side of the layer: its keys (k, parity, c), packed row order (dense channel index of
    each packed row) and D; hashable, a static argument of the custom_vjp."""

    D: int
    keys: tuple[tuple[int, int, int], ...]
    order: tuple[int, ...]

    @classmethod
    def of(cls, D: int, keys, order) -> "BlockRows":
        return cls(D, tuple(tuple(int(v) for v in key) for key in keys), tuple(order))

    def shapes(self, spatial: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        return tuple((c,) + tuple(spatial) + (self.D,) * k for k, _, c in self.keys)

    def epilogue(self, offsets: tuple[bool, ...], priors: tuple[bool, ...]) -> BlockEpilogue:
        """The forward's `BlockEpilogue` writing these blocks: a packed row's plane in its block is
        its dense index there (channel-major, component-minor)."""
        starts = np.cumsum([0] + [c * self.D**k for k, _, c in self.keys])
        rows = []
        for n in self.order:
            blk = int(np.searchsorted(starts, n, side="right")) - 1
            rows.append((blk, int(n - starts[blk])))
        return BlockEpilogue(tuple(rows), tuple(int(v) for v in np.diff(starts)), offsets, priors)


def pack_rows(D: int, keys, order: tuple[int, ...], blocks: Sequence[jax.Array]) -> jax.Array:
    """Blocks (c, *spatial, *(D,)*k) -> (rows, *spatial), rows in `order` (class-ordered)."""
    spatial = tuple(blocks[0].shape[1:1 + D])
    planar = [jnp.moveaxis(x.reshape((x.shape[0],) + spatial + (D**k,)), -1, 1)
              for x, (k, _, _) in zip(blocks, keys)]  # (c, T, *spatial)
    parts = [_components(planar[b], comps).reshape((-1,) + spatial) for _, b, comps in _class_slices(D, keys, order)]
    return jnp.concatenate(parts, axis=0)


def unpack_rows(D: int, keys, order: tuple[int, ...], y: jax.Array) -> tuple[jax.Array, ...]:
    """(rows, *spatial) in `order` -> blocks (o, *spatial, *(D,)*k)."""
    spatial = tuple(y.shape[1:])
    per_block: list[dict] = [dict() for _ in keys]
    start = 0
    for _, b, comps in _class_slices(D, keys, order):
        c = keys[b][2]
        seg = y[start:start + c * len(comps)].reshape((c, len(comps)) + spatial)
        for n, comp in enumerate(comps):
            per_block[b][comp] = seg[:, n]
        start += c * len(comps)
    outs = []
    for (k, _, c), comps in zip(keys, per_block):
        stacked = jnp.stack([comps[t] for t in range(D**k)], axis=-1)  # (c, *spatial, T)
        outs.append(stacked.reshape((c,) + spatial + (D,) * k))
    return tuple(outs)


# ---- the filter: taps -> combinations -> per-dot tiles -----------------------------------------------
def combo_filter(spec: ConvSpec, layer: PackedLayer, weights: Sequence[jax.Array]) -> jax.Array:
    """(M^D combinations, cin, cout) in packed row orders, from the layer's weights (differentiable)."""
    D, M = spec.D, spec.filter_shape[0]
    w = assemble_dense_filter(spec, [jnp.asarray(a, jnp.float32) for a in weights], jnp.float32)
    w = w[..., np.array(layer.in_order), :][..., np.array(layer.out_order)]
    T = jnp.asarray(combo_matrix(M), jnp.float32)
    for a in range(D):
        w = jnp.moveaxis(jnp.tensordot(T, jnp.moveaxis(w, a, 0), axes=(1, 0), precision=jax.lax.Precision.HIGHEST), 0, a)
    return w.reshape((M**D,) + w.shape[D:])


def _combo_flat(combo: tuple[int, ...], M: int) -> int:
    return int(np.ravel_multi_index(combo, (M,) * len(combo)))


@functools.lru_cache(maxsize=64)
def _dot_gather(plan: ParityPlan):
    """Static indices of every dot's (CHUNK, max_out_pad) tile in the (combos, cin, cout) filter."""
    wmax = plan.max_out_pad
    n = len(plan.dots)
    combos = np.zeros(n, np.int32)
    rows = np.zeros((n, CHUNK), np.int32)
    cols = np.zeros((n, wmax), np.int32)
    valid = np.zeros((n, CHUNK, wmax), bool)
    for d, (ch, combo, b) in enumerate(plan.dots):
        _, start, width = plan.chunks[ch]
        _, ostart, owidth = plan.out_classes[b]
        combos[d] = _combo_flat(combo, plan.M)
        rows[d, :width] = start + np.arange(width)
        cols[d, :owidth] = ostart + np.arange(owidth)
        valid[d, :width, :owidth] = True
    return combos, rows, cols, valid


def dot_weights(plan: ParityPlan, wc: jax.Array) -> jax.Array:
    """(dots, CHUNK, max_out_pad): each dot's weight tile, zero-padded."""
    combos, rows, cols, valid = _dot_gather(plan)
    tiles = wc[combos[:, None, None], rows[:, :, None], cols[:, None, :]]
    return jnp.where(valid, tiles, 0.0)


def transposed_combos(plan: ParityPlan, wc: jax.Array) -> jax.Array:
    """The input gradient's filter: the correlation with W[-tap]^T, i.e. W'^T with the sign of
    every difference flipped."""
    M, D = plan.M, plan.D
    sign = np.array([(-1.0) ** bin(combo_q(combo)).count("1") for combo in np.ndindex(*(M,) * D)], np.float32)
    return jnp.swapaxes(wc, 1, 2) * sign[:, None, None]


# ---- launches ------------------------------------------------------------------------------------------
BLOCKS_ENV = "GINJAX_PARITY_BLOCKS"


@dataclasses.dataclass(frozen=True)
class ParityBlocks:
    """A kernel's tiling: pixels of one x row a program owns (a power of two >= 16; rows shorter
    than it are masked), its warps; how many of a chunk's dots into one output class one tl.dot
    takes, their tiles concatenated (a power of two: fewer, larger wgmmas, each with its own trip
    through shared memory and its barriers, against the registers the concatenated operand
    holds); how many dots ahead the forward issues each weight load (`_hoist_weights`); and the
    accumulator columns a forward program keeps (`ParityPlan.out_groups`: narrower, fewer
    registers and more programs an SM, each group reloading the input tiles)."""

    block_x: int = 64
    num_warps: int = 4
    concat: int = 1
    lookahead: int = 2
    out_width: int = MAX_OUT_WIDTH

    def __post_init__(self):
        if self.block_x < MIN_DOT_TILE or self.block_x & (self.block_x - 1):
            raise ValueError(f"`block_x` (={self.block_x}) must be a power of two >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"`num_warps` (={self.num_warps}) must be 1, 2, 4, 8 or 16")
        if self.concat not in (1, 2, 4, 8):
            raise ValueError(f"`concat` (={self.concat}) must be 1, 2, 4 or 8")
        if not 0 <= self.lookahead <= 8:
            raise ValueError(f"`lookahead` (={self.lookahead}) must be 0 to 8")
        if self.out_width not in (16, 32, 64, 128):
            raise ValueError(f"`out_width` (={self.out_width}) must be 16, 32, 64 or 128")

    @classmethod
    def from_env(cls, env: str, default: "ParityBlocks | None" = None) -> "ParityBlocks":
        """$env as "block_x,num_warps[,concat[,lookahead[,out_width]]]" (for sweeps), else
        `default` (else the defaults). The weight gradient's kernels take neither lookahead (their
        loads sit in a loop) nor out_width (a program keeps one output class at a time)."""
        value = os.environ.get(env, "")
        if not value:
            return default or cls()
        try:
            fields = [int(v) for v in value.split(",")]
            if len(fields) not in (2, 3, 4, 5):
                raise ValueError
        except ValueError:
            raise ValueError(f"`{env}` (={value!r}) must be "
                             "'block_x,num_warps[,concat[,lookahead[,out_width]]]', e.g. '64,4'") from None
        return cls(*fields)

    def for_row(self, n: int) -> int:
        """block_x for rows of n pixels: no wider than the row needs."""
        return max(MIN_DOT_TILE, min(self.block_x, next_pow2(n)))


# the weight gradient's tiling: one kernel per input class, a program one chunk of the class and a
# slab of pixel rows, the dots into one output class concatenated 8 at a time (M = 16 x run: wgmma
# from runs of 4); 4 warps (k2 fwd_bwd 11.16 ms against 12.81 at 8, H100 spike at 4150a85); the
# lookahead field is unused (the loads sit in the pixel loop)
WEIGHT_GRAD_BLOCKS_ENV = "GINJAX_PARITY_DW_BLOCKS"
WEIGHT_GRAD_BLOCKS = ParityBlocks(32, 4, 8)


def _named(prefix: str, make) -> tuple[str, str, int]:
    """Generate with a placeholder name, then name the kernel after its source (cache key)."""
    source, programs = make("KERNEL")
    name = f"{prefix}_{hashlib.sha1(source.encode()).hexdigest()[:16]}"
    return name, source.replace("KERNEL", name), programs


@functools.lru_cache(maxsize=128)
def _batched_forward(plan: ParityPlan, spatial: tuple[int, ...], group: tuple[int, ...], precision: str,
                     rows: Optional[BlockRows], offsets: tuple[bool, ...], priors: tuple[bool, ...],
                     blocks: ParityBlocks):
    """The forward of output classes `group`: op((x,), (w,), offsets, priors). rows None: one
    result, the group's packed rows (B, width, *spatial); else (every output class in `group`)
    the blocks of `rows`, component-planar, with the offsets (B|1, planes) of the blocks flagged
    in `offsets` and the priors (B|1, *block) of those flagged in `priors` added in the epilogue."""
    from .conv_contract import batched_op

    width = sum(plan.out_classes[b][2] for b in group)
    out = None if rows is None else rows.epilogue(offsets, priors)

    def body(xs, ws, offs, prs):
        (x,), (w,) = xs, ws
        batch = batch_size([x, w, *offs, *prs])
        flags = batched_flags([x, w, *offs], batch)
        name, source, programs = _named("parity_fwd", lambda nm: forward_source(
            plan, spatial, group, blocks.for_row(spatial[-1]), flags, precision, nm, blocks.concat, blocks.lookahead,
            out))
        kernel = kernel_plan(name, source, programs, blocks.num_warps)
        if out is None:
            shape = jax.ShapeDtypeStruct((batch, width) + spatial, jnp.float32)
            return run_plan(kernel, [shape], programs * batch, [x, w])
        shapes = [jax.ShapeDtypeStruct((batch,) + shape, jnp.float32) for shape in rows.shapes(spatial)]
        orders = [block_order(plan.D, len(s.shape), True) for s in shapes]
        prs = [p if p.shape[0] == batch else jnp.broadcast_to(p, (batch,) + p.shape[1:]) for p in prs]
        carried = [b for b, flag in enumerate(priors) if flag]
        first = 2 + len(offs)
        return run_plan(kernel, shapes, programs * batch, [x, w, *offs, *prs], None,
                        [None] * first + [orders[b] for b in carried], orders,
                        carried=tuple((first + n, b) for n, b in enumerate(carried)))

    return batched_op(body)


def with_halo(plan: ParityPlan, x: jax.Array) -> jax.Array:
    """(rows, *spatial) -> (rows, *in_spatial): `halo` cells a side along x, wrapped on a torus
    axis, zero otherwise (written by the pass that packs the operand)."""
    h = halo(plan)
    widths = [(0, 0)] * (x.ndim - 1) + [(h, h)]
    return jnp.pad(x, widths, mode="wrap" if plan.wraps[-1] else "constant")


def cuda_forward_refusal(plan: ParityPlan, spatial, precision: str) -> Optional[str]:
    """None where kernels/cuda's mma.sync forward runs this plan, else why not: not asked for
    ($GINJAX_PARITY_CUDA), the library not built or not on a Hopper GPU, a plan it does not cover
    (`kernels.cuda.parity_forward.covers`)."""
    from ..cuda import parity_forward as cuda_parity

    if not cuda_parity.requested():
        return f"{cuda_parity.PARITY_CUDA_ENV}=off"
    from .. import cuda

    ok, why = cuda.availability()
    return cuda_parity.covers(plan, spatial, precision) if ok else why


def cuda_forward_runs(plan: ParityPlan, spatial, precision: str) -> bool:
    return cuda_forward_refusal(plan, spatial, precision) is None


def _forward(plan: ParityPlan, spatial, precision: str, x: jax.Array, wk: jax.Array) -> jax.Array:
    """(cin, *in_spatial) (`with_halo`) -> (cout, *spatial): the CUDA forward where it runs, else
    one Triton launch per output group."""
    if cuda_forward_runs(plan, spatial, precision):
        from ..cuda.parity_forward import parity_forward

        return parity_forward(plan, tuple(spatial), x, wk, halo(plan))
    outs = []
    blocks = ParityBlocks.from_env(BLOCKS_ENV)
    for group in plan.out_groups(blocks.out_width):
        (y,) = _batched_forward(plan, tuple(spatial), group, precision, None, (), (), blocks)((x[None],), (wk[None],),
                                                                                             (), ())
        outs.append(y[0])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)


# "on": the forward writes the blocks where one launch holds every output class; "off": packed
# rows, unpacked by XLA (for A/B runs)
BLOCK_EPILOGUE_ENV = "GINJAX_PARITY_BLOCK_EPILOGUE"


def _forward_blocks(plan: ParityPlan, rows: BlockRows, spatial, precision: str, epilogue: bool, x: jax.Array,
                    wk: jax.Array, offsets: tuple, priors: tuple) -> tuple[jax.Array, ...]:
    """(cin, *in_spatial) (`with_halo`) -> the blocks of `rows`, each plus its offset (None or
    (c, *(D,)*k)) and its prior (None or the block's shape): written by Triton's forward itself
    where one launch holds every output class and `epilogue` ($GINJAX_PARITY_BLOCK_EPILOGUE, read
    before the custom_vjp, whose traces JAX caches) allows, else unpacked (and added to) by XLA."""
    blocks = ParityBlocks.from_env(BLOCKS_ENV)
    groups = plan.out_groups(blocks.out_width)
    if epilogue and len(groups) == 1 and not cuda_forward_runs(plan, spatial, precision):
        op = _batched_forward(plan, tuple(spatial), groups[0], precision, rows, _present(offsets), _present(priors),
                              blocks)
        outs = op((x[None],), (wk[None],), tuple(o.reshape(1, -1) for o in offsets if o is not None),
                  tuple(p[None] for p in priors if p is not None))
        return tuple(y[0] for y in outs)
    outs = unpack_rows(rows.D, rows.keys, rows.order, _forward(plan, spatial, precision, x, wk))
    return add_residual([y if o is None else add_spatial_offset(y, o, rows.D) for y, o in zip(outs, offsets)], priors)


@functools.lru_cache(maxsize=128)
def _batched_weight_grad(plan: ParityPlan, spatial: tuple[int, ...], c: int, precision: str,
                         blocks: ParityBlocks):
    """Input class index c's weight-gradient kernel: (B, its dots, CHUNK, max_out_pad)."""
    from .conv_contract import batched_op

    _, n_ch, ch_dots = class_chunks(plan, c)
    n_dots = n_ch * len(ch_dots)

    def body(xs, gs):
        (x,), (g,) = xs, gs
        batch = batch_size([x, g])
        flags = batched_flags([x, g], batch)
        slabs = max(1, min(math.prod(spatial[:-1]), -(-_TARGET_PROGRAMS // (batch * n_ch))))
        name, source, programs = _named("parity_dw", lambda nm: weight_grad_source(
            plan, spatial, c, blocks.for_row(spatial[-1]), slabs, blocks.concat, flags, precision, nm, g_halo=True))
        shape = jax.ShapeDtypeStruct((batch, slabs, n_dots, CHUNK, plan.max_out_pad), jnp.float32)
        (part,) = run_plan(kernel_plan(name, source, programs, blocks.num_warps), [shape], programs * batch, [x, g])
        return (jnp.sum(part, axis=1),)

    return batched_op(body)


def _weight_grad(plan: ParityPlan, spatial, precision: str, x: jax.Array, dy: jax.Array) -> jax.Array:
    """(dots, CHUNK, max_out_pad): the gradient of every dot's weight tile, one launch per input
    class (the dots are in class order), from x and dy (cout, *in_spatial) both with their x halo
    (`with_halo`: dy as the input gradient's forward reads it, one packed copy for both)."""
    blocks = ParityBlocks.from_env(WEIGHT_GRAD_BLOCKS_ENV, WEIGHT_GRAD_BLOCKS)
    parts = []
    for c in range(len(plan.in_classes)):
        if class_chunks(plan, c)[2]:
            (part,) = _batched_weight_grad(plan, spatial, c, precision, blocks)((x[None],), (dy[None],))
            parts.append(part[0])
    return jnp.concatenate(parts, axis=0)


# ---- differentiation ------------------------------------------------------------------------------------
# Static: the layer, its packing, the spatial shape; how: (the dots' precision, whether the forward
# may write the blocks: `_forward_blocks`); has_off / has_pr: which output keys get an offset (given,
# or the bias's) / a prior; bias_spec: the layer with its bias modes where `bias` is given, else
# None. Residuals: the packed input with its halo, the combination filter, and the VJPs of the maps
# from the layer's weights to it and from the inputs' means, weights and bias to the offsets.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5, 6))
def _parity_conv(spec: ConvSpec, layer: PackedLayer, spatial, how, has_off, has_pr, bias_spec, inputs, weights,
                 offsets, priors, bias, given):
    return _parity_conv_fwd(spec, layer, spatial, how, has_off, has_pr, bias_spec, inputs, weights, offsets, priors,
                            bias, given)[0]


def _sides(spec: ConvSpec, layer: PackedLayer) -> tuple[BlockRows, BlockRows]:
    return BlockRows.of(spec.D, spec.in_keys, layer.in_order), BlockRows.of(spec.D, spec.out_keys, layer.out_order)


def _parity_conv_fwd(spec, layer, spatial, how, has_off, has_pr, bias_spec, inputs, weights, offsets, priors, bias,
                     given):
    plan = layer.plan
    ins, outs = _sides(spec, layer)
    wc, filter_vjp = jax.vjp(functools.partial(combo_filter, spec, layer), weights)
    bias_vjp = None
    if bias_spec is not None:  # the offsets from the means: tiny arrays, their VJP kept for the backward
        means = input_means(bias_spec, inputs, given)
        offsets, bias_vjp = jax.vjp(functools.partial(float32_offsets_from_means, bias_spec), means, weights, bias)
    x = with_halo(plan, pack_rows(ins.D, ins.keys, ins.order, inputs))
    ys = _forward_blocks(plan, outs, spatial, *how, x, dot_weights(plan, wc), offsets, priors)
    return ys, (x, wc, filter_vjp, bias_vjp)


def _parity_conv_bwd(spec, layer, spatial, how, has_off, has_pr, bias_spec, residuals, dys):
    x, wc, filter_vjp, bias_vjp = residuals
    plan = layer.plan
    ins, outs = _sides(spec, layer)
    dys = tuple(d.astype(jnp.float32) for d in dys)
    # an offset's gradient: the cotangent summed over the pixels, as two reductions (`middle_sum`: one
    # over the pixels with the components minor is a slow column reduction)
    doffsets = tuple(middle_sum(d, 1, 1 + spec.D) if h else None for d, h in zip(dys, has_off))
    in_offsets, dbias, dw_bias = (None,) * len(ins.keys), None, None
    if bias_vjp is not None:  # the offsets were the bias's: through their map to the means, weights, bias
        dmeans, dw_bias, dbias = bias_vjp(doffsets)
        doffsets = (None,) * len(outs.keys)
        if dmeans is not None:  # d mean / d x = 1 / pixels at every pixel: the input gradient's epilogue adds it
            pixels = math.prod(spatial)
            in_offsets = tuple(None if m is None else (m / pixels).astype(jnp.float32) for m in dmeans)
    plan_t = plan.transposed()
    dy = with_halo(plan_t, pack_rows(outs.D, outs.keys, outs.order, dys))
    dxs = _forward_blocks(plan_t, ins, spatial, *how, dy, dot_weights(plan_t, transposed_combos(plan, wc)),
                          in_offsets, (None,) * len(ins.keys))
    dwk = _weight_grad(plan, spatial, how[0], x, dy)
    _, gather_vjp = jax.vjp(functools.partial(dot_weights, plan), wc)
    (dwc,) = gather_vjp(dwk)
    (dweights,) = filter_vjp(dwc.astype(wc.dtype))
    if dw_bias is not None:
        dweights = tuple(d + e for d, e in zip(dweights, dw_bias))
    dpriors = tuple(d if h else None for d, h in zip(dys, has_pr))
    # the given means are constants here: their gradient went to the inputs (the epilogue above)
    return dxs, dweights, doffsets, dpriors, dbias, (None,) * len(spec.in_keys)


_parity_conv.defvjp(_parity_conv_fwd, _parity_conv_bwd)
