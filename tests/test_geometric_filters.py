"""Invariant filters and groups against the ginjax 0.1.8 fixtures, plus group-action properties."""

import itertools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

import ginjax.geometric as geom
from conftest import FIXTURES

FILTER_FILE = FIXTURES / "invariant_filters.npz"
CASES = [(2, 2), (2, 3), (2, 5), (3, 2), (3, 3)]
HIGHEST = jax.lax.Precision.HIGHEST


@pytest.fixture(scope="module")
def fixture_data():
    with np.load(FILTER_FILE) as data:
        return {name: data[name] for name in data.files}


_FILTER_CACHE: dict = {}


def invariant_filters(D, M):
    if (D, M) not in _FILTER_CACHE:
        _FILTER_CACHE[(D, M)] = geom.get_invariant_filters(
            [M], [0, 1, 2], [0, 1], D, geom.make_all_operators(D)
        )
    return _FILTER_CACHE[(D, M)]


def key_name(key):
    (k, parity) = key
    return f"k{len(k)}p{parity}"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.mark.parametrize("D", [2, 3])
def test_operators_match_fixture(fixture_data, D):
    operators = geom.make_all_operators(D)
    np.testing.assert_array_equal(np.stack(operators), fixture_data[f"operators/D{D}"])


@pytest.mark.parametrize("D,M", CASES)
def test_invariant_filters_match_fixture(fixture_data, D, M):
    filters = invariant_filters(D, M)
    prefix = f"filters/D{D}M{M}/"
    expected_names = [name for name in fixture_data if name.startswith(prefix)]
    assert [prefix + key_name(key) for key in filters.keys()] == expected_names
    for key, block in filters.items():
        expected = fixture_data[prefix + key_name(key)]
        assert block.shape == expected.shape, key
        np.testing.assert_allclose(np.asarray(block), expected, rtol=0, atol=1e-6, err_msg=str(key))


def test_invariant_filters_multi_image_layout():
    filters = invariant_filters(2, 3)
    assert isinstance(filters, geom.MultiImage)
    assert filters.D == 2 and filters.get_n_leading() == 1
    assert filters.get_spatial_dims() == (3, 3)
    assert list(filters.keys())[0] == ((), 0)


# ---------------------------------------------------------------------------------------------
# group properties


@pytest.mark.parametrize("D", [2, 3])
def test_operators_form_the_signed_permutation_group(D):
    operators = geom.make_all_operators(D)
    assert len(operators) == 2**D * int(np.prod(range(1, D + 1)))
    as_set = {op.tobytes() for op in operators}
    assert len(as_set) == len(operators)
    for a, b in itertools.product(operators[:: max(1, len(operators) // 6)], operators):
        assert (a @ b).astype(operators[0].dtype).tobytes() in as_set
        np.testing.assert_array_equal(a @ a.T, np.eye(D))


@pytest.mark.parametrize("D,M", CASES)
def test_invariant_filters_are_invariant(D, M):
    filters = invariant_filters(D, M)
    for (k, parity), block in filters.items():
        for gg in geom.make_all_operators(D):
            rotated = geom.times_group_element(D, block, parity, gg, k, HIGHEST)
            np.testing.assert_allclose(rotated, block, atol=1e-6, err_msg=f"{k}, {parity}")


@pytest.mark.parametrize("D,M", [(2, 3), (3, 3)])
def test_filter_block_spans_invariant_space(D, M):
    """Filters of one key are linearly independent (the rows of a basis)."""
    for key, block in invariant_filters(D, M).items():
        matrix = np.asarray(block).reshape((len(block), -1))
        assert np.linalg.matrix_rank(matrix, tol=1e-4) == len(block), key


@pytest.mark.parametrize("D", [2, 3])
def test_group_action_composition(D):
    rng = np.random.default_rng(0)
    operators = geom.make_all_operators(D)
    spatial = (4, 5) if D == 2 else (3, 4, 5)
    for k, parity in [(0, 1), (1, 0), (2, 1)]:
        data = jnp.array(rng.normal(size=(2,) + spatial + (D,) * k), dtype=jnp.float32)
        cov = (False,) * k
        pairs = [tuple(operators[i] for i in rng.integers(len(operators), size=2)) for _ in range(4)]
        act = lambda x, gg: geom.times_group_element(D, x, parity, gg, cov, HIGHEST)

        @jax.jit  # one program for the four pairs (eager, every element's ops compile separately)
        def both_ways(x):
            return [(act(x, g1 @ g2), act(act(x, g2), g1)) for g1, g2 in pairs]

        for composed, in_turn in both_ways(data):
            np.testing.assert_allclose(composed, in_turn, atol=1e-5)


@pytest.mark.parametrize("D", [2, 3])
def test_group_sum_is_the_sum_of_the_group_action(D):
    """The filters' group average (`_group_sum`: one gather an operator, or one scatter on the
    identity basis) against times_group_element summed over the group, on fresh random bases and
    on the identity, for scalars, vectors and 2-tensors of both parities."""
    from ginjax.geometric.common import _group_sum

    rng = np.random.default_rng()
    operators = geom.make_all_operators(D)
    for k, parity in [(0, 1), (1, 0), (2, 1), (2, 0)]:
        shape = (3,) * D + (D,) * k
        size = int(np.prod(shape))
        act = jax.jit(lambda x: sum(geom.times_group_element(D, x, parity, gg, (False,) * k, HIGHEST)
                                    for gg in operators))
        for basis in (rng.standard_normal((5,) + shape).astype(np.float32),
                      np.eye(size, dtype=np.float32).reshape((size,) + shape)):
            np.testing.assert_allclose(_group_sum(D, basis, parity, operators, k), act(jnp.asarray(basis)),
                                       rtol=1e-5, atol=1e-4, err_msg=f"k={k} parity={parity}")


@pytest.mark.parametrize("D", [2, 3])
def test_group_action_matches_rotated_keys_gather(D):
    """The transpose/flip fast path agrees with gathering at get_rotated_keys."""
    rng = np.random.default_rng(1)
    spatial = (3, 5) if D == 2 else (2, 3, 4)
    data = rng.normal(size=spatial + (D,)).astype(np.float32)
    operators = geom.make_all_operators(D)[1::3]
    # one program for all the elements (eager, every element's ops compile separately)
    act = jax.jit(lambda x: [geom.times_group_element(D, x, 0, gg, (False,), HIGHEST) for gg in operators])
    for gg, actual in zip(operators, act(jnp.array(data))):
        keys = geom.get_rotated_keys(D, spatial, gg)
        rotated_dims = tuple(np.abs(gg @ np.array(spatial)))
        moved = data[tuple(keys.T)].reshape(rotated_dims + (D,))
        expected = np.einsum("...a,na->...n", moved, gg)
        np.testing.assert_allclose(actual, expected, atol=1e-6)
        assert geom.rotate_is_torus((True, False, True)[:D], gg) == tuple(
            (True, False, True)[:D][int(np.argmax(np.abs(row)))] for row in gg
        )


def test_pseudoscalar_flips_under_reflection():
    rng = np.random.default_rng(2)
    data = jnp.array(rng.normal(size=(3, 3)), dtype=jnp.float32)
    reflection = np.array([[1, 0], [0, -1]])
    out = geom.times_group_element(2, data, 1, reflection, (), HIGHEST)
    np.testing.assert_allclose(out, -np.asarray(data)[:, ::-1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# building blocks


def test_filter_scalings():
    operators = geom.make_all_operators(2)
    normalized = geom.get_unique_invariant_filters(3, 1, 0, 2, operators)
    ones = geom.get_unique_invariant_filters(3, 1, 0, 2, operators, geom.FilterScaling.ONE)
    assert len(normalized) == len(ones) == 2
    for nn, oo in zip(normalized, ones):
        assert float(jnp.max(nn.norm().data)) == pytest.approx(1.0, abs=1e-6)
        assert float(jnp.max(jnp.abs(oo.data))) == pytest.approx(1.0, abs=1e-6)
        ratio = np.asarray(nn.data)[np.abs(np.asarray(oo.data)) > 0.1] / np.asarray(oo.data)[
            np.abs(np.asarray(oo.data)) > 0.1
        ]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)  # same filter up to scale


def test_sorted_filters_are_ordered():
    filters = geom.get_unique_invariant_filters(5, 0, 0, 2, geom.make_all_operators(2))
    for a, b in itertools.combinations(filters, 2):
        assert not (b < a)
    assert filters[0].nonempty_pixels().sum() == 1  # the centre-only filter comes first


def test_k2_irrep_basis_parts():
    for D in (2, 3):
        trace, antisym, sym = (np.asarray(b) for b in geom.get_k2_irrep_basis(3, 2, D))
        assert trace.shape == (3**D,) + (3,) * D + (D, D)
        assert antisym.shape[0] == 3**D * D * (D - 1) // 2
        assert sym.shape[0] == 3**D * (D * (D + 1) // 2 - 1)
        tensors = lambda b: b.reshape((-1, D, D))
        np.testing.assert_array_equal(tensors(antisym), -np.swapaxes(tensors(antisym), 1, 2))
        np.testing.assert_array_equal(tensors(sym), np.swapaxes(tensors(sym), 1, 2))
        np.testing.assert_array_equal(np.trace(tensors(sym), axis1=1, axis2=2), 0)
        t = tensors(trace)
        np.testing.assert_array_equal(t, np.trace(t, axis1=1, axis2=2)[:, None, None] * np.eye(D) / D)


def test_get_basis_is_standard_basis():
    basis = np.asarray(geom.get_basis("test", (2, 3)))
    assert basis.shape == (6, 2, 3)
    np.testing.assert_array_equal(basis.reshape(6, 6), np.eye(6))


def test_symbols_and_parity():
    for perm in itertools.permutations(range(4)):
        inversions = sum(perm[i] > perm[j] for i, j in itertools.combinations(range(4), 2))
        assert geom.permutation_parity(perm) == (-1) ** inversions
    assert geom.permutation_parity((0, 0, 1)) == 0
    eps = np.asarray(geom.LeviCivitaSymbol.get(3))
    assert eps[0, 1, 2] == 1 and eps[1, 0, 2] == -1 and eps[0, 0, 2] == 0
    np.testing.assert_array_equal(geom.KroneckerDeltaSymbol.get(3, 2), np.eye(3))
    assert geom.tensor_name(0, 1) == "pseudoscalar" and geom.tensor_name(1, 0) == "vector"
    assert geom.tensor_name(2, 0).endswith("tensor")
    assert geom.TINY == 1e-5 and geom.FilterScaling.NORMALIZE.value == 1
    assert geom.Rescaling.NO_SCALING.value == 8 and geom.Losses.L2_REL.value == 4


def test_c2_group_and_permutation_matrix():
    assert len(geom.make_C2_group(3)) == 8
    np.testing.assert_array_equal(
        geom.permutation_matrix_from_sequence([2, 0, 1]), np.eye(3)[[2, 0, 1]]
    )


def test_bad_inputs_raise():
    operators = geom.make_all_operators(2)
    with pytest.raises(ValueError, match="D"):
        geom.make_all_operators(0)
    with pytest.raises(ValueError, match="seq"):
        geom.permutation_matrix_from_sequence([0, 0])
    with pytest.raises(ValueError, match="parity"):
        geom.get_unique_invariant_filters(3, 0, 2, 2, operators)
    with pytest.raises(ValueError, match="operator"):
        geom.get_unique_invariant_filters(3, 0, 0, 3, operators)
    with pytest.raises(TypeError, match="scale"):
        geom.get_unique_invariant_filters(3, 0, 0, 2, operators, scale="NORMALIZE")
    with pytest.raises(ValueError, match="no invariant filters"):
        geom.get_invariant_filters([], [0], [0], 2, operators)
    with pytest.raises(ValueError, match="gg"):
        geom.times_group_element(2, jnp.ones((3, 3)), 0, np.eye(3), ())


def test_other_scalings():
    operators = geom.make_all_operators(2)
    zero_sum = geom.get_unique_invariant_filters(3, 0, 0, 2, operators, geom.FilterScaling.ZERO_SUM)
    total = sum(np.asarray(ff.data) for ff in zero_sum)
    assert abs(float(total.sum())) < 1e-4
    counts = geom.get_unique_invariant_filters(3, 0, 0, 2, operators, geom.FilterScaling.INVERSE_COUNT)
    for ff in counts:
        n_pixels = int(np.sum(np.asarray(ff.nonempty_pixels())))
        assert float(jnp.max(ff.norm().data)) == pytest.approx(1 / n_pixels, rel=1e-5)


def test_d8_action_on_3x3_images():
    group = geom.make_D8_group(2)
    rng = np.random.default_rng(3)
    image = jnp.array(rng.normal(size=(2, 3, 3, 2)).astype(np.float32))
    rotated = image
    for _ in range(8):  # eight 45-degree rotations are the identity
        rotated = geom.times_D8_element(2, rotated, 0, group[1], (False,), HIGHEST)
    np.testing.assert_allclose(rotated, image, atol=1e-5)
    quarter = np.rint(group[2]).astype(int)
    np.testing.assert_allclose(
        geom.times_D8_element(2, image, 0, group[2], (False,), HIGHEST),
        geom.times_group_element(2, image, 0, quarter, (False,), HIGHEST),
        atol=1e-5,
    )
