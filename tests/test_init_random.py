"""ginjax._init_random.uniform: the values of `jax.random.uniform` for the same key, shape and
bounds, with one compile per power-of-two draw length instead of one per shape."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest

import ginjax.geometric as geom
from ginjax import _init_random
from ginjax.layers import ConvContract, VectorNeuronNonlinear

SHAPES = [(), (1,), (0, 3), (5, 7, 3), (16, 16), (256,), (257,), (3, 100, 11), (64, 64, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_the_values_of_jax_random_uniform(shape):
    for seed, (lo, hi) in ((0, (-0.25, 0.25)), (7, (0.0, 1.0)), (123, (-3.0, 2.0))):
        key = jax.random.PRNGKey(seed)
        got = _init_random.uniform(key, shape, lo, hi)
        want = jax.random.uniform(key, shape, minval=lo, maxval=hi)
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_traced_key_another_prng_and_the_non_partitionable_threefry_take_jax_random_uniform():
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    got = jax.vmap(lambda k: _init_random.uniform(k, (4, 9), -1.0, 1.0))(keys)
    want = jax.vmap(lambda k: jax.random.uniform(k, (4, 9), minval=-1.0, maxval=1.0))(keys)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    jitted = jax.jit(lambda k: _init_random.uniform(k, (3, 5), -1.0, 1.0))(keys[0])
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(jax.random.uniform(keys[0], (3, 5), minval=-1.0, maxval=1.0)))
    rbg = jax.random.key(5, impl="rbg")
    assert not _init_random._partitionable_threefry(rbg) and _init_random._partitionable_threefry(keys[0])
    np.testing.assert_array_equal(np.asarray(_init_random.uniform(rbg, (6, 3), 0.0, 1.0)),
                                  np.asarray(jax.random.uniform(rbg, (6, 3))))
    with jax.threefry_partitionable(False):
        assert not _init_random._partitionable_threefry(keys[1])
        got = _init_random.uniform(keys[1], (5, 7), -1.0, 1.0)
        want = jax.random.uniform(keys[1], (5, 7), minval=-1.0, maxval=1.0)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_draw_lengths_are_powers_of_two():
    assert [_init_random.draw_length(n) for n in (1, 255, 256, 257, 1000, 4096, 4097)] == [
        256, 256, 256, 512, 1024, 4096, 8192]


class _Compiles(logging.Handler):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Compiling "):
            self.names.append(message.split()[1])


def test_layers_of_many_weight_shapes_compile_few_draws():
    """Eight ConvContracts and VectorNeurons of different channel counts: their weights are drawn by
    one compiled `_uniform` per draw length (all under 512 elements here: at most two), where
    `jax.random.uniform` compiles one per shape."""
    D = 2
    filters = geom.get_invariant_filters([3], [0, 1], [0], D, geom.make_all_operators(D))
    jax.clear_caches()  # earlier tests may have compiled the draws already
    handler = _Compiles()
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            for c in (2, 3, 4, 5):
                sig_in = geom.Signature((((0, 0), c), ((1, 0), c + 1)))
                sig_out = geom.Signature((((0, 0), c + 2), ((1, 0), c)))
                ConvContract(sig_in, sig_out, filters, key=jax.random.PRNGKey(c))
                VectorNeuronNonlinear(sig_out, D, key=jax.random.PRNGKey(c))
    finally:
        logger.removeHandler(handler)
    draws = [n for n in handler.names if "_uniform" in n]
    assert 1 <= len(draws) <= 2, handler.names
