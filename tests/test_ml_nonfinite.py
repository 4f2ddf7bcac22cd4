"""ginjax.ml.train stops on a non-finite loss with an error naming the epoch and batch, whatever
the stop condition: it never returns NaN parameters or silently untrained weights."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ginjax.geometric as geom
from ginjax import ml

SCALAR = ((), 0)


class Scale(eqx.Module):
    w: jax.Array

    def __call__(self, x, aux_data=None):
        out = x.empty()
        out.append(SCALAR[0], SCALAR[1], self.w * x[SCALAR])
        return out, aux_data


def _data(n=8, bad_sample=None):
    x = np.linspace(1.0, 2.0, n * 4).reshape(n, 1, 2, 2).astype(np.float32)
    if bad_sample is not None:
        x[bad_sample] = np.nan
    X = geom.MultiImage({SCALAR: jnp.asarray(x)}, 2)
    return X, geom.MultiImage({SCALAR: 3.0 * jnp.asarray(x)}, 2)


MAPPER = ml.Mapper([geom.Losses.SMSE])


@pytest.mark.parametrize(
    "stop", [ml.EpochStop(3), ml.TrainLoss(patience=2)], ids=["EpochStop", "TrainLoss"]
)
def test_nan_in_the_data_stops_training_naming_epoch_and_batch(stop):
    X, Y = _data(bad_sample=5)  # batches of 2 in stored order: sample 5 is in batch 3
    with pytest.raises(FloatingPointError, match=r"batch 3 of 4 in epoch 1 is nan"):
        ml.train(X, Y, MAPPER, Scale(jnp.ones(())), None, stop, 2, optax.sgd(0.01))


def test_a_diverging_learning_rate_stops_at_the_first_infinite_loss():
    X, Y = _data()
    with pytest.raises(FloatingPointError, match=r"epoch \d+ is (inf|nan)"):
        ml.train(X, Y, MAPPER, Scale(jnp.ones(())), None, ml.EpochStop(200), 8, optax.sgd(1e4))


def test_finite_training_is_unchanged():
    X, Y = _data()
    model, _, loss, _, _ = ml.train(X, Y, MAPPER, Scale(jnp.ones(())), None, ml.EpochStop(30), 4, optax.sgd(0.05))
    assert np.isfinite(float(loss)) and abs(float(model.w) - 3.0) < 0.1
