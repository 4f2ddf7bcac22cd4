"""Forward ConvContract on Pallas' Mosaic GPU lowering (Hopper): the spike of issue 16.

Not a registered backend. `mosaic_forward(spec, inputs, weights)` takes batched native blocks
(B, c, z, y, x) and (B, c, z, y, x, 3) and returns the output blocks of the layer without bias.

Per program (one warpgroup): one output row (batch b, z, y, all 64 x) and, per chunk of 8 input
channels,
1. TMA: the 3 x 3 neighbouring rows (z +- 1, y +- 1, wrapped by the copy coordinates) of both
   input blocks into shared memory, one box copy per row and block;
2. the sparse basis stencil: per Z tile, its nonzeros read shifted (64 pixels x 8 channels) tiles
   out of shared memory (vector components as stride-3 views) and FMA them with literal
   coefficients, in registers;
3. each Z tile is stored into its group's wgmma A operand (64 x K, tf32, 32-byte swizzle);
4. one wgmma per group (M = 64 pixels, K = tiles x 8, N = output channels), fp32 accumulators
   across the chunks.
The accumulators go out through shared memory and a TMA store per row and block.

The x axis wraps by a wrap-padded copy made by XLA before the call (`pad_rows`): a TMA box cannot
wrap, and the in-kernel repair of the halo columns needs strided copies of 9 x 8 rows x 4 floats,
which Mosaic's strided layout rejects (element counts must be multiples of 128); see
bench/NOTES.md, "Mosaic GPU spike".
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._mosaic_plan import (
    CHUNK,
    PAD,
    PAD_RIGHT,
    ROW_PIXELS,
    ROW,
    SWIZZLE,
    MosaicPlan,
    halo_row,
    make_plan,
    pack_weights,
    pixel_start,
    shared_reads,
    weight_sets,
)

try:  # the module imports on any jax; the kernel needs Mosaic GPU (jax >= 0.10)
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jax without Mosaic GPU
    plgpu = None

F32 = jnp.float32
# jax 0.10 takes the index as a positional argument; 0.11 deprecates it in favour of ref.at[...]
_LOAD_TAKES_IDX = plgpu is not None and inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _layouts():
    # vector length 1: tiles read from strided / transposed shared-memory views and written into
    # the swizzled A operand element by element (the vector layouts need stride-1 pairs)
    return plgpu.Layout._WGMMA_ACC_32BIT


def _load(ref, layout):
    # element-wise (unoptimised) transfers: the views are strided and shifted by single floats
    if _LOAD_TAKES_IDX:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _fma(acc, v, coef: float):
    term = v if coef == 1.0 else (-v if coef == -1.0 else v * coef)
    return term if acc is None else acc + term


def pad_rows(x, k: int):
    """Wrap-pad the x axis by PAD pixels before and PAD_RIGHT after, flattening (x, 3) for vectors:
    (B, c, z, y, x[, 3]) -> (B, c, z, y, ROW_PIXELS * 3**k)."""
    x = jnp.concatenate([x[:, :, :, :, -PAD:], x, x[:, :, :, :, :PAD_RIGHT]], axis=4)
    return x.reshape(x.shape[:4] + (-1,))


def _tiled():
    return dict(transforms=(plgpu.TilingTransform((8, SWIZZLE // 4)), plgpu.SwizzleTransform(SWIZZLE)))


def _kernel(x0, x1, *refs, plan: MosaicPlan, sets, share_loads: bool):
    n_sets, n_groups = len(sets), len(plan.groups)
    w_gmem = refs[:n_sets]
    y0, y1 = refs[n_sets : n_sets + 2]
    xs0, xs1, *rest = refs[n_sets + 2 :]
    a_s = rest[:n_groups]
    w_s = rest[n_groups : n_groups + n_sets]
    o0, o1, bar_w, *bar_x = rest[n_groups + n_sets :]
    nz, ny, _ = plan.spatial
    b, z, y = lax.axis_index("b"), lax.axis_index("z"), lax.axis_index("y")
    layout = _layouts()
    xs = (xs0, xs1)
    set_of = [sets.index(g.tiles) for g in plan.groups]

    for s in range(n_sets):
        plgpu.copy_gmem_to_smem(w_gmem[s], w_s[s], bar_w.at[s])
    for s in range(n_sets):
        plgpu.barrier_wait(bar_w.at[s])

    def tile(offset, a, i):
        """(64 pixels, CHUNK channels) of source block a, component i, at offset (dz, dy, dx)."""
        dz, dy, dx = offset
        row = xs[a].at[dz + 1, dy + 1]  # (CHUNK, padded x row)
        if a == 0:
            view = row.at[:, pl.ds(pixel_start(dx), ROW)]
        else:  # component i of the (pixel, 3) row: a stride-3 view
            view = row.reshape(CHUNK, ROW_PIXELS, 3).at[:, pl.ds(pixel_start(dx), ROW), i]
        return _load(plgpu.transpose_ref(view, (1, 0)), layout)

    def body(accs):
        for h in range(plan.n_chunks):
            chans = pl.ds(h * CHUNK, CHUNK)
            n = 0
            for dz in range(3):
                for dy in range(3):
                    zz, yy = halo_row(z, dz - 1, nz, lax.rem), halo_row(y, dy - 1, ny, lax.rem)
                    for src, xg in ((x0, xs0), (x1, xs1)):
                        plgpu.copy_gmem_to_smem(src.at[b, chans, zz, yy], xg.at[dz, dy], bar_x[h].at[n])
                        n += 1
            for m in range(n):
                plgpu.barrier_wait(bar_x[h].at[m])
            if share_loads:
                # every Z tile of the chunk live at once (40 x 4 registers per thread for the
                # standard layer), each shifted tile read once
                z_tiles: dict = {}
                for (offset, a, i), uses in shared_reads(plan):
                    v = tile(offset, a, i)
                    for gi, ti, coef in uses:
                        z_tiles[gi, ti] = _fma(z_tiles.get((gi, ti)), v, coef)
                for gi, g in enumerate(plan.groups):
                    for ti in range(len(g.tiles)):
                        a_s[gi][:, pl.ds(ti * CHUNK, CHUNK)] = z_tiles[gi, ti]
                plgpu.commit_smem()
                for gi in range(n_groups):
                    plgpu.wgmma(accs[gi], a_s[gi], plgpu.transpose_ref(w_s[set_of[gi]].at[h], (1, 0)))
            else:
                # group by group: a group's wgmma runs while the next group's stencil computes
                for gi, g in enumerate(plan.groups):
                    for ti, entries in enumerate(g.entries):
                        zt = None
                        for offset, a, i, coef in entries:
                            zt = _fma(zt, tile(offset, a, i), coef)
                        a_s[gi][:, pl.ds(ti * CHUNK, CHUNK)] = zt
                    plgpu.commit_smem()
                    plgpu.wgmma(accs[gi], a_s[gi], plgpu.transpose_ref(w_s[set_of[gi]].at[h], (1, 0)))
            plgpu.wgmma_wait(0)

    def scoped(*accs):
        body(accs)
        for gi, g in enumerate(plan.groups):
            out = plgpu.layout_cast(accs[gi][...], layout)  # (64 pixels, o)
            if g.dst == 0:
                # an indexed view: jax 0.11's transpose_ref asserts on a bare scoped ref's
                # memory_space, which a traced ref no longer exposes as an attribute
                dst = o0.at[:, :]
            else:
                dst = o1.reshape(plan.out_channels, ROW, 3).at[:, :, g.j]
            plgpu.transpose_ref(dst, (1, 0))[...] = out
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o0, y0.at[b, :, z, y])
        plgpu.copy_smem_to_gmem(o1, y1.at[b, :, z, y])
        plgpu.wait_smem_to_gmem(0)

    acc_types = [plgpu.ACC((ROW, plan.out_channels), F32) for _ in plan.groups]
    pl.run_scoped(scoped, *acc_types)


@functools.lru_cache(maxsize=32)
def _build(plan: MosaicPlan, batch: int, auto_barriers: bool, share_loads: bool):
    sets = weight_sets(plan)
    nz, ny, nx = plan.spatial
    o = plan.out_channels
    scratch = [
        plgpu.SMEM((3, 3, CHUNK, plan.row_floats(0)), F32),
        plgpu.SMEM((3, 3, CHUNK, plan.row_floats(1)), F32),
        *[plgpu.SMEM((ROW, g.k), F32, **_tiled()) for g in plan.groups],
        *[plgpu.SMEM((plan.n_chunks, o, len(t) * CHUNK), F32, **_tiled()) for t in sets],
        plgpu.SMEM((o, ROW), F32),
        plgpu.SMEM((o, 3 * ROW), F32),
        plgpu.Barrier(num_arrivals=1, num_barriers=len(sets)),
        *[plgpu.Barrier(num_arrivals=1, num_barriers=18) for _ in range(plan.n_chunks)],
    ]
    out_type = (
        jax.ShapeDtypeStruct((batch, o, nz, ny, nx), F32),
        jax.ShapeDtypeStruct((batch, o, nz, ny, 3 * nx), F32),
    )
    return plgpu.kernel(
        functools.partial(_kernel, plan=plan, sets=sets, share_loads=share_loads),
        out_type=out_type,
        scratch_types=scratch,
        grid=(batch, nz, ny),
        grid_names=("b", "z", "y"),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Lane, unsafe_no_auto_barriers=not auto_barriers
        ),
    )


def mosaic_forward(spec, inputs, weights, *, auto_barriers: bool = True, share_loads: bool = False):
    """Batched forward: inputs [(B, c, z, y, x), (B, c, z, y, x, 3)], weights per pair
    (o, c, F) -> [(B, o, z, y, x), (B, o, z, y, x, 3)]. TF32 operands, fp32 accumulation.

    auto_barriers=False drops the barrier Pallas puts before every shared-memory store; the
    kernel's own commit_smem barriers order the TMA, the Z stores and the wgmma (see _kernel).
    share_loads=True reads each shifted source tile once per chunk for every Z tile (all live in
    registers) instead of once per basis nonzero."""
    if plgpu is None:  # pragma: no cover
        raise RuntimeError("jax.experimental.pallas.mosaic_gpu is not available in this jax")
    x0, x1 = inputs
    spatial = tuple(x0.shape[2:5])
    plan = make_plan(spec, spatial)
    ws = pack_weights(plan, [w.astype(F32) for w in weights], xp=jnp)
    call = _build(plan, x0.shape[0], auto_barriers, share_loads)
    y0, y1 = call(pad_rows(x0.astype(F32), 0), pad_rows(x1.astype(F32), 1), *ws)
    return [y0, y1.reshape(y1.shape[:4] + (spatial[2], 3))]
