"""Quickstart: train an equivariant 3D UNet on a synthetic vector field.

The task: predict one explicit diffusion step of a random vector field on a periodic 16^3 grid.
Diffusion commutes with rotations and reflections, so an equivariant UNet can learn it exactly.
Every ConvContract in the model runs on the fastest backend for this machine (fused kernels on
a GPU, one dense convolution on a CPU); force one with GINJAX_BACKEND=reference|dense|triton|pallas.

    python examples/unet_3d_quickstart.py        # about half a minute on a laptop CPU
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import optax

import ginjax.geometric as geom
from ginjax import models

D, N, BATCH, STEPS = 3, 16, 4, 30
VECTOR = ((False,), 0)  # the key (k=1, parity 0) of a polar vector field


def make_batch(key: jax.Array) -> tuple[geom.MultiImage, geom.MultiImage]:
    """Random vector fields (BATCH, 1 channel, N, N, N, D) and their diffused versions."""
    v = jr.normal(key, (BATCH, 1, N, N, N, D))
    laplacian = sum(jnp.roll(v, s, axis=a) for a in (2, 3, 4) for s in (1, -1)) - 2 * D * v
    x = geom.MultiImage({VECTOR: v}, D, is_torus=True)
    y = geom.MultiImage({VECTOR: v + 0.1 * laplacian}, D, is_torus=True)
    return x, y


def loss_fn(model: models.UNet, x: geom.MultiImage, y: geom.MultiImage) -> jax.Array:
    pred, _ = jax.vmap(model)(x)  # models are unbatched; vmap over the batch axis
    return jnp.mean((pred[VECTOR] - y[VECTOR]) ** 2)


def main() -> None:
    start = time.perf_counter()
    operators = geom.make_all_operators(D)  # the 48 rotations and reflections of the cube
    conv_filters = geom.get_invariant_filters([3], [0, 1, 2], [0], D, operators)
    upsample_filters = geom.get_invariant_filters([2], [0, 1, 2], [0], D, operators)

    signature = geom.Signature(((VECTOR, 1),))  # one vector channel in and out
    model_key, data_key = jr.split(jr.PRNGKey(0))
    model = models.UNet(
        D,
        signature,
        signature,
        depth=4,
        num_downsamples=2,
        num_conv=1,
        conv_filters=conv_filters,
        upsample_filters=upsample_filters,
        key=model_key,
    )
    print(f"3D UNet with {models.count_params(model)} parameters ({time.perf_counter() - start:.1f} s)")

    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    for step in range(STEPS):
        data_key, batch_key = jr.split(data_key)
        x, y = make_batch(batch_key)
        model, opt_state, loss = train_step(model, opt_state, x, y)
        if step % 5 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {float(loss):.5f}  ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
