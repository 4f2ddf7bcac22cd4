"""One test base for the fused VectorNeuron backends on a GPU (tests/test_vector_neuron_triton_gpu.py,
tests/test_vector_neuron_cuda_gpu.py): operands, the jitted value-and-gradients step through
ginjax's dispatch, and the checks every backend must pass against ginjax's XLA path with TF32 off."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from conftest import float64, rel_l2
from ginjax import _vector_neuron

EPS = 1e-5
TOL = 1e-5  # fp32: the kernels compute in fp32 FMAs (Triton's "ieee" dots); the XLA path runs at 'highest'
# The gradients pass through gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n), two terms of size
# |gu| / n that cancel: on 2^20 pixels a few have a small |d| and amplify the fp32 rounding of d
# (the XLA path's and the kernel's alike) past 1e-5. The gradients are held to the float64
# truth: no further from it than MARGIN times the XLA path's own fp32 error (and 1e-5).
MARGIN = 3.0
STANDARD = (4, 16, 64, 64, 64, 3)  # the models' finest vector block: B=4, 16 channels, 64^3


def operands(seed, shape, c):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c), jnp.float32)
    gy = jnp.asarray(rng.normal(size=shape), jnp.float32)
    return w, x, gy


def step(impl, D, activation, layout=None):
    """jit of (y, gw, gx) of the vmapped VectorNeuron, cotangent gy (`layout`: ginjax's, None
    for its default)."""
    def batched(w, x):
        return jax.vmap(lambda b: _vector_neuron.vector_neuron(w, b, D, activation, EPS, layout=layout, impl=impl))(x)

    def f(w, x, gy):
        y, vjp = jax.vjp(batched, w, x)
        return (y,) + vjp(gy)
    return jax.jit(f)


def check_against_xla(impl, D, shape, activation, layout=None):
    """y within TOL of the XLA path at fp32; gw and gx no further from the float64 truth than
    MARGIN times the XLA path's own error; everything finite (an unwritten element shows)."""
    w, x, gy = operands(1, shape, shape[1])
    got = [np.asarray(a) for a in step(impl, D, activation, layout)(w, x, gy)]
    with jax.default_matmul_precision("highest"):
        xla = [np.asarray(a) for a in step("xla", D, activation)(w, x, gy)]
    with float64():
        truth = [np.asarray(a) for a in step("xla", D, activation)(*(a.astype(jnp.float64) for a in (w, x, gy)))]
    for label, g, r, t in zip(("y", "gw", "gx"), got, xla, truth):
        assert g.shape == r.shape, label
        assert np.all(np.isfinite(g)), f"{label}: non-finite (an element never written?)"
        if label == "y":
            err = rel_l2(g, r)
            assert err < TOL, f"y: relative L2 {err:.2e} from the XLA path"
        else:
            err, own = rel_l2(g, t), rel_l2(r, t)
            assert err < max(TOL, MARGIN * own), f"{label}: {err:.2e} from float64 (the XLA path's: {own:.2e})"


def check_bit_identical(impl):
    """Two runs of the standard block's value and gradients agree bit for bit (fixed-order sums)."""
    w, x, gy = operands(2, STANDARD, STANDARD[1])
    run = step(impl, 3, jax.nn.gelu)
    first = [np.asarray(a) for a in run(w, x, gy)]
    second = [np.asarray(a) for a in run(w, x, gy)]
    for a, b in zip(first, second):
        assert np.array_equal(a, b)


def resnet_like_step_hlo(vector_neuron) -> str:
    """The compiled HLO text of value and gradients of a ResNet-like step: a Triton ConvContract
    (16 scalar + 16 vector channels, 32^3, batch 2), `vector_neuron(weight, block)` on the vector
    key, the same ConvContract again."""
    from kernels.triton import conv_contract_triton
    from test_conv_contract_triton import make_layer, operands as layer_operands

    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    xs, ws = layer_operands(spec, 32, seed=5, batch=2)
    vn_w = jnp.asarray(np.random.default_rng(0).uniform(-0.25, 0.25, (16, 16)), jnp.float32)

    def loss(ws, vn_w, xs):
        one = lambda x: conv_contract_triton(spec, x, ws, precision="tf32")  # noqa: E731
        s, v = jax.vmap(one)(xs)
        v = jax.vmap(lambda b: vector_neuron(vn_w, b))(v)
        out = jax.vmap(one)([jax.nn.gelu(s), v])
        return sum(jnp.sum(o * o) for o in out)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(ws, vn_w, xs).compile().as_text()


def relayouts_next_to(text: str, is_call, boundary: bool = True) -> tuple[list, list]:
    """(the custom calls `is_call(name, hlo line)` picks, [(call, neighbour, opcode)] for every
    producer of an operand or consumer of a result that is a copy, a transpose or a fusion
    containing one), walking past bitcasts and tuple plumbing to the real neighbours. Without
    `boundary`, relayouts of the step's own parameters (the jit boundary hands over row-major
    arrays) are left out."""
    from test_conv_contract_triton_gpu import _hlo_computations, _line_of

    comps = _hlo_computations(text)
    insts = {name: (op, ins, calls) for body in comps.values() for name, op, ins, calls in body}
    picked = [n for n, (op, _, _) in insts.items() if op == "custom-call" and is_call(n, _line_of(text, n))]

    def relayout(name):
        op, _, called = insts[name]
        inner = [i for comp in called for _, i, _, _ in comps.get(comp, [])]
        return op in ("copy", "transpose") or any(i in ("copy", "transpose") for i in inner)

    def through(name, step):
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
    def of_parameters(name):
        return all(insts.get(i, ("",))[0] == "parameter" for i in through(name, producers)) if not boundary else False

    bad = [(n, m, insts[m][0]) for n in picked for m in through(n, producers) + through(n, consumers)
           if relayout(m) and not of_parameters(m)]
    return picked, bad
