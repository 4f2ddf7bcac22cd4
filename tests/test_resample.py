"""Upsampling and downsampling in the fast path.

`dense` runs transposed (lhs_dilation) convolutions by sub-pixel decomposition and strided ones by
space-to-depth (kernels/_resample.py): checked against `reference` at fp32, forward and gradients
(inputs and weights), on the recorded ginjax 0.1.8 cases and on hypothesis-drawn configurations;
the lowered forward and gradient must hold no lhs-dilated or strided convolution (cuDNN's slow
path on the GPU). The UNet and ResNet still match `reference`. MaxNormPool keeps its semantics
(ties to the first pixel) and lowers to reductions and selects only.
"""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import strategies as st

import ginjax.geometric as geom
import kernels
from ginjax import layers
from kernels import _resample

from conftest import (
    drawn_examples,
    run_drawn,
    conv_contract_case,
    conv_contract_cases,
    draw_keys_and_pairs,
    draw_padding,
    fixture_filters,
    fixture_spec,
    invariant_pairs,
    random_operands,
    rel_l2,
)
from test_models import build, random_image, rel_multi

FP32 = kernels.TOLERANCE["fp32"]


# ---- the HLO check: no convolution that dilates its input or strides its window -----------------
_CONV_LINE = re.compile(r"^.*convolution.*$", re.MULTILINE)
_WINDOW_FIELD = re.compile(
    r"\b(stride|window_strides|lhs_dilate|lhs_dilation)\s*=\s*(?:array<i64:\s*|dense<)?\[?([0-9,\s]+)"
)


def _convolutions_with(field: re.Pattern, hlo_text: str) -> list[str]:
    """The convolution lines of lowered (StableHLO) text where a `field` holds a value != 1."""
    return [line.strip() for line in _CONV_LINE.findall(hlo_text)
            if any(any(int(v) != 1 for v in values.replace(",", " ").split()) for _, values in field.findall(line))]


def resampling_convolutions(hlo_text: str) -> list[str]:
    """The convolution lines with a window stride or lhs dilation != 1."""
    return _convolutions_with(_WINDOW_FIELD, hlo_text)


def count_convolutions(hlo_text: str) -> int:
    return len(re.findall(r"stablehlo\.convolution|\bconvolution\(", hlo_text))


def test_hlo_check_catches_dilated_and_strided_convolutions():
    """The parser flags what lax emits for a transposed and for a strided convolution (so the
    checks below can fail), and passes a plain one."""
    x, w = jnp.ones((1, 6, 6, 2)), jnp.ones((2, 2, 2, 3))
    dn = ("NHWC", "HWIO", "NHWC")

    def lowered(**kw):
        return jax.jit(lambda a, b: jax.lax.conv_general_dilated(a, b, dimension_numbers=dn, **kw)).lower(x, w).as_text()

    assert resampling_convolutions(lowered(window_strides=(1, 1), padding=((1, 1),) * 2, lhs_dilation=(2, 2)))
    assert resampling_convolutions(lowered(window_strides=(2, 1), padding="VALID"))
    plain = lowered(window_strides=(1, 1), padding="VALID")
    assert count_convolutions(plain) == 1 and not resampling_convolutions(plain)


# ---- shared: dense vs reference, forward and gradients, and the lowering ------------------------
def _batched(spec, backend):
    return jax.vmap(
        lambda xs, ws: kernels.conv_contract(spec, xs, ws, backend=backend, precision="fp32"),
        in_axes=(0, None),
    )


def _grads_and_outputs(spec, backend):
    """jit of (xs, ws) -> ((d/dxs, d/dws), outputs) of a generic scalar loss of the outputs."""

    def loss(xs, ws):
        outs = _batched(spec, backend)(xs, ws)
        return sum(jnp.sum(jnp.sin(o) * (i + 1)) for i, o in enumerate(outs)), outs

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def _close(actual, expected, tol=FP32):
    """Relative L2 within `tol` over a list of blocks taken together, with a floor: the operands are
    standard normal, so a quantity that does not cancel has entries of order one, and one that
    cancels by the filters' symmetry (say a pseudoscalar-to-2-tensor gradient) is fp32 roundoff,
    1e-8 in one summation order and exactly 0 in another: it is held to tol * sqrt(size)
    absolutely (as is an output whose taps all fall in dilation holes)."""
    flat = lambda blocks: np.concatenate([np.ravel(np.asarray(b, np.float64)) for b in blocks])
    actual, expected = flat(actual), flat(expected)
    scale = max(float(np.linalg.norm(expected)), float(np.sqrt(expected.size)))
    assert float(np.linalg.norm(actual - expected)) <= tol * scale


def check_against_reference(spec, inputs, weights):
    """dense == reference at fp32 (outputs, input and weight gradients), and dense's lowered
    forward + gradient holds no lhs-dilated or strided convolution. Returns dense's lowering."""
    inputs = [jnp.asarray(x) for x in inputs]
    weights = [jnp.asarray(w) for w in weights]
    (dx_ref, dw_ref), out_ref = _grads_and_outputs(spec, "reference")(inputs, weights)
    lowered = _grads_and_outputs(spec, "dense").lower(inputs, weights)
    bad = resampling_convolutions(lowered.as_text())
    assert not bad, bad
    (dx, dw), out = lowered.compile()(inputs, weights)
    assert [o.shape for o in out] == [o.shape for o in out_ref]
    for got, want in zip(out, out_ref):
        _close([got], [want])
    _close(dx, dx_ref)
    _close(dw, dw_ref)
    return lowered


# ---- recorded ginjax 0.1.8 cases ------------------------------------------------------------------
def _resampling_cases():
    cases = []
    for case in conv_contract_cases():
        kw = conv_contract_case(case)[0]["kwargs"]
        if kw.get("lhs_dilation") or kw.get("stride", 1) != 1:
            cases.append(case)
    return cases


def test_fixtures_have_upsampling_and_strided_cases():
    kinds = {_resample.method(fixture_spec(*conv_contract_case(c))[0]) for c in _resampling_cases()}
    assert kinds == {"subpixel", "space_to_depth"}


@pytest.mark.parametrize("case", _resampling_cases())
def test_fixture_cases(case):
    """The recorded outputs, then dense vs reference on fresh operands (with a batch of 2)."""
    meta, arrays = conv_contract_case(case)
    spec, inputs, weights, expected = fixture_spec(meta, arrays)
    if not meta["use_bias"]:
        outs = kernels.conv_contract(spec, inputs, weights, backend="dense", precision="fp32")
        for got, want in zip(outs, expected):
            assert got.shape == want.shape and rel_l2(got, want) <= FP32
    spatial = tuple(np.asarray(inputs[0]).shape[1 : 1 + spec.D])
    xs, ws = random_operands(spec, spatial, seed=14, batch=2, dtype=np.float32)
    check_against_reference(spec, xs, ws)


# ---- padding past the filter: the lax convolutions' gradients on XLA:CPU -----------------------
# (spatial, filter, padding, lhs_dilation, rhs_dilation, stride). The first case's input gradient,
# taken by JAX through lax.conv_general_dilated directly, is a convolution with low padding -1 and
# high padding 1, which XLA:CPU's f32 convolution computes from memory past the input
# (openxla/xla#48713: relative error 1e30 here). The others pad past the filter without that shape.
PAST_THE_FILTER = [
    ((4, 4), (2, 2), ((1, 1), (2, 0)), (2, 2), (1, 1), 1),
    ((6, 5), (3, 3), ((3, 1), (0, 3)), (1, 1), (1, 1), 1),
    ((7, 6), (3, 2), ((4, 0), (3, 1)), (1, 1), (2, 1), 2),
    ((5, 5, 5), (2, 2, 2), ((2, 0), (1, 1), (0, 2)), (2, 2, 2), (1, 1, 1), 1),
]


@pytest.mark.parametrize("case", PAST_THE_FILTER)
def test_lax_convolution_gradients_with_padding_past_the_filter(case):
    """The lax convolution every lax path shares (reference, dense, geom.convolve): fp32 gradients
    within fp32 tolerance of the float64 ones."""
    from kernels._lax_common import conv_general_channels_last

    spatial, taps, padding, lhs, rhs, stride = case
    D = len(spatial)
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((1,) + spatial + (3,)), rng.standard_normal(taps + (3, 2))

    def loss(x, w):
        y = conv_general_channels_last(x, w, stride=(stride,) * D, padding=padding, lhs_dilation=lhs, rhs_dilation=rhs)
        return jnp.sum(jnp.sin(y))

    with jax.enable_x64(True):
        want = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(w))
        got = jax.grad(loss, (0, 1))(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
        assert got[0].dtype == jnp.float32 and want[0].dtype == jnp.float64
    for g, e in zip(got, want):
        _close([g], [e])


def test_geom_convolve_input_gradient_with_padding_past_the_filter():
    """The same through ginjax's public convolve: an upsampling with padding (1, 1) and (2, 0)."""
    rng = np.random.default_rng(8)
    image = rng.standard_normal((1, 2, 4, 4))  # (batch, in_c, *spatial), scalars
    filt = rng.standard_normal((3, 2, 2, 2))  # (out_c, in_c, *taps)

    def loss(image):
        out = geom.convolve(2, image, filt.astype(image.dtype), False, padding=((1, 1), (2, 0)), lhs_dilation=(2, 2))
        return jnp.sum(jnp.sin(out))

    with jax.enable_x64(True):
        want = jax.grad(loss)(jnp.asarray(image))
        got = jax.grad(loss)(jnp.asarray(image, jnp.float32))
    _close([got], [want])


# ---- hypothesis: D 2/3, s 2/3, M 2/3, paddings, torus or not, key orders 0-2 ---------------------
KEYS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]


@st.composite
def resampling_layers(draw):
    D, M, in_keys, out_keys, pairs = draw_keys_and_pairs(draw, KEYS, 2)
    assume(M in (2, 3))
    s = draw(st.integers(2, 3))
    is_torus = draw(st.one_of(st.booleans(), st.tuples(*[st.booleans()] * D)))
    if draw(st.booleans()):  # transposed: lhs_dilation s, explicit or simple padding
        padding = draw(
            st.one_of(
                st.sampled_from(["VALID", 1]),
                st.tuples(*[st.tuples(st.integers(0, M), st.integers(0, M))] * D),
            )
        )
        stride, lhs, rhs = 1, (s,) * D if draw(st.booleans()) else tuple(draw(st.integers(1, 3)) for _ in range(D)), 1
        assume(any(v > 1 for v in lhs))
    else:  # strided, maybe with an rhs_dilation
        padding = draw_padding(draw, D, M)
        stride = (s,) * D if draw(st.booleans()) else tuple(draw(st.integers(1, 3)) for _ in range(D))
        assume(any(v > 1 for v in stride))
        lhs, rhs = None, draw(st.integers(1, 2))
    N = draw(st.integers(4, 7) if D == 2 else st.integers(3, 4))
    spec = kernels.make_spec(D, in_keys, out_keys, pairs, is_torus, stride, padding, lhs, rhs)
    assume(all(max(tp) <= N for tp in spec.torus_pad))
    assume(all(n > 0 for n in spec.out_spatial((N,) * D)))
    return spec, N


def _drawn_layers_match_reference(cfg, seed):
    spec, N = cfg
    assert _resample.method(spec) in ("subpixel", "space_to_depth")
    xs, ws = random_operands(spec, (N,) * spec.D, seed, batch=2, dtype=np.float32)
    check_against_reference(spec, xs, ws)


@drawn_examples(4, 12)
def test_drawn_layers_match_reference(examples):
    run_drawn(_drawn_layers_match_reference, examples, cfg=resampling_layers(), seed=st.integers(0, 2**31 - 1))


# ---- rhs-dilated layers as undilated phases (a GPU's default; $GINJAX_DENSE_DILATED) -------------
_RHS_FIELD = re.compile(r"\b(rhs_dilate|rhs_dilation)\s*=\s*(?:array<i64:\s*|dense<)?\[?([0-9,\s]+)")


def dilated_convolutions(hlo_text: str) -> list[str]:
    """The convolution lines with an rhs (filter) dilation != 1."""
    return _convolutions_with(_RHS_FIELD, hlo_text)


def test_hlo_check_catches_rhs_dilated_convolutions():
    x, w = jnp.ones((1, 9, 9, 2)), jnp.ones((3, 3, 2, 3))
    dn = ("NHWC", "HWIO", "NHWC")
    lowered = lambda r: jax.jit(lambda a, b: jax.lax.conv_general_dilated(
        a, b, (1, 1), "VALID", rhs_dilation=r, dimension_numbers=dn)).lower(x, w).as_text()
    assert dilated_convolutions(lowered((2, 1))) and not dilated_convolutions(lowered((1, 1)))


def _dilated_spec(D, r, torus, padding, M=3):
    filters = fixture_filters(D, M)
    ins = [(0, 0, 3), (1, 0, 2)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 3)])
    return kernels.make_spec(D, ins, outs, pairs, torus, 1, padding, None, r)


@pytest.mark.parametrize("D, N, r, torus, padding", [
    (2, 8, 2, True, None),            # DilResNet's: a torus, 'same' size
    (2, (8, 12), 4, True, None),      # the wrap covers most of the grid
    (2, 9, 3, False, "SAME"),         # zero padding
    (2, (6, 10), (2, 1), (True, False), ((2, 2), (1, 0))),  # per-axis dilation, torus, padding
    (3, 4, 2, True, None),
    (3, (6, 8, 9), (1, 2, 3), False, "VALID"),  # outputs 4, 4, 3: each divides by its r
], ids=["d2-torus", "d2-torus-r4", "d2-zeros", "d2-mixed", "d3-torus", "d3-valid-mixed"])
def test_dilated_phases_match_reference_without_a_dilated_convolution(D, N, r, torus, padding, monkeypatch):
    """With $GINJAX_DENSE_DILATED=phases an rhs-dilated layer is one undilated convolution over the
    r^D phases: values and gradients against `reference` at fp32, and no rhs-dilated convolution
    in the lowered forward and gradient (cuDNN's dilated backward is its slow path)."""
    monkeypatch.setenv(_resample.DILATED_ENV, "phases")
    spec = _dilated_spec(D, r, torus, padding)
    grid = N if isinstance(N, tuple) else (N,) * D
    assert _resample.method(spec) == "dilated_phases" and _resample.dilated_phases_fit(spec, grid)
    xs, ws = random_operands(spec, grid, seed=5, batch=2, dtype=np.float32)
    text = check_against_reference(spec, xs, ws).as_text()
    assert count_convolutions(text) > 0 and not dilated_convolutions(text), dilated_convolutions(text)
    assert "dilation phases" in kernels.explain(spec, grid, backend="dense").reason


def test_dilated_layers_off_the_phases(monkeypatch):
    """By default on a CPU (phases on a GPU), with GINJAX_DENSE_DILATED=lax, and on a grid whose
    output extent does not divide by r, the layer is one dilated lax convolution (checked against
    `reference` too), and explain says which."""
    spec = _dilated_spec(2, 2, True, None)
    monkeypatch.delenv(_resample.DILATED_ENV, raising=False)
    with monkeypatch.context() as m:
        m.setattr(jax, "default_backend", lambda: "gpu")
        assert _resample.dilated_form() == "phases" and _resample.method(spec) == "dilated_phases"
    monkeypatch.setenv(_resample.DILATED_ENV, "lax")
    assert _resample.dilated_form() == "lax" and _resample.method(spec) == "lax"
    monkeypatch.delenv(_resample.DILATED_ENV)
    want = "phases" if jax.default_backend() == "gpu" else "lax"
    assert _resample.dilated_form() == want and _resample.method(spec) == ("dilated_phases" if want == "phases" else "lax")
    monkeypatch.setenv(_resample.DILATED_ENV, "lax")
    xs, ws = random_operands(spec, (8, 8), seed=6, batch=2, dtype=np.float32)
    assert dilated_convolutions(_grads_and_outputs(spec, "dense").lower(xs, ws).as_text())
    assert "a GPU splits it into undilated phases" in kernels.explain(spec, (8, 8), backend="dense").reason
    monkeypatch.setenv(_resample.DILATED_ENV, "phases")
    assert not _resample.dilated_phases_fit(spec, (7, 8))  # 7 cells a side on a torus: 7 outputs
    xs, ws = random_operands(spec, (7, 8), seed=7, batch=2, dtype=np.float32)
    inputs, weights = [jnp.asarray(x) for x in xs], [jnp.asarray(w) for w in ws]
    (dx, dw), out = _grads_and_outputs(spec, "dense")(inputs, weights)
    (dx_ref, dw_ref), out_ref = _grads_and_outputs(spec, "reference")(inputs, weights)
    for got, want in ((out, out_ref), (dx, dx_ref), (dw, dw_ref)):
        _close(got, want)
    assert dilated_convolutions(_grads_and_outputs(spec, "dense").lower(inputs, weights).as_text())
    assert "does not divide into its phases" in kernels.explain(spec, (7, 8), backend="dense").reason
    monkeypatch.setenv(_resample.DILATED_ENV, "holes")
    with pytest.raises(ValueError, match="`GINJAX_DENSE_DILATED` \\(='holes'\\) must be one of"):
        _resample.method(spec)


@pytest.mark.parametrize("D", [2, 3])
def test_unet_upsampling_is_one_gemm(D):
    """lhs_dilation 2, 2^D filters, padding 1 (the UNet's upsampling): no convolution at all, in the
    forward and in the gradient, and explain says so."""
    filters = fixture_filters(D, 2)
    ins = [(0, 0, 3), (1, 0, 2)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 3)])
    spec = kernels.make_spec(D, ins, outs, pairs, True, 1, ((1, 1),) * D, (2,) * D)
    xs, ws = random_operands(spec, (4,) * D, seed=3, batch=2, dtype=np.float32)
    assert count_convolutions(check_against_reference(spec, xs, ws).as_text()) == 0
    why = kernels.explain(spec, (4,) * D, backend="dense").reason
    assert f"sub-pixel GEMM (lhs_dilation 2, {2**D} phases, 1 tap each" in why
    assert "sub-pixel GEMM" in kernels.explain(spec, (4,) * D).reason  # auto runs dense on a CPU


@pytest.mark.parametrize("D, s, pad", [(2, 2, (1, 1)), (2, 2, (0, 1)), (2, 3, (2, 0)), (3, 2, (1, 1)), (3, 2, (1, 0))])
def test_the_one_gemm_in_either_product_order(D, s, pad, monkeypatch):
    """The one-GEMM sub-pixel form (filter side = lhs_dilation) with its product channels last (a
    CPU's default) and channels first (a GPU's; $GINJAX_SUBPIXEL_ORDER): each against `reference`
    at fp32, values and gradients, no convolution; the two orders' outputs agree to rounding."""
    filters = fixture_filters(D, s)
    ins = [(0, 0, 3), (1, 0, 2)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 3)])
    spec = kernels.make_spec(D, ins, outs, pairs, True, 1, (pad,) * D, (s,) * D)
    xs, ws = random_operands(spec, (5,) * D, seed=21, batch=2, dtype=np.float32)
    got = {}
    for order in ("channels-last", "channels-first"):
        monkeypatch.setenv(_resample.SUBPIXEL_ORDER_ENV, order)
        assert _resample.subpixel_order() == order
        assert count_convolutions(check_against_reference(spec, xs, ws).as_text()) == 0
        assert _resample.gives_channels_first(spec) == (order == "channels-first")
        assert ("product channels first" in kernels.explain(spec, (5,) * D, backend="dense").reason) == (
            order == "channels-first")
        got[order] = jax.vmap(lambda x, w=ws: kernels.conv_contract(spec, x, w, backend="dense", precision="fp32"))(
            [jnp.asarray(x) for x in xs])
    for a, b in zip(got["channels-last"], got["channels-first"]):
        assert a.shape == b.shape and rel_l2(b, a) <= 1e-6
    monkeypatch.delenv(_resample.SUBPIXEL_ORDER_ENV)
    assert _resample.subpixel_order() == ("channels-first" if jax.default_backend() == "gpu" else "channels-last")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert _resample.subpixel_order() == "channels-first"
    monkeypatch.setenv(_resample.SUBPIXEL_ORDER_ENV, "rows")
    with pytest.raises(ValueError, match="`GINJAX_SUBPIXEL_ORDER` \\(='rows'\\) must be one of"):
        _resample.subpixel_order()


def test_explain_names_the_form():
    filters = fixture_filters(2, 3)
    ins = [(0, 0, 1)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 1)])
    make = lambda **kw: kernels.make_spec(2, ins, outs, pairs, False, **kw)
    cases = {
        "sub-pixel decomposition (lhs_dilation 2, 4 phases of 1-4 taps": make(padding=((1, 1),) * 2, lhs_dilation=2),
        "space-to-depth + stride-1 convolution (stride 2, 4 residues": make(stride=2, padding="SAME"),
        "space-to-depth GEMM (stride 3, 9 residues": make(stride=3, padding="VALID"),
        "one lax convolution with lhs_dilation 2, stride 2": make(stride=2, padding=((1, 1),) * 2, lhs_dilation=2),
    }
    for text, spec in cases.items():
        assert text in kernels.explain(spec, (8, 8), backend="dense").reason
    assert "runs it as" not in kernels.explain(make(padding="SAME"), (8, 8), backend="dense").reason


@pytest.mark.parametrize("s,M,lo", [(2, 2, 1), (2, 3, 1), (3, 2, 0), (3, 5, 4), (2, 3, -1)])
def test_axis_phases_cover_every_tap_once(s, M, lo):
    """Each tap belongs to exactly one phase, and a phase's taps read consecutive inputs."""
    phases = _resample.axis_phases(s, M, lo)
    taps = sorted(t for p in phases for t in range(p.first_tap, M, s))
    assert taps == list(range(M)) and sum(p.n_taps for p in phases) == M
    for phi, p in enumerate(phases):
        for u, t in enumerate(range(p.first_tap, M, s)):
            assert (phi + t - lo) % s == 0 and (phi + t - lo) // s == p.offset + u


# ---- models ---------------------------------------------------------------------------------------
def _model_loss(model, x):
    out, _ = model(x)
    return sum(jnp.sum(jnp.sin(out[k])) for k in out.keys()), out


@pytest.mark.parametrize(
    "name,D,levels",
    [("UNet", 2, 1), ("UNet", 3, 1), ("ResNet", 2, 1)],
)
def test_models_match_reference(name, D, levels):
    """Outputs and every parameter gradient of the model on `dense` equal those on `reference`
    (the UNet's pooling and upsampling included; the ResNet has neither: a regression check)."""
    model = build(name, D, levels=levels) if name == "UNet" else build(name, D)
    x = random_image(D, seed=4, n=8 if D == 2 else 4)
    step = eqx.filter_jit(eqx.filter_grad(_model_loss, has_aux=True))
    results = {}
    with jax.default_matmul_precision("highest"):
        for backend in ("reference", "dense"):
            with kernels.use_backend(backend):
                grads, out = step(model, x)
            results[backend] = (out, jax.tree_util.tree_leaves(eqx.filter(grads, eqx.is_array)))
    assert rel_multi(results["dense"][0], results["reference"][0]) <= FP32
    got, want = results["dense"][1], results["reference"][1]
    assert len(got) == len(want) and len(got) > 0
    flat = lambda leaves: np.concatenate([np.ravel(a) for a in leaves])
    assert rel_l2(flat(got), flat(want)) <= FP32


# ---- MaxNormPool ------------------------------------------------------------------------------------
def _pool_oracle(D, block, p, use_norm):
    """Loops in numpy: the first pixel (row-major in the patch) of largest norm or value wins.
    Returns the pooled block and the 0/1 mask of the winners in the input's shape."""
    block = np.asarray(block, np.float64)
    c, spatial, tensor = block.shape[0], block.shape[1 : 1 + D], block.shape[1 + D :]
    coarse = tuple(n // p for n in spatial)
    out = np.zeros((c,) + coarse + tensor)
    mask = np.zeros(block.shape[: 1 + D])
    for ch in range(c):
        for cell in np.ndindex(*coarse):
            pixels = [tuple(q * p + o for q, o in zip(cell, off)) for off in np.ndindex(*((p,) * D))]
            vals = [block[(ch,) + px] for px in pixels]
            scores = [np.sum(v * v) if use_norm else float(v) for v in vals]
            k = int(np.argmax(scores))
            out[(ch,) + cell] = vals[k]
            mask[(ch,) + pixels[k]] = 1.0
    return out, mask


def _tied_block(rng, D, c, n, k):
    """Random tensors where many patches hold equal norms (rotated copies) and equal scalars."""
    base = rng.integers(-2, 3, size=(c,) + (n,) * D + (D,) * k).astype(np.float32)
    if k == 1:  # permuted components: same norm, different tensor
        flip = rng.random((c,) + (n,) * D) < 0.5
        base = np.where(flip[..., None], base[..., ::-1], base)
    return base


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("k,use_norm", [(0, True), (0, False), (1, True), (2, True)])
def test_max_norm_pool_matches_oracle_with_ties(D, k, use_norm):
    rng = np.random.default_rng(7 + D + k)
    n, p = (6, 2) if D == 2 else (4, 2)
    for block in (_tied_block(rng, D, 2, n, k), rng.standard_normal((2,) + (n,) * D + (D,) * k).astype(np.float32)):
        key = ((False,) * k, 0)
        x = geom.MultiImage({key: jnp.asarray(block)}, D)
        pool = layers.MaxNormPool(p, use_norm)
        want, mask = _pool_oracle(D, block, p, use_norm)
        np.testing.assert_array_equal(np.asarray(pool(x)[key]), want.astype(np.float32))
        # the gradient flows to the winning pixel only
        g = rng.standard_normal(want.shape).astype(np.float32)
        grad = jax.grad(lambda b: jnp.sum(pool(geom.MultiImage({key: b}, D))[key] * g))(jnp.asarray(block))
        up = g
        for ax in range(D):
            up = np.repeat(up, p, axis=1 + ax)
        expected = up * mask.reshape(mask.shape + (1,) * k)
        np.testing.assert_array_equal(np.asarray(grad), expected)


def test_max_norm_pool_lowers_without_gather_or_scatter():
    D, k = 3, 1
    key = ((False,) * k, 0)
    pool = layers.MaxNormPool(2, True)
    loss = lambda b: jnp.sum(jnp.sin(pool(geom.MultiImage({key: b}, D))[key]))
    block = jnp.ones((2,) + (4,) * D + (D,) * k)
    forbidden = re.compile(r"\b(gather|scatter|select_and_scatter|transpose)\b")
    for fn in (lambda b: pool(geom.MultiImage({key: b}, D))[key], jax.grad(loss)):
        text = jax.jit(fn).lower(block).as_text()
        assert not forbidden.findall(text), sorted(set(forbidden.findall(text)))
    # the pattern is live: a gather-based pool would be caught
    gathered = jax.jit(lambda b: jnp.take_along_axis(b, jnp.zeros((2, 1), jnp.int32), axis=1)).lower(jnp.ones((2, 4)))
    assert forbidden.findall(gathered.as_text())
