"""What the CUDA ConvContract kernels' GPU tests share (tests/test_conv_contract_cuda_gpu.py,
test_conv_contract_cuda_dw_gpu.py, test_conv_contract_cuda_d2_gpu.py,
test_conv_contract_cuda_dw_d2_gpu.py): the marks that keep them to a GPU machine, the kernel
switches they pin in the environment, and the compute-sanitizer they need."""

from __future__ import annotations

import shutil

import pytest

import jax

from kernels.cuda import _plan

# a module's `pytestmark`: selected by -m gpu, and skipped where JAX has no GPU backend
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU"),
]


def both_layouts_fixture(*switches_on):
    """An autouse fixture `layout` (assign it to a module's `layout`) that runs every test of the
    module in both layouts of the vector blocks in memory (GINJAX_CUDA_LAYOUT): components minor,
    and component-planar (kernels/_layout.py's default on a GPU); it returns the layout. The
    kernel switches `switches_on` (environment variables, on by default) are pinned to 1 against
    a user's =0."""

    @pytest.fixture(autouse=True, params=["minor", "planar"])
    def layout(request, monkeypatch):
        monkeypatch.setenv(_plan.LAYOUT_ENV, request.param)
        for env in switches_on:
            monkeypatch.setenv(env, "1")
        return request.param

    return layout


def pin_2d_kernels(monkeypatch):
    """The D = 2 kernels' tests run in the planar layout with the dilated, x-window,
    narrow-window and channel-group kernels on (pinned against a user's =0; the 2D channel groups
    are opt-in, correct but slower than the default path on most 2D layers measured)."""
    monkeypatch.setenv(_plan.LAYOUT_ENV, "planar")
    for env in (_plan.DILATED_ENV, _plan.X_WINDOWS_ENV, _plan.NARROW_WINDOWS_ENV, _plan.CHANNEL_GROUPS_ENV,
                _plan.CHANNEL_GROUPS_2D_ENV):
        monkeypatch.setenv(env, "1")


def require_compute_sanitizer():
    """Fail (not skip) without compute-sanitizer: the GPU machine has it, so a missing one is an
    error of the set-up, not a test to pass over."""
    if shutil.which("compute-sanitizer") is None:
        pytest.fail("compute-sanitizer is not installed: the GPU machine has it")
