"""Per-axis geometry of a stride-1 layer: which input cell each output pixel reads at each tap.

On one spatial axis of n input cells, output pixel q at filter tap y reads the padded position
u = q + y * dilation - zero_lo of the frame wrap_lo + n + wrap_hi (wrapped cells either side of
the input); outside the frame it reads a zero, inside it reads input cell (u - wrap_lo) mod n.
A negative zero_lo (the transposed layer's cropping) works the same way. The fused kernels
evaluate this rule by index arithmetic (no padded copy): `native` as a table per axis, `pallas`
and `triton` in the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .._spec import ConvSpec


@dataclasses.dataclass(frozen=True)
class AxisGeometry:
    n: int
    n_out: int
    taps: int
    dilation: int
    wrap_lo: int
    wrap_hi: int
    zero_lo: int

    @property
    def wrap(self) -> bool:
        return bool(self.wrap_lo or self.wrap_hi)

    @property
    def frame(self) -> int:
        """Cells of the wrapped frame (zeros outside it)."""
        return self.n + self.wrap_lo + self.wrap_hi

    @property
    def offset(self) -> int:
        """Input cell q + y * dilation + offset, before the wrap modulo n (or the zero test)."""
        return -(self.zero_lo + self.wrap_lo)

    def source_table(self) -> np.ndarray:
        """Per padded position u + zero_lo = q + y * dilation (q < n_out, y < taps), the input
        cell it reads, or -1 for a zero."""
        u = np.arange(self.n_out + (self.taps - 1) * self.dilation, dtype=np.int64) - self.zero_lo
        inside = (u >= 0) & (u < self.frame)
        return np.where(inside, np.mod(u - self.wrap_lo, self.n), -1).astype(np.int64)


def axes(spec: ConvSpec, spatial: Sequence[int]) -> tuple[AxisGeometry, ...]:
    """The geometry of every spatial axis of `spec` (stride 1, no lhs_dilation) on inputs of
    `spatial` cells."""
    return tuple(
        AxisGeometry(int(n), n_out, m, r, wlo, whi, zlo)
        for n, n_out, m, r, (wlo, whi), (zlo, _) in zip(
            spatial, spec.out_spatial(spatial), spec.filter_shape, spec.rhs_dilation, spec.torus_pad, spec.zero_pad
        )
    )
