"""Functional geometric-image ops and GeometricImage against NumPy references."""

import itertools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import ginjax.geometric as geom

HIGHEST = jax.lax.Precision.HIGHEST


def rand(rng, shape):
    return rng.normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# NumPy reference convolutions (loops over filter taps)


def _pad_image(image, D, filter_dims, is_torus, padding, rhs_dilation):
    """Pad the spatial axes (2..2+D) of image as the chosen padding mode prescribes."""
    half = [((m - 1) // 2) * d for m, d in zip(filter_dims, rhs_dilation)]
    if padding is None:
        padding = "TORUS" if any(is_torus) else "SAME"
    for axis in range(D):
        if padding == "TORUS" or padding == "SAME":
            mode = "wrap" if (padding == "TORUS" and is_torus[axis]) else "constant"
            pads = (half[axis], half[axis])
        elif padding == "VALID":
            mode, pads = "constant", (0, 0)
        else:
            mode, pads = "constant", tuple(padding[axis])
        widths = [(0, 0)] * image.ndim
        widths[2 + axis] = pads
        image = np.pad(image, widths, mode=mode)
    return image


def reference_correlate(image, filt, D, is_torus, padding=None, stride=1, rhs_dilation=1):
    """out[b,o,x,i,j] = sum_{c,y} image_padded[b,c,x*s+y*dil,i] * filt[o,c,y,j]."""
    stride = (stride,) * D if isinstance(stride, int) else stride
    rhs_dilation = (rhs_dilation,) * D if isinstance(rhs_dilation, int) else rhs_dilation
    B, C = image.shape[:2]
    O = filt.shape[0]
    filter_dims = filt.shape[2 : 2 + D]
    ki, kf = image.ndim - 2 - D, filt.ndim - 2 - D
    padded = _pad_image(image, D, filter_dims, is_torus, padding, rhs_dilation)
    padded = padded.reshape(padded.shape[: 2 + D] + (-1,))
    flat_filter = filt.reshape(filt.shape[: 2 + D] + (-1,))
    out_dims = [
        (padded.shape[2 + a] - (filter_dims[a] - 1) * rhs_dilation[a] - 1) // stride[a] + 1
        for a in range(D)
    ]
    out = np.zeros((B, O) + tuple(out_dims) + (padded.shape[-1], flat_filter.shape[-1]))
    for tap in itertools.product(*(range(m) for m in filter_dims)):
        window = tuple(
            slice(t * d, t * d + (n - 1) * s + 1, s)
            for t, d, n, s in zip(tap, rhs_dilation, out_dims, stride)
        )
        patch = padded[(slice(None), slice(None)) + window]
        weights = flat_filter[(slice(None), slice(None)) + tap]
        out += np.einsum("bc...i,ocj->bo...ij", patch, weights)
    return out.reshape((B, O) + tuple(out_dims) + (D,) * (ki + kf))


def reference_contract(image, filt, D, is_torus, **kwargs):
    """Correlate, then contract the image's tensor axes with the filter's leading ones."""
    ki = image.ndim - 2 - D
    full = reference_correlate(image, filt, D, is_torus, **kwargs)
    lead = full.shape[: 2 + D]
    Ti = D**ki
    full = full.reshape(lead + (Ti, Ti, -1))
    out = np.einsum("...iij->...j", full)
    return out.reshape(lead + filt.shape[2 + D + ki :])


# ---------------------------------------------------------------------------------------------
# convolutions


@pytest.mark.parametrize(
    "D,ki,kf,is_torus,padding,stride,dil",
    [
        (2, 0, 1, True, None, 1, 1),
        (2, 1, 1, (True, False), None, 1, 1),
        (2, 1, 0, False, "SAME", 2, 1),
        (2, 2, 0, True, "VALID", 1, 2),
        (2, 1, 1, True, ((1, 0), (2, 1)), 1, 1),
        (3, 1, 0, True, None, 1, 1),
        (3, 0, 1, (False, True, True), None, 1, 1),
    ],
)
def test_convolve_matches_reference(D, ki, kf, is_torus, padding, stride, dil):
    rng = np.random.default_rng(10)
    N = (7, 6) if D == 2 else (5, 4, 5)
    image = rand(rng, (2, 3) + N + (D,) * ki)
    filt = rand(rng, (2, 3) + (3,) * D + (D,) * kf)
    torus = is_torus if isinstance(is_torus, tuple) else (is_torus,) * D
    actual = geom.convolve(D, image, filt, is_torus, stride, padding, rhs_dilation=dil)
    expected = reference_correlate(image, filt, D, torus, padding, stride, dil)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "D,ki,kf,is_torus,padding",
    [(2, 1, 2, True, None), (2, 2, 2, False, None), (2, 1, 1, True, "VALID"), (3, 1, 2, True, None)],
)
def test_convolve_contract_matches_reference(D, ki, kf, is_torus, padding):
    rng = np.random.default_rng(11)
    N = (6, 5) if D == 2 else (4, 5, 3)
    image = rand(rng, (2, 3) + N + (D,) * ki)
    filt = rand(rng, (4, 3) + (3,) * D + (D,) * kf)
    actual = geom.convolve_contract(D, image, filt, is_torus, padding=padding)
    expected = reference_contract(image, filt, D, (is_torus,) * D, padding=padding)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_convolve_without_tensor_expand():
    rng = np.random.default_rng(12)
    image = rand(rng, (1, 2, 5, 5, 2))
    filt = rand(rng, (3, 2, 3, 3, 2, 2))
    expanded = geom.conv_contract_image_expand(2, image, 2)
    actual = geom.convolve(2, expanded, filt, True, tensor_expand=False)
    flat = reference_correlate(image, filt, 2, (True, True))  # (..., i, a, b)
    expected = np.einsum("...iij->...ij", flat.reshape(flat.shape[:4] + (2, 2, 2)))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D,N", [(2, 6), (3, 4)])
@pytest.mark.parametrize("filter_parity", [0, 1])
def test_convolve_contract_with_invariant_filter_is_equivariant(D, N, filter_parity):
    rng = np.random.default_rng(13 + D)
    operators = geom.make_all_operators(D)
    basis = geom.get_unique_invariant_filters(3, 2, filter_parity, D, operators)
    basis = jnp.stack([ff.data for ff in basis])  # (F, 3.., D, D)
    weights = rand(rng, (2, 3, len(basis)))
    filt = jnp.einsum("ocf,f...->oc...", weights, basis)
    image = jnp.array(rand(rng, (1, 3) + (N,) * D + (D,)))  # vectors, parity 0
    out = geom.convolve_contract(D, image, filt, True)
    for gg in operators[:: len(operators) // 8]:
        rotated_in = geom.times_group_element(D, image, 0, gg, (False,), HIGHEST)
        lhs = geom.convolve_contract(D, rotated_in, filt, True)
        rhs = geom.times_group_element(D, out, filter_parity, gg, (False,), HIGHEST)
        np.testing.assert_allclose(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_convolve_bad_inputs():
    image = jnp.ones((1, 1, 6, 6))
    even = jnp.ones((1, 1, 2, 2))
    with pytest.raises(ValueError, match="even"):
        geom.convolve(2, image, even, True)
    with pytest.raises(ValueError, match="even"):
        geom.convolve(2, image, even, False, padding="SAME")
    assert geom.convolve(2, image, even, True, padding=((0, 1), (0, 1))).shape == (1, 1, 6, 6)
    with pytest.raises(ValueError, match="in_c"):
        geom.convolve(2, jnp.ones((1, 2, 6, 6)), jnp.ones((1, 1, 3, 3)), True)
    with pytest.raises(ValueError, match="is_torus"):
        geom.convolve(2, image, jnp.ones((1, 1, 3, 3)), (True,))
    with pytest.raises(ValueError, match="padding"):
        geom.convolve(2, image, jnp.ones((1, 1, 3, 3)), True, padding="CIRCULAR")
    with pytest.raises(ValueError, match="tensor order"):
        geom.convolve_contract(2, jnp.ones((1, 1, 6, 6, 2, 2)), jnp.ones((1, 1, 3, 3, 2)), True)


def test_padding_helpers():
    assert geom.get_same_padding((3, 5), (1, 2)) == ((1, 1), (4, 4))
    assert geom.get_same_padding((3, 5), (1, 1), (False, True)) == ((0, 0), (2, 2))
    image = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape((2, 4, 3, 1))
    expanded, zero_pad = geom.get_torus_expanded(image, (True, False), (3, 3), (1, 1))
    assert expanded.shape == (2, 6, 3, 1) and zero_pad == ((0, 0), (1, 1))
    np.testing.assert_array_equal(expanded[:, 0], image[:, -1])
    with pytest.raises(ValueError, match="odd"):
        geom.get_torus_expanded(image, (True, True), (2, 3), (1, 1))


# ---------------------------------------------------------------------------------------------
# tensor algebra and pixel ops


def test_mul_is_pixelwise_tensor_product():
    rng = np.random.default_rng(20)
    a, b = rand(rng, (4, 4, 2)), rand(rng, (4, 4, 2, 2))
    np.testing.assert_allclose(geom.mul(2, a, b), np.einsum("xyi,xyjk->xyijk", a, b), rtol=1e-6)
    a3, b3 = rand(rng, (2, 4, 4, 2)), rand(rng, (3, 4, 4))
    ea, eb = geom.pre_tensor_product_expand(2, a3, b3, 1, 1)
    assert ea.shape == (2, 4, 4, 2) and eb.shape == (3, 4, 4, 2)


def test_contractions():
    rng = np.random.default_rng(21)
    data = rand(rng, (3, 2, 2, 2, 2))
    np.testing.assert_allclose(
        geom.multicontract(data, ((0, 2),), 1), np.einsum("xabad->xbd", data), rtol=1e-5
    )
    np.testing.assert_allclose(
        geom.multicontract(data, ((0, 3), (1, 2)), 1), np.einsum("xabba->x", data), rtol=1e-5
    )
    assert geom.get_contraction_indices(4, 0) == [((0, 1), (2, 3)), ((0, 2), (1, 3)), ((0, 3), (1, 2))]
    assert geom.get_contraction_indices(3, 1) == [((0, 1),), ((0, 2),), ((1, 2),)]
    assert geom.get_contraction_indices(3, 1, ((0, 1),)) == [((0, 1),), ((0, 2),)]
    with pytest.raises(ValueError, match="final_k"):
        geom.get_contraction_indices(3, 2)
    with pytest.raises(ValueError, match="indices"):
        geom.multicontract(data, ((0, 0),), 1)


def test_norm_pool_translate():
    rng = np.random.default_rng(22)
    data = rand(rng, (2, 4, 6, 2))
    np.testing.assert_allclose(geom.norm(3, data), np.linalg.norm(data, axis=-1), rtol=1e-6)
    assert geom.norm(3, data, keepdims=True).shape == (2, 4, 6, 1)
    image = data[0]
    avg = geom.average_pool(2, image, 2)
    np.testing.assert_allclose(avg, image.reshape(2, 2, 3, 2, 2).mean(axis=(1, 3)), rtol=1e-5)
    pooled = np.asarray(geom.max_pool(2, image, 2))
    for i, j in itertools.product(range(2), range(3)):
        patch = image[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 2)
        np.testing.assert_array_equal(pooled[i, j], patch[np.argmax(np.linalg.norm(patch, axis=1))])
    scalar = image[..., 0]
    np.testing.assert_array_equal(
        geom.max_pool(2, scalar, 2, use_norm=False), scalar.reshape(2, 2, 3, 2).max(axis=(1, 3))
    )
    np.testing.assert_array_equal(geom.translate(2, image, jnp.array([1, -2])), np.roll(image, (1, -2), (0, 1)))
    with pytest.raises(ValueError, match="patch_len"):
        geom.average_pool(2, image, 4)
    with pytest.raises(ValueError, match="use_norm"):
        geom.max_pool(2, image, 2, use_norm=False)


def test_tensor_times_gg_and_pixel_helpers():
    rng = np.random.default_rng(23)
    tensor = rand(rng, (3, 3))
    gg = geom.make_all_operators(3)[7]
    np.testing.assert_allclose(
        geom.tensor_times_gg(tensor, 1, gg, HIGHEST),
        np.linalg.det(gg) * gg @ tensor @ gg.T,
        atol=1e-6,
    )
    idxs = np.asarray(geom.pixel_idxs((2, 3)))
    np.testing.assert_array_equal(idxs, list(itertools.product(range(2), range(3))))
    rows, cols = geom.hash(2, (2, 3), np.array([[-1, 4], [2, 0]]))
    np.testing.assert_array_equal(rows, [1, 0]) and np.testing.assert_array_equal(cols, [1, 0])
    data = np.zeros((2, 3, 3, 2), np.float32)
    data[1, 0, 2, 1] = 0.5
    mask = np.asarray(geom.nonempty_pixels(2, jnp.array(data), 1))
    assert mask.shape == (2, 3, 3) and mask.sum() == 1 and mask[1, 0, 2]
    assert geom.parse_shape((4, 4, 2), 2) == ((4, 4), 1)
    with pytest.raises(ValueError, match="shape"):
        geom.parse_shape((4,), 2)


# ---------------------------------------------------------------------------------------------
# GeometricImage / GeometricFilter


def test_geometric_image_basics_and_errors():
    rng = np.random.default_rng(30)
    a = geom.GeometricImage(rand(rng, (4, 5, 2)), 3, 2, (True, False))
    b = geom.GeometricImage(rand(rng, (4, 5, 2)), 1, 2, (True, False))
    assert a.parity == 1 and a.k == 1 and a.spatial_dims == (4, 5) and a.covariant_axes == (False,)
    np.testing.assert_allclose((a + b).data, a.data + b.data)
    np.testing.assert_allclose((a - b).data, a.data - b.data)
    np.testing.assert_allclose((2.0 * a).data, 2 * a.data)
    prod = a * b
    assert prod.k == 2 and prod.parity == 0
    assert a == a.copy() and not (a == b)
    assert geom.GeometricImage.zeros((3, 4), 2, 0, 2).shape() == (3, 4, 2, 2)
    filled = geom.GeometricImage.fill(3, 0, 2, jnp.array([1.0, 2.0]))
    np.testing.assert_array_equal(filled.data[2, 1], [1.0, 2.0])
    np.testing.assert_allclose(prod.contract(0, 1).data, np.einsum("xyi,xyi->xy", a.data, b.data), rtol=1e-5)
    np.testing.assert_allclose(prod.transpose([1, 0]).data, np.swapaxes(prod.data, -1, -2))
    with pytest.raises(ValueError, match="D"):
        geom.GeometricImage(jnp.ones((4, 4, 3)), 0, 2)
    with pytest.raises(ValueError, match="is_torus"):
        geom.GeometricImage(jnp.ones((4, 4)), 0, 2, (True,))
    with pytest.raises(ValueError, match="parity"):
        a + geom.GeometricImage(a.data, 0, 2, (True, False))
    with pytest.raises(ValueError, match="equal"):
        geom.GeometricFilter(jnp.ones((3, 5)), 0, 2)


def test_geometric_image_ops():
    rng = np.random.default_rng(31)
    image = geom.GeometricImage(rand(rng, (6, 6, 2)), 0, 2)
    filt = geom.GeometricFilter(rand(rng, (3, 3)), 1, 2)
    conv = image.convolve_with(filt)
    assert conv.parity == 1 and conv.k == 1
    expected = reference_correlate(np.asarray(image.data)[None, None], np.asarray(filt.data)[None, None], 2, (True, True))
    np.testing.assert_allclose(conv.data, expected[0, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(image.norm().data, np.linalg.norm(image.data, axis=-1), rtol=1e-6)
    assert float(jnp.max(image.normalize().norm().data)) == pytest.approx(1.0, abs=1e-6)
    unpooled = image.unpool(2)
    assert unpooled.spatial_dims == (12, 12)
    np.testing.assert_array_equal(unpooled.average_pool(2).data, image.data)
    gg = geom.make_all_operators(2)[5]
    np.testing.assert_allclose(
        image.times_gg_precise(gg).data,
        geom.times_group_element(2, image.data, 0, gg, (False,), HIGHEST),
    )
    lc = image.levi_civita_contract(0)
    assert lc.parity == 1 and lc.k == 1
    np.testing.assert_allclose(lc.data, np.einsum("xyi,ij->xyj", image.data, np.asarray(geom.LeviCivitaSymbol.get(2))), rtol=1e-6)
    with pytest.raises(ValueError, match="k=0"):
        image.activation_function(jnp.tanh)


def test_geometric_image_is_pytree():
    image = geom.GeometricImage(jnp.arange(8.0).reshape(2, 2, 2), 1, 2, (True, False))
    doubled = jax.jit(lambda im: im * 2.0)(image)
    assert isinstance(doubled, geom.GeometricImage) and doubled.parity == 1
    assert doubled.is_torus == (True, False)
    np.testing.assert_array_equal(doubled.data, 2 * np.arange(8.0).reshape(2, 2, 2))


def test_filter_rectify_and_bigness():
    data = np.zeros((3, 3, 2), np.float32)
    data[0, 1] = [-1.0, 0.0]  # points to the centre: "inward"
    data[2, 1] = [1.0, 0.0]
    outward = geom.GeometricFilter(jnp.array(data), 0, 2)
    assert outward.rectify() == outward  # already outward
    assert geom.GeometricFilter(jnp.array(-data), 0, 2).rectify() == outward
    scalar = geom.GeometricFilter(jnp.array(-np.ones((3, 3), np.float32)), 0, 2)
    assert float(jnp.sum(scalar.rectify().data)) > 0
    centre = np.zeros((3, 3), np.float32)
    centre[1, 1] = 1
    ring = np.ones((3, 3), np.float32)
    ring[1, 1] = 0
    assert geom.GeometricFilter(jnp.array(centre), 0, 2) < geom.GeometricFilter(jnp.array(ring), 0, 2)
    assert geom.GeometricFilter(jnp.array(centre), 0, 2).bigness() == pytest.approx(np.sqrt(2))
