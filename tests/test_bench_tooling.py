"""The benchmark tooling on CPU: the quick suite as a correctness check, `python -m bench`'s JSON,
table and plot, and `python -m bench compare`'s verdicts on synthetic regressions."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from bench import _configs, _suite, compare

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 600, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


# ---- the suite -----------------------------------------------------------------------------------
def test_quick_suite_is_a_correctness_check_of_every_available_backend():
    import kernels

    proc = _run("-m", "pytest", "bench/", "--benchmark-disable", "--bench-configs=quick", "-q", "-rs", "-p", "no:cacheprovider")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    quick = _configs.CONFIG_SETS["quick"]
    assert len(quick) == 2 and all("quick" in _configs.case_id(_configs.CONFIGS[c], "fwd", "dense") for c in quick)
    # every quick config x layer mode x backend that runs here, none skipped for falling back
    assert passed == len(quick) * len(_configs.LAYER_MODES) * len(kernels.available_backends())


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """One real `python -m bench` run (small, short timing) without --out: its output and the files
    it keeps under $GINJAX_BENCH_OUT."""
    out = tmp_path_factory.mktemp("bench-out")
    proc = _run(
        "-m", "bench", "--configs", "d2_n64_b4_c8", "--backends", "reference,dense,auto", "--modes", "fwd,step",
        "--max-time", "0.05", "--min-rounds", "3",
        env_extra={_suite.COMMIT_ENV: "cafe123", _suite.OUT_ENV: str(out)},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc, out


def test_bench_command_writes_results_table_and_plot(recorded_run):
    proc, out = recorded_run
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    json_files = [f for f in files if f.endswith(".json")]
    assert len(json_files) == 1 and re.fullmatch(r"cpu/\d{4}-\d{2}-\d{2}-cafe123\.json", json_files[0]), files
    results = _suite.load_results(out / json_files[0])
    assert results["commit_info"]["id"] == "cafe123"
    assert results["machine_info"]["device_slug"] == "cpu"
    by_backend = {b["extra_info"]["backend"]: b for b in results["benchmarks"]}
    assert set(by_backend) == {"reference", "dense", "auto"}  # auto: the dispatcher's pick, on request
    for bench in by_backend.values():
        info = bench["extra_info"]
        assert bench["group"] == "d2_n64_b4_c8-fwd"
        assert info["config"] == "d2_n64_b4_c8" and info["mode"] == "fwd"
        # dense-equivalent FLOPs: 2 * B * pixels * taps * Cin * Cout, Cin = Cout = 8 * (1 + 2)
        assert info["gflop"] == pytest.approx(2 * 4 * 64 * 64 * 9 * 24 * 24 / 1e9)
        assert info["io_bytes"] == 2 * 4 * 24 * 64 * 64 * 4
        assert info["rel_err_vs_reference"] <= info["tolerance"]
        assert info["p20_s"] <= info["median_s"] <= info["p80_s"]
        assert bench["stats"]["rounds"] >= 3
        # pytest-benchmark's own stats are per call too (a round may queue several calls)
        assert bench["stats"]["median"] == pytest.approx(info["median_s"], rel=1e-6)
        for key in ("temp_bytes", "device_kind", "jax_version", "jaxlib_version"):
            assert key in info
        assert info["vector_neuron"] == "xla"  # what a model step's VectorNeuron runs on this CPU
    # the printed table: one row per benchmark, the reference is 1.00x of itself
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| d2_n64_b4_c8")]
    assert len(rows) == 3 and "| reference | " in rows[0] and "1.00x" in rows[0] and "| auto " in rows[2]
    assert (out / json_files[0]).with_suffix(".txt").read_text().count("| d2_n64_b4_c8") == 3
    # one table: no pytest-benchmark group tables, no mode without rows, no TF32 on a CPU
    assert "benchmark 'd2_n64_b4_c8" not in proc.stdout and "Wrote benchmark data" not in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("python -m bench:"))
    assert header.endswith("| modes fwd")  # `step` asked for, but no selected config has it
    assert "default precision fp32 (CPU)" in proc.stdout and "tf32" not in proc.stdout
    # where the results went, named after the table, and they exist
    listed = proc.stdout[proc.stdout.index("results (no --out"):]
    assert str(out / json_files[0]) in listed and str(out) in listed
    png = (out / json_files[0]).with_suffix(".png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in proc.stdout
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_falls_back_to_dense_in_a_run_without_the_reference(recorded_run):
    """GPU runs leave the slow reference out; their plots then show speedups over dense, not an
    empty panel."""
    from bench import plot

    _, out = recorded_run
    results = _suite.load_results(next(out.rglob("*.json")))
    baseline, rows = plot.speedup_rows(results)
    assert baseline == "reference" and sorted(r["backend"] for r in rows) == ["auto", "dense"]
    without = copy.deepcopy(results)
    without["benchmarks"] = [b for b in without["benchmarks"] if b["extra_info"]["backend"] != "reference"]
    baseline, rows = plot.speedup_rows(without)
    assert baseline == "dense" and [r["backend"] for r in rows] == ["auto"]
    assert rows[0]["vs_dense"] > 0 and rows[0]["pixels"] == 64 * 64


# ---- compare ---------------------------------------------------------------------------------------
def _scaled(results: dict, factor: float) -> dict:
    """A copy of `results` with every median (and every timing) multiplied by `factor`."""
    out = copy.deepcopy(results)
    for bench in out["benchmarks"]:
        for key in ("min", "max", "mean", "median", "q1", "q3"):
            if key in bench["stats"]:
                bench["stats"][key] *= factor
    return out


@pytest.mark.parametrize("factor, expected_rc", [(1.20, 1), (1.02, 0), (0.80, 0)])
def test_compare_flags_a_20_percent_regression_and_passes_2_percent(recorded_run, tmp_path, factor, expected_rc):
    _, out = recorded_run
    old_path = next(out.rglob("*.json"))
    new_path = tmp_path / "new.json"
    new_path.write_text(json.dumps(_scaled(_suite.load_results(old_path), factor)))
    proc = _run("-m", "bench", "compare", str(old_path), str(new_path), "--threshold", "0.10", timeout=120)
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    assert ("REGRESSION" in proc.stdout) == (expected_rc == 1)
    assert f"{factor:.3f}" in proc.stdout  # the per-benchmark ratio is printed


def test_compare_defaults_to_newest_baseline_against_a_fresh_run(recorded_run):
    _, out = recorded_run
    # a huge threshold: CPU timings are noisy, this checks the plumbing, not the speed
    proc = _run(
        "-m", "bench", "compare", "--results", str(out), "--threshold", "100", "--max-time", "0.05",
        "--min-rounds", "3",
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "new: fresh run" in proc.stdout and str(next(out.rglob("*.json"))) in proc.stdout
    verdicts = ("ok", "faster", "SLOWER")
    names = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[-1:] and line.split()[-1] in verdicts]
    assert sorted(names) == [
        "test_conv_contract[quick-d2_n64_b4_c8-fwd-auto]", "test_conv_contract[quick-d2_n64_b4_c8-fwd-dense]",
        "test_conv_contract[quick-d2_n64_b4_c8-fwd-reference]",
    ]


def _synthetic(medians: dict) -> dict:
    return {
        "machine_info": {"device_kind": "cpu"},
        "commit_info": {"id": "x"},
        "benchmarks": [{"name": n, "stats": {"median": m}, "extra_info": {}} for n, m in medians.items()],
    }


def test_compare_results_ratios_verdicts_and_threshold():
    old = _synthetic({"a": 1.0, "b": 2.0, "c": 1.0, "gone": 1.0})
    new = _synthetic({"a": 1.2, "b": 2.04, "c": 0.5, "added": 1.0})
    rows, regressed = compare.compare_results(old, new, threshold=0.10)
    verdicts = {r["name"]: r["verdict"] for r in rows}
    assert regressed
    assert verdicts == {"a": "SLOWER", "b": "ok", "c": "faster", "gone": "only in old", "added": "only in new"}
    assert {r["name"]: r["ratio"] for r in rows}["a"] == pytest.approx(1.2)
    assert not compare.compare_results(old, new, threshold=0.25)[1]
    with pytest.raises(ValueError, match="threshold"):
        compare.compare_results(old, new, threshold=-0.1)


def test_compare_rejects_bad_input(tmp_path):
    not_results = tmp_path / "x.json"
    not_results.write_text('{"hello": 1}')
    proc = _run("-m", "bench", "compare", str(not_results), str(not_results), timeout=120)
    assert proc.returncode == 2 and "not pytest-benchmark JSON" in proc.stderr
    proc = _run("-m", "bench", "compare", "a.json", "b.json", "--threshold", "-1", timeout=120)
    assert proc.returncode == 2 and "--threshold (=-1.0)" in proc.stderr


def test_stored_results_are_ordered_by_run_datetime(tmp_path):
    folder = tmp_path / "cpu"
    folder.mkdir()
    for name, when in (("2026-01-02-bbb.json", "2026-01-02T00:00:00"), ("2026-01-01-zzz.json", "2026-01-01T00:00:00")):
        (folder / name).write_text(json.dumps(dict(_synthetic({"a": 1.0}), datetime=when)))
    (folder / "broken.json").write_text("{")
    assert [p.name for p in compare.stored_results("cpu", tmp_path)] == ["2026-01-01-zzz.json", "2026-01-02-bbb.json"]


# ---- small parts -------------------------------------------------------------------------------------
def test_default_selection_says_what_it_leaves_out_and_why():
    import argparse

    import jax

    import kernels
    from bench.__main__ import _resolve_selection

    args = argparse.Namespace(configs="d2_n64_b4_c8,d3_n16_b2_c8", backends="", modes="")
    configs, backends, modes, left_out = _resolve_selection(args)
    assert modes == ("fwd", "fwd_bwd")  # layer configs only: no `step`
    why = dict(left_out)
    for name in kernels.registered_backends():
        assert (name in backends) != (name in why), name  # every registered backend: run, or said why not
        if name in why and name in kernels.available_backends():
            # left out although it runs: only the interpreted fused backends on a CPU
            assert jax.default_backend() == "cpu" and name in ("triton", "pallas") and "interpreter" in why[name]
        elif name in why:
            assert why[name]  # the registry's reason it cannot run here



def test_the_2d_model_steps_are_a_set_of_their_own():
    # measured by `auto-models` (so `auto` gets exact rows for 2D users' layers), outside the
    # default GPU run and outside models-b1
    two_d = _configs.CONFIG_SETS["models-2d"]
    assert len(two_d) == 3 and all(_configs.CONFIGS[c].D == 2 and _configs.CONFIGS[c].N == 256 for c in two_d)
    assert set(two_d) <= set(_configs.CONFIG_SETS["auto-models"])
    assert not set(two_d) & set(_configs.CONFIG_SETS["all"] + _configs.CONFIG_SETS["models-b1"])
    assert {_configs.CONFIGS[c].model for c in two_d} == {"UNet", "ResNet", "DilResNet"}


def test_selection_errors_name_the_flag_and_value():
    assert _configs.select_configs("quick", "gpu") == _configs.CONFIG_SETS["quick"]
    assert _configs.select_configs(None, "cpu") == _configs.CONFIG_SETS["quick"]
    assert set(_configs.select_configs("auto", "gpu")) >= {"d3_n64_b4_c16", "unet_d3_n64_b4", "d3_n16_b2_c8"}
    with pytest.raises(ValueError, match=r"--configs \(='quick,d9_n1'\): unknown name 'd9_n1'"):
        _configs.select_configs("quick,d9_n1", "cpu")
    with pytest.raises(ValueError, match=r"--modes \(='bwd'\)"):
        _configs.parse_selection("bwd", _configs.MODES, "--modes")


def test_device_says_which_vector_neuron_kernels_run(monkeypatch):
    from bench import _device
    from ginjax import _vector_neuron

    monkeypatch.delenv(_vector_neuron.IMPL_ENV, raising=False)
    monkeypatch.delenv(_vector_neuron.MEANS_ENV, raising=False)
    assert _device.vector_neuron_kernels() == "xla"  # a CPU's default
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "triton")
    assert _device.vector_neuron_kernels() == "triton (means on)"
    monkeypatch.setenv(_vector_neuron.MEANS_ENV, "0")
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "cuda")
    assert _device.vector_neuron_kernels().startswith("triton where it covers a call (means off; cuda asked for, not here: ")


def test_device_says_whether_the_cuda_forward_adds_residuals(monkeypatch):
    pytest.importorskip("kernels.triton")
    from bench import _device
    from kernels import cuda
    from kernels.cuda import _plan
    from kernels.cuda import conv_contract as cuda_entry

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    monkeypatch.delenv(cuda_entry.RESIDUAL_ENV, raising=False)
    monkeypatch.delenv(_plan.TWIN_ENV, raising=False)
    assert _device.cuda_kernels().endswith("cover the layer, residuals added in the forward's epilogue, "
                                           "rows of 32 on twin rings")
    monkeypatch.setenv(cuda_entry.RESIDUAL_ENV, "0")
    monkeypatch.setenv(_plan.TWIN_ENV, "0")
    assert _device.cuda_kernels().endswith("residuals added by XLA (GINJAX_CUDA_RESIDUAL=0), "
                                           "rows of 32 on one ring (GINJAX_CUDA_TWIN=0)")
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")
    assert "residuals" not in _device.cuda_kernels() and "ring" not in _device.cuda_kernels()


def test_commit_falls_back_without_git(monkeypatch, tmp_path):
    monkeypatch.delenv(_suite.COMMIT_ENV, raising=False)
    assert _suite.resolve_commit("abc") == "abc"
    monkeypatch.setenv(_suite.COMMIT_ENV, "fromenv")
    assert _suite.resolve_commit() == "fromenv"
    monkeypatch.delenv(_suite.COMMIT_ENV)
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert _suite.resolve_commit() == "unknown"


def test_result_paths_never_overwrite(tmp_path):
    first = _suite.result_paths(tmp_path, "nvidia-h200", "abc1234")
    assert first["json"].parent.name == "nvidia-h200" and first["json"].name.endswith("-abc1234.json")
    first["json"].parent.mkdir(parents=True)
    first["json"].write_text("{}")
    second = _suite.result_paths(tmp_path, "nvidia-h200", "abc1234")
    assert second["json"] != first["json"] and second["json"].name.endswith("-abc1234-2.json")


def test_peak_is_known_for_the_h200_only():
    assert _configs.peak_tflops("NVIDIA H200", "tf32") == 395.0
    assert _configs.peak_tflops("NVIDIA H200", "bf16") == 790.0
    assert _configs.peak_tflops("cpu", "tf32") is None


def test_rel_err_takes_the_worst_array_or_the_whole_vector():
    import jax.numpy as jnp

    from bench import _errors

    expected = {"a": jnp.ones(4), "b": jnp.full(4, 100.0), "zero": jnp.zeros(3)}
    actual = {"a": jnp.ones(4) * 1.1, "b": jnp.full(4, 100.0), "zero": jnp.zeros(3)}
    assert _errors.rel_err(actual, expected) == pytest.approx(0.1, rel=1e-5)
    assert _errors.rel_err(actual, expected, per_array=False) == pytest.approx(0.2 / 200.01, rel=1e-3)
    assert _errors.rel_err(dict(actual, zero=jnp.ones(3)), expected) == float("inf")
    assert _errors.rel_err(dict(actual, a=jnp.full(4, jnp.nan)), expected) == float("inf")


def test_conv_flops_counts_the_dense_layer_as_its_spec_says():
    """The models' GFLOP comes from counting convs in the jaxpr under `dense`: check it on a layer."""
    import kernels

    from bench import _cases, _flops

    case = _cases.LayerCase(_configs.LayerConfig("t", D=2, N=8, B=3, c=2))
    fn, args = case.function("fwd")
    with kernels.use_backend("dense"):
        counted = _flops.conv_flops(fn, *args)
    assert counted == 3 * case.spec().dense_flops((8, 8)) > 0


def test_measured_table_from_a_committed_run():
    """`python -m bench measured` rebuilds the committed `auto` table from the run it names."""
    import json as _json

    from bench.measured import measure_auto_source, table_from_run
    from kernels._measured import _DIR

    committed = _json.loads((_DIR / "nvidia-h200.json").read_text())
    configs = {}
    runs = [s for s in committed["sources"] if not measure_auto_source(s)]
    assert runs, committed["sources"]  # measure-auto's sources fill the `exact` entries, not `configs`
    for source in runs:  # oldest first: later runs replace earlier numbers
        kind, configs = table_from_run(_json.loads((pathlib.Path(__file__).parents[1] / source).read_text()), configs)
        assert kind == committed["device_kind"] == "NVIDIA H200"
    assert configs == committed["configs"]


def test_bench_order_keeps_each_model_steps_backends_together():
    """Under a time budget the layer A/B (baselines first) completes, and each model step's
    backends run back to back, so a cut leaves whole auto-vs-dense comparisons."""
    import types

    from bench import _configs
    from bench import conftest as bench_conftest

    def item(cfg, backend, mode):
        return types.SimpleNamespace(callspec=types.SimpleNamespace(params={"case": (cfg, mode, backend)}))

    models = [c.name for c in _configs.MODEL_CONFIGS][:2]
    layer = _configs.LAYER_CONFIGS[0].name
    items = [item(m, b, "step") for m in models for b in ("dense", "auto")]
    items += [item(layer, b, "fwd") for b in ("triton", "dense")]
    ordered = sorted(items, key=bench_conftest._tier)
    names = [(i.callspec.params["case"][0], i.callspec.params["case"][2]) for i in ordered]
    assert names == [(layer, "dense"), (layer, "triton")] + [(m, b) for m in models for b in ("dense", "auto")]


@pytest.mark.parametrize("module, argv, message", [
    ("bench.__main__", ["--max-time", "0"], "--max-time (=0.0) must be > 0"),
    ("bench.compare", ["--min-rounds", "0"], "--min-rounds (=0) must be >= 1"),
    ("bench.measure_auto", ["--time-budget", "-1"], "--time-budget (=-1.0) must be >= 0"),
    ("bench.__main__", ["--warmup", "-2"], "--warmup (=-2) must be >= 0"),
])
def test_timing_options_out_of_range_are_named(module, argv, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_terminated_run_keeps_the_cases_that_finished(tmp_path):
    """`timeout` sends SIGTERM: the suite ends as interrupted and the JSON and table hold every
    case that finished (the default action would kill the process with all of them)."""
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--configs", "d2_n64_b4_c8,d3_n16_b2_c8", "--backends", "dense",
         "--modes", "fwd,fwd_bwd", "--max-time", "0.05", "--min-rounds", "1", "--no-check", "--no-plot",
         "--out", str(tmp_path), "--commit", "sigterm"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "median" in line:  # the first case is done: stop the run during the next
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=300)
    text = "".join(seen) + out
    assert proc.returncode == 2, text[-3000:]
    assert "interrupted (SIGTERM or Ctrl-C)" in text, text[-3000:]
    (json_path,) = tmp_path.glob("*/*-sigterm.json")
    benchmarks = json.loads(json_path.read_text())["benchmarks"]
    assert 1 <= len(benchmarks) < 4, [b["name"] for b in benchmarks]
    finished = {line.split("]", 1)[1].split(":")[0].strip() for line in text.splitlines() if ": median " in line}
    kept = {f'{b["extra_info"]["config"]}-{b["extra_info"]["mode"]}-dense' for b in benchmarks}
    # every case that printed its median is kept (one more may have finished as the signal came)
    assert finished <= kept and len(kept - finished) <= 1, (finished, kept)


@pytest.mark.slow  # two bench runs in subprocesses (~20 s)
def test_a_killed_run_keeps_the_cases_that_finished_in_jsonl(tmp_path):
    """A process killed outright (SIGKILL here; on the GPU a SIGTERM that lands during a long
    native compile ended a run the same way) writes no pytest-benchmark JSON: the cases that
    finished are each a line of `<json>.cases.jsonl`, written as they end. A run that ends
    normally leaves only the JSON."""
    import signal

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    def argv(configs, modes, commit):
        return [sys.executable, "-m", "bench", "--configs", configs, "--backends", "dense", "--modes", modes,
                "--max-time", "0.05", "--min-rounds", "1", "--no-check", "--no-plot", "--out", str(tmp_path),
                "--commit", commit]

    proc = subprocess.Popen(argv("d2_n64_b4_c8,d3_n16_b2_c8", "fwd,fwd_bwd", "sigkill"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    finished = []
    for line in proc.stdout:
        if ": median " in line:  # the first case is done: kill the run during the next
            finished.append(line.split("]", 1)[1].split(":")[0].strip())
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and finished
    (cases,) = tmp_path.glob("*/*-sigkill.json.cases.jsonl")
    rows = [json.loads(line) for line in cases.read_text().splitlines()]
    assert [r["name"] for r in rows][:1] == finished, rows
    assert rows[0]["median_s"] > 0 and rows[0]["backend"] == "dense" and rows[0]["config"] in ("d2_n64_b4_c8", "d3_n16_b2_c8")
    # a whole run: the JSON, and no cases file beside it
    done = subprocess.run(argv("d3_n16_b2_c8", "fwd", "whole"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list(tmp_path.glob("*/*-whole.json")) and not list(tmp_path.glob("*/*-whole.json.cases.jsonl"))


def test_auto_operand_layouts_give_the_row_major_results():
    """`compile_for(..., operand_layouts="auto")` (`python -m bench --operand-layouts auto`): XLA
    picks the layouts of the arguments and results, as for a layer inside a model; `place` hands
    the arguments over in them, and the values are those of the row-major program (compared
    through the host: on jax 0.10.2 a jitted op misreads an array in a non-default layout)."""
    import jax
    import numpy as np

    from bench import _harness, _timing

    case = _harness.cached_case(_configs.CONFIGS["d2_n64_b4_c8"])
    fn, args = case.function("fwd_bwd")
    want = _timing.compile_for(fn, args, "dense")(*args)
    auto = _timing.compile_for(fn, args, "dense", operand_layouts="auto")
    got = auto(*_timing.place(auto, args))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"`operand_layouts` \(='planar'\) must be one of"):
        _timing.compile_for(fn, args, "dense", operand_layouts="planar")


def test_the_compile_time_is_split_into_lowering_triton_and_xla(monkeypatch):
    """`compile_for(..., phases=)`: lowering (with our Triton kernels' compiles, counted once per
    kernel by `kernels.triton._compile.compile_log`) and XLA's compile, in seconds."""
    import time as _time

    from bench import _harness, _timing
    from kernels.triton import _compile

    case = _harness.cached_case(_configs.CONFIGS["d2_n64_b4_c8"])
    fn, args = case.function("fwd")
    phases = {}
    start = _time.perf_counter()
    _timing.compile_for(fn, args, "dense", phases=phases)
    total = _time.perf_counter() - start
    assert set(phases) == {"lower_s", "triton_s", "xla_compile_s", "triton_slowest"}
    assert phases["triton_s"] == 0.0 and phases["triton_slowest"] == []
    assert 0 < phases["lower_s"] and 0 < phases["xla_compile_s"]
    assert phases["lower_s"] + phases["xla_compile_s"] <= total

    calls = []
    monkeypatch.setattr(_compile, "_compile", lambda plan, types: calls.append(plan) or _time.sleep(0.05))
    _compile.forget()
    logged = len(_compile.compile_log())
    _compile.compiled_kernel("plan-a", ("*fp32",))
    _compile.compiled_kernel("plan-a", ("*fp32",))  # compiled once: not again, not counted
    assert calls == ["plan-a"]
    (name, seconds), = _compile.compile_log()[logged:]
    assert name == "plan-a" and 0.05 <= seconds < 1.0
    _compile.forget()


def test_a_slow_first_call_does_not_cut_the_warm_up():
    """A first call that carries one-time work (module loads, autotuning) longer than `max_time`
    does not decide the rounds: a fast warm call still gets the warm-up and rounds filling
    `max_time`, queued calls included."""
    import time as _time

    import numpy as np

    from bench import _timing

    calls = []

    def fake(*args):
        calls.append(_time.perf_counter())
        if len(calls) == 1:
            _time.sleep(0.2)
        return np.zeros(())

    t = _timing.time_compiled(fake, (), max_time=0.05, min_rounds=3, warmup_s=0.01)
    assert t.calls_per_round == 5
    assert t.rounds > 3 and len(calls) > 1 + 1 + t.rounds * t.calls_per_round


def test_queued_calls_from_the_environment(monkeypatch):
    """$GINJAX_BENCH_QUEUED_CALLS sets the queue depth of short calls; a bad value names the variable."""
    import numpy as np

    from bench import _timing

    monkeypatch.setenv(_timing.QUEUED_CALLS_ENV, "12")
    t = _timing.time_compiled(lambda: np.zeros(()), (), max_time=0.02, min_rounds=2, warmup=0)
    assert t.calls_per_round == 12
    for bad in ("0", "five"):
        monkeypatch.setenv(_timing.QUEUED_CALLS_ENV, bad)
        with pytest.raises(ValueError, match="GINJAX_BENCH_QUEUED_CALLS"):
            _timing.time_compiled(lambda: np.zeros(()), (), max_time=0.02, min_rounds=2, warmup=0)


def test_a_spike_builds_operands_of_its_configs_dimension(tmp_path):
    """bench/_spike.py's operands on the config's own grid: a 2D config gets (B, c, N, N[, 2])
    blocks (it once took N^3 for every config, so the 2D VectorNeuron spike ran on a 3D grid
    with a 2-wide axis and ran out of time on the GPU)."""
    from bench._spike import Spike

    two = Spike("t", tmp_path, "d2_n64_b4_c8")
    assert [x.shape for x in two.xs] == [(4, 8, 64, 64), (4, 8, 64, 64, 2)] and two.rows["spatial"] == (64, 64)
    three = Spike("t", tmp_path, "d3_n16_b2_c8")
    assert [x.shape for x in three.xs] == [(2, 8, 16, 16, 16), (2, 8, 16, 16, 16, 3)]


@pytest.mark.parametrize("flag", ["--channels", "--spatial", "--batch"])
def test_the_vector_neuron_spike_refuses_a_block_size_below_one(flag, tmp_path, capsys):
    """bench.vector_neuron_spike's random-block sizes: 0 is refused by name before anything runs."""
    from bench import vector_neuron_spike

    with pytest.raises(SystemExit):
        vector_neuron_spike.main([str(tmp_path), flag, "0"])
    assert f"{flag} (=0) must be >= 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_the_parity_spike_measures_each_variant_it_names(tmp_path, monkeypatch):
    """bench.parity_spike on a 4^3 grid through the interpreter: each forward tiling and weight-
    gradient tiling is its own trace (jit would reuse one function's trace, switches and all: each
    tiling named must reach the kernel builders), the forward's error against `reference` and the
    fwd_bwd's against `dense` within fp32's tolerance, every row with its temp bytes. Errors alone
    cannot tell the tilings apart: the weight gradient's concatenation groups independent dots, so
    two concatenations may agree to the bit."""
    import json

    from bench import parity_spike
    from kernels.triton import parity_conv

    built = {"fwd": set(), "dw": set()}

    def spy(kind, builder):
        def wrapped(*args):
            built[kind].add(args[-1])
            return builder(*args)
        return wrapped

    monkeypatch.setattr(parity_conv, "_batched_forward", spy("fwd", parity_conv._batched_forward))
    monkeypatch.setattr(parity_conv, "_batched_weight_grad", spy("dw", parity_conv._batched_weight_grad))
    monkeypatch.setattr(parity_spike, "TIMING", dict(max_time=0.0, min_rounds=1, max_rounds=1, warmup=0))
    parity_spike.main([str(tmp_path), "--spatial", "4", "--batch", "1", "--forward", "16,4,1,0", "16,4,8,1",
                       "--weight-grad", "16,4,8", "16,4,2"])
    stages = json.loads((tmp_path / "parity_spike.json").read_text())["stages"]
    assert all(row["ok"] for row in stages.values()), stages
    fwd, bwd = ["fwd 16,4,1,0", "fwd 16,4,8,1"], ["fwd_bwd 16,4,8", "fwd_bwd 16,4,2"]
    assert set(stages) == {"reference", "compile", "dense fwd", "dense fwd_bwd", *fwd, *bwd}
    assert set(stages["compile"]["compile_s"]) == {*fwd, *bwd}
    errors = [stages[name]["rel_l2"] for name in fwd + bwd]
    assert max(errors) <= 1e-5, errors
    tilings = {name: parity_conv.ParityBlocks(*map(int, name.split()[-1].split(","))) for name in fwd + bwd}
    assert {tilings[name] for name in fwd} <= built["fwd"], built
    assert {tilings[name] for name in bwd} == built["dw"], built
    assert all(stages[name]["temp_bytes"] is not None for name in stages if name not in ("reference", "compile"))


def test_parity_sass_reports_a_kernels_resources_and_opcodes():
    """bench.parity_sass compiles a generated kernel for sm_90 without a GPU (the cuobjdump that
    Triton's wheel ships) and prints its registers and SASS opcode counts: here the k2 layer's
    per-class weight gradient of its 32-row class, whose concatenated runs of 4-8 dots take the
    wgmma path (HGMMA) and those of 1-2 the mma path (HMMA). In a subprocess without the
    interpreter (bench/_offline.py: this process's triton is the interpreter's)."""
    import re

    pytest.importorskip("triton.backends.nvidia")
    done = _run("-m", "bench.parity_sass", "--kernel", "dw", "--block-x", "32", "--warps", "8", "--concat", "8",
                env_extra={"TRITON_INTERPRET": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    registers = int(re.search(r"REG:(\d+)", out).group(1))
    counts = dict((op, int(n)) for op, n in re.findall(r"([A-Z]+) (\d+)", out.splitlines()[-1]))
    assert 32 <= registers <= 255 and counts["HGMMA"] > 0 and counts["HMMA"] > 0, out
