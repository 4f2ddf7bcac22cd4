"""The train-step glue rewritten for speed (kernels._reduce, ginjax._channel_mix,
ginjax._norm_stats) against the straightforward formulations it replaces, values and gradients at
fp32 on fresh random inputs; and whole models with the glue swapped back to those formulations."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax import layers, models
from ginjax._channel_mix import channel_mix
from ginjax._norm_stats import apply_group_matrix, scalar_group_norm, vector_moments
from kernels import _bias, _reduce
from conftest import rel_l2

TOL = 1e-5


def _normal(rng, shape, loc=0.0):
    return jnp.asarray(rng.standard_normal(shape) + loc, jnp.float32)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(tree)])


def _same_value_and_grad(f_new, f_old, args, argnums=0, tol=TOL):
    """f_new == f_old, and their vector-Jacobian products with one random cotangent agree (fp32,
    exact matmuls)."""
    argnums = (argnums,) if isinstance(argnums, int) else tuple(argnums)

    def vjp(f):
        def part(*diff):
            full = list(args)
            for i, a in zip(argnums, diff):
                full[i] = a
            return f(*full)

        return jax.vjp(part, *(args[i] for i in argnums))

    with jax.default_matmul_precision("highest"):
        (new, vjp_new), (old, vjp_old) = vjp(f_new), vjp(f_old)
        assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(old)
        assert rel_l2(_flat(new), _flat(old)) <= tol
        rng = np.random.default_rng(99)
        cot = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), old)
        g_new, g_old = vjp_new(cot), vjp_old(cot)
    for a, b in zip(jax.tree_util.tree_leaves(g_new), jax.tree_util.tree_leaves(g_old)):
        assert rel_l2(a, b) <= tol


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


@pytest.mark.parametrize("D, groups", [(2, 1), (2, 2), (3, 1), (3, 4)])
def test_vector_moments(rng, D, groups):
    block = _normal(rng, (4,) + (6,) * D + (D,), loc=2.0) * jnp.arange(1, D + 1)

    def plain(block):
        mean, centred, cov = _plain_covariance(block, groups, D)
        return block.mean(axis=tuple(range(1, 1 + D))), mean, cov

    _same_value_and_grad(lambda b: vector_moments(b, groups, D), plain, (block,))


@pytest.mark.parametrize("D", [2, 3])
def test_apply_group_matrix(rng, D):
    a, v = _normal(rng, (2, D, D)), _normal(rng, (2, 50, D))
    _same_value_and_grad(apply_group_matrix, lambda a, v: jnp.einsum("gnj,gij->gni", v, a), (a, v), (0, 1))


def _plain_group_norm(gn, x):
    """GroupNorm as ginjax 0.1.8 writes it: equinox for scalars, two-pass mean and covariance and
    einsum whitening for vectors."""
    out = {}
    for (k, p), block in x.items():
        if not k:
            out[(k, p)] = gn.vanilla_norm[(k, p)](block)
            continue
        D = gn.D
        lead = (-1,) + (1,) * (D + 1)
        whitened = _plain_whiten(D, block, gn.groups, gn.eps)
        mean = jnp.mean(block, axis=tuple(range(1, 1 + D)), keepdims=True)
        out[(k, p)] = whitened * gn.scale[(k, p)].reshape(lead) + mean * gn.bias[(k, p)].reshape(lead)
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


@pytest.mark.parametrize("D", [2, 3])
def test_vector_neuron_layer(rng, D):
    sig = geom.Signature((((0, 0), 3), ((1, 0), 4), ((2, 1), 2)))
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
            axes = tuple(range(1 + D, block.ndim))
            d = jnp.tensordot(vn.weights[(k, p)], block, axes=1)
            unit = d / (jnp.sqrt(jnp.sum(d * d, axis=axes, keepdims=True)) + vn.eps)
            inner = jnp.sum(block * unit, axis=axes, keepdims=True)
            gain = vn.scalar_activation(inner) / (jnp.abs(inner) + vn.eps)
            out[(k, p)] = gain * inner * unit + block - inner * unit
        return out

    batched = lambda f: jax.vmap(f, (None, 0))
    _same_value_and_grad(batched(lambda vn, x: dict(vn(x).items())), batched(plain), (vn, x), (0, 1))


# ---- whole models: the glue against its plain formulation ----------------------------------------
def _plain_glue(monkeypatch):
    """Swap every rewritten piece back to the formulation it replaced."""
    monkeypatch.setattr(layers, "channel_mix", lambda w, x: jnp.tensordot(w, x, axes=1))
    monkeypatch.setattr(layers, "scalar_group_norm", lambda norm, block: norm(block))
    monkeypatch.setattr(layers, "_whiten", lambda D, block, groups, method, eps: (
        _plain_whiten(D, block, groups, eps), jnp.mean(block, axis=tuple(range(1, 1 + D)))))
    monkeypatch.setattr(_bias, "means_shortcut_exact", lambda spec: False)
    monkeypatch.setattr(_bias, "spatial_mean", lambda x, D: jnp.mean(x, axis=tuple(range(1, 1 + D))))
    monkeypatch.setattr(_bias, "add_spatial_offset", lambda b, o, D: b + o.reshape((o.shape[0],) + (1,) * D + o.shape[1:]))


def _plain_covariance(block, groups, D):
    """Two passes: each group's mean, the centred samples (G, n, D), their covariance by GEMM."""
    samples = block.reshape((groups, -1, D))
    mean = samples.mean(axis=1)
    centred = samples - mean[:, None]
    return mean, centred, jnp.einsum("gni,gnj->gij", centred, centred) / centred.shape[1]


def _plain_whiten(D, block, groups, eps):
    _, centred, cov = _plain_covariance(block, groups, D)
    lam, u = jnp.linalg.eigh(cov)
    white = jnp.einsum("gij,gj,gkj->gik", u, 1 / jnp.sqrt(lam + eps), u)
    return jnp.einsum("gnj,gij->gni", centred, white).reshape(block.shape)


@pytest.mark.parametrize("name, D", [("ResNet", 3), ("DilResNet", 2), ("UNet", 2)])
def test_model_step_equals_plain_glue(monkeypatch, name, D):
    filters = geom.get_invariant_filters([3], [0, 1, 2], [0, 1], D, geom.make_all_operators(D))
    sig_in = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    sig_out = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    kwargs = {"use_group_norm": True}
    if name == "UNet":
        kwargs.update(num_downsamples=1, num_conv=1, upsample_filters=geom.get_invariant_filters(
            [2], [0, 1, 2], [0, 1], D, geom.make_all_operators(D)))
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

    with kernels.use_backend("dense"), jax.default_matmul_precision("highest"):
        new = jax.value_and_grad(step)(params, x)
        _plain_glue(monkeypatch)
        old = jax.value_and_grad(step)(params, x)
    assert rel_l2(new[0], old[0]) <= TOL
    assert rel_l2(_flat(new[1]), _flat(old[1])) <= TOL
    for a, b in zip(jax.tree_util.tree_leaves(new[1]), jax.tree_util.tree_leaves(old[1])):
        # leaf by leaf at the scale of the whole gradient (some bias gradients vanish by symmetry)
        assert np.linalg.norm(np.asarray(a) - np.asarray(b)) <= TOL * max(np.linalg.norm(b), np.linalg.norm(_flat(old[1])) / 10)
