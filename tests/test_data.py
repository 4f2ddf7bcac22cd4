"""ginjax.data on hand-built time series whose values name their field, step and pixel."""

import jax.numpy as jnp
import numpy as np
import pytest

import ginjax.geometric as geom
from ginjax import data

D = 2
SCALAR, VECTOR = ((), 0), ((False,), 0)
PIXEL = np.array([[0.0, 0.1], [0.2, 0.3]], np.float32)  # 2x2 image, mean 0.15


def scalar_series(n_fields, total_steps, offset=0.0):
    """Channel (field f, step t) holds 100 f + t + offset + the pixel's own value."""
    return np.stack(
        [100.0 * f + t + offset + PIXEL for f in range(n_fields) for t in range(total_steps)]
    ).astype(np.float32)


def value_of(field, step, offset=0.0):
    return 100.0 * field + step + offset + PIXEL


def test_time_series_idxs_hand_checked():
    inputs, outputs = data.time_series_idxs(2, 1, 1, 5)
    np.testing.assert_array_equal(inputs, [[0, 1], [1, 2], [2, 3]])
    np.testing.assert_array_equal(outputs, [[2], [3], [4]])

    inputs, outputs = data.time_series_idxs(2, 1, 2, 7)
    np.testing.assert_array_equal(inputs, [[0, 2], [1, 3], [2, 4]])
    np.testing.assert_array_equal(outputs, [[4], [5], [6]])

    inputs, outputs = data.time_series_idxs(1, 2, 1, 4)
    np.testing.assert_array_equal(inputs, [[0], [1]])
    np.testing.assert_array_equal(outputs, [[1, 2], [2, 3]])

    inputs, outputs = data.time_series_idxs(1, 2, 2, 7)
    np.testing.assert_array_equal(inputs, [[0], [1], [2]])
    np.testing.assert_array_equal(outputs, [[2, 4], [3, 5], [4, 6]])


@pytest.mark.parametrize(
    "args, message",
    [
        ((2, 1, 1, 2), "`total_steps` (=2) is too short"),
        ((0, 1, 1, 5), "`past_steps` (=0)"),
        ((1, 1, 0, 5), "`delta_t` (=0)"),
    ],
)
def test_time_series_idxs_errors(args, message):
    with pytest.raises(ValueError) as info:
        data.time_series_idxs(*args)
    assert message in str(info.value)


def test_times_series_to_multi_images_hand_built():
    vector_series = np.stack([np.stack([value_of(0, t), -value_of(0, t)], -1) for t in range(5)])
    dynamic = geom.MultiImage(
        {SCALAR: jnp.asarray(scalar_series(2, 5)), VECTOR: jnp.asarray(vector_series)}, D
    )
    constant = geom.MultiImage(
        {SCALAR: jnp.full((1, 2, 2), 7.0), ((False, False), 1): jnp.ones((1, 2, 2, 2, 2))}, D
    )
    X, Y = data.times_series_to_multi_images(dynamic, constant, 5, 2, 1, skip_initial=1)

    # time steps 1..4 remain: windows read (1, 2) -> 3 and (2, 3) -> 4
    assert list(X.keys()) == [SCALAR, VECTOR, ((False, False), 1)]
    assert X[SCALAR].shape == (2, 5, 2, 2) and Y[SCALAR].shape == (2, 2, 2, 2)
    for w, (a, b, target) in enumerate([(1, 2, 3), (2, 3, 4)]):
        # channels (field 0: a, b), (field 1: a, b), then the constant field
        for c, (field, step) in enumerate([(0, a), (0, b), (1, a), (1, b)]):
            np.testing.assert_allclose(X[SCALAR][w, c], value_of(field, step))
        np.testing.assert_allclose(X[SCALAR][w, 4], 7.0)
        np.testing.assert_allclose(Y[SCALAR][w, 0], value_of(0, target))
        np.testing.assert_allclose(Y[SCALAR][w, 1], value_of(1, target))
        np.testing.assert_allclose(X[VECTOR][w, 1, ..., 1], -value_of(0, b))
        np.testing.assert_allclose(Y[VECTOR][w, 0, ..., 0], value_of(0, target))
    np.testing.assert_allclose(X[((False, False), 1)], 1.0)
    assert X[((False, False), 1)].shape == (2, 1, 2, 2, 2, 2)


def test_batch_time_series_orders_windows_series_by_series_and_downsamples():
    series = np.stack([scalar_series(1, 4), scalar_series(1, 4, offset=1000.0)])
    dynamic = geom.MultiImage({SCALAR: jnp.asarray(series)}, D)
    constant = geom.MultiImage(
        {SCALAR: jnp.asarray(np.stack([np.full((1, 2, 2), 5.0), np.full((1, 2, 2), 6.0)]))}, D
    )

    X, Y = data.batch_time_series(dynamic, constant, 4, 1, 2)
    # per series, windows (0) -> (1, 2) and (1) -> (2, 3)
    assert X[SCALAR].shape == (4, 2, 2, 2) and Y[SCALAR].shape == (4, 2, 2, 2)
    for row, (offset, start, const) in enumerate(
        [(0, 0, 5), (0, 1, 5), (1000, 0, 6), (1000, 1, 6)]
    ):
        np.testing.assert_allclose(X[SCALAR][row, 0], value_of(0, start, offset))
        np.testing.assert_allclose(X[SCALAR][row, 1], const)
        np.testing.assert_allclose(Y[SCALAR][row, 0], value_of(0, start + 1, offset))
        np.testing.assert_allclose(Y[SCALAR][row, 1], value_of(0, start + 2, offset))

    X_small, Y_small = data.batch_time_series(dynamic, constant, 4, 1, 2, downsample=1)
    assert X_small[SCALAR].shape == (4, 2, 1, 1)
    np.testing.assert_allclose(X_small[SCALAR][2, 0, 0, 0], 1000.15, rtol=1e-6)
    np.testing.assert_allclose(Y_small[SCALAR][3, 1, 0, 0], 1003.15, rtol=1e-6)


def test_delta_t_skips_steps():
    dynamic = geom.MultiImage({SCALAR: jnp.asarray(scalar_series(1, 7))}, D)
    X, Y = data.times_series_to_multi_images(dynamic, dynamic.empty(), 7, 2, 1, delta_t=2)
    np.testing.assert_allclose(X[SCALAR][:, :, 0, 0], [[0, 2], [1, 3], [2, 4]])
    np.testing.assert_allclose(Y[SCALAR][:, :, 0, 0], [[4], [5], [6]])


def test_data_errors():
    dynamic = geom.MultiImage({SCALAR: jnp.asarray(scalar_series(1, 5))}, D)
    empty = dynamic.empty()
    with pytest.raises(ValueError, match="5 channels, not a multiple of `total_steps` \\(=4\\)"):
        data.times_series_to_multi_images(dynamic, empty, 4, 1, 1)
    with pytest.raises(ValueError, match="`skip_initial` \\(=5\\)"):
        data.times_series_to_multi_images(dynamic, empty, 5, 1, 1, skip_initial=5)
    with pytest.raises(ValueError, match="too short"):
        data.times_series_to_multi_images(dynamic, empty, 5, 3, 1, skip_initial=2)
    odd = geom.MultiImage({SCALAR: jnp.zeros((5, 3, 3)) + 1.0}, D)
    with pytest.raises(ValueError, match="not all even"):
        data.times_series_to_multi_images(odd, empty, 5, 1, 1, downsample=1)
    with pytest.raises(ValueError, match="`dynamic_fields` is empty"):
        data.times_series_to_multi_images(empty, empty, 5, 1, 1)
