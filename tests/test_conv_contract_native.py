"""The `native` backend (C++ kernels through XLA FFI) against `reference` (every recorded case:
tests/test_conformance.py): hypothesis-drawn layers (forward and gradients, vmapped, jitted), odd
sizes, float64, NaN/inf, bad input, bit-identical gradients, how it reports itself when not built, and `auto` on a CPU.

The backend exists only where `pip install` compiled it. Without it these tests skip with the
reason, except where GINJAX_REQUIRE_NATIVE=1 (CI sets it): there a missing build is a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import strategies as st

import jax
import jax.numpy as jnp

import kernels
from kernels.native import conv_contract_native
from conftest import (
    drawn_examples,
    run_drawn,
    draw_covered_layer,
    fixture_filters,
    float64,
    gradient_errors,
    random_operands,
    rel_l2,
)

FP32 = kernels.TOLERANCE["fp32"]


def _native_ok() -> tuple[bool, str]:
    return kernels._registry.get("native").availability()


@pytest.fixture(autouse=True)
def _needs_native(request):
    if request.node.get_closest_marker("without_build"):
        return
    ok, why = _native_ok()
    if not ok:
        if os.environ.get("GINJAX_REQUIRE_NATIVE") == "1":
            pytest.fail(f"GINJAX_REQUIRE_NATIVE=1 but the native backend is unavailable: {why}")
        pytest.skip(f"native backend unavailable: {why}")


def _vmapped(spec, backend, precision="fp32"):
    return jax.vmap(
        lambda xs, ws: kernels.conv_contract(spec, xs, ws, backend=backend, precision=precision), in_axes=(0, None)
    )


def _outs_and_grads(spec, backend):
    """One jitted function: the vmapped outputs and the gradients of a generic scalar loss of them
    (one compilation each, which is most of these tests' time)."""

    def loss(xs, ws):
        outs = _vmapped(spec, backend)(xs, ws)
        return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs

    def run(xs, ws):
        (_, outs), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(xs, ws)
        return outs, jax.tree_util.tree_leaves(grads)

    return jax.jit(run)


def _oracle(spec, inputs, weights):
    """reference in float64 on the same (float32-rounded) operands: outputs and gradients."""
    with float64():
        xs = [jnp.asarray(np.asarray(x, np.float32), jnp.float64) for x in inputs]
        ws = [jnp.asarray(np.asarray(w, np.float32), jnp.float64) for w in weights]
        outs, grads = _outs_and_grads(spec, "reference")(xs, ws)
        return [np.asarray(o) for o in outs], [np.asarray(g) for g in grads]


def _check_against_oracle(spec, inputs, weights, tol=FP32):
    outs_ref, grads_ref = _oracle(spec, inputs, weights)
    xs = [jnp.asarray(x, jnp.float32) for x in inputs]
    ws = [jnp.asarray(w, jnp.float32) for w in weights]
    outs, grads = _outs_and_grads(spec, "native")(xs, ws)
    assert len(outs) == len(outs_ref)
    for got, want in zip(outs, outs_ref):
        assert got.shape == want.shape and got.dtype == jnp.float32
        assert rel_l2(got, want) <= tol
    read = {p.in_index for p in spec.pairs}
    for a, (got, want) in enumerate(zip(grads, grads_ref)):
        assert got.shape == want.shape
        if a < len(inputs) and a not in read:  # an input block no pair reads: exactly zero
            assert not np.any(np.asarray(got))
    # element_scale: a drawn layer's gradient may cancel everywhere (an odd filter against this
    # loss), leaving float64 and float32 rounding noise on the two sides; a real gradient term of
    # these standard-normal operands is O(1) per element
    assert max(gradient_errors(grads, grads_ref, element_scale=1.0)) <= tol


# ---- hypothesis-drawn layers --------------------------------------------------------------------
@st.composite
def native_layers(draw):
    spec, N = draw_covered_layer(draw)
    # odd, non-cubic grids: each axis its own size
    spatial = tuple(N + draw(st.integers(0, 2)) for _ in range(spec.D))
    return spec, spatial, draw(st.integers(1, 2))


def _matches_reference_forward_and_grads(layer, seed):
    spec, spatial, batch = layer
    inputs, weights = random_operands(spec, spatial, seed, batch, np.float32)
    _check_against_oracle(spec, inputs, weights)


@drawn_examples(3, 12)
def test_matches_reference_forward_and_grads(examples):
    run_drawn(_matches_reference_forward_and_grads, examples, layer=native_layers(), seed=st.integers(0, 2**31 - 1))


def _standard_spec(D, c, torus=True, padding=None, rhs_dilation=1, k2=False):
    filters = fixture_filters(D, 3)
    keys = [(0, 0, c), (1, 0, c)] + ([(2, 0, c)] if k2 else [])
    pairs = [(a, b, filters[(ka + kb, 0)]) for a, (ka, _, _) in enumerate(keys) for b, (kb, _, _) in enumerate(keys)
             if (ka + kb, 0) in filters]
    return kernels.make_spec(D, keys, keys, pairs, torus, 1, padding, None, rhs_dilation)


@pytest.mark.parametrize(
    "D, spatial, kwargs",
    [
        (2, (17, 33), {}),  # rows longer than one vector loop, ragged last tile
        (2, (5, 40), {"torus": False, "padding": "VALID"}),
        (3, (5, 7, 9), {}),
        (3, (6, 5, 19), {"torus": (True, False, True), "rhs_dilation": (2, 1, 2)}),
        (3, (4, 4, 4), {"k2": True}),
    ],
)
def test_odd_sizes(D, spatial, kwargs):
    spec = _standard_spec(D, 3, **kwargs)
    inputs, weights = random_operands(spec, spatial, seed=11, batch=2, dtype=np.float32)
    _check_against_oracle(spec, inputs, weights)


def test_float64_under_x64():
    spec = _standard_spec(3, 2, torus=False)
    inputs, weights = random_operands(spec, (5, 6, 4), seed=5, batch=2)
    with float64():
        xs = [jnp.asarray(x) for x in inputs]
        ws = [jnp.asarray(w) for w in weights]
        got_outs, got_grads = _outs_and_grads(spec, "native")(xs, ws)
        want_outs, want_grads = _outs_and_grads(spec, "reference")(xs, ws)
        for got, want in zip(list(got_outs) + got_grads, list(want_outs) + want_grads):
            assert got.dtype == jnp.float64
            assert rel_l2(got, want) <= 1e-12


def test_bf16_operands():
    """bfloat16 operands are covered (computed in float32; the outputs may be rounded back)."""
    spec = _standard_spec(2, 2)
    inputs, weights = random_operands(spec, (8, 9), seed=2, batch=1, dtype=np.float32)
    xs = [jnp.asarray(x, jnp.bfloat16) for x in inputs]
    ws = [jnp.asarray(w, jnp.bfloat16) for w in weights]
    want = _vmapped(spec, "reference")([x.astype(jnp.float32) for x in xs], [w.astype(jnp.float32) for w in ws])
    for got, ref in zip(_vmapped(spec, "native", None)(xs, ws), want):
        assert rel_l2(got, ref) <= kernels.TOLERANCE["bf16"]


# ---- NaN / inf ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_propagate(bad):
    """A non-finite input cell reaches every output block within its 3x3 footprint, finite
    wherever the dense reference is finite and outside the footprint; the weight gradient too."""
    spec = _standard_spec(2, 1, torus=False, padding="SAME")
    rng = np.random.default_rng(0)
    x0, x1 = rng.standard_normal((1, 9, 9)), rng.standard_normal((1, 9, 9, 2))
    x0[0, 4, 4] = bad
    ws = [jnp.asarray(w, jnp.float32) for w in random_operands(spec, (9, 9), 3, 1, np.float32)[1]]
    xs = [jnp.asarray(x0, jnp.float32), jnp.asarray(x1, jnp.float32)]
    outs = kernels.conv_contract(spec, xs, ws, backend="native")
    ref = kernels.conv_contract(spec, xs, ws, backend="reference", precision="fp32")
    for got, want in zip(outs, ref):
        got, want = np.asarray(got), np.asarray(want)
        assert not np.isfinite(got[:, 3:6, 3:6]).all()
        # finite wherever the dense reference is finite (it also multiplies zero taps)
        assert np.isfinite(got[np.isfinite(want)]).all()
        footprint = np.zeros(got.shape[1:3], bool)
        footprint[3:6, 3:6] = True
        assert np.isfinite(got[:, ~footprint]).all()
    g = jax.grad(lambda w: sum(jnp.sum(o) for o in kernels.conv_contract(spec, xs, w, backend="native")))(ws)
    assert not all(np.isfinite(np.asarray(d)).all() for d in g)


def test_nan_weights_reach_their_outputs():
    spec = _standard_spec(2, 2)
    inputs, weights = random_operands(spec, (6, 6), seed=4, batch=None, dtype=np.float32)
    weights[0][0, 0, 0] = np.nan  # scalar -> scalar pair, output channel 0
    outs = kernels.conv_contract(spec, inputs, weights, backend="native")
    assert np.isnan(np.asarray(outs[0][0])).all()
    assert np.isfinite(np.asarray(outs[0][1])).all()


# ---- determinism --------------------------------------------------------------------------------
def test_gradients_are_bit_identical_across_runs():
    spec = _standard_spec(3, 4)
    inputs, weights = random_operands(spec, (8, 8, 8), seed=9, batch=2, dtype=np.float32)
    run = _outs_and_grads(spec, "native")
    first = [np.asarray(g) for g in run(inputs, weights)[1]]
    for _ in range(2):
        for a, b in zip(first, run(inputs, weights)[1]):
            assert np.array_equal(a, np.asarray(b))


# ---- bad input, availability, dispatch ----------------------------------------------------------
def test_bad_operands_are_clear_errors():
    spec = _standard_spec(2, 1)
    inputs, weights = random_operands(spec, (6, 6), seed=1, batch=None, dtype=np.float32)
    with pytest.raises(ValueError, match=r"input block 0 .* shape \(2, 6, 6\)"):
        kernels.conv_contract(spec, [np.ones((2, 6, 6), np.float32), inputs[1]], weights, backend="native")
    with pytest.raises(ValueError, match=r"weights of pair 0 have shape"):
        kernels.conv_contract(spec, inputs, [np.ones((1, 1, 99), np.float32)] + weights[1:], backend="native")
    # kernels.conv_contract sends integer operands to dense (not covered); called directly:
    with pytest.raises(ValueError, match=r"`inputs\[0\]` has dtype int32"):
        conv_contract_native(spec, [inputs[0].astype(np.int32), inputs[1]], weights, precision="fp32")


@pytest.mark.without_build
def test_unbuilt_module_reports_itself_unavailable(monkeypatch):
    monkeypatch.delenv("GINJAX_DISABLE_NATIVE", raising=False)
    native = kernels._registry.get("native")
    monkeypatch.setattr("kernels.native.registered", lambda: (False, "the compiled module is not built (test)"))
    ok, why = native.availability()
    assert not ok and "not built" in why
    with pytest.raises(ValueError, match="native.* cannot run here: the compiled module is not built"):
        kernels.explain(_standard_spec(2, 1), backend="native")
    assert kernels.explain(_standard_spec(2, 1)).backend != "native"


@pytest.mark.without_build
def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
    monkeypatch.setenv("GINJAX_DISABLE_NATIVE", "1")
    native = kernels._registry.get("native")
    ok, why = native.availability()
    assert not ok and "GINJAX_DISABLE_NATIVE='1'" in why
    assert "native" not in kernels.available_backends()
    with pytest.raises(ValueError, match="native.* cannot run here: disabled by the environment variable"):
        kernels.explain(_standard_spec(3, 2), backend="native")
    assert kernels.explain(_standard_spec(3, 2), (8, 8, 8)).backend == "dense"
    monkeypatch.setenv("GINJAX_DISABLE_NATIVE", "0")
    assert "disabled" not in native.availability()[1]


def test_auto_picks_native_for_small_3d_layers_measured_faster(monkeypatch):
    """The test suite's model layers (2-4 channels a key, 4-8 cells a side): the committed table's
    small-layer grid has native faster than dense at every D=3 size, and explain says so."""
    monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
    for c, n in ((2, 8), (3, 6), (4, 4)):
        choice = kernels.explain(_standard_spec(3, c), (n,) * 3)
        assert choice.backend == "native", str(choice)
        assert "fastest measured on cpu" in choice.reason and "against dense" in choice.reason
    dilated = kernels.explain(_standard_spec(3, 2, rhs_dilation=2), (8, 8, 8))
    assert dilated.backend == "native" and "exact match" in dilated.reason  # a grid layer itself


def test_uncovered_configurations_fall_back_to_dense():
    filters = fixture_filters(2, 3)
    strided = kernels.make_spec(2, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, filters[(0, 0)])], True, stride=2)
    choice = kernels.explain(strided, backend="native")
    assert choice.backend == "dense" and "stride (2, 2) is not covered" in choice.reason


def test_auto_on_cpu_follows_the_measured_table(monkeypatch):
    monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
    spec = _standard_spec(3, 16)
    measured = kernels._measured.measured_ms("cpu", spec, (32, 32, 32))
    assert "native" in measured and "dense" in measured, "the committed CPU table must measure native and dense"
    choice = kernels.explain(spec, (32, 32, 32))
    fastest = min((ms, name) for name, ms in measured.items() if name in kernels.available_backends())[1]
    assert choice.backend == fastest and "fastest measured" in choice.reason
