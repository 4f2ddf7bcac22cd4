"""The `triton` backend on the host: the generated kernel through Triton's interpreter
(TRITON_INTERPRET=1, torch CPU tensors), against the `reference` backend on fresh random inputs.

Outputs on the interpreter path start as NaN, so an element the kernel fails to write shows up as
a non-finite value; every comparison checks that all outputs are finite first.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import _nonfinite
import kernels
from bench._flops import equations
from conftest import (
    fixture_filters,
    float64,
    invariant_pairs,
    random_operands,
    rel_l2,
)

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import BlockSizes, conv_contract_triton  # noqa: E402
from kernels.triton import _kernel, _launch  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

KEYS = {"s": (0, 0), "v": (1, 0), "pv": (1, 1), "t": (2, 0), "pt": (2, 1)}


def make_layer(D, M, ins, outs, is_torus=True, **geometry):
    """A spec with every (input, output) pair whose invariant filter exists; keys as (name, channels)."""
    in_keys = [KEYS[n] + (c,) for n, c in ins]
    out_keys, pairs = invariant_pairs(fixture_filters(D, M), in_keys, [KEYS[n] + (c,) for n, c in outs])
    return kernels.make_spec(D, in_keys, out_keys, pairs, is_torus, **geometry)


def operands(spec, N, seed, batch=None, dtype=np.float32):
    spatial = (N,) * spec.D if isinstance(N, int) else tuple(N)
    xs, ws = random_operands(spec, spatial, seed, batch)
    return [jnp.asarray(x, dtype) for x in xs], [jnp.asarray(w, dtype) for w in ws]


def check_close(got, want, mode, dtype=jnp.float32):
    """`got` in `dtype` (the inputs' dtype: kernels.conv_contract's dtype policy), within the
    tolerance of `mode` of `want`, every element written and finite."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == dtype
        assert np.isfinite(np.asarray(g)).all(), "an output element was never written (or is not finite)"
        assert rel_l2(g, w) <= kernels.TOLERANCE[mode], (rel_l2(g, w), mode)


def run(spec, xs, ws, backend, mode="fp32"):
    return kernels.conv_contract(spec, xs, ws, backend=backend, precision=mode)


# ---- agreement with the reference -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_d3_scalar_vector_torus_all_modes(mode):
    spec = make_layer(3, 3, [("s", 3), ("v", 2)], [("s", 2), ("v", 3)])
    xs, ws = operands(spec, 5, seed=1)
    check_close(run(spec, xs, ws, "triton", mode), run(spec, xs, ws, "reference", "fp32"), mode)


@pytest.mark.parametrize(
    "name, D, M, ins, outs, is_torus, geometry, N",
    [
        ("d2-all-orders-torus", 2, 3, [("s", 2), ("v", 2), ("pv", 1), ("t", 1)], [("s", 1), ("v", 2), ("pv", 1), ("t", 2), ("pt", 1)], True, {}, 7),
        ("d2-same-zero-pad", 2, 3, [("s", 2), ("v", 3)], [("s", 3), ("v", 1)], False, {"padding": "SAME"}, 7),
        ("d2-valid", 2, 3, [("v", 2)], [("s", 2), ("t", 1)], False, {"padding": "VALID"}, 7),
        ("d2-explicit-asym", 2, 2, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)], False, {"padding": ((0, 2), (1, 0))}, 6),
        ("d2-m5-mixed-torus", 2, 5, [("s", 1), ("v", 2)], [("s", 2), ("pv", 1)], (True, False), {}, 7),
        ("d2-dilated-torus", 2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)], True, {"rhs_dilation": 2}, 7),
        ("d2-dilated-valid", 2, 3, [("s", 1)], [("s", 2), ("v", 1)], False, {"padding": "VALID", "rhs_dilation": (2, 1)}, 7),
        ("d3-tensor-in-out", 3, 3, [("s", 1), ("t", 1)], [("s", 1), ("t", 1)], True, {}, 4),
        ("d3-same-mixed", 3, 3, [("v", 2)], [("s", 2), ("v", 1)], (True, False, True), {}, 5),
        ("d3-m2-explicit", 3, 2, [("s", 2), ("v", 1)], [("v", 2)], False, {"padding": 1}, 4),
        ("d3-dilated", 3, 3, [("s", 2)], [("v", 2)], (False, True, True), {"rhs_dilation": 2, "padding": "SAME"}, 5),
    ],
)
def test_configurations_match_reference(name, D, M, ins, outs, is_torus, geometry, N):
    spec = make_layer(D, M, ins, outs, is_torus, **geometry)
    assert kernels.explain(spec, (N,) * D, backend="triton").backend == "triton"
    xs, ws = operands(spec, N, seed=zlib.crc32(name.encode()))
    check_close(run(spec, xs, ws, "triton"), run(spec, xs, ws, "reference"), "fp32")


@pytest.mark.parametrize("layout", ["planar_in", "interleaved"])
def test_block_layouts_forward_and_gradients(layout):
    """The other memory layouts of the vector and 2-tensor blocks (every other test runs the
    default, planar; the interpreter's callback moves the axes into the order the kernel indexes):
    outputs and both gradients against `reference`."""
    spec = make_layer(2, 3, [("s", 1), ("v", 1), ("t", 1)], [("s", 1), ("v", 1), ("t", 1)])
    xs, ws = operands(spec, (5, 6), seed=9)
    blocks = BlockSizes(layout=layout, tile=(4, 8))
    check_close(conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=blocks), run(spec, xs, ws, "reference"), "fp32")

    def loss(f, xs, ws):
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(f(xs, ws)))

    got = jax.grad(lambda x, w: loss(lambda a, b: conv_contract_triton(spec, a, b, precision="fp32", block_sizes=blocks), x, w), argnums=(0, 1))(xs, ws)
    want = jax.grad(lambda x, w: loss(lambda a, b: run(spec, a, b, "reference"), x, w), argnums=(0, 1))(xs, ws)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel_l2(g, r) <= 1e-5


@pytest.mark.parametrize("torus", [True, False])
def test_bias_in_the_epilogue_with_gradients_under_vmap(torus):
    """The layer's bias ('add' on the scalar output, 'mean' on the vector one) against `reference`:
    outputs, gradients in inputs, weights and bias, vmapped over a batch. On a torus the mean
    comes from the inputs' means and the offsets are added by the kernel: the forward's program
    has one kernel call and reduces nothing of the output's size; with SAME padding the vector
    output's own mean is added after the kernel."""
    spec = make_layer(2, 3, [("s", 2), ("v", 2)], [("s", 2), ("v", 3)], torus, **({} if torus else {"padding": "SAME"}))
    spec = kernels.make_spec(spec.D, spec.in_keys, spec.out_keys, [(p.in_index, p.out_index, p.basis.array) for p in spec.pairs],
                             torus, **({} if torus else {"padding": "SAME"}), bias_modes=("add", "mean"))
    xs, ws = operands(spec, 5, seed=11, batch=2)
    bias = [jnp.asarray([0.5, -1.0]), jnp.asarray([2.0, 0.25, -0.75])]
    f = lambda backend: (lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, backend=backend, precision="fp32"))
    vf = lambda backend: jax.vmap(f(backend), in_axes=(0, None, None))
    check_close(vf("triton")(xs, ws, bias), vf("reference")(xs, ws, bias), "fp32")
    loss = lambda backend: (lambda x, w, b: sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(vf(backend)(x, w, b))))
    got = jax.grad(loss("triton"), argnums=(0, 1, 2))(xs, ws, bias)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(xs, ws, bias)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel_l2(g, r) <= 1e-5
    closed = jax.make_jaxpr(vf("triton"))(xs, ws, bias)
    assert str(closed).count("pure_callback") == 1, closed
    # a spatial mean of the (B=2, o=3, 5, 5, 2) vector output: a reduction whose operand has the
    # output's size (the bias means' own tiny contractions reduce arrays of a few dozen entries)
    output_size = 2 * 3 * 5 * 5 * 2
    reduced = [tuple(e.invars[0].aval.shape) for e in equations(closed.jaxpr) if e.primitive.name == "reduce_sum"]
    assert any(int(np.prod(shape)) == output_size for shape in reduced) != torus, (reduced, closed)


def test_many_tiles_chunks_and_masks():
    """Tiles that do not divide the grid, channel chunks with a ragged tail, several output-channel
    tiles: every mask and loop of the kernel, on a 2-program-per-axis grid."""
    spec = make_layer(2, 3, [("s", 17), ("v", 1)], [("s", 17), ("v", 1)], (True, False), padding="TORUS")
    xs, ws = operands(spec, (7, 9), seed=5)
    want = run(spec, xs, ws, "reference")
    blocks = BlockSizes(tile=(4, 8), block_c=16, block_o=16)
    plan = _kernel.plan_kernel(spec, _kernel.Geometry((7, 9), (False, False), (False,) * 4), "fp32", blocks)
    assert plan.programs_per_batch == 2 * 2 * 2  # output-channel tiles x tiles along each axis
    assert "for ch in range(2):" in plan.source
    check_close(conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=blocks), want, "fp32")
    # the other accumulator orientation, and both tile orientations (the GPU picks by Triton version)
    for orientation, pixels_first in (("po", False), ("op", True), ("po", True)):
        other = BlockSizes(tile=(8, 16), block_o=16, orientation=orientation, pixels_first=pixels_first)
        check_close(conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=other), want, "fp32")
    # the chunks unrolled: the same walk as straight-line code, ragged tail included
    unrolled = dataclasses.replace(blocks, unroll_chunks=True)
    source = _kernel.plan_kernel(spec, _kernel.Geometry((7, 9), (False, False), (False,) * 4), "fp32", unrolled).source
    assert "for ch in tl.static_range(2):" in source and "for ch in range(" not in source
    check_close(conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=unrolled), want, "fp32")


def test_bf16_operands_and_float64_fallback():
    spec = make_layer(2, 3, [("s", 2), ("v", 2)], [("s", 2), ("v", 1)])
    xs, ws = operands(spec, 6, seed=11)
    want = run(spec, xs, ws, "reference")
    got = run(spec, [x.astype(jnp.bfloat16) for x in xs], ws, "triton", "tf32")
    check_close(got, want, "bf16", jnp.bfloat16)  # inputs rounded to bf16: the bf16 tolerance
    with float64():
        xs64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in xs]
        ws64 = [jnp.asarray(np.asarray(w), jnp.float64) for w in ws]
        got = run(spec, xs64, ws64, "triton")  # beyond fp32 accumulation: runs the exact lax path
        ref = run(spec, xs64, ws64, "reference")
        for g, r in zip(got, ref):
            assert g.dtype == jnp.float64 and rel_l2(g, r) <= 1e-12


def test_nan_and_inf_propagate():
    """A NaN and an inf input reach exactly the outputs their nonzero filter taps touch (the
    structurally zero taps of the basis are skipped, unlike 0 * NaN in a dense convolution);
    all other outputs equal the reference computed without them (tests/_nonfinite.py)."""
    spec = make_layer(3, 3, [("s", 2), ("v", 2)], [("s", 2), ("v", 2)])
    N = 9
    xs, ws = operands(spec, N, seed=9)
    hits = [(0, 1, (4, 4, 4), 0), (1, 0, (2, 6, 7), 1)]
    bad, clean = _nonfinite.poison([np.asarray(x) for x in xs], hits, [np.nan, np.inf])
    got = [np.asarray(o) for o in conv_contract_triton(spec, [jnp.asarray(x) for x in bad], ws, precision="fp32")]
    ref = kernels.conv_contract(spec, [jnp.asarray(x) for x in clean], ws, backend="reference", precision="fp32")
    _nonfinite.check_nonfinite_exactly_reached(spec, (N,) * 3, hits, got, ref, 1e-5)


# ---- structure of the generated kernel ---------------------------------------------------------------
def test_kernel_loads_each_tap_once_and_keeps_few_z_tiles_live():
    """The standard layer (D=3, {scalar, vector}): one load per nonzero (tap, component) of each
    input, no dense filter, and at most 10 Z tiles live at once (the tap schedule at work)."""
    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    plan = _kernel.plan_kernel(spec, _kernel.Geometry((64,) * 3, (True, True), (False,) * 4), "tf32", BlockSizes())
    assert plan.nonzeros == 342
    assert plan.source.count("x = tl.load(") == 27 + 81
    assert plan.source.count("tl.dot(") == 40  # one per (pair, filter, output component)
    assert plan.peak_live_z <= 10
    assert "for ch in range" not in plan.source  # 16 channels: one chunk, no loop


# ---- transformations: vmap (one launch), grad, jit ---------------------------------------------------------
def _count_launches(monkeypatch):
    """Record the leading (batch) sizes of the tensors of every kernel run on the interpreter."""
    calls = []
    real = _launch.compile_plan

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*tensors):
                calls.append(tuple(int(t.shape[0]) for t in tensors))
                return self.kernel[grid](*tensors)

            return launch

    monkeypatch.setattr(_launch, "compile_plan", lambda plan: Spy(real(plan)))
    return calls


def test_vmap_is_one_batched_launch(monkeypatch):
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)])
    xs, ws = operands(spec, 5, seed=2, batch=3)
    calls = _count_launches(monkeypatch)
    f = lambda backend: jax.vmap(lambda x, w: run(spec, x, w, backend), in_axes=(0, None))
    got = f("triton")(xs, ws)
    assert calls == [(3, 3, 1, 1, 1, 1, 3, 3)]  # inputs batched, weights shared (zero stride), outputs
    check_close(got, f("reference")(xs, ws), "fp32")

    # weights batched too, nested vmap, and the batch axis somewhere else
    ws_b = [jnp.stack([w, 2 * w, -w]) for w in ws]
    calls.clear()
    got = jax.vmap(lambda x, w: run(spec, x, w, "triton"))(xs, ws_b)
    assert calls == [(3,) * 8]
    check_close(got, jax.vmap(lambda x, w: run(spec, x, w, "reference"))(xs, ws_b), "fp32")

    xs2 = [jnp.stack([x, x[::-1]], axis=1) for x in xs]  # (3, 2, ...): vmap over axis 1 inside axis 0
    calls.clear()
    nested = lambda backend: jax.vmap(jax.vmap(lambda x, w: run(spec, x, w, backend), in_axes=(0, None)), in_axes=(1, None))
    got = nested("triton")(xs2, ws)
    assert calls == [(6, 6, 1, 1, 1, 1, 6, 6)]
    check_close(got, nested("reference")(xs2, ws), "fp32")


def test_grad_vmap_of_grad_and_grad_of_vmap_under_jit():
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)])
    xs, ws = operands(spec, 5, seed=4, batch=2)

    def loss(backend, x, w):
        outs = run(spec, x, w, backend)
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    grad = lambda backend: jax.jit(jax.grad(lambda x, w: loss(backend, x, w), argnums=(0, 1)))
    per_example = lambda backend: jax.vmap(grad(backend), in_axes=(0, None))  # vmap of grad
    batched = lambda backend: jax.jit(
        jax.grad(lambda x, w: jnp.sum(jax.vmap(lambda xi: loss(backend, xi, w))(x)), argnums=(0, 1))
    )  # grad of vmap
    for make in (per_example, batched):
        got, want = make("triton")(xs, ws), make("reference")(xs, ws)
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            assert rel_l2(g, r) <= 1e-5
    # forward mode: the backend differentiates through a custom_vjp, which JAX does not push
    # tangents through; the error says so (`dense` serves jax.jvp)
    x1 = [x[0] for x in xs]
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x, w: run(spec, x, w, "triton"), (x1, ws), ([0.5 * x for x in x1], [-0.1 * w for w in ws]))


# ---- registration, coverage and errors ------------------------------------------------------------------
def test_registered_and_covered_configurations():
    assert "triton" in kernels.registered_backends() and "triton" in kernels.available_backends()
    ok, why = triton_backend.availability()
    assert ok and "TRITON_INTERPRET" in why
    spec = make_layer(3, 3, [("s", 1)], [("v", 1)])
    assert triton_backend.coverage(spec, (8,) * 3, jnp.float32)[0]
    strided = make_layer(2, 3, [("s", 1)], [("s", 1)], stride=2)
    choice = kernels.explain(strided, (8, 8), backend="triton")
    assert choice.backend == "dense" and "stride (2, 2) is not covered" in choice.reason
    dilated = make_layer(2, 3, [("s", 1)], [("s", 1)], padding=((1, 1), (1, 1)), lhs_dilation=2)
    assert "lhs_dilation" in triton_backend.coverage(dilated, (8, 8), None)[1]
    assert "float64" in triton_backend.coverage(spec, (8,) * 3, jnp.float64)[1]


def test_oversized_blocks_are_rejected_before_launch():
    """A channel of more than 2^31 - 1 elements would overflow the kernel's 32-bit offsets:
    coverage says so (auto falls back) and forcing the kernel raises ValueError, no launch."""
    spec = make_layer(3, 3, [("t", 1)], [("s", 1)])
    huge = (700, 700, 700)  # 700^3 * 9 elements per channel
    ok, why = triton_backend.coverage(spec, huge, jnp.float32)
    assert not ok and "2^31" in why
    with pytest.raises(ValueError, match=r"input block 0 has 3087000000 elements per channel"):
        _kernel.plan_kernel(spec, _kernel.Geometry(huge, (False,), (False,)), "tf32", BlockSizes())
    # batch and channel offsets are 64-bit in the generated source
    big = make_layer(3, 3, [("s", 200)], [("s", 1)])
    plan = _kernel.plan_kernel(big, _kernel.Geometry((256,) * 3, (True,), (False,)), "tf32", BlockSizes())
    assert "cc.to(tl.int64)" in plan.source and ".to(tl.int64)  # 64-bit: batch offsets" in plan.source


def test_bad_arguments_are_clear_errors():
    spec = make_layer(2, 3, [("s", 1)], [("s", 1)])
    xs, ws = operands(spec, 5, seed=0)
    with pytest.raises(ValueError, match=r"`block_sizes\.tile` \(=\(3, 8\)\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(tile=(3, 8)))
    with pytest.raises(ValueError, match=r"`block_sizes\.block_c` \(=8\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(block_c=8))
    with pytest.raises(ValueError, match=r"`block_sizes\.num_warps` \(=3\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(num_warps=3))
    with pytest.raises(ValueError, match=r"`block_sizes\.layout` \(='nhwc'\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(layout="nhwc"))
    with pytest.raises(ValueError, match=r"`block_sizes\.orientation` \(='pp'\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(orientation="pp"))
    with pytest.raises(ValueError, match=r"`block_sizes\.max_registers` \(=16\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(max_registers=16))
    with pytest.raises(ValueError, match=r"`block_sizes\.dw_max_registers` \(=300\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(dw_max_registers=300))
    with pytest.raises(ValueError, match=r"`block_sizes\.dw_tile` \(=\(1, 12\)\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes=BlockSizes(dw_tile=(1, 12)))
    with pytest.raises(ValueError, match=r"`block_sizes` \(=\{\}\)"):
        conv_contract_triton(spec, xs, ws, precision="fp32", block_sizes={})
    with pytest.raises(ValueError, match=r"`precision` \(='fp8'\)"):
        conv_contract_triton(spec, xs, ws, precision="fp8")
    with pytest.raises(ValueError, match=r"`inputs\[0\]` has dtype int32"):
        conv_contract_triton(spec, [x.astype(jnp.int32) for x in xs], ws, precision="fp32")


def test_register_cap_reaches_the_compiler_options(monkeypatch):
    """jax-triton's compile helper passes no `maxnreg`: the launcher hands it a CUDA backend whose
    option parser adds the plan's cap, and leaves uncapped plans' options alone."""
    import types

    from kernels.triton import _compile

    seen = []

    class Backend:
        def parse_options(self, opts):
            seen.append(dict(opts))
            return opts

    def factory(backend_init_func, platform, fn, arg_types, scalars, **kwargs):
        backend_init_func(0, 90).parse_options({"num_warps": kwargs["num_warps"]})
        return "kernel", {(i,): [["tt.divisibility", 16]] for i in range(len(arg_types))}

    triton_lib = types.SimpleNamespace(get_or_create_triton_kernel=factory, get_cuda_backend=lambda d, cc: Backend())
    monkeypatch.setitem(sys.modules, "jax_triton", types.SimpleNamespace(triton_lib=triton_lib))
    monkeypatch.setattr(_compile, "compile_plan", lambda plan: plan.name)
    spec = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    geometry = _kernel.Geometry((16,) * 3, (True, True), (False,) * 4)
    blocks = BlockSizes(max_registers=80, dw_max_registers=128)
    capped = _kernel.plan_kernel(spec, geometry, "tf32", blocks)
    plain = _kernel.plan_kernel(spec, geometry, "tf32", BlockSizes())
    assert capped.max_registers == 80 and blocks.for_weight_grad(3).max_registers == 128
    assert _compile._compile(capped, ("*fp32",) * 2) == ("kernel", [True, True])
    _compile._compile(plain, ("*fp32",))
    assert seen == [{"num_warps": 8, "maxnreg": 80}, {"num_warps": 8}]


def triton_calls_lowered_for_cuda(monkeypatch, f, *args) -> list[str]:
    """The `triton_kernel_call` custom calls of `f(*args)` lowered for CUDA on this host, with
    jaxlib's GPU kernel objects faked (the backend config is the repr of what they were given)."""
    import types

    import jax._src.lib as jax_lib
    from kernels.triton import _compile

    fake = types.SimpleNamespace(
        create_array_parameter=lambda zeroed, align: align,
        TritonKernelCall=lambda kernel, g0, g1, g2, params: types.SimpleNamespace(
            to_proto=lambda name, meta: repr((kernel, name, g0, params)).encode()
        ),
    )
    monkeypatch.setattr(jax_lib, "gpu_triton", fake, raising=False)
    monkeypatch.setattr(_compile, "compiled_kernel", lambda plan, types_: ("K", [True] * len(types_)))
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    hlo = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return [line for line in hlo.splitlines() if "custom_call @triton_kernel_call" in line]


def test_gpu_lowering_asks_for_planar_layouts(monkeypatch):
    """The GPU path's custom call (lowered for CUDA here with jaxlib's kernel objects faked):
    one `triton_kernel_call` whose operand and result layouts put the vector block's component
    axis ahead of its spatial axes, and weights output-channel minor (filters major)."""
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("v", 2)])
    xs, ws = operands(spec, 6, seed=3)
    f = lambda xs, ws: _launch.launch(spec, "tf32", BlockSizes(), [x[None] for x in xs], [w[None] for w in ws])
    calls = triton_calls_lowered_for_cuda(monkeypatch, f, xs, ws)
    hlo = "\n".join(calls)
    assert len(calls) == 1, hlo
    scalar, vector, weight = "dense<[3, 2, 1, 0]>", "dense<[3, 2, 4, 1, 0]>", "dense<[1, 2, 3, 0]>"
    weights = ", ".join(f"{weight} : tensor<4xindex>" for _ in ws)
    layouts = f"operand_layouts = [{scalar} : tensor<4xindex>, {vector} : tensor<5xindex>, {weights}]"
    assert layouts in calls[0], calls[0]
    assert f"result_layouts = [{vector} : tensor<5xindex>]" in calls[0], calls[0]
    assert zlib.decompress(_backend_config(calls[0])).startswith(b"('K', 'conv_contract_fwd_"), calls[0]


def test_gpu_default_tiling_per_dimension(monkeypatch):
    """On a GPU (the interpreter's large tiles patched away) D=3 layers get 8-warp programs and D=2
    layers 4-warp ones (bench/NOTES.md, "Session 23": 1.10 against 1.31 ms on d2_n256_b16_c32),
    both over 64 pixels of a row; D=2 weight-gradient programs over 64 pixels ("Session 36")."""
    from kernels.triton import _tiling

    monkeypatch.setattr(_tiling, "interpreting", lambda: False)
    d3 = BlockSizes.for_layer(make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)]), (64,) * 3)
    d2 = BlockSizes.for_layer(make_layer(2, 3, [("s", 32), ("v", 32)], [("s", 32), ("v", 32)]), (256,) * 2)
    assert (d3.num_warps, d3.resolved_tile(3)) == (8, (1, 1, 64))
    assert (d2.num_warps, d2.resolved_tile(2)) == (_tiling.D2_WARPS, (1, 64)) and _tiling.D2_WARPS == 4
    assert not d2.unroll_chunks and d2.num_stages == 1
    # the D=2 weight-gradient tiling from $GINJAX_TRITON_D2_DW (for sweeps in a step), D=3 untouched
    assert (d2.dw_num_warps, d2.dw_tile, d2.dw_units) == (2, (1, _tiling.D2_DW_PIXELS), 4) and _tiling.D2_DW_PIXELS == 64
    assert d3.dw_tile is None and d3.for_weight_grad(3).tile == (1, 1, 32)
    monkeypatch.setenv(_tiling.D2_DW_ENV, "4/64/2")
    layer2 = make_layer(2, 3, [("s", 32), ("v", 32)], [("s", 32), ("v", 32)])
    swept = BlockSizes.for_layer(layer2, (256,) * 2)
    assert (swept.dw_num_warps, swept.dw_tile, swept.dw_units, swept.num_warps) == (4, (1, 64), 2, _tiling.D2_WARPS)
    assert swept.for_weight_grad(2).tile == (1, 64)
    assert BlockSizes.for_layer(make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)]), (64,) * 3) == d3
    for bad in ("4/64", "4/x/2", "0/64/2", "4/64/2/1"):
        monkeypatch.setenv(_tiling.D2_DW_ENV, bad)
        with pytest.raises(ValueError, match=f"`GINJAX_TRITON_D2_DW` \\(={bad!r}\\) must be warps/pixels/units"):
            BlockSizes.for_layer(layer2, (256,) * 2)


def _backend_config(line: str) -> bytes:
    """The backend_config bytes of a custom call in StableHLO text: MLIR prints a backslash as
    two backslashes, other non-printable bytes (and the quote) as a backslash and two hex digits."""
    text = line.split('backend_config = "', 1)[1].split('", ', 1)[0]
    out, n = bytearray(), 0
    while n < len(text):
        if text[n : n + 2] == "\\\\":
            out.append(ord("\\"))
            n += 2
        elif text[n] == "\\":
            out.append(int(text[n + 1 : n + 3], 16))
            n += 3
        else:
            out.append(ord(text[n]))
            n += 1
    return bytes(out)


def test_backend_config_unescapes_backslash_quote_and_hex():
    """Compressed configs hold any byte: the backslash (printed doubled) broke CI once."""
    line = 'custom_call @k(%0) {backend_config = "a\\\\b\\22c\\9C\\\\\\5Cd", api_version = 2}'
    assert _backend_config(line) == b'a\\b"c\x9c\\\\d'


def test_imports_cleanly_without_triton_torch_or_jax_triton():
    """On a machine without the optional packages the backend registers and says why it cannot run."""
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "torch", "jax_triton"):
                    raise ImportError("blocked " + name)
        sys.meta_path.insert(0, Block())
        import kernels
        ok, why = kernels._registry.get("triton").availability()
        assert not ok and ("torch" in why or "triton" in why), why
        print("OK", why)
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out.stderr[-2000:]
    env["TRITON_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "NVIDIA GPU" in out.stdout, out.stderr[-2000:]
