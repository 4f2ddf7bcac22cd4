"""ginjax.ml losses against direct numpy computations on fresh random MultiImages."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ginjax.geometric as geom
from ginjax import ml

D = 2
SPATIAL = (5, 6)
# key -> channels: scalars, pseudo-vectors and 2-tensors together
LAYOUT = {((), 0): 4, ((False,), 1): 2, ((False, False), 0): 2}
BATCH = 3


def random_blocks(rng, layout=LAYOUT, batch=BATCH, spatial=SPATIAL, d=D):
    return {
        key: rng.normal(size=(batch, c) + spatial + (d,) * len(key[0])).astype(np.float32)
        for key, c in layout.items()
    }


def as_multi_image(blocks, d=D):
    return geom.MultiImage({k: jnp.asarray(v) for k, v in blocks.items()}, d, False)


@pytest.fixture
def pair(rng):
    x, y = random_blocks(rng), random_blocks(rng)
    return x, y, as_multi_image(x), as_multi_image(y)


def reduce_np(per_sample, reduce):
    return {"mean": per_sample.mean(0), "sum": per_sample.sum(0), None: per_sample}[reduce]


# ---- numpy references, written pixel by pixel / channel by channel -------------------------


def np_smse(x, y):
    n_pixels = np.prod(SPATIAL)
    return np.array(
        [
            sum(((x[k][b] - y[k][b]).astype(np.float64) ** 2).sum() for k in x) / n_pixels
            for b in range(BATCH)
        ]
    )


def pixel_tensor_norm(block_bc):
    """(spatial..., tensor...) -> (spatial...) Frobenius norms."""
    flat = block_bc.reshape(SPATIAL + (-1,)).astype(np.float64)
    return np.sqrt((flat**2).sum(-1))


def np_normalized_smse(x, y, eps):
    n_pixels = np.prod(SPATIAL)
    out = np.zeros(BATCH)
    for b in range(BATCH):
        for k in x:
            n_tensor = len(k[0])
            for c in range(x[k].shape[1]):
                sq_norm = pixel_tensor_norm(y[k][b, c]) ** 2
                sq_norm = sq_norm.reshape(SPATIAL + (1,) * n_tensor)
                out[b] += ((x[k][b, c] - y[k][b, c]) ** 2 / (sq_norm + eps)).sum()
    return out / n_pixels


def np_nrmse(x, y, eps):
    out = np.zeros(BATCH)
    for b in range(BATCH):
        ratios = []
        for k in x:
            for c in range(x[k].shape[1]):
                diff = np.linalg.norm((x[k][b, c] - y[k][b, c]).astype(np.float64).ravel())
                ratios.append(diff / (np.linalg.norm(y[k][b, c].astype(np.float64).ravel()) + eps))
        out[b] = np.mean(ratios)
    return out


def np_nrmse_per_pixel(x, y, eps):
    out = np.zeros(BATCH)
    for b in range(BATCH):
        ratios = []
        for k in x:
            for c in range(x[k].shape[1]):
                rel = pixel_tensor_norm(x[k][b, c] - y[k][b, c]) / (
                    pixel_tensor_norm(y[k][b, c]) + eps
                )
                ratios.extend(rel.ravel())
        out[b] = np.mean(ratios)
    return out


def np_timestep_smse(x, y, n_steps):
    out = np.zeros((BATCH, n_steps))
    for k in x:
        for c in range(x[k].shape[1]):
            step = c % n_steps  # channels are laid out (field, step), step fastest
            diff = (x[k][:, c] - y[k][:, c]).astype(np.float64) ** 2
            out[:, step] += diff.reshape(BATCH, -1).sum(1)
    return out / np.prod(SPATIAL)


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
def test_smse_loss_matches_numpy(pair, reduce):
    x, y, mx, my = pair
    got = ml.smse_loss(mx, my, reduce)
    np.testing.assert_allclose(got, reduce_np(np_smse(x, y), reduce), rtol=1e-5)
    assert np.shape(got) == (() if reduce else (BATCH,))


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
@pytest.mark.parametrize("eps", [1e-5, 0.3])
def test_normalized_smse_loss_matches_numpy(pair, reduce, eps):
    x, y, mx, my = pair
    got = ml.normalized_smse_loss(mx, my, reduce=reduce, eps=eps)
    np.testing.assert_allclose(got, reduce_np(np_normalized_smse(x, y, eps), reduce), rtol=1e-4)


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_nrmse_and_l2_rel_error_match_numpy(pair, reduce, eps):
    x, y, mx, my = pair
    expected = reduce_np(np_nrmse(x, y, eps), reduce)
    np.testing.assert_allclose(ml.nrmse_loss(mx, my, reduce, eps), expected, rtol=1e-5)
    np.testing.assert_allclose(ml.l2_rel_error(mx, my, reduce, eps), 100 * expected, rtol=1e-5)


@pytest.mark.parametrize("reduce", ["mean", "sum", None])
@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_nrmse_per_pixel_and_l2_per_pixel_match_numpy(pair, reduce, eps):
    x, y, mx, my = pair
    expected = reduce_np(np_nrmse_per_pixel(x, y, eps), reduce)
    np.testing.assert_allclose(ml.nrmse_per_pixel_loss(mx, my, reduce, eps), expected, rtol=1e-5)
    np.testing.assert_allclose(
        ml.l2_per_pixel_rel_error(mx, my, reduce, eps), 100 * expected, rtol=1e-5
    )


@pytest.mark.parametrize("reduce", ["mean", "sum", "max", None])
def test_timestep_smse_loss_matches_numpy(pair, reduce):
    x, y, mx, my = pair  # every key has an even channel count: 2 steps
    per_step = np_timestep_smse(x, y, 2)
    if reduce == "max":
        expected = per_step[np.argmax(per_step.sum(1))]
    else:
        expected = reduce_np(per_step, reduce)
    np.testing.assert_allclose(ml.timestep_smse_loss(mx, my, 2, reduce), expected, rtol=1e-5)
    # one step is the plain smse loss
    np.testing.assert_allclose(
        ml.timestep_smse_loss(mx, my, 1, "mean")[0], ml.smse_loss(mx, my), rtol=1e-5
    )


def test_losses_pair_keys_by_name_not_insertion_order(pair):
    x, y, mx, _ = pair
    reordered_y = as_multi_image({k: y[k] for k in reversed(list(y))})
    np.testing.assert_allclose(ml.smse_loss(mx, reordered_y), np_smse(x, y).mean(), rtol=1e-5)
    np.testing.assert_allclose(ml.nrmse_loss(mx, reordered_y), np_nrmse(x, y, 0).mean(), rtol=1e-5)


def test_losses_trace_under_jit_and_grad(pair):
    x, y, mx, my = pair
    np.testing.assert_allclose(jax.jit(ml.smse_loss)(mx, my), np_smse(x, y).mean(), rtol=1e-5)
    # d smse / d x = 2 (x - y) / (batch * pixels)
    grad = jax.grad(ml.smse_loss)(mx, my)
    key = ((False,), 1)
    np.testing.assert_allclose(
        grad[key], 2 * (x[key] - y[key]) / (BATCH * np.prod(SPATIAL)), rtol=1e-5, atol=1e-8
    )


def test_three_dimensional_vectors(rng):
    layout = {((False,), 0): 2}
    x, y = (random_blocks(rng, layout, 2, (3, 4, 2), 3) for _ in range(2))
    mx, my = as_multi_image(x, 3), as_multi_image(y, 3)
    expected = np.array([((x[k][b] - y[k][b]) ** 2).sum() / 24 for b in range(2) for k in x])
    np.testing.assert_allclose(ml.smse_loss(mx, my, None), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "loss",
    [
        ml.smse_loss,
        ml.normalized_smse_loss,
        ml.nrmse_loss,
        ml.nrmse_per_pixel_loss,
        ml.l2_rel_error,
        ml.l2_per_pixel_rel_error,
    ],
)
def test_bad_reduce_is_rejected(pair, loss):
    _, _, mx, my = pair
    with pytest.raises(ValueError, match=r"`reduce` \(='median'\)"):
        loss(mx, my, reduce="median")


def test_mismatched_inputs_are_rejected(pair, rng):
    x, y, mx, my = pair
    missing = as_multi_image({k: v for k, v in y.items() if k != ((), 0)})
    with pytest.raises(ValueError, match="same \\(k, parity\\) keys"):
        ml.smse_loss(mx, missing)
    unbatched = geom.MultiImage({k: jnp.asarray(v[0]) for k, v in x.items()}, D, False)
    with pytest.raises(ValueError, match="batch, channels"):
        ml.nrmse_loss(unbatched, unbatched)
    fewer_channels = as_multi_image({**y, ((), 0): y[((), 0)][:, :2]})
    with pytest.raises(ValueError, match="shapes differ"):
        ml.smse_loss(mx, fewer_channels)
    with pytest.raises(ValueError, match="not a multiple of `n_steps` \\(=3\\)"):
        ml.timestep_smse_loss(mx, my, 3)
    with pytest.raises(ValueError, match="`n_steps` \\(=0\\)"):
        ml.timestep_smse_loss(mx, my, 0)


# ---- Mapper -----------------------------------------------------------------------------------


class ScaleModel(eqx.Module):
    """Multiplies every block by its own learnable scale; leaves aux_data alone."""

    scales: dict

    def __call__(self, x, aux_data=None):
        out = x.empty()
        for key, block in x.items():
            out.append(key[0], key[1], block * self.scales[key])
        return out, aux_data


def test_mapper_matches_the_loss_functions(pair, rng):
    x, y, mx, my = pair
    scales = {k: jnp.float32(rng.uniform(0.5, 1.5)) for k in LAYOUT}
    model = ScaleModel(scales)
    prediction = {k: x[k] * np.float32(scales[k]) for k in x}

    mapper = ml.Mapper([geom.Losses.SMSE])
    loss, aux = mapper(model, mx, my)
    assert aux is None
    np.testing.assert_allclose(loss, np_smse(prediction, y).mean(), rtol=1e-5)

    multi = ml.Mapper(
        [geom.Losses.NRMSE, geom.Losses.L2_REL_PER_PIXEL, geom.Losses.SMSE], reduce=None, eps=0.1
    )
    losses, _ = multi(model, mx, my)
    assert losses.shape == (BATCH, 3)
    np.testing.assert_allclose(losses[:, 0], np_nrmse(prediction, y, 0.1), rtol=1e-5)
    np.testing.assert_allclose(
        losses[:, 1], 100 * np_nrmse_per_pixel(prediction, y, 0.1), rtol=1e-5
    )
    np.testing.assert_allclose(losses[:, 2], np_smse(prediction, y), rtol=1e-5)


def test_mapper_residual_adds_last_input_channel(pair):
    x, _, mx, _ = pair
    model = ScaleModel({k: jnp.float32(2.0) for k in LAYOUT})
    prediction, _ = ml.Mapper([geom.Losses.SMSE], residual=True).map(model, mx)
    for key in LAYOUT:
        np.testing.assert_allclose(prediction[key], x[key][:, -1:] + 2.0 * x[key], rtol=1e-6)


def test_mapper_rejects_bad_arguments():
    with pytest.raises(ValueError, match="`losses` \\(=\\[\\]\\)"):
        ml.Mapper([])
    with pytest.raises(ValueError, match="not a geom.Losses member"):
        ml.Mapper(["smse"])
    with pytest.raises(ValueError, match="`reduce` \\(='max'\\)"):
        ml.Mapper([geom.Losses.SMSE], reduce="max")
