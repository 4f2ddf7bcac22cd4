"""Tiling of the Pallas kernels: `BlockSizes` and the heuristics that fill in what it leaves open
(pixels per program, warps)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .._env import env_choice
from .._fused import MIN_DOT_TILE, basis_nonzeros, dot_tile, next_pow2
from .._spec import ConvSpec
from ._plan import Stencil

ALGORITHMS = ("taps", "factorised")
ALGORITHM_ENV = "GINJAX_PALLAS_ALGORITHM"
# (algorithm, weight-gradient kernel) -> warps: without a GPU to time on, the counts for which
# ptxas (sm_90a) reports no or few register spills on the bench layer (bench/PALLAS_NOTES.md).
DEFAULT_WARPS = {("taps", False): 8, ("taps", True): 4, ("factorised", False): 4, ("factorised", True): 8}


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters (powers of two; None picks a size from the layer).

    Attributes:
        algorithm: "factorised" (default: the fastest on the H200, bench/PALLAS_NOTES.md) or
            "taps" (loop over filter taps, the filter tile of each tap built on chip from
            the weights and the basis, one tensor-core dot per component pair and tap);
            "factorised" unrolls the static sparse basis stencil over its nonzeros, then does a
            channel GEMM (factorised.py).
        block_p: destination pixels per program in the forward kernel.
        block_p_dx: the same for the input-gradient kernel.
        block_p_dw: pixels per step of the weight-gradient kernel.
        dw_programs: programs of the weight-gradient kernel (each reduces a share of the pixel
            tiles; their partial sums are added after the launch).
        acc_budget: fp32 accumulator elements per program that the automatic block_p aims for
            (taps kernels; the factorised weight-gradient kernel's Z and accumulators).
        z_budget: fp32 elements of on-chip Z tiles and accumulators per program that the factorised
            forward and input-gradient kernels' automatic block_p aims for (24576 gives 32 pixels
            on the standard {scalar, vector} x 16 layer in 3D, the fastest measured).
        hoist_budget: weight elements (all terms, padded) up to which the forward kernels load
            the weights once per program instead of once per tap.
        num_warps, num_warps_dw: Triton warps of the forward/input-gradient and of the
            weight-gradient kernels (None: `DEFAULT_WARPS` of the algorithm).
        num_stages: Triton pipelining depth. Launch parameters are ignored in interpret mode.
    """

    algorithm: str = "factorised"
    block_p: Optional[int] = None
    block_p_dx: Optional[int] = None
    block_p_dw: Optional[int] = None
    dw_programs: int = 264
    acc_budget: int = 8192
    z_budget: int = 24576
    hoist_budget: int = 4096
    num_warps: Optional[int] = None
    num_warps_dw: Optional[int] = None
    num_stages: int = 1

    @classmethod
    def for_layer(cls, spec: Optional[ConvSpec] = None, spatial: Optional[tuple[int, ...]] = None) -> "BlockSizes":
        """The tiling used when none is given: the defaults (pixels per program follow the layer
        at launch, `block_p`); $GINJAX_PALLAS_ALGORITHM overrides the algorithm (for A/B runs)."""
        algorithm = env_choice(ALGORITHM_ENV, ALGORITHMS, "")
        return cls(algorithm=algorithm) if algorithm else cls()

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not valid (D: the layer's, unused:
        every field here is independent of it)."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"`block_sizes.algorithm` (={self.algorithm!r}) must be one of {ALGORITHMS}")
        for name in ("block_p", "block_p_dx", "block_p_dw"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < MIN_DOT_TILE or v & (v - 1)):
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be None or a power of two >= {MIN_DOT_TILE}")
        for name in ("num_warps", "num_warps_dw"):
            v = getattr(self, name)
            if v is not None and v not in (1, 2, 4, 8, 16):
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be None, 1, 2, 4, 8 or 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"`block_sizes.num_stages` (={self.num_stages!r}) must be an int >= 1")
        if not isinstance(self.dw_programs, int) or self.dw_programs < 1:
            raise ValueError(f"`block_sizes.dw_programs` (={self.dw_programs!r}) must be an int >= 1")
        if not isinstance(self.hoist_budget, int) or self.hoist_budget < 0:
            raise ValueError(f"`block_sizes.hoist_budget` (={self.hoist_budget!r}) must be an int >= 0")
        for name in ("acc_budget", "z_budget"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 256:
                raise ValueError(f"`block_sizes.{name}` (={v!r}) must be an int >= 256")

    def warps(self, dw: bool) -> int:
        """Triton warps of the forward / input-gradient (dw False) or weight-gradient kernel."""
        warps = self.num_warps_dw if dw else self.num_warps
        return DEFAULT_WARPS[(self.algorithm, dw)] if warps is None else warps


def _fit_block_p(rows: int, budget: int, n_dst: int) -> int:
    """The largest power of two in 16..128 (and at most the destination's pixels, rounded up)
    for which `rows` fp32 values per pixel fit `budget`."""
    bp = 128
    while bp > MIN_DOT_TILE and rows * bp > budget:
        bp //= 2
    return max(MIN_DOT_TILE, min(bp, next_pow2(n_dst)))


def _accumulator_rows(plan: Stencil) -> int:
    return sum(dot_tile(c) * plan.comps(k) for k, c in plan.dst)


def taps_block_p(plan: Stencil, requested: Optional[int], budget: int) -> int:
    """Pixels per program of the taps kernels: the request, or the largest that keeps the fp32
    accumulators (sum over destination blocks of channel tile x components x pixels) in `budget`."""
    if requested is not None:
        return requested
    return _fit_block_p(_accumulator_rows(plan), budget, math.prod(plan.dst_spatial))


def factorised_block_p(plan: Stencil, requested: Optional[int], budget: int) -> int:
    """Pixels per program of the factorised kernels: the request, or the largest for which the
    on-chip Z tiles (every nonzero (pair, f, j): a source channel tile) and the accumulators fit
    `budget` fp32 elements."""
    if requested is not None:
        return requested
    z_tiles = {(nz.pair, nz.f, nz.j) for nz in basis_nonzeros(plan.spec)}
    rows = _accumulator_rows(plan) + sum(dot_tile(plan.src[plan.terms[t].src][1]) for t, _, _ in z_tiles)
    return _fit_block_p(rows, budget, math.prod(plan.dst_spatial))


def taps_weight_grad_block_p(plan: Stencil, requested: Optional[int]) -> int:
    """Pixels per step of the taps weight-gradient kernel: the request, or up to 32 (its
    cotangent tiles stay live across the taps)."""
    return requested or max(MIN_DOT_TILE, min(32, next_pow2(math.prod(plan.dst_spatial))))
