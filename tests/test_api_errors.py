"""Bad input across the public API, one case per line: (id, call, exception, message pattern).

Every error must name the argument (or the environment variable, or the file), show the value
and say what would be valid. Add a line here for every new check; the table is the spec.
"""

from __future__ import annotations

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kernels
import ginjax.geometric as geom
from ginjax import ml, models
from ginjax.layers import ConvContract

from conftest import filter_bank

D = 2
KEY = jax.random.PRNGKey(0)
SIG = geom.Signature((((0, 0), 2), ((1, 0), 1)))
SCALAR = geom.Signature((((0, 0), 1),))


@functools.cache
def _filters():
    return filter_bank(D, 3)


@functools.cache
def _layer(**kwargs):
    return ConvContract(SIG, SIG, _filters(), key=KEY, **kwargs)


def _x(n=4, dtype=jnp.float32, sig=SIG):
    return geom.MultiImage(
        {kp: jnp.ones((c, n, n) + (D,) * len(kp[0]), dtype) for kp, c in sig}, D, True
    )


def _spec():
    return kernels.make_spec(D, [(0, 0, 1)], [(0, 0, 1)], [(0, 0, _filters()[(0, 0)])], True)


def _operands(dtype=jnp.float32):
    n_f = _filters()[(0, 0)].shape[0]
    return [jnp.ones((1, 4, 4), dtype)], [jnp.ones((1, 1, n_f), dtype)]


def _with_env(value, fn):
    @contextlib.contextmanager
    def env():
        old = os.environ.get("GINJAX_BACKEND")
        os.environ["GINJAX_BACKEND"] = value
        try:
            yield
        finally:
            if old is None:
                del os.environ["GINJAX_BACKEND"]
            else:
                os.environ["GINJAX_BACKEND"] = old

    def run():
        with env():
            return fn()

    return run


def _train(**overrides):
    X = _x(sig=SCALAR)
    X = geom.MultiImage({k: v[None] for k, v in X.items()}, D, True)  # batch of 1
    args = dict(X=X, Y=X, map_and_loss=ml.Mapper([geom.Losses.SMSE]), model=lambda x: x, rand_key=None,
                stop_condition=ml.EpochStop(1), batch_size=1, optimizer=optax.sgd(0.1))
    args.update(overrides)
    return ml.train(**args)


def _conv(sig_in=SIG, sig_out=SIG, filters=None, **kwargs):
    return ConvContract(sig_in, sig_out, _filters() if filters is None else filters, key=kwargs.pop("key", KEY), **kwargs)


def _unet(**kwargs):
    args = dict(D=D, input_keys=SIG, output_keys=SIG, depth=2, num_downsamples=1, conv_filters=_filters(),
                upsample_filters=_filters(), key=KEY)
    args.update(kwargs)
    return models.UNet(**args)


CASES = [
    # --- signatures and ConvContract construction
    ("Signature None", lambda: geom.Signature(None), ValueError, r"`signature` \(=None\) must be a sequence .* or a mapping"),
    ("Signature bool channels", lambda: geom.Signature({(0, 0): True}), ValueError, r"channels of entry"),
    ("zero input channels (item 6)", lambda: _conv(sig_in=geom.Signature((((0, 0), 0),))), ValueError, r"`input_keys` gives key \(\(\), 0\) 0 channels; every key needs at least 1"),
    ("zero target channels (item 6)", lambda: _conv(sig_out={(0, 0): 0}), ValueError, r"`target_keys` gives key \(\(\), 0\) 0 channels"),
    ("empty signature", lambda: _conv(sig_in=()), ValueError, r"`input_keys` \(=\(\)\) has no keys"),
    ("signature of ints", lambda: _conv(sig_in=5), ValueError, r"`input_keys` \(=5\) is not a signature"),
    ("key=0 (item 10)", lambda: _conv(key=0), ValueError, r"`key` \(=0\) must be a jax.random key"),
    ("key=None", lambda: _conv(key=None), ValueError, r"`key` \(=None\) must be a jax.random key"),
    ("filters not a MultiImage", lambda: _conv(filters={"a": 1}), TypeError, r"`invariant_filters` \(=dict\) must be a geom.MultiImage"),
    ("backend not a string", lambda: _conv(backend=3), ValueError, r"`backend` \(=3\) must be a string"),
    ("unknown backend", lambda: _conv(backend="cuda"), ValueError, r"`backend` \(='cuda'\) is not a ConvContract backend"),
    ("use_bias unknown", lambda: _conv(use_bias="yes"), ValueError, r"`use_bias` \(='yes'\) must be a bool or one of"),
    ("stride 0", lambda: _conv(stride=0)(_x()), ValueError, r"`stride` \(=0\) must be >= 1"),
    ("padding word", lambda: _conv(padding="FULL")(_x()), ValueError, r"`padding` \(='FULL'\) must be 'TORUS', 'SAME', 'VALID'"),
    # --- calling the layer
    ("int32 input (item 11)", lambda: _layer()(_x(dtype=jnp.int32)), ValueError, r"`x\[\(\(\), 0\)\]` has dtype int32; ConvContract takes floating-point"),
    ("wrong signature input", lambda: _layer()(_x(sig=SCALAR)), ValueError, r"`x` has signature .* but the layer expects"),
    ("array instead of MultiImage", lambda: _layer()(jnp.ones((2, 4, 4))), TypeError, r"`x` \(=.*\) must be a geom.MultiImage"),
    ("VALID + dilation too small (item 8)", lambda: _conv(padding="VALID", rhs_dilation=2)(_x(n=4)), ValueError, r"axis 0 is too small: it has 4 cells, 4 after padding .* fewer than the 5 cells the filter reaches \(size 3 dilated by rhs_dilation 2\)"),
    # --- kernels.conv_contract and make_spec (item 10)
    ("spec=None", lambda: kernels.conv_contract(None, *_operands()), TypeError, r"`spec` \(=NoneType\) must be a kernels.ConvSpec"),
    ("inputs as nested lists", lambda: kernels.conv_contract(_spec(), [[[1.0] * 4] * 4], _operands()[1]), TypeError, r"`inputs\[0\]` \(=list\) must be an array"),
    ("inputs one array", lambda: kernels.conv_contract(_spec(), jnp.ones((1, 4, 4)), _operands()[1]), TypeError, r"`inputs` \(=.*\) must be a list or tuple of arrays"),
    ("int32 inputs (item 11)", lambda: kernels.conv_contract(_spec(), [jnp.ones((1, 4, 4), jnp.int32)], _operands()[1]), ValueError, r"`inputs\[0\]` has dtype int32"),
    ("int32 weights", lambda: kernels.conv_contract(_spec(), _operands()[0], [w.astype(jnp.int32) for w in _operands()[1]]), ValueError, r"`weights\[0\]` has dtype int32"),
    ("bool inputs", lambda: kernels.conv_contract(_spec(), [jnp.ones((1, 4, 4), bool)], _operands()[1]), ValueError, r"`inputs\[0\]` has dtype bool"),
    ("pair index out of range", lambda: kernels.make_spec(D, [(0, 0, 1)], [(0, 0, 1)], [(3, 0, _filters()[(0, 0)])], True), ValueError, r"`pairs\[0\]` in_index \(=3\) must be an int in \[0, 1\)"),
    ("pair not a triple", lambda: kernels.make_spec(D, [(0, 0, 1)], [(0, 0, 1)], [(0, 0)], True), ValueError, r"`pairs\[0\]` must be \(in_index, out_index, basis\)"),
    ("zero channels in a spec", lambda: kernels.make_spec(D, [(0, 0, 0)], [(0, 0, 1)], [(0, 0, _filters()[(0, 0)])], True), ValueError, r"`in_keys\[0\]` \(=\(0, 0, 0\)\) must be \(k, parity, channels\)"),
    ("D=4", lambda: kernels.make_spec(4, [(0, 0, 1)], [(0, 0, 1)], [], True), ValueError, r"`D` \(=4\) must be 2 or 3"),
    ("precision word", lambda: kernels.conv_contract(_spec(), *_operands(), precision="fp8"), ValueError, r"`precision` \(='fp8'\) must be None"),
    ("backend argument unknown", lambda: kernels.conv_contract(_spec(), *_operands(), backend="cudnn"), ValueError, r"`backend` \(='cudnn'\) is not a ConvContract backend"),
    # --- backend selection (item 9)
    ("GINJAX_BACKEND unknown", _with_env("fastest", lambda: kernels.conv_contract(_spec(), *_operands())), ValueError, r"environment variable GINJAX_BACKEND \(='fastest'\) is not a ConvContract backend"),
    ("use_backend unknown", lambda: kernels.use_backend("gpu").__enter__(), ValueError, r"`use_backend` name \(='gpu'\) is not a ConvContract backend"),
    ("use_backend not a string", lambda: kernels.use_backend(None).__enter__(), ValueError, r"`use_backend` name \(=None\) must be a string"),
    # --- models (item 10)
    ("UNet input_keys=None", lambda: _unet(input_keys=None), ValueError, r"UNet: `input_keys` \(=None\) is not a signature"),
    ("UNet output_keys dict with bad key", lambda: _unet(output_keys={0: 1}), ValueError, r"UNet: `output_keys` \(=\{0: 1\}\) is not a signature"),
    ("UNet key=0", lambda: _unet(key=0), ValueError, r"UNet: `key` \(=0\) must be a jax.random key"),
    ("ResNet key=0", lambda: models.ResNet(D, SIG, SIG, 2, conv_filters=_filters(), key=0), ValueError, r"ResNet: `key` \(=0\) must be a jax.random key"),
    ("ResNet depth=0", lambda: models.ResNet(D, SIG, SIG, 0, conv_filters=_filters(), key=KEY), ValueError, r"ResNet: `depth` \(=0\) must be a positive int: the channels of each key"),
    ("UNet depth=-2", lambda: _unet(depth=-2), ValueError, r"UNet: `depth` \(=-2\) must be a positive int"),
    ("DilResNet depth=1.5", lambda: models.DilResNet(D, SIG, SIG, 1.5, conv_filters=_filters(), key=KEY), ValueError, r"DilResNet: `depth` \(=1.5\) must be a positive int"),
    ("ResNet num_blocks=-1", lambda: models.ResNet(D, SIG, SIG, 2, num_blocks=-1, conv_filters=_filters(), key=KEY), ValueError, r"ResNet: `num_blocks` \(=-1\) must be a non-negative int"),
    ("DilResNet num_blocks=None", lambda: models.DilResNet(D, SIG, SIG, 2, num_blocks=None, conv_filters=_filters(), key=KEY), ValueError, r"DilResNet: `num_blocks` \(=None\) must be a non-negative int"),
    ("DilResNet input_keys=None", lambda: models.DilResNet(D, None, SIG, 2, conv_filters=_filters(), key=KEY), ValueError, r"DilResNet: `input_keys` \(=None\) is not a signature"),
    # --- geometric helpers
    ("get_subset out of range", lambda: _x().get_subset(np.array([0, 7])), ValueError, r"MultiImage.get_subset: `idxs` holds \[7\], out of range for the 2 entries"),
    ("expand size -1", lambda: _x().expand(0, -1), ValueError, r"MultiImage.expand: `size` \(=-1\) must be a positive int"),
    ("get_same_padding lengths", lambda: geom.get_same_padding((3, 3), (1, 1, 1)), ValueError, r"`rhs_dilation` \(=\(1, 1, 1\)\) .* one entry per spatial axis"),
    # --- ml (items 2, 3, 10)
    ("train X=dict", lambda: _train(X={"a": 1}), ValueError, r"`X` \(=dict\) must be a geom.MultiImage with a leading batch axis"),
    ("train Y=None", lambda: _train(Y=None), ValueError, r"`Y` \(=NoneType\) must be a geom.MultiImage"),
    ("train batch_size=0", lambda: _train(batch_size=0), ValueError, r"`batch_size` \(=0\) must be a positive int"),
    ("get_batches of a list of arrays", lambda: ml.get_batches([jnp.ones(3)], 1, None), ValueError, r"`multi_images\[0\]` \(=.*\) must be a geom.MultiImage"),
    ("save_plus non-JSON args", lambda: ml.save_plus("/nonexistent-dir/x.eqx", [jnp.ones(1)], {"f": print}), ValueError, r"`further_args` cannot be stored as JSON"),
    ("save_plus args not a dict", lambda: ml.save_plus("/nonexistent-dir/x.eqx", [jnp.ones(1)], [1]), ValueError, r"`further_args` \(=list\) must be a dict"),
    ("load a missing file", lambda: ml.load("/nonexistent-dir/x.eqx", [jnp.ones(1)]), FileNotFoundError, r"/nonexistent-dir/x.eqx"),
]


@pytest.mark.parametrize("name,call,error,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(name, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_every_case_has_a_unique_name():
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))
