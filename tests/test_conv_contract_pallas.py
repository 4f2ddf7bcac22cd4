"""The `pallas` backend in Pallas interpret mode (CPU): the "taps" kernels on fixture cases and
both algorithms on hypothesis-drawn configurations against the `reference` backend, forward and
gradients (every recorded case on the default algorithm: tests/test_conformance.py), vmap, jit,
precision modes, poisoned outputs, coverage fallback, bad input, and the GPU (Triton) lowering."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import kernels
from conftest import (
    drawn_examples,
    run_drawn,
    conv_contract_case,
    fixture_filters,
    fixture_spec,
    float64,
    draw_covered_layer,
    random_operands,
    rel_l2,
)
from kernels import pallas as kp
from kernels.pallas import _plan

kpc = importlib.import_module("kernels.pallas.conv_contract")  # the module (the package exports the function)
FP32 = kernels.TOLERANCE["fp32"]


def _operands(spec, spatial, seed, batch=None):
    """Fresh standard-normal float32 inputs and weights (never zeros), as jax arrays."""
    inputs, weights = random_operands(spec, spatial, seed, batch, np.float32)
    return [jnp.asarray(x) for x in inputs], [jnp.asarray(w) for w in weights]


def _cotangents(spec, outs, seed):
    rng = np.random.default_rng(seed + 1)
    return tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in outs)


def _forward_fn(spec, backend, precision="fp32", batched=False, algorithm=None):
    """Outputs of one backend; `algorithm` picks the pallas kernels (None: the backend default)."""

    def one(xs, ws):
        if algorithm is not None:
            return kp.conv_contract_pallas(spec, xs, ws, precision=precision, block_sizes=kp.BlockSizes(algorithm=algorithm))
        return kernels.conv_contract(spec, xs, ws, backend=backend, precision=precision)

    def run(xs, ws):
        return jax.vmap(lambda x: one(x, ws))(xs) if batched else one(xs, ws)

    return run


def _vjp_fn(spec, backend, precision="fp32", batched=False, algorithm=None):
    """jit(outputs and input/weight cotangents) for one backend."""

    def fn(xs, ws, cots):
        outs, pull = jax.vjp(_forward_fn(spec, backend, precision, batched, algorithm), xs, ws)
        return outs, pull(cots)

    return jax.jit(fn)


def _check_against_reference(spec, inputs, weights, seed, precision="fp32", batched=False, tol=FP32,
                             algorithm=None):
    """Outputs and both gradients of `pallas` within `tol` of `reference`; nothing left unwritten."""
    shapes = jax.eval_shape(_forward_fn(spec, "reference", "fp32", batched), inputs, weights)
    cots = _cotangents(spec, shapes, seed)
    want, want_grads = _vjp_fn(spec, "reference", "fp32", batched)(inputs, weights, cots)
    got, got_grads = _vjp_fn(spec, "pallas", precision, batched, algorithm)(inputs, weights, cots)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32
        assert not np.isnan(np.asarray(g)).any(), "an output element was never written"
        assert rel_l2(g, w) <= tol
    for g, w in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        assert g.shape == w.shape
        assert not np.isnan(np.asarray(g)).any()
        if not np.any(np.asarray(w)):  # an input block that no pair reads has a zero gradient
            assert not np.any(np.asarray(g))
        else:
            assert rel_l2(g, w) <= tol


# ---- fixture cases ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["case01", "case08", "case12"])
def test_fixture_cases_taps(case):
    """The tap kernels (the conformance suite runs the default, factorised) on fixtures with
    2-tensors and a missing filter (D=2), a 5x5 filter on a half torus, and D=3 with a half
    torus and dilation."""
    meta, arrays = conv_contract_case(case)
    spec, inputs, weights, _ = fixture_spec(meta, arrays)
    inputs = [jnp.asarray(x, jnp.float32) for x in inputs]
    weights = [jnp.asarray(w, jnp.float32) for w in weights]
    _check_against_reference(spec, inputs, weights, seed=int(case[-2:]), algorithm="taps")


# ---- hypothesis: configurations inside the coverage ----------------------------------------------
@st.composite
def covered_configurations(draw):
    spec, N = draw_covered_layer(draw)
    batched = draw(st.booleans())
    return spec, (N,) * spec.D, batched


def _drawn_configurations_match_reference(cfg, algorithm, seed):
    spec, spatial, batched = cfg
    assert kp.coverage(spec, spatial, np.float32)[0]
    inputs, weights = _operands(spec, spatial, seed, batch=2 if batched else None)
    _check_against_reference(spec, inputs, weights, seed, batched=batched, algorithm=algorithm)


@drawn_examples(3, 12)
def test_drawn_configurations_match_reference(examples):
    run_drawn(_drawn_configurations_match_reference, examples, cfg=covered_configurations(), algorithm=st.sampled_from(kpc.ALGORITHMS), seed=st.integers(0, 2**31 - 1))


# ---- transformations, precision, tiles ----------------------------------------------------------
def _layer(D=3, c=(2, 3), M=3, **kw):
    f = fixture_filters(D, M)
    return kernels.make_spec(
        D, [(0, 0, c[0]), (1, 0, c[1])], [(0, 0, c[1]), (1, 0, c[0])],
        [(0, 0, f[(0, 0)]), (0, 1, f[(1, 0)]), (1, 0, f[(1, 0)]), (1, 1, f[(2, 0)])], kw.pop("is_torus", True), **kw,
    )


def test_jit_of_grad_of_vmap_matches_reference():
    spec = _layer(D=2, c=(3, 2))
    inputs, weights = _operands(spec, (7, 7), seed=11, batch=3)

    def loss(backend):
        def f(xs, ws):
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision="fp32"))(xs)
            return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    (v_ref, g_ref), (v_got, g_got) = loss("reference")(inputs, weights), loss("pallas")(inputs, weights)
    assert abs(float(v_got) - float(v_ref)) <= 1e-4 * abs(float(v_ref))
    for g, r in zip(jax.tree_util.tree_leaves(g_got), jax.tree_util.tree_leaves(g_ref)):
        assert rel_l2(g, r) <= FP32


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_precision_modes_against_float64_oracle(precision):
    spec = _layer(D=3, c=(3, 2))
    inputs, weights = _operands(spec, (5, 5, 5), seed=5)
    with float64():
        oracle = kernels.conv_contract(
            spec, [x.astype(jnp.float64) for x in inputs], [w.astype(jnp.float64) for w in weights],
            backend="reference", precision="fp32",
        )
        oracle = [np.asarray(o) for o in oracle]
    got = kp.conv_contract_pallas(spec, inputs, weights, precision=precision)
    for g, o in zip(got, oracle):
        assert g.dtype == jnp.float32
        assert rel_l2(g, o) <= kernels.TOLERANCE[precision]
    if precision == "bf16":  # bf16 operands really are rounded (the mode is not a no-op here)
        assert max(rel_l2(g, o) for g, o in zip(got, oracle)) > 1e-5


@pytest.mark.parametrize("algorithm", kpc.ALGORITHMS)
def test_small_tiles_many_programs_and_poisoned_outputs(algorithm):
    """Tiny pixel tiles (many programs, a ragged last tile), few weight-gradient programs each
    looping over several tiles, and outputs that start as NaN: every element must be written."""
    spec = _layer(D=2, c=(3, 2), padding="SAME", is_torus=False)
    spatial = (7, 6)
    inputs, weights = _operands(spec, spatial, seed=3)
    bs = kp.BlockSizes(algorithm, block_p=16, block_p_dx=16, block_p_dw=16, dw_programs=2, hoist_budget=0)
    plan = _plan.forward_plan(spec, spatial)
    stencil = kpc._launchers(bs)[0]
    outs = stencil(plan, inputs, weights, mode="fp32", bs=bs, block_p=16, interpret=True, poison=True)
    want = jax.jit(_forward_fn(spec, "reference"))(inputs, weights)
    for g, w in zip(outs, want):
        assert not np.isnan(np.asarray(g)).any()
        assert rel_l2(g, w) <= FP32
    # the same tiles through the differentiable entry, gradients included
    cots = _cotangents(spec, want, seed=3)
    _, want_grads = _vjp_fn(spec, "reference")(inputs, weights, cots)
    pull = jax.jit(lambda xs, ws, cots: jax.vjp(lambda xs, ws: kp.conv_contract_pallas(spec, xs, ws, precision="fp32", block_sizes=bs), xs, ws)[1](cots))
    for g, r in zip(jax.tree_util.tree_leaves(pull(inputs, weights, cots)), jax.tree_util.tree_leaves(want_grads)):
        assert rel_l2(g, r) <= FP32


def test_input_gradient_plan_is_the_transpose():
    """The input-gradient plan, evaluated by the plain-jnp stencil reference, is the VJP of the
    forward (mixed torus/zero axes, dilation): checks the geometry independently of the kernels."""
    spec = _layer(D=2, c=(2, 2), is_torus=(True, False), rhs_dilation=2)
    spatial = (6, 7)
    inputs, weights = _operands(spec, spatial, seed=8)
    outs, pull = jax.vjp(lambda xs: kpc.conv_contract_reference(spec, xs, weights), inputs)
    cots = _cotangents(spec, outs, seed=8)
    (want,) = pull(cots)
    got = kpc.stencil_reference(_plan.input_grad_plan(spec, spatial), cots, weights)
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= FP32


# ---- registry, coverage, errors -----------------------------------------------------------------
def test_registered_and_available_in_interpret_mode():
    assert "pallas" in kernels.registered_backends()
    assert "pallas" in kernels.available_backends()
    ok, why = kp.availability()
    assert ok and "interpret" in why
    assert kernels.explain(_layer(), (5, 5, 5), backend="pallas").backend == "pallas"
    # on a CPU "auto" never picks the interpreter
    assert kernels.explain(_layer(), (5, 5, 5)).backend != "pallas"
    # the GPU probe reports a failing lowering as a reason (here: no GPU), it does not raise
    ok, why = kp._gpu_probe.__wrapped__()
    assert not ok and "Pallas GPU (Triton) lowering failed" in why


@pytest.mark.parametrize(
    "kwargs, reason",
    [({"stride": 2}, "stride"), ({"padding": [(1, 1)] * 3, "lhs_dilation": 2}, "lhs_dilation")],
)
def test_uncovered_configurations_fall_back(kwargs, reason):
    spec = _layer(**kwargs)
    choice = kernels.explain(spec, (5, 5, 5), backend="pallas")
    assert choice.backend == "dense" and reason in choice.reason
    with pytest.raises(ValueError, match=r"`spec` is outside .*" + reason):
        kp.conv_contract_pallas(spec, *_operands(spec, (5, 5, 5), seed=0))


def test_coverage_reasons():
    f3 = fixture_filters(3, 3)
    assert "float64 operands are not covered" in kp.coverage(_layer(), (5, 5, 5), np.float64)[1]
    wide = kernels.make_spec(3, [(0, 0, 65)], [(0, 0, 1)], [(0, 0, f3[(0, 0)])], True)
    assert "channels" in kp.coverage(wide, (5, 5, 5), None)[1]
    assert kp.coverage(_layer(), None, None)[0]


@pytest.fixture
def no_launch(monkeypatch):
    """Fail loudly if a kernel is launched (errors must come before any launch)."""

    def refuse(*args, **kwargs):
        raise AssertionError("pallas_call reached")

    monkeypatch.setattr(kpc.pl, "pallas_call", refuse)


def test_algorithm_from_the_environment(monkeypatch, no_launch):
    monkeypatch.setenv(kpc.ALGORITHM_ENV, "factorised")
    assert kp.BlockSizes.for_layer().algorithm == "factorised"
    monkeypatch.setenv(kpc.ALGORITHM_ENV, "fft")
    spec = _layer(D=2)
    with pytest.raises(ValueError, match=r"`GINJAX_PALLAS_ALGORITHM` \(='fft'\)"):
        kp.conv_contract_pallas(spec, *_operands(spec, (5, 5), seed=1))


def test_bad_input_is_a_clear_error_before_any_launch(no_launch):
    spec = _layer(D=2)
    inputs, weights = _operands(spec, (5, 5), seed=1)
    with pytest.raises(ValueError, match=r"input block 1 .* has shape \(3, 5, 5\)"):
        kp.conv_contract_pallas(spec, [inputs[0], inputs[1][..., 0]], weights)
    with pytest.raises(ValueError, match=r"`inputs\[0\]` has dtype float16"):
        kp.conv_contract_pallas(spec, [inputs[0].astype(jnp.float16), inputs[1]], weights)
    with pytest.raises(ValueError, match=r"`weights\[2\]` has dtype int32"):
        kp.conv_contract_pallas(spec, inputs, [*weights[:2], weights[2].astype(jnp.int32), weights[3]])
    with pytest.raises(ValueError, match=r"`precision` \(='fp8'\)"):
        kp.conv_contract_pallas(spec, inputs, weights, precision="fp8")
    with pytest.raises(ValueError, match=r"`block_sizes.block_p` \(=24\)"):
        kp.conv_contract_pallas(spec, inputs, weights, block_sizes=kp.BlockSizes(block_p=24))
    with pytest.raises(ValueError, match=r"`block_sizes.algorithm` \(='winograd'\)"):
        kp.conv_contract_pallas(spec, inputs, weights, block_sizes=kp.BlockSizes(algorithm="winograd"))
    with pytest.raises(ValueError, match=r"`block_sizes.num_warps` \(=3\)"):
        kp.conv_contract_pallas(spec, inputs, weights, block_sizes=kp.BlockSizes(num_warps=3))
    with pytest.raises(ValueError, match=r"`block_sizes` \(=\{\}\)"):
        kp.conv_contract_pallas(spec, inputs, weights, block_sizes={})
    with pytest.raises(ValueError, match="weights of pair 0 have shape"):
        kp.conv_contract_pallas(spec, inputs, [weights[0][:, :1], *weights[1:]])


# ---- the GPU lowering, checked on a CPU ---------------------------------------------------------
def _gpu_lowering(spec, batch, spatial, precision, algorithm="taps"):
    """Lower jit(vmap(value_and_grad)) for CUDA: the Pallas -> Triton IR lowering of all 3 kernels."""
    xs = [jax.ShapeDtypeStruct((batch,) + spec.in_shape(a, spatial), jnp.float32) for a in range(len(spec.in_keys))]
    ws = [
        jax.ShapeDtypeStruct((spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2], p.basis.n_filters), jnp.float32)
        for p in spec.pairs
    ]

    def loss(xs, ws):
        bs = kp.BlockSizes(algorithm=algorithm)
        outs = jax.vmap(lambda x: kp.conv_contract_pallas(spec, x, ws, precision=precision, interpret=False, block_sizes=bs))(xs)
        return sum(jnp.sum(o * o) for o in outs)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(xs, ws).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("algorithm", kpc.ALGORITHMS)
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_lowers_to_triton_for_cuda(precision, algorithm):
    """The bench layer (D=3, scalar+vector, 16 channels, batch 4, N=64) lowers for CUDA: one
    Triton call per direction (forward, input gradient, weight gradient)."""
    text = _gpu_lowering(_layer(D=3, c=(16, 16)), 4, (64, 64, 64), precision, algorithm).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    tiles = 64**3 // (128 if algorithm == "taps" else 32)  # pixel tiles of the forward kernel
    assert f"grid_x = {tiles} : i32, grid_y = 4" in text  # vmapped batch of 4: a grid axis


def _triton_sources(lowered) -> list:
    """(name, Triton IR text, num_warps) of every Pallas kernel in a lowered module."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.triton import dialect as tt_dialect

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call":
                        found.append(inner.operation.attributes["mhlo.backend_config"])
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    out = []
    for cfg in found:
        with ir.Context() as ctx:
            tt_dialect.register_dialect(ctx)
            module = ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)
            out.append((str(cfg["name"]), str(module), int(ir.IntegerAttr(cfg["num_warps"]).value)))
    return out


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("algorithm", kpc.ALGORITHMS)
def test_triton_ir_compiles_for_sm90(tmp_path, algorithm):
    """If Triton is installed, compile the three kernels' Triton IR to a Hopper cubin (no GPU
    needed): catches what the Pallas lowering accepts but Triton rejects (shapes, dot sizes)."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget

        sources = _triton_sources(_gpu_lowering(_layer(D=2, c=(16, 16)), 2, (16, 16), "tf32", algorithm))
    except ImportError as err:
        pytest.skip(f"this jax/triton lacks what the check needs: {err}")
    assert len(sources) == 3
    for name, text, num_warps in sources:
        path = tmp_path / f"{json.loads(name) if name.startswith(chr(34)) else name}.ttir"
        path.write_text(text)
        try:
            compiled = triton.compile(
                str(path), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1)
            )
        except Exception as err:  # a Triton that cannot read jaxlib's IR says nothing about the kernels
            if "parse" in str(err).lower():
                pytest.skip(f"this triton ({triton.__version__}) cannot parse jaxlib's Triton IR: {err}")
            raise
        assert compiled.asm.get("cubin"), name
        assert "mma" in compiled.asm["ptx"], name  # the dots run on tensor cores
