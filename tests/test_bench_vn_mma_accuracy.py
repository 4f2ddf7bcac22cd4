"""bench/vn_mma_accuracy.py on the host: the tf32 rounding it applies to one operand at a time,
its rows on ginjax's XLA path (every operand set, both backward settings), and the CUDA run
refused with the reason where the CUDA VectorNeuron does not run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import vn_mma_accuracy


def test_the_operands_round_to_ten_mantissa_bits():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000).astype(np.float32) * np.float32(1e3)
    r = vn_mma_accuracy.round_tf32(a)
    assert r.dtype == np.float32 and np.all(r.view(np.uint32) & np.uint32(0x1FFF) == 0)
    assert np.max(np.abs(r - a) / np.abs(a)) <= 2.0**-11  # half a tf32 ulp, relative
    assert np.array_equal(vn_mma_accuracy.round_tf32(r), r)  # tf32 values stay
    assert vn_mma_accuracy.round_tf32(np.float32([1 + 2**-11]))[0] == np.float32(1 + 2**-10)  # ties away


def test_rows_on_the_xla_path(tmp_path):
    assert vn_mma_accuracy.main([str(tmp_path), "--shape", "2,4,5,6,7,3", "--impl", "xla"]) == 0
    rows = json.loads((tmp_path / "vn_mma_accuracy.json").read_text())["rows"]
    assert [(r["exact"], r["backward"]) for r in rows] == [
        (e, b) for e in vn_mma_accuracy.OPERANDS for b in ("tensor cores", "ffma")]
    for r in rows:  # fp32 against float64
        assert 0 < r["y"] < 1e-5 and 0 < r["gw"] < 1e-4 and 0 < r["gx"] < 1e-4, r


def test_cuda_refused_where_it_does_not_run(tmp_path, capsys):
    pytest.importorskip("jax")
    from kernels.cuda import availability

    if availability()[0]:
        pytest.skip("the CUDA VectorNeuron runs here")
    assert vn_mma_accuracy.main([str(tmp_path), "--shape", "1,16,4,4,4,3"]) == 2
    assert "does not run here" in capsys.readouterr().err
