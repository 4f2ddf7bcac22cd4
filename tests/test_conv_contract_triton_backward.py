"""The `triton` backend's fused backward (input- and weight-gradient kernels) through Triton's
interpreter: gradients against `reference` on hypothesis-drawn layers (the recorded geometries
are in tests/test_conformance.py), the weight kernel's GPU tiling (short tiles, several pixel
shares, a ragged last round), the transformations, and the `dense` backward kept for A/B runs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import kernels
from conftest import draw_covered_layer, drawn_examples, gradient_errors, rel_l2, run_drawn

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import BlockSizes, conv_contract_triton  # noqa: E402
from kernels.triton import _backward  # noqa: E402
from kernels._fused import transposed_spec  # noqa: E402
from test_conv_contract_triton import make_layer, operands  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)


def grads(spec, xs, ws, backend, batched=True, mode="fp32", **kw):
    """d/d(inputs, weights) of a nonlinear loss of the layer's outputs, vmapped over a batch."""
    run = (
        (lambda x, w: conv_contract_triton(spec, x, w, precision=mode, **kw))
        if backend == "triton"
        else (lambda x, w: kernels.conv_contract(spec, x, w, backend=backend, precision=mode))
    )

    def loss(x, w):
        outs = jax.vmap(lambda xi: run(xi, w))(x) if batched else run(x, w)
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)


def check_grads(got, want, tol=kernels.TOLERANCE["fp32"]):
    """Every gradient block finite and within `tol` of `want`, each at the scale of all the
    gradients together (conftest.gradient_errors: blocks that cancel by symmetry are rounding
    noise on both sides), and at least O(1) per element: a drawn layer may cancel everywhere (an
    antisymmetric filter against a symmetric loss), and a real gradient of these standard-normal
    operands is at least that large."""
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert np.isfinite(np.asarray(g)).all()
    errors = gradient_errors(got, want, element_scale=1.0)
    assert max(errors) <= tol, errors


@st.composite
def covered_layers(draw):
    return draw_covered_layer(draw)


def _drawn_layers_gradients_match_reference(layer, seed):
    spec, N = layer
    assert transposed_spec(spec) is not None
    xs, ws = operands(spec, N, seed=seed, batch=2)
    check_grads(grads(spec, xs, ws, "triton"), grads(spec, xs, ws, "reference"))


@drawn_examples(3, 10)
def test_drawn_layers_gradients_match_reference(examples):
    run_drawn(_drawn_layers_gradients_match_reference, examples, layer=covered_layers(), seed=st.integers(0, 2**31 - 1))


def test_weight_kernel_gpu_tiling_shares_and_ragged_round():
    """The GPU's weight-gradient tiling (32-pixel tiles, 2 warps, a few units per kernel) with 5
    pixel shares that do not divide the tiles, channel chunks and two output-channel blocks."""
    spec = make_layer(2, 3, [("s", 17), ("v", 2)], [("s", 18), ("v", 1)], (True, False))
    xs, ws = operands(spec, (6, 9), seed=3, batch=2)
    gs = [jnp.asarray(np.random.default_rng(4).standard_normal((2, o) + (6, 9) + (2,) * k), jnp.float32)
          for k, _, o in spec.out_keys]
    blocks = BlockSizes(block_o=16, dw_units=2).for_weight_grad(2)
    assert blocks.tile == (1, 32) and blocks.num_warps == 2
    got = _backward.weight_grad_launch(spec, "fp32", blocks, xs, gs, groups=5)
    want = jax.vmap(lambda x, g: jax.vjp(lambda w: kernels.conv_contract(spec, x, w, backend="reference", precision="fp32"), ws)[1](tuple(g)))(xs, gs)[0]
    assert len(_backward.weight_grad_units(spec, 2)) > 3
    for g, w in zip(got, want):
        assert g.shape == w.shape  # per example: (B, o, c, F)
        assert rel_l2(g, w) <= 1e-5


def test_weight_kernel_d2_gpu_default_over_rows_longer_than_its_tile(monkeypatch):
    """The D=2 weight-gradient tiling a GPU picks (`BlockSizes.for_layer`: 64-pixel row tiles,
    2 warps, 4 units) on rows of 70 pixels (a full tile and a ragged one) and pixel shares that
    do not divide the tiles, against `reference`."""
    from kernels.triton import _tiling

    spec = make_layer(2, 3, [("s", 3), ("v", 2)], [("s", 2), ("v", 3)], (True, False))
    monkeypatch.setattr(_tiling, "interpreting", lambda: False)
    blocks = BlockSizes.for_layer(spec, (3, 70)).for_weight_grad(2)
    monkeypatch.undo()
    assert blocks.tile == (1, 64) and blocks.num_warps == 2 and blocks.dw_units == 4
    xs, ws = operands(spec, (3, 70), seed=11, batch=2)
    gs = [jnp.asarray(np.random.default_rng(12).standard_normal((2, o) + (3, 70) + (2,) * k), jnp.float32)
          for k, _, o in spec.out_keys]
    got = _backward.weight_grad_launch(spec, "fp32", blocks, xs, gs, groups=4)
    want = jax.vmap(lambda x, g: jax.vjp(lambda w: kernels.conv_contract(spec, x, w, backend="reference", precision="fp32"), ws)[1](tuple(g)))(xs, gs)[0]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_l2(g, w) <= 1e-5


def test_weight_kernels_also_sum_the_cotangents_over_pixels():
    """The bias gradient from the weight kernels: the cotangent of each output key summed over the
    pixels, with ragged pixel shares, two output-channel tiles and two input-channel chunks (only
    chunk 0 writes the sums), in fp32 although the dots round to bf16 (fp32 sums: the bias tests
    of test_conv_contract_triton.py)."""
    mode = "bf16"
    spec = make_layer(2, 3, [("s", 17), ("v", 2)], [("s", 18), ("v", 1)], (True, False))
    xs, _ = operands(spec, (5, 7), seed=6, batch=2)
    rng = np.random.default_rng(7)
    gs = [jnp.asarray(rng.standard_normal((2, o) + (5, 7) + (2,) * k), jnp.float32) for k, _, o in spec.out_keys]
    blocks = BlockSizes(block_o=16, block_c=16, dw_units=2)
    got = _backward.weight_grad_launch(spec, mode, blocks, xs, gs, groups=3, sums=(1, 0))
    assert len(got) == len(spec.pairs) + 2
    for s, b in zip(got[len(spec.pairs):], (1, 0)):
        want = np.asarray(gs[b], np.float64).sum(axis=(2, 3))
        assert s.shape == want.shape
        assert rel_l2(s, want) <= 1e-6


@pytest.mark.parametrize("batch, groups, width", [(2, 37, 70), (1, 512, 130), (3, 5, 1)])
def test_partial_sums_add_every_group_in_a_fixed_order(batch, groups, width):
    """The weight gradient's second stage: ragged group tiles and column blocks, against a float64
    sum; twice, bit-identical."""
    from kernels.triton._kernel import plan_partial_sums
    from kernels.triton._launch import run_plan

    part = jnp.asarray(np.random.default_rng(groups).standard_normal((batch, groups, width)), jnp.float32)
    plan = plan_partial_sums(batch, groups, width)
    out_shape = [jax.ShapeDtypeStruct((batch, width), jnp.float32)]
    (got,) = run_plan(plan, out_shape, plan.programs_per_batch * batch, [part])
    (again,) = run_plan(plan, out_shape, plan.programs_per_batch * batch, [part])
    want = np.asarray(part, np.float64).sum(axis=1)
    assert rel_l2(got, want) <= 1e-6
    np.testing.assert_array_equal(np.asarray(got), np.asarray(again))


def test_weight_kernels_load_each_input_tile_once():
    """Units are grouped by the taps their filters touch: on the standard 3D layer the kernels of
    4 units load each of the 108 (tap, component) input tiles exactly once between them."""
    from kernels.triton import _kernel

    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    groups = _backward.weight_grad_units(spec, 4)
    units = sorted(u for g in groups for u in g)
    assert units == sorted((t, f) for t, p in enumerate(spec.pairs) for f in range(p.basis.n_filters))
    assert max(len(g) for g in groups) == 4
    geometry = _kernel.Geometry((64,) * 3, (True, True), (), (True, True))
    blocks = BlockSizes().for_weight_grad(3)
    loads = [_kernel.plan_weight_grad_kernel(spec, geometry, "tf32", blocks, 8, g).source.count("x = tl.load(") for g in groups]
    assert sum(loads) == 27 + 81


def test_vmap_of_grad_grad_of_vmap_and_dense_backward_agree():
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)])
    xs, ws = operands(spec, 5, seed=4, batch=3)

    def loss(backend, x, w, **kw):
        outs = conv_contract_triton(spec, x, w, precision="fp32", **kw) if backend == "triton" else kernels.conv_contract(spec, x, w, backend=backend, precision="fp32")
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    per_example = lambda backend, **kw: jax.jit(jax.vmap(jax.grad(lambda x, w: loss(backend, x, w, **kw), argnums=(0, 1)), in_axes=(0, None)))
    want = per_example("reference")(xs, ws)
    check_grads(per_example("triton")(xs, ws), want)
    check_grads(per_example("triton", backward="dense")(xs, ws), want)
    # per-example weights: the weight kernel's batch is the vmapped one
    ws_b = [jnp.stack([w, -2 * w, 0.5 * w]) for w in ws]
    both = lambda backend: jax.jit(jax.vmap(jax.grad(lambda x, w: loss(backend, x, w), argnums=(0, 1))))
    check_grads(both("triton")(xs, ws_b), both("reference")(xs, ws_b))
    with pytest.raises(ValueError, match=r"`backward` \(='fast'\)"):
        conv_contract_triton(spec, [x[0] for x in xs], ws, precision="fp32", backward="fast")


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_reduced_precision_gradients(mode):
    """The backward's own rounding: a linear loss (fixed random cotangents), so the forward's
    rounding does not reach the cotangents and the mode's tolerance applies to the gradients."""
    spec = make_layer(3, 3, [("s", 2), ("v", 2)], [("s", 2), ("v", 1)])
    xs, ws = operands(spec, 4, seed=8, batch=2)
    rng = np.random.default_rng(9)
    cots = [jnp.asarray(rng.standard_normal((2, o) + (4,) * 3 + (3,) * k), jnp.float32) for k, _, o in spec.out_keys]

    def grads_linear(backend, mode):
        def loss(x, w):
            run = lambda xi: (conv_contract_triton(spec, xi, w, precision=mode) if backend == "triton"
                              else kernels.conv_contract(spec, xi, w, backend=backend, precision=mode))
            return sum(jnp.vdot(o, g) for o, g in zip(jax.vmap(run)(x), cots))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(xs, ws)

    check_grads(grads_linear("triton", mode), grads_linear("reference", "fp32"), kernels.TOLERANCE[mode])


def test_bf16_operands_get_bf16_gradients():
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)])
    xs, ws = operands(spec, 6, seed=2, batch=2)
    got = grads(spec, [x.astype(jnp.bfloat16) for x in xs], [w.astype(jnp.bfloat16) for w in ws], "triton", mode="tf32")
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree_util.tree_leaves(got))
    want = grads(spec, [x.astype(jnp.bfloat16).astype(jnp.float32) for x in xs], [w.astype(jnp.bfloat16).astype(jnp.float32) for w in ws], "reference")
    check_grads(jax.tree_util.tree_map(lambda g: g.astype(jnp.float32), got), want, kernels.TOLERANCE["bf16"])
