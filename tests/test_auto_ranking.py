"""`auto`'s measured ranking (kernels/_measured.py) and the bench tooling that fills its table
(bench/model_layers.py, bench/measure_auto.py): exact entries first, a fused backend only where it
was measured faster than dense, the conservative rule for configurations not measured."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest

import kernels
from kernels import _measured, _registry

from conftest import fixture_filters


def _spec(c: int = 16, D: int = 3, **geometry):
    f = fixture_filters(D, 3)
    pairs = [(0, 0, f[(0, 0)]), (0, 1, f[(1, 0)]), (1, 0, f[(1, 0)]), (1, 1, f[(2, 0)])]
    return kernels.make_spec(D, [(0, 0, c), (1, 0, c)], [(0, 0, c), (1, 0, c)], pairs, True, **geometry)


def _table(*entries) -> dict:
    """A table file's content: entries are (spec, spatial, {batch: {backend: fwd_bwd ms}})."""
    exact = {}
    for spec, spatial, batches in entries:
        exact[_measured.signature(spec, spatial)] = {
            **_measured.describe(spec, spatial),
            "batches": {str(b): {"fwd_bwd": ms} for b, ms in batches.items()},
        }
    return {"device_kind": "Test GPU", "configs": {}, "exact": exact}


N64 = (64, 64, 64)


def test_signature_is_exact_and_readable():
    spec = _spec()
    sig = _measured.signature(spec, N64)
    assert sig == _measured.signature(_spec(), N64, "float32")
    assert sig.startswith("D3 in[0.0x16,1.0x16] out[0.0x16,1.0x16] M3,3,3 s1,1,1 ld1,1,1 rd1,1,1 ttt")
    assert "N64,64,64 float32 basis:" in sig
    others = {_measured.signature(_spec(8), N64), _measured.signature(spec, (32, 32, 32)),
              _measured.signature(spec, N64, "bfloat16"), _measured.signature(_spec(rhs_dilation=2), N64)}
    assert sig not in others and len(others) == 4


def test_exact_match_keeps_a_fused_backend_only_where_it_beats_dense_at_every_batch():
    spec = _spec()
    wins = _table((spec, N64, {1: {"dense": 2.0, "triton": 1.0}, 4: {"dense": 8.0, "triton": 4.0}}))
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=wins)
    assert rule.startswith("exact match") and ms == {"dense": 4.0, "triton": 2.0}  # geometric means
    loses_once = _table((spec, N64, {1: {"dense": 2.0, "triton": 1.0}, 4: {"dense": 8.0, "triton": 9.0, "pallas": 7.0}}))
    ms, _ = _measured.ranking("Test GPU", spec, N64, table=loses_once)
    assert ms == {"dense": 4.0}  # pallas was not measured at batch 1: not shown faster either


def test_unmeasured_configurations_take_the_conservative_rule():
    measured = [(_spec(16), N64, {4: {"dense": 7.0, "triton": 5.0}}), (_spec(24), N64, {4: {"dense": 9.0, "triton": 8.0}})]
    # 20 channels per key: both measured ones are within a factor 2 and triton beat dense on both
    ms, rule = _measured.ranking("Test GPU", _spec(20), N64, table=_table(*measured))
    assert "similar" in rule and set(ms) == {"dense", "triton"} and ms["triton"] < ms["dense"]
    # one similar configuration where triton lost: dense
    lost = measured + [(_spec(12), N64, {1: {"dense": 1.0, "triton": 1.5}})]
    ms, _ = _measured.ranking("Test GPU", _spec(20), N64, table=_table(*lost))
    assert set(ms) == {"dense"}
    # nothing similar (4x the channels, or another geometry): dense alone
    for spec in (_spec(64), _spec(16, rhs_dilation=2)):
        ms, rule = _measured.ranking("Test GPU", spec, N64, table=_table(*measured))
        assert set(ms) == {"dense"} and "dense" in rule
    assert _measured.ranking("Test GPU", _spec(), N64, table={"configs": {}})[0] == {}


def test_the_committed_bench_table_still_ranks_its_own_configurations():
    """Tables written before the exact entries: a standard layer's own sizes count as exact."""
    table = _measured.load("NVIDIA H200")
    entry = table["configs"]["d3_n64_b4_c16"]["fwd_bwd"]
    before_exact = {k: v for k, v in table.items() if k != "exact"}
    ms, rule = _measured.ranking("NVIDIA H200", _spec(16), N64, table=before_exact)
    assert rule == "a benchmarked configuration of the same sizes"
    assert ms == {b: t for b, t in entry.items() if b == "dense" or t < entry["dense"]}
    # the committed table now also holds measure-auto's exact entry for this layer, which decides
    _, rule = _measured.ranking("NVIDIA H200", _spec(16), N64)
    assert rule.startswith("exact match")
    # the UNet's 32-cell level at 16 channels was never measured: triton lost on a similar
    # configuration (d3_n64_b2_c32), so dense
    assert set(_measured.ranking("NVIDIA H200", _spec(16), (32, 32, 32))[0]) == {"dense"}


def _auto_with(monkeypatch, name, run, platform, kind, table, priority=99):
    """`auto` on a pretend `platform` and device `kind` whose measured table is `table`, with one
    more backend `name` (always available and covering, running `run`); undone after the test."""
    backend = kernels.Backend(name, run, lambda: (True, ""), lambda *a: (True, ""), priority={platform: priority})
    monkeypatch.setitem(kernels._registry._BACKENDS, name, backend)
    monkeypatch.setattr(kernels._registry, "platform", lambda: platform)
    monkeypatch.setattr(kernels._registry, "device_kind", lambda: kind)
    monkeypatch.delenv(kernels._registry.ENV_VAR, raising=False)
    monkeypatch.setattr(_measured, "load", lambda k: table if k == kind else None)


def test_auto_dispatch_follows_the_ranking(monkeypatch):
    spec = _spec()
    table = _table((spec, N64, {1: {"dense": 2.0, "fast-fused": 1.0}}), (spec, (32,) * 3, {1: {"dense": 1.0, "fast-fused": 1.2}}))
    _auto_with(monkeypatch, "fast-fused", kernels.conv_contract_reference, "gpu", "Test GPU", table)
    choice = kernels.explain(spec, N64)
    assert choice.backend == "fast-fused"
    assert "exact match" in choice.reason and "1.0 ms fwd_bwd against dense 2.0 ms" in choice.reason
    slower = kernels.explain(spec, (32,) * 3)
    assert slower.backend == "dense" and "no fused backend beat dense" in slower.reason  # measured slower there
    unmeasured = kernels.explain(_spec(64), N64)
    assert unmeasured.backend == "dense" and "no configuration like this one was measured" in unmeasured.reason


def test_a_steps_configurations_are_found_and_measured_into_a_table(tmp_path):
    """conv_configs on a small layer step, then measure-auto's loop on dense and reference."""
    import argparse

    from bench import _cases, _configs, measure_auto, model_layers

    case = _cases.LayerCase(_configs.LayerConfig("t", D=2, N=8, B=3, c=2))
    fn, args = case.function("fwd_bwd")
    uses = model_layers.conv_configs(fn, *args, batch=3, source="t")
    assert len(uses) == 1 and uses[0].count == 1 and uses[0].spatial == (8, 8) and uses[0].batch == 3
    assert uses[0].signature == _measured.signature(case.spec(), (8, 8), "float32")
    twice = model_layers.merge([uses, model_layers.conv_configs(fn, *args, batch=3, source="u")])
    assert len(twice) == 1 and twice[0].count == 2 and twice[0].sources == ("t", "u")
    opts = argparse.Namespace(modes=("fwd_bwd",), time_budget=0.0, max_time=0.01, min_rounds=2)
    table = {"device_kind": "cpu", "sources": [], "configs": {}, "exact": {}}
    log: list = []
    measure_auto.measure_all(uses, ("dense", "reference"), opts, table, tmp_path / "cpu.json", log)
    entry = table["exact"][uses[0].signature]
    assert set(entry["batches"]["3"]["fwd_bwd"]) == {"dense", "reference"} and entry["used_by"] == ["t"]
    assert all(v > 0 for v in entry["batches"]["3"]["fwd_bwd"].values()) and (tmp_path / "cpu.json").exists()
    compiled = entry["batches"]["3"]["compile_s"]["fwd_bwd"]  # one worker: compile times recorded
    assert set(compiled) == {"dense", "reference"} and all(v > 0 for v in compiled.values())
    ms, rule = _measured.ranking("cpu", case.spec(), (8, 8), table=table)
    assert rule.startswith("exact match") and "dense" in ms
    assert "t " in measure_auto.summary(uses, table, ("dense", "reference"))
    # --operand-layouts fused-auto: the fused backends timed with XLA's picks, dense row-major
    # (each row says which); a choice it does not know is named
    opts.operand_layouts = "fused-auto"
    log.clear()
    measure_auto.measure_all(uses, ("dense", "reference"), opts, dict(table, exact={}), tmp_path / "cpu2.json", log)
    assert {r["backend"]: r["operand_layouts"] for r in log} == {"dense": "row-major", "reference": "row-major"}
    assert measure_auto.layouts_for("fused-auto", "triton") == "auto"
    assert measure_auto.parse_args(["--operand-layouts", "auto", "--list"]).operand_layouts == "auto"
    with pytest.raises(ValueError, match=r"`--operand-layouts` \(='planar'\) must be one of"):
        measure_auto.layouts_for("planar", "dense")
    opts.operand_layouts = "auto"
    log.clear()
    measure_auto.measure_all(uses, ("dense",), opts, dict(table, exact={}), tmp_path / "cpu3.json", log)
    assert [r["operand_layouts"] for r in log] == ["auto"] and all("error" not in r for r in log)
    # --only-unmeasured: what the table holds is left out, with the reason, the rest measured
    todo, left_out = measure_auto.plan(uses, ("dense", "reference", "native"), ("fwd_bwd", "fwd"), table)
    assert {(c.mode, c.backend) for c in todo} >= {("fwd", "dense"), ("fwd", "reference")}
    assert not {(c.mode, c.backend) for c in todo} & {("fwd_bwd", "dense"), ("fwd_bwd", "reference")}
    assert sum(r.get("skipped") == "already in the table" for r in left_out) == 2


def test_a_small_win_at_a_larger_batch_does_not_carry_to_a_smaller_one():
    """The models' embedding layer was measured at batch 4 only, where triton won by 5%: at batch
    1 (unmeasured; such layers lose there) `auto` keeps dense, at batch 8 or an unknown batch the
    batch-4 win counts. A dilated layer's 8.7x win carries down. The same for a similar
    configuration's samples."""
    spec = _spec()
    table = _table((spec, N64, {4: {"dense": 3.68, "triton": 3.49}}))
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=table, batch=1)
    assert set(ms) == {"dense"}
    for batch in (8, None):
        ms, rule = _measured.ranking("Test GPU", spec, N64, table=table, batch=batch)
        assert min(ms, key=ms.get) == "triton" and rule.startswith("exact match, 1 batch")
    ms, rule = _measured.ranking("Test GPU", spec, (32,) * 3, table=table, batch=1)
    assert set(ms) == {"dense"}
    ms, rule = _measured.ranking("Test GPU", spec, (32,) * 3, table=table, batch=4)
    assert min(ms, key=ms.get) == "triton" and "1 similar" in rule
    dilated = _spec(rhs_dilation=2)
    table = _table((dilated, N64, {4: {"dense": 47.8, "triton": 5.5}}))
    for spatial in (N64, (32,) * 3):
        ms, rule = _measured.ranking("Test GPU", dilated, spatial, table=table, batch=1)
        assert min(ms, key=ms.get) == "triton" and ms["triton"] == pytest.approx(5.5 * _measured.LARGER_BATCH_MARGIN)


def test_exact_match_at_the_batch_the_call_runs_at():
    """A layer that wins on a fused kernel at batch 4 and loses at batch 1 (the launch too small to
    fill the GPU): the batch the call runs at decides; unknown, the every-batch rule (dense)."""
    spec = _spec()
    table = _table((spec, N64, {1: {"dense": 1.9, "triton": 3.4}, 4: {"dense": 7.2, "triton": 5.1}}))
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=table, batch=4)
    assert rule == "exact match at batch 4" and ms == {"dense": 7.2, "triton": 5.1}
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=table, batch=1)
    assert rule == "exact match at batch 1" and ms == {"dense": 1.9}
    # unknown batch: the every-batch rule (triton lost at one measured batch)
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=table)
    assert rule.startswith("exact match, 2 batch") and ms == {"dense": round((1.9 * 7.2) ** 0.5, 4)}
    # a batch not measured: the similar configurations, this one's batches among them: dense
    ms, rule = _measured.ranking("Test GPU", spec, N64, table=table, batch=2)
    assert "similar" in rule and set(ms) == {"dense"}
    # measured at the batch with dense alone (a budget cut the fused case): no verdict there; the
    # similar configurations decide (this one's batch 4, a larger grid at batch 1: triton won)
    dilated = _spec(rhs_dilation=2)
    partial = _table((dilated, N64, {1: {"dense": 12.8}, 4: {"dense": 47.8, "triton": 5.5}}),
                     (dilated, (128,) * 3, {1: {"dense": 100.2, "triton": 11.7}}))
    ms, rule = _measured.ranking("Test GPU", dilated, N64, table=partial, batch=1)
    assert "similar" in rule and min(ms, key=ms.get) == "triton"
    # unknown batch: the entry's every-batch rule stays strict (triton unmeasured at batch 1)
    ms, rule = _measured.ranking("Test GPU", dilated, N64, table=partial)
    assert rule.startswith("exact match") and set(ms) == {"dense"}
    # a similar configuration where triton lost at batch 1 keeps dense
    lost = _table((dilated, N64, {1: {"dense": 12.8}, 4: {"dense": 47.8, "triton": 5.5}}),
                  (dilated, (32,) * 3, {1: {"dense": 1.0, "triton": 1.4}}))
    assert set(_measured.ranking("Test GPU", dilated, N64, table=lost, batch=1)[0]) == {"dense"}


def test_vmapped_calls_rank_at_their_batch(monkeypatch):
    """`auto` inside vmap (as models run) sees the batch through the tracers, also under grad and
    nested vmaps; `explain` reads it from leading axes."""
    calls = []

    def run(spec, inputs, weights, mode):
        calls.append(_registry.traced_batch(inputs[0]))
        return kernels.conv_contract_reference(spec, inputs, weights, mode)

    spec, n = _spec(2, D=2), (8, 8)
    table = _table((spec, n, {1: {"dense": 1.0, "fast-at-4": 2.0}, 4: {"dense": 4.0, "fast-at-4": 2.0}}))
    _auto_with(monkeypatch, "fast-at-4", run, "gpu", "Test GPU", table)
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    w = [jax.random.normal(k, (2, 2, p.basis.n_filters)) for k, p in zip(keys, spec.pairs)]
    xs = [jax.random.normal(keys[4], (4, 2) + n), jax.random.normal(keys[5], (4, 2) + n + (2,))]

    def one(x0, x1, w):
        return kernels.conv_contract(spec, [x0, x1], w)

    def loss(w, xs):
        outs = jax.vmap(one, in_axes=(0, 0, None))(*xs, w)
        return sum(jnp.sum(o**2) for o in outs)

    jax.grad(loss)(w, xs)
    assert calls == [4]
    pairs = [x.reshape((2, 2) + x.shape[1:]) for x in xs]
    jax.vmap(jax.vmap(one, in_axes=(0, 0, None)), in_axes=(0, 0, None))(*pairs, w)
    assert calls == [4, 4]
    jax.vmap(one, in_axes=(0, 0, None))(xs[0][:1], xs[1][:1], w)  # batch 1: dense
    one(xs[0][0], xs[1][0], w)  # unbatched: dense (lost at batch 1)
    assert calls == [4, 4]
    assert kernels.explain(spec, xs).backend == "fast-at-4"
    assert "exact match at batch 4" in kernels.explain(spec, xs).reason
    assert kernels.explain(spec, [x[0] for x in xs]).backend == "dense"


def test_the_cpu_grid_is_a_measure_auto_selection_of_single_layers(capsys):
    from bench import _configs, measure_auto, model_layers

    args = measure_auto.parse_args(["--configs", "cpu-small", "--list"])
    assert args.configs == tuple(_configs.AUTO_LAYER_GRID) and args.configs_arg == "cpu-small"
    (use,) = model_layers.model_uses(["cpu_d2_n4_b4_c2_dil2"])
    assert (use.spatial, use.batch, use.spec.rhs_dilation, use.spec.cin) == ((4, 4), 4, (2, 2), 2 + 2 * 2)
    with pytest.raises(SystemExit):
        measure_auto.parse_args(["--configs", "cpu-huge"])
    assert "--configs (='cpu-huge'): unknown name 'cpu-huge'" in capsys.readouterr().err


def _dense_and_native(entry, mode="fwd_bwd"):
    return [(b[mode]["dense"], b[mode]["native"]) for b in entry["batches"].values()]


def _cost(batch, name, calls, mode="fwd_bwd"):
    """Run ms plus compile spread over `calls` calls, from a table entry's batch (independently of
    kernels/_measured.py's arithmetic)."""
    return batch[mode][name] + batch["compile_s"][mode][name] * 1000 / calls


def test_the_committed_cpu_table_ranks_native_where_run_plus_compile_is_less():
    """Every layer of the CPU grid: `auto` keeps native exactly where its run time plus its compile
    spread over CALLS_PER_COMPILE calls beat dense's at both measured batches (with compile that
    is every one; by run time alone, not all the D=2 ones). A D=3 test-sized layer that was never
    measured (6 cells, 3 channels a key): the grid's D=3 layers decide by the similar rule."""
    from bench import _cases, _configs

    table = _measured.load("cpu")
    calls = _measured.CALLS_PER_COMPILE["cpu"]
    checked, faster_by_run = 0, 0
    for cfg in _configs.AUTO_LAYER_GRID.values():
        spec = _cases.fixture_spec(cfg)
        entry = table["exact"][_measured.signature(spec, cfg.spatial)]
        ms, rule = _measured.ranking("cpu", spec, cfg.spatial)
        assert rule.startswith("exact match, 2 batch") and _measured.COMPILE_RULE in rule, (cfg.name, rule)
        cheaper = all(_cost(b, "native", calls) < _cost(b, "dense", calls) for b in entry["batches"].values())
        assert ("native" in ms) == cheaper, (cfg.name, entry["batches"])
        faster_by_run += all(n < d for d, n in _dense_and_native(entry))
        checked += 1
    assert checked == len(_configs.AUTO_LAYER_GRID) == 80
    assert faster_by_run < checked  # the rule changes the verdict where native is slower per call
    d3 = [e for e in table["exact"].values() if e["D"] == 3]
    assert d3 and all(n < d for e in d3 for d, n in _dense_and_native(e))
    ms, rule = _measured.ranking("cpu", _spec(3, D=3), (6, 6, 6))
    assert "similar" in rule and ms["native"] < ms["dense"]


def _timed_table(kind, spec, spatial, batches) -> dict:
    """A table of one entry: batches are {batch: ({backend: fwd_bwd ms}, {backend: compile s})}."""
    table = _table((spec, spatial, {b: ms for b, (ms, _) in batches.items()}))
    entry = table["exact"][_measured.signature(spec, spatial)]
    for b, (_, compiled) in batches.items():
        if compiled is not None:
            entry["batches"][str(b)]["compile_s"] = {"fwd_bwd": compiled}
    return {**table, "device_kind": kind}


def test_on_a_cpu_compile_counts_spread_over_calls_per_compile(monkeypatch):
    """native 0.1 ms slower per call but compiling 2 s faster: on the CPU it wins while 2 s is
    more than 0.1 ms x CALLS_PER_COMPILE; a GPU table ranks run time alone; a sample whose
    compile times miss a backend counts run time alone."""
    spec, n = _spec(2, D=2), (8, 8)
    batches = {1: ({"dense": 0.2, "native": 0.3}, {"dense": 2.5, "native": 0.5})}
    table = _timed_table("cpu", spec, n, batches)
    ms, rule = _measured.ranking("cpu", spec, n, table=table, batch=1)
    assert ms == {"dense": 2.7, "native": 0.8} and min(ms, key=ms.get) == "native"
    assert rule == ("exact match at batch 1; ms per call = run ms + compile / 1000 calls: "
                    "dense 0.2 ms + 2.5 s compile, native 0.3 ms + 0.5 s compile")
    # over 40,000 calls the 0.1 ms a call outweighs the 2 s: dense
    monkeypatch.setitem(_measured.CALLS_PER_COMPILE, "cpu", 40_000)
    ms, rule = _measured.ranking("cpu", spec, n, table=table, batch=1)
    assert set(ms) == {"dense"} and ms["dense"] == round(0.2 + 2500 / 40_000, 4)
    monkeypatch.undo()
    # the same numbers on a GPU kind: run time alone
    ms, rule = _measured.ranking("Test GPU", spec, n, table={**table, "device_kind": "Test GPU"}, batch=1)
    assert ms == {"dense": 0.2} and "compile" not in rule
    # compile recorded for dense only: no fair comparison of compile, run time alone
    partial = _timed_table("cpu", spec, n, {1: ({"dense": 0.2, "native": 0.3}, {"dense": 2.5})})
    assert _measured.ranking("cpu", spec, n, table=partial, batch=1)[0] == {"dense": 0.2}
    # every batch must win with compile counted (one that loses even so keeps dense)
    two = _timed_table("cpu", spec, n, {**batches, 4: ({"dense": 0.4, "native": 3.9}, {"dense": 2.5, "native": 0.5})})
    ms, rule = _measured.ranking("cpu", spec, n, table=two)
    assert rule.startswith("exact match, 2 batch") and set(ms) == {"dense"}


def test_explain_on_a_cpu_names_the_rule_and_the_run_and_compile_times(monkeypatch):
    spec, n = _spec(2, D=2), (8, 8)
    table = _timed_table("cpu", spec, n, {1: ({"dense": 0.2, "cheap-compile": 0.3}, {"dense": 2.5, "cheap-compile": 0.5})})
    _auto_with(monkeypatch, "cheap-compile", kernels.conv_contract_reference, "cpu", "cpu", table, priority=-1)
    choice = kernels.explain(spec, n)  # no batch: the every-batch rule, over one batch here
    assert choice.backend == "cheap-compile"
    assert ("fastest measured on cpu (exact match, 1 batch size(s); ms per call = run ms + compile / 1000 calls: "
            "cheap-compile 0.3 ms + 0.5 s compile, dense 0.2 ms + 2.5 s compile; geometric means over them): "
            "0.8 ms per fwd_bwd call (compile included) against dense 2.7 ms") in choice.reason


def test_measure_auto_can_re_time_only_some_row_lengths(capsys):
    """--row-lengths keeps the configurations whose last spatial axis is listed (a kernel change at
    rows of 32 re-times those and leaves the rest of the table), --thin-only those dense runs in two
    stages; a bad value is named."""
    from types import SimpleNamespace

    from bench import _cases, _configs, measure_auto, model_layers

    args = measure_auto.parse_args(["--configs", "cpu-small", "--row-lengths", "4, 8", "--list"])
    assert args.row_lengths == (4, 8)
    assert measure_auto.parse_args(["--list"]).row_lengths == ()
    uses = model_layers.model_uses(["cpu_d2_n4_b4_c2_dil2"])
    assert measure_auto.select_rows(uses, (4,)) == uses
    assert measure_auto.select_rows(uses, (8,)) == []
    assert measure_auto.select_rows(uses, ()) == uses
    assert measure_auto.parse_args(["--thin-only", "--list"]).thin_only
    standard = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
    layers = [SimpleNamespace(spec=_cases.with_channels(standard, cin, cout), spatial=(64,) * 3)
              for cin, cout in ((2, 16), (16, 16), (16, 1))]
    assert [u.spec.cin for u in measure_auto.select_rows(layers, (), thin_only=True)] == [8, 64]  # first, last
    assert measure_auto.select_rows(layers, (32,), thin_only=True) == []
    for bad in ("0", "32,x", "-4"):
        with pytest.raises(SystemExit):
            measure_auto.parse_args(["--row-lengths", bad])
        assert f"--row-lengths (={bad!r}) must be positive integers" in capsys.readouterr().err


def test_a_gpu_without_a_table_ranks_by_one_of_its_compute_capability(monkeypatch):
    """A GH200 (no table of its own) ranks by the H200's, which records compute capability 9.0,
    and says so; a GPU of another capability has none and falls to the priorities."""
    assert _measured.kinds_by_capability().get("9.0") == "NVIDIA H200"  # the committed table
    assert _measured.device_table("NVIDIA H200", "9.0")[0] == "NVIDIA H200"
    kind, table, note = _measured.device_table("NVIDIA GH200 480GB", "9.0")
    assert kind == "NVIDIA H200" and note == (
        "NVIDIA GH200 480GB has no measured table; ranked by the NVIDIA H200's, and where it has none "
        "the NVIDIA H100 80GB HBM3's, of the same compute capability 9.0")
    assert set(_measured.load("NVIDIA H200")["exact"]) <= set(table["exact"])
    assert _measured.device_table("NVIDIA A100-SXM4-80GB", "8.0") == ("NVIDIA A100-SXM4-80GB", None, "")
    assert _measured.device_table("cpu", "") == ("cpu", _measured.load("cpu"), "")

    spec = _spec()
    table = {**_table((spec, N64, {1: {"dense": 2.0, "fast-fused": 1.0}}),
                      (spec, (32,) * 3, {1: {"dense": 1.0, "fast-fused": 1.2}})), "compute_capability": "9.9"}
    _auto_with(monkeypatch, "fast-fused", kernels.conv_contract_reference, "gpu", "Test GPU", table)
    monkeypatch.setattr(_measured, "kinds_of_capability", lambda: {"9.9": ("Test GPU",)})
    monkeypatch.setattr(kernels._registry, "device_kind", lambda: "Sibling GPU")
    monkeypatch.setattr(kernels._registry, "device_capability", lambda: "9.9")
    choice = kernels.explain(spec, N64)
    assert choice.backend == "fast-fused" and "fastest measured on Test GPU" in choice.reason
    assert "Sibling GPU has no measured table; ranked by the Test GPU's" in choice.reason
    assert kernels.explain(spec, (32,) * 3).backend == "dense"  # measured slower on the sibling
    monkeypatch.setattr(kernels._registry, "device_capability", lambda: "8.0")
    other = kernels.explain(spec, (32,) * 3)  # no table: the priorities, and fast-fused has the highest
    assert other.backend == "fast-fused" and "highest-priority backend" in other.reason
    assert "no measured table for Sibling GPU or its compute capability" in other.reason


def test_a_gpu_without_any_table_ranks_caveated_backends_after_dense(monkeypatch):
    """No table for the GPU or its compute capability: the priorities decide, except that a
    backend naming a structural cost for the layer (`unmeasured_caveat`) comes after those
    without one. Triton's parity-blocked layers (the k2 layer) and every Pallas layer go to dense,
    and `explain` says why; the standard layer stays on triton. With a table the caveats are moot."""
    import dataclasses

    from bench import _cases, _configs

    monkeypatch.setitem(_registry._BACKENDS, "triton", dataclasses.replace(
        _registry._BACKENDS["triton"], availability=lambda: (True, "")))
    monkeypatch.setattr(_registry, "platform", lambda: "gpu")
    monkeypatch.setattr(_registry, "device_kind", lambda: "Other GPU")
    monkeypatch.setattr(_registry, "device_capability", lambda: "8.0")
    monkeypatch.delenv(_registry.ENV_VAR, raising=False)
    k2 = _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])
    choice = kernels.explain(k2, N64)
    assert choice.backend == "dense", choice.reason
    assert "without a caveat (triton: its kernels would run this layer as the parity-blocked convolution" in choice.reason
    assert "pallas: its kernels lost to dense in fwd_bwd" in choice.reason
    assert "no measured table for Other GPU" in choice.reason
    standard = kernels.explain(_spec(), N64)
    assert standard.backend == "triton" and "caveat" not in standard.reason, standard.reason
    # explain's generic size gives the same answer; a layer triton does not cover (stride 2) is not
    # asked for a caveat (planning its kernels could fail)
    assert kernels.explain(k2).backend == "dense"
    strided = kernels.explain(_spec(stride=2), N64)
    assert strided.backend == "dense" and "triton: " not in strided.reason.split("skipped")[0]
    without_triton = dataclasses.replace(_registry._BACKENDS["triton"], availability=lambda: (False, "no GPU"))
    monkeypatch.setitem(_registry._BACKENDS, "triton", without_triton)
    assert kernels.explain(_spec(), N64).backend == "dense"  # pallas (priority 15) has a caveat everywhere
    # a table for the GPU (even one that has nothing like the layer): the caveats are not consulted
    monkeypatch.setattr(_measured, "load", lambda kind: {"configs": {}, "exact": {}} if kind == "Other GPU" else None)
    monkeypatch.setitem(_registry._BACKENDS, "triton", dataclasses.replace(
        _registry._BACKENDS["triton"], availability=lambda: (True, "")))
    assert "caveat" not in kernels.explain(k2, N64).reason


def test_a_gpu_table_goes_over_the_one_of_its_compute_capability_row_by_row(monkeypatch):
    """A GPU with a few rows of its own (an H100's 2D layers) ranks those by its own numbers and
    every other configuration by the table of its compute capability, and says so; the stand-in
    stays the table with the most rows."""
    spec, other = _spec(), _spec(8)
    mine = {**_table((spec, N64, {1: {"dense": 2.0, "fast-fused": 1.0}})), "device_kind": "Sibling GPU",
            "compute_capability": "9.9"}
    theirs = {**_table((spec, N64, {1: {"dense": 1.0, "fast-fused": 3.0}}),
                       (other, N64, {1: {"dense": 4.0, "fast-fused": 1.0}})), "compute_capability": "9.9"}
    tables = {"Test GPU": theirs, "Sibling GPU": mine}
    _auto_with(monkeypatch, "fast-fused", kernels.conv_contract_reference, "gpu", "Sibling GPU", mine)
    monkeypatch.setattr(_measured, "load", tables.get)
    monkeypatch.setattr(_measured, "kinds_of_capability", lambda: {"9.9": ("Test GPU",)})
    monkeypatch.setattr(kernels._registry, "device_capability", lambda: "9.9")

    kind, table, note = _measured.device_table("Sibling GPU", "9.9")
    assert kind == "Sibling GPU" and set(table["exact"]) == set(theirs["exact"])
    assert table["exact"][_measured.signature(spec, N64)] == mine["exact"][_measured.signature(spec, N64)]
    assert note == "Sibling GPU's own rows, and where it has none the Test GPU's, of the same compute capability 9.9"
    own = kernels.explain(spec, N64)
    assert own.backend == "fast-fused" and "fastest measured on Sibling GPU (exact match, 1 batch size(s);" in own.reason, own.reason
    from_stand_in = kernels.explain(other, N64)
    assert from_stand_in.backend == "fast-fused", from_stand_in.reason
    assert "(exact match, 1 batch size(s), the Test GPU's row;" in from_stand_in.reason, from_stand_in.reason
    assert note in from_stand_in.reason
    similar = kernels.explain(spec, (32,) * 3)  # not measured: both tables' rows of the same kind
    assert "2 similar measured configuration(s), 1 of them the Test GPU's;" in similar.reason, similar.reason
    # without its own table the device ranks by the stand-in alone, where dense wins `spec`
    monkeypatch.setattr(_measured, "load", {"Test GPU": theirs}.get)
    assert _measured.device_table("Sibling GPU", "9.9")[:2] == ("Test GPU", theirs)
    assert kernels.explain(spec, N64).backend == "dense"


def test_a_gpu_row_goes_over_the_stand_ins_batch_by_batch(monkeypatch):
    """A device that measured a configuration at batch 4 only keeps the stand-in's batch-1
    sample of it: batch-1 calls rank by the stand-in's exact sample (named), batch-4 calls by the
    device's own. (Whole rows replaced, an H100's batch-4 rows of the 3D UNet hid the H200's
    batch-1 ones, and batch-1 layers fell to dense by the larger-batch margin: session 44.)"""
    spec = _spec()
    mine = {**_table((spec, N64, {4: {"dense": 2.0, "fast-fused": 1.5}})), "device_kind": "Sibling GPU",
            "compute_capability": "9.9"}
    theirs = {**_table((spec, N64, {1: {"dense": 1.0, "fast-fused": 0.5}, 4: {"dense": 9.0, "fast-fused": 1.0}})),
              "compute_capability": "9.9"}
    _auto_with(monkeypatch, "fast-fused", kernels.conv_contract_reference, "gpu", "Sibling GPU", mine)
    monkeypatch.setattr(_measured, "load", {"Test GPU": theirs, "Sibling GPU": mine}.get)
    monkeypatch.setattr(_measured, "kinds_of_capability", lambda: {"9.9": ("Test GPU",)})
    monkeypatch.setattr(kernels._registry, "device_capability", lambda: "9.9")

    kind, table, _ = _measured.device_table("Sibling GPU", "9.9")
    row = table["exact"][_measured.signature(spec, N64)]
    assert _measured.ORIGIN not in row and row["batches"]["4"] == mine["exact"][_measured.signature(spec, N64)]["batches"]["4"]
    assert row["batches"]["1"] == {**theirs["exact"][_measured.signature(spec, N64)]["batches"]["1"],
                                   _measured.ORIGIN: "Test GPU"}
    at_1 = _measured.ranking(kind, spec, N64, batch=1, table=table)
    assert at_1 == ({"dense": 1.0, "fast-fused": 0.5}, "exact match at batch 1, the Test GPU's row")
    at_4 = _measured.ranking(kind, spec, N64, batch=4, table=table)
    assert at_4 == ({"dense": 2.0, "fast-fused": 1.5}, "exact match at batch 4")
    # at an unmeasured batch both samples count (the batch-4 one with the larger-batch margin, so the
    # fused backend does not beat dense in both), each named by where it came from
    ms, rule = _measured.ranking(kind, spec, N64, batch=2, table=table)
    assert set(ms) == {"dense"} and rule == "2 similar measured configuration(s), 1 of them the Test GPU's", (ms, rule)


def test_the_stand_in_takes_a_siblings_rows_where_it_has_none(monkeypatch):
    """The stand-in of a capability (an H200) ranks a configuration only a sibling measured (the
    H100's 2D layers) by the sibling's row, and a GPU with no table of its own draws on both,
    the stand-in's rows first; `explain` names where each row came from."""
    spec, other = _spec(), _spec(8)
    stand_in = {**_table((spec, N64, {1: {"dense": 1.0, "fast-fused": 3.0}})), "compute_capability": "9.9"}
    sibling = {**_table((spec, N64, {1: {"dense": 9.0, "fast-fused": 1.0}}),
                        (other, N64, {1: {"dense": 4.0, "fast-fused": 1.0}})),
               "device_kind": "Sibling GPU", "compute_capability": "9.9"}
    _auto_with(monkeypatch, "fast-fused", kernels.conv_contract_reference, "gpu", "Test GPU", stand_in)
    monkeypatch.setattr(_measured, "load", {"Test GPU": stand_in, "Sibling GPU": sibling}.get)
    monkeypatch.setattr(_measured, "kinds_of_capability", lambda: {"9.9": ("Test GPU", "Sibling GPU")})
    monkeypatch.setattr(kernels._registry, "device_capability", lambda: "9.9")

    kind, table, note = _measured.device_table("Test GPU", "9.9")
    assert kind == "Test GPU" and set(table["exact"]) == set(sibling["exact"])
    assert note == "Test GPU's own rows, and where it has none the Sibling GPU's, of the same compute capability 9.9"
    assert kernels.explain(spec, N64).backend == "dense"  # its own row, not the sibling's
    filled = kernels.explain(other, N64)
    assert filled.backend == "fast-fused" and "the Sibling GPU's row;" in filled.reason, filled.reason

    monkeypatch.setattr(kernels._registry, "device_kind", lambda: "Third GPU")
    kind, table, note = _measured.device_table("Third GPU", "9.9")
    assert kind == "Test GPU" and note == ("Third GPU has no measured table; ranked by the Test GPU's, and where it "
                                           "has none the Sibling GPU's, of the same compute capability 9.9")
    assert kernels.explain(spec, N64).backend == "dense"
    assert kernels.explain(other, N64).backend == "fast-fused"
    # nothing of the capability: no table
    assert _measured.device_table("Third GPU", "8.0") == ("Third GPU", None, "")


def test_the_committed_h200_table_takes_the_h100s_2d_rows():
    """On the committed tables: every row the H100 measured and the H200 did not (the 2D model
    layers, session 36) reaches the H200's ranking, tagged as the H100's; the H200's own rows
    stay its own. Among them the dilated 2D layers, where triton beat cuDNN by ~9x on the H100."""
    h200, h100 = _measured.load("NVIDIA H200"), _measured.load("NVIDIA H100 80GB HBM3")
    assert h200 and h100, "the committed tables"
    kind, table, note = _measured.device_table("NVIDIA H200", "9.0")
    assert kind == "NVIDIA H200" and "where it has none the NVIDIA H100 80GB HBM3's" in note
    only_h100 = set(h100["exact"]) - set(h200["exact"])
    assert only_h100, "the H100 table should hold rows the H200's lacks"
    for sig in only_h100:
        assert table["exact"][sig][_measured.ORIGIN] == "NVIDIA H100 80GB HBM3"
    for sig in h200["exact"]:
        assert _measured.ORIGIN not in table["exact"][sig]
    dilated = [table["exact"][sig] for sig in only_h100 if table["exact"][sig].get("geometry") == "dilated"]
    assert dilated, "the 2D DilResNet's dilated rows"
    for entry in dilated:
        ms = _measured._allowed(list(entry["batches"].values()), "fwd_bwd")
        assert "triton" in ms and ms["triton"] < ms["dense"], entry["batches"]


def test_the_committed_h100_rows_keep_the_h200s_other_batch_sizes():
    """On the committed tables: the H100's own 3D UNet rows (batch 4, session 44) leave the H200's
    batch-1 samples of the same layers in the H100's merged table, tagged as the H200's."""
    h200, h100 = _measured.load("NVIDIA H200"), _measured.load("NVIDIA H100 80GB HBM3")
    kind, table, _ = _measured.device_table("NVIDIA H100 80GB HBM3", "9.0")
    shared = [sig for sig in set(h100["exact"]) & set(h200["exact"])
              if "1" in h200["exact"][sig]["batches"] and "1" not in h100["exact"][sig]["batches"]]
    assert shared, "3D UNet rows both measured, the H200 at batch 1 and the H100 not"
    for sig in shared:
        row = table["exact"][sig]
        assert _measured.ORIGIN not in row
        assert row["batches"]["1"][_measured.ORIGIN] == "NVIDIA H200"
        assert all(_measured.ORIGIN not in b for k, b in row["batches"].items() if k in h100["exact"][sig]["batches"])


def test_the_stand_in_of_a_capability_is_its_fullest_table(tmp_path, monkeypatch):
    for name, kind, rows in (("a-small.json", "A GPU", 1), ("b-full.json", "B GPU", 3)):
        exact = {f"row {i}": {} for i in range(rows)}
        (tmp_path / name).write_text(json.dumps({"device_kind": kind, "compute_capability": "9.0", "exact": exact}))
    monkeypatch.setattr(_measured, "_DIR", tmp_path)
    _measured.kinds_of_capability.cache_clear()
    try:
        assert _measured.kinds_by_capability() == {"9.0": "B GPU"}
    finally:
        monkeypatch.undo()
        _measured.kinds_of_capability.cache_clear()


def test_measure_auto_refuses_new_rows_that_would_hide_another_tables_backends(monkeypatch):
    """A sample (configuration and batch) measured without a backend that beat dense in the stand-in
    table's sample of it would replace that sample in `auto`'s merged table: on an H100,
    `--backends factorised` (with dense) over the 3D UNet's layers hid the H200 rows' `triton` and the
    step ran at dense's speed (bench/NOTES.md, "Session 44"). hidden_backends names such samples."""
    from types import SimpleNamespace

    from bench import measure_auto
    from kernels import _measured

    stand_in = {"exact": {"A": {"batches": {"4": {"fwd_bwd": {"dense": 1.0, "triton": 0.5, "pallas": 2.0}}}},
                          "B": {"batches": {"4": {"fwd": {"dense": 1.0}}}}}}
    monkeypatch.setattr(_measured, "kinds_of_capability", lambda: {"9.0": ("H200", "H100")})
    monkeypatch.setattr(_measured, "load", lambda kind: stand_in if kind == "H200" else None)
    uses = [SimpleNamespace(signature=s, batch=4) for s in ("A", "B", "C")]
    own = {"exact": {}}
    assert measure_auto.hidden_backends(uses, ("dense", "factorised"), own, "H100", "9.0") == {"A": ("H200", ["triton"])}
    # pallas lost to dense there: leaving it out hides nothing
    assert measure_auto.hidden_backends(uses, ("dense", "triton"), own, "H100", "9.0") == {}
    # a batch this device already measured is not new: measuring more backends into it hides nothing
    assert measure_auto.hidden_backends(uses, ("dense",), {"exact": {"A": {"batches": {"4": {}}}}}, "H100", "9.0") == {}
    # rows merge batch by batch: a batch the other table lacks hides nothing
    assert measure_auto.hidden_backends([SimpleNamespace(signature="A", batch=1)], ("dense",), own, "H100", "9.0") == {}
    # no other table of the capability, or none given
    assert measure_auto.hidden_backends(uses, ("dense",), own, "H100", "8.0") == {}
    assert measure_auto.hidden_backends(uses, ("dense",), own, "H100", "") == {}
    assert measure_auto.parse_args(["--allow-partial", "--list"]).allow_partial
