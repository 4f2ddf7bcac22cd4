"""Tiling of the generated Triton kernels (`BlockSizes` and the heuristics that pick it), and the
geometry and plan records of a launch."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

from .._fused import MIN_DOT_TILE, dot_tile, next_pow2
from .._spec import ConvSpec

# warps of the weight-gradient kernel the automatic split aims for: two waves of 16 warps per
# H200 SM (its programs have few warps each, so the count of programs follows their size)
DW_WARPS = 132 * 16 * 2
# warps of a D=2 forward program (bench/NOTES.md, "Session 23": the H200 sweep)
D2_WARPS = 4
# pixels along a row of a D=2 weight-gradient program: on the H100 64 took d2_n256_b16_c32's
# fwd_bwd from 4.43 to 4.00 ms against 32 (the best of nine tilings; 2 warps and 4 units stay)
# and the 2D DilResNet step from 48.3-48.9 to 47.0-47.2 ms (bench/NOTES.md, "Session 36")
D2_DW_PIXELS = 64
# the weight-gradient kernel's tiling on D=2 layers, "warps/pixels/units" (unset: 2 warps,
# D2_DW_PIXELS, 4 units), for sweeping it inside a model step
D2_DW_ENV = "GINJAX_TRITON_D2_DW"
# Unrolled source grows with the basis nonzeros; beyond this Triton's compile time gets silly.
MAX_NONZEROS = 6000


def weight_grad_tiling(text: str) -> Optional[tuple[int, int, int]]:
    """A weight-gradient tiling written "warps/pixels/units" (positive integers), else None."""
    parts = text.split("/")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    warps, pixels, units = map(int, parts)
    return warps, pixels, units


def d2_weight_grad_tiling() -> dict:
    """$GINJAX_TRITON_D2_DW as BlockSizes fields ({} where unset: `for_layer`'s D=2 defaults)."""
    value = os.environ.get(D2_DW_ENV, "")
    if not value:
        return {}
    if (tiling := weight_grad_tiling(value)) is None:
        raise ValueError(f"`{D2_DW_ENV}` (={value!r}) must be warps/pixels/units, e.g. 2/32/4")
    warps, pixels, units = tiling
    return dict(dw_num_warps=warps, dw_tile=(1, pixels), dw_units=units)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the fused kernels: the forward (which also runs the input gradient) and, through
    the dw_* fields, the weight gradient.

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
        layout: how the kernels' vector and 2-tensor blocks lie in memory. "planar": operands
            (inputs, cotangents) and results component-planar, each block's tensor components
            ahead of its spatial axes (the launcher asks XLA for that layout), so a warp's load of
            32 pixels of one component covers 128 consecutive bytes; "planar_in": operands planar,
            results in the native order; "interleaved": the native (*spatial, *tensor) order
            everywhere (stride-D^k component loads). See bench/NOTES.md for the trade-off at a
            jit boundary that hands over row-major arrays (XLA relayouts them).
        unroll_chunks: walk the input-channel chunks of each stencil segment in unrolled code
            (`tl.static_range`) instead of a loop, so that ptxas may issue the next chunk's loads
            while the current chunk's dots run (more registers; layers with more than `block_c`
            input channels only). Slower than the loop on the H200's D=2 layer (bench/NOTES.md,
            "Session 23"): kept for sweeps.
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
    layout: str = "planar"
    unroll_chunks: bool = False

    @property
    def planar_in(self) -> bool:
        return self.layout in ("planar", "planar_in")

    @property
    def planar_out(self) -> bool:
        return self.layout == "planar"

    def for_weight_grad(self, D: int) -> "BlockSizes":
        """The tiling of the weight-gradient kernel, as a BlockSizes of its own."""
        tile = self.dw_tile if self.dw_tile is not None else (1,) * (D - 1) + (32,)
        return dataclasses.replace(self, tile=tile, num_warps=self.dw_num_warps, max_registers=self.dw_max_registers)

    def resolved_tile(self, D: int) -> tuple[int, ...]:
        return self.tile if self.tile is not None else default_tile(D)

    @classmethod
    def for_layer(cls, spec: ConvSpec, spatial: tuple[int, ...]) -> "BlockSizes":
        """The tiling used when none is given.

        On the interpreter one program covers up to 512 output pixels: every program is a Python
        loop over numpy ops, so fewer, larger programs are much faster there. On a GPU, D=2 layers
        run 4-warp programs, measured faster than 8-warp ones on the H200 (1.10 against 1.31 ms
        on d2_n256_b16_c32; bench/NOTES.md, "Session 23"), and weight-gradient programs over 64
        pixels of a row (D2_DW_PIXELS).
        """
        if not interpreting():
            if spec.D != 2:
                return cls()
            return cls(**{"num_warps": D2_WARPS, "dw_tile": (1, D2_DW_PIXELS), **d2_weight_grad_tiling()})
        tile = [next_pow2(n) for n in spec.out_spatial(spatial)]
        for ax in range(len(tile)):
            while math.prod(tile) > 512 and tile[ax] > 1:
                tile[ax] //= 2
        while math.prod(tile) < MIN_DOT_TILE:
            tile[-1] *= 2
        return cls(tile=tuple(tile))

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not a valid tiling for D axes."""
        for name, tile in (("tile", self.resolved_tile(D)), ("dw_tile", self.dw_tile)):
            if tile is None:
                continue
            if len(tile) != D or any(t < 1 or t & (t - 1) for t in tile) or math.prod(tile) < MIN_DOT_TILE:
                raise ValueError(
                    f"`block_sizes.{name}` (={getattr(self, name)!r}) must be {D} powers of 2 with at "
                    f"least {MIN_DOT_TILE} pixels"
                )
        for name in ("block_c", "block_o"):
            v = getattr(self, name)
            if v < MIN_DOT_TILE or v & (v - 1):
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be a power of 2 >= {MIN_DOT_TILE} (tl.dot's minimum)")
        if self.layout not in ("planar", "planar_in", "interleaved"):
            raise ValueError(f"`block_sizes.layout` (={self.layout!r}) must be 'planar', 'planar_in' or 'interleaved'")
        if self.orientation not in ("op", "po"):
            raise ValueError(f"`block_sizes.orientation` (={self.orientation!r}) must be 'op' or 'po'")
        for name in ("num_warps", "dw_num_warps"):
            v = getattr(self, name)
            if v not in (1, 2, 4, 8, 16, 32):
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be a power of 2 up to 32")
        if self.num_stages < 1:
            raise ValueError(f"`block_sizes.num_stages` (={self.num_stages!r}) must be >= 1")
        for name in ("max_registers", "dw_max_registers"):
            v = getattr(self, name)
            if v is not None and not 24 <= v <= 255:
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be None or between 24 and 255")
        if self.dw_units < 1:
            raise ValueError(f"`block_sizes.dw_units` (={self.dw_units!r}) must be >= 1")


def interpreting() -> bool:
    """True when kernels run through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_groups(spec: ConvSpec, blocks: BlockSizes, spatial: tuple[int, ...], batch: int) -> int:
    """Pixel-tile shares per (batch element, channel block) of the weight-gradient kernel: enough
    programs to fill the GPU, each reducing a long run of tiles in registers."""
    out_spatial = spec.out_spatial(spatial)
    tiles = math.prod(-(-n // t) for n, t in zip(out_spatial, blocks.resolved_tile(spec.D)))
    per_share = max(1, programs_per_share(spec, blocks) * batch)
    if interpreting():
        return 1  # the interpreter runs programs one by one: fewer is faster
    target = max(1, min(tiles, -(-DW_WARPS // (blocks.num_warps * per_share))))
    # a divisor of the tile count near the target spares the ragged last round its masks
    divisor = max(g for g in range(1, target + 1) if tiles % g == 0)
    return divisor if 2 * divisor >= target else target


def programs_per_share(spec: ConvSpec, blocks: BlockSizes) -> int:
    """(input-channel chunk, output-channel block) programs of one pixel share, as the kernel tiles them."""
    n_chunks = max(-(-c // blocks.block_c) for _, _, c in spec.in_keys)
    n_otiles = max(-(-o // min(dot_tile(o), blocks.block_o)) for _, _, o in spec.out_keys)
    return n_chunks * n_otiles


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
    # per output block of the forward: None (no bias offset), else whether its (1 or B, o, D^k)
    # offset operand carries the batch
    bias_batched: tuple = ()


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
