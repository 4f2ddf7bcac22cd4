"""Spatial domain decomposition of ConvContract (kernels/_sharding.py).

The planning (halo widths, local padding, rejected layouts) is checked here directly. Everything
that needs several devices runs in subprocesses with XLA_FLAGS=--xla_force_host_platform_device_count=4,
which must be set before jax starts and must not leak into the other tests:
  tests/sharded/conv_cases.py   ConvContract sharded == unsharded, values and gradients
  tests/sharded/model_cases.py  UNet, ResNet, DilResNet and a ginjax.ml train step, likewise
  bench/scaling.py --smoke      the scaling benchmark end to end at tiny sizes
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import kernels
from kernels import _sharding

from conftest import fixture_filters

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def _pytest(path: str, timeout: int) -> None:
    """Run a test file in a subprocess; every test it collects must pass: a skip, xfail or
    deselection there fails here (exit code 0 alone would let a module-level skip pass)."""
    proc = _run(["-m", "pytest", path, "-q", "-rsxX", "-p", "no:cacheprovider", "-x"], timeout)
    summary = proc.stdout.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|xfailed|xpassed|deselected)", summary)}
    assert counts.pop("passed", 0) > 0 and not counts, f"{path}: {summary}\n{proc.stdout[-4000:]}"


# ---- the cases on simulated devices -------------------------------------------------------
def test_conv_contract_sharded_cases():
    _pytest("tests/sharded/conv_cases.py", timeout=600)


def test_model_sharded_cases():
    _pytest("tests/sharded/model_cases.py", timeout=600)


def test_scaling_benchmark_smoke(tmp_path):
    _run(
        ["-m", "bench.scaling", "--smoke", "--devices", f"1,{DEVICES}", "--out", str(tmp_path)], timeout=600
    )
    results = json.loads((tmp_path / "scaling.json").read_text())
    rows = [r for r in results["rows"] if r["scaling"] in ("weak", "strong")]
    assert {(r["workload"], r["scaling"], r["devices"]) for r in rows} == {
        (w, s, p) for w in ("conv", "unet") for s in ("weak", "strong") for p in (1, DEVICES)
    }
    for row in rows:
        assert "error" not in row, row
        assert row["median_ms"] > 0 and row["efficiency"] > 0, row
        if row["scaling"] == "weak":
            assert row["grid_per_device"] == [8, 8, 8], row
        if row["scaling"] == "strong" and row["devices"] > 1:
            assert row["loss_rel_diff_vs_base"] < 1e-5, row  # the split changes no numbers
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "scaling.png").stat().st_size > 0


# ---- planning, on one device ---------------------------------------------------------------
def _spec(D=2, M=3, is_torus=True, **geometry):
    basis = fixture_filters(D, M)[(0, 0)]
    return kernels.make_spec(D, [(0, 0, 2)], [(0, 0, 2)], [(0, 0, basis)], is_torus, **geometry)


@pytest.mark.parametrize("is_torus", [True, False])
@pytest.mark.parametrize("dilation", [1, 2])
def test_same_padding_halo_is_half_the_filter(is_torus, dilation):
    spec = _spec(is_torus=is_torus, rhs_dilation=dilation)
    p = _sharding.plan_axis(spec, (16, 16), 0, "x", 4)
    assert (p.n_local, p.halo_lo, p.halo_hi) == (4, dilation, dilation)
    assert (p.zero_lo, p.zero_hi) == (0, 0)  # the halos replace the padding
    assert p.wrap == is_torus


def test_local_spec_keeps_unsplit_axes():
    spec = _spec(D=3, is_torus=(True, False, True))
    layout = _sharding.make_layout(jax.make_mesh((1,), ("x",)), {1: "x"})
    local, plans = _sharding.plan(spec, (8, 8, 8), layout)
    assert plans == ()  # a mesh axis of one device splits nothing
    assert local == spec
    p = _sharding.plan_axis(spec, (8, 8, 8), 1, "x", 2)
    assert p.wrap is False and (p.halo_lo, p.halo_hi) == (1, 1)


def test_stride_and_lhs_dilation_plans():
    down = _sharding.plan_axis(_spec(is_torus=False, stride=2, padding="SAME"), (16, 16), 0, "x", 4)
    assert (down.halo_lo, down.halo_hi, down.zero_lo, down.zero_hi) == (1, 0, 0, 0)
    up = _spec(M=2, padding=((1, 1), (1, 1)), lhs_dilation=(2, 2))
    p = _sharding.plan_axis(up, (8, 8), 1, "x", 4)
    assert (p.halo_lo, p.halo_hi, p.zero_lo, p.zero_hi) == (0, 0, 1, 1)  # no halo at all


def test_every_plan_reproduces_the_local_output_size():
    """The local problem of each plan yields exactly the shard's share of the output."""
    cases = [
        dict(),
        dict(rhs_dilation=2),
        dict(padding=((2, 0), (2, 0))),
        dict(padding=((0, 2), (0, 2))),
        dict(stride=2, padding="SAME"),
        dict(M=2, padding=((1, 1), (1, 1)), lhs_dilation=(2, 2)),
    ]
    for geometry in cases:
        spec = _spec(is_torus=False, **geometry)
        p = _sharding.plan_axis(spec, (16, 16), 0, "x", 4)
        local = dataclasses.replace(spec, zero_pad=((p.zero_lo, p.zero_hi), spec.zero_pad[1]))
        n_in = p.n_local + p.halo_lo + p.halo_hi
        assert local.out_spatial((n_in, 16))[0] * 4 == spec.out_spatial((16, 16))[0], geometry


def test_rejections_name_the_axis_and_devices():
    with pytest.raises(ValueError, match=r"spatial axis 1 \(=10\) is not divisible by the 4 devices of mesh axis 'x'"):
        _sharding.plan_axis(_spec(), (16, 10), 1, "x", 4)
    with pytest.raises(ValueError, match="cannot be split over the 4 devices of mesh axis 'x'"):
        _sharding.plan_axis(_spec(padding="VALID"), (16, 16), 0, "x", 4)
    with pytest.raises(ValueError, match="reaches 3 cells into the previous shard"):
        _sharding.plan_axis(_spec(rhs_dilation=3), (8, 8), 0, "x", 4)


def test_layout_validation():
    mesh = jax.make_mesh((1,), ("x",))
    with pytest.raises(ValueError, match="mesh axis 'y' is not an axis of the mesh"):
        _sharding.make_layout(mesh, {0: "y"})
    with pytest.raises(ValueError, match="each mesh axis may split one thing only"):
        _sharding.make_layout(mesh, {0: "x"}, batch_axis="x")
    with pytest.raises(ValueError, match="splits no spatial axis"):
        _sharding.make_layout(mesh, {})
    with pytest.raises(TypeError, match="must be a dict"):
        _sharding.make_layout(mesh, "x")
    layout = _sharding.make_layout(mesh, ("x", None))
    assert layout.axis_map == ((0, "x"),)
    assert tuple(layout.block_spec(5, 3)) == (None, None, "x", None, None)


def test_context_is_scoped():
    mesh = jax.make_mesh((1,), ("x",))
    assert _sharding.active_spatial_sharding() is None
    with _sharding.spatial_sharding(mesh, {0: "x"}) as layout:
        assert _sharding.active_spatial_sharding() is layout
        with _sharding.spatial_sharding(mesh, {1: "x"}) as inner:
            assert _sharding.active_spatial_sharding() is inner
        assert _sharding.active_spatial_sharding() is layout
    assert _sharding.active_spatial_sharding() is None


def test_one_device_mesh_runs_the_plain_backend(rng):
    """On a mesh of one device the sharded entry point is the plain operation."""
    spec = _spec(D=2)
    x = rng.standard_normal((2, 8, 8)).astype(np.float32)
    w = rng.standard_normal((2, 2, spec.pairs[0].basis.n_filters)).astype(np.float32)
    layout = _sharding.make_layout(jax.make_mesh((1,), ("x",)), {0: "x"})
    (got,) = _sharding.sharded_conv_contract(spec, [x], [w], layout, backend="dense", mode="fp32")
    (want,) = kernels.conv_contract(spec, [x], [w], backend="dense", precision="fp32")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
