"""The `triton` backend on an NVIDIA GPU (run on the GPU machine: `python3 -m pytest -m gpu
tests/test_conv_contract_triton_gpu.py`): the compiled kernels through the launcher's custom call against the
`reference` backend, with poisoned outputs, NaN/inf inputs, odd sizes, blocks of more than
2^31 elements, memcheck, and the compiled HLO of a two-layer model (no relayout between kernels)."""

from __future__ import annotations

import os
import re
import shutil
import textwrap

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from conftest import assert_sanitizer_clean, rel_l2

pytestmark = pytest.mark.gpu

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import BlockSizes, conv_contract_triton  # noqa: E402
from test_conv_contract_triton import make_layer, operands  # noqa: E402
from test_conv_contract_triton import test_nan_and_inf_propagate  # noqa: E402,F401  (re-run here on the GPU)
from test_conv_contract_triton_backward import test_weight_kernels_also_sum_the_cotangents_over_pixels  # noqa: E402,F401

if not triton_backend.availability()[0] or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip(f"needs the GPU path: {triton_backend.availability()[1]}", allow_module_level=True)


def batched(spec, backend, mode, **kw):
    if backend == "kernel":
        fn = lambda x, w: conv_contract_triton(spec, x, w, precision=mode, **kw)
    else:
        fn = lambda x, w: kernels.conv_contract(spec, x, w, backend=backend, precision=mode)
    return jax.jit(jax.vmap(fn, in_axes=(0, None)))


def check(got, want, mode):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(g))), "an output element was never written (or is not finite)"
        assert rel_l2(g, w) <= kernels.TOLERANCE[mode], (rel_l2(g, w), mode)


ODD = [
    # name, D, M, ins, outs, is_torus, geometry, mode
    ("d3-n37-torus-sv", 3, 3, [("s", 3), ("v", 3)], [("s", 3), ("v", 3)], True, {}, "tf32"),
    ("d3-n37-same-tensor", 3, 3, [("s", 3), ("t", 2)], [("v", 3), ("t", 1)], False, {"padding": "SAME"}, "fp32"),
    ("d3-n37-valid-dilated", 3, 3, [("v", 3)], [("s", 2), ("v", 3)], False, {"padding": "VALID", "rhs_dilation": 2}, "bf16"),
    ("d2-n37-m5-mixed", 2, 5, [("s", 3), ("v", 2), ("pv", 1)], [("s", 3), ("v", 3), ("t", 2)], (True, False), {}, "tf32"),
]


@pytest.mark.parametrize("name, D, M, ins, outs, is_torus, geometry, mode", ODD, ids=[c[0] for c in ODD])
def test_odd_sizes_batch2_against_reference(name, D, M, ins, outs, is_torus, geometry, mode):
    spec = make_layer(D, M, ins, outs, is_torus, **geometry)
    xs, ws = operands(spec, 37, seed=len(name), batch=2)
    want = batched(spec, "reference", "fp32")(xs, ws)
    check(batched(spec, "kernel", mode, poison=float("nan"))(xs, ws), want, mode)


def test_poison_with_ragged_tiles_and_channel_chunks():
    """Tiles, channel chunks and output-channel blocks that leave remainders everywhere."""
    spec = make_layer(3, 3, [("s", 19), ("v", 3)], [("s", 17), ("v", 2)], (True, True, False))
    xs, ws = operands(spec, (13, 11, 37), seed=3, batch=2)
    want = batched(spec, "reference", "fp32")(xs, ws)
    for blocks in (BlockSizes(tile=(2, 4, 16), block_o=16), BlockSizes(tile=(1, 1, 64), orientation="po")):
        check(batched(spec, "kernel", "fp32", block_sizes=blocks, poison=float("nan"))(xs, ws), want, "fp32")


@pytest.mark.parametrize("key, c, N", [("s", 3, 896), ("v", 2, 768)])
def test_block_over_2_pow_31_elements(key, c, N):
    """One input block of more than 2^31 elements (64-bit channel offsets in the kernel; the
    vector block read component-planar), checked against float64 sums at pixels spread through
    the grid, the far corner included."""
    spec = make_layer(3, 3, [(key, c)], [("s", 1)])
    dk = 3 if key == "v" else 1
    x = jax.random.normal(jax.random.PRNGKey(0), (c, N, N, N) + (3,) * (key == "v"), jnp.float32)
    assert x.size > 2**31
    w = jax.random.normal(jax.random.PRNGKey(1), (1, c, spec.pairs[0].basis.n_filters), jnp.float32)
    (out,) = conv_contract_triton(spec, [x], [w], precision="fp32")
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.integers(0, N, (64, 3)), [[N - 1] * 3, [0, 0, 0], [N - 1, 0, N - 1]]])
    taps = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    idx = (pts[:, None, :] + taps[None]) % N  # (P, 27, 3)
    patches = np.asarray(x[:, idx[..., 0], idx[..., 1], idx[..., 2]], np.float64).reshape(c, len(pts), 27, dk)
    B = spec.pairs[0].basis.array.reshape(spec.pairs[0].basis.n_filters, 27, dk)
    expect = np.einsum("ocf,fti,cpti->op", np.asarray(w, np.float64), B, patches)
    got = np.asarray(out[:, pts[:, 0], pts[:, 1], pts[:, 2]], np.float64)
    assert rel_l2(got, expect) <= 1e-5
    del x, out


def _hlo_computations(text: str) -> dict:
    """name -> [(instruction, opcode, operand names, called computations)] of optimised HLO text."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            current = comps.setdefault(head.group(1), [])
            continue
        # the shape is one array type or a parenthesised tuple of them (spaces inside)
        inst = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:\([^=]*?\)|\S+)\s+([\w\-]+)\((.*)", line)
        if inst and current is not None:
            name, opcode, rest = inst.groups()
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0]) or re.findall(r"%([\w.\-]+)", rest)
            calls = re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)
            current.append((name, opcode, operands, calls))
    return comps


def test_no_relayout_between_two_conv_contracts():
    """A model of two ConvContracts with an elementwise nonlinearity between them: in the compiled
    HLO nothing on the path from the first kernel's custom call to the second's is a copy or a
    transpose (XLA writes the nonlinearity's output component-planar, as the second kernel asks)."""
    spec = make_layer(3, 3, [("s", 4), ("v", 4)], [("s", 4), ("v", 4)])
    xs, ws = operands(spec, 16, seed=5, batch=2)

    def model(xs, ws):
        one = lambda x: conv_contract_triton(spec, x, ws, precision="tf32")
        hidden = jax.vmap(one)(xs)
        hidden = [h * jax.nn.sigmoid(h) for h in hidden]
        return jax.vmap(one)(hidden)

    text = jax.jit(model).lower(xs, ws).compile().as_text()
    comps = _hlo_computations(text)
    insts = {name: (op, ins, calls) for body in comps.values() for name, op, ins, calls in body}
    kernels_ = [name for name, (op, _, _) in insts.items() if op == "custom-call" and "triton_kernel_call" in _line_of(text, name)]
    assert len(kernels_) == 2, text[-4000:]
    first, second = sorted(kernels_, key=lambda n: text.index(f"{n} ="))
    # instructions downstream of the first call and upstream of the second
    down, frontier = {first}, [first]
    while frontier:
        node = frontier.pop()
        for name, (_, inputs, _) in insts.items():
            if node in inputs and name not in down:
                down.add(name)
                frontier.append(name)
    up, frontier = set(), [second]
    while frontier:
        for operand in insts[frontier.pop()][1]:
            if operand in insts and operand not in up:
                up.add(operand)
                frontier.append(operand)
    between = (down & up) - {first}
    assert between, "the second kernel does not read the first one's outputs"

    def relayouts(name, seen=()):
        op, _, calls = insts[name]
        found = [name] if op in ("copy", "transpose") else []
        for comp in calls:
            for inner, inner_op, _, _ in comps.get(comp, []):
                if inner_op in ("copy", "transpose"):
                    found.append(f"{name}/{inner}")
        return found

    bad = [r for name in between for r in relayouts(name)]
    assert not bad, (bad, [(n, insts[n][0]) for n in between])


def _line_of(text: str, name: str) -> str:
    for line in text.splitlines():
        if re.match(rf"\s*(?:ROOT\s+)?%?{re.escape(name)}\s*=", line):
            return line
    return ""


def test_channel_over_2_pow_31_elements_is_rejected_before_launch():
    spec = make_layer(3, 3, [("t", 1)], [("s", 1)])
    big = jax.ShapeDtypeStruct((1, 700, 700, 700, 3, 3), jnp.float32)
    w = jax.ShapeDtypeStruct((1, 1, spec.pairs[0].basis.n_filters), jnp.float32)
    with pytest.raises(ValueError, match="elements per channel"):
        jax.eval_shape(lambda x, w: conv_contract_triton(spec, [x], [w], precision="tf32"), big, w)
    assert kernels.explain(spec, (700,) * 3, backend="triton").backend == "dense"


def test_vmap_is_one_custom_call():
    spec = make_layer(3, 3, [("s", 2), ("v", 2)], [("s", 2), ("v", 2)])
    xs, ws = operands(spec, 8, seed=1, batch=3)
    hlo = batched(spec, "triton", "tf32").lower(xs, ws).as_text()
    calls = re.findall(r'custom_call @triton_kernel_call|custom_call_target="triton_kernel_call"', hlo)
    assert len(calls) == 1, hlo[:3000]


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
def test_memcheck_clean_on_a_3d_case():
    code = textwrap.dedent(
        """
        import sys; sys.path.insert(0, "tests")
        import jax, jax.numpy as jnp
        from test_conv_contract_triton import make_layer, operands
        from kernels.triton import conv_contract_triton, BlockSizes
        spec = make_layer(3, 3, [("s", 3), ("v", 2)], [("s", 2), ("v", 3)], (True, False, True))
        xs, ws = operands(spec, (7, 9, 11), seed=2)
        for blocks in (BlockSizes(), BlockSizes(tile=(2, 2, 16), orientation="po")):
            jax.block_until_ready(conv_contract_triton(spec, xs, ws, precision="tf32", block_sizes=blocks))
        loss = lambda xs, ws: sum(jnp.sum(o * o) for o in conv_contract_triton(spec, xs, ws, precision="tf32"))
        jax.block_until_ready(jax.grad(loss, argnums=(0, 1))(xs, ws))  # the backward kernels too
        print("done")
        """
    )
    assert_sanitizer_clean(code)


# ---- the fused backward on the GPU ----------------------------------------------------------------------
def _grads(spec, backend, mode, linear=False, **kw):
    """jit(grad) of a loss of the batched outputs. The sin loss makes the cotangents depend on the
    forward's result; with `linear` they are fixed random numbers instead, for the TF32 and bf16
    modes: there cos(o) would turn the forward's rounding (relative 1e-3 of outputs of size ~30)
    into cotangent errors of a few percent, a test of conditioning, not of the kernels."""
    if backend == "kernel":
        run = lambda x, w: conv_contract_triton(spec, x, w, precision=mode, **kw)
    else:
        run = lambda x, w: kernels.conv_contract(spec, x, w, backend=backend, precision=mode)

    def loss(xs, ws):
        outs = jax.vmap(lambda x: run(x, ws))(xs)
        if linear:
            cots = [jax.random.normal(jax.random.PRNGKey(n), o.shape, o.dtype) for n, o in enumerate(outs)]
            return sum(jnp.vdot(c, o) for c, o in zip(cots, outs))
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


def test_backward_odd_sizes_all_modes():
    """An odd layer (N=37, 3 channels, batch 2) in fp32, tf32 and bf16."""
    from test_conv_contract_triton_backward import check_grads

    spec = make_layer(3, 3, [("s", 3), ("v", 3)], [("s", 3), ("v", 3)])
    xs, ws = operands(spec, 37, seed=21, batch=2)
    check_grads(_grads(spec, "kernel", "fp32")(xs, ws), _grads(spec, "reference", "fp32")(xs, ws))
    want = _grads(spec, "reference", "fp32", linear=True)(xs, ws)
    for mode in ("tf32", "bf16"):
        check_grads(_grads(spec, "kernel", mode, linear=True)(xs, ws), want, kernels.TOLERANCE[mode])


def test_backward_is_deterministic():
    """The weight gradient's cross-program reduction has a fixed order: two runs, same bits."""
    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    xs, ws = operands(spec, 32, seed=22, batch=4)
    fn = _grads(spec, "kernel", "tf32")
    first = [np.asarray(g) for g in jax.tree_util.tree_leaves(fn(xs, ws))]
    for _ in range(2):
        again = [np.asarray(g) for g in jax.tree_util.tree_leaves(fn(xs, ws))]
        assert all(np.array_equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("D, n, ins, outs", [
    (2, 77, [("s", 32), ("v", 32)], [("s", 32), ("v", 32)]),
    (3, 21, [("s", 5), ("t", 3)], [("v", 17), ("t", 2)]),
], ids=["d2-c32", "d3-tensor"])
def test_weight_kernel_bias_sums_on_gpu_tilings(D, n, ins, outs):
    """The weight kernels' bias sums with the GPU's own tiling and pixel shares (many loop
    iterations a program, the lanes' partial sums crossed once after the loop), in fp32 against
    float64 sums, twice bit-identically."""
    from kernels.triton import _backward

    spec = make_layer(D, 3, ins, outs)
    xs, _ = operands(spec, n, seed=D + n, batch=2)
    rng = np.random.default_rng(n)
    gs = [jnp.asarray(rng.standard_normal((2, o) + (n,) * D + (D,) * k), jnp.float32) for k, _, o in spec.out_keys]
    sums = tuple(range(len(spec.out_keys)))
    run = jax.jit(lambda xs, gs: _backward.weight_grad_launch(spec, "tf32", BlockSizes.for_layer(spec, (n,) * D), xs, gs,
                                                              sums=sums))
    got = run(xs, gs)
    again = run(xs, gs)
    for s, b in zip(got[len(spec.pairs):], sums):
        want = np.asarray(gs[b], np.float64).sum(axis=tuple(range(2, 2 + D)))
        assert s.shape == want.shape
        assert rel_l2(s, want) <= 1e-6, (b, rel_l2(s, want))
    for a, b in zip(got, again):
        assert bool(jnp.array_equal(a, b))
