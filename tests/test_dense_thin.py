"""`dense` on thin layers (kernels/_thin.py): a model's first layer (few inputs: stencil first) and
last layer (few outputs: contract first) in two lax stages, against `reference` on fresh operands
(values, and gradients in the inputs and the weights), over torus, zero-padded and dilated
geometries, D = 2 and 3, vmapped; the form choice and its switch; and the structure that makes
it fast: the weights' gradient has no convolution in it."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from conftest import gradient_errors, jaxpr_equations, rel_l2
from kernels import _thin
from kernels.triton import _cuda_padding
from kernels.dense import describe_dense

SPEC3 = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
SPEC2 = _cases.fixture_spec(_configs.CONFIGS["d2_n256_b16_c32"])


def layer(spec, cin: int, cout: int, **geometry):
    """`spec`'s keys and bases with cin channels per input key and cout per output key."""
    return dataclasses.replace(_cases.with_channels(spec, cin, cout), **geometry)


def test_the_first_and_last_layers_take_the_forms_and_the_hidden_one_does_not(monkeypatch):
    monkeypatch.setenv(_thin.THIN_ENV, "1")
    first, last, hidden = layer(SPEC3, 2, 16), layer(SPEC3, 16, 1), SPEC3
    # Z: 2 x (4 + 3 x 3) + 2 x (3 + 8 x 3) = 80 floats a pixel, against Cin + Cout = 8 + 64
    assert _thin.fields(first) == {"stencil-first": 80, "contract-first": 640}
    assert _thin.thin_form(first) == "stencil-first"
    # V: 1 x (4 + 3 x 3) + 1 x (3 + 8 x 3) = 40, against 64 + 4
    assert _thin.fields(last)["contract-first"] == 40 and _thin.thin_form(last) == "contract-first"
    assert _thin.thin_form(hidden) is None and describe_dense(hidden, (8, 8, 8)) == ""
    # narrow on both sides (1 + 1 -> 1 + 1: V 40 <= 1.5 x 8, but 4 + 4 channels): one convolution
    assert _thin.fields(layer(SPEC3, 1, 1))["contract-first"] == 40 and _thin.thin_form(layer(SPEC3, 1, 1)) is None
    assert "stencil-first (80 intermediate floats a pixel against 8 in, 64 out" in describe_dense(first, (8, 8, 8))
    assert "stencil-first" in kernels.explain(first, (8, 8, 8), backend="dense").reason
    # strided and transposed layers keep their own rewrites
    assert _thin.thin_form(dataclasses.replace(first, stride=(2, 2, 2))) is None
    assert _thin.thin_form(dataclasses.replace(first, lhs_dilation=(2, 2, 2))) is None
    monkeypatch.setenv(_thin.THIN_ENV, "0")
    assert _thin.thin_form(first) is None and _thin.thin_form(last) is None
    monkeypatch.delenv(_thin.THIN_ENV)  # off by default (measured slower on the H100, session 34)
    assert _thin.thin_form(first) is None and describe_dense(first, (8, 8, 8)) == ""
    assert _thin.candidate_form(first) == "stencil-first" and _thin.candidate_form(last) == "contract-first"
    monkeypatch.setenv(_thin.THIN_ENV, "yes")
    with pytest.raises(ValueError, match=_thin.THIN_ENV):
        _thin.thin_form(first)


@pytest.mark.parametrize("form", _thin.NAMED_FORMS)
def test_a_named_form_runs_every_stride_one_layer(form, monkeypatch):
    """GINJAX_DENSE_THIN=<form>: that form for wide layers too (for timing them: bench.thin_spike
    --layers), the thin ones included; strided and transposed layers keep their own rewrites."""
    monkeypatch.setenv(_thin.THIN_ENV, form)
    wide, first = layer(SPEC2, 32, 32), layer(SPEC3, 2, 16)
    assert _thin.candidate_form(wide) is None
    assert _thin.thin_form(wide) == form and _thin.thin_form(first) == form
    assert f"layer ({_thin.THIN_ENV}={form}) in two stages, {form}" in describe_dense(wide, (8, 8))
    assert _thin.thin_form(dataclasses.replace(first, stride=(2, 2, 2))) is None
    assert _thin.thin_form(dataclasses.replace(first, lhs_dilation=(2, 2, 2))) is None


def test_an_unknown_form_is_refused():
    with pytest.raises(ValueError, match=r"`form` \(='gemm'\) must be one of"):
        _thin.conv_contract_thin(SPEC3, [], [], "fp32", jnp.float32, "gemm")


CASES = [
    ("first, torus", SPEC3, 2, 16, {}, (5, 6, 7)),
    ("last, torus", SPEC3, 16, 1, {}, (5, 6, 7)),
    ("first, dilation 2", SPEC3, 2, 16, {"rhs_dilation": (2, 2, 2), "torus_pad": ((2, 2),) * 3}, (6, 5, 8)),
    ("last, zero padding", SPEC3, 8, 1, {"torus_pad": ((0, 0),) * 3, "zero_pad": ((1, 1),) * 3}, (4, 5, 6)),
    ("last, valid", SPEC3, 8, 1, {"torus_pad": ((0, 0),) * 3}, (5, 5, 6)),
    ("first, D = 2", SPEC2, 1, 16, {}, (9, 10)),
    ("last, D = 2", SPEC2, 16, 1, {}, (9, 10)),
]


@pytest.mark.parametrize("name, base, cin, cout, geometry, spatial", CASES, ids=[c[0] for c in CASES])
def test_thin_forms_match_reference_with_gradients(name, base, cin, cout, geometry, spatial, monkeypatch):
    """Values and the gradients of a random linear loss in the inputs and the weights, vmapped over
    a batch of 2, at fp32 (both sides HIGHEST): the forms are the same linear map as `reference`."""
    monkeypatch.setenv(_thin.THIN_ENV, "1")
    spec = layer(base, cin, cout, **geometry)
    assert _thin.thin_form(spec) == ("stencil-first" if cin < cout else "contract-first")
    assert_matches_reference_with_gradients(spec, spatial, seed=len(name))


WIDE_CASES = [
    ("D = 2, torus", SPEC2, 8, 12, {}, (6, 7)),
    ("D = 3, dilation 2", SPEC3, 6, 4, {"rhs_dilation": (2, 2, 2), "torus_pad": ((2, 2),) * 3}, (5, 4, 6)),
]


@pytest.mark.parametrize("form", _thin.NAMED_FORMS)
@pytest.mark.parametrize("name, base, cin, cout, geometry, spatial", WIDE_CASES, ids=[c[0] for c in WIDE_CASES])
def test_named_forms_on_wide_layers_match_reference_with_gradients(name, base, cin, cout, geometry, spatial, form,
                                                                   monkeypatch):
    """Layers with as many channels on both sides (no thin side) in a form named by the switch."""
    monkeypatch.setenv(_thin.THIN_ENV, form)
    spec = layer(base, cin, cout, **geometry)
    assert _thin.candidate_form(spec) is None and _thin.thin_form(spec) == form
    assert_matches_reference_with_gradients(spec, spatial, seed=len(name) + len(form))


def assert_matches_reference_with_gradients(spec, spatial, seed: int):
    """dense (in whatever form the switch makes) against `reference`: the values and the gradients
    of a random linear loss in the inputs and the weights, vmapped over a batch of 2, at fp32."""
    xs, ws, cots = _cases.spec_operands(spec, spatial, 2, seed=seed)

    def loss(backend):
        def f(xs, ws):
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision="fp32"))(xs)
            return sum(jnp.vdot(o, c) for o, c in zip(outs, cots)), outs
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    with jax.default_matmul_precision("highest"):
        (_, got), grads = loss("dense")(xs, ws)
        (_, want), want_grads = loss("reference")(xs, ws)
    for g, w in zip(got, want):
        assert g.shape == w.shape and rel_l2(g, w) <= kernels.TOLERANCE["fp32"]
    errors = gradient_errors(grads, want_grads, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["fp32"], errors


def _conv_outputs(jaxpr) -> list[tuple[int, ...]]:
    """The output shapes of every convolution in a jaxpr, nested jaxprs included."""
    return [tuple(e.outvars[0].aval.shape) for e in jaxpr_equations(jaxpr) if e.primitive.name == "conv_general_dilated"]


@pytest.mark.parametrize("cin, cout, forward, dgrad", [(2, 16, 4, 0), (16, 1, 4, 4)])
def test_the_weight_gradient_has_no_filter_gradient_convolution(cin, cout, forward, dgrad, monkeypatch):
    """The forms' convolutions have the bases as filters, constants: the gradient in the weights
    alone (a first layer's, whose input is data) has no convolution that makes a filter gradient
    (an output of the filter's shape, 3 x 3 x 3 x Cin x Cout), only the forward's convolutions
    (one per pair) and, contract first, their transposes in the image (the weights sit before the
    convolution there). One convolution
    (GINJAX_DENSE_THIN=0) makes its filter gradient by a convolution."""
    spec = layer(SPEC3, cin, cout)
    xs, ws, cots = _cases.spec_operands(spec, (4, 4, 4), 1, seed=2)
    x = [a[0] for a in xs]

    def convs():
        grad = jax.grad(lambda ws: sum(jnp.vdot(o, c[0]) for o, c in
                                       zip(kernels.conv_contract(spec, x, ws, backend="dense"), cots)))
        shapes = _conv_outputs(jax.make_jaxpr(grad)(ws).jaxpr)
        return [s for s in shapes if s[:3] != (3, 3, 3)], [s for s in shapes if s[:3] == (3, 3, 3)]

    monkeypatch.setenv(_thin.THIN_ENV, "1")
    images, filters = convs()
    assert len(images) == forward + dgrad and filters == []
    monkeypatch.setenv(_thin.THIN_ENV, "0")
    images, filters = convs()
    assert len(images) == 1 and filters == [(3, 3, 3, spec.cin, spec.cout)]


def test_tf32_and_bf16_within_their_tolerances(monkeypatch):
    monkeypatch.setenv(_thin.THIN_ENV, "1")
    for cin, cout in ((2, 16), (16, 1)):
        spec = layer(SPEC3, cin, cout)
        xs, ws, _ = _cases.spec_operands(spec, (4, 5, 6), 1, seed=9)
        x = [a[0] for a in xs]
        with jax.default_matmul_precision("highest"):
            want = kernels.conv_contract(spec, x, ws, backend="reference")
        for mode in ("tf32", "bf16"):
            got = kernels.conv_contract(spec, x, ws, backend="dense", precision=mode)
            assert max(rel_l2(g, w) for g, w in zip(got, want)) <= kernels.TOLERANCE[mode]
        assert np.all([np.isfinite(np.asarray(g)).all() for g in got])


def test_the_thin_spike_times_each_way_and_restores_the_switch(tmp_path, monkeypatch, capsys):
    """bench/thin_spike.py on a CPU-sized grid: every stage ok, each forward within fp32 reach of
    `reference` ('highest' on both sides), the form recorded as the switch made it, and the switch
    as it was afterwards; a bad --variants value is named."""
    from bench import thin_spike

    monkeypatch.setenv(_thin.THIN_ENV, "1")
    monkeypatch.delenv(_cuda_padding.PAD_CHANNELS_ENV, raising=False)
    with jax.default_matmul_precision("highest"):
        rc = thin_spike.main([str(tmp_path), "--spatial", "5", "--batch", "1", "--variants", "dense-thin,dense-one-conv",
                              "--modes", "fwd,dw"])
    rows = json.loads((tmp_path / "thin_spike.json").read_text())["stages"]
    assert rc == 0 and len(rows) == 8 and all(r["ok"] for r in rows.values())
    assert rows["first/dense-thin/fwd"]["form"] == "stencil-first" and rows["last/dense-thin/dw"]["form"] == "contract-first"
    assert rows["first/dense-one-conv/fwd"]["form"] == "one convolution"
    assert max(r["rel_l2"] for name, r in rows.items() if name.endswith("/fwd")) <= kernels.TOLERANCE["fp32"]
    assert all(r["ms"] > 0 for r in rows.values())
    assert os.environ[_thin.THIN_ENV] == "1" and _cuda_padding.PAD_CHANNELS_ENV not in os.environ
    # the padded variant: no CUDA kernels here, so `explain` names none (Triton's interpreter ran it)
    with jax.default_matmul_precision("highest"):
        rc = thin_spike.main([str(tmp_path), "--spatial", "5", "--batch", "1", "--variants", "cuda-padded",
                              "--modes", "fwd"])
    rows = json.loads((tmp_path / "thin_spike.json").read_text())["stages"]
    assert rc == 0 and sorted(rows) == ["first/cuda-padded/fwd", "last/cuda-padded/fwd"]
    assert "covers this configuration" in rows["first/cuda-padded/fwd"]["form"]
    assert "CUDA" not in rows["first/cuda-padded/fwd"]["form"]
    assert max(r["rel_l2"] for r in rows.values()) <= kernels.TOLERANCE["fp32"]
    assert _cuda_padding.PAD_CHANNELS_ENV not in os.environ
    with pytest.raises(SystemExit):
        thin_spike.main([str(tmp_path), "--variants", "cudnn"])
    assert "--variants (='cudnn') must be a comma-separated subset" in capsys.readouterr().err
    # a wide 2D layer (--dims, --layers) in both named forms and one convolution
    with jax.default_matmul_precision("highest"):
        rc = thin_spike.main([str(tmp_path), "--dims", "2", "--spatial", "6", "--batch", "2", "--layers", "w=8:8",
                              "--variants", ",".join(f"dense-{f}" for f in _thin.NAMED_FORMS) + ",dense-one-conv",
                              "--modes", "fwd"])
    rows = json.loads((tmp_path / "thin_spike.json").read_text())
    assert rc == 0 and rows["spatial"] == [6, 6] and sorted(rows["stages"]) == sorted(
        [f"w/dense-{f}/fwd" for f in _thin.NAMED_FORMS] + ["w/dense-one-conv/fwd"])
    assert [rows["stages"][f"w/dense-{f}/fwd"]["form"] for f in _thin.NAMED_FORMS] == list(_thin.NAMED_FORMS)
    assert max(r["rel_l2"] for r in rows["stages"].values()) <= kernels.TOLERANCE["fp32"]
    assert os.environ[_thin.THIN_ENV] == "1"
    for bad in ("w=8", "w=0:8", "=8:8", ""):
        with pytest.raises(SystemExit):
            thin_spike.main([str(tmp_path), "--layers", bad])
        assert "`--layers`" in capsys.readouterr().err
