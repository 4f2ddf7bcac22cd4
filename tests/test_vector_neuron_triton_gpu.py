"""The VectorNeuron's fused Triton kernels on an NVIDIA GPU (`python3 -m pytest -m gpu
tests/test_vector_neuron_triton_gpu.py`): the compiled kernels through the launcher's custom call
against ginjax's XLA path with TF32 off, on a standard block (B=4, 16 channels, 64^3, vectors)
and odd sizes; the weight gradient bit-identical run to run; NaN propagation; and the compiled HLO
of a ResNet-like step (ConvContract -> VectorNeuron -> ConvContract, value and gradients): no
copy or transpose next to the VectorNeuron's custom calls."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import float64, rel_l2

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import conv_contract_triton, vector_neuron_triton  # noqa: E402
from ginjax import _vector_neuron  # noqa: E402

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from test_conv_contract_triton import make_layer, operands  # noqa: E402
from test_conv_contract_triton_gpu import _hlo_computations, _line_of  # noqa: E402
from test_vector_neuron_triton import test_nan_propagates_like_xla  # noqa: E402,F401  (re-run here on the GPU)

EPS = 1e-5
TOL = 1e-5  # fp32: the kernels' dots are "ieee", the XLA path runs at 'highest'
# The gradients pass through gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n), two terms of size
# |gu| / n that cancel: on 2^20 pixels a few have a small |d| and amplify the fp32 rounding of d
# (the XLA path's and the kernel's alike) past 1e-5. The gradients are held to the float64
# truth: no further from it than MARGIN times the XLA path's own fp32 error (and 1e-5).
MARGIN = 3.0


def _operands(seed, shape, c):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c), jnp.float32)
    gy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return w, x, gy


def _step(impl, D, activation):
    """jit of (y, gw, gx) of the vmapped VectorNeuron, cotangent gy."""
    def batched(w, x):
        return jax.vmap(lambda b: _vector_neuron.vector_neuron(w, b, D, activation, EPS, impl=impl))(x)

    def f(w, x, gy):
        y, vjp = jax.vjp(batched, w, x)
        return (y,) + vjp(gy)
    return jax.jit(f)


CASES = [
    ("standard-gelu", 3, (4, 16, 64, 64, 64, 3), jax.nn.gelu),
    ("standard-relu", 3, (4, 16, 64, 64, 64, 3), jax.nn.relu),
    ("odd-c5-t9", 3, (2, 5, 7, 9, 11, 3, 3), jax.nn.gelu),
    ("odd-c33-d2", 2, (3, 33, 37, 41, 2), jax.nn.relu),
]


@pytest.mark.parametrize("name, D, shape, activation", CASES, ids=[c[0] for c in CASES])
def test_against_xla_fp32(name, D, shape, activation):
    w, x, gy = _operands(1, shape, shape[1])
    got = [np.asarray(a) for a in _step("triton", D, activation)(w, x, gy)]
    with jax.default_matmul_precision("highest"):
        xla = [np.asarray(a) for a in _step("xla", D, activation)(w, x, gy)]
    with float64():
        truth = [np.asarray(a) for a in _step("xla", D, activation)(*(a.astype(jnp.float64) for a in (w, x, gy)))]
    for label, g, r, t in zip(("y", "gw", "gx"), got, xla, truth):
        assert g.shape == r.shape, label
        assert np.all(np.isfinite(g)), f"{label}: non-finite (an element never written?)"
        if label == "y":
            err = rel_l2(g, r)
            assert err < TOL, f"y: relative L2 {err:.2e} from the XLA path"
        else:
            err, own = rel_l2(g, t), rel_l2(r, t)
            assert err < max(TOL, MARGIN * own), f"{label}: {err:.2e} from float64 (the XLA path's: {own:.2e})"


def test_weight_gradient_bit_identical():
    w, x, gy = _operands(2, (4, 16, 64, 64, 64, 3), 16)
    run = _step("triton", 3, jax.nn.gelu)
    first = [np.asarray(a) for a in run(w, x, gy)]
    second = [np.asarray(a) for a in run(w, x, gy)]
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def test_no_relayout_around_the_vector_neuron():
    """A ResNet-like step (ConvContract, VectorNeuron on the vector key, ConvContract; value and
    gradients): in the compiled HLO no operand of a VectorNeuron custom call is produced by, and
    no result consumed by, a copy, a transpose or a fusion containing one (XLA keeps the block
    component-planar from the ConvContract kernels through the VectorNeuron's)."""
    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    xs, ws = operands(spec, 32, seed=5, batch=2)
    vn_w = jnp.asarray(np.random.default_rng(0).uniform(-0.25, 0.25, (16, 16)), jnp.float32)

    def loss(ws, vn_w, xs):
        one = lambda x: conv_contract_triton(spec, x, ws, precision="tf32")  # noqa: E731
        s, v = jax.vmap(one)(xs)
        v = jax.vmap(lambda b: vector_neuron_triton(vn_w, b, 3, jax.nn.gelu, EPS))(v)
        out = jax.vmap(one)([jax.nn.gelu(s), v])
        return sum(jnp.sum(o * o) for o in out)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ws, vn_w, xs).compile().as_text()
    comps = _hlo_computations(text)
    insts = {name: (op, ins, calls) for body in comps.values() for name, op, ins, calls in body}
    # the VectorNeuron's kernels: the triton calls with a (1, 16, 16) weight operand
    calls = [n for n, (op, _, _) in insts.items() if op == "custom-call" and "triton_kernel_call" in _line_of(text, n)]
    vn = [n for n in calls if re.search(r"f32\[1,16,16\]", _line_of(text, n).split("custom-call(", 1)[-1])]
    assert len(vn) == 2, (len(calls), [_line_of(text, n)[:300] for n in calls])  # forward and backward

    def relayout(name):
        op, _, called = insts[name]
        inner = [i for comp in called for _, i, _, _ in comps.get(comp, [])]
        return op in ("copy", "transpose") or any(i in ("copy", "transpose") for i in inner)

    def through(name, step):
        # walk past bitcasts and tuple plumbing to the real producers / consumers
        seen, frontier, found = set(), [name], []
        while frontier:
            for nxt in step(frontier.pop()):
                if nxt in seen or nxt not in insts:
                    continue
                seen.add(nxt)
                (frontier if insts[nxt][0] in ("bitcast", "get-tuple-element", "tuple") else found).append(nxt)
        return found

    producers = lambda n: insts[n][1]  # noqa: E731
    consumers = lambda n: [m for m, (_, ins, _) in insts.items() if n in ins]  # noqa: E731
    bad = [(n, m, insts[m][0]) for n in vn for m in through(n, producers) + through(n, consumers) if relayout(m)]
    assert not bad, bad
