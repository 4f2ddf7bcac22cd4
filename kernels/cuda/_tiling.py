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
    """

    strip_rows: int = 32

    @classmethod
    def for_layer(cls, spec: Optional[ConvSpec] = None, spatial: Optional[tuple[int, ...]] = None) -> "BlockSizes":
        """The tiling used when none is given (the same for every covered layer)."""
        return cls()

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not valid."""
        s = self.strip_rows
        if not isinstance(s, int) or isinstance(s, bool) or s < 1:
            raise ValueError(f"`block_sizes.strip_rows` (={s!r}) must be an int >= 1")
