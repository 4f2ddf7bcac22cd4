"""Learn a composition of two invariant-filter convolutions with two ConvContract layers.

A hidden "teacher" (two ConvContract layers with fixed random weights) maps a scalar plus a vector
field to a vector field on a 2D torus. A "student" of the same shape, started from other random
weights, learns it from examples with ginjax.ml.train. The loss curve is printed per epoch.

Run from the repository root:  PYTHONPATH=. python3 examples/learn_conv_composition.py
"""

import time

import equinox as eqx
import jax
import optax

import ginjax.geometric as geom
import ginjax.layers as layers
import ginjax.ml as ml

D = 2
N = 16  # grid side
SCALAR, VECTOR = ((), 0), ((False,), 0)
IN_KEYS = geom.Signature(((SCALAR, 1), (VECTOR, 1)))
MID_KEYS = geom.Signature(((SCALAR, 2), (VECTOR, 2)))
OUT_KEYS = geom.Signature(((VECTOR, 1),))


class TwoConvs(eqx.Module):
    """conv2(conv1(x)): a linear, rotation- and reflection-equivariant map."""

    conv1: layers.ConvContract
    conv2: layers.ConvContract

    def __init__(self, filters, key):
        key1, key2 = jax.random.split(key)
        self.conv1 = layers.ConvContract(IN_KEYS, MID_KEYS, filters, use_bias=False, key=key1)
        self.conv2 = layers.ConvContract(MID_KEYS, OUT_KEYS, filters, use_bias=False, key=key2)

    def __call__(self, x, aux_data=None):
        return self.conv2(self.conv1(x)), aux_data


def random_fields(key, n_samples):
    k1, k2 = jax.random.split(key)
    return geom.MultiImage(
        {
            SCALAR: jax.random.normal(k1, (n_samples, 1, N, N)),
            VECTOR: jax.random.normal(k2, (n_samples, 1, N, N, D)),
        },
        D,
        is_torus=True,
    )


def main():
    start = time.perf_counter()
    filters = geom.get_invariant_filters([3], [0, 1, 2], [0, 1], D, geom.make_all_operators(D))
    teacher_key, student_key, data_key, val_key, train_key = jax.random.split(
        jax.random.PRNGKey(0), 5
    )
    teacher = TwoConvs(filters, teacher_key)
    student = TwoConvs(filters, student_key)

    X, X_val = random_fields(data_key, 64), random_fields(val_key, 16)
    label = jax.vmap(lambda x: teacher(x)[0])
    Y, Y_val = label(X), label(X_val)

    mapper = ml.Mapper([geom.Losses.SMSE])
    initial = ml.map_loss_in_batches(mapper, student, X_val, Y_val, 16, None)
    print(f"initial validation loss: {float(initial):.6f}")

    student, _, train_loss, val_loss, train_time = ml.train(
        X,
        Y,
        mapper,
        student,
        train_key,
        ml.EpochStop(30, verbose=2),  # prints one line per epoch: the loss curve
        batch_size=16,
        optimizer=optax.adam(optax.exponential_decay(3e-2, 30 * 4, 0.1)),
        validation_X=X_val,
        validation_Y=Y_val,
    )
    print(
        f"first validation loss {float(initial):.6f} -> last {float(val_loss):.6f} "
        f"(train {float(train_loss):.6f}); training {train_time:.1f}s, "
        f"total {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
