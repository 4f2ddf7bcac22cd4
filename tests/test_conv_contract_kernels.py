"""kernels.conv_contract on plain arrays: dense vs reference on hypothesis-drawn configurations
(forward and gradients; the recorded cases are in tests/test_conformance.py), dispatch rules and
bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import kernels
from conftest import (
    drawn_examples,
    run_drawn,
    fixture_filters,
    float64,
    draw_keys_and_pairs,
    draw_padding,
    random_operands,
    rel_l2,
)

LAX_BACKENDS = ["reference", "dense"]


# ---- hypothesis: dense against reference --------------------------------------------------------
KEYS = [(0, 0), (1, 0), (1, 1), (2, 0)]


@st.composite
def configurations(draw):
    D, M, in_keys, out_keys, pairs = draw_keys_and_pairs(draw, KEYS, 3)
    rhs = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    is_torus = draw(st.one_of(st.booleans(), st.tuples(*[st.booleans()] * D)))
    lhs = None
    padding = draw_padding(draw, D, M)
    if isinstance(padding, tuple) and draw(st.booleans()):  # explicit padding: maybe upsample too
        lhs = (2,) * D
    N = draw(st.integers(5, 8) if D == 2 else st.integers(4, 5))
    assume(N >= ((M - 1) * rhs + 1))
    batch = draw(st.integers(1, 2))
    spec = kernels.make_spec(D, in_keys, out_keys, pairs, is_torus, stride, padding, lhs, rhs)
    return spec, N, batch


def _random_operands(spec, N, batch, seed, dtype=np.float64):
    return random_operands(spec, (N,) * spec.D, seed, batch, dtype)


def _batched(spec, backend, precision=None):
    return jax.vmap(
        lambda xs, ws: kernels.conv_contract(spec, xs, ws, backend=backend, precision=precision),
        in_axes=(0, None),
    )


def _assert_close_or_both_zero(actual, expected, tol=1e-10):
    """Relative L2 within `tol`; where the oracle is exactly zero, the result must be too.

    Exact zeros are legitimate: an input block no pair reads has a zero gradient, and with
    lhs_dilation, stride and an odd padding offset every tap can land in a dilation hole.
    """
    if not np.any(np.asarray(expected)):
        assert not np.any(np.asarray(actual))
    else:
        assert rel_l2(actual, expected) <= tol


def _dense_matches_reference_forward_and_grads(cfg, seed):
    spec, N, batch = cfg

    # one program per backend (outputs and gradients of a generic scalar loss together): eager
    # float64 dispatch of the reference's einsums and their transposes costs several times the compile
    def outputs_and_grads(backend):
        def loss(xs, ws):
            outs = _batched(spec, backend)(xs, ws)
            return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    with float64():
        inputs, weights = _random_operands(spec, N, batch, seed)
        inputs = [jnp.asarray(x) for x in inputs]
        weights = [jnp.asarray(w) for w in weights]
        g_ref, ref = outputs_and_grads("reference")(inputs, weights)
        g_dense, got = outputs_and_grads("dense")(inputs, weights)
        for r, g in zip(ref, got):
            assert r.shape == g.shape
            _assert_close_or_both_zero(g, r)
        for r, g in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g_dense)):
            _assert_close_or_both_zero(g, r)


@drawn_examples(3, 15)
def test_dense_matches_reference_forward_and_grads(examples):
    run_drawn(_dense_matches_reference_forward_and_grads, examples, cfg=configurations(), seed=st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("backend", LAX_BACKENDS)
def test_float32_against_float64_oracle(backend):
    """fp32 mode from float32 operands is within the fp32 tolerance of the float64 oracle."""
    filters = fixture_filters(3, 3)
    spec = kernels.make_spec(
        3, [(0, 0, 3), (1, 0, 2)], [(0, 0, 2), (1, 0, 3)],
        [(0, 0, filters[(0, 0)]), (0, 1, filters[(1, 0)]), (1, 0, filters[(1, 0)]), (1, 1, filters[(2, 0)])],
        True,
    )
    inputs, weights = _random_operands(spec, 6, 2, seed=7)
    with float64():
        oracle = _batched(spec, "reference")([jnp.asarray(x) for x in inputs], [jnp.asarray(w) for w in weights])
        oracle = [np.asarray(o) for o in oracle]
    x32 = [jnp.asarray(x, jnp.float32) for x in inputs]
    w32 = [jnp.asarray(w, jnp.float32) for w in weights]
    got = _batched(spec, backend, "fp32")(x32, w32)
    for g, o in zip(got, oracle):
        assert g.dtype == jnp.float32
        assert rel_l2(g, o) <= kernels.TOLERANCE["fp32"]
    got_bf16 = _batched(spec, backend, "bf16")(x32, w32)
    for g, o in zip(got_bf16, oracle):
        assert rel_l2(g, o) <= kernels.TOLERANCE["bf16"]


def test_jit_and_grad_of_vmap():
    filters = fixture_filters(2, 3)
    spec = kernels.make_spec(2, [(1, 0, 2)], [(0, 0, 2), (1, 0, 1)], [(0, 0, filters[(1, 0)]), (0, 1, filters[(2, 0)])], True)
    inputs, weights = _random_operands(spec, 7, 3, seed=3, dtype=np.float32)
    f = jax.jit(lambda xs, ws: sum(jnp.sum(o**2) for o in _batched(spec, "dense", "fp32")(xs, ws)))
    g = jax.jit(jax.grad(lambda xs, ws: sum(jnp.sum(o**2) for o in _batched(spec, "reference", "fp32")(xs, ws)), argnums=1))
    gd = jax.grad(lambda xs, ws: sum(jnp.sum(o**2) for o in _batched(spec, "dense", "fp32")(xs, ws)), argnums=1)
    assert np.isfinite(float(f(inputs, weights)))
    for a, b in zip(g(inputs, weights), gd(inputs, weights)):
        assert rel_l2(b, a) <= 1e-4


# ---- dispatch -----------------------------------------------------------------------------------
def _small_spec():
    filters = fixture_filters(2, 3)
    return kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True)


def test_selection_order(monkeypatch):
    spec = _small_spec()
    monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
    assert kernels.explain(spec).backend in kernels.available_backends()
    monkeypatch.setenv(kernels._registry.ENV_VAR, "reference")
    choice = kernels.explain(spec)
    assert (choice.backend, choice.source) == ("reference", "$GINJAX_BACKEND")
    with kernels.use_backend("dense"):
        assert kernels.explain(spec).backend == "dense"
        assert kernels.explain(spec, backend="reference").source == "argument"
    assert "reference" in str(kernels.explain(spec))


def test_unknown_backend_is_a_clear_error(monkeypatch):
    spec = _small_spec()
    x = [jnp.ones((1, 5, 5)) * 0.5]
    w = [jnp.ones((1, 1, spec.pairs[0].basis.n_filters))]
    with pytest.raises(ValueError, match="'cuda-magic'.*available here"):
        kernels.conv_contract(spec, x, w, backend="cuda-magic")
    monkeypatch.setenv(kernels._registry.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="'nope'"):
        kernels.conv_contract(spec, x, w)


def test_backend_that_cannot_run_here_is_rejected():
    unavailable = kernels.Backend(
        "never-here", kernels.conv_contract_reference,
        lambda: (False, "needs hardware this machine lacks"), lambda *a: (True, ""), priority={},
    )
    kernels.register_backend(unavailable)
    try:
        with pytest.raises(ValueError, match="cannot run here: needs hardware"):
            kernels.explain(_small_spec(), backend="never-here")
    finally:
        kernels._registry._BACKENDS.pop("never-here")


def test_uncovered_configuration_falls_back_to_dense():
    narrow = kernels.Backend(
        "narrow", kernels.conv_contract_reference, lambda: (True, ""),
        lambda spec, spatial, dtype: (spec.is_default_stride, "stride > 1 not covered"), priority={"cpu": 100},
    )
    kernels.register_backend(narrow)
    try:
        filters = fixture_filters(2, 3)
        strided = kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True, stride=2)
        assert kernels.explain(_small_spec(), backend="narrow").backend == "narrow"
        choice = kernels.explain(strided, backend="narrow")
        assert choice.backend == "dense" and "stride > 1 not covered" in choice.reason
        assert kernels.explain(strided).backend == "dense"  # auto skips it too
    finally:
        kernels._registry._BACKENDS.pop("narrow")


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_specs_are_clear_errors():
    filters = fixture_filters(2, 3)
    f2 = fixture_filters(2, 2)
    with pytest.raises(ValueError, match=r"`D` \(=4\)"):
        kernels.make_spec(4, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True)
    with pytest.raises(ValueError, match="needs odd filter sizes"):
        kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, f2[(0, 0)])], True, padding="TORUS")
    with pytest.raises(ValueError, match="needs odd filter sizes"):
        kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, f2[(0, 0)])], False, padding="SAME")
    with pytest.raises(ValueError, match=r"`padding` \(='FULL'\)"):
        kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True, padding="FULL")
    with pytest.raises(ValueError, match=r"`stride` \(=0\)"):
        kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True, stride=0)
    with pytest.raises(ValueError, match=r"`is_torus`"):
        kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], (True,))
    with pytest.raises(ValueError, match="filter basis for pair"):
        kernels.make_spec(2, [(1, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True)


def test_bad_operands_are_clear_errors():
    spec = _small_spec()
    F = spec.pairs[0].basis.n_filters
    good_x, good_w = jnp.ones((1, 6, 6)), jnp.ones((1, 1, F))
    with pytest.raises(ValueError, match=r"input block 0 .* shape \(2, 6, 6\)"):
        kernels.conv_contract(spec, [jnp.ones((2, 6, 6))], [good_w])
    with pytest.raises(ValueError, match=r"weights of pair 0 have shape \(1, 1, 7\)"):
        kernels.conv_contract(spec, [good_x], [jnp.ones((1, 1, 7))])
    with pytest.raises(ValueError, match="`inputs` has 2 blocks"):
        kernels.conv_contract(spec, [good_x, good_x], [good_w])
    filters = fixture_filters(2, 3)
    valid = kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], False, padding="VALID")
    with pytest.raises(ValueError, match="too small"):
        kernels.conv_contract(valid, [jnp.ones((1, 2, 2))], [good_w])
    with pytest.raises(ValueError, match=r"`precision` \(='fp8'\)"):
        kernels.conv_contract(spec, [good_x], [good_w], precision="fp8")


def test_auto_on_gpu_follows_the_measured_table(monkeypatch):
    """On a GPU kind with a committed table, auto takes the measured-fastest covering backend."""
    fast = kernels.Backend("fast-fused", kernels.conv_contract_reference, lambda: (True, ""), lambda *a: (True, ""), priority={"gpu": 99})
    kernels.register_backend(fast)
    try:
        monkeypatch.setattr(kernels._registry, "platform", lambda: "gpu")
        monkeypatch.setattr(kernels._registry, "device_kind", lambda: "NVIDIA H200")
        monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
        filters = fixture_filters(3, 3)
        spec = kernels.make_spec(
            3, [(0, 0, 16), (1, 0, 16)], [(0, 0, 16), (1, 0, 16)],
            [(0, 0, filters[(0, 0)]), (0, 1, filters[(1, 0)]), (1, 0, filters[(1, 0)]), (1, 1, filters[(2, 0)])], True,
        )
        measured = kernels._measured.measured_ms("NVIDIA H200", spec, (64, 64, 64))
        assert measured, "the committed H200 table must cover the standard 3D configuration"
        fastest = min((ms, name) for name, ms in measured.items() if name in kernels.available_backends())[1]
        choice = kernels.explain(spec, (64, 64, 64))
        assert choice.backend == fastest and "fastest measured" in choice.reason
        # an unmeasured backend ranks after every measured one, whatever its priority
        assert choice.backend != "fast-fused"
        monkeypatch.setattr(kernels._registry, "device_kind", lambda: "Unmeasured GPU 9000")
        assert kernels.explain(spec, (64, 64, 64)).backend == "fast-fused"
    finally:
        kernels._registry._BACKENDS.pop("fast-fused")
