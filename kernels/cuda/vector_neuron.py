"""The VectorNeuron nonlinearity of one non-scalar block as CUDA C++ kernels behind XLA FFI, forward
and backward (kernels/cuda/vector_neuron.cu; the math and design are in its header).

    y = vector_neuron_cuda(weight, block, D, activation, eps, affine=None)

The same signature, validation and arithmetic as `kernels.triton.vector_neuron_triton`; ginjax's
default on a GPU where the library is built (ginjax/_vector_neuron.py), for the (channels,
components) the library instantiates (`COVERED`; `coverage` says why not; elsewhere the Triton
kernels run). The block goes to the kernels
component-planar, (c, T, *spatial) row-major: on a GPU the fused ConvContract kernels keep vector
blocks physically so, and the axis move is a layout bitcast (as for ginjax's "planar" XLA path).

A norm's affine map (`affine` = (m, v, shift)) runs as the kernels' prologue: they compute the
nonlinearity of m_c (x - shift_c) + v_c from x in registers, and the backward's gx is the gradient
in that mapped block; the map's own VJP (gm, gv, gshift and gx = m^T g) is one
`kernels._reduce.affine_backward` after it, as on the Triton path.

Backward (custom_vjp, the residuals are x and the map): one launch writes gx and per-CTA (c, c) partials of gW,
`groups` CTAs per example. 16-channel blocks whose pixel count is a multiple of 4 go on the tensor
cores (vector_neuron_mma.cuh, 3xTF32, `uses_mma`) unless the default matmul precision is fp32
("highest"): there gx and gW are ~2x further from float64 than the FFMA kernel's (1.4e-5 against
7e-6 on an H100, `bench.vn_mma_accuracy`), past fp32's 1e-5 but 100x inside tf32's 2e-3, and
the steps are 0.4-1.0 ms faster (GINJAX_VN_CUDA_MMA=1 / 0 forces either). The forward runs on
kernels/triton's kernel (`forward_impl`, which also adds up the means of y for the next layer's
bias; `GINJAX_VN_CUDA_FORWARD=cuda` runs the CUDA one); the
partials are added by a plain `jnp.sum` over that axis (XLA's reduction is deterministic), so gW is bit-identical run to run. Batching: the FFI calls'
vmap_method="broadcast_all", so a vmapped batch is one launch whose operands (the weight
included) carry the batch axes.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .._env import env_choice
from .._precision import resolve_precision
from .._vn_args import (ACTIVATIONS, check_affine, check_arguments, check_residual, literal_eps, pack_affine,
                        supported_activation)
from .._reduce import affine_backward, fused_sums_cover
from ._ffi import VN_BACKWARD, VN_FORWARD, registered

__all__ = ["COVERED", "COVERED_MMA", "coverage", "uses_mma", "vector_neuron_cuda", "vector_neuron_cuda_covers"]

THREADS = 128  # pixels per tile (vector_neuron.cu kThreads)
# (channels, components) -> backward CTAs resident per SM: the least of the register limit of
# ptxas' count for sm_90a (65,536 / (128 threads x registers rounded up to 8)) and the shared
# memory's, 4 (C^2 + 2 x 128 x (T C + 4) + k x 128 T C + C (T^2 + 2T)) bytes (W, the gW staging,
# the next tile's gy, and its x where k = 2, the affine map) plus 1 KB a CTA out of 228 KB.
# tests/test_vector_neuron_cuda.py (slow) recompiles and holds ptxas and the shared memory to these,
# and to no spills. (32, 2), a 2D model's 32-channel vector block: 243-248 registers with its channel
# loop rolled (vector_neuron.cu `Bwd::kWide`) and 105 KB of shared memory without the x copy
# (`Bwd::kCopyX`, k = 1), so two CTAs (8 warps) an SM; (32, 3) spills at 255 registers and is left to Triton.
COVERED = {(8, 2): 5, (8, 3): 4, (8, 4): 3, (16, 2): 3, (16, 3): 2, (16, 4): 1, (32, 2): 2}
# The same for the tensor-core backward of 16 channels (4 warps, 4 x 16 pixels a step): registers
# and its shared memory, 4 (4 (2 x 20 T 16 + 2 x 16 pitch) + 16 (T^2 + 2T)) bytes, pitch the least
# >= 16 T that is 8 mod 32.
COVERED_MMA = {(16, 2): 3, (16, 3): 3, (16, 4): 2}
MMA_STEP = 64  # pixels a CTA of the tensor-core backward takes per step
MMA_ENV = "GINJAX_VN_CUDA_MMA"
DEFAULT_SMS = 132  # an H200's, where the device does not say


def coverage(channels: int, components: int, dtype=jnp.float32) -> tuple[bool, str]:
    """Whether the kernels compute blocks of these sizes; first, whether the library is built."""
    ok, why = registered()
    if not ok:
        return False, why
    return sizes_covered(channels, components, dtype)


def sizes_covered(channels: int, components: int, dtype=jnp.float32) -> tuple[bool, str]:
    """`coverage` without the library check."""
    if jnp.dtype(dtype) != jnp.float32:
        return False, f"float32 only (got {jnp.dtype(dtype)})"
    if (channels, components) not in COVERED:
        return False, (f"(channels, components) = ({channels}, {components}) is not instantiated in "
                       f"vector_neuron.cu (compiled: {sorted(COVERED)})")
    return True, ""


def vector_neuron_cuda_covers(weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps) -> tuple[bool, str]:
    """(ok, why not) of running this call on the CUDA kernels: the library registered, float32,
    relu / gelu, a literal eps, an instantiated (channels, components). Device count and spatial
    sharding are the caller's (ginjax._vector_neuron)."""
    if supported_activation(activation) is None:
        return False, f"activation {activation!r} is not jax.nn.relu or jax.nn.gelu"
    if not literal_eps(eps):
        return False, f"eps {eps!r} is not a Python number > 0"
    if weight.dtype != jnp.float32:
        return False, f"float32 only (the weight is {weight.dtype})"
    k = block.ndim - 1 - D
    if k < 1:
        return False, f"the block (shape {tuple(block.shape)}) has no tensor axes"
    return coverage(block.shape[0], D**k, block.dtype)


def vector_neuron_cuda(weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps: float,
                       affine: tuple | None = None, with_means: bool = False, residual: jax.Array | None = None):
    """The VectorNeuron of one block (c, *spatial[D], *tensor) with mixing `weight` (c, c), as the
    CUDA kernels; float32 in and out. Reverse-mode differentiable and vmappable.

    Args:
        weight: (c, c) float32.
        block: (c, *spatial, *(D,)*k) float32, k >= 1, with (c, D^k) in `COVERED`.
        D: the number of spatial axes.
        activation: jax.nn.relu or jax.nn.gelu (its default tanh form).
        eps: a Python float > 0.
        affine: None, or (m (c, T, T), v (c, T), shift (c, T)) float32: the nonlinearity of
            m_c (block - shift_c) + v_c instead, the map computed in the kernels.
        with_means: return (y, means), means y's spatial mean (c, *tensor) where the forward
            runs on Triton's kernel, which adds it up as it writes y (`forward_impl`), else None.
        residual: None, or an array of the block's shape added to y: by Triton's forward kernel as
            it writes y (the means include it), after the CUDA forward by XLA; its gradient is
            y's cotangent.
    """
    name, T = check_arguments(weight, block, D, activation, eps)
    c = block.shape[0]
    ok, why = sizes_covered(c, T)
    if not ok:
        raise ValueError(f"`block` (shape {tuple(block.shape)}) is not covered by the CUDA kernels: {why}")
    if affine is not None:
        affine = check_affine(affine, c, T)
    residual = check_residual(residual, block)
    ok, why = registered()
    if not ok:
        raise ValueError(f"the CUDA VectorNeuron cannot run here: {why}")
    lead = block.shape[: 1 + D]
    as_planar = lambda a: jnp.moveaxis(a.reshape(lead + (T,)), -1, 1)  # noqa: E731  (c, T, *spatial)
    planar = as_planar(block)
    # whether the map's backward sums run on the Triton sums kernel, which forward and which
    # backward kernel: decided here, outside the custom_vjp's rules (a decision inside them would
    # be reused from any trace JAX caches of them)
    sums_fused = affine is not None and fused_sums_cover(block.reshape((c, -1, T)), products=True)
    triton_forward = (D, tuple(block.shape[1 + D :])) if forward_impl() == "triton" else None
    mma = uses_mma(c, T, math.prod(block.shape[1 : 1 + D]))
    means = bool(with_means) and triton_forward is not None
    out = _vn(_Config(ACTIVATIONS.index(name), float(eps), sums_fused, triton_forward, mma, means), weight, planar,
              affine, None if residual is None else as_planar(residual))
    y = jnp.moveaxis(out[0] if means else out, 1, -1).reshape(block.shape)
    if not with_means:
        return y
    return y, (out[1] if means else None)


FORWARD_ENV = "GINJAX_VN_CUDA_FORWARD"


def forward_impl() -> str:
    """Which kernel runs the forward beside the CUDA backward: GINJAX_VN_CUDA_FORWARD, "triton"
    (default: kernels/triton's forward kernel on the same planar block; its residual is x, as the
    CUDA forward's, so the CUDA backward follows it unchanged, and it adds up y's means for the
    next layer's bias) or "cuda". On the H200 (session 28, steps timed in alternation) Triton's
    forward with the means beside the FFMA backward took ResNet / DilResNet / UNet to 38.92 /
    51.08 / 35.50 ms, the CUDA forward (no means) to 39.83 / 52.52 / 35.92."""
    return env_choice(FORWARD_ENV, ("cuda", "triton"), "triton")


def uses_mma(channels: int, components: int, pixels: int) -> bool:
    """Whether the backward of this block runs on the tensor cores (vector_neuron_mma.cuh): where
    `mma_enabled`, 16 channels, pixels a multiple of 4 (its 16-byte rows)."""
    return mma_enabled() and (channels, components) in COVERED_MMA and pixels % 4 == 0


def mma_enabled() -> bool:
    """The tensor-core backward where it covers a block (`uses_mma`), read as a call is traced:
    GINJAX_VN_CUDA_MMA "auto" (the default) unless the default matmul precision is fp32 (its
    gradients miss fp32's 1e-5 by ~1.4x, module docstring), "1" always, "0" never."""
    choice = env_choice(MMA_ENV, ("auto", "1", "0"), "auto")
    if choice == "auto":
        return resolve_precision(None) != "fp32"
    return choice == "1"


def backward_groups(channels: int, components: int, pixels: int, sms: int | None = None,
                    mma: bool | None = None) -> int:
    """Backward CTAs per example: every resident slot of the GPU (`COVERED`, `COVERED_MMA`), at
    most one per tile (the tensor-core kernel's, `mma`, None: `uses_mma`: a step of 64 pixels).
    Per example, not per batch: under vmap the batch is not known when the call is traced, and a
    batch of B fills B waves of equal CTAs."""
    if sms is None:
        sms = getattr(jax.devices()[0], "core_count", None) or DEFAULT_SMS
    if uses_mma(channels, components, pixels) if mma is None else mma:
        return max(1, min(-(-pixels // MMA_STEP), sms * COVERED_MMA[(channels, components)]))
    return max(1, min(-(-pixels // THREADS), sms * COVERED[(channels, components)]))


class _Config(NamedTuple):
    """What one call fixes (the custom_vjp's static argument), decided outside its rules, as
    `vector_neuron_cuda` says why."""

    act: int  # index into ACTIVATIONS
    eps: float
    sums_fused: bool  # the affine map's backward sums on the Triton sums kernel
    triton_forward: Optional[tuple]  # (D, tensor shape): the forward on Triton's kernel; None: CUDA's
    mma: bool  # the backward on the tensor cores (`uses_mma`)
    means: bool = False  # also y's spatial means (c, *tensor), from Triton's forward kernel


def _attrs(cfg, x):
    return dict(channels=np.int64(x.shape[0]), components=np.int64(x.shape[1]),
                pixels=np.int64(math.prod(x.shape[2:])), activation=np.int64(cfg.act), eps=np.float32(cfg.eps))


def _packed_affine(affine) -> jax.Array:
    """The kernels' `aff` operand (`pack_affine`); without a map one float they do not read."""
    return jnp.zeros((1,), jnp.float32) if affine is None else pack_affine(*affine)


def _forward(cfg, w, x, affine, residual):
    if cfg.triton_forward is not None:  # the Triton forward on the block as (c, *spatial, *tensor), planar
        from ..triton.vector_neuron import vector_neuron_triton

        D, tensor = cfg.triton_forward
        c, T, spatial = x.shape[0], x.shape[1], x.shape[2:]
        as_block = lambda a: jnp.moveaxis(a, 1, -1).reshape((c,) + spatial + tensor)  # noqa: E731
        activation = getattr(jax.nn, ACTIVATIONS[cfg.act])
        out = vector_neuron_triton(w, as_block(x), D, activation, cfg.eps, planar=True, affine=affine,
                                   with_means=cfg.means, residual=None if residual is None else as_block(residual))
        y = jnp.moveaxis((out[0] if cfg.means else out).reshape((c,) + spatial + (T,)), -1, 1)
        return (y, out[1]) if cfg.means else y
    call = jax.ffi.ffi_call(VN_FORWARD, jax.ShapeDtypeStruct(x.shape, jnp.float32), vmap_method="broadcast_all")
    y = call(x, w, _packed_affine(affine), affine=np.int64(affine is not None), **_attrs(cfg, x))
    return y if residual is None else y + residual  # the CUDA forward kernel takes no residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _vn(cfg, w, x, affine, residual):
    """x (c, T, *spatial) planar; cfg a `_Config`; affine None or (m, v, shift); residual None or
    x's shape, added to y."""
    return _forward(cfg, w, x, affine, residual)


def _vn_fwd(cfg, w, x, affine, residual):
    return _forward(cfg, w, x, affine, residual), (w, x, affine, residual is not None)


def _vn_bwd(cfg, res, gy):
    w, x, affine, with_residual = res
    attrs = _attrs(cfg, x)
    c, T, S = (int(attrs[k]) for k in ("channels", "components", "pixels"))
    if cfg.means:  # a mean's cotangent reaches every pixel over their count (zero, dropped by XLA,
        # where the consumer takes the means as constants: kernels._bias.known_mean)
        gy, g_means = gy
        gy = gy + (g_means.reshape(c, T) / S).reshape((c, T) + (1,) * (x.ndim - 2))
    groups = backward_groups(c, T, S, mma=cfg.mma)
    shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((groups, c * c), jnp.float32))
    call = jax.ffi.ffi_call(VN_BACKWARD, shapes, vmap_method="broadcast_all")
    g, part = call(x, w, _packed_affine(affine), gy.astype(jnp.float32), affine=np.int64(affine is not None),
                   groups=np.int64(groups), tensor_cores=np.int64(cfg.mma), **attrs)
    gw = jnp.sum(part, axis=-2).reshape(c, c)
    g_residual = gy.astype(jnp.float32) if with_residual else None  # y = ... + residual
    if affine is None:
        return gw, g, None, g_residual
    # g is the gradient in the mapped block; the map's VJP on (c, S, T) views of the planar arrays
    m, _, shift = affine
    as_rows = lambda a: jnp.moveaxis(a.reshape(c, T, S), 1, 2)  # noqa: E731
    gm, gv, gx, gshift = affine_backward(cfg.sums_fused, m, as_rows(x), shift, as_rows(g), planar=True)
    return gw, jnp.moveaxis(gx, 2, 1).reshape(x.shape), (gm, gv, gshift), g_residual


_vn.defvjp(_vn_fwd, _vn_bwd)
