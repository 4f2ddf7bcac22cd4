"""The parity-blocked convolution's forward on mma.sync (kernels/cuda/parity_conv.cu, whose header
says why and how): the plan's tables and the FFI call. kernels/triton/parity_conv.py calls it in
place of its Triton forward (and input gradient) where `covers` allows and GINJAX_PARITY_CUDA asks.

    y = parity_forward(plan, spatial, x, wk, h)     # x (cin, nz, ny, nx + 2h), wk (dots, 16, P)

The weights reach the kernel in its shared-memory layout, rounded to tf32 (`stage_weights`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._env import env_choice
from ._ffi import PARITY_FORWARD

# "on": the CUDA forward wherever it covers the call; "off": the Triton forward
PARITY_CUDA_ENV = "GINJAX_PARITY_CUDA"
PARITY_CUDA_CHOICES = ("off", "on")

TILE = 64  # pixels of a CTA along x
CHUNK = 16  # packed rows a chunk (the plan's CHUNK)
SLOTS = 8  # output classes a CTA accumulates (2^3)
CAP = 4  # n-tiles of 8 columns an output class may take (the kernel compiled with CAP = 4)
COMBOS = 27
# per chunk in the table: row start, rows, first dot, dots, input class, and its weight tiles' first
# float and floats in the staged weights (`stage_weights`: the chunk's stage as one run)
CHUNK_FIELDS = 7
OUT_FIELDS = 3  # per output slot (class bits): row start, rows, n-tiles
NTILE_FLOATS = 8 * 8 * 2  # a weight tile's n-tile in the kernel's stage: 8 row pairs x 8 columns x 2
MAX_SMEM_BYTES = 227 * 1024  # a CTA's dynamic shared memory on sm_90
MAX_HALO = 16  # x cells a side a staged row carries (parity_conv.cu's kMaxXw = TILE + 2 MAX_HALO)


def requested() -> bool:
    """Whether $GINJAX_PARITY_CUDA asks for the CUDA forward ("off", the default, until a GPU has
    measured it)."""
    return env_choice(PARITY_CUDA_ENV, PARITY_CUDA_CHOICES, "off") == "on"


def covers(plan, spatial, precision: str) -> Optional[str]:
    """Why the CUDA forward cannot run this plan (None: it can). The library's availability
    (a Hopper GPU, the library built) is checked by the caller."""
    if plan.D != 3 or plan.M != 3:
        return f"D={plan.D}, M={plan.M}: the kernel is compiled for D=3 with 3x3x3 filters"
    if precision != "tf32":
        return f"precision {precision!r}: the kernel computes TF32 only"
    if len(plan.out_classes) > SLOTS:
        return f"{len(plan.out_classes)} output classes (at most {SLOTS})"
    widest = max(w for _, _, w in plan.out_classes)
    if widest > 8 * CAP:
        return f"an output class of {widest} rows (at most {8 * CAP})"
    if max(w for _, _, w in plan.chunks) > CHUNK:
        return "a chunk of more than 16 rows"
    if plan.r * plan.dilation[-1] > MAX_HALO:
        return f"an x halo of {plan.r * plan.dilation[-1]} (at most {MAX_HALO}: rhs_dilation along x up to 16)"
    smem = smem_bytes(plan)
    if smem > MAX_SMEM_BYTES:
        return f"{smem} bytes of shared memory a CTA (at most {MAX_SMEM_BYTES})"
    return None


def smem_bytes(plan) -> int:
    """A CTA's shared memory: the input stage (16 rows x 9 neighbour rows x XP) and the largest
    chunk's weight tiles."""
    return 4 * (CHUNK * 9 * _xp(plan.r * plan.dilation[-1]) + _table(plan)[1])


def _ntiles(width: int) -> int:
    """n-tiles of 8 columns an output class of `width` rows takes (the kernel's and the stage's)."""
    return -(-width // 8)


@functools.lru_cache(maxsize=64)
def _table(plan) -> tuple[np.ndarray, int]:
    """The kernel's int32 table (parity_conv.cu's `Tab`) and the largest chunk's weight-stage floats.
    Output slots are the classes' bits: the kernel, compiled per input class, knows a dot's slot as
    the chunk's class ^ combo_q(combo) (checked here against the plan)."""
    from ..triton._parity_plan import combo_q

    n_ch, n_dots = len(plan.chunks), len(plan.dots)
    chunk_rows = np.zeros((n_ch, CHUNK_FIELDS), np.int32)
    dot_of = np.full((n_ch, COMBOS), -1, np.int32)
    dots = np.zeros((n_dots, 2), np.int32)
    outs = np.zeros((SLOTS, OUT_FIELDS), np.int32)
    for cls, start, width in plan.out_classes:
        outs[cls] = (start, width, _ntiles(width))
    stage, first, count = {}, {}, {}  # per chunk: weight-stage floats, first dot, dots
    for d, (ch, combo, b) in enumerate(plan.dots):
        first.setdefault(ch, d)
        if d > 0 and plan.dots[d - 1][0] > ch:
            raise ValueError("the plan's dots are not ordered by chunk")
        slot = plan.out_classes[b][0]
        if slot != plan.chunks[ch][0] ^ combo_q(combo):
            raise ValueError(f"dot {d}: output class {slot} is not the chunk's class ^ its difference axes")
        off = stage.get(ch, 0)
        dots[d] = (slot, off)
        stage[ch] = off + NTILE_FLOATS * int(outs[slot, 2])
        count[ch] = count.get(ch, 0) + 1
        dot_of[ch, int(np.ravel_multi_index(combo, (3, 3, 3)))] = d
    w_at = 0  # the chunk's first float in the staged weights: the chunks' stages one after another
    for ch, (cls, start, rows) in enumerate(plan.chunks):
        chunk_rows[ch] = (start, rows, first.get(ch, 0), count.get(ch, 0), cls, w_at, stage.get(ch, 0))
        w_at += stage.get(ch, 0)
    tab = np.concatenate([chunk_rows.ravel(), dot_of.ravel(), dots.ravel(), outs.ravel()])
    return tab, max(stage.values(), default=0)


def table(plan) -> np.ndarray:
    """The kernel's int32 operand `tab` (parity_conv.cu's `Tab`)."""
    return _table(plan)[0]


def staged_floats(plan) -> int:
    """Floats of `stage_weights`' result: every dot's tile."""
    return int(sum(_table(plan)[0][CHUNK_FIELDS * c + 6] for c in range(len(plan.chunks))))


def geometry(plan, spatial: tuple[int, ...], h: int) -> list[int]:
    """The kernel's `geom` attribute (parity_conv.cu's header lists the entries)."""
    tab, w_stage = _table(plan)
    nz, ny, nx = spatial
    dz, dy, dx = plan.dilation
    return [nz, ny, nx, h, dz, dy, dx, int(plan.wraps[0]), int(plan.wraps[1]), plan.cin, plan.cout,
            len(plan.chunks), len(plan.dots), len(plan.out_classes), staged_floats(plan), _xp(h), w_stage,
            tab.size]


def tf32_round(a: jax.Array) -> jax.Array:
    """float32 to the nearest tf32 (10 mantissa bits), ties away from zero, inf and NaN kept: what
    cvt.rna.tf32.f32 gives, as float32."""
    u = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
    finite = (u & np.uint32(0x7F800000)) != np.uint32(0x7F800000)
    r = jnp.where(finite, (u + np.uint32(0x1000)) & np.uint32(0xFFFFE000), u)
    return jax.lax.bitcast_convert_type(r.astype(jnp.uint32), jnp.float32)


def stage_weights(plan, wk: jax.Array, tf32: bool = True) -> jax.Array:
    """wk (..., dots, 16, P) (`parity_conv.dot_weights`) -> (..., staged_floats) in the kernel's
    shared-memory layout, rounded to tf32: per dot, in dot order, its output class's n-tiles, each
    [row pair 4 s + t][column g][rows k = 8 s + t, 8 s + t + 4] (k = 8 s + 4 j + t); a chunk's tiles
    are then one run the kernel copies with 16-byte cp.async. tf32=False: not rounded (the lane
    emulation's exact arithmetic)."""
    lead = wk.shape[:-3]
    width = {b: 8 * _ntiles(w) for b, (_, _, w) in enumerate(plan.out_classes)}
    tiles = []
    for d, (_, _, b) in enumerate(plan.dots):
        n = width[b]
        tile = wk[..., d, :, :n].reshape(lead + (2, 2, 4, n // 8, 8))  # (s, j, t, n-tile, g)
        tile = jnp.moveaxis(tile, (-2, -5, -3, -1, -4), (-5, -4, -3, -2, -1))  # (n-tile, s, t, g, j)
        tiles.append(tile.reshape(lead + (n // 8 * NTILE_FLOATS,)))
    staged = jnp.concatenate(tiles, axis=-1)
    return tf32_round(staged) if tf32 else staged


def kernel_operands(plan, spatial: tuple[int, ...], x: jax.Array, wk: jax.Array, h: int, tf32: bool = True):
    """(x, staged weights, tab, geom): what the FFI call takes, from the packed input with its halo
    (its rows then padded to `row_floats`) and the dots' weight tiles (as `parity_forward`; the CPU
    tests run the kernel's host build and emulation on the same)."""
    nz, ny, nx = spatial
    if x.shape[-4:] != (plan.cin, nz, ny, nx + 2 * h):
        raise ValueError(f"`x` (shape {x.shape}) must be (cin={plan.cin}, {nz}, {ny}, {nx + 2 * h})")
    cols = max(8 * _ntiles(w) for _, _, w in plan.out_classes)
    if wk.shape[-3:-1] != (len(plan.dots), CHUNK) or wk.shape[-1] < cols:
        raise ValueError(f"`wk` (shape {wk.shape}) must be ({len(plan.dots)}, {CHUNK}, P >= {cols})")
    x = x.astype(jnp.float32)
    pad = row_floats(nx, h) - (nx + 2 * h)
    if pad:  # XLA folds it into with_halo's pad
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x, stage_weights(plan, wk.astype(jnp.float32), tf32), table(plan), geometry(plan, spatial, h)


def _xp(h: int) -> int:
    """The input stage's row pitch: TILE + 2h floats in 16-byte copies, and 8 mod 32, so that a
    warp's A reads (row t: 9 XP t, pixel g) fall in 32 distinct banks."""
    need = row_floats(TILE, h)
    return need + (8 - need) % 32


def row_floats(nx: int, h: int) -> int:
    """A row of nx pixels and its halos, nx + 2h floats, padded to a multiple of 4 (16-byte copies):
    the packed rows of the kernel's operand and the staged rows of its input stage."""
    return -(-(nx + 2 * h) // 4) * 4


def parity_forward(plan, spatial: tuple[int, ...], x: jax.Array, wk: jax.Array, h: int) -> jax.Array:
    """(cout, *spatial) float32 from x (cin, nz, ny, nx + 2h) (the packed input with its x halo,
    `parity_conv.with_halo`) and wk (dots, 16, P) (`parity_conv.dot_weights`); vmappable (one
    launch for the batch)."""
    nz, ny, nx = spatial
    x, w, tab, geom = kernel_operands(plan, spatial, x, wk, h)
    out = jax.ShapeDtypeStruct((plan.cout, nz, ny, nx), jnp.float32)
    call = jax.ffi.ffi_call(PARITY_FORWARD, out, vmap_method="broadcast_all")
    return call(x, w, jnp.asarray(tab), geom=np.asarray(geom, np.int64))
