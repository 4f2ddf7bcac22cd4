"""MultiImage and Signature: construction, pytree behaviour, arithmetic and reshaping."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import ginjax.geometric as geom

HIGHEST = jax.lax.Precision.HIGHEST
SCALAR, VECTOR, PSEUDO_TENSOR = ((), 0), ((False,), 0), ((False, False), 1)


def rand(rng, shape):
    return jnp.array(rng.normal(size=shape).astype(np.float32))


def make_multi_image(rng, D=2, N=(6, 5), channels=(2, 3, 1), batch=None, is_torus=True):
    lead = () if batch is None else (batch,)
    # insert out of sorted order on purpose: the key order must be kept
    data = {
        (1, 0): rand(rng, lead + (channels[1],) + N + (D,)),
        (0, 0): rand(rng, lead + (channels[0],) + N),
        (2, 3): rand(rng, lead + (channels[2],) + N + (D, D)),
    }
    return geom.MultiImage(data, D, is_torus)


def test_keys_are_normalized_and_ordered():
    x = make_multi_image(np.random.default_rng(0))
    assert list(x.keys()) == [VECTOR, SCALAR, PSEUDO_TENSOR]
    assert x.is_torus == (True, True)
    assert (1, 0) in x and VECTOR in x and (0, 1) not in x and "nonsense" not in x
    np.testing.assert_array_equal(x[(1, 0)], x[VECTOR])
    assert x.get_n_leading() == 1 and x.get_spatial_dims() == (6, 5) and x.get_L() == 3
    assert x.get_signature() == ((VECTOR, 3), (SCALAR, 2), (PSEUDO_TENSOR, 1))
    assert x.get_signature_dict()[SCALAR] == 2
    assert x.size() == sum(int(b.size) for b in x.values())


def test_signature_and_union():
    sig = geom.Signature((((0, 0), 2), (((False,), 1), 3)))
    assert sig == ((SCALAR, 2), (((False,), 1), 3))
    union = geom.signature_union(sig, geom.Signature((((1, 0), 1), ((0, 0), 5))), 4)
    assert set(union) == {(SCALAR, 4), (((False,), 1), 4), (VECTOR, 4)}
    with pytest.raises(ValueError, match="channels"):
        geom.Signature((((0, 0), -1),))


def test_pytree_round_trip_keeps_order_and_static_data():
    x = make_multi_image(np.random.default_rng(1), is_torus=(True, False))
    leaves, treedef = jax.tree_util.tree_flatten(x)
    assert len(leaves) == 3
    for leaf, block in zip(leaves, x.values()):
        assert leaf is block
    y = jax.tree_util.tree_unflatten(treedef, leaves)
    assert list(y.keys()) == list(x.keys()) and y.is_torus == (True, False) and y.D == 2
    assert y == x
    z = jax.jit(lambda m: m * 3.0)(x)
    assert list(z.keys()) == list(x.keys()) and z.is_torus == x.is_torus
    for key in x.keys():
        np.testing.assert_allclose(z[key], 3 * x[key], rtol=1e-6)


def test_vmap_over_batched_multi_image():
    rng = np.random.default_rng(2)
    x = make_multi_image(rng, batch=4)
    filt = rand(rng, (2, 3, 3, 3, 2, 2))  # vector -> vector via a 2-tensor filter

    def layer(m):
        out = m.empty()
        conv = geom.convolve_contract(2, m[VECTOR][None], filt, m.is_torus)[0]
        out.append(1, 0, conv)
        out.append(0, 0, m[SCALAR] * m.get_spatial_dims()[0])
        return out

    batched = jax.vmap(layer)(x)
    assert batched.get_n_leading() == 2 and list(batched.keys()) == [VECTOR, SCALAR]
    for b in range(4):
        single = layer(x.get_one(b, keepdims=False))
        for key in single.keys():
            np.testing.assert_allclose(batched[key][b], single[key], rtol=1e-5, atol=1e-5)


def test_grad_through_multi_image():
    x = make_multi_image(np.random.default_rng(3))
    grads = jax.grad(lambda m: sum(jnp.sum(b**2) for b in m.values()))(x)
    for key in x.keys():
        np.testing.assert_allclose(grads[key], 2 * x[key], rtol=1e-6)


def test_arithmetic():
    rng = np.random.default_rng(4)
    x, y = make_multi_image(rng), make_multi_image(rng)
    reordered = geom.MultiImage({key: y[key] for key in reversed(list(y.keys()))}, 2)
    for key in x.keys():
        np.testing.assert_allclose((x + y)[key], x[key] + y[key])
        np.testing.assert_allclose((x + reordered)[key], x[key] + y[key])
        np.testing.assert_allclose((x - y)[key], x[key] - y[key])
        np.testing.assert_allclose((x * 2.5)[key], x[key] * 2.5, rtol=1e-6)
        np.testing.assert_allclose((x / 4.0)[key], x[key] / 4.0, rtol=1e-6)
    assert x == x.copy() and not (x == y)
    with pytest.raises(ValueError, match="keys"):
        x + geom.MultiImage({(0, 0): x[SCALAR]}, 2)
    with pytest.raises(ValueError, match="is_torus"):
        x + geom.MultiImage(dict(x.items()), 2, False)
    with pytest.raises(TypeError, match="number"):
        x * x


def test_concat_and_inverse():
    rng = np.random.default_rng(5)
    a = make_multi_image(rng, channels=(2, 3, 1))
    b = geom.MultiImage({(0, 0): rand(rng, (4, 6, 5)), (1, 1): rand(rng, (2, 6, 5, 2))}, 2)
    joined = a.concat(b)
    assert joined.get_signature_dict() == {VECTOR: 3, SCALAR: 6, PSEUDO_TENSOR: 1, ((False,), 1): 2}
    back_a, back_b = joined.concat_inverse(b.get_signature())
    assert back_a == a and back_b.get_signature_dict() == b.get_signature_dict()
    for key in b.keys():
        np.testing.assert_array_equal(back_b[key], b[key])
    batched = make_multi_image(rng, batch=2)
    joined1 = batched.concat(batched, axis=1)
    assert joined1[SCALAR].shape == (2, 4, 6, 5)
    with pytest.raises(ValueError, match="axis"):
        a.concat(a, axis=1)


def test_vector_and_scalar_round_trips():
    rng = np.random.default_rng(6)
    x = make_multi_image(rng)
    vector = x.to_vector()
    assert vector.shape == (x.size(),)
    assert geom.MultiImage.from_vector(vector, x) == x
    np.testing.assert_array_equal(vector[: x[VECTOR].size], x[VECTOR].reshape(-1))
    scalars = x.to_scalar_multi_image()
    assert list(scalars.keys()) == [SCALAR] and scalars[SCALAR].shape == (3 * 2 + 2 + 1 * 4, 6, 5)
    assert scalars.from_scalar_multi_image(x.get_signature()) == x
    with pytest.raises(ValueError, match="vector"):
        geom.MultiImage.from_vector(vector[:-1], x)


def test_images_round_trip():
    x = make_multi_image(np.random.default_rng(7))
    images = x.to_images()
    assert len(images) == 6 and images[0].k == 1 and images[-1].parity == 1
    rebuilt = geom.MultiImage.from_images(images)
    assert rebuilt == x


def test_subsets_and_reshapes():
    rng = np.random.default_rng(8)
    x = make_multi_image(rng, batch=4, channels=(6, 6, 6))
    subset = x.get_subset(jnp.array([2, 0]))
    np.testing.assert_array_equal(subset[SCALAR], x[SCALAR][jnp.array([2, 0])])
    assert x.get_one(1)[VECTOR].shape == (1, 6, 6, 5, 2)
    assert x.get_one(1, keepdims=False)[VECTOR].shape == (6, 6, 5, 2)
    expanded = x.expand(1, 3)
    assert expanded[PSEUDO_TENSOR].shape == (4, 2, 3, 6, 5, 2, 2)
    assert expanded.combine_axes([1, 2]) == x
    with pytest.raises(TypeError, match="idxs"):
        x.get_subset(1)
    with pytest.raises(ValueError, match="consecutive"):
        x.combine_axes([0, 2])


def test_group_action_norm_and_pool():
    rng = np.random.default_rng(9)
    x = make_multi_image(rng, N=(4, 6), is_torus=(True, False))
    operators = geom.make_all_operators(2)
    g1, g2 = operators[5], operators[3]  # a swap of axes, then a flip
    rotated = x.times_gg_precise(g1)
    assert rotated.is_torus == (False, True) and rotated.get_spatial_dims() == (6, 4)
    for (k, parity), block in x.items():
        np.testing.assert_allclose(
            rotated[(k, parity)], geom.times_group_element(2, block, parity, g1, k, HIGHEST)
        )
    composed = x.times_gg_precise(g1 @ g2)
    assert composed == x.times_gg_precise(g2).times_gg_precise(g1)
    normed = x.norm()
    assert normed.get_signature() == ((SCALAR, 6),)
    np.testing.assert_allclose(normed[SCALAR][:3], jnp.linalg.norm(x[VECTOR], axis=-1), rtol=1e-6)
    pooled = x.average_pool(2)
    np.testing.assert_allclose(
        pooled[VECTOR][1], geom.average_pool(2, x[VECTOR][1], 2), rtol=1e-6
    )


def test_get_component():
    rng = np.random.default_rng(10)
    density, velocity = rand(rng, (2, 4, 4)), rand(rng, (2, 4, 4, 2))  # 2 future steps
    x = geom.MultiImage({(0, 0): density, (1, 0): velocity}, 2)
    np.testing.assert_array_equal(x.get_component(0, 2)[SCALAR], density)
    np.testing.assert_array_equal(x.get_component(2, 2)[SCALAR], velocity[..., 1])
    batched = geom.MultiImage({(0, 0): density[None], (1, 0): velocity[None]}, 2)
    np.testing.assert_array_equal(batched.batch_get_component(1, 2)[SCALAR][0], velocity[..., 0])


def test_bad_input_raises():
    rng = np.random.default_rng(11)
    with pytest.raises(ValueError, match="key"):
        geom.MultiImage({("a", 0): jnp.ones((1, 4, 4))}, 2)
    with pytest.raises(ValueError, match="key"):
        geom.MultiImage({((1,), 0): jnp.ones((1, 4, 4, 2))}, 2)
    with pytest.raises(ValueError, match="`D`"):
        geom.MultiImage({(0, 0): jnp.ones((1, 4, 4))}, 0)
    with pytest.raises(ValueError, match="tensor axes"):
        geom.MultiImage({(1, 0): jnp.ones((1, 4, 4, 3))}, 2)
    with pytest.raises(ValueError, match="spatial dims"):
        geom.MultiImage({(0, 0): jnp.ones((1, 4, 4)), (1, 0): jnp.ones((1, 4, 5, 2))}, 2)
    with pytest.raises(ValueError, match="is_torus"):
        geom.MultiImage({(0, 0): jnp.ones((1, 4, 4))}, 2, (True,))
    x = make_multi_image(rng)
    with pytest.raises(ValueError, match="spatial dims"):
        x.append(1, 1, rand(rng, (1, 6, 4, 2)))
    with pytest.raises(ValueError, match="concatenated"):
        x.append(0, 0, rand(rng, (1, 6, 4)))
    with pytest.raises(KeyError):
        x[(3, 0)]
    with pytest.raises(ValueError, match="images"):
        geom.MultiImage.from_images([])
    with pytest.raises(NotImplementedError, match="metric"):
        x.raise_all()
