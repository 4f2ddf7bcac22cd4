"""The fused backends under the spatial split, on the GPUs of this machine (2 or more).

    PYTHONPATH=. python3 tests/sharded/gpu_check.py

A CPU dry run (Pallas interpreter, 4 simulated devices): GPU_CHECK_N=8 GPU_CHECK_BACKENDS=pallas
XLA_FLAGS=--xla_force_host_platform_device_count=4. (Triton's CPU interpreter, a host callback,
deadlocks inside a multi-device CPU program; on GPUs Triton kernels are plain custom calls.)

For each fused backend that runs here: a D=3 ConvContract (scalar+vector keys, 8 channels, batch
2, 32^3) split along each axis over all GPUs, torus and zero padding, value and gradients against
the unsplit `dense` backend at the same (default) precision. With 4 GPUs also batch x space.
Prints one line per case and which backend each shard ran; exits 1 on any mismatch.
"""

from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.join(os.path.dirname(__file__), "..")]

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import ginjax.geometric as geom  # noqa: E402
import kernels  # noqa: E402
from ginjax import layers  # noqa: E402
from kernels import _registry, _sharding  # noqa: E402

from _util import mesh, weighted_sum  # noqa: E402
from conftest import fixture_filters  # noqa: E402

SCALAR, VECTOR = ((), 0), ((False,), 0)
SIG = geom.Signature(((SCALAR, 8), (VECTOR, 8)))
TOL = 10 * kernels.TOLERANCE["tf32"]  # two different tf32 computations against each other


def image(n: int, is_torus: bool, batch: int, seed: int) -> geom.MultiImage:
    rng = np.random.default_rng(seed)
    blocks = {
        key: jnp.asarray(rng.standard_normal((batch, c) + (n,) * 3 + (3,) * len(key[0])), jnp.float32)
        for key, c in SIG
    }
    return geom.MultiImage(blocks, 3, is_torus)


def loss_and_grads(conv, x):
    loss = lambda conv, x: weighted_sum(jax.vmap(conv)(x))
    return eqx.filter_jit(eqx.filter_value_and_grad(loss))(conv, x)


def rel(a, b) -> float:
    la = jax.tree_util.tree_leaves(eqx.filter(a, eqx.is_array))
    lb = jax.tree_util.tree_leaves(eqx.filter(b, eqx.is_array))
    num = sum(float(np.sum((np.asarray(u, np.float64) - np.asarray(v, np.float64)) ** 2)) for u, v in zip(la, lb))
    den = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in lb)
    return (num / den) ** 0.5


def main() -> int:
    n_gpu = jax.device_count()
    print("devices:", jax.devices(), "backends:", kernels.available_backends(), flush=True)
    if n_gpu < 2:
        print("needs 2 or more devices")
        return 1
    filters = geom.MultiImage(
        {((False,) * k, p): jnp.asarray(a) for (k, p), a in sorted(fixture_filters(3, 3).items())}, 3
    )
    failures = 0
    wanted = os.environ.get("GPU_CHECK_BACKENDS", "triton,pallas").split(",")
    fused = [b for b in wanted if b in kernels.available_backends()]
    for backend in fused:
        conv = layers.ConvContract(SIG, SIG, filters, key=jr.PRNGKey(0), backend=backend)
        plain = layers.ConvContract(SIG, SIG, filters, key=jr.PRNGKey(0), backend="dense")
        cases = [(("space",), (n_gpu,), {ax: "space"}, None, t) for ax in range(3) for t in (True, False)]
        if n_gpu >= 4:
            cases.append((("batch", "space"), (2, n_gpu // 2), {0: "space"}, "batch", True))
        for names, shape, axis_map, batch_axis, is_torus in cases:
            x = image(int(os.environ.get("GPU_CHECK_N", "32")), is_torus, 2, seed=len(axis_map) + 3 * list(axis_map)[0])
            ref = loss_and_grads(plain, x)
            m = mesh(shape, names)
            layout = _sharding.make_layout(m, axis_map, batch_axis)
            spec = conv.conv_spec(x)
            local_spec, plans = _sharding.plan(spec, x.get_spatial_dims(), layout)
            local = _registry.choose(local_spec, _sharding.local_spatial(x.get_spatial_dims(), plans), jnp.float32, backend)
            with _sharding.spatial_sharding(m, axis_map, batch_axis):
                got = loss_and_grads(conv, layout.place(x, 3))
            err = rel(got, ref)
            ok = err <= TOL and local.backend == backend
            failures += not ok
            print(
                f"{'ok  ' if ok else 'FAIL'} {backend:6s} mesh={dict(zip(names, shape))} split={axis_map} "
                f"batch_axis={batch_axis} torus={is_torus}: rel err {err:.2e}; shards ran {local.backend!r}",
                flush=True,
            )
    if not fused:
        print("no fused backend runs here: nothing to check")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
