"""The parity-blocked convolution on an NVIDIA GPU (`python3 -m pytest -m gpu
tests/test_parity_conv_triton_gpu.py`): the compiled kernels (tf32 and 3xTF32 tensor-core dots)
against `reference`, outputs and gradients, on the issue's 2-tensor layer and on odd sizes."""

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

from test_conv_contract_triton import make_layer, operands  # noqa: E402


def _k2(bias_modes=None):
    from bench import _cases, _configs

    base = _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])
    return kernels.make_spec(3, base.in_keys, base.out_keys,
                             [(p.in_index, p.out_index, p.basis.array) for p in base.pairs], True,
                             bias_modes=bias_modes)


def _loss(f):
    """Each output against a fixed random cotangent: linear, so a gradient's error is the
    backward's own. A nonlinear loss such as sum(sin(o)) passes the forward's TF32 error on to the
    cotangent multiplied by the outputs' size (~30 on the k2 layer at 16^3): 4e-3 to 1e-2 in the
    gradients of `dense` and of the filter-group kernels alike."""
    def loss(*args):
        return sum(jnp.sum(o * jax.random.normal(jax.random.key(n), o.shape)) for n, o in enumerate(f(*args)))
    return loss


def _check_against_reference(got_fn, want_fn, args, argnums, mode):
    """got_fn's outputs (every element finite) and its gradients in `argnums` within `mode`'s
    tolerance of want_fn's, each compiled."""
    for g, r in zip(jax.jit(got_fn)(*args), jax.jit(want_fn)(*args)):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_l2(g, r) <= kernels.TOLERANCE[mode], rel_l2(g, r)
    got = jax.jit(jax.grad(_loss(got_fn), argnums=argnums))(*args)
    want = jax.jit(jax.grad(_loss(want_fn), argnums=argnums))(*args)
    errors = gradient_errors(got, want, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE[mode], errors


@pytest.mark.parametrize("mode", ["fp32", "tf32"])
def test_two_tensor_layer_against_reference(mode):
    """d3_n64_b2_c8_k2's layer at 16^3 (auto runs it parity-blocked), with an 'add' and a torus
    'mean' bias and a residual on the 2-tensor block (the forward's epilogue adds them; the
    residual's buffer is the output's), vmapped over 2: outputs and gradients in inputs, weights,
    bias and residual."""
    spec = _k2(("add", "mean", "none"))
    said = kernels.explain(spec, (16,) * 3, backend="triton").reason
    assert "parity-blocked" in said, said
    xs, ws = operands(spec, 16, seed=29, batch=2)
    rng = np.random.default_rng(5)
    bias = [jnp.asarray(rng.standard_normal(8), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32), None]
    residual = [None, None, jnp.asarray(rng.standard_normal(xs[2].shape), jnp.float32)]

    def vf(backend, precision):
        return jax.vmap(lambda x, w, b, r: kernels.conv_contract(spec, x, w, bias=b, residual=r, backend=backend,
                                                                 precision=precision), in_axes=(0, None, None, 0))

    _check_against_reference(vf("triton", mode), vf("reference", "fp32"), (xs, ws, bias, residual), (0, 1, 2, 3),
                             mode)


@pytest.mark.parametrize("blocks", ["64,4,8,2", "32,4,2,4", "64,4,1,2,32"])
def test_concatenated_dots_and_weight_gradient_tilings(monkeypatch, blocks):
    """Other tilings compiled (`GINJAX_PARITY_BLOCKS` concat, lookahead and out_width, the
    weight gradient's concat) on d3_n64_b2_c8_k2's layer at 16^3 x (16, 16, 48), tf32,
    vmapped over 2: outputs and gradients in inputs and weights against `reference`."""
    from kernels.triton import parity_conv

    monkeypatch.setenv(parity_conv.BLOCKS_ENV, blocks)
    monkeypatch.setenv(parity_conv.WEIGHT_GRAD_BLOCKS_ENV, "32,8," + blocks.split(",")[2])
    spec = _k2()
    xs, ws = operands(spec, (16, 16, 48), seed=37, batch=2)

    def vf(backend):
        return jax.vmap(lambda x, w, b: kernels.conv_contract(spec, x, w, backend=backend, precision="tf32"),
                        in_axes=(0, None, None))

    _check_against_reference(vf("triton"), vf("reference"), (xs, ws, None), (0, 1), "tf32")


@pytest.mark.parametrize("spatial, torus", [((9, 12, 19), True), ((7, 10, 33), (False, True, False))])
def test_odd_sizes_and_zero_padding(monkeypatch, spatial, torus):
    """Sizes that no block divides, wrapped and zero-padded axes, every key order, in fp32."""
    monkeypatch.setenv("GINJAX_TRITON_PARITY", "on")
    spec = make_layer(3, 3, [("s", 3), ("v", 2), ("pv", 1), ("t", 2)], [("s", 2), ("v", 3), ("t", 1)], torus,
                      **({} if torus is True else {"padding": "SAME"}))
    assert "parity-blocked" in kernels.explain(spec, spatial, backend="triton").reason
    xs, ws = operands(spec, spatial, seed=31)
    f = lambda backend: (lambda x, w, b: kernels.conv_contract(spec, x, w, backend=backend, precision="fp32"))  # noqa: E731
    _check_against_reference(f("triton"), f("reference"), (xs, ws, None), (0, 1), "fp32")


def test_nan_and_inf_on_the_tensor_cores():
    """The CPU test's NaN and inf, through the compiled kernels: the tensor cores' 0 * NaN and
    0 * inf are NaN too, so exactly the same outputs are non-finite."""
    from test_parity_conv_triton import test_nan_and_inf_reach_exactly_the_parity_blocks_outputs as check

    check()
