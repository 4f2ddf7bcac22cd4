"""A residual added to a VectorNeuron's output (`residual=` of kernels/triton's and kernels/cuda's
VectorNeuron, `ginjax._vector_neuron.vector_neuron`, `VectorNeuronNonlinear`, a ConvBlock in
conv -> norm -> activation order, DilResNet's blocks): equal to the output plus the residual,
values, means and gradients (the residual's is the cotangent), added by Triton's forward kernel
(its interpreter here) as it writes y; where it cannot be fused (another dtype, the XLA path),
added by `+`; bad residuals named."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import _vn_cuda_emulate as emulate
import ginjax.geometric as geom
from conftest import filter_bank, rel_l2, residual_model_by_plus
from ginjax import _vector_neuron, layers
from kernels.cuda import _ffi
from kernels.cuda import vector_neuron as vn

pytest.importorskip("kernels.triton")
from kernels.triton import vector_neuron_triton  # noqa: E402

EPS = 1e-5


def _operands(seed, c, spatial, D, batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    x = jnp.asarray(rng.normal(size=lead + (c,) + spatial + (D,)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, size=(c, c)) / np.sqrt(c), jnp.float32)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    m = jnp.asarray(rng.normal(size=(c, D, D)) / 2, jnp.float32)
    affine = (m, jnp.full((c, D), 0.25, jnp.float32), jnp.full((c, D), -0.5, jnp.float32))
    return w, x, r, affine


def _flat(tree):
    return np.concatenate([np.ravel(leaf) for leaf in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("planar", [True, False])
@pytest.mark.parametrize("with_affine", [False, True])
def test_the_triton_kernel_adds_the_residual(planar, with_affine):
    """y and its means with the residual equal y + r and its means (a ragged last tile: 315
    pixels); gradients in w, x, the affine map and r equal those of y + r composed outside."""
    D, c, spatial = 3, 4, (5, 7, 9)
    w, x, r, affine = _operands(1, c, spatial, D)
    affine = affine if with_affine else None

    def vn_(w, x, aff, r):
        return vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, planar=planar, affine=aff, with_means=True, residual=r)

    def composed(w, x, aff, r):
        y, means = vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, planar=planar, affine=aff, with_means=True)
        return y + r, means + jnp.mean(r, axis=(1, 2, 3))

    (y, means), (want, want_means) = vn_(w, x, affine, r), composed(w, x, affine, r)
    assert rel_l2(y, want) < 1e-6
    assert rel_l2(means, jnp.mean(y, axis=(1, 2, 3))) < 1e-5 and rel_l2(means, want_means) < 1e-5

    def loss(f):
        def ell(w, x, aff, r):
            y, means = f(w, x, aff, r)
            return jnp.sum(jnp.sin(y)) + jnp.sum(means**2)
        return jax.grad(ell, argnums=(0, 1, 2, 3) if with_affine else (0, 1, 3))

    args = (w, x, affine, r)
    for g, h in zip(loss(vn_)(*args), loss(composed)(*args)):
        assert rel_l2(_flat(g), _flat(h)) < 1e-5


def test_the_residual_under_vmap():
    """Batched blocks with a batched residual, and with one residual for the whole batch."""
    D, c, spatial = 2, 8, (6, 11)
    w, xs, rs, _ = _operands(2, c, spatial, D, batch=3)
    f = lambda x, r: vector_neuron_triton(w, x, D, jax.nn.relu, EPS, residual=r)  # noqa: E731
    plain = jax.vmap(lambda x: vector_neuron_triton(w, x, D, jax.nn.relu, EPS))(xs)
    assert rel_l2(jax.vmap(f)(xs, rs), plain + rs) < 1e-6
    assert rel_l2(jax.vmap(f, in_axes=(0, None))(xs, rs[0]), plain + rs[0]) < 1e-6


def test_ginjax_dispatch_fuses_a_float32_residual_only(monkeypatch):
    """`vector_neuron(..., residual=)`: on the triton path a float32 residual goes to the kernel, a
    bfloat16 one is added after (its promotion, as `+`), the XLA path adds it, and so does
    GINJAX_VN_RESIDUAL=0; all equal y + r; a residual of another shape is named."""
    monkeypatch.delenv(_vector_neuron.RESIDUAL_ENV, raising=False)
    D, c, spatial = 2, 8, (6, 7)
    w, x, r, _ = _operands(3, c, spatial, D)
    seen = []
    import kernels.triton as triton_pkg

    real = triton_pkg.vector_neuron_triton

    def spy(*a, **kw):
        seen.append(kw.get("residual") is not None)
        return real(*a, **kw)

    monkeypatch.setattr(triton_pkg, "vector_neuron_triton", spy)
    want = _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla") + r
    got = _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="triton", residual=r)
    assert seen == [True] and rel_l2(got, want) < 1e-5
    r16 = r.astype(jnp.bfloat16)
    got = _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="triton", residual=r16)
    assert seen == [True, False] and got.dtype == jnp.float32
    assert rel_l2(got, want - r + r16.astype(jnp.float32)) < 1e-5
    assert rel_l2(_vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla", residual=r), want) < 1e-6
    monkeypatch.setenv(_vector_neuron.RESIDUAL_ENV, "0")  # the A/B switch: added after the kernel
    got = _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="triton", residual=r)
    assert seen == [True, False, False] and rel_l2(got, want) < 1e-5
    monkeypatch.delenv(_vector_neuron.RESIDUAL_ENV)
    with pytest.raises(ValueError, match=r"`residual` \(shape \(8, 6, 7\)\) must have the block's shape \(8, 6, 7, 2\)"):
        _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="triton", residual=r[..., 0])
    with pytest.raises(ValueError, match=r"`residual` \(\(8, 6, 7\)\) must be None or an array of the block's shape"):
        vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, residual=r[..., 0])


def _cuda_backward_stand_in(monkeypatch):
    """kernels/cuda's backward FFI call replaced by its numpy emulation (tests/_vn_cuda_emulate.py)
    through a host callback, so that a gradient through `vector_neuron_cuda` runs on a CPU. The
    emulation is the FFMA kernel's, so the tensor-core backward is turned off."""
    from kernels.cuda import vector_neuron as vn

    monkeypatch.setenv(vn.MMA_ENV, "0")
    real = jax.ffi.ffi_call

    def ffi_call(target, shapes, vmap_method=None, **kw):
        if target != _ffi.VN_BACKWARD:
            return real(target, shapes, vmap_method=vmap_method, **kw)

        def call(x, w, aff, gy, **attrs):
            act, eps, groups = ("relu", "gelu")[int(attrs["activation"])], float(attrs["eps"]), int(attrs["groups"])
            assert int(attrs["affine"]) == 0 and int(attrs["tensor_cores"]) == 0

            def host(x, w, gy):  # the planar (c, T, *spatial) blocks as the emulation's (c, T, S)
                flat = lambda a: np.asarray(a, np.float64).reshape(a.shape[0], a.shape[1], -1)  # noqa: E731
                gx, part, _ = emulate.backward(np.asarray(w, np.float64), flat(x), flat(gy), act, eps, groups)
                return gx.reshape(x.shape).astype(np.float32), part.reshape(groups, -1).astype(np.float32)

            return jax.pure_callback(host, tuple(shapes), x, w, gy)

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)


def test_the_cuda_wrapper_adds_the_residual_in_triton_s_forward(monkeypatch):
    """`vector_neuron_cuda(..., residual=)` beside Triton's forward (the default): y and its means
    equal y + r's, and the gradients in w, x and r (the backward on its emulation) equal the XLA
    path's plus r; with the CUDA forward (no residual operand) XLA adds it after."""
    monkeypatch.setattr(vn, "registered", lambda: (True, ""))
    monkeypatch.delenv(vn.MMA_ENV, raising=False)
    _cuda_backward_stand_in(monkeypatch)
    D, c, spatial = 3, 16, (3, 4, 5)
    w, x, r, _ = _operands(4, c, spatial, D)
    monkeypatch.setenv(vn.FORWARD_ENV, "triton")
    y, means = vn.vector_neuron_cuda(w, x, D, jax.nn.gelu, EPS, with_means=True, residual=r)
    want = _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla") + r
    assert rel_l2(y, want) < 1e-5 and rel_l2(means, jnp.mean(want, axis=(1, 2, 3))) < 1e-5

    def grads(f):
        return jax.grad(lambda w, x, r: jnp.sum(jnp.sin(f(w, x, r))), argnums=(0, 1, 2))(w, x, r)

    got = grads(lambda w, x, r: vn.vector_neuron_cuda(w, x, D, jax.nn.gelu, EPS, residual=r))
    ref = grads(lambda w, x, r: _vector_neuron.vector_neuron(w, x, D, jax.nn.gelu, EPS, impl="xla") + r)
    for g, h in zip(got, ref):
        assert rel_l2(g, h) < 1e-5
    monkeypatch.setenv(vn.FORWARD_ENV, "cuda")
    text = jax.jit(lambda w, x, r: vn.vector_neuron_cuda(w, x, D, jax.nn.gelu, EPS, residual=r)).lower(w, x, r).as_text()
    assert f"@{_ffi.VN_FORWARD}(" in text and "stablehlo.add" in text


def test_the_layer_and_dilresnet_hand_the_residual_to_the_kernel(monkeypatch):
    """`VectorNeuronNonlinear(x, residual=r)` equals the layer plus r (the scalar key by `+`, the
    vector key in the kernel); DilResNet's blocks (conv -> activation) give their input to the last
    ConvBlock's VectorNeuron, one fused residual per block, values and gradients equal to its
    blocks plus `+`."""
    from ginjax import models
    from ginjax.models import _resnet

    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "triton")
    monkeypatch.delenv(_vector_neuron.RESIDUAL_ENV, raising=False)
    D, N = 2, 8
    sig = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    rng = np.random.default_rng(5)
    x = geom.MultiImage({((), 0): jnp.asarray(rng.standard_normal((1, N, N)), jnp.float32),
                         ((False,), 0): jnp.asarray(rng.standard_normal((1, N, N, D)), jnp.float32)}, D, True)
    layer = layers.VectorNeuronNonlinear(sig, D, jax.nn.gelu, key=jax.random.PRNGKey(1))
    r = geom.MultiImage({k: 0.5 * v - 1.0 for k, v in x.items()}, D, True)
    got, want = layer(x, residual=r), layer(x) + r
    for k in want.keys():
        assert rel_l2(got[k], want[k]) < 1e-6
    fused = []
    real = layers.vector_neuron
    monkeypatch.setattr(layers, "vector_neuron", lambda *a, **kw: fused.append(kw.get("residual") is not None)
                        or real(*a, **kw))
    model = models.DilResNet(D, sig, sig, 2, num_blocks=2, conv_filters=filter_bank(D, 3), key=jax.random.PRNGKey(0))

    got = jax.jit(_resnet._run_residual)(model, x)  # jit: one compile instead of op-by-op dispatch
    assert sum(fused) == 2, fused
    want = jax.jit(residual_model_by_plus)(model, x)
    for k in want.keys():
        assert rel_l2(got[k], want[k]) < 1e-5
    loss = lambda m, f: sum(jnp.sum(jnp.sin(b)) for b in f(m, x).values())  # noqa: E731
    g_got = jax.jit(jax.grad(lambda m: loss(m, _resnet._run_residual)))(model)
    g_want = jax.jit(jax.grad(lambda m: loss(m, residual_model_by_plus)))(model)
    assert rel_l2(_flat(g_got), _flat(g_want)) < 1e-5
