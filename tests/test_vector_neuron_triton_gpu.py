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

from _vector_neuron_gpu import EPS, check_against_xla, check_bit_identical

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import conv_contract_triton, vector_neuron_triton  # noqa: E402

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)

from test_conv_contract_triton import make_layer, operands  # noqa: E402
from test_conv_contract_triton_gpu import _hlo_computations, _line_of  # noqa: E402
from test_vector_neuron_triton import test_nan_propagates_like_xla  # noqa: E402,F401  (re-run here on the GPU)

CASES = [
    ("standard-gelu", 3, (4, 16, 64, 64, 64, 3), jax.nn.gelu),
    ("standard-relu", 3, (4, 16, 64, 64, 64, 3), jax.nn.relu),
    ("odd-c5-t9", 3, (2, 5, 7, 9, 11, 3, 3), jax.nn.gelu),
    ("odd-c33-d2", 2, (3, 33, 37, 41, 2), jax.nn.relu),
]


@pytest.mark.parametrize("name, D, shape, activation", CASES, ids=[c[0] for c in CASES])
def test_against_xla_fp32(name, D, shape, activation):
    check_against_xla("triton", D, shape, activation)


def test_weight_gradient_bit_identical():
    check_bit_identical("triton")


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
