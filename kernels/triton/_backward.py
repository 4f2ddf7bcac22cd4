"""The fused backward of the `triton` backend: the weight gradient's kernels.

Input gradient: the forward kernel on the transposed layer (kernels._fused.transpose), sparse
stencil on the cotangents, then the channel GEMM with the transposed weights.

Weight gradient. dw[o, c, f] = sum_{x, j} G_b[o, x, j] Z[c, f, j, x] with the forward's Z,
recomputed from X by the same generated stencil; `plan_weight_grad_kernel` writes per-program
partial sums and `plan_partial_sums` adds them in a fixed order: bit-identical run after run.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .._fused import INT32_MAX, pair_basis
from .._spec import ConvSpec
from ._kernel import plan_partial_sums, plan_weight_grad_kernel
from ._tiling import BlockSizes, default_groups, interpreting
from ._launch import block_order, launch_geometry, run_plan

def weight_grad_units(spec: ConvSpec, max_units: int) -> list[tuple[tuple[int, int], ...]]:
    """Split the layer's (pair, filter) units into kernels of at most `max_units` accumulators so
    that the kernels load few input tiles between them.

    Each kernel loads every (input key, tap, component) tile that one of its units' basis
    filters touches. Invariant filters live on symmetry orbits of the taps, so units on the same
    orbit share their tiles: greedily, a kernel starts from the unit with the most tiles left and
    takes the units that add the fewest new ones. On the standard 3D {scalar, vector} layer, 4
    units per kernel load each of the 108 tiles once (in (output key, pair, filter) order the
    five kernels loaded 242).
    """
    touched = {}
    for t, pair in enumerate(spec.pairs):
        basis = pair_basis(spec, t)
        for f in range(pair.basis.n_filters):
            taps, comps = np.nonzero(np.any(basis[f] != 0, axis=-1))
            touched[(t, f)] = {(pair.in_index, int(y), int(i)) for y, i in zip(taps, comps)}
    left = sorted(touched)
    kernels = []
    while left:
        first = max(left, key=lambda u: (len(touched[u]), -u[0], -u[1]))
        group, tiles = [first], set(touched[first])
        left.remove(first)
        while len(group) < max_units and left:
            unit = min(left, key=lambda u: (len(touched[u] - tiles), -len(touched[u] & tiles), u))
            group.append(unit)
            tiles |= touched[unit]
            left.remove(unit)
        kernels.append(tuple(sorted(group)))
    return kernels


def weight_grad_launch(
    spec: ConvSpec,
    mode: str,
    blocks: BlockSizes,
    xs: Sequence[jax.Array],
    gs: Sequence[jax.Array],
    groups: Optional[int] = None,
    sums: tuple[int, ...] = (),
) -> tuple[jax.Array, ...]:
    """Per pair, the weight gradient (B, o, c, F) in float32 of batched inputs and cotangents;
    then, per output key b in `sums`, the cotangent summed over the pixels, (B, o, *(D,)*k): the
    gradient of the layer's bias offsets, added up by the kernels from the tiles they load.

    Args:
        xs: per input key, (1 or B, c, *spatial, *(D,)*k).
        gs: per output key, (1 or B, o, *out_spatial, *(D,)*k): the outputs' cotangents.
        groups: pixel-tile shares per program column (None: `default_groups`).
        sums: output keys whose pixel sums are wanted.
    """
    batch, geometry = launch_geometry(spec, xs, gs=gs)
    spatial = geometry.spatial
    host = interpreting()
    # the interpreter keeps the forward's large tiles: it runs programs one by one
    blocks = blocks if host else blocks.for_weight_grad(spec.D)
    groups = default_groups(spec, blocks, spatial, batch) if groups is None else int(groups)
    orders = [block_order(spec.D, a.ndim, blocks.planar_in) for a in list(xs) + list(gs)]
    per_unit, per_sum = {}, {}
    pending = list(sums)
    for units in weight_grad_units(spec, blocks.dw_units):
        # each wanted sum in the first kernel that reads that output key's cotangent
        here = tuple(b for b in pending if any(spec.pairs[t].out_index == b for t, _ in units))
        pending = [b for b in pending if b not in here]
        plan = plan_weight_grad_kernel(
            spec, geometry, mode, blocks, groups, units, bf16_dot_in_fp32=host, layout_barrier=not host, sums=here
        )
        sizes = [spec.out_keys[spec.pairs[t].out_index][2] * spec.in_keys[spec.pairs[t].in_index][2] for t, _ in units]
        sum_sizes = [spec.out_keys[b][2] * spec.D ** spec.out_keys[b][0] for b in here]
        width = sum(sizes) + sum(sum_sizes)
        grid = plan.programs_per_batch * batch
        if grid > INT32_MAX or batch * groups * width > INT32_MAX:
            raise ValueError(f"batch (={batch}) is too large for one weight-gradient launch")
        (partials,) = run_plan(plan, [jax.ShapeDtypeStruct((batch, groups, width), jnp.float32)], grid,
                               list(xs) + list(gs), in_orders=orders)
        adder = plan_partial_sums(batch, groups, width)
        (total,) = run_plan(adder, [jax.ShapeDtypeStruct((batch, width), jnp.float32)], adder.programs_per_batch * batch, [partials])
        start = 0
        for (t, f), size in zip(units, sizes):
            per_unit[(t, f)] = total[:, start : start + size]
            start += size
        for b, size in zip(here, sum_sizes):
            # stored component-major ((j, o) per kernel row): back to (o, *tensor)
            k, o = spec.out_keys[b][0], spec.out_keys[b][2]
            per_sum[b] = jnp.moveaxis(total[:, start : start + size].reshape(batch, spec.D**k, o), 1, 2)
            per_sum[b] = per_sum[b].reshape((batch, o) + (spec.D,) * k)
            start += size
    for b in pending:  # an output key no pair reads: its cotangent was never loaded
        per_sum[b] = jnp.sum(jnp.broadcast_to(gs[b], (batch,) + gs[b].shape[1:]).astype(jnp.float32),
                             axis=tuple(range(2, 2 + spec.D)))
    out = []
    for t, p in enumerate(spec.pairs):
        o, c = spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2]
        out.append(jnp.stack([per_unit[(t, f)].reshape(batch, o, c) for f in range(p.basis.n_filters)], axis=-1))
    return tuple(out) + tuple(per_sum[b] for b in sums)
