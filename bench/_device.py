"""What the numbers were measured on: the device, its slug for results/<device-slug>/, the
precision mode, versions; and whether a ConvContract backend can run here."""

from __future__ import annotations

import re

import jax

import kernels


def slugify(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; used for results/<device-slug>/."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def device_info() -> dict:
    """What the numbers were measured on; goes into machine_info and every extra_info."""
    import jaxlib

    dev = jax.devices()[0]
    kind = str(getattr(dev, "device_kind", dev.platform))
    return {
        "platform": dev.platform,
        "device_kind": kind,
        "device_slug": slugify(kind),
        "device_count": jax.device_count(),
        # "9.0" on Hopper, "" on a CPU: a GPU without a measured table ranks by one of its capability
        "compute_capability": str(getattr(dev, "compute_capability", "") or ""),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        # the operand precision JAX's default matmul precision means for the kernels
        "precision": kernels.resolve_precision(None),
        "cuda_kernels": cuda_kernels(),
        "vector_neuron": vector_neuron_kernels(),
    }


def vector_neuron_kernels() -> str:
    """Which VectorNeuron kernels a model step runs by default here (ginjax._vector_neuron): the
    implementation, and for "cuda" its forward and backward kernels; the library's absence says
    so (its calls then take the Triton path)."""
    from ginjax import _vector_neuron

    impl = _vector_neuron.default_impl()
    means = "means on" if _vector_neuron.means_enabled() else "means off"
    if impl != "cuda":
        return f"{impl} ({means})" if impl == "triton" else impl
    from kernels import cuda
    from kernels.cuda import vector_neuron as vn

    ok, why = cuda.availability()
    if not ok:
        return f"triton where it covers a call ({means}; cuda asked for, not here: {why})"
    backward = "tensor-core backward for 16 channels" if vn.mma_enabled() else "FFMA backward"
    return f"cuda ({backward}, {vn.forward_impl()} forward, {means})"


def cuda_kernels() -> str:
    """Whether kernels/cuda's kernels ran under the `triton` backend's name (its forward, input
    gradient and weight gradient where they cover a layer), or why not: the rows say "triton"
    either way."""
    from kernels import cuda

    try:
        from kernels.triton._cuda_dispatch import forward_impl, weight_grad_impl
    except ImportError as err:  # no triton: no backend to run them under
        return f"not used: {err}"

    ok, why = cuda.availability()
    if not ok:
        return f"not used: {why}"
    directions = [what for what, impl in (("forward and input gradient", forward_impl()),
                                          ("weight gradient", weight_grad_impl())) if impl == "cuda"]
    if not directions:
        return "built, not used (GINJAX_TRITON_FORWARD=triton, GINJAX_TRITON_WEIGHT_GRAD=triton)"
    said = "triton's " + " and ".join(directions) + " where the CUDA kernels cover the layer"
    if forward_impl() == "cuda":
        from kernels.cuda._plan import twin_enabled
        from kernels.cuda.conv_contract import residuals_enabled

        said += (", residuals added in the forward's epilogue" if residuals_enabled()
                 else ", residuals added by XLA (GINJAX_CUDA_RESIDUAL=0)")
        said += ", rows of 32 on twin rings" if twin_enabled() else ", rows of 32 on one ring (GINJAX_CUDA_TWIN=0)"
    return said


def backend_runs_here(backend: str) -> tuple[bool, str]:
    """Whether a backend can run on this machine; the registry's reason when it cannot."""
    try:
        with kernels.use_backend(backend):
            pass
    except ValueError as err:
        return False, str(err)
    return True, "available"
