"""Filter groups on an NVIDIA GPU (`python3 -m pytest -m gpu tests/test_triton_filter_groups_gpu.py`):
the 2-tensor layer of d3_n64_b2_c8_k2 (scalars, vectors and 2-tensors, 8 channels each, every
invariant 3x3x3 filter) at 16^3, which the `triton` backend runs as launches over groups of its
filters, against `reference` in fp32: outputs with an 'add' and a 'mean' bias, and gradients in
inputs, weights and bias, vmapped over a batch of 2. Compiling the groups' kernels (three
directions) takes a few minutes."""

from __future__ import annotations

import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from conftest import gradient_errors, rel_l2

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from test_conv_contract_triton import operands  # noqa: E402


def test_two_tensor_layer_in_filter_groups_against_reference(monkeypatch):
    from bench import _cases, _configs

    monkeypatch.setenv("GINJAX_TRITON_PARITY", "off")  # auto runs this layer parity-blocked

    base = _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])
    spec = kernels.make_spec(3, base.in_keys, base.out_keys, [(p.in_index, p.out_index, p.basis.array) for p in base.pairs],
                             True, bias_modes=("add", "mean", "none"))
    said = kernels.explain(spec, (16,) * 3, backend="triton").reason
    assert "launches over groups of the filters" in said, said
    xs, ws = operands(spec, 16, seed=23, batch=2)
    rng = np.random.default_rng(3)
    bias = [jnp.asarray(rng.standard_normal(8), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32), None]

    def vf(backend):
        return jax.vmap(lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, backend=backend, precision="fp32"),
                        in_axes=(0, None, None))

    def loss(backend):
        return lambda x, w, b: sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(vf(backend)(x, w, b)))

    got = jax.jit(vf("triton"))(xs, ws, bias)
    want = jax.jit(vf("reference"))(xs, ws, bias)
    for g, r in zip(got, want):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_l2(g, r) <= kernels.TOLERANCE["fp32"], rel_l2(g, r)
    got = jax.jit(jax.grad(loss("triton"), argnums=(0, 1, 2)))(xs, ws, bias)
    want = jax.jit(jax.grad(loss("reference"), argnums=(0, 1, 2)))(xs, ws, bias)
    errors = gradient_errors(got, want, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["fp32"], errors
