"""Tiling of the native kernels: `BlockSizes` and its defaults."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .._spec import ConvSpec

LANES = 16  # the kernel's pixels per vector loop (kLanes in conv_contract.cc)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the native kernels.

    Attributes:
        tile_pixels: output pixels per tile (rows x the last axis padded to LANES), a size whose
            Z stays in cache; a tile has at least one row.
    """

    tile_pixels: int = 64

    @classmethod
    def for_layer(cls, spec: Optional[ConvSpec] = None, spatial: Optional[tuple[int, ...]] = None) -> "BlockSizes":
        """The tiling used when none is given (the same for every layer: rows follow the layer
        through `tile_rows`)."""
        return cls()

    def validate(self, D: int) -> None:
        """Raise a ValueError naming the first field that is not valid (D: the layer's)."""
        if not isinstance(self.tile_pixels, int) or isinstance(self.tile_pixels, bool) or self.tile_pixels < 1:
            raise ValueError(f"`block_sizes.tile_pixels` (={self.tile_pixels!r}) must be an int >= 1")

    def tile_rows(self, out_spatial: tuple[int, ...]) -> int:
        """Output rows (second-to-last axis) per tile: as many padded rows as fit tile_pixels."""
        padded_row = -(-out_spatial[-1] // LANES) * LANES
        return max(1, min(out_spatial[-2], self.tile_pixels // padded_row))
