"""Tiling of the CUDA forward kernel: `BlockSizes` and its defaults."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .._spec import ConvSpec


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the CUDA forward kernel.

    Attributes:
        strip_rows: output y rows one CTA slides over (its ring re-reads 2 slices per strip);
            with 1 CTA per SM, 32 gives 512 CTAs on a 4 x 64^3 batch (3.9 waves on 132 SMs).
        variant: "v2" (forward_kernel: 2 warps per 16-pixel x segment, the vector phase's 27 Z
            tiles live, ~240 registers, 8 warps an SM) or "v3" (forward_kernel_v3: 3 warps per
            segment sharing its (pass, chunk) units, 13 tiles live, <= 168 registers, 12 warps
            an SM); conv_contract.cu's v3 section says how they differ.
    """

    strip_rows: int = 32
    variant: str = "v2"

    @classmethod
    def for_layer(cls, spec: Optional[ConvSpec] = None, spatial: Optional[tuple[int, ...]] = None) -> "BlockSizes":
        """The tiling used when none is given (the same for every covered layer)."""
        return cls()

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not valid."""
        s = self.strip_rows
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"`block_sizes.strip_rows` (={s!r}) must be an int >= 1")
        if self.variant not in ("v2", "v3"):
            raise ValueError(f"`block_sizes.variant` (={self.variant!r}) must be 'v2' or 'v3'")
