"""The fused backends' shared core: what `triton`, `pallas` and `native` derive from a `ConvSpec`
in one way, so that they agree on it.

- `coverage`: the configurations every fused kernel covers, and why one is not covered.
- `basis`: the invariant bases' nonzeros, the sparse stencil every fused kernel unrolls.
- `transpose`: the input gradient as the forward of a transposed layer.
- `geometry`: per spatial axis, which input cell an output pixel reads at a tap (torus wrap and
  zero padding by index arithmetic).
- `limits`: int32 index limits and the power-of-two tile sizes of the Triton-family kernels.

- `contract`: the launcher contract every fused entry point keeps.

Each backend keeps what is its own: kernel source, launch, tiling (its `BlockSizes` and their
heuristics, in its `_tiling` module) and its entry point, whose contract is the same for all:
`conv_contract_<backend>(spec, inputs, weights, *, precision=None, block_sizes=None, ...)`.
"""

from .basis import Nonzero, basis_nonzeros, count_nonzeros, nonzeros_by_read, pair_basis
from .contract import ffi_availability, require_registered, resolve_block_sizes
from .coverage import fused_coverage, torus_wrap_exceeds
from .geometry import AxisGeometry, axes
from .limits import INT32_MAX, MIN_DOT_TILE, dot_tile, int32_overflow, next_pow2
from .transpose import (scatter_input_grads, signed_permutation, transpose_blocker, transposed_spec,
                        transposed_weights, with_bases_of)

__all__ = [
    "AxisGeometry", "axes", "INT32_MAX", "MIN_DOT_TILE", "Nonzero", "basis_nonzeros", "count_nonzeros", "dot_tile",
    "ffi_availability", "fused_coverage", "int32_overflow", "next_pow2", "nonzeros_by_read", "pair_basis", "scatter_input_grads",
    "require_registered", "resolve_block_sizes", "signed_permutation", "torus_wrap_exceeds", "transpose_blocker", "transposed_spec",
    "transposed_weights", "with_bases_of",
]
