"""The conformance matrix shared by tests/test_conformance.py (CPU) and
tests/test_conformance_gpu.py (device): every registered backend x every recorded ginjax 0.1.8
layer geometry x direction (forward, input gradient, weight gradient), against the `reference`
backend evaluated in float64 on the same fresh random operands, within the tolerance of the
precision mode (kernels.TOLERANCE).

One vjp per (backend, case, mode, batch) gives all three directions: it is computed once and
cached, so the three direction tests of a pair cost one run. The gradients are those of the
linear loss sum_b <cotangent_b, out_b> with fixed random cotangents, so the forward's rounding
never reaches them and the mode's tolerance applies to each direction on its own.

A backend that cannot run here, or does not cover a case, is skipped with its own reason
(`kernels.explain`), never passed: the run's summary lists every such skip (`-rs`). The layer's
bias is not part of this matrix (tests/test_conv_contract_bias.py).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
from conftest import conv_contract_case, conv_contract_cases, fixture_spec, float64, random_operands, rel_l2

CASES = conv_contract_cases()
DIRECTIONS = ("forward", "input_grad", "weight_grad")
# every registered backend, the oracle included (its fp32 run against its own float64 run checks
# the precision plumbing); a backend registered later (e.g. a native one) joins automatically
BACKENDS = tuple(sorted(kernels.registered_backends()))


def _seed(case: str) -> int:
    return zlib.crc32(case.encode())


@functools.lru_cache(maxsize=None)
def operands(case: str, batch: int | None):
    """(spec, inputs, weights, cotangents) of a recorded case's geometry: fresh standard-normal
    float64 numpy arrays (never zeros), inputs and cotangents led by `batch` when given."""
    meta, arrays = conv_contract_case(case)
    spec, _, _, _ = fixture_spec(meta, arrays)
    spatial = (meta["N"],) * spec.D
    inputs, weights = random_operands(spec, spatial, _seed(case), batch)
    rng = np.random.default_rng(_seed(case) + 1)
    lead = () if batch is None else (batch,)
    out_spatial = spec.out_spatial(spatial)
    cotangents = [rng.standard_normal(lead + (o,) + out_spatial + (spec.D,) * k) for k, _, o in spec.out_keys]
    return spec, inputs, weights, cotangents


def _vjp(spec, backend: str, mode: str, batch: int | None):
    """jit((inputs, weights, cotangents) -> (outputs, input grads, weight grads)) of one backend."""

    def forward(xs, ws):
        one = lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision=mode)
        return jax.vmap(one)(xs) if batch is not None else one(xs)

    def run(xs, ws, cots):
        outs, pull = jax.vjp(forward, xs, ws)
        dxs, dws = pull(tuple(cots))
        return outs, dxs, dws

    return jax.jit(run)


def _as_numpy(result) -> dict[str, list[np.ndarray]]:
    return {name: [np.asarray(a) for a in part] for name, part in zip(DIRECTIONS, result)}


@functools.lru_cache(maxsize=None)
def oracle(case: str, batch: int | None) -> dict[str, list[np.ndarray]]:
    """The `reference` backend in float64: outputs and both gradients."""
    spec, xs, ws, cots = operands(case, batch)
    with float64():
        as64 = lambda arrays: [jnp.asarray(a, jnp.float64) for a in arrays]
        return _as_numpy(_vjp(spec, "reference", "fp32", batch)(as64(xs), as64(ws), as64(cots)))


def _scale(backend: str, mode: str) -> float:
    """A power of two per (backend, mode), exact in every float format. Each run gets its inputs
    and cotangents multiplied by it and its results divided back, so an output element a kernel
    never wrote cannot pass by holding a value another run left in a reused device buffer."""
    return 2.0 ** (1 + BACKENDS.index(backend) + len(BACKENDS) * kernels.MODES.index(mode))


@functools.lru_cache(maxsize=None)
def result(backend: str, case: str, mode: str, batch: int | None) -> dict[str, list[np.ndarray]]:
    """`backend` in `mode` on float32 operands: outputs and both gradients (at unit scale)."""
    spec, xs, ws, cots = operands(case, batch)
    s = _scale(backend, mode)
    as32 = lambda arrays, scale=1.0: [jnp.asarray(a * scale, jnp.float32) for a in arrays]
    outs, dxs, dws = _vjp(spec, backend, mode, batch)(as32(xs, s), as32(ws), as32(cots, s))
    # out and dx are linear in the scaled x and cotangents respectively, dw in both
    return _as_numpy(([o / s for o in outs], [d / s for d in dxs], [d / (s * s) for d in dws]))


def require_backend_covers(backend: str, case: str, batch: int | None) -> None:
    """Skip, with the registry's reason, when `backend` cannot run here or would hand this case
    to another backend (then the comparison would test the fallback under the wrong name)."""
    spec, xs, _, _ = operands(case, batch)
    try:
        choice = kernels.explain(spec, [np.zeros(x.shape, np.float32) for x in xs[:1]], backend=backend)
    except ValueError as err:  # cannot run on this machine: the message says why
        pytest.skip(str(err))
    if choice.backend != backend:
        pytest.skip(f"{case}: {choice.reason}")


def check(backend: str, case: str, direction: str, mode: str, batch: int | None = None) -> None:
    """`direction` of `backend` within TOLERANCE[mode] of the float64 oracle, every element
    finite (the interpreter paths start outputs as NaN, so an unwritten element fails here)."""
    require_backend_covers(backend, case, batch)
    got = result(backend, case, mode, batch)[direction]
    want = oracle(case, batch)[direction]
    tol = kernels.TOLERANCE[mode]
    assert len(got) == len(want)
    for n, (g, w) in enumerate(zip(got, want)):
        what = f"{backend} {direction}[{n}] on {case} ({mode})"
        assert g.shape == w.shape, (what, g.shape, w.shape)
        assert g.dtype == np.float32, (what, g.dtype)
        assert np.isfinite(g).all(), f"{what}: non-finite elements (never written?)"
        if not np.any(w):  # an input block no pair reads has an exactly zero gradient
            assert not np.any(g), f"{what}: must be zero like the oracle's"
            continue
        err = rel_l2(g, w)
        assert err <= tol, f"{what}: relative L2 error {err:.2e} > {tol:.0e}"
