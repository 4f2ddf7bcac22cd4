"""The per-channel sums kernel on an NVIDIA GPU (`python3 -m pytest -m gpu
tests/test_channel_sums_triton_gpu.py`): the compiled kernel through the launcher's custom call
against float64 numpy on the ResNet's standard vector block (B=4, 16 channels, 64^3) and odd sizes,
bit-identical run to run, with a shift subtracted as the block is read, NaN propagated, each
reading its operands components-minor and component-planar; planar sums of a planar producer's
output with no relayout between them in the compiled HLO; and a jitted ResNet-like norm step
(vector group norm, value and gradients) with GINJAX_CHANNEL_SUMS=triton against the XLA path,
in either GINJAX_BLOCK_LAYOUT."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels import _layout, _reduce  # noqa: E402
from kernels.triton.channel_sums import channel_sums_triton  # noqa: E402

from ginjax._norm_stats import vector_group_norm  # noqa: E402

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from conftest import float64, rel_l2  # noqa: E402
from test_channel_sums_triton import LAYOUTS, TOL, _check  # noqa: E402


@LAYOUTS
@pytest.mark.parametrize("shape", [(4, 16, 64**3, 3), (3, 5, 7 * 9 * 11, 3), (2, 33, 37 * 41, 2), (4, 16, 64**3, 1)])
@pytest.mark.parametrize("two", [False, True])
def test_against_float64(shape, two, planar):
    rng = np.random.default_rng(sum(shape))
    a = rng.normal(0.5, 1.0, size=shape).astype(np.float32)
    b = rng.normal(size=shape).astype(np.float32)
    f = jax.jit(jax.vmap(lambda x, y: channel_sums_triton(x, y if two else None, planar=planar)))
    first, products = f(jnp.asarray(a), jnp.asarray(b))
    a64, b64 = a.astype(np.float64), (b if two else a).astype(np.float64)
    _check(first, a64.sum(axis=2))
    _check(products, np.einsum("ncpi,ncpj->ncij", a64, b64))
    again = f(jnp.asarray(a), jnp.asarray(b))
    for x, y in zip((first, products), again):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@LAYOUTS
@pytest.mark.parametrize("shape", [(4, 16, 64**3, 3), (3, 5, 7 * 9 * 11, 3)])
@pytest.mark.parametrize("two", [False, True])
def test_shift_against_float64(shape, two, planar):
    """A per-example (c, T) shift subtracted as the block is read: from b, and from a where b is
    a (the norms' statistics); ragged last tiles add nothing."""
    rng = np.random.default_rng(sum(shape) + 1)
    a = rng.normal(3.0, 1.0, size=shape).astype(np.float32)
    b = rng.normal(size=shape).astype(np.float32)
    s = rng.normal(3.0, 1.0, size=(shape[0], shape[1], shape[3])).astype(np.float32)
    f = jax.jit(jax.vmap(lambda x, y, z: channel_sums_triton(x, y if two else None, shift=z, planar=planar)))
    first, products = f(jnp.asarray(a), jnp.asarray(b), jnp.asarray(s))
    d = a.astype(np.float64) - s.astype(np.float64)[:, :, None]
    left = a.astype(np.float64) if two else d
    right = b.astype(np.float64) - s.astype(np.float64)[:, :, None] if two else d
    _check(first, left.sum(axis=2))
    _check(products, np.einsum("ncpi,ncpj->ncij", left, right))


@LAYOUTS
def test_nan_propagates(planar):
    a = np.ones((2, 3, 5000, 3), np.float32)
    a[1, 2, 4321, 1] = np.nan
    first, products = jax.jit(jax.vmap(lambda x: channel_sums_triton(x, planar=planar)))(jnp.asarray(a))
    assert np.isnan(np.asarray(first)[1, 2, 1]) and np.isfinite(np.asarray(first)[0]).all()
    assert np.isnan(np.asarray(products)[1, 2, 1]).all() and np.isfinite(np.asarray(products)[1, 1]).all()


@LAYOUTS
def test_planar_sums_of_a_planar_producer_need_no_relayout(planar):
    """The sums of a planar VectorNeuron kernel's output (B=4, 16 channels of 32^3 vectors, read as
    (16, P, 3) per example): read planar, nothing between the two custom calls in the compiled
    HLO is a copy, a transpose or a fusion holding one (the reshape is a bitcast); read
    components-minor, XLA must relayout the block, and the same check sees it."""
    from _vector_neuron_gpu import relayouts_next_to
    from kernels.triton import vector_neuron_triton

    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.uniform(-0.25, 0.25, size=(16, 16)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(4, 16, 32, 32, 32, 3)), jnp.float32)

    def f(w, x):
        y = jax.vmap(lambda b: vector_neuron_triton(w, b, 3, jax.nn.gelu, 1e-5, planar=True))(x)
        return jax.vmap(lambda b: channel_sums_triton(b.reshape(16, -1, 3), planar=planar))(y)

    text = jax.jit(f).lower(w, x).compile().as_text()
    sums, bad = relayouts_next_to(text, lambda name, line: "triton_kernel_call" in line
                                  and re.search(r"f32\[4,16,32768,3\]", line.split("custom-call(", 1)[-1]))
    assert len(sums) == 1, sums
    assert not bad if planar else bad, bad


# The block's gradient passes through eigh of the groups' covariances, which amplifies the fp32
# rounding of the statistics: the XLA path's own gradient is ~2e-5 from float64 on this step, and
# the fused sums' (a reduction tree of their own, either layout) lands anywhere near that. So the
# step is held to the float64 truth, no further from it than MARGIN times the XLA path (and TOL).
MARGIN = 3.0


@LAYOUTS
def test_vector_group_norm_step(monkeypatch, planar):
    monkeypatch.setenv(_layout.ENV, "planar" if planar else "minor")  # how the fused sums read the block
    rng = np.random.default_rng(4)
    block = jnp.asarray(rng.normal(1.0, 1.0, size=(4, 16, 32, 32, 32, 3)), jnp.float32)
    scale, bias = (jnp.asarray(rng.normal(size=16), jnp.float32) for _ in range(2))

    def loss(block, scale, bias):
        y = jax.vmap(lambda b: vector_group_norm(b, 4, 3, 1e-5, "eigh", scale, bias))(block)
        return jnp.sum(jnp.sin(y))

    def step(*args):
        leaves = jax.tree_util.tree_leaves(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args))
        return [np.asarray(x, np.float64) for x in leaves]

    monkeypatch.delenv(_reduce.SUMS_ENV, raising=False)
    assert _reduce.channel_sums_impl() == "triton"  # the default on a GPU
    assert _reduce.fused_sums_cover(block[0].reshape(16, -1, 3), products=True)
    with jax.default_matmul_precision("float32"):
        monkeypatch.setenv(_reduce.SUMS_ENV, "xla")
        xla = step(block, scale, bias)
        monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
        got = step(block, scale, bias)
    with float64():  # float64 operands take the XLA path whatever the switch says
        truth = step(*(a.astype(jnp.float64) for a in (block, scale, bias)))
    for name, g, x, t in zip(("value", "gblock", "gscale", "gbias"), got, xla, truth):
        assert np.isfinite(g).all(), name
        err, own = rel_l2(g, t), rel_l2(x, t)
        assert err <= max(TOL, MARGIN * own), f"{name}: {err:.2e} from float64 (the XLA path's: {own:.2e})"
