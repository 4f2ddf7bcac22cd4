"""The physical layout of non-scalar blocks between the GPU kernels: one switch for all of them.

A block (c, *spatial, T) of T = D^k tensor components lies in memory either
- "planar": the components ahead of the pixels, (c, T, *spatial): a warp's load of consecutive
  pixels of one component is consecutive bytes (what the Triton ConvContract and VectorNeuron
  kernels read best), or
- "minor": the block's own axis order, the T components of a pixel adjacent.

The kernels that read and write such blocks as custom calls (the CUDA ConvContract forward,
input gradient and weight gradient, the Triton VectorNeuron kernels, the per-channel sums kernel)
ask XLA for their operands in one layout, and XLA lays out the fusions between them to match.
Where two neighbours disagree XLA inserts a transpose pass of the whole block each way: on the
H200 such copies took 4.1 ms of a 43 ms ResNet step while the CUDA kernels kept components minor
beside planar VectorNeuron kernels (bench/NOTES.md, "Session 18"). So all of them follow
`block_layout()`: $GINJAX_BLOCK_LAYOUT if set, else "planar" on a GPU and "minor" elsewhere (on a
CPU the kernels run in interpreters, where the layout is only the index arithmetic under test).
Per-kernel switches (`GINJAX_VN_LAYOUT`, `GINJAX_CUDA_LAYOUT`) override it for A/B runs.
Measured on the H200 (bench/NOTES.md, "Session 19"), all planar against the CUDA kernels minor
beside planar VectorNeuron kernels: ResNet step 44.45 -> 41.99 ms and 1.9 GB less temporary
memory, DilResNet 78.35 -> 77.07, UNet 38.61 -> 39.14 (noisy); a layer alone at a jit boundary
pays a relayout of its vector arguments and results instead.
"""

from __future__ import annotations

from typing import Optional

import jax

from ._env import env_choice

LAYOUTS = ("minor", "planar")
ENV = "GINJAX_BLOCK_LAYOUT"


def block_layout(override_env: Optional[str] = None) -> str:
    """$override_env if given and set, else $GINJAX_BLOCK_LAYOUT if set, else "planar" on a GPU
    and "minor" elsewhere."""
    default = env_choice(ENV, LAYOUTS, "planar" if jax.default_backend() == "gpu" else "minor")
    return default if override_env is None else env_choice(override_env, LAYOUTS, default)

