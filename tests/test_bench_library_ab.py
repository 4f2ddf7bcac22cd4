"""bench/library_ab.py: the runs alternate A, B, A, B with each library in its own process, and the
summary is each row's median per library (the `python -m bench` runs stubbed by a process that
writes a bench JSON whose times depend on the library it was given)."""

from __future__ import annotations

import json
import pathlib

import pytest

from bench import library_ab


def test_runs_alternate_and_the_summary_takes_medians(tmp_path, monkeypatch, capsys):
    lib_a, lib_b = tmp_path / "a.so", tmp_path / "b.so"
    lib_a.write_bytes(b"a")
    lib_b.write_bytes(b"b")
    calls = []
    times = {"a.so": [2.0, 4.0, 3.0], "b.so": [1.0, 1.5, 5.0]}  # ms per round; medians 3.0 and 1.5

    def fake_call(cmd, env, stdout, stderr):
        lib = pathlib.Path(env["GINJAX_CUDA_LIBRARY"]).name
        calls.append((lib, cmd))
        ms = times[lib][sum(1 for name, _ in calls if name == lib) - 1]
        run_dir = pathlib.Path(cmd[cmd.index("--out") + 1]) / "gpu"
        run_dir.mkdir(parents=True)
        bench = {"param": "d3_n64_b4_c16-fwd-triton", "stats": {"median": ms / 1e3}}
        (run_dir / "run.json").write_text(json.dumps({"benchmarks": [bench]}))
        return 0

    monkeypatch.setattr(library_ab.subprocess, "call", fake_call)
    out = tmp_path / "out"
    assert library_ab.main([str(out), "--a", str(lib_a), "--b", str(lib_b), "--rounds", "3",
                            "--", "--configs", "d3_n64_b4_c16"]) == 0
    assert [lib for lib, _ in calls] == ["a.so", "b.so"] * 3
    for _, cmd in calls:  # the bench arguments reach every run, with --no-check added
        assert cmd[-2:] == ["--configs", "d3_n64_b4_c16"] and "--no-check" in cmd
    (row,) = json.loads((out / "library_ab.json").read_text())["rows"]
    assert row["a_all"] == [2.0, 4.0, 3.0] and row["b_all"] == [1.0, 1.5, 5.0]
    assert row["a_ms"] == 3.0 and row["b_ms"] == 1.5 and row["b_over_a"] == 0.5
    assert "d3_n64_b4_c16-fwd-triton" in capsys.readouterr().out


def test_bad_arguments_name_themselves(tmp_path, capsys):
    lib = tmp_path / "a.so"
    lib.write_bytes(b"a")
    with pytest.raises(SystemExit):
        library_ab.main([str(tmp_path), "--a", str(lib), "--b", str(tmp_path / "missing.so")])
    assert "`--b` (=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        library_ab.main([str(tmp_path), "--a", str(lib), "--b", str(lib), "--rounds", "0"])
    assert "`--rounds` (=0) must be at least 1" in capsys.readouterr().err
