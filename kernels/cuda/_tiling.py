"""Tiling of the CUDA forward kernel: `BlockSizes` and its defaults."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .._spec import ConvSpec


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the CUDA forward kernel.

    Attributes:
        strip_rows: output y rows one CTA slides over (its ring re-reads 2 slices per strip; at
            dilation d the rows y, y + d, ... of one phase); with 1 CTA per SM, 32 gives 512 CTAs on
            a 4 x 64^3 batch (3.9 waves on 132 SMs).
    """

    strip_rows: int = 32

    @classmethod
    def for_layer(cls, spec: Optional[ConvSpec] = None, spatial: Optional[tuple[int, ...]] = None,
                  batch: Optional[int] = None) -> "BlockSizes":
        """The tiling used when none is given: 32-row strips, shorter where that leaves fewer than
        `MIN_CTAS` CTAs (`strip_for`; `batch`: the launch's batch, None: 1). At dilation d a CTA's
        strip holds rows of one y phase (y mod d): d phases of ny / d rows each; a row of x windows
        (`_plan.window`) has a CTA per window."""
        if spatial is None:
            return cls()
        from . import _plan

        d = max(1, min(spec.rhs_dilation)) if spec is not None else 1
        nz, ny, nx = _plan.kernel_spatial(spec, spatial) if spec is not None else (int(n) for n in spatial)
        w = (_plan.window(spec, nx) if spec is not None else None) or nx  # CTAs per row: its x windows
        return cls(strip_rows=strip_for(nz * d * max(1, nx // w), max(1, ny // d), batch or 1, cls.strip_rows))

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not valid."""
        s = self.strip_rows
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"`block_sizes.strip_rows` (={s!r}) must be an int >= 1")


# One CTA an SM (shared memory and registers), 132 SMs on an H200: fewer than ~2 waves of CTAs
# leave SMs idle (a batch-1 32^3 layer at 32-row strips is 32 CTAs: a quarter of the GPU).
MIN_CTAS = 256


def strip_for(nz: int, ny: int, batch: int, longest: int) -> int:
    """The longest strip (halving from `longest`, down to 2 rows) that gives a launch over `batch`
    examples of nz x ny rows at least MIN_CTAS CTAs. Shorter strips cost ring refills (2 extra y
    slices a strip), which idle SMs cost more than."""
    strip = longest
    while strip > 2 and batch * nz * -(-ny // strip) < MIN_CTAS:
        strip //= 2
    return strip
