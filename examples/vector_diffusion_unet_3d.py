"""Learn one step of 3D vector diffusion with an equivariant UNet.

Each sample is a smooth random vector field u on a periodic 8^3 grid; the target is one explicit
diffusion step u + nu * Laplacian(u), each component diffusing on its own (7-point stencil). The
map commutes with rotations and reflections of the grid, so an equivariant UNet can learn it.
The Mapper is residual: the model predicts the change nu * Laplacian(u). The loss curve is printed.

Run from the repository root:  PYTHONPATH=. python3 examples/vector_diffusion_unet_3d.py
"""

import time

import jax
import jax.numpy as jnp
import optax

import ginjax.geometric as geom
import ginjax.ml as ml
import ginjax.models as models

D = 3
N = 8
NU = 0.1  # diffusion number nu = kappa * dt / dx^2, stable below 1/6
VECTOR = ((False,), 0)


def smooth_vector_fields(key, n_samples, max_freq=2):
    """Random periodic fields from a few low Fourier modes per component."""
    k_coef, k_phase = jax.random.split(key)
    freqs = jnp.stack(
        jnp.meshgrid(*[jnp.arange(-max_freq, max_freq + 1)] * D, indexing="ij"), -1
    ).reshape(-1, D)
    coefs = jax.random.normal(k_coef, (n_samples, D, len(freqs))) / len(freqs) ** 0.5
    phases = jax.random.uniform(k_phase, (n_samples, D, len(freqs)), maxval=2 * jnp.pi)
    grid = jnp.stack(jnp.meshgrid(*[jnp.arange(N)] * D, indexing="ij"), -1) * (2 * jnp.pi / N)
    angles = jnp.einsum("fd,xyzd->fxyz", freqs, grid)
    fields = jnp.einsum("scf,scfxyz->sxyzc", coefs, jnp.cos(angles + phases[..., None, None, None]))
    return fields  # (samples, N, N, N, D)


def diffusion_step(u):
    """u + nu * periodic 7-point Laplacian, applied to every vector component."""
    laplacian = sum(jnp.roll(u, s, axis=a) for a in (1, 2, 3) for s in (1, -1)) - 2 * D * u
    return u + NU * laplacian


def make_pair(key, n_samples):
    u = smooth_vector_fields(key, n_samples)
    return (
        geom.MultiImage({VECTOR: u[:, None]}, D, is_torus=True),
        geom.MultiImage({VECTOR: diffusion_step(u)[:, None]}, D, is_torus=True),
    )


def main():
    start = time.perf_counter()
    data_key, val_key, model_key, train_key = jax.random.split(jax.random.PRNGKey(2), 4)
    X, Y = make_pair(data_key, 32)
    X_val, Y_val = make_pair(val_key, 8)

    operators = geom.make_all_operators(D)
    conv_filters = geom.get_invariant_filters([3], [0, 1, 2], [0, 1], D, operators)
    upsample_filters = geom.get_invariant_filters([2], [0, 1, 2], [0, 1], D, operators)
    signature = geom.Signature(((VECTOR, 1),))
    model = models.UNet(
        D,
        signature,
        signature,
        depth=2,
        num_downsamples=1,
        num_conv=1,
        conv_filters=conv_filters,
        upsample_filters=upsample_filters,
        key=model_key,
    )
    mapper = ml.Mapper([geom.Losses.SMSE], residual=True)
    initial = ml.map_loss_in_batches(mapper, model, X_val, Y_val, 8, None)
    print(
        f"parameters: {models.count_params(model)}, initial validation loss: {float(initial):.6f}"
    )

    model, _, train_loss, val_loss, train_time = ml.train(
        X,
        Y,
        mapper,
        model,
        train_key,
        ml.EpochStop(16, verbose=2),  # one line per epoch: the loss curve
        batch_size=8,
        optimizer=optax.adam(3e-2),
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
