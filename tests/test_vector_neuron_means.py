"""The VectorNeuron's forward kernel adding up its output's spatial means, and a following
ConvContract's "mean" bias taking them instead of reading the block again: the kernel's means
against jnp.mean of its output (ragged tiles, the affine prologue, both layouts, vmap), their
gradient, `kernels.conv_contract(..., input_means=)` against the layer without them (values,
gradients, no reduction of the given inputs, bad arguments), the record on MultiImage, and whole
models with GINJAX_VN_MEANS on and off. Triton's interpreter runs the kernels on the host."""

from __future__ import annotations

import functools
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels
import ginjax.geometric as geom
from ginjax import _vector_neuron, models
from kernels import _bias
from conftest import filter_bank, fixture_filters, gradient_errors, invariant_pairs, random_operands, rel_l2

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import VNBlocks, vector_neuron_triton  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

TOL = 1e-5  # fp32 (ARCHITECTURE.md)
EPS = 1e-5


def _normal(rng, shape, scale=1.0, loc=0.0):
    return jnp.asarray(rng.normal(size=shape) * scale + loc, jnp.float32)


def _affine(rng, c, T):
    return (_normal(rng, (c, T, T), 0.5), _normal(rng, (c, T)), _normal(rng, (c, T)))


@pytest.mark.parametrize("planar", [True, False])
@pytest.mark.parametrize("with_affine", [False, True])
def test_kernel_means_match_its_output(planar, with_affine):
    """Means of 3 examples of a 5-channel 3D vector block of 4 x 5 x 6 pixels on tiles of 32 (the
    last ragged: with the affine map its padding pixels would add v - M shift), against jnp.mean
    of the kernel's own output; and the gradient of a loss that reads the means equals the one
    that reduces y itself."""
    rng = np.random.default_rng(0)
    c, D = 5, 3
    x = _normal(rng, (3, c, 4, 5, 6, 3))
    w = _normal(rng, (c, c), 1 / np.sqrt(c))
    affine = _affine(rng, c, 3) if with_affine else None

    def run(w, x, means):
        out = vector_neuron_triton(w, x, D, jax.nn.gelu, EPS, VNBlocks(pixels=32), planar=planar, affine=affine,
                                   with_means=means)
        return out if means else (out, jnp.mean(out, axis=(1, 2, 3)))

    y, mu = jax.vmap(run, (None, 0, None))(w, x, True)
    assert np.all(np.isfinite(np.asarray(mu)))
    assert mu.shape == (3, c, 3)
    assert rel_l2(mu, jnp.mean(y, axis=(2, 3, 4))) < TOL

    def loss(w, x, means):
        y, mu = jax.vmap(run, (None, 0, None))(w, x, means)
        return 0.1 * jnp.sum(y * y) + jnp.sum(jnp.sin(3.0 * mu))

    got = jax.grad(loss, (0, 1))(w, x, True)
    want = jax.grad(loss, (0, 1))(w, x, False)
    assert max(gradient_errors(got, want)) < TOL


def test_kernel_without_means_is_unchanged():
    """with_means=False returns the array alone, from a forward kernel that adds nothing up (the
    same source as before the means: no `part` result, no row sums)."""
    from kernels.triton import _vn_kernel as vk

    rng = np.random.default_rng(1)
    x, w = _normal(rng, (4, 8, 8, 2)), _normal(rng, (4, 4), 0.5)
    y = vector_neuron_triton(w, x, 2, jax.nn.relu, EPS)
    assert isinstance(y, jax.Array) and y.shape == x.shape
    g = vk.VNGeometry(4, 2, 64, True, False)
    plain, summing = (vk.plan_forward(g, "relu", EPS, 64, 4, sums=s).source for s in (False, True))
    assert "part" not in plain and "tl.sum" not in plain
    assert "part" in summing and summing.count("tl.sum") == 2  # one row sum per component
    with_sums = jax.jit(lambda w, x: vector_neuron_triton(w, x, 2, jax.nn.relu, EPS, with_means=True)[1])
    assert with_sums(w, x).shape == (4, 2)


def _vector_layer(D=2, c=4):
    """Scalar and vector inputs of c channels to scalar and vector outputs, with ginjax's biases
    ('add' on the scalars, 'mean' on the vectors)."""
    ins = [(0, 0, c), (1, 0, c)]
    out_keys, pairs = invariant_pairs(fixture_filters(D, 3), ins, [(0, 0, 3), (1, 0, 3)])
    return kernels.make_spec(D, ins, out_keys, pairs, True, bias_modes=("add", "mean"))


def _layer_operands(spec, seed, spatial):
    inputs, weights = random_operands(spec, spatial, seed, dtype=np.float32)
    rng = np.random.default_rng(seed + 100)
    bias = [_normal(rng, (o,)) for _, _, o in spec.out_keys]
    return [jnp.asarray(x) + 0.5 for x in inputs], [0.3 * jnp.asarray(w) for w in weights], bias


@pytest.mark.parametrize("backend", ["triton", "triton-filter-groups", "dense"])
def test_conv_contract_takes_given_means(monkeypatch, backend):
    """The vector input's mean given (the scalar one is read by no offset): outputs and gradients
    (inputs, weights, bias) equal the layer's without it, and no reduction reads that input;
    also where the triton backend splits the layer into filter groups (cap lowered to 3 live Z
    tiles), whose offsets autodiff differentiates."""
    spec = _vector_layer()
    if backend == "triton-filter-groups":
        from kernels.triton import conv_contract as triton_entry
        from kernels.triton._filter_groups import filter_groups

        from kernels.triton._tiling import BlockSizes

        split = functools.partial(filter_groups, cap=3)
        monkeypatch.setattr(triton_entry, "filter_groups", split)
        monkeypatch.setenv("GINJAX_TRITON_PARITY", "off")  # else the grouped layer runs parity-blocked
        assert len(split(spec.without_bias(), (8, 8), "tf32", BlockSizes.for_layer(spec.without_bias(), (8, 8)))) == 2
        backend = "triton"
    inputs, weights, bias = _layer_operands(spec, 2, (8, 8))
    given = [None, jnp.mean(inputs[1], axis=(1, 2))]

    def run(inputs, weights, bias, given):
        outs = kernels.conv_contract(spec, inputs, weights, bias=bias, backend=backend, input_means=given)
        return sum(jnp.sum(o * jnp.cos(o)) for o in outs)

    with jax.default_matmul_precision("highest"):
        got = jax.value_and_grad(run, (0, 1, 2))(inputs, weights, bias, given)
        want = jax.value_and_grad(run, (0, 1, 2))(inputs, weights, bias, None)
    assert rel_l2(got[0], want[0]) < TOL
    assert max(gradient_errors(got[1], want[1])) < TOL

    calls = []
    real = _bias.spatial_mean
    try:
        _bias.spatial_mean = lambda x, D: calls.append(x.shape) or real(x, D)
        jax.make_jaxpr(run)(inputs, weights, bias, given)
        assert calls == [], calls  # the scalar input's mean reaches no offset, the vector one is given
        jax.make_jaxpr(run)(inputs, weights, bias, None)
        assert calls == [inputs[1].shape], calls
    finally:
        _bias.spatial_mean = real


def test_given_means_under_vmap():
    """Per-example means under vmap (the models' batch): same as the layer without them."""
    spec = _vector_layer()
    inputs, weights, bias = _layer_operands(spec, 3, (8, 8))
    batch = [jnp.stack([x, 2.0 * x - 0.3]) for x in inputs]
    run = lambda xs, given: kernels.conv_contract(spec, xs, weights, bias=bias, backend="triton",  # noqa: E731
                                                  input_means=given)
    means = jnp.mean(batch[1], axis=(2, 3))
    got = jax.vmap(run)(batch, [None, means])
    want = jax.vmap(lambda xs: run(xs, None))(batch)
    for g, w in zip(got, want):
        assert rel_l2(g, w) < TOL


def test_bad_given_means_name_the_argument():
    spec = _vector_layer()
    inputs, weights, bias = _layer_operands(spec, 4, (8, 8))
    run = lambda given: kernels.conv_contract(spec, inputs, weights, bias=bias, input_means=given)  # noqa: E731
    with pytest.raises(ValueError, match=r"`input_means` \(=\[None\]\) must be a sequence of 2 entries"):
        run([None])
    with pytest.raises(ValueError, match=r"`input_means\[1\]` \(=array of shape \(4,\)\) must be a floating-point "
                                         r"array of shape \(4, 2\)"):
        run([None, jnp.zeros((4,))])
    with pytest.raises(ValueError, match=r"`input_means\[0\]`.*must be a floating-point array of shape \(4,\)"):
        run([jnp.zeros((4,), jnp.int32), None])


def test_multi_image_keeps_a_mean_for_its_block_only():
    """A recorded mean holds while the key holds that very block; sums and differences of two
    images with means carry theirs; a new block, a copy or a pytree round trip drop it."""
    rng = np.random.default_rng(5)
    key = ((False,), 0)
    a = geom.MultiImage({key: _normal(rng, (2, 4, 4, 2))}, 2)
    b = geom.MultiImage({key: _normal(rng, (2, 4, 4, 2))}, 2)
    ma, mb = jnp.mean(a[key], axis=(1, 2)), jnp.mean(b[key], axis=(1, 2))
    assert a._block_mean(key) is None
    a._set_block_mean(key, ma)
    b._set_block_mean(key, mb)
    assert a._block_mean(key) is ma
    assert rel_l2((a + b)._block_mean(key), ma + mb) == 0.0
    assert rel_l2((a - b)._block_mean(key), ma - mb) == 0.0
    assert (a + b.copy())._block_mean(key) is None
    flat, tree = jax.tree_util.tree_flatten(a)
    assert jax.tree_util.tree_unflatten(tree, flat)._block_mean(key) is None
    a[key] = a[key] * 2.0
    assert a._block_mean(key) is None


def _model(name, D=2):
    sig_in = geom.Signature(((((), 0), 2), (((False,), 0), 2)))
    sig_out = geom.Signature(((((), 0), 1), (((False,), 0), 1)))
    kw = dict(use_group_norm=True, activation_f=jax.nn.gelu)
    if name == "UNet":
        kw.update(num_downsamples=1, num_conv=1, upsample_filters=filter_bank(D, 2))
    else:
        kw.update(num_blocks=1)
    model = getattr(models, name)(D, sig_in, sig_out, 4, conv_filters=filter_bank(D, 3), key=jax.random.PRNGKey(4),
                                  **kw)
    rng = np.random.default_rng(5)
    x = geom.MultiImage({kp: _normal(rng, (2, c) + (16,) * D + (D,) * len(kp[0]), 0.5, 0.3) for kp, c in sig_in},
                        D, True)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def step(params, x):
        out = jax.vmap(lambda xi: eqx.combine(params, static)(xi)[0])(x)
        return sum(jnp.mean(jnp.square(v)) for v in out.values())

    return jax.value_and_grad(step), params, x


# ConvContracts whose vector input a VectorNeuron wrote (its mean given) per model (D=2, one
# block): every one but the first in ResNet (4 of 6: the decoder's too, after the residual add,
# as the sum of both operands' means) and DilResNet (10 of 11); in the UNet only the conv after
# the last nonlinearity (pooling and the skip concatenation make new blocks)
_KNOWN = {"ResNet": 4, "DilResNet": 10, "UNet": 1}


@pytest.mark.parametrize("name", sorted(_KNOWN))
def test_models_take_the_means_from_the_vector_neurons(monkeypatch, name):
    """A train step with the Triton VectorNeuron: with GINJAX_VN_MEANS=1 (default) the layers
    after a VectorNeuron take their input means from it (`known_mean` that many times, once per
    layer), with GINJAX_VN_MEANS=0 none; the step's value is the same and, for the ResNet (the
    deep dilated DilResNet amplifies fp32 rounding past 1e-5 between any two summation orders,
    the Triton and XLA VectorNeuron included), its gradients too."""
    monkeypatch.setenv(_vector_neuron.IMPL_ENV, "triton")
    results, counts = {}, {}
    real = _bias.known_mean
    for means in ("1", "0"):
        monkeypatch.setenv(_vector_neuron.MEANS_ENV, means)
        calls = []
        monkeypatch.setattr(_bias, "known_mean", lambda x, m, D: calls.append(x.shape) or real(x, m, D))
        step, params, x = _model(name)
        with kernels.use_backend("dense"), jax.default_matmul_precision("highest"):
            results[means] = jax.jit(step)(params, x)
        counts[means] = len(calls)
    assert counts == {"1": _KNOWN[name], "0": 0}, counts
    assert rel_l2(results["1"][0], results["0"][0]) < TOL
    if name != "DilResNet":
        assert max(gradient_errors(results["1"][1], results["0"][1])) < TOL


def test_bad_means_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv(_vector_neuron.MEANS_ENV, "yes")
    rng = np.random.default_rng(6)
    x, w = _normal(rng, (4, 8, 8, 2)), _normal(rng, (4, 4), 0.5)
    with pytest.raises(ValueError, match=_vector_neuron.MEANS_ENV):
        _vector_neuron.vector_neuron(w, x, 2, jax.nn.relu, EPS, impl="triton", with_means=True)
    assert os.environ[_vector_neuron.MEANS_ENV] == "yes"
