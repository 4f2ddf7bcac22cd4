"""The launcher contract every fused backend keeps.

Entry point: `conv_contract_<backend>(spec, inputs, weights, *, precision=None,
block_sizes=None, ...)` on unbatched blocks. Tiling: a frozen `BlockSizes` dataclass per backend
(in its `_tiling` module) with `BlockSizes.for_layer(spec, spatial)`, the tiling used when none
is given, and `.validate(D)`, which raises a ValueError naming the bad field.
"""

from __future__ import annotations

from .._spec import ConvSpec


def resolve_block_sizes(block_sizes, cls: type, spec: ConvSpec, spatial: tuple[int, ...]):
    """The tiling of one call: `block_sizes`, or `cls.for_layer(spec, spatial)` when it is None;
    checked to be a `cls` and validated."""
    blocks = cls.for_layer(spec, spatial) if block_sizes is None else block_sizes
    if not isinstance(blocks, cls):
        raise ValueError(f"`block_sizes` (={block_sizes!r}) must be a {cls.__module__.rsplit('._', 1)[0]}.BlockSizes or None")
    blocks.validate(spec.D)
    return blocks
