"""ginjax.models: every model is equivariant in D=2 and D=3, runs under jit, vmap and grad,
trains, converts between dimensions, and rejects bad input with a clear error.

The invariant filters come from the ginjax 0.1.8 fixtures (building them is slow and tested
elsewhere). Equivariance: rel. L2 error of f(g.x) against g.f(x) under the highest matmul
precision, for a few sampled group elements (a rotation and a reflection among them).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import ginjax.geometric as geom
import kernels
from ginjax import layers, models

from conftest import filter_bank as filters, fixture_filters, rel_l2

SCALAR = ((), 0)
VECTOR = ((False,), 0)
N = 8
TOL = 1e-4
IN_SIG = geom.Signature(((SCALAR, 2), (VECTOR, 1)))
OUT_SIG = geom.Signature(((SCALAR, 1), (VECTOR, 1)))

def random_image(D: int, sig=IN_SIG, seed: int = 0, n: int = N, batch=()) -> geom.MultiImage:
    rng = np.random.default_rng(seed)
    blocks = {
        key: jnp.asarray(rng.standard_normal(batch + (c,) + (n,) * D + (D,) * len(key[0])), jnp.float32)
        for key, c in sig
    }
    return geom.MultiImage(blocks, D, True)


def sample_ops(D: int) -> list[np.ndarray]:
    ops = geom.make_all_operators(D)
    chosen = [np.asarray(ops[i]) for i in (1, len(ops) // 2 + 1, len(ops) - 1)]
    dets = [np.linalg.det(g) for g in chosen]
    assert min(dets) < 0 < max(dets) and not any(np.allclose(g, np.eye(D)) for g in chosen)
    return chosen


def rel_multi(a: geom.MultiImage, b: geom.MultiImage) -> float:
    assert set(a.keys()) == set(b.keys())
    num = sum(float(np.sum((np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)) ** 2)) for k in a.keys())
    den = sum(float(np.sum(np.asarray(b[k], np.float64) ** 2)) for k in b.keys())
    assert den > 0, "output is all zeros: equivariance would prove nothing"
    return float(np.sqrt(num / den))


def equivariance_error(model, x: geom.MultiImage, ops, jit: bool = True) -> float:
    call = lambda m, x: m(x)[0]
    f = eqx.filter_jit(call) if jit else call
    with jax.default_matmul_precision("highest"):
        y = f(model, x)
        return max(rel_multi(f(model, x.times_group_element(g)), y.times_group_element(g)) for g in ops)


def check_equivariant(name: str, model, x, ops, jit: bool = True) -> None:
    err = equivariance_error(model, x, ops, jit)
    assert err <= TOL, f"{name}: equivariance error {err:.2e} > {TOL:.0e}"


def build(name: str, D: int, gn: bool = False, equivariant: bool = True, key=jr.PRNGKey(0), levels=1, **kw):
    """The small models used throughout: depth 2, few blocks."""
    conv = filters(D, 3) if equivariant else None
    common = dict(equivariant=equivariant, conv_filters=conv, key=key)
    if not equivariant:
        common["kernel_size"] = 3
    if name == "UNet":
        return models.UNet(
            D, IN_SIG, OUT_SIG, 2, num_downsamples=levels, num_conv=1, use_group_norm=gn,
            upsample_filters=filters(D, 2) if equivariant else None, **common, **kw,
        )
    if name == "ResNet":
        return models.ResNet(D, IN_SIG, OUT_SIG, 2, num_blocks=1, use_group_norm=gn, **common, **kw)
    if name == "DilResNet":
        return models.DilResNet(D, IN_SIG, OUT_SIG, 2, num_blocks=1, use_group_norm=gn, **common, **kw)
    if name == "SimpleConvSeries":
        return models.SimpleConvSeries(IN_SIG, OUT_SIG, conv, 2, 3, "auto", "gelu", key)
    if name == "ConvBlock":
        return models.ConvBlock(D, IN_SIG, OUT_SIG, use_group_norm=gn, **common)
    raise ValueError(name)


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))])


def parameter_blocks(tree) -> list[np.ndarray]:
    """The parameter arrays of a model (or of its gradient): not the ConvContract filter banks."""
    is_conv = lambda n: isinstance(n, layers.ConvContract)
    out = []
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_conv):
        if is_conv(leaf):
            out += [np.asarray(a) for a in jax.tree_util.tree_leaves((leaf.weights, leaf.bias))]
        elif eqx.is_array(leaf):
            out.append(np.asarray(leaf))
    return out


# ---------------------------------------------------------------------------------------------
# equivariance in 2D and 3D
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("D", [2, 3])
@pytest.mark.parametrize("gn", [False, True], ids=["plain", "groupnorm"])
@pytest.mark.parametrize("name", ["UNet", "ResNet", "DilResNet"])
def test_model_equivariant(name, gn, D):
    # two UNet levels in 2D (a level inside a level); in 3D one: the same code, and each level
    # adds its programs' compile time (about 20 CPU seconds for the second)
    model = build(name, D, gn, levels=2 if D == 2 else 1)
    check_equivariant(f"{name}{'+GN' if gn else ''} D={D}", model, random_image(D), sample_ops(D))


@pytest.mark.parametrize("D", [2, 3])
def test_small_models_equivariant(D):
    x = random_image(D)
    ops = sample_ops(D)
    check_equivariant(f"SimpleConvSeries D={D}", build("SimpleConvSeries", D), x, ops)
    check_equivariant(f"ConvBlock+GN D={D}", build("ConvBlock", D, gn=True), x, ops)
    check_equivariant(f"LastStepIdentity D={D}", models.LastStepIdentity(), x, ops)


@pytest.mark.parametrize("D", [2, 3])
def test_group_average_of_non_equivariant_model(D):
    ops = [np.asarray(g) for g in geom.make_all_operators(D)]
    base = build("ResNet", D, equivariant=False, key=jr.PRNGKey(4))
    x = random_image(D)
    # the plain model is not equivariant; averaged over the whole group it is
    assert equivariance_error(base, x, sample_ops(D)) > 1e-2
    inner = eqx.filter_jit(lambda m, x: m(x))

    class Jitted(models.MultiImageModule):  # one compilation for the |G| calls
        model: models.MultiImageModule

        def __call__(self, x, aux_data=None):
            return inner(self.model, x)

    averaged = models.GroupAverage(Jitted(base), ops, always_average=True)
    check_equivariant(f"GroupAverage(ResNet non-equivariant) D={D}", averaged, x, sample_ops(D), jit=False)
    # not averaging unless asked or in inference mode
    lazy = models.GroupAverage(base, ops)
    assert rel_multi(inner(lazy, x)[0], inner(base, x)[0]) == 0.0  # jitted: eager, a 3D ResNet dispatches op by op
    assert eqx.nn.inference_mode(lazy).inference is True


def test_group_average_jits():
    D = 2
    model = models.GroupAverage(
        models.ModelWrapper(D, eqx.nn.Conv(D, 4, 3, 3, padding="SAME", key=jr.PRNGKey(0)), OUT_SIG, True),
        geom.make_all_operators(D),
        always_average=True,
    )
    check_equivariant("GroupAverage(ModelWrapper(Conv)) D=2", model, random_image(D), sample_ops(D))


# ---------------------------------------------------------------------------------------------
# non-equivariant variants and batch norm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["UNet", "ResNet", "DilResNet"])
def test_non_equivariant_variants_run(name):
    for D in (2, 3):
        model = build(name, D, gn=True, equivariant=False)
        y, aux = eqx.filter_jit(lambda m, x: m(x))(model, random_image(D))
        assert aux is None
        assert {k: v.shape for k, v in y.items()} == {
            SCALAR: (1,) + (N,) * D, VECTOR: (1,) + (N,) * D + (D,)
        }
        assert np.all(np.isfinite(np.asarray(y[VECTOR]))) and np.any(np.asarray(y[VECTOR]) != 0)
    # the flattened channel layout follows input_keys, not the caller's key order
    x = random_image(2)
    swapped = geom.MultiImage({VECTOR: x[VECTOR], SCALAR: x[SCALAR]}, 2)
    model = build(name, 2, gn=True, equivariant=False)
    assert rel_multi(model(swapped)[0], model(x)[0]) == 0.0


def test_batch_norm_with_state():
    D = 2
    model, state = eqx.nn.make_with_state(models.UNet)(
        D, IN_SIG, OUT_SIG, 2, num_downsamples=1, num_conv=1, equivariant=False, kernel_size=3,
        use_batch_norm=True, key=jr.PRNGKey(1),
    )
    x = random_image(D, batch=(1, 3))  # (pmap_batch, batch, ...)

    def call(m, x, s):
        return m(x, s)

    step = eqx.filter_vmap(call, in_axes=(None, 0, None), out_axes=(0, None), axis_name="batch")
    step = eqx.filter_vmap(step, in_axes=(None, 0, None), out_axes=(0, None), axis_name="pmap_batch")
    y, new_state = eqx.filter_jit(step)(model, x, state)
    assert y[VECTOR].shape == (1, 3, 1, N, N, D)
    assert np.all(np.isfinite(np.asarray(y[VECTOR])))
    before, after = flat(state), flat(new_state)
    assert before.shape == after.shape and not np.allclose(before, after)  # statistics updated
    # inference mode uses the running statistics: no batch axis names needed
    frozen = eqx.nn.inference_mode(model)
    y1, s1 = eqx.filter_jit(frozen)(random_image(D), new_state)  # jitted: eager, a UNet dispatches op by op
    assert np.all(np.isfinite(np.asarray(y1[SCALAR]))) and np.allclose(flat(s1), after)


def test_equivariant_batch_norm_rejected():
    with pytest.raises(ValueError, match="`use_batch_norm` \\(=True\\)"):
        build("UNet", 2, use_batch_norm=True)
    with pytest.raises(ValueError, match="`use_batch_norm` \\(=True\\)"):
        models.ConvBlock(2, IN_SIG, OUT_SIG, conv_filters=filters(2, 3), use_batch_norm=True, key=jr.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# jit, vmap and grad through every model; training
# ---------------------------------------------------------------------------------------------
def _loss_and_outputs(model, xb, yb):
    pred = eqx.filter_vmap(lambda m, x: m(x)[0], in_axes=(None, 0))(model, xb)
    return sum(jnp.mean((pred[k] - yb[k]) ** 2) for k in yb.keys()), pred


def _loss(model, xb, yb):
    return _loss_and_outputs(model, xb, yb)[0]


@pytest.mark.parametrize("name", ["UNet", "ResNet", "DilResNet", "SimpleConvSeries", "ModelWrapper", "GroupAverage"])
def test_jit_vmap_grad(name):
    D = 2
    if name == "ModelWrapper":
        model = models.ModelWrapper(D, eqx.nn.Conv(D, 4, 3, 3, padding="SAME", key=jr.PRNGKey(0)), OUT_SIG, True)
    elif name == "GroupAverage":
        model = models.GroupAverage(build("ResNet", D, equivariant=False), geom.make_all_operators(D)[:4], True)
    elif name == "DilResNet":  # gelu: the default relu leaves dead units at this tiny size
        model = build(name, D, activation_f="gelu")
    else:
        model = build(name, D)
    xb, yb = random_image(D, batch=(2,), seed=1), random_image(D, OUT_SIG, batch=(2,), seed=2)
    # the batched outputs come out of the gradient's program (one compile less per model)
    (loss, both), grads = eqx.filter_jit(eqx.filter_value_and_grad(_loss_and_outputs, has_aux=True))(model, xb, yb)
    blocks = parameter_blocks(grads)
    assert blocks and np.isfinite(float(loss))
    assert all(np.all(np.isfinite(b)) for b in blocks)
    # every parameter array gets a gradient (a model part left out of the graph would not)
    assert sum(np.any(b != 0) for b in blocks) >= 0.9 * len(blocks), [np.any(b != 0) for b in blocks]
    # the batched forward pass equals the unbatched one
    one = eqx.filter_jit(lambda m, x: m(x)[0])(model, geom.MultiImage({k: v[0] for k, v in xb.items()}, D))
    for k in one.keys():
        assert rel_l2(both[k][0], one[k]) < 1e-5


def test_training_lowers_loss():
    D = 2
    teacher = build("UNet", D, key=jr.PRNGKey(11))
    student = build("UNet", D, key=jr.PRNGKey(12))
    xb = random_image(D, batch=(4,), seed=5)
    yb, _ = eqx.filter_vmap(lambda m, x: m(x), in_axes=(None, 0))(teacher, xb)
    opt = optax.adam(1e-2)
    opt_state = opt.init(eqx.filter(student, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(_loss)(model, xb, yb)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for _ in range(15):
        student, opt_state, loss = step(student, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------
# models go through ConvContract and its backend selection
# ---------------------------------------------------------------------------------------------
def test_models_use_conv_contract_backends():
    D = 2
    model = build("ResNet", D, gn=False)
    convs = [n for n in jax.tree_util.tree_leaves(model, is_leaf=lambda n: isinstance(n, layers.ConvContract)) if isinstance(n, layers.ConvContract)]
    assert len(convs) == 6
    x = random_image(D)
    call = lambda m, x: m(x)[0]
    with jax.default_matmul_precision("highest"):
        with kernels.use_backend("reference"):
            ref = eqx.filter_jit(call)(model, x)
        with kernels.use_backend("dense"):
            dense = eqx.filter_jit(call)(model, x)
    assert rel_multi(dense, ref) < 1e-5


# ---------------------------------------------------------------------------------------------
# convertD: 2D model -> 3D model
# ---------------------------------------------------------------------------------------------
def test_convertD_unet_to_3d_stays_equivariant():
    model2 = build("UNet", 2, gn=True)
    model3 = model2.convertD(filters(3, 3), geom.Rescaling.VOLUME, jr.PRNGKey(5), upsample_filters=filters(3, 2))
    assert model3.D == 3 and isinstance(model3, models.UNet)
    x3 = random_image(3)
    y3, _ = model3(x3)
    assert y3[VECTOR].shape == (1, N, N, N, 3)
    check_equivariant("UNet+GN convertD 2->3 (VOLUME)", model3, x3, sample_ops(3))
    # non-conv arrays are copied over (e.g. the nonlinearity's channel mixing)
    vn2 = model2.embedding[0].nonlinearity.weights[VECTOR]
    vn3 = model3.embedding[0].nonlinearity.weights[VECTOR]
    assert np.array_equal(np.asarray(vn2), np.asarray(vn3))
    with pytest.raises(ValueError, match="upsample_filters"):
        model2.convertD(filters(3, 3), geom.Rescaling.VOLUME, jr.PRNGKey(5))


@pytest.mark.parametrize("name", ["ResNet", "DilResNet", "SimpleConvSeries"])
def test_convertD_keeps_weights(name):
    model2 = build(name, 2, gn=True)
    model3 = model2.convertD(filters(3, 3), geom.Rescaling.NO_SCALING, jr.PRNGKey(5))
    assert model3.D == 3
    is_conv = lambda n: isinstance(n, layers.ConvContract)
    convs2 = [c for c in jax.tree_util.tree_leaves(model2, is_leaf=is_conv) if is_conv(c)]
    convs3 = [c for c in jax.tree_util.tree_leaves(model3, is_leaf=is_conv) if is_conv(c)]
    w2 = convs2[0].weights[VECTOR][VECTOR]  # k=2 filters: 5 in 2D, 8 in 3D
    w3 = convs3[0].weights[VECTOR][VECTOR]
    assert w2.shape[-1] == 5 and w3.shape[-1] == 8
    assert np.array_equal(np.asarray(w3[..., :3]), np.asarray(w2[..., :3]))  # centre + offcentre
    assert np.allclose(np.asarray(w3[..., 3]), np.asarray(jnp.mean(w2[..., 1:3], axis=-1)))
    assert np.array_equal(np.asarray(convs3[0].bias[SCALAR]), np.asarray(convs2[0].bias[SCALAR]))
    check_equivariant(f"{name}+GN convertD 2->3", model3, random_image(3), sample_ops(3)[:2])


def test_convertD_compatibility_on_orthoplex_filters():
    # orthoplex (|pixel|_1 <= 1) filters: the subset of the side-3 bank supported on the L1 ball
    keep2 = {(0, 0): (0, 1), (1, 0): (0,), (2, 0): (0, 1)}
    keep3 = {(0, 0): (0, 1), (1, 0): (0,), (2, 0): (0, 1)}
    model2 = models.SimpleConvSeries(IN_SIG, OUT_SIG, filters(2, 3, keep2), 2, 2, "auto", "gelu", jr.PRNGKey(0))
    new_filters = filters(3, 3, keep3)
    model3 = model2.convertD(new_filters, geom.Rescaling.COMPATIBILITY, jr.PRNGKey(1))
    check_equivariant("SimpleConvSeries convertD 2->3 (COMPATIBILITY)", model3, random_image(3), sample_ops(3)[:2])
    # compatibility: the 3D weighted scalar filter summed over the new axis is the 2D one
    w2 = model2.layers[0].conv.weights[SCALAR][SCALAR]
    w3 = model3.layers[0].conv.weights[SCALAR][SCALAR]
    f2 = jnp.tensordot(w2, filters(2, 3, keep2)[SCALAR], axes=1)
    f3 = jnp.tensordot(w3, new_filters[SCALAR], axes=1).sum(axis=2)
    assert rel_l2(f3, f2) < 1e-4


def test_convertD_bad_use():
    with pytest.raises(ValueError, match="only equivariant"):
        build("ResNet", 2, equivariant=False).convertD(filters(3, 3), geom.Rescaling.VOLUME, jr.PRNGKey(0))
    with pytest.raises(NotImplementedError, match="spin_embed"):
        build("SimpleConvSeries", 2).convertD(filters(3, 3), geom.Rescaling.SPIN_EMBED, jr.PRNGKey(0))
    with pytest.raises(NotImplementedError, match="does not implement convertD"):
        models.AnyDimensionalModel().convertD(filters(3, 3), geom.Rescaling.VOLUME, jr.PRNGKey(0))
    assert models.LastStepIdentity(True).convertD(filters(3, 3), geom.Rescaling.VOLUME, jr.PRNGKey(0)).residual


# ---------------------------------------------------------------------------------------------
# weight-rescaling helpers
# ---------------------------------------------------------------------------------------------
def test_scaled_filters_and_filter_sum(rng):
    block = jnp.asarray(fixture_filters(2, 3)[(2, 0)])  # (5, 3, 3, 2, 2)
    w = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32)
    scaled = models.get_scaled_filters(2, block, w)
    assert scaled.shape == (3, 4, 5, 3, 3, 2, 2)
    assert rel_l2(scaled, np.einsum("oif,fxyab->oifxyab", w, block)) < 1e-6
    total = np.einsum("oif,fxyab->oiab", np.asarray(w, np.float64), np.asarray(block, np.float64))
    expected = np.linalg.norm(total.reshape(3, 4, -1), axis=-1)
    assert rel_l2(models.get_filter_sum(2, block, w), expected) < 1e-5
    with pytest.raises(ValueError, match="n_filters=5"):
        models.get_scaled_filters(2, block, w[..., :4])


def test_volume_rescale_matches_filter_sums(rng):
    f2, f3 = filters(2, 3), filters(3, 3)
    old = jnp.asarray(rng.uniform(0.1, 1.0, (2, 3, 3)), jnp.float32)
    new = models.AnyDimensionalModel._extend_weights(old, SCALAR, f2, f3)
    assert new.shape == (2, 3, 4)
    assert np.allclose(np.asarray(new[..., 3]), np.asarray(jnp.mean(old[..., 1:], axis=-1)))
    scaled = models.AnyDimensionalModel.volume_rescale_weights((f2[SCALAR], old, 2), (f3[SCALAR], new, 3))
    assert rel_l2(models.get_filter_sum(3, f3[SCALAR], scaled), models.get_filter_sum(2, f2[SCALAR], old)) < 1e-4


def test_compat_flex_collapses_scalar_filters(rng):
    f2, f3 = filters(2, 3), filters(3, 3)
    old = jnp.asarray(rng.standard_normal((2, 3, 3)), jnp.float32)
    new = models.AnyDimensionalModel.compat_flex_rescale_weights((f2[SCALAR], old, 2), (f3[SCALAR], old, 3))
    assert new.shape == (2, 3, 4)
    # the 3D weighted filter summed along any axis is the 2D weighted filter
    old_filter = jnp.tensordot(old, f2[SCALAR], axes=1)
    new_filter = jnp.tensordot(new, f3[SCALAR], axes=1)
    for axis in (2, 3, 4):
        assert rel_l2(new_filter.sum(axis=axis), old_filter) < 1e-5
    with pytest.raises(ValueError, match="new D = old D \\+ 1"):
        models.AnyDimensionalModel.compat_flex_rescale_weights((f2[SCALAR], old, 2), (f2[SCALAR], old, 2))


def test_compatibility_rescalings_agree_on_orthoplex_scalars(rng):
    # side-3 scalar filters on the L1 ball: centre and first shell, in 2D and 3D
    f2 = jnp.asarray(fixture_filters(2, 3)[(0, 0)][:2])
    f3 = jnp.asarray(fixture_filters(3, 3)[(0, 0)][:2])
    old = jnp.asarray(rng.uniform(0.1, 1.0, (2, 3, 2)), jnp.float32)
    dim = models.AnyDimensionalModel
    by_norm = dim.compatibility_norm_rescale_weights((f2, old, 2), (f3, old, 3))
    exact = dim.compatibility_rescale_weights((f2, old, 2), (f3, old, 3))
    assert rel_l2(by_norm, exact) < 1e-5
    # the 3D weighted filter summed over the added axis is the 2D one
    assert rel_l2(jnp.tensordot(exact, f3, axes=1).sum(axis=2), jnp.tensordot(old, f2, axes=1)) < 1e-5
    with pytest.raises(ValueError, match="as many new filters as old"):
        dim.compatibility_rescale_weights((f2, old, 2), (jnp.asarray(fixture_filters(3, 3)[(0, 0)]), old, 3))


def test_count_params():
    D = 2
    block = models.ConvBlock(D, IN_SIG, OUT_SIG, conv_filters=filters(D, 3), use_group_norm=True, key=jr.PRNGKey(0))
    conv = block.conv
    n_conv = sum(int(w.size) for ws in conv.weights.values() for w in ws.values()) + sum(int(b.size) for b in conv.bias.values())
    n_norm = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(block.group_norm, eqx.is_array)))
    n_act = int(block.nonlinearity.weights[VECTOR].size)
    assert models.count_params(block) == n_conv + n_norm + n_act
    # the filter bank is not a parameter: a static FilterBank leaf, no array
    total = sum(int(a.size) for a in jax.tree_util.tree_leaves(eqx.filter(block, eqx.is_array)))
    assert total == models.count_params(block)
    assert isinstance(conv.invariant_filters, layers.FilterBank)


# ---------------------------------------------------------------------------------------------
# small models and helpers
# ---------------------------------------------------------------------------------------------
def test_last_step_identity_and_model_wrapper():
    D = 2
    x = random_image(D)
    y, aux = models.LastStepIdentity()(x, "aux")
    assert aux == "aux" and np.array_equal(np.asarray(y[SCALAR]), np.asarray(x[SCALAR][-1:]))
    z, _ = models.LastStepIdentity(residual=True)(x)
    assert z[VECTOR].shape == (1, N, N, D) and not np.any(np.asarray(z[VECTOR]))

    conv = eqx.nn.Conv(D, 4, 3, 3, padding="SAME", key=jr.PRNGKey(0))
    wrapped = models.ModelWrapper(D, conv, OUT_SIG, True)
    out, _ = wrapped(x)
    manual = geom.MultiImage({SCALAR: conv(x.to_scalar_multi_image()[SCALAR])}, D).from_scalar_multi_image(OUT_SIG)
    assert rel_multi(out, manual) == 0.0
    with pytest.raises(ValueError, match="returned 3 channels"):
        models.ModelWrapper(D, conv, IN_SIG, True)(x)
    with pytest.raises(TypeError, match="`model`"):
        models.ModelWrapper(D, 3, OUT_SIG, True)


def test_handle_activation_and_make_conv():
    D = 2
    act = models.handle_activation("relu", True, IN_SIG, D, jr.PRNGKey(0))
    assert isinstance(act, layers.VectorNeuronNonlinear) and act.scalar_activation is jax.nn.relu
    plain = models.handle_activation("tanh", False, IN_SIG, D, jr.PRNGKey(0))
    x = random_image(D)
    assert rel_l2(plain(x)[SCALAR], np.tanh(np.asarray(x[SCALAR]))) < 1e-6
    assert rel_multi(models.handle_activation(None, True, IN_SIG, D, None)(x), x) == 0.0
    with pytest.raises(ValueError, match="`activation_f` \\('swish'\\)|`activation_f` \\(='swish'\\)"):
        models.handle_activation("swish", True, IN_SIG, D, jr.PRNGKey(0))
    assert set(models.ACTIVATION_REGISTRY) == {"relu", "gelu", "tanh"}

    conv = models.make_conv(D, IN_SIG, OUT_SIG, "auto", True, filters(D, 3), key=jr.PRNGKey(0))
    assert isinstance(conv, layers.ConvContract)
    flat_sig = geom.Signature(((SCALAR, 4),))
    up = models.make_conv(D, flat_sig, flat_sig, True, False, None, 2, 2, "VALID", (2, 2), key=jr.PRNGKey(0))
    assert isinstance(up.modules[SCALAR], eqx.nn.ConvTranspose)
    assert up(random_image(D, flat_sig))[SCALAR].shape == (4, 2 * N, 2 * N)
    with pytest.raises(ValueError, match="single scalar key"):
        models.make_conv(D, IN_SIG, OUT_SIG, True, False, None, 3, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`invariant_filters` \\(=None\\)"):
        models.make_conv(D, IN_SIG, OUT_SIG, True, True, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`kernel_size` \\(=None\\)"):
        models.make_conv(D, flat_sig, flat_sig, True, False, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`use_bias` \\(='mean'\\)"):
        models.make_conv(D, flat_sig, flat_sig, "mean", False, None, 3, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="D=3, but `D` \\(=2\\)"):
        models.make_conv(D, IN_SIG, OUT_SIG, True, True, filters(3, 3), key=jr.PRNGKey(0))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_bad_input_errors():
    unet = build("UNet", 2, levels=2)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*num_downsamples \\(=4"):
        unet(random_image(2, n=6))
    wrong = geom.Signature(((SCALAR, 3), (VECTOR, 1)))
    for model in (unet, build("ResNet", 2), build("DilResNet", 2), build("SimpleConvSeries", 2)):
        with pytest.raises(ValueError, match="signature"):
            model(random_image(2, wrong))
        with pytest.raises(ValueError, match="unbatched"):
            model(random_image(2, batch=(2,)))
        with pytest.raises(ValueError, match="`x.D` \\(=3\\)"):
            model(random_image(3))
    with pytest.raises(ValueError, match="`upsample_filters` \\(=None\\)"):
        models.UNet(2, IN_SIG, OUT_SIG, 2, conv_filters=filters(2, 3), key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`conv_filters` \\(=None\\)"):
        models.ResNet(2, IN_SIG, OUT_SIG, 2, key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`key` \\(=None\\)"):
        models.DilResNet(2, IN_SIG, OUT_SIG, 2, conv_filters=filters(2, 3))
    with pytest.raises(ValueError, match="`num_conv` \\(=0\\)"):
        models.UNet(2, IN_SIG, OUT_SIG, 2, num_conv=0, conv_filters=filters(2, 3), upsample_filters=filters(2, 2), key=jr.PRNGKey(0))
    with pytest.raises(ValueError, match="`depth` \\(=0\\)"):
        models.SimpleConvSeries(IN_SIG, OUT_SIG, filters(2, 3), 2, 0, True, None, jr.PRNGKey(0))

