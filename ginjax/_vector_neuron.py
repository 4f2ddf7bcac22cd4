"""The Vector Neurons nonlinearity of one non-scalar block, as one differentiable operation.

Per pixel and channel, with x the block's T = D^k tensor components and d = W x (the channel
mixing, a batched GEMM: ginjax._channel_mix):

    n = |d|,  u = d / (n + eps),  s = <x, u>,  y = x + h(s) u,
    h(s) = (act(s) / (|s| + eps) - 1) s

which is ginjax 0.1.8's gain * parallel + (x - parallel) with parallel = s u. Autodiff of that
chain saves and re-reads a dozen block-sized intermediates (norms, unit vectors, gains, their
broadcasts, a transposed copy for the norm's backward). Here the backward is written out:

    gs = <gy, u> h'(s)                         (h' by a forward-mode derivative of h, elementwise)
    gu = h(s) gy + gs x
    gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n)       (second term 0 where d = 0)
    gx = gy + gs u + W^T gd,   gW = sum over pixels of gd x^T

so the forward is the GEMM and one elementwise pass (x, d -> y), and the backward one elementwise
pass (gy, x, d -> gd and the local part of gx) and the two GEMMs; n, u, s are recomputed, only
x and d are kept. The sums over the T components are written as T multiply-adds on slices of
the components' axis, so they fuse with the elementwise work instead of becoming reductions.

Two arrangements of the same arithmetic, by where the T components sit:
- "minor": (c, *spatial, T), the block's own axis order; the GEMM reads (c, S * T).
- "planar": (c, T, *spatial), the components ahead of the pixels; the GEMM reads (c, T * S).
The layout is also the one the "triton" kernels index the block in, so it is the physical layout
XLA gives the block around them. The Triton ConvContract kernels ask XLA for component-planar
blocks (with "minor" XLA copied every block into the planar layout and back, bench/NOTES.md
"Round 2 measured"); the CUDA ConvContract kernels read and wrote components-minor ones until
session 19, yet beside them too "planar" was faster while the "minor" kernels loaded each component at stride T:
those loads cost more than the transposes they spared (H200, steps at d3_n64_b4: ResNet 50.5 ms
planar against 53.3 minor, DilResNet 78.7 against 89.8, UNet 39.9 against 43.7; bench/NOTES.md
"Session 13"). The "minor" kernels now read and write whole pixels (`_vn_kernel._packed`, up to
32 channels of 2 to 4 components): a ResNet step (d3_n64_b4, 16 channels) took 45.09 ms against
45.65 planar, faster in each of three alternations, with 69 MB less temporary memory (H200,
bench/NOTES.md "Session 17"), but a DilResNet step took 86.4 ms with them against 78.7 planar
(its dilated layers run on Triton's planar ConvContract kernels) and the UNet's 37.4 against
37.2 (bench/NOTES.md "Session 18"). Since session 19 the CUDA ConvContract kernels read and write
component-planar blocks too, and all the block kernels follow one switch (kernels/_layout.py):
`default_layout` is GINJAX_BLOCK_LAYOUT's choice, "planar" on a GPU and "minor" elsewhere;
`GINJAX_VN_LAYOUT` (minor / planar) overrides it for the VectorNeuron alone.

Three implementations (`impl`, or `GINJAX_VN_IMPL` = xla / triton / cuda; default "cuda" on a
GPU, which takes the "triton" path wherever the CUDA kernels do not run, "xla" elsewhere). On the H200 the Triton kernels passed their GPU tests
(tests/test_vector_neuron_triton_gpu.py) and took a ResNet train step (d3_n64_b4) from 81.1 to
72.7 ms and a DilResNet step from 104.9 to 93.7 ms, with 7-9 GB less temporary memory
(bench/step_variants.py, bench/NOTES.md "VectorNeuron as one Triton kernel"); on a CPU they run
only through Triton's interpreter, which is for tests:
- "xla": the GEMM and the elementwise passes above, written in jax (any dtype, any activation).
- "triton": `kernels.triton.vector_neuron_triton`, the whole nonlinearity as one fused Triton
  kernel forward and one backward over the component-planar block, each reading its operands
  once and writing once. Used where it covers the call: the `triton` backend is available (an
  NVIDIA GPU, or the host with TRITON_INTERPRET=1), float32 weight and block, tensor order 1 or
  2, up to 64 channels (32 for 2-tensors: `kernels.triton.vector_neuron_fits`), activation
  jax.nn.relu or jax.nn.gelu (by identity), eps a Python number, one device and no
  `kernels.spatial_sharding` active (XLA cannot partition a custom call: it would gather the
  block onto every device); any other call takes the "xla" path. On a CPU it is for tests
  only (the interpreter is slow). `GINJAX_VN_TRITON_PRECISION` (ieee / tf32 / tf32x3 / auto, the
  default: `kernels.triton._vn_kernel.default_precision`) sets its channel-mixing dots' precision;
  "auto" gives TF32 to 2D vector blocks of 64+ channels under a TF32 default matmul precision. `GINJAX_VN_SAVE_MIX=1` keeps d = W x from the forward for the
  backward instead of recomputing it: a block-sized residual per call, for 0.7-0.8 ms of a
  ResNet or DilResNet step on the H200 at 26-37% more temporary memory, so off by default
  (bench/NOTES.md, "Session 14"). A norm's affine map passed as `affine` runs in the kernels
  as their prologue on planar blocks (`GINJAX_VN_NORM_PROLOGUE=0` applies it as its own pass:
  one block-sized residual more per call; bench/NOTES.md "Session 18").
- "cuda" (the GPU default since session 28: its FFMA backward beside Triton's forward kernel
  took ResNet / DilResNet / UNet steps from 40.87 / 54.25 / 36.41 to 38.92 / 51.08 / 35.50 ms on the
  H200; bench/NOTES.md "Session 28"): `kernels.cuda.vector_neuron_cuda`, the same math as CUDA
  C++ kernels behind XLA FFI (kernels/cuda/vector_neuron.cu: one thread per pixel with the
  block's channels in registers, where Triton's fp32 dots bound the backward by shared-memory
  traffic; the forward is Triton's kernel, GINJAX_VN_CUDA_FORWARD, and 16-channel blocks' backward
  on the tensor cores unless the default matmul precision is fp32, GINJAX_VN_CUDA_MMA:
  kernels/cuda/vector_neuron.py). Used where `cuda_covers` the call:
  the library `_ginjax_cuda.so` built and registered (kernels/cuda/README.md) and JAX's default backend a GPU, float32, jax.nn.relu or
  jax.nn.gelu, eps a Python number, one device, no spatial sharding, and (channels, components)
  among those the library instantiates (`kernels.cuda.vector_neuron.COVERED`: 8 or 16 channels
  with 2 to 4 components, 32 with 2); any other call takes the "triton" path where that covers it, else "xla".
  A norm's affine map runs in these kernels as their prologue too (`GINJAX_VN_NORM_PROLOGUE`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from ginjax._channel_mix import _mix, _mix_bwd
from ginjax._norm_stats import channel_affine
from kernels._env import env_choice
from kernels._layout import block_layout


LAYOUTS = ("minor", "planar")
LAYOUT_ENV = "GINJAX_VN_LAYOUT"
IMPLS = ("xla", "triton", "cuda")
IMPL_ENV = "GINJAX_VN_IMPL"
# "1": the "triton" kernels keep d = W x from the forward for the backward (kernels.triton.VNBlocks
# save_mix); "0" (default): the backward recomputes it
SAVE_MIX_ENV = "GINJAX_VN_SAVE_MIX"
# "1" (default): a norm's affine map handed to `vector_neuron` runs in the "triton" kernels on
# planar blocks and in the "cuda" kernels (the normalised block is neither written nor kept: a
# block-sized residual less per call); "0": it is always applied first, as its own pass
NORM_PROLOGUE_ENV = "GINJAX_VN_NORM_PROLOGUE"
# "1" (default): with `with_means` the "triton" forward kernel (also where it runs beside the "cuda"
# backward, GINJAX_VN_CUDA_FORWARD=triton) adds up y's spatial means as it writes y, for a following
# ConvContract's "mean" bias, which then reads no block again for them; "0": it does not, and the
# bias takes its means from the block as before (for A/B)
MEANS_ENV = "GINJAX_VN_MEANS"
# "1" (default): a float32 `residual` is added by the "triton" forward kernel (also beside the
# "cuda" backward) as it writes y; "0": by an add after it (for A/B)
RESIDUAL_ENV = "GINJAX_VN_RESIDUAL"


def default_layout() -> str:
    """$GINJAX_VN_LAYOUT if set, else kernels._layout.block_layout(): "planar" on a GPU and "minor"
    elsewhere unless GINJAX_BLOCK_LAYOUT says otherwise (module docstring)."""
    return block_layout(LAYOUT_ENV)


def means_enabled() -> bool:
    """Whether the "triton" forward kernel adds up y's means where asked ($GINJAX_VN_MEANS)."""
    return env_choice(MEANS_ENV, ("0", "1"), "1") == "1"


def residual_enabled() -> bool:
    """Whether the kernels add a `residual` as they write y ($GINJAX_VN_RESIDUAL)."""
    return env_choice(RESIDUAL_ENV, ("0", "1"), "1") == "1"


def default_impl() -> str:
    """$GINJAX_VN_IMPL if set, else "cuda" on a GPU (the "triton" path where the CUDA library is
    not built or does not cover the call) and "xla" elsewhere (module docstring)."""
    return env_choice(IMPL_ENV, IMPLS, "cuda" if jax.default_backend() == "gpu" else "xla")


def triton_covers(weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps) -> bool:
    """Whether the fused Triton kernels run this call (module docstring, "triton")."""
    import kernels
    from kernels.triton import literal_eps, supported_activation, vector_neuron_fits

    k = block.ndim - 1 - D
    return (
        1 <= k <= 2
        and vector_neuron_fits(block.shape[0], D**k)
        and weight.dtype == jnp.float32
        and block.dtype == jnp.float32
        and literal_eps(eps)
        and supported_activation(activation) is not None
        and kernels.active_spatial_sharding() is None
        and jax.device_count() == 1
        and "triton" in kernels.available_backends()
    )


def cuda_covers(weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps) -> tuple[bool, str]:
    """Whether the CUDA kernels run this call, and why not (module docstring, "cuda")."""
    import kernels
    from kernels.cuda import availability
    from kernels.cuda.vector_neuron import vector_neuron_cuda_covers

    ok, why = availability()
    if not ok:
        return False, why
    if jax.device_count() != 1 or kernels.active_spatial_sharding() is not None:
        return False, "more than one device or spatial sharding (XLA cannot partition the custom call)"
    return vector_neuron_cuda_covers(weight, block, D, activation, eps)


def _path(impl: str, weight: jax.Array, block: jax.Array, D: int, activation: Callable, eps) -> str:
    """Which implementation runs the call: "cuda" where asked and `cuda_covers` it, else "triton"
    where asked ("triton" or "cuda") and `triton_covers` it, else "xla"."""
    if impl == "cuda" and cuda_covers(weight, block, D, activation, eps)[0]:
        return "cuda"
    if impl in ("triton", "cuda") and triton_covers(weight, block, D, activation, eps):
        return "triton"
    return "xla"


def vector_neuron(
    weight: jax.Array,
    block: jax.Array,
    D: int,
    activation: Callable,
    eps: float,
    layout: str | None = None,
    impl: str | None = None,
    affine: tuple | None = None,
    with_means: bool = False,
    residual: jax.Array | None = None,
):
    """The VectorNeuronNonlinear of one block (c, *spatial[D], *tensor) with mixing `weight`
    (c, c); the result has the block's shape. Reverse-mode differentiable and vmappable.
    `affine` (m (c, T, T), v (c, T), shift (c, T), e.g. a norm's `vector_group_norm_coefficients`):
    the nonlinearity of m_c (block - shift_c) + v_c instead, which the "triton" kernels on planar
    blocks and the "cuda" kernels compute as they load the block (never written out) and the
    other paths as one `channel_affine` pass first.
    `layout` ("minor" / "planar", default `default_layout()`) arranges the arithmetic of the
    "xla" path and is the layout the "triton" kernels index the block in; `impl` ("xla" /
    "triton" / "cuda", default `default_impl()`) picks the path
    ("cuda" where `cuda_covers` the call, "triton" where `triton_covers` it, else "xla"; "cuda"
    not covered falls back to "triton" and "xla" in that order).
    `with_means`: return (y, means), means y's spatial mean (c, *tensor) where the "triton"
    forward kernel added it up as it wrote y (no pass over y; GINJAX_VN_MEANS), else None.
    `residual`: None, or an array of the block's shape added to the result (a residual block's
    input), by the "triton" forward kernel (also beside the "cuda" backward) as it writes y, so
    no pass of its own runs over it, and by an add elsewhere; the means include it."""
    y, means = _vector_neuron(weight, block, D, activation, eps, layout, impl, affine, with_means, residual)
    return (y, means) if with_means else y


def _vector_neuron(weight, block, D, activation, eps, layout, impl, affine, with_means, residual=None):
    if residual is not None and tuple(getattr(residual, "shape", ())) != tuple(block.shape):
        raise ValueError(f"vector_neuron: `residual` (shape {tuple(getattr(residual, 'shape', ()))}) must have the "
                         f"block's shape {tuple(block.shape)}")
    T = math.prod(block.shape[1 + D :])
    layout = default_layout() if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"vector_neuron: `layout` (={layout!r}) must be one of {LAYOUTS}")
    impl = default_impl() if impl is None else impl
    if impl not in IMPLS:
        raise ValueError(f"vector_neuron: `impl` (={impl!r}) must be one of {IMPLS}")
    path = _path(impl, weight, block, D, activation, eps)
    # the affine map goes into the kernels where they run the call on planar blocks (the "cuda"
    # ones always do); elsewhere one pass first (on components-minor blocks the prologue made a
    # ResNet step 1.2 ms slower on the H200, bench/NOTES.md "Session 18")
    if affine is not None and not (
        (path == "cuda" or (path == "triton" and layout == "planar"))
        and env_choice(NORM_PROLOGUE_ENV, ("0", "1"), "1") == "1"
        and all(a.dtype == jnp.float32 for a in affine)
    ):
        m, v, shift = affine
        block = channel_affine(m, v, block.reshape((block.shape[0], -1, T)), shift).reshape(block.shape)
        affine = None
        path = _path(impl, weight, block, D, activation, eps)  # the map's dtype may promote the block's
    with_means = with_means and path != "xla" and means_enabled()
    # the kernels add a float32 residual as they write y; another dtype goes by `+`, as XLA's does
    fused = (residual if residual is not None and residual.dtype == jnp.float32 and path != "xla"
             and residual_enabled() else None)
    late = residual if fused is None else None
    extra = {} if fused is None else {"residual": fused}
    if path == "cuda":
        from kernels.cuda import vector_neuron_cuda

        out = vector_neuron_cuda(weight, block, D, activation, float(eps), affine=affine, with_means=with_means,
                                 **extra)
        y, means = out if with_means else (out, None)
    elif path == "triton":
        from kernels.triton import VNBlocks, vector_neuron_triton

        blocks = VNBlocks(save_mix=env_choice(SAVE_MIX_ENV, ("0", "1"), "0") == "1")
        out = vector_neuron_triton(weight, block, D, activation, float(eps), blocks, planar=layout == "planar",
                                   affine=affine, with_means=with_means, **extra)
        y, means = out if with_means else (out, None)
    else:
        lead = block.shape[: 1 + D]
        x = block.reshape(lead + (T,))
        if layout == "minor":
            y = _vn(weight, x, activation, eps, -1).reshape(block.shape)
        else:
            y = jnp.moveaxis(_vn(weight, jnp.moveaxis(x, -1, 1), activation, eps, 1), 1, -1).reshape(block.shape)
        means = None
    if late is None:
        return y, means
    return y + late, None  # the means, where the kernel took them, are y's without it


def component_dot(a: jax.Array, b: jax.Array, axis: int = -1) -> jax.Array:
    """sum_i a[.., i, ..] b[.., i, ..] over `axis`, keeping it (size 1): multiply-adds on
    slices, so XLA fuses it with the elementwise work around it."""
    at = lambda v, i: jax.lax.slice_in_dim(v, i, i + 1, axis=axis)  # noqa: E731
    out = at(a, 0) * at(b, 0)
    for i in range(1, a.shape[axis]):
        out = out + at(a, i) * at(b, i)
    return out


def _norm(d, axis):
    """|d| over the components' axis (kept), and the mask where it is positive."""
    squared = component_dot(d, d, axis)
    positive = squared > 0
    return jnp.sqrt(jnp.where(positive, squared, 1.0)) * positive, positive


def _h(activation, eps, s):
    return (activation(s) / (jnp.abs(s) + eps) - 1.0) * s


def _local(x, d, activation, eps, axis):
    n, positive = _norm(d, axis)
    u = d / (n + eps)
    s = component_dot(x, u, axis)
    return n, positive, u, s


def _forward(w, x, activation, eps, axis):
    d = _mix(w, x)
    _, _, u, s = _local(x, d, activation, eps, axis)
    parallel = s * u
    gain = activation(s) / (jnp.abs(s) + eps)
    return gain * parallel + (x - parallel), d


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _vn(w, x, activation, eps, axis):
    """x (c, ...) with its T components on `axis` (-1 or 1)."""
    return _forward(w, x, activation, eps, axis)[0]


def _vn_fwd(w, x, activation, eps, axis):
    y, d = _forward(w, x, activation, eps, axis)
    return y, (w, x, d)


def _vn_bwd(activation, eps, axis, res, gy):
    w, x, d = res
    n, positive, u, s = _local(x, d, activation, eps, axis)
    h, dh = jax.jvp(functools.partial(_h, activation, eps), (s,), (jnp.ones_like(s),))
    gs = component_dot(gy, u, axis) * dh
    gu = h * gy + gs * x
    scale = 1.0 / (n + eps)
    # d|d|/dd = d / |d|, taken as 0 at d = 0 (the safe norm's convention)
    inv_n = jnp.where(positive, 1.0 / jnp.where(positive, n, 1.0), 0.0)
    gd = gu * scale - component_dot(gu, d, axis) * (scale * scale * inv_n) * d
    gw, gx_mix = _mix_bwd((w, x), gd)
    return gw, (gy + gs * u + gx_mix).astype(x.dtype)


_vn.defvjp(_vn_fwd, _vn_bwd)
