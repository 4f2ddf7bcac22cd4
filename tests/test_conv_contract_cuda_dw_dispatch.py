"""The `triton` backend's opt-in CUDA weight gradient (GINJAX_TRITON_FORWARD=cuda) on a CPU: where
kernels.cuda covers the layer the backward takes dW from `weight_gradient_call` (unbatched operands,
one dW per example under vmap, summed by JAX for the shared weights) and the bias offsets'
gradients from XLA sums of the cotangents; gradients equal to `reference`. The CUDA calls are
stand-ins here (`dense` and its weight VJP, with a record of what they were asked); the compiled
kernel's numbers are tests/test_conv_contract_cuda_dw_gpu.py's."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from conftest import gradient_errors
from kernels import cuda
from test_conv_contract_cuda_dispatch import _loss, small_layer

pytest.importorskip("kernels.triton")


def _stand_ins(monkeypatch, spec, asked):
    def covers(s, spatial, dtype):  # the compiled stencil: the forward layer's bases, in its order
        return [p.basis for p in s.pairs] == [p.basis for p in spec.pairs], "stand-in"

    def forward(s, inputs, weights):
        return kernels.conv_contract(s, inputs, weights, backend="dense", precision="fp32")

    def weight_gradient(s, inputs, cotangents):  # unbatched, as the FFI call's contract
        assert all(x.ndim == 1 + s.D + k for x, (k, _, _) in zip(inputs, s.in_keys))
        asked.append(s)
        zeros = [jnp.zeros((s.out_keys[p.out_index][2], s.in_keys[p.in_index][2], p.basis.n_filters)) for p in s.pairs]
        run = lambda ws: kernels.conv_contract(s, inputs, ws, backend="dense", precision="fp32")  # noqa: E731
        return jax.vjp(run, zeros)[1](tuple(cotangents))[0]

    monkeypatch.setattr(cuda, "coverage", covers)
    monkeypatch.setattr(cuda, "forward_call", forward)
    monkeypatch.setattr(cuda, "weight_gradient_coverage", covers)
    monkeypatch.setattr(cuda, "weight_gradient_call", weight_gradient)


@pytest.mark.parametrize("biased", [False, True])
def test_weight_gradient_goes_to_the_cuda_call_where_it_covers_it(monkeypatch, biased):
    spec, xs, ws = small_layer(seed=3)
    offsets = (None, jnp.asarray(np.random.default_rng(6).standard_normal((2, 3)), jnp.float32)) if biased else None
    asked = []
    _stand_ins(monkeypatch, spec, asked)
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cuda")
    argnums = (0, 1, 2) if biased else (0, 1)
    (_, outs), grads = jax.jit(jax.value_and_grad(_loss(spec, offsets), argnums=argnums, has_aux=True))(xs, ws, offsets)
    assert asked == [spec]  # once, on the layer itself, traced under the batch's vmap

    def reference(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"))(xs)
        if offs is not None:
            outs = (outs[0], outs[1] + offs[1][None, :, None, None, None, :])
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs

    _, want = jax.jit(jax.value_and_grad(reference, argnums=argnums, has_aux=True))(xs, ws, offsets)
    errors = gradient_errors(grads, want, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["tf32"], errors


def test_not_covered_or_not_tf32_stays_on_the_triton_kernel(monkeypatch):
    spec, xs, ws = small_layer(seed=4)
    asked = []
    _stand_ins(monkeypatch, spec, asked)
    monkeypatch.setattr(cuda, "weight_gradient_coverage", lambda s, spatial, dtype: (False, "stand-in: not covered"))
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cuda")
    jax.jit(jax.grad(lambda ws: _loss(spec, None)(xs, ws, None)[0]))(ws)
    monkeypatch.setattr(cuda, "weight_gradient_coverage", lambda s, spatial, dtype: (True, "stand-in"))
    run = lambda x, ws: kernels.conv_contract(spec, x, ws, backend="triton", precision="fp32")  # noqa: E731
    jax.jit(jax.grad(lambda ws: sum(jnp.sum(o) for o in jax.vmap(lambda x: run(x, ws))(xs))))(ws)
    assert asked == []
