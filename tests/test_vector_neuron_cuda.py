"""The CUDA VectorNeuron (kernels/cuda/vector_neuron.{cu,py}) on a CPU: argument validation, the
coverage reasons, ginjax's dispatch (cuda only when asked for and covered, else triton / xla),
the FFI plumbing as lowered (one forward and one backward call under vmap and grad, their
operands component-planar with the batch leading), a float64 numpy emulation of the kernels'
loops (tests/_vn_cuda_emulate.py: channel loop, tiles, the backward's CTAs and splits of gW)
against autodiff of ginjax's XLA path, and (slow) nvcc's resource report for every
instantiation (with and without the affine prologue): no spills, and the residency `COVERED`
holds the register and shared-memory limits. What only
tests/test_vector_neuron_cuda_gpu.py covers: the compiled kernels' numbers, the FFI calls
running, timing."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels.cuda
import _vn_cuda_emulate as emulate
from conftest import float64, rel_l2
from _hopper_compile import host_build, ptxas_report
from ginjax import _vector_neuron
from kernels.cuda import _ffi, vector_neuron as vn

EPS = 1e-5


def _operands(seed, c, spatial, D, k, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(c,) + spatial + (D,) * k).astype(dtype)
    w = (rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c)).astype(dtype)
    gy = rng.normal(size=x.shape).astype(dtype)
    return w, x, gy


@pytest.fixture
def built(monkeypatch):
    """The library as if built and registered (nothing here runs it: lowering only)."""
    monkeypatch.setattr(vn, "registered", lambda: (True, ""))


@pytest.fixture
def cuda_forward(monkeypatch, built):
    """The CUDA forward kernel (GINJAX_VN_CUDA_FORWARD=cuda; Triton's is the default)."""
    monkeypatch.setenv(vn.FORWARD_ENV, "cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(activation=jnp.tanh), "`activation`"),
        (dict(D=0), "`D` \\(=0\\)"),
        (dict(block=jnp.zeros((16, 4, 4, 4))), "`block` \\(shape \\(16, 4, 4, 4\\)\\).*tensor axis"),
        (dict(block=jnp.zeros((16, 4, 4, 4, 2))), "`block`.*tensor axes of size D \\(=3\\)"),
        (dict(weight=jnp.zeros((8, 8))), "`weight` \\(shape \\(8, 8\\)\\) must be \\(c, c\\) = \\(16, 16\\)"),
        (dict(weight=jnp.zeros((16, 16), jnp.bfloat16)), "`weight` \\(dtype bfloat16\\)"),
        (dict(eps=0.0), "`eps` \\(=0.0\\)"),
        (dict(eps=True), "`eps` \\(=True\\)"),
        (dict(block=jnp.zeros((5, 4, 4, 4, 3))), "`weight`"),
    ],
)
def test_validation_names_the_argument(kwargs, match, built):
    args = dict(weight=jnp.zeros((16, 16)), block=jnp.zeros((16, 4, 4, 4, 3)), D=3, activation=jax.nn.gelu, eps=EPS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vn.vector_neuron_cuda(**args)


def test_uncovered_sizes_and_an_unbuilt_library_are_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"`block` \(shape \(5, 4, 4, 4, 3\)\).*\(5, 3\) is not instantiated"):
        vn.vector_neuron_cuda(jnp.zeros((5, 5)), jnp.zeros((5, 4, 4, 4, 3)), 3, jax.nn.relu, EPS)
    monkeypatch.setattr(_ffi, "library", lambda: None)
    _ffi.registered.cache_clear()
    try:
        with pytest.raises(ValueError, match="cannot run here.*not built"):
            vn.vector_neuron_cuda(jnp.zeros((16, 16)), jnp.zeros((16, 4, 4, 4, 3)), 3, jax.nn.relu, EPS)
        ok, why = vn.coverage(16, 3)
        assert not ok and "not built" in why and "GINJAX_CUDA=ON" in why
    finally:
        _ffi.registered.cache_clear()


def test_coverage_reasons(built):
    w, x = jnp.zeros((16, 16)), jnp.zeros((16, 4, 4, 4, 3))
    assert vn.vector_neuron_cuda_covers(w, x, 3, jax.nn.gelu, EPS) == (True, "")
    assert vn.vector_neuron_cuda_covers(w, jnp.zeros((16, 4, 4, 2, 2)), 2, jax.nn.relu, 1) == (True, "")  # T = 4
    assert "jax.nn.relu or jax.nn.gelu" in vn.vector_neuron_cuda_covers(w, x, 3, jnp.tanh, EPS)[1]
    assert "eps" in vn.vector_neuron_cuda_covers(w, x, 3, jax.nn.gelu, jnp.float32(EPS))[1]
    assert "float32 only" in vn.vector_neuron_cuda_covers(w.astype(jnp.bfloat16), x, 3, jax.nn.gelu, EPS)[1]
    assert "float32 only" in vn.vector_neuron_cuda_covers(w, x.astype(jnp.bfloat16), 3, jax.nn.gelu, EPS)[1]
    why = vn.vector_neuron_cuda_covers(w, jnp.zeros((16, 4, 4, 4, 3, 3)), 3, jax.nn.gelu, EPS)[1]
    assert "(16, 9) is not instantiated" in why
    assert "(32, 3)" in vn.vector_neuron_cuda_covers(jnp.zeros((32, 32)), jnp.zeros((32, 4, 4, 4, 3)), 3, jax.nn.gelu,
                                                     EPS)[1]
    assert "no tensor axes" in vn.vector_neuron_cuda_covers(w, jnp.zeros((16, 4, 4, 4)), 3, jax.nn.gelu, EPS)[1]


def test_dispatch_picks_cuda_only_when_asked_and_covered(monkeypatch):
    calls = []

    def fake(weight, block, D, activation, eps, affine=None, with_means=False):
        calls.append((block.shape, D, activation, eps) + (() if affine is None else (len(affine),)))
        return (block, None) if with_means else block

    monkeypatch.setattr(kernels.cuda, "availability", lambda: (True, "test"))
    monkeypatch.setattr(vn, "registered", lambda: (True, ""))
    monkeypatch.setattr(kernels.cuda, "vector_neuron_cuda", fake)
    w, x, _ = (jnp.asarray(a) for a in _operands(0, 8, (3, 5), 2, 1))
    assert _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="cuda") is x
    assert calls == [((8, 3, 5, 2), 2, jax.nn.relu, EPS)]
    # a norm's affine map goes into the CUDA kernels as their prologue, not as a pass before them
    aff = (jnp.ones((8, 2, 2)), jnp.zeros((8, 2)), jnp.zeros((8, 2)))
    assert _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="cuda", affine=aff) is x
    assert calls.pop() == ((8, 3, 5, 2), 2, jax.nn.relu, EPS, 3)
    monkeypatch.setenv(_vector_neuron.NORM_PROLOGUE_ENV, "0")  # then the map is its own pass
    assert _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="cuda", affine=aff) is not x
    assert calls.pop() == ((8, 3, 5, 2), 2, jax.nn.relu, EPS)
    monkeypatch.delenv(_vector_neuron.NORM_PROLOGUE_ENV)
    want = _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="xla")
    # not asked for, or not covered (an activation without a kernel, a channel count not
    # instantiated, two devices): the triton-or-xla result, and no call of the CUDA kernels
    assert rel_l2(_vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS), want) < 1e-6
    assert rel_l2(_vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="triton"), want) < 1e-5
    got = _vector_neuron.vector_neuron(w, x, 2, jax.nn.softplus, EPS, impl="cuda")
    assert rel_l2(got, _vector_neuron.vector_neuron(w, x, 2, jax.nn.softplus, EPS, impl="xla")) < 1e-6
    w5, x5, _ = (jnp.asarray(a) for a in _operands(1, 5, (3, 5), 2, 1))
    got = _vector_neuron.vector_neuron(w5, x5, 2, jax.nn.relu, EPS, impl="cuda")
    assert rel_l2(got, _vector_neuron.vector_neuron(w5, x5, 2, jax.nn.relu, EPS, impl="xla")) < 1e-5
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert not _vector_neuron.cuda_covers(w, x, 2, jax.nn.relu, EPS)[0]
    assert len(calls) == 1
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "cuda")
    assert _vector_neuron.default_impl() == "cuda"


def test_cuda_is_not_covered_without_a_gpu():
    w, x, _ = (jnp.asarray(a) for a in _operands(0, 8, (3, 5), 2, 1))
    ok, why = _vector_neuron.cuda_covers(w, x, 2, jax.nn.relu, EPS)
    assert not ok and why


def test_lowered_calls_are_one_forward_and_one_backward_planar(cuda_forward):
    w, x, _ = (jnp.asarray(a) for a in _operands(2, 16, (5, 6, 7), 3, 1))
    xs = jnp.stack([x, x + 1, x - 1])

    def loss(w, xs):
        ys = jax.vmap(lambda b: vn.vector_neuron_cuda(w, b, 3, jax.nn.gelu, EPS))(xs)
        return jnp.sum(jnp.sin(ys))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, xs).as_text()
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    assert [bool(re.search(f"@{t}\\(", c)) for c, t in zip(calls, (_ffi.VN_FORWARD, _ffi.VN_BACKWARD))] == [True, True]
    assert len(calls) == 2
    fwd, bwd = calls
    planar = "tensor<3x16x3x5x6x7xf32>"  # (batch, c, T, *spatial)
    assert f"({planar}, tensor<3x16x16xf32>, tensor<3x1xf32>) -> {planar}" in fwd  # no affine map: 1 float
    assert "affine = 0 : i64" in fwd and "affine = 0 : i64" in bwd
    groups = vn.backward_groups(16, 3, 210)
    assert groups == 2  # 210 pixels: two tiles of 128
    assert f"groups = {groups} : i64" in bwd and "pixels = 210 : i64" in bwd and "activation = 1 : i64" in bwd
    assert f"-> ({planar}, tensor<3x{groups}x256xf32>)" in bwd


def test_lowered_calls_with_an_affine_prologue(cuda_forward):
    """With a norm's map: the packed (c, T^2 + 2T) coefficients per example beside the weight and
    affine = 1 on both calls, and every operand, the map's included, differentiable."""
    w, x, _ = (jnp.asarray(a) for a in _operands(2, 16, (5, 6, 7), 3, 1))
    xs = jnp.stack([x, x + 1, x - 1])
    m, v, shift = jnp.ones((16, 3, 3)), jnp.zeros((16, 3)), jnp.zeros((16, 3))

    def loss(w, xs, m, v, shift):
        ys = jax.vmap(lambda b: vn.vector_neuron_cuda(w, b, 3, jax.nn.gelu, EPS, affine=(m, v, shift)))(xs)
        return jnp.sum(jnp.sin(ys))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(w, xs, m, v, shift).as_text()
    fwd, bwd = [line for line in text.splitlines() if "stablehlo.custom_call" in line and "ginjax_cuda_vn" in line]
    planar = "tensor<3x16x3x5x6x7xf32>"
    assert f"({planar}, tensor<3x16x16xf32>, tensor<3x16x15xf32>) -> {planar}" in fwd
    assert "affine = 1 : i64" in fwd and "affine = 1 : i64" in bwd
    with pytest.raises(ValueError, match="`affine`'s m \\(float32\\[16, 2, 2\\]\\) must be float32\\[16, 3, 3\\]"):
        vn.vector_neuron_cuda(w, x, 3, jax.nn.gelu, EPS, affine=(jnp.ones((16, 2, 2)), v, shift))


def test_lowered_backward_names_its_kernel(monkeypatch, built):
    """The backward's `tensor_cores` attribute and its groups follow `uses_mma` as the call is made:
    with GINJAX_VN_CUDA_MMA=1 on for 16 channels and a pixel count divisible by 4 (steps of 64
    pixels), off for 210 pixels; off with GINJAX_VN_CUDA_MMA=0 (tiles of 128); by default on, but off
    under an fp32 default matmul precision."""
    monkeypatch.setenv(vn.MMA_ENV, "1")
    def lowered(spatial):
        w, x, _ = (jnp.asarray(a) for a in _operands(2, 16, spatial, 3, 1))
        loss = lambda w, x: jnp.sum(jnp.sin(vn.vector_neuron_cuda(w, x, 3, jax.nn.relu, EPS)))  # noqa: E731
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).as_text()
        return next(line for line in text.splitlines() if f"@{_ffi.VN_BACKWARD}(" in line)

    assert "tensor_cores = 1 : i64" in lowered((4, 6, 8)) and "groups = 3 : i64" in lowered((4, 6, 8))  # 192 px
    assert "tensor_cores = 0 : i64" in lowered((5, 6, 7))  # 210 pixels
    monkeypatch.setenv(vn.MMA_ENV, "0")
    assert "tensor_cores = 0 : i64" in lowered((4, 6, 8)) and "groups = 2 : i64" in lowered((4, 6, 8))
    monkeypatch.delenv(vn.MMA_ENV)
    assert "tensor_cores = 1 : i64" in lowered((4, 6, 8))
    with jax.default_matmul_precision("highest"):
        assert "tensor_cores = 0 : i64" in lowered((4, 6, 8))
    with jax.default_matmul_precision("tensorfloat32"):
        assert "tensor_cores = 1 : i64" in lowered((4, 6, 8))


def test_triton_forward_beside_the_cuda_backward(monkeypatch, built):
    """GINJAX_VN_CUDA_FORWARD=triton: the forward is kernels/triton's kernel (its interpreter here)
    on the same planar block, equal to the XLA path at fp32, with and without a norm's map; the
    gradient's lowering holds the CUDA backward and no CUDA forward; a bad value is named."""
    pytest.importorskip("kernels.triton")
    monkeypatch.setenv(vn.FORWARD_ENV, "triton")
    w, x, _ = (jnp.asarray(a) for a in _operands(3, 16, (3, 4, 5), 3, 1))
    m = jnp.asarray(np.random.default_rng(4).normal(size=(16, 3, 3)) / 2, jnp.float32)
    v, shift = jnp.full((16, 3), 0.25), jnp.full((16, 3), -0.5)
    for affine in (None, (m, v, shift)):
        got = vn.vector_neuron_cuda(w, x, 3, jax.nn.gelu, EPS, affine=affine)
        mapped = x if affine is None else jnp.einsum("cij,c...j->c...i", m, x - shift[:, None, None, None]) + v[:, None, None, None]
        want = _vector_neuron.vector_neuron(w, mapped, 3, jax.nn.gelu, EPS, impl="xla")
        assert rel_l2(got, want) < 1e-5
    xs = jnp.stack([x, x + 1])
    loss = lambda w, xs: jnp.sum(jnp.sin(jax.vmap(lambda b: vn.vector_neuron_cuda(w, b, 3, jax.nn.relu, EPS))(xs)))  # noqa: E731
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, xs).as_text()
    assert len(re.findall(rf"@{_ffi.VN_BACKWARD}\(", text)) == 1 and not re.search(rf"@{_ffi.VN_FORWARD}\(", text)
    monkeypatch.setenv(vn.FORWARD_ENV, "xla")
    with pytest.raises(ValueError, match="GINJAX_VN_CUDA_FORWARD"):
        vn.vector_neuron_cuda(w, x, 3, jax.nn.gelu, EPS)
    monkeypatch.delenv(vn.FORWARD_ENV)
    assert vn.forward_impl() == "triton"  # the default: with the means for the next layer


def test_means_come_from_the_triton_forward_only(monkeypatch, built):
    """with_means: beside Triton's forward (GINJAX_VN_CUDA_FORWARD=triton) the means its kernel
    added up, equal to y's own; the gradient of a loss reading them (as a known mean of y, the
    way a ConvContract's bias does) lowers to the CUDA backward alone. The CUDA forward has none."""
    pytest.importorskip("kernels.triton")
    from kernels._bias import known_mean

    w, x, _ = (jnp.asarray(a) for a in _operands(5, 16, (3, 4, 5), 3, 1))
    monkeypatch.setenv(vn.FORWARD_ENV, "cuda")
    y, means = jax.eval_shape(lambda w, x: vn.vector_neuron_cuda(w, x, 3, jax.nn.gelu, EPS, with_means=True), w, x)
    assert means is None and y.shape == x.shape
    monkeypatch.setenv(vn.FORWARD_ENV, "triton")
    y, means = vn.vector_neuron_cuda(w, x, 3, jax.nn.gelu, EPS, with_means=True)
    assert means.shape == (16, 3)
    assert rel_l2(means, jnp.mean(y, axis=(1, 2, 3))) < 1e-5

    def loss(w, x):
        y, means = vn.vector_neuron_cuda(w, x, 3, jax.nn.relu, EPS, with_means=True)
        return jnp.sum(jnp.sin(y)) + jnp.sum(known_mean(y, means, 3) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).as_text()
    assert len(re.findall(rf"@{_ffi.VN_BACKWARD}\(", text)) == 1 and not re.search(rf"@{_ffi.VN_FORWARD}\(", text)


def test_backward_groups(monkeypatch):
    monkeypatch.delenv(vn.MMA_ENV, raising=False)
    assert vn.uses_mma(16, 3, 64**3)  # the tensor cores by default, but not at fp32
    with jax.default_matmul_precision("highest"):
        assert not vn.uses_mma(16, 3, 64**3)
        monkeypatch.setenv(vn.MMA_ENV, "1")  # forced
        assert vn.uses_mma(16, 3, 64**3)
    # with them, 16 channels, pixels a multiple of 4: 3 CTAs an SM, steps of 64 pixels
    assert vn.uses_mma(16, 3, 64**3) and not vn.uses_mma(16, 3, 301) and not vn.uses_mma(8, 3, 64**3)
    assert vn.backward_groups(16, 3, 64**3, sms=132) == 396
    assert vn.backward_groups(16, 3, 300, sms=132) == 5  # at most one per step
    assert vn.backward_groups(16, 3, 301, sms=132) == 3  # the FFMA kernel: one per tile of 128
    assert vn.backward_groups(8, 3, 64**3, sms=132) == 528  # 4 (126 registers; shared memory too)
    monkeypatch.setenv(vn.MMA_ENV, "0")
    assert not vn.uses_mma(16, 3, 64**3)
    assert vn.backward_groups(16, 3, 64**3, sms=132) == 264  # 2 CTAs per SM (ptxas: 212-220 registers)
    monkeypatch.setenv(vn.MMA_ENV, "2")
    with pytest.raises(ValueError, match="GINJAX_VN_CUDA_MMA"):
        vn.uses_mma(16, 3, 64**3)


@pytest.mark.parametrize(
    "c, spatial, D, k, act, groups",
    [
        (16, (5, 6, 7), 3, 1, "gelu", 2),  # 210 pixels: a ragged last tile
        (8, (9, 31), 2, 1, "relu", 1),  # T = 2, 279 pixels, one CTA walks 3 tiles
        (8, (11, 13), 2, 2, "gelu", 2),  # T = 4, the second CTA's share is one tile
        (16, (3, 3, 3), 3, 1, "relu", 1),  # fewer pixels than a tile
    ],
)
def test_emulated_kernels_match_autodiff_of_the_xla_path(c, spatial, D, k, act, groups):
    w, x, gy = _operands(7, c, spatial, D, k, np.float64)
    activation = getattr(jax.nn, act)
    T = D**k
    S = int(np.prod(spatial))
    xp = np.moveaxis(x.reshape((c, S, T)), -1, 1)  # (c, T, S), as the kernels see the block
    gp = np.moveaxis(gy.reshape((c, S, T)), -1, 1)
    y = emulate.forward(w, xp, act, EPS)
    gx, part, gw = emulate.backward(w, xp, gp, act, EPS, groups)
    with float64():
        f = lambda w, x: _vector_neuron.vector_neuron(w, x, D, activation, EPS, impl="xla")  # noqa: E731
        want_y, vjp = jax.vjp(f, jnp.asarray(w), jnp.asarray(x))
        want_gw, want_gx = vjp(jnp.asarray(gy))
    unplanar = lambda a: np.moveaxis(a, 1, -1).reshape(x.shape)  # noqa: E731
    assert rel_l2(unplanar(y), want_y) < 1e-12
    assert rel_l2(unplanar(gx), want_gx) < 1e-12
    assert rel_l2(gw, want_gw) < 1e-12
    assert part.shape == (groups, c, c) and np.allclose(part.sum(axis=0), gw, rtol=0, atol=0)


HOST = pathlib.Path(__file__).with_name("vn_cuda_host.cpp")
CU = pathlib.Path(vn.__file__).with_name("vector_neuron.cu")


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """vector_neuron.cu's device code compiled for the host by g++ (tests/vn_cuda_host.cpp: a CTA
    as 128 OS threads meeting at a barrier for __syncthreads, dynamic shared memory a static
    buffer). Runs (C, T, S, B, groups, act, x, w, gy[, aff]) -> y, gx, part."""
    mma = '#include "vector_neuron_mma.cuh"'
    exe = host_build(CU, HOST, tmp_path_factory.mktemp("vn_host"), [
        (mma, CU.with_name("vector_neuron_mma.cuh").read_text(), 1),
        # the FFMA and the tensor-core backward
        ("extern __shared__ float4 smem4[];", "float4* smem4 = reinterpret_cast<float4*>(dynamic_smem);", 2)])

    def run(C, T, S, B, groups, act, x, w, gy, aff=None):
        head = f"{C} {T} {S} {B} {groups} {vn.ACTIVATIONS.index(act)} {EPS!r} {int(aff is not None)}\n".encode()
        data = b"".join(np.ascontiguousarray(a, np.float32).tobytes() for a in (x, w, gy) + (() if aff is None else (aff,)))
        out = subprocess.run([str(exe)], input=head + data, capture_output=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        flat = np.frombuffer(out.stdout, np.float32)
        n = x.size
        assert flat.size == 2 * n + B * groups * C * C
        return flat[:n].reshape(x.shape), flat[n : 2 * n].reshape(x.shape), flat[2 * n :].reshape(B, groups, C, C)
    return run


@pytest.mark.parametrize(
    "c, spatial, D, k, act, groups",
    [
        (16, (5, 6, 7), 3, 1, "gelu", 2),  # T = 3, a ragged last tile, one tile per CTA
        # C = 16 and S % 4 == 0: the tensor-core backward (m-tiles of 16 pixels, steps of 64)
        (16, (4, 6, 7), 3, 1, "gelu", 2),  # 168 pixels: a ragged last step, CTAs walking two
        (16, (12, 20), 2, 1, "relu", 5),  # T = 2, 240 pixels; more CTAs than steps
        (16, (8, 10), 2, 2, "gelu", 1),  # T = 4, 80 pixels
        (16, (17, 19), 2, 1, "relu", 1),  # T = 2, one CTA walks three tiles
        (16, (9, 15), 2, 2, "gelu", 1),  # T = 4, two tiles
        (8, (3, 4, 5), 3, 1, "relu", 1),  # fewer pixels than a tile
        (8, (23, 29), 2, 1, "gelu", 3),  # three CTAs over six tiles
        (8, (11, 13), 2, 2, "relu", 2),  # T = 4
        (32, (17, 19), 2, 1, "gelu", 2),  # C = 32: one split of gW a thread; a CTA walks two tiles
    ],
)
def test_the_cuda_source_run_on_the_host_matches_autodiff(host_kernels, c, spatial, D, k, act, groups):
    """The kernels' own code (indexing, masks, staging, the splits' reduction) on fresh random
    inputs, every output starting as NaN, against float64 autodiff of ginjax's XLA path."""
    B, T, S = 2, D**k, int(np.prod(spatial))
    rng = np.random.default_rng(11)
    blocks = rng.normal(size=(B, c) + spatial + (D,) * k).astype(np.float32)
    ws = (rng.uniform(-1, 1, size=(B, c, c)) / np.sqrt(c)).astype(np.float32)
    gys = rng.normal(size=blocks.shape).astype(np.float32)
    planar = lambda a: np.moveaxis(a.reshape((B, c, S, T)), -1, 2)  # noqa: E731  (B, c, T, S)
    y, gx, part = host_kernels(c, T, S, B, groups, act, planar(blocks), ws, planar(gys))
    assert all(np.all(np.isfinite(a)) for a in (y, gx, part)), "an output element never written"
    unplanar = lambda a: np.moveaxis(a, 2, -1).reshape(blocks.shape)  # noqa: E731
    with float64():
        f = lambda w, x: _vector_neuron.vector_neuron(w, x, D, getattr(jax.nn, act), EPS, impl="xla")  # noqa: E731
        for b in range(B):
            want_y, vjp = jax.vjp(f, jnp.asarray(ws[b], jnp.float64), jnp.asarray(blocks[b], jnp.float64))
            want_gw, want_gx = vjp(jnp.asarray(gys[b], jnp.float64))
            assert rel_l2(unplanar(y)[b], want_y) < 1e-6
            assert rel_l2(unplanar(gx)[b], want_gx) < 1e-5
            assert rel_l2(part[b].sum(axis=0), want_gw) < 1e-5


@pytest.mark.parametrize("c, spatial, D, k, groups", [(16, (4, 6, 7), 3, 1, 2), (8, (3, 4, 5), 3, 1, 1)],
                         ids=["tensor-cores", "ffma"])
def test_a_nan_input_reaches_the_outputs_on_the_host(host_kernels, c, spatial, D, k, groups):
    """One input float the GPU's canonical NaN (0x7fffffff, the bits every NaN its arithmetic makes
    has; rounded to tf32 on its bits it carries into the sign and reads -0): that pixel's y and gx
    and all of gW are NaN, every other pixel's y and gx finite."""
    B, T, S = 1, D**k, int(np.prod(spatial))
    rng = np.random.default_rng(13)
    x = rng.normal(size=(B, c, T, S)).astype(np.float32)
    x.view(np.uint32)[0, 3, 1, 17] = 0x7FFFFFFF
    w = (rng.uniform(-1, 1, size=(B, c, c)) / np.sqrt(c)).astype(np.float32)
    gy = rng.normal(size=x.shape).astype(np.float32)
    y, gx, part = host_kernels(c, T, S, B, groups, "gelu", x, w, gy)
    bad = np.zeros(S, bool)
    bad[17] = True
    for out in (y, gx):
        assert np.isnan(out[0][:, :, bad]).any() and np.isfinite(out[0][:, :, ~bad]).all()
    assert np.isnan(part.sum(axis=1)).all()


@pytest.mark.parametrize("c, spatial, D, k, act, groups", [
    (16, (5, 6, 7), 3, 1, "gelu", 2),  # a ragged last tile: x' = v - m shift past the end, gy = 0
    (16, (4, 6, 7), 3, 1, "relu", 2),  # the tensor-core backward, a ragged last m-tile
    (16, (8, 10), 2, 2, "gelu", 1),  # ... at T = 4
    (8, (23, 29), 2, 1, "relu", 3),  # CTAs walking two tiles
    (8, (11, 13), 2, 2, "gelu", 2),  # T = 4
    (32, (9, 31), 2, 1, "relu", 1),  # C = 32, three tiles
])
def test_the_cuda_source_with_an_affine_prologue_on_the_host(host_kernels, c, spatial, D, k, act, groups):
    """The norm's affine map as the kernels' prologue: y = VN(x') with x' = m (x - shift) + v per
    channel, and gx the gradient in x' (the map's VJP is the caller's), against float64 autodiff."""
    B, T, S = 2, D**k, int(np.prod(spatial))
    rng = np.random.default_rng(12)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    # float32 operands; the expected values from them in float64
    blocks = f32(rng.normal(size=(B, c, S, T))).astype(np.float64)
    m = f32(rng.normal(size=(B, c, T, T)) / np.sqrt(T)).astype(np.float64)
    v, shift = (f32(rng.normal(size=(B, c, T))).astype(np.float64) for _ in range(2))
    ws = f32(rng.uniform(-1, 1, size=(B, c, c)) / np.sqrt(c)).astype(np.float64)
    gys = f32(rng.normal(size=(B, c, S, T))).astype(np.float64)
    mapped = np.einsum("bcij,bcpj->bcpi", m, blocks - shift[:, :, None]) + v[:, :, None]  # x', float64
    aff = np.concatenate([m.reshape(B, c, T * T), v, shift], axis=-1)
    planar = lambda a: np.moveaxis(a, -1, 2)  # noqa: E731  (B, c, S, T) -> (B, c, T, S)
    y, gx, part = host_kernels(c, T, S, B, groups, act, planar(f32(blocks)), f32(ws), planar(f32(gys)), f32(aff))
    assert all(np.all(np.isfinite(a)) for a in (y, gx, part)), "an output element never written"
    with float64():
        f = lambda w, x: _vector_neuron.vector_neuron(w, x, D, getattr(jax.nn, act), EPS, impl="xla")  # noqa: E731
        shape = (c,) + spatial + (D,) * k  # pixels and components row-major, as (c, S, T)
        for b in range(B):
            want_y, vjp = jax.vjp(f, jnp.asarray(ws[b]), jnp.asarray(mapped[b].reshape(shape)))
            want_gw, want_gx = vjp(jnp.asarray(gys[b].reshape(shape)))
            assert rel_l2(np.moveaxis(y[b], 1, -1), np.reshape(want_y, (c, S, T))) < 1e-5
            assert rel_l2(np.moveaxis(gx[b], 1, -1), np.reshape(want_gx, (c, S, T))) < 1e-5
            assert rel_l2(part[b].sum(axis=0), want_gw) < 1e-5


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed (the CUDA kernels' compile check)")
def test_ptxas_resources_match_the_residency_table(tmp_path):
    report = ptxas_report(vn.__file__.replace("vector_neuron.py", "vector_neuron.cu"), tmp_path)
    kinds, mma = {}, {}
    for chunk in report.split("Compiling entry function")[1:]:
        # the tensor-core backward <T, kAffine, kAct> (C = 16, vector_neuron_mma.cuh)
        if name := re.match(r" '\w*?backward_mma_kernelILi(\d+)ELb([01])ELi([01])E", chunk):
            spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
            assert spill and spill.groups() == ("0", "0", "0"), chunk
            mma[(int(name[1]), bool(int(name[2])), int(name[3]))] = int(re.search(r"Used (\d+) registers", chunk)[1])
            continue
        # <C, T, kAffine, kAct>: each kernel per affine map and activation (0 relu, 1 gelu)
        name = re.match(r" '\w*?(forward|backward)_kernelILi(\d+)ELi(\d+)ELb([01])ELi([01])E", chunk)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
        regs = re.search(r"Used (\d+) registers", chunk)
        assert name and spill and regs, chunk
        key = (name[1], int(name[2]), int(name[3]), bool(int(name[4])), int(name[5]))
        kinds[key] = tuple(int(v) for v in spill.groups()) + (int(regs[1]),)
    assert set(kinds) == {(kind, c, t, affine, act) for kind in ("forward", "backward") for c, t in vn.COVERED
                          for affine in (False, True) for act in (0, 1)}, report
    resident = {}
    for (kind, c, t, affine, act), (stack, stores, loads, regs) in kinds.items():
        assert (stack, stores, loads) == (0, 0, 0), (kind, c, t, affine, act, report)
        if kind == "backward":
            per_cta = vn.THREADS * -(-regs // 8) * 8
            copies = 1 if c >= 32 else 2  # the next tile's gy, and its x below 32 channels (Bwd::kCopyX)
            smem = 4 * (c * c + 2 * vn.THREADS * (t * c + 4) + copies * vn.THREADS * t * c + c * (t * t + 2 * t))
            fits = min(65536 // per_cta, (228 * 1024) // (smem + 1024))
            resident[(c, t)] = min(resident.get((c, t), fits), fits)  # every affine map and activation
    assert resident == vn.COVERED
    assert set(mma) == {(t, affine, act) for (_, t) in vn.COVERED_MMA for affine in (False, True) for act in (0, 1)}
    resident = {}
    for (t, affine, act), regs in mma.items():
        pitch = next(p for p in range(16 * t, 16 * t + 32) if p % 32 == 8)
        smem = 4 * (4 * (2 * 20 * t * 16 + 2 * 16 * pitch) + 16 * (t * t + 2 * t))
        fits = min(65536 // (128 * -(-regs // 8) * 8), (228 * 1024) // (smem + 1024))
        resident[(16, t)] = min(resident.get((16, t), fits), fits)
    assert resident == vn.COVERED_MMA
