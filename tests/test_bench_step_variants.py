"""bench/step_variants.py: variants are applied while a step is traced and undone after, and each
one changes the program it names (else its A/B would time the same program twice)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest

from bench import step_variants
from kernels import _reduce


def test_variant_sets_and_restores_env_and_attributes(monkeypatch):
    monkeypatch.delenv("GINJAX_VN_LAYOUT", raising=False)
    split = _reduce._split
    with step_variants.variant("vn-minor"):
        assert os.environ["GINJAX_VN_LAYOUT"] == "minor"
    assert "GINJAX_VN_LAYOUT" not in os.environ
    with pytest.raises(RuntimeError):
        with step_variants.variant("plain-middle-sum"):
            assert _reduce._split(4096, 3) is None
            raise RuntimeError("inside")
    assert _reduce._split is split and split(4096, 3) is not None
    with pytest.raises(ValueError, match=r"variant \(='nope'\) must be one of"):
        with step_variants.variant("nope"):
            pass


def _vector_neuron(x):
    from ginjax._vector_neuron import vector_neuron

    return vector_neuron(jnp.eye(2), x, 3, jax.nn.relu, 1e-5)


# (variant, the variant it is compared with: on this CPU "baseline" already runs vn-xla's path)
@pytest.mark.parametrize("name, base_name, fn", [
    ("plain-middle-sum", "baseline", lambda x: _reduce.middle_sum(x, 1, 4)),
    ("vn-triton", "baseline", _vector_neuron),
    ("vn-xla", "vn-triton", _vector_neuron),
    ("vn-planar", "baseline", _vector_neuron),
])
def test_each_variant_changes_the_program(name, base_name, fn):
    x = jnp.ones((2, 16, 16, 16, 3))
    with step_variants.variant(base_name):
        base = jax.jit(fn).lower(x).as_text()
    with step_variants.variant(name):
        other = jax.jit(lambda x: fn(x)).lower(x).as_text()
    assert base != other


def test_thin_two_stages_puts_the_thin_layer_in_its_two_stages(monkeypatch):
    """thin-two-stages (GINJAX_DENSE_THIN=1): a model's first layer on dense in two stages; by
    default (baseline) one convolution."""
    from bench import _cases, _configs
    from kernels import _thin

    monkeypatch.delenv(_thin.THIN_ENV, raising=False)
    first = _cases.with_channels(_cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"]), 2, 16)
    forms = {}
    for name in ("baseline", "thin-two-stages"):
        with step_variants.variant(name):
            forms[name] = _thin.thin_form(first)
    assert forms == {"baseline": None, "thin-two-stages": "stencil-first"}, forms


def test_vn_c32_tiling_before_restores_the_register_pick():
    """vn-c32-tiling-before: the 32-channel VectorNeuron backward at (16, 8) while it is applied,
    the measured (32, 4) before and after; other sizes untouched."""
    from kernels.triton import _vn_kernel

    shipped = dict(_vn_kernel._DEFAULT_TILING)
    assert shipped[32, False][1] == (32, 4)
    with step_variants.variant("vn-c32-tiling-before"):
        assert _vn_kernel._DEFAULT_TILING[32, False] == (shipped[32, False][0], (16, 8))
        assert {k: v for k, v in _vn_kernel._DEFAULT_TILING.items() if k != (32, False)} == \
            {k: v for k, v in shipped.items() if k != (32, False)}
    assert _vn_kernel._DEFAULT_TILING == shipped


def test_subpixel_channels_first_reorders_the_upsampling_gemm():
    """subpixel-channels-first (GINJAX_SUBPIXEL_ORDER): the UNet's upsampling on dense lowers to
    another program (the GEMM's product channels first), with the same values."""
    import kernels
    from conftest import fixture_filters, invariant_pairs, random_operands

    filters = fixture_filters(3, 2)
    ins = [(0, 0, 2), (1, 0, 2)]
    outs, pairs = invariant_pairs(filters, ins, [(0, 0, 2), (1, 0, 2)])
    spec = kernels.make_spec(3, ins, outs, pairs, True, 1, ((1, 1),) * 3, (2,) * 3)
    xs, ws = random_operands(spec, (4,) * 3, seed=5, batch=1, dtype="float32")
    xs, ws = [jnp.asarray(x[0]) for x in xs], [jnp.asarray(w) for w in ws]
    texts, values = {}, {}
    for name in ("baseline", "subpixel-channels-first"):
        with step_variants.variant(name):
            fn = jax.jit(lambda x: kernels.conv_contract(spec, x, ws, backend="dense", precision="fp32"))
            texts[name], values[name] = fn.lower(xs).as_text(), fn(xs)
    assert texts["baseline"] != texts["subpixel-channels-first"]
    for a, b in zip(values["baseline"], values["subpixel-channels-first"]):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_norm_apart_takes_the_norm_out_of_the_kernels(monkeypatch):
    # with the Triton VectorNeuron on planar blocks (the GPU's default) the norm is the kernels'
    # affine operand; norm-apart applies it first, so the kernel's launch has one operand fewer
    from ginjax import geometric as geom, layers

    monkeypatch.setenv("GINJAX_VN_IMPL", "triton")
    monkeypatch.setenv("GINJAX_VN_LAYOUT", "planar")
    sig = geom.Signature((((((False,), 0), 2),)))
    norm = layers.GroupNorm(sig, 3, 1)
    act = layers.VectorNeuronNonlinear(sig, 3, key=jax.random.PRNGKey(0))
    x = geom.MultiImage({((False,), 0): jnp.ones((2, 4, 4, 4, 3)) + jnp.arange(3.0)}, 3, True)
    fn = lambda x: layers.normalize_and_activate(norm, act, x)[((False,), 0)]  # noqa: E731
    operands = {}
    for name in ("baseline", "norm-apart"):
        with step_variants.variant(name):
            jaxpr = jax.make_jaxpr(lambda x: fn(x))(x)
        operands[name] = [len(e.invars) for e in jaxpr.jaxpr.eqns if "callback" in e.primitive.name
                          or e.primitive.name == "custom_vjp_call"]
    assert operands["baseline"] and operands["norm-apart"] and operands["baseline"] != operands["norm-apart"], operands


def test_unknown_variant_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        step_variants.main(["/tmp/unused", "--variants", "baseline,nope"])
    assert "--variants: variant (='nope') must be one of" in capsys.readouterr().err


def test_small_model_step_under_two_variants(tmp_path):
    step_variants.main([str(tmp_path), "--configs", "resnet_d2_n16_b2", "--variants", "baseline,plain-middle-sum",
                        "--alternations", "1", "--max-time", "0.05"])
    rows = json.loads((tmp_path / "step_variants.json").read_text())["configs"]["resnet_d2_n16_b2"]
    assert set(rows) == {"baseline", "plain-middle-sum"}
    assert all(r["median_ms"] > 0 for r in rows.values())


def test_backend_variants_compile_under_their_backend(tmp_path, monkeypatch):
    from bench import _cases, _timing

    seen = []
    compile_for = _timing.compile_for

    def spy(fn, args, backend=None, *rest, **kw):
        seen.append(backend)
        return compile_for(fn, args, backend, *rest, **kw)

    monkeypatch.setattr(_timing, "compile_for", spy)

    class TinyCase:  # a step that compiles in milliseconds: what is checked is the backend handed over
        def __init__(self, cfg):
            pass

        def function(self, mode):
            return (lambda x: x * 2.0), (jnp.ones(3),)

    monkeypatch.setattr(_cases, "ModelCase", TinyCase)
    step_variants.main([str(tmp_path), "--configs", "resnet_d2_n16_b2", "--variants", "backend=dense,backend=reference,baseline",
                        "--alternations", "1", "--max-time", "0.01"])
    assert seen == ["dense", "reference", None]
    rows = json.loads((tmp_path / "step_variants.json").read_text())["configs"]["resnet_d2_n16_b2"]
    assert set(rows) == {"backend=dense", "backend=reference", "baseline"}
    assert all(r["median_ms"] > 0 for r in rows.values())
    with pytest.raises(ValueError, match="names backend 'nope'"):
        step_variants._check("backend=nope")
    with pytest.raises(SystemExit):
        step_variants.main([str(tmp_path), "--variants", "backend=auto,backend=nope"])


def test_configs_take_sets_and_reject_unknown_names(capsys):
    with pytest.raises(SystemExit):
        step_variants.main(["/tmp/unused", "--configs", "models-b1,nope", "--variants", "baseline"])
    assert "--configs (='models-b1,nope'): unknown name 'nope'" in capsys.readouterr().err


def test_table_variant_ranks_from_the_given_table(tmp_path, monkeypatch):
    """`table=PATH`: while it is applied, `auto`'s ranking reads PATH (here a table in which
    triton beats dense on one signature, so the verdict flips), and the committed table after;
    a table of neither this device nor its compute capability's stand-in is refused."""
    from bench import _configs, _cases
    from kernels import _measured, _registry

    spec = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
    spatial = (8, 8, 8)
    kind = "NVIDIA H200"
    times = {"fwd_bwd": {"dense": 2.0, "triton": 1.0}}
    entry = {**_measured.describe(spec, spatial), "batches": {"1": times}, "used_by": []}
    table = {"device_kind": kind, "exact": {_measured.signature(spec, spatial, "float32"): entry}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(_registry, "device_kind", lambda: "cpu")
    with pytest.raises(ValueError, match="the table is for 'NVIDIA H200'; this device is 'cpu'"):
        with step_variants.variant(f"table={path}"):
            pass
    monkeypatch.setattr(_registry, "device_kind", lambda: kind)
    before = _measured.load
    committed = _measured.ranking(kind, spec, spatial, "float32", batch=1)
    assert "triton" not in committed[0]  # the committed table has no such win: the variant must flip it
    with step_variants.variant(f"table={path}"):
        ms, rule = _measured.ranking(kind, spec, spatial, "float32", batch=1)
        assert ms == {"dense": 2.0, "triton": 1.0} and rule == "exact match at batch 1"
        assert _measured.load("cpu") is None  # the variant's table alone
    monkeypatch.setattr(_registry, "device_kind", lambda: "NVIDIA H100 80GB HBM3")  # its stand-in's table
    monkeypatch.setattr(_registry, "device_capability", lambda: "9.0")
    with step_variants.variant(f"table={path}"):
        assert _measured.device_table("NVIDIA H100 80GB HBM3", "9.0")[1]["exact"] == table["exact"]
    assert _measured.load is before
    assert _measured.ranking(kind, spec, spatial, "float32", batch=1) == committed
    with pytest.raises(ValueError, match="names no table file"):
        with step_variants.variant(f"table={tmp_path / 'missing.json'}"):
            pass


def test_environment_sets_its_values_and_restores_each_name(monkeypatch):
    """kernels._env.environment, which the variants and the spikes set their switches with: set
    within the block, then as before (a set name back to its value, an unset one unset), also
    when the block raises."""
    from kernels._env import environment

    monkeypatch.setenv("GINJAX_TEST_A", "before")
    monkeypatch.delenv("GINJAX_TEST_B", raising=False)
    with pytest.raises(RuntimeError, match="inside"):
        with environment({"GINJAX_TEST_A": "1", "GINJAX_TEST_B": "2"}):
            assert os.environ["GINJAX_TEST_A"] == "1" and os.environ["GINJAX_TEST_B"] == "2"
            raise RuntimeError("inside")
    assert os.environ["GINJAX_TEST_A"] == "before" and "GINJAX_TEST_B" not in os.environ
