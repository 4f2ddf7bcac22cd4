"""ConvContract on spatially split inputs equals the unsplit layer, values and gradients.

Run through tests/test_sharding.py (4 simulated CPU devices). Each case builds a layer, a random
batched MultiImage, and compares jit(value_and_grad) of a weighted sum of the outputs with respect
to the layer parameters and the input, sharded (inside kernels' spatial_sharding) and not.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import ginjax.geometric as geom
import kernels
from ginjax import layers
from kernels import _sharding

from _util import HaloSpy, check_close, hlo_text, mesh, weighted_sum
from conftest import filter_bank as filters

SCALAR, VECTOR = ((), 0), ((False,), 0)
SIG_IN = geom.Signature(((SCALAR, 2), (VECTOR, 2)))
SIG_OUT = geom.Signature(((SCALAR, 2), (VECTOR, 1)))


def image(D: int, n, is_torus, batch: int, seed: int, sig=SIG_IN) -> geom.MultiImage:
    n = (n,) * D if isinstance(n, int) else tuple(n)
    rng = np.random.default_rng(seed)
    blocks = {
        key: jnp.asarray(rng.standard_normal((batch, c) + n + (D,) * len(key[0])), jnp.float32)
        for key, c in sig
    }
    return geom.MultiImage(blocks, D, is_torus)


def layer(D: int, M: int = 3, backend: str = "dense", **geometry) -> layers.ConvContract:
    return layers.ConvContract(SIG_IN, SIG_OUT, filters(D, M), key=jr.PRNGKey(3), backend=backend, **geometry)


def loss_and_grads(conv, x):
    def loss(conv, x):
        y = jax.vmap(conv)(x)
        return weighted_sum(y), y

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(conv, x)


def compare(conv, x, m, axis_map, batch_axis=None, tol=1e-5):
    """Sharded and plain runs agree; returns the sharded outputs."""
    (value, y), grads = loss_and_grads(conv, x)
    layout = _sharding.make_layout(m, axis_map, batch_axis)
    x_sharded = layout.place(x, conv.D)
    with _sharding.spatial_sharding(m, axis_map, batch_axis), HaloSpy() as spy:
        (value_s, y_s), grads_s = loss_and_grads(conv, x_sharded)
    assert spy.calls > 0
    check_close(y_s, y, "outputs", tol)
    check_close(value_s, value, "loss", tol)
    check_close(grads_s, grads, "gradients", tol)
    return y_s, layout


def spec_of(block) -> tuple:
    spec = tuple(block.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def check_split(y, layout, D):
    """The outputs stay split as the inputs were: no gather at the end."""
    for key, block in y.items():
        assert spec_of(block) == tuple(layout.block_spec(block.ndim, D))[: len(spec_of(block))], key
        assert any(name is not None for name in spec_of(block)), (key, block.sharding)


# Each case splits two axes at once over a 2x2 mesh (one wraps, one zero-pads), so three cases
# split every axis of D=3 with both paddings, and one axis over all 4 devices.
@pytest.mark.parametrize(
    "D,axis_map,is_torus",
    [
        (2, {0: "a", 1: "b"}, (True, False)),
        (2, {0: "a", 1: "b"}, (False, True)),
        (2, {0: "a"}, (False, False)),
        (3, {0: "a", 1: "b"}, (True, False, True)),
        (3, {1: "a", 2: "b"}, (True, True, False)),
        (3, {0: "a", 2: "b"}, (False, True, True)),
        (3, {2: "a"}, (True, True, True)),
    ],
    ids=["2d-01-TZ", "2d-01-ZT", "2d-0-Z-4dev", "3d-01-TZ", "3d-12-TZ", "3d-02-ZT", "3d-2-T-4dev"],
)
def test_split_axes(D, axis_map, is_torus):
    m = mesh((2, 2), ("a", "b")) if len(axis_map) == 2 else mesh((4,), ("a",))
    x = image(D, 8, is_torus, batch=2, seed=sum(axis_map) + 10 * D)
    y, layout = compare(layer(D), x, m, axis_map)
    check_split(y, layout, D)


def test_halo_exchange_not_gather():
    """Only neighbours talk: the compiled program permutes halos and gathers nothing."""
    D, m = 3, mesh((4,), ("space",))
    conv = layer(D)
    x = image(D, 8, True, batch=1, seed=1)
    layout = _sharding.make_layout(m, {0: "space"})
    x = layout.place(x, D)
    with _sharding.spatial_sharding(m, {0: "space"}):
        text = hlo_text(lambda c, x: weighted_sum(jax.vmap(c)(x)), conv, x)
    assert "collective-permute" in text
    assert "all-gather" not in text


@pytest.mark.parametrize("is_torus", [True, False], ids=["torus", "zeros"])
def test_rhs_dilation_halo(is_torus):
    # rhs_dilation 2 with M=3: halos of 2 planes, the whole of each 2-plane shard
    conv = layer(2, rhs_dilation=2)
    compare(conv, image(2, 8, is_torus, 2, seed=4), mesh((4,), ("space",)), {1: "space"})


def test_stride_two():
    conv = layer(2, stride=2, padding="SAME")
    compare(conv, image(2, 8, False, 2, seed=5), mesh((4,), ("space",)), {0: "space"})


def test_transposed_upsampling():
    # the UNet's upsampling: M=2 filters, lhs_dilation 2, padding (1, 1): the grid doubles
    conv = layer(2, M=2, padding=((1, 1), (1, 1)), lhs_dilation=(2, 2))
    # 3e-5: the bias gradient is one fp32 sum over every output with cancellation, and the split
    # (sub-pixel GEMM per shard) sums it in another order (1.3e-5 seen on the CPU)
    y, _ = compare(conv, image(2, 8, True, 2, seed=6), mesh((4,), ("space",)), {0: "space"}, tol=3e-5)
    assert y.get_spatial_dims() == (16, 16)


def test_batch_times_space():
    D, m = 3, mesh((2, 2), ("batch", "space"))
    y, layout = compare(layer(D), image(D, 8, True, 4, seed=8), m, {1: "space"}, "batch")
    check_split(y, layout, D)
    assert all(spec_of(block)[0] == "batch" for block in y.values())


def test_explicit_mesh_axes():
    m = mesh((4,), ("space",), explicit=True)
    compare(layer(2), image(2, 8, False, 2, seed=9), m, {0: "space"})


def test_fused_backend_under_shard_map():
    """The Pallas kernels (interpret mode on CPU) run per shard: XLA could not split them."""
    if "pallas" not in kernels.available_backends():
        pytest.skip("the pallas backend is not available with this jax")
    conv = layer(2, backend="pallas")
    plain = layer(2, backend="dense")
    x = image(2, 4, True, 1, seed=11)  # 2 cells a shard: the interpreter's cost grows with the grid
    m = mesh((2,), ("space",))
    (value, y), grads = loss_and_grads(plain, x)
    x_sharded = _sharding.make_layout(m, {1: "space"}).place(x, 2)
    with _sharding.spatial_sharding(m, {1: "space"}):
        (value_s, y_s), grads_s = loss_and_grads(conv, x_sharded)
    tol = kernels.TOLERANCE["tf32"]  # the kernels' default precision against exact fp32
    check_close(y_s, y, "outputs", tol)
    check_close(grads_s, grads, "gradients", tol)


# ---- rejected layouts ---------------------------------------------------------------------
def _run(conv, x, m, axis_map, batch_axis=None):
    with _sharding.spatial_sharding(m, axis_map, batch_axis):
        return loss_and_grads(conv, x)


def test_grid_not_divisible_rejected():
    with pytest.raises(ValueError, match=r"spatial axis 0 \(=6\) is not divisible by the 4 devices of mesh axis 'space'"):
        _run(layer(2), image(2, 6, True, 1, seed=0), mesh((4,), ("space",)), {0: "space"})


def test_valid_padding_rejected():
    with pytest.raises(ValueError, match="cannot be split over the 4 devices"):
        _run(layer(2, padding="VALID"), image(2, 8, False, 1, seed=0), mesh((4,), ("space",)), {0: "space"})


def test_halo_wider_than_shard_rejected():
    with pytest.raises(ValueError, match="reaches 4 cells into the previous shard"):
        _run(layer(2, rhs_dilation=4), image(2, 8, True, 1, seed=0), mesh((4,), ("space",)), {0: "space"})


def test_batch_not_divisible_rejected():
    m = mesh((2, 2), ("batch", "space"))
    with pytest.raises(ValueError, match=r"vmapped batch \(=3\) is not divisible by the 2 devices of mesh axis 'batch'"):
        _run(layer(2), image(2, 8, True, 3, seed=0), m, {0: "space"}, "batch")


def test_axis_beyond_dimension_rejected():
    with pytest.raises(ValueError, match="names spatial axis 2, but the layer is 2-dimensional"):
        _run(layer(2), image(2, 8, True, 1, seed=0), mesh((4,), ("space",)), {2: "space"})


def test_place_rejects_uneven_blocks():
    layout = _sharding.make_layout(mesh((4,), ("space",)), {1: "space"})
    with pytest.raises(ValueError, match=r"spatial axis 1 \(=6\) of a block of shape \(1, 2, 8, 6\)"):
        layout.place(jnp.ones((1, 2, 8, 6)), 2)


def test_unused_mesh_axis_is_replicated():
    # a mesh axis the layout does not name holds copies; replicated inputs get split on entry
    m = mesh((2, 2), ("other", "space"))
    x = jax.device_put(image(2, 8, True, 2, seed=12), NamedSharding(m, PartitionSpec()))
    (value, y), grads = loss_and_grads(layer(2), x)
    with _sharding.spatial_sharding(m, {0: "space"}):
        (value_s, y_s), grads_s = loss_and_grads(layer(2), x)
    check_close((y_s, grads_s), (y, grads), "outputs and gradients")


# ---- how the layout reaches the layer -------------------------------------------------------
def test_step_jitted_before_the_block_is_traced_again():
    traces = []

    @jax.jit
    def forward(conv, x):
        traces.append(1)
        return jax.vmap(conv)(x)

    m = mesh((4,), ("space",))
    conv, x = layer(2), image(2, 8, True, 2, seed=13)
    x = _sharding.make_layout(m, {0: "space"}).place(x, 2)
    plain = forward(conv, x)
    with _sharding.spatial_sharding(m, {0: "space"}):
        sharded = forward(conv, x)
        assert len(traces) == 2  # traced again, not the stale plain trace
        assert "shard_map" in str(jax.make_jaxpr(forward)(conv, x))
    check_close(sharded, plain, "outputs")


def test_decorator_form_under_jit():
    m = mesh((4,), ("space",))
    conv, x = layer(3), image(3, 8, False, 1, seed=14)
    forward = lambda conv, x: jax.vmap(conv)(x)
    decorated = jax.jit(_sharding.spatial_sharding(m, {2: "space"})(forward))
    assert "shard_map" in str(jax.make_jaxpr(decorated)(conv, x))
    assert "shard_map" not in str(jax.make_jaxpr(forward)(conv, x))  # the block has ended
    check_close(decorated(conv, x), jax.jit(forward)(conv, x), "outputs")
