"""ginjax models on spatially split inputs equal the unsplit models, values and gradients.

Run through tests/test_sharding.py (4 simulated CPU devices). The UNet exercises MaxNormPool and
the transposed (lhs-dilated) upsampling convolution on split grids, GroupNorm reduces across
shards, the DilResNet's dilation 8 needs halos as wide as a whole shard. In float64: through
norms and residual stacks some gradients cancel to rounding noise, which float32 would blur.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import ginjax.geometric as geom
from ginjax import ml, models
from kernels import _sharding

from _util import HaloSpy, check_close, mesh, weighted_sum
from conftest import filter_bank as filters

SCALAR, VECTOR = ((), 0), ((False,), 0)
IN_SIG = geom.Signature(((SCALAR, 2), (VECTOR, 1)))
OUT_SIG = geom.Signature(((SCALAR, 1), (VECTOR, 1)))
TOL = 1e-10  # float64, same algorithm: only the summation order differs


@pytest.fixture(autouse=True)
def _float64():
    with jax.enable_x64(True):
        yield


def build(name: str, D: int, **kw):
    common = dict(equivariant=True, conv_filters=filters(D, 3), key=jr.PRNGKey(1))
    if name == "UNet":
        return models.UNet(
            D, IN_SIG, OUT_SIG, 2, num_conv=1, upsample_filters=filters(D, 2), **common, **kw
        )
    return getattr(models, name)(D, IN_SIG, OUT_SIG, 2, num_blocks=1, **common, **kw)


def image(D: int, n: int, is_torus: bool, batch: int, seed: int, sig=IN_SIG) -> geom.MultiImage:
    rng = np.random.default_rng(seed)
    blocks = {
        key: jnp.asarray(rng.standard_normal((batch, c) + (n,) * D + (D,) * len(key[0])), jnp.float64)
        for key, c in sig
    }
    return geom.MultiImage(blocks, D, is_torus)


def loss_and_grads(model, x):
    def loss(model, x):
        y = jax.vmap(lambda x: model(x)[0])(x)
        return weighted_sum(y), y

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True))(model, x)


def compare(model, x, m, axis_map, batch_axis=None):
    (value, y), grads = loss_and_grads(model, x)
    x_sharded = _sharding.make_layout(m, axis_map, batch_axis).place(x, x.D)
    with _sharding.spatial_sharding(m, axis_map, batch_axis), HaloSpy() as spy:
        (value_s, y_s), grads_s = loss_and_grads(model, x_sharded)
    assert spy.calls > 0
    check_close(y_s, y, "outputs", TOL)
    check_close(value_s, value, "loss", TOL)
    check_close(grads_s, grads, "gradients", TOL, whole=True)


def test_unet_3d_zero_padding():
    model = build("UNet", 3, num_downsamples=1, use_group_norm=True)
    compare(model, image(3, 8, False, 1, seed=2), mesh((4,), ("space",)), {2: "space"})


def test_resnet_groupnorm():
    model = build("ResNet", 2, use_group_norm=True)
    compare(model, image(2, 8, False, 2, seed=3), mesh((4,), ("space",)), {1: "space"})


def test_dilresnet_halo_of_a_whole_shard():
    model = build("DilResNet", 2)  # dilations up to 8: halos of 8 cells = a whole shard
    compare(model, image(2, 16, True, 1, seed=4), mesh((2,), ("space",)), {0: "space"})


def test_lax_path_without_the_block():
    """With the lax backends XLA splits the whole model by itself from the input shardings."""
    model = build("UNet", 2, num_downsamples=1, use_group_norm=True)
    x = image(2, 8, True, 2, seed=5)
    (value, y), grads = loss_and_grads(model, x)
    m = mesh((2, 2), ("batch", "space"))
    x_sharded = _sharding.make_layout(m, {1: "space"}, "batch").place(x, 2)
    with HaloSpy() as spy:
        (value_s, y_s), grads_s = loss_and_grads(model, x_sharded)
    assert spy.calls == 0
    check_close((y_s, value_s), (y, value), "outputs", TOL)
    check_close(grads_s, grads, "gradients", TOL, whole=True)


def test_unet_ginjax_ml_train_step_batch_times_space():
    """ginjax.ml's own step (its vmap is named "batch", like the mesh axis) on data split over
    batch x space, with GroupNorm: the SGD update is minus the gradient."""
    model = build("UNet", 2, num_downsamples=1, use_group_norm=True)
    x, y = image(2, 8, True, 2, seed=6), image(2, 8, True, 2, seed=7, sig=OUT_SIG)
    optim = optax.sgd(1.0)
    mapper = ml.Mapper([geom.Losses.SMSE])

    def step(x, y):
        opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
        new_model, _, loss, _ = ml.train_step(mapper, model, optim, opt_state, x, y)
        delta = jax.tree_util.tree_map(
            lambda a, b: a - b, eqx.filter(new_model, eqx.is_inexact_array), eqx.filter(model, eqx.is_inexact_array)
        )
        return delta, loss

    plain_delta, plain_loss = step(x, y)
    m = mesh((2, 2), ("batch", "space"))
    layout = _sharding.make_layout(m, {0: "space"}, "batch")
    with _sharding.spatial_sharding(m, {0: "space"}, "batch"), HaloSpy() as spy:
        delta, loss = step(layout.place(x, 2), layout.place(y, 2))
    assert spy.calls > 0  # ginjax.ml's jitted step was traced again inside the block
    check_close(loss, plain_loss, "loss", TOL)
    check_close(delta, plain_delta, "SGD updates", TOL, whole=True)
