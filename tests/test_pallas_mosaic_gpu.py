"""The Mosaic GPU forward spike (kernels/pallas/mosaic_fwd.py) compiled and run on a Hopper GPU,
against the `reference` backend at the tf32 tolerance: every kernel variant, an odd grid (z, y
not powers of two, batch 2) and the standard layer's grid. Run on the GPU machine:

    python3 -m pytest -m gpu tests/test_pallas_mosaic_gpu.py
"""

from __future__ import annotations

import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from conftest import rel_l2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU"),
]
SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])
VARIANTS = [{}, {"auto_barriers": False}, {"share_loads": True, "auto_barriers": False}]


def _check(spatial, batch, variant, seed):
    from kernels.pallas import mosaic_fwd as mf

    xs, ws, _ = _cases.spec_operands(SPEC, spatial, batch, seed=seed)
    got = jax.jit(lambda xs, ws: mf.mosaic_forward(SPEC, xs, ws, **variant))(xs, ws)
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.vmap(lambda x: kernels.conv_contract(SPEC, x, ws, backend="reference")))(xs)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert bool(jnp.all(jnp.isfinite(g))), "non-finite output: an unwritten or corrupted row"
        assert rel_l2(g, w) <= kernels.TOLERANCE["tf32"]


@pytest.mark.parametrize("variant", VARIANTS, ids=["default", "no_auto_barriers", "shared_reads"])
def test_odd_grid_against_reference(variant):
    _check((5, 7, 64), 2, variant, seed=11)


@pytest.mark.parametrize("variant", VARIANTS[:1] + VARIANTS[2:], ids=["default", "shared_reads"])
def test_standard_grid_against_reference(variant):
    _check((64, 64, 64), 1, variant, seed=12)
