"""The per-channel sums kernel on an NVIDIA GPU (`python3 -m pytest -m gpu
tests/test_channel_sums_triton_gpu.py`): the compiled kernel through the launcher's custom call
against float64 numpy on the ResNet's standard vector block (B=4, 16 channels, 64^3) and odd sizes,
bit-identical run to run, with a shift subtracted as the block is read, NaN propagated; and a jitted ResNet-like norm step (vector group norm,
value and gradients) with GINJAX_CHANNEL_SUMS=triton against the XLA path."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels import _reduce  # noqa: E402
from kernels.triton.channel_sums import channel_sums_triton  # noqa: E402

from ginjax._norm_stats import vector_group_norm  # noqa: E402

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from test_channel_sums_triton import _check  # noqa: E402


@pytest.mark.parametrize("shape", [(4, 16, 64**3, 3), (3, 5, 7 * 9 * 11, 3), (2, 33, 37 * 41, 2), (4, 16, 64**3, 1)])
@pytest.mark.parametrize("two", [False, True])
def test_against_float64(shape, two):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(0.5, 1.0, size=shape).astype(np.float32)
    b = rng.normal(size=shape).astype(np.float32)
    f = jax.jit(jax.vmap(lambda x, y: channel_sums_triton(x, y if two else None)))
    first, products = f(jnp.asarray(a), jnp.asarray(b))
    a64, b64 = a.astype(np.float64), (b if two else a).astype(np.float64)
    _check(first, a64.sum(axis=2))
    _check(products, np.einsum("ncpi,ncpj->ncij", a64, b64))
    again = f(jnp.asarray(a), jnp.asarray(b))
    for x, y in zip((first, products), again):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("shape", [(4, 16, 64**3, 3), (3, 5, 7 * 9 * 11, 3)])
@pytest.mark.parametrize("two", [False, True])
def test_shift_against_float64(shape, two):
    """A per-example (c, T) shift subtracted as the block is read: from b, and from a where b is
    a (the norms' statistics); ragged last tiles add nothing."""
    rng = np.random.default_rng(sum(shape) + 1)
    a = rng.normal(3.0, 1.0, size=shape).astype(np.float32)
    b = rng.normal(size=shape).astype(np.float32)
    s = rng.normal(3.0, 1.0, size=(shape[0], shape[1], shape[3])).astype(np.float32)
    f = jax.jit(jax.vmap(lambda x, y, z: channel_sums_triton(x, y if two else None, shift=z)))
    first, products = f(jnp.asarray(a), jnp.asarray(b), jnp.asarray(s))
    d = a.astype(np.float64) - s.astype(np.float64)[:, :, None]
    left = a.astype(np.float64) if two else d
    right = b.astype(np.float64) - s.astype(np.float64)[:, :, None] if two else d
    _check(first, left.sum(axis=2))
    _check(products, np.einsum("ncpi,ncpj->ncij", left, right))


def test_nan_propagates():
    a = np.ones((2, 3, 5000, 3), np.float32)
    a[1, 2, 4321, 1] = np.nan
    first, products = jax.jit(jax.vmap(channel_sums_triton))(jnp.asarray(a))
    assert np.isnan(np.asarray(first)[1, 2, 1]) and np.isfinite(np.asarray(first)[0]).all()
    assert np.isnan(np.asarray(products)[1, 2, 1]).all() and np.isfinite(np.asarray(products)[1, 1]).all()


def test_vector_group_norm_step(monkeypatch):
    rng = np.random.default_rng(4)
    block = jnp.asarray(rng.normal(1.0, 1.0, size=(4, 16, 32, 32, 32, 3)), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))

    def loss(block, scale, bias):
        y = jax.vmap(lambda b: vector_group_norm(b, 4, 3, 1e-5, "eigh", scale, bias))(block)
        return jnp.sum(jnp.sin(y))

    step = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(block, scale, bias)
    monkeypatch.delenv(_reduce.SUMS_ENV, raising=False)
    assert _reduce.channel_sums_impl() == "triton"  # the default on a GPU
    assert _reduce.fused_sums_cover(block[0].reshape(16, -1, 3), products=True)
    with jax.default_matmul_precision("float32"):
        monkeypatch.setenv(_reduce.SUMS_ENV, "xla")
        want = step()
        monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
        got = step()
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        _check(x, np.asarray(y, np.float64))
