"""Learn the gradient of a scalar field with an equivariant ResNet, stopping on validation loss.

Scalar field in, vector field out, on a 2D grid that is not a torus (zero padding at the edges).
The target is the finite-difference gradient (central differences inside, one-sided at the
edges), a rotation- and reflection-equivariant map, so an equivariant ResNet can learn it. Training
stops when the validation loss has not improved for a few epochs, or at an epoch cap; the model
returned is the one with the best validation loss. The loss curve is printed per epoch.

Run from the repository root:  PYTHONPATH=. python3 examples/learn_gradient_resnet.py
"""

import time

import jax
import jax.numpy as jnp
import optax

import ginjax.geometric as geom
import ginjax.ml as ml
import ginjax.models as models

D = 2
N = 16
SCALAR, VECTOR = ((), 0), ((False,), 0)


def smooth_fields(key, n_samples, n_modes=4):
    """Random sums of low-frequency waves (not periodic on the grid)."""
    k_freq, k_phase, k_amp = jax.random.split(key, 3)
    freqs = jax.random.uniform(k_freq, (n_samples, n_modes, D), minval=-2.5, maxval=2.5)
    phases = jax.random.uniform(k_phase, (n_samples, n_modes), maxval=2 * jnp.pi)
    amps = jax.random.normal(k_amp, (n_samples, n_modes)) / n_modes**0.5
    grid = jnp.stack(jnp.meshgrid(*[jnp.linspace(0, 2 * jnp.pi, N)] * D, indexing="ij"), -1)
    waves = jnp.cos(jnp.einsum("smd,xyd->smxy", freqs, grid) / 2 + phases[..., None, None])
    return jnp.einsum("sm,smxy->sxy", amps, waves)


def gradient_pair(key, n_samples):
    fields = smooth_fields(key, n_samples)
    grads = jnp.stack(jnp.gradient(fields, axis=(1, 2)), axis=-1)  # (samples, N, N, D)
    X = geom.MultiImage({SCALAR: fields[:, None]}, D, is_torus=False)
    Y = geom.MultiImage({VECTOR: grads[:, None]}, D, is_torus=False)
    return X, Y


def main():
    start = time.perf_counter()
    data_key, val_key, model_key, train_key = jax.random.split(jax.random.PRNGKey(1), 4)
    X, Y = gradient_pair(data_key, 64)
    X_val, Y_val = gradient_pair(val_key, 16)

    filters = geom.get_invariant_filters([3], [0, 1, 2], [0, 1], D, geom.make_all_operators(D))
    model = models.ResNet(
        D,
        geom.Signature(((SCALAR, 1),)),
        geom.Signature(((VECTOR, 1),)),
        depth=4,
        num_blocks=2,
        conv_filters=filters,
        key=model_key,
    )
    mapper = ml.Mapper([geom.Losses.SMSE])
    initial = ml.map_loss_in_batches(mapper, model, X_val, Y_val, 16, None)
    print(
        f"parameters: {models.count_params(model)}, initial validation loss: {float(initial):.6f}"
    )

    # stop once the validation loss has not dropped by 2e-4 for 3 epochs (or at 50 epochs);
    # the EpochStop's verbose=2 prints the loss curve, the ValLoss picks the model returned
    early_stop = ml.ValLoss(patience=3, min_delta=2e-4)
    stop = ml.AnyStop([early_stop, ml.EpochStop(50, verbose=2)])
    model, _, train_loss, val_loss, train_time = ml.train(
        X,
        Y,
        mapper,
        model,
        train_key,
        stop,
        batch_size=8,
        optimizer=optax.adam(3e-3),
        validation_X=X_val,
        validation_Y=Y_val,
    )
    best = ml.map_loss_in_batches(mapper, model, X_val, Y_val, 16, None)
    stopped_by = (
        "validation loss" if early_stop.epochs_since_best > early_stop.patience else "epoch cap"
    )
    print(f"stopped by the {stopped_by}; best model kept")
    print(
        f"first validation loss {float(initial):.6f} -> best {float(best):.6f} "
        f"(last epoch: val {float(val_loss):.6f}, train {float(train_loss):.6f}); "
        f"training {train_time:.1f}s, total {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
