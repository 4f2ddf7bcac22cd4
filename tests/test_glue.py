"""The train-step glue rewritten for speed (kernels._reduce, ginjax._channel_mix,
ginjax._norm_stats) against the straightforward formulations it replaces, values and gradients at
fp32 on fresh random inputs; and whole models with the glue swapped back to those formulations."""

from __future__ import annotations

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax import _vector_neuron, layers, models
from ginjax._channel_mix import channel_mix
from ginjax._norm_stats import channel_affine, channel_sums, inverse_sqrt, scalar_group_norm, vector_group_norm
from kernels import _bias, _reduce
from conftest import filter_bank, float64, gradient_errors, rel_l2

TOL = 1e-5


def _normal(rng, shape, loc=0.0):
    return jnp.asarray(rng.standard_normal(shape) + loc, jnp.float32)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def _same_value_and_grad(f_new, f_old, args, argnums=0, tol=TOL):
    """f_new == f_old, and their vector-Jacobian products with one random cotangent agree (fp32,
    exact matmuls)."""
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    with jax.default_matmul_precision("highest"):
        cot = _cotangent(eqx.filter_eval_shape(f_old, *args))
        new, g_new = _value_and_vjp(f_new, args, argnums, cot)
        old, g_old = _value_and_vjp(f_old, args, argnums, cot)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
    assert rel_l2(_flat(new), _flat(old)) <= tol
    for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
        assert rel_l2(a, b) <= tol


def _value_and_vjp(f, args, argnums, cot):
    """f(*args) and its vector-Jacobian product with `cot` for the arguments `argnums`, as one
    jitted program (op by op, each test would compile a hundred small programs instead)."""

    @eqx.filter_jit
    def run(args, cot):
        value, vjp = _vjp(f, args, argnums)
        return value, vjp(cot)

    return run(args, cot)


def _vjp(f, args, argnums):
    def part(*diff):
        full = list(args)
        for i, a in zip(argnums, diff):
            full[i] = a
        return f(*full)

    return jax.vjp(part, *(args[i] for i in argnums))


def _cotangent(like, seed=99):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), like)


def _to64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64) if eqx.is_inexact_array(a) else a, tree)


# ---- kernels._reduce --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, start, stop",
    [((3, 16, 16, 2), 1, 3), ((2, 8, 8, 8, 3), 1, 4), ((2, 8, 8, 8, 3, 3), 1, 4), ((4, 10, 10, 3), 1, 3),
     ((2, 5, 7, 3), 1, 3), ((3, 64, 64), 1, 3), ((6, 4096, 3), 1, 2)],
)
def test_middle_sum_is_the_sum(rng, shape, start, stop):
    x = _normal(rng, shape, loc=0.5)
    axes = tuple(range(start, stop))
    _same_value_and_grad(lambda x: _reduce.middle_sum(x, start, stop), lambda x: jnp.sum(x, axis=axes), (x,))


def test_middle_sum_reads_a_wide_minor_axis():
    """The first reduction keeps >= 64 contiguous elements, through reshapes only."""
    x = jnp.zeros((2, 16, 16, 16, 3))
    text = jax.jit(lambda x: _reduce.middle_sum(x, 1, 4)).lower(x).as_text()
    assert "transpose" not in text
    assert "tensor<2x64x192xf32>" in text or "tensor<2x128x96xf32>" in text, text


@pytest.mark.parametrize("D", [2, 3])
def test_add_spatial_offset(rng, D):
    block = _normal(rng, (2, 3) + (8,) * D + (D,))
    offset = _normal(rng, (2, 3, D))
    plain = lambda b, o: b + o.reshape((3,) + (1,) * D + (D,))
    new = jax.vmap(lambda b, o: _reduce.add_spatial_offset(b, o, D))
    _same_value_and_grad(new, jax.vmap(plain), (block, offset), argnums=(0, 1))


# ---- VectorNeuron channel mixing --------------------------------------------------------------
def test_channel_mix_is_tensordot_under_nested_vmap(rng):
    w = _normal(rng, (5, 4))
    x = _normal(rng, (3, 2, 4, 6, 6, 3))
    nested = lambda f: jax.vmap(jax.vmap(f, (None, 0)), (None, 0))
    _same_value_and_grad(nested(channel_mix), nested(lambda w, x: jnp.tensordot(w, x, axes=1)), (w, x), (0, 1))
    per_example = _normal(rng, (2, 5, 4))  # batched weights too
    _same_value_and_grad(jax.vmap(channel_mix), jax.vmap(lambda w, x: jnp.tensordot(w, x, axes=1)),
                         (per_example, x[0]), (0, 1))


def test_channel_mix_is_one_batched_gemm_without_transposes(rng):
    w, x = _normal(rng, (4, 4)), _normal(rng, (2, 4, 8, 8, 3))
    step = jax.grad(lambda w, x: jnp.sum(jnp.sin(jax.vmap(channel_mix, (None, 0))(w, x))), (0, 1))
    text = jax.jit(step).lower(w, x).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line]
    assert len(dots) == 3 and all("batching_dims = [0] x [0]" in line for line in dots), dots
    transposes = [line for line in text.splitlines() if "stablehlo.transpose" in line]
    assert all("8x8" not in line for line in transposes), transposes  # only w.T (4x4) is transposed


def test_channel_mix_bad_shapes():
    with pytest.raises(ValueError, match=r"`w` \(shape \(4, 3\)\) must be \(o, c\)"):
        channel_mix(jnp.zeros((4, 3)), jnp.zeros((4, 5)))


# ---- norm statistics --------------------------------------------------------------------------
@pytest.mark.parametrize("groups, affine", [(1, True), (2, True), (4, False)])
def test_scalar_group_norm_is_equinox(rng, groups, affine):
    norm = eqx.nn.GroupNorm(groups, 4, channelwise_affine=affine)
    if affine:
        norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm, (_normal(rng, (4,)), _normal(rng, (4,))))
    x = _normal(rng, (2, 4, 6, 6, 6), loc=3.0)  # off-centre: the one-pass variance must not cancel
    _same_value_and_grad(jax.vmap(lambda b: scalar_group_norm(norm, b)), jax.vmap(norm), (x,))
    _same_value_and_grad(lambda n: scalar_group_norm(n, x[0]), lambda n: n(x[0]), (norm,))


@pytest.mark.parametrize("T", [1, 2, 3, 9])
def test_channel_sums(rng, T):
    a, b = _normal(rng, (3, 300, T), loc=1.0), _normal(rng, (3, 300, T))
    plain = lambda a, b: (jnp.sum(a, axis=1), jnp.einsum("cpi,cpj->cij", a, b))
    _same_value_and_grad(channel_sums, plain, (a, b), (0, 1))
    _same_value_and_grad(lambda a: channel_sums(a, a), lambda a: plain(a, a), (a,))
    _same_value_and_grad(channel_sums, lambda a: plain(a, a), (a,))  # b = a, read once
    # with a shift (c, T): subtracted from b, and from a where b is a; gradients in the shift too
    shift = _normal(rng, (3, T), loc=1.0)
    _same_value_and_grad(lambda a, s: channel_sums(a, shift=s), lambda a, s: plain(a - s[:, None], a - s[:, None]),
                         (a, shift), (0, 1))
    _same_value_and_grad(lambda a, b, s: channel_sums(a, b, s), lambda a, b, s: plain(a, b - s[:, None]),
                         (a, b, shift), (0, 1, 2))


@pytest.mark.parametrize("T", [1, 2, 3])
def test_channel_affine(rng, T):
    m, v, x = _normal(rng, (3, T, T)), _normal(rng, (3, T)), _normal(rng, (3, 300, T))
    plain = lambda m, v, x: jnp.einsum("cij,cpj->cpi", m, x) + v[:, None, :]
    _same_value_and_grad(channel_affine, plain, (m, v, x), (0, 1, 2))
    shift = _normal(rng, (3, T), loc=1.0)
    _same_value_and_grad(channel_affine, lambda m, v, x, s: plain(m, v, x - s[:, None]), (m, v, x, shift), (0, 1, 2, 3))


@pytest.mark.parametrize("D, groups, method", [(2, 2, "eigh"), (3, 1, "eigh"), (3, 4, "eigh"), (3, 2, "cholesky")])
def test_vector_group_norm(rng, D, groups, method):
    block = _normal(rng, (4,) + (6,) * D + (D,), loc=2.0) * jnp.arange(1, D + 1)
    scale, bias = _normal(rng, (4,)), _normal(rng, (4,))
    new = lambda b, s, t: vector_group_norm(b, groups, D, 1e-5, method, s, t)
    plain = lambda b, s, t: _plain_vector_group_norm(b, groups, D, 1e-5, method, s, t)
    _same_value_and_grad(new, plain, (block, scale, bias), (0, 1, 2))


def _eigh_inverse_sqrt(c, eps):
    w, v = jnp.linalg.eigh(c, symmetrize_input=False)
    return jnp.einsum("...ij,...j,...kj->...ik", v, 1.0 / jnp.sqrt(w + eps), v)


@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("gap", [1.0, 1e-3, 1e-6, 0.0])
def test_inverse_sqrt_derivative_at_near_equal_eigenvalues(rng, D, gap):
    """The whitening's JVP at fp32 against float64 central differences of V (w + eps)^(-1/2) V^T,
    as eigenvalue gaps shrink to 0 (a vector group's covariance is near-isotropic): within 1e-5,
    where autodiff through eigh is 1e-4 off at a gap of 1e-3, 1e-2 at 1e-6 and NaN at 0."""
    eps = 1e-5
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    cov = (q * (1.0 + gap * np.arange(D))) @ q.T
    cov = 0.5 * (cov + cov.T)
    dcov = rng.normal(size=(D, D))
    dcov = dcov + dcov.T
    with float64():
        h = 1e-6
        truth = np.asarray(_eigh_inverse_sqrt(jnp.asarray(cov + h * dcov), eps)
                           - _eigh_inverse_sqrt(jnp.asarray(cov - h * dcov), eps)) / (2 * h)
        value64 = np.asarray(_eigh_inverse_sqrt(jnp.asarray(cov), eps))
    args = (jnp.asarray(cov, jnp.float32),), (jnp.asarray(dcov, jnp.float32),)
    value, tangent = jax.jvp(lambda c: inverse_sqrt(c, eps), *args)
    assert value.dtype == jnp.float32 and rel_l2(value, value64) < 1e-6
    assert rel_l2(tangent, truth) < 1e-5
    _, through_eigh = jax.jvp(lambda c: _eigh_inverse_sqrt(c, eps), *args)
    if gap <= 1e-6:  # what the closed form avoids
        assert not np.isfinite(np.asarray(through_eigh)).all() or rel_l2(through_eigh, truth) > 1e-3
    # reverse mode (the model's gradients) transposes the same linear map
    ct = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
    (back,) = jax.vjp(lambda c: inverse_sqrt(c, eps), args[0][0])[1](ct)
    assert abs(float(jnp.sum(back * args[1][0])) - float(jnp.sum(ct * tangent))) < 1e-4 * float(
        jnp.linalg.norm(ct) * jnp.linalg.norm(tangent))


def test_vector_group_norm_gradient_of_an_isotropic_group_is_finite():
    """A group whose vectors are all equal (covariance 0, both eigenvalues 0: ginjax 0.1.8's autodiff
    through eigh gives NaN) has finite gradients; its output is bias x mean."""
    block = jnp.ones((2, 5, 5, 2)) * jnp.array([0.5, -1.0])
    scale, bias = jnp.array([1.5, 0.5]), jnp.array([0.3, -0.2])
    f = lambda b, s, t: jnp.sum(jnp.sin(vector_group_norm(b, 1, 2, 1e-5, "eigh", s, t)))  # noqa: E731
    grads = jax.grad(f, argnums=(0, 1, 2))(block, scale, bias)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    out = vector_group_norm(block, 1, 2, 1e-5, "eigh", scale, bias)
    assert rel_l2(out, bias[:, None, None, None] * block) < 1e-6


def _plain_group_norm(gn, x):
    """GroupNorm as ginjax 0.1.8 writes it: equinox for scalars, two-pass mean and covariance and
    einsum whitening for vectors."""
    out = {}
    for (k, p), block in x.items():
        if not k:
            out[(k, p)] = gn.vanilla_norm[(k, p)](block)
        else:
            out[(k, p)] = _plain_vector_group_norm(block, gn.groups, gn.D, gn.eps, "eigh", gn.scale[(k, p)], gn.bias[(k, p)])
    return out


@pytest.mark.parametrize("D, groups", [(2, 2), (3, 1)])
def test_group_norm_layer(rng, D, groups):
    sig = geom.Signature((((0, 0), 4), ((1, 0), 4)))
    gn = layers.GroupNorm(sig, D, groups)
    gn = eqx.tree_at(lambda m: (m.scale, m.bias), gn, (
        {k: _normal(rng, (4,)) for k in gn.scale}, {k: _normal(rng, (4,)) for k in gn.bias}))
    x = geom.MultiImage({
        ((), 0): _normal(rng, (4,) + (6,) * D, loc=1.0),
        ((False,), 0): _normal(rng, (4,) + (6,) * D + (D,), loc=1.0) * jnp.arange(1, D + 1),
    }, D, True)
    _same_value_and_grad(lambda gn, x: dict(gn(x).items()), _plain_group_norm, (gn, x), (0, 1))


@pytest.mark.parametrize("D, layout", [(2, "minor"), (3, "minor"), (2, "planar"), (3, "planar")])
def test_vector_neuron_layer(rng, D, layout, monkeypatch):
    # both arrangements of the arithmetic (ginjax._vector_neuron: components minor, the CPU's
    # default, or ahead of the pixels, the GPU's) against the plain autodiff chain
    monkeypatch.setenv(_vector_neuron.LAYOUT_ENV, layout)
    sig = geom.Signature((((0, 0), 3), ((0, 1), 2), ((1, 0), 4), ((2, 1), 2)))
    vn = layers.VectorNeuronNonlinear(sig, D, jax.nn.gelu, key=jax.random.PRNGKey(3))
    x = geom.MultiImage({
        kp: _normal(rng, (3, c) + (6,) * D + (D,) * len(kp[0])) for kp, c in sig
    }, D, True)

    def plain(vn, x):
        out = {}
        for (k, p), block in x.items():
            if (k, p) == ((), 0):
                out[(k, p)] = vn.scalar_activation(block)
                continue
            out[(k, p)] = _plain_vector_neuron(vn.weights[(k, p)], block, D, vn.scalar_activation, vn.eps)
        return out

    batched = lambda f: jax.vmap(f, (None, 0))
    new, plain = batched(lambda vn, x: dict(vn(x).items())), batched(plain)

    def value_and_grads(f, args):
        cot = _cotangent(eqx.filter_eval_shape(f, *args))
        return [np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(_value_and_vjp(f, args, (0, 1), cot))]

    with jax.default_matmul_precision("highest"):
        with float64():  # the written-out backward is autodiff's, exactly: equal up to float64 rounding
            truth = value_and_grads(plain, _to64((vn, x)))
            for a, b in zip(value_and_grads(new, _to64((vn, x))), truth):
                assert rel_l2(a, b) <= 1e-12
        # fp32: a weight's gradient sums terms ~ 1/|W x| that are large where the mixed
        # direction is short, so either formulation may sit near 1e-5 from the truth; the new one
        # must be as close as the autodiff chain it replaces
        fp32_new, fp32_old = value_and_grads(new, (vn, x)), value_and_grads(plain, (vn, x))
    for a, b, t in zip(fp32_new, fp32_old, truth):
        assert rel_l2(a, t) <= max(TOL, 2 * rel_l2(b, t))


def _plain_vector_neuron(w, block, D, activation, eps, affine=None, with_means=False, residual=None):
    """ginjax 0.1.8's formulation, differentiated by autodiff (safe norm: zero gradient at 0);
    `with_means` as `vector_neuron`'s (no means: the layers after it reduce the block), and a
    `residual` added by `+`."""
    assert affine is None, "the plain glue normalises first (layers.normalize_and_activate swapped out)"
    if with_means:
        return _plain_vector_neuron(w, block, D, activation, eps, residual=residual), None
    if residual is not None:
        return _plain_vector_neuron(w, block, D, activation, eps) + residual
    axes = tuple(range(1 + D, block.ndim))
    d = jnp.tensordot(w, block, axes=1)
    squared = jnp.sum(d * d, axis=axes, keepdims=True)
    norm = jnp.where(squared > 0, jnp.sqrt(jnp.where(squared > 0, squared, 1.0)), 0.0)
    unit = d / (norm + eps)
    inner = jnp.sum(block * unit, axis=axes, keepdims=True)
    gain = activation(inner) / (jnp.abs(inner) + eps)
    return gain * inner * unit + block - inner * unit


def _block_sized_ops(text, size):
    """{op: count} of the StableHLO reductions, transposes, GEMMs and concatenations with an
    operand or result of at least `size` elements."""
    ops = ("stablehlo.reduce(", "stablehlo.transpose", "stablehlo.dot_general", "stablehlo.concatenate")
    counts = {}
    for line in text.splitlines():
        for op in ops:
            shapes = re.findall(r"tensor<((?:\d+x)+)[a-z]", line) if op in line else []
            if any(math.prod(int(n) for n in s.rstrip("x").split("x")) >= size for s in shapes):
                counts[op] = counts.get(op, 0) + 1
    return counts


def test_vector_neuron_and_norm_step_structure():
    """A train step's passes over a vector block: the VectorNeuron is its three GEMMs and
    elementwise work (no reductions: the component sums are multiply-adds); the vector
    LayerNorm is two wide reductions forward and two backward, no GEMM, concatenation or
    transpose of the block, for vectors and scalars alike (ginjax 0.1.8's formulation by
    autodiff: 7, 9 and 6 reductions)."""
    D, N, B, C = 3, 8, 2, 16
    vector, scalar = ((False,), 0), ((), 0)
    found = {}
    for name, key, layer in [
        ("VectorNeuron", vector, layers.VectorNeuronNonlinear(geom.Signature(((vector, C),)), D, key=jax.random.PRNGKey(0))),
        ("LayerNorm", vector, layers.LayerNorm(geom.Signature(((vector, C),)), D)),
        ("scalar LayerNorm", scalar, layers.LayerNorm(geom.Signature(((scalar, C),)), D)),
    ]:
        x = geom.MultiImage({key: jnp.ones((B, C) + (N,) * D + (D,) * len(key[0]))}, D, True)
        params, static = eqx.partition(layer, eqx.is_inexact_array)

        def loss(params, x):
            out = jax.vmap(eqx.combine(params, static))(x)
            return sum(jnp.sum(jnp.sin(v)) for v in out.values())

        found[name] = _block_sized_ops(jax.jit(jax.grad(loss, (0, 1))).lower(params, x).as_text(), B * C * N**D)
    assert found == {"VectorNeuron": {"stablehlo.dot_general": 3}, "LayerNorm": {"stablehlo.reduce(": 4},
                     "scalar LayerNorm": {"stablehlo.reduce(": 4}}, found


# ---- whole models: the glue against its plain formulation ----------------------------------------
def _plain_glue(monkeypatch):
    """Swap every rewritten piece back to the formulation it replaced."""
    monkeypatch.setattr(layers, "vector_neuron", _plain_vector_neuron)
    monkeypatch.setattr(layers, "scalar_group_norm", lambda norm, block: norm(block))
    monkeypatch.setattr(layers, "vector_group_norm", _plain_vector_group_norm)
    monkeypatch.setattr(layers, "normalize_and_activate", _plain_normalize_and_activate)
    monkeypatch.setattr(_bias, "means_shortcut_exact", lambda spec: False)
    monkeypatch.setattr(_bias, "spatial_mean", lambda x, D: jnp.mean(x, axis=tuple(range(1, 1 + D))))
    monkeypatch.setattr(_bias, "add_spatial_offset", lambda b, o, D: b + o.reshape((o.shape[0],) + (1,) * D + o.shape[1:]))


def _plain_normalize_and_activate(norm, nonlinearity, x, residual=None):
    y = nonlinearity(norm(x))
    return y if residual is None else y + residual


def _plain_covariance(block, groups, D):
    """Two passes: each group's mean, the centred samples (G, n, D), their covariance by GEMM."""
    samples = block.reshape((groups, -1, D))
    mean = samples.mean(axis=1)
    centred = samples - mean[:, None]
    return mean, centred, jnp.einsum("gni,gnj->gij", centred, centred) / centred.shape[1]


def _plain_vector_group_norm(block, groups, D, eps, method="eigh", scale=None, bias=None):
    _, centred, cov = _plain_covariance(block, groups, D)
    if method == "eigh":
        lam, u = jnp.linalg.eigh(cov)
        white = jnp.einsum("gij,gj,gkj->gik", u, 1 / jnp.sqrt(lam + eps), u)
        out = jnp.einsum("gnj,gij->gni", centred, white).reshape(block.shape)
    else:
        factor = jnp.linalg.cholesky(cov) + eps * jnp.eye(D)
        out = jax.lax.linalg.triangular_solve(factor, centred, left_side=False, lower=True).reshape(block.shape)
    lead = (-1,) + (1,) * (D + 1)
    if scale is not None:
        out = out * scale.reshape(lead)
    if bias is not None:
        out = out + jnp.mean(block, axis=tuple(range(1, 1 + D)), keepdims=True) * bias.reshape(lead)
    return out


@pytest.mark.parametrize("name, D", [("ResNet", 2), ("ResNet", 3), ("DilResNet", 2), ("UNet", 2)])
def test_model_step_equals_plain_glue(monkeypatch, name, D):
    filters = filter_bank(D, 3)
    sig_in = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    sig_out = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    # gelu, not relu: at a kink, rounding alone may pick a different one-sided derivative
    kwargs = {"use_group_norm": True, "activation_f": jax.nn.gelu}
    if name == "UNet":
        kwargs.update(num_downsamples=1, num_conv=1, upsample_filters=filter_bank(D, 2))
    else:
        kwargs.update(num_blocks=1)
    model = getattr(models, name)(D, sig_in, sig_out, 2, conv_filters=filters, key=jax.random.PRNGKey(4), **kwargs)
    rng = np.random.default_rng(5)
    N = 8 if D == 2 else 4
    x = geom.MultiImage({kp: _normal(rng, (2, c) + (N,) * D + (D,) * len(kp[0]), 0.5) for kp, c in sig_in}, D, True)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, x):
        out = jax.vmap(lambda xi: eqx.combine(params, static)(xi)[0])(x)
        return sum(jnp.mean(jnp.square(v)) for v in out.values())

    # float64: through 6-18 layers fp32 rounding differences grow past 1e-5; in float64 any
    # difference of formulation still shows, rounding does not
    with float64(), kernels.use_backend("dense"):
        to64 = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)
        params, x = to64(params), to64(x)
        # jitted: one compile per formulation instead of thousands of eager float64 dispatches
        new = jax.jit(jax.value_and_grad(step))(params, x)
        _plain_glue(monkeypatch)
        old = jax.jit(jax.value_and_grad(step))(params, x)
    tol = 1e-9
    assert rel_l2(new[0], old[0]) <= tol
    assert jax.tree_util.tree_structure(new[1]) == jax.tree_util.tree_structure(old[1])
    assert max(gradient_errors(new[1], old[1])) <= tol  # some bias gradients vanish by symmetry


def test_vector_neuron_layout_is_checked(monkeypatch):
    w, block = jnp.eye(2), jnp.ones((2, 4, 4, 2))
    with pytest.raises(ValueError, match=r"`layout` \(='rows'\) must be one of"):
        _vector_neuron.vector_neuron(w, block, 2, jax.nn.relu, 1e-5, layout="rows")
    monkeypatch.setenv(_vector_neuron.LAYOUT_ENV, "rows")
    with pytest.raises(ValueError, match=r"`GINJAX_VN_LAYOUT` \(='rows'\) must be one of"):
        _vector_neuron.vector_neuron(w, block, 2, jax.nn.relu, 1e-5)


@pytest.mark.parametrize("platform, layout, impl", [("gpu", "planar", "cuda"), ("cpu", "minor", "xla")])
def test_vector_neuron_defaults_by_platform(monkeypatch, platform, layout, impl):
    # on a GPU the CUDA kernels (Triton's where they do not run) over planar blocks (measured
    # faster on the H200 beside the planar ConvContract kernels); elsewhere the XLA path in the
    # blocks' own order; the environment overrides both
    monkeypatch.delenv(_vector_neuron.LAYOUT_ENV, raising=False)
    monkeypatch.delenv(_vector_neuron.IMPL_ENV, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert (_vector_neuron.default_layout(), _vector_neuron.default_impl()) == (layout, impl)
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "xla" if impl != "xla" else "triton")
    assert _vector_neuron.default_impl() != impl
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "pallas")
    with pytest.raises(ValueError, match=r"`GINJAX_VN_IMPL` \(='pallas'\) must be one of"):
        _vector_neuron.default_impl()


@pytest.mark.parametrize("platform", ["gpu", "cpu"])
def test_one_block_layout_for_every_kernel(monkeypatch, platform):
    """kernels._layout.block_layout: "planar" on a GPU, "minor" elsewhere; GINJAX_BLOCK_LAYOUT sets
    it for the CUDA ConvContract kernels, the VectorNeuron and the sums alike; GINJAX_CUDA_LAYOUT
    and GINJAX_VN_LAYOUT override it for one of them; a value they do not know is named."""
    from kernels._layout import ENV, block_layout
    from kernels.cuda import conv_contract as cuda_entry

    for env in (ENV, cuda_entry.LAYOUT_ENV, _vector_neuron.LAYOUT_ENV):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    default = "planar" if platform == "gpu" else "minor"
    assert block_layout() == cuda_entry.layout() == _vector_neuron.default_layout() == default
    other = "minor" if default == "planar" else "planar"
    monkeypatch.setenv(ENV, other)
    assert block_layout() == cuda_entry.layout() == _vector_neuron.default_layout() == other
    monkeypatch.setenv(cuda_entry.LAYOUT_ENV, default)
    assert (cuda_entry.layout(), _vector_neuron.default_layout()) == (default, other)
    monkeypatch.setenv(ENV, "rows")
    with pytest.raises(ValueError, match=r"`GINJAX_BLOCK_LAYOUT` \(='rows'\) must be one of"):
        block_layout()


