"""`pallas` backend: ConvContract as fused Pallas kernels (see conv_contract.py).

Registers itself on import. Available on a GPU when the Pallas Triton lowering compiles a probe
kernel there, and on any CPU in interpret mode (slow: meant for tests). Configurations outside
`coverage` fall back to `dense` through the registry, and `kernels.explain` says why.
"""

from __future__ import annotations

import functools

from .._registry import Backend, register_backend
from ._plan import coverage

try:  # a jax without Pallas' Triton module must not break `import kernels`
    from .conv_contract import conv_contract_pallas, conv_contract_reference, default_interpret
    from ._tiling import ALGORITHMS, BlockSizes
except ImportError as _err:  # pragma: no cover - depends on the installed jax
    _IMPORT_ERROR: object = _err
else:
    _IMPORT_ERROR = None

__all__ = ["ALGORITHMS", "BlockSizes", "conv_contract_pallas", "conv_contract_reference", "coverage", "availability"]


@functools.lru_cache(maxsize=None)
def _gpu_probe() -> tuple[bool, str]:
    """Compile (not run) a tiny forward and backward through the GPU lowering, once."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from .._spec import make_spec

        basis = np.zeros((1, 3, 3), np.float64)
        basis[0, 1, 1] = 1.0
        spec = make_spec(2, [(0, 0, 2)], [(0, 0, 2)], [(0, 0, basis)], is_torus=True)

        def loss(x, w):
            (y,) = conv_contract_pallas(spec, [x], [w], interpret=False)
            return jnp.sum(y * y)

        x = jax.ShapeDtypeStruct((2, 8, 8), jnp.float32)
        w = jax.ShapeDtypeStruct((2, 2, 1), jnp.float32)
        jax.jit(jax.grad(loss, argnums=(0, 1))).trace(x, w).lower().compile()
    except Exception as err:  # any failure means: do not use this backend here
        return False, f"the Pallas GPU (Triton) lowering failed on a probe kernel: {type(err).__name__}: {err}"
    return True, "GPU, Pallas Triton lowering"


def availability() -> tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"this jax lacks what the Pallas kernels need ({_IMPORT_ERROR})"
    if default_interpret():
        return True, "CPU: Pallas interpret mode (slow, for tests)"
    return _gpu_probe()


def _run(spec, inputs, weights, mode):
    return conv_contract_pallas(spec, inputs, weights, precision=mode)


def unmeasured_caveat(spec, spatial) -> str:
    """Why `auto` on a GPU with no measured table should rank `dense` first: `auto` ranks for
    training, and these kernels (one launch for all pairs through Pallas' Triton lowering) lost
    to dense in fwd_bwd on every layer measured on the H200 (kernels/measured/nvidia-h200.json:
    1.3x to 11x, the larger layers spilling registers)."""
    return "its kernels lost to dense in fwd_bwd on every layer measured on the H200 (1.3x to 11x dense's time)"


register_backend(Backend("pallas", _run, availability, coverage, priority={"gpu": 15},
                         unmeasured_caveat=unmeasured_caveat))
