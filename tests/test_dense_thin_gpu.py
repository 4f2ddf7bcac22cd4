"""`dense`'s thin-layer forms (kernels/_thin.py) on the GPU: a model's first and last layer at a
CUDA-sized grid against `reference`, values and gradients at tf32, and what makes them cheap
there: the compiled step has no cuDNN filter-gradient convolution, where one convolution
(GINJAX_DENSE_THIN=0) has one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import kernels
from bench import _cases
from conftest import gradient_errors, rel_l2
from kernels import _thin
from test_dense_thin import SPEC3, layer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU"),
]


def _filter_gradient(hlo: str) -> bool:
    """Whether the compiled HLO holds a cuDNN filter-gradient convolution (its instruction name or
    its custom-call target)."""
    return "cudnn-conv-bw-filter" in hlo or "convBackwardFilter" in hlo


@pytest.mark.parametrize("cin, cout", [(2, 16), (16, 1)])
def test_thin_layers_on_the_gpu(cin, cout, monkeypatch):
    spec = layer(SPEC3, cin, cout)
    xs, ws, cots = _cases.spec_operands(spec, (32, 32, 32), 2, seed=5)

    def step(backend, precision=None):
        def loss(xs, ws):
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision=precision))(xs)
            return sum(jnp.vdot(o, c) for o, c in zip(outs, cots)), outs
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    monkeypatch.setenv(_thin.THIN_ENV, "1")
    thin = step("dense")
    assert not _filter_gradient(thin.lower(xs, ws).compile().as_text())
    (_, got), grads = thin(xs, ws)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = step("reference", "fp32")(xs, ws)
    assert max(rel_l2(g, w) for g, w in zip(got, want)) <= kernels.TOLERANCE["tf32"]
    assert max(gradient_errors(grads, want_grads, element_scale=1.0)) <= kernels.TOLERANCE["tf32"]
    monkeypatch.setenv(_thin.THIN_ENV, "0")
    assert _filter_gradient(step("dense").lower(xs, ws).compile().as_text())
