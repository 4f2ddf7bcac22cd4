"""The parity-blocked forward on mma.sync (kernels/cuda/parity_conv.cu) on a Hopper GPU (`python3 -m
pytest -m gpu tests/test_parity_forward_cuda_gpu.py`), with GINJAX_PARITY_CUDA=on: the layer's
outputs and gradients (its input gradient runs the same kernel on the transposed plan) against
`reference`; odd sizes, zero padding, a dilated layer, NaN and inf."""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest

import jax

import kernels
from kernels.cuda import parity_forward as cuda_parity

pytestmark = pytest.mark.gpu

from kernels import cuda  # noqa: E402

if not cuda.availability()[0]:
    pytest.skip(f"needs the CUDA kernels on a Hopper GPU: {cuda.availability()[1]}", allow_module_level=True)

from test_conv_contract_triton import make_layer, operands  # noqa: E402
from conftest import assert_sanitizer_clean  # noqa: E402
from test_parity_conv_triton_gpu import _check_against_reference, _k2  # noqa: E402


@pytest.fixture(autouse=True)
def _cuda_on(monkeypatch):
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "on")


def _runs_the_kernel(f, *args):
    text = jax.jit(f).lower(*args).compile().as_text()
    return cuda_parity.PARITY_FORWARD in text


def test_two_tensor_layer_against_reference():
    """d3_n64_b2_c8_k2's layer at 16^3 x (16, 16, 80) (two x tiles, the second partial), an 'add'
    and a torus 'mean' bias, vmapped over 2, tf32: outputs and gradients."""
    spec = _k2(("add", "mean", "none"))
    xs, ws = operands(spec, (16, 16, 80), seed=41, batch=2)
    rng = np.random.default_rng(6)
    bias = [jax.numpy.asarray(rng.standard_normal(8), "float32"), jax.numpy.asarray(rng.standard_normal(8), "float32"), None]

    def vf(backend, precision):
        return jax.vmap(lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, backend=backend,
                                                              precision=precision), in_axes=(0, None, None))

    assert _runs_the_kernel(vf("triton", "tf32"), xs, ws, bias)
    _check_against_reference(vf("triton", "tf32"), vf("reference", "fp32"), (xs, ws, bias), (0, 1, 2), "tf32")


@pytest.mark.parametrize("spatial, torus, dilation", [((9, 12, 19), True, 1), ((7, 10, 33), (False, True, False), 1),
                                                      ((12, 9, 40), (True, False, True), 2)])
def test_odd_sizes_zero_padding_and_dilation(monkeypatch, spatial, torus, dilation):
    """Sizes no tile divides, class widths that are not multiples of 8, wrapped and zero-padded
    axes, a dilated layer; tf32, outputs and gradients against `reference`."""
    monkeypatch.setenv("GINJAX_TRITON_PARITY", "on")
    geometry = {} if torus is True else {"padding": "SAME"}
    if dilation > 1:
        geometry["rhs_dilation"] = (dilation,) * 3
    spec = make_layer(3, 3, [("s", 3), ("v", 2), ("pv", 1), ("t", 2)], [("s", 2), ("v", 3), ("t", 1)], torus, **geometry)
    assert "parity-blocked" in kernels.explain(spec, spatial, backend="triton").reason
    xs, ws = operands(spec, spatial, seed=43)
    f = lambda backend: (lambda x, w, b: kernels.conv_contract(spec, x, w, backend=backend, precision="tf32"))  # noqa: E731
    assert _runs_the_kernel(f("triton"), xs, ws, None)
    _check_against_reference(f("triton"), f("reference"), (xs, ws, None), (0, 1), "tf32")


def test_nan_and_inf(monkeypatch):
    """A NaN and an inf input (one at the grid's edge) through the mma.sync forward: the same
    outputs non-finite as in Triton's forward (whose pattern the CPU test checks exactly), the
    finite ones within tf32's tolerance of it."""
    from kernels.triton.parity_conv import conv_contract_parity

    spec = make_layer(3, 3, [("s", 2), ("v", 2), ("t", 1)], [("s", 1), ("v", 1), ("t", 1)])
    xs, ws = operands(spec, 5, seed=21)
    bad = [np.array(x, np.float32) for x in xs]
    bad[0][1, 2, 2, 2] = np.nan
    bad[1][0, 0, 4, 1, 2] = np.inf
    f = jax.jit(lambda x, w: conv_contract_parity(spec, x, w, "tf32"))
    assert _runs_the_kernel(f, bad, ws)
    got = [np.asarray(y) for y in f(bad, ws)]
    monkeypatch.setenv(cuda_parity.PARITY_CUDA_ENV, "off")
    want = [np.asarray(y) for y in jax.jit(lambda x, w: conv_contract_parity(spec, x, w, "tf32"))(bad, ws)]
    for g, w in zip(got, want):
        assert (np.isfinite(g) == np.isfinite(w)).all()
        assert (~np.isfinite(g)).any() and np.isfinite(g).any()
        ok = np.isfinite(g)
        assert np.linalg.norm(g[ok] - w[ok]) <= kernels.TOLERANCE["tf32"] * np.linalg.norm(w[ok])


_SANITIZED = textwrap.dedent(
    """
    import os, sys
    os.environ["GINJAX_PARITY_CUDA"] = "on"
    sys.path.insert(0, "tests")
    import jax
    from test_conv_contract_triton import make_layer, operands
    from kernels.triton import parity_conv as pc
    for spatial, torus, dilation in (((5, 6, 19), True, 1), ((4, 7, 70), (False, True, False), 1),
                                     ((6, 5, 9), (True, False, True), 2)):
        geometry = {} if torus is True else {"padding": "SAME"}
        if dilation > 1:
            geometry["rhs_dilation"] = (dilation,) * 3
        spec = make_layer(3, 3, [("s", 3), ("v", 2), ("t", 2)], [("s", 2), ("v", 3), ("t", 1)], torus, **geometry)
        xs, ws = operands(spec, spatial, seed=47)
        layer = pc.packed_layer(spec)
        plan, plan_t = layer.plan, layer.plan.transposed()
        assert pc.cuda_forward_runs(plan, spatial, "tf32"), pc.cuda_forward_refusal(plan, spatial, "tf32")
        x = pc.pack_rows(3, spec.in_keys, layer.in_order, xs)
        wc = pc.combo_filter(spec, layer, ws)
        fwd = jax.jit(lambda x, wc: pc._forward(plan, spatial, "tf32", pc.with_halo(plan, x), pc.dot_weights(plan, wc)))
        y = jax.block_until_ready(fwd(x, wc))
        # the input gradient: the same kernel on the transposed plan
        dx = jax.jit(lambda dy, wc: pc._forward(plan_t, spatial, "tf32", pc.with_halo(plan_t, dy),
                                                pc.dot_weights(plan_t, pc.transposed_combos(plan, wc))))
        jax.block_until_ready(dx(y, wc))
    print("done")
    """
)


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not installed")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_sanitizer_clean(tool):
    """Forward and input gradient on a torus, a zero-padded and a dilated layer (x tiles partial,
    one row shorter than a tile): no out-of-bounds access, no shared-memory race between the
    stages and the fragment reads."""
    assert_sanitizer_clean(_SANITIZED, tool=tool)
