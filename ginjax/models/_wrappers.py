"""Wrapping models: plain CNNs as MultiImage models, group averaging, simple baselines."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as random
import numpy as np

from ginjax._validate import as_signature, check_key
from ginjax import geometric as geom
from ginjax.models._base import AnyDimensionalModel, MultiImageModule
from ginjax.models._blocks import ConvBlock
from ginjax.models._common import check_signature


class ModelWrapper(MultiImageModule):
    """Run a plain CNN on a MultiImage.

    The input is flattened to one scalar block (channels, *spatial) with
    `to_scalar_multi_image`, passed through `model`, and the result is unflattened into
    `output_keys`.
    """

    model: eqx.Module

    D: int = eqx.field(static=True)
    output_keys: geom.Signature = eqx.field(static=True)
    output_is_torus: Union[bool, tuple[bool, ...]] = eqx.field(static=True)
    pass_aux_data: bool = eqx.field(static=True)

    def __init__(
        self,
        D: int,
        model: eqx.Module,
        output_keys: geom.Signature,
        output_is_torus: Union[bool, tuple[bool, ...]],
        pass_aux_data: bool = False,
    ) -> None:
        """
        Args:
            D: dimension of the space.
            model: maps an array (channels, *spatial) to (out_channels, *spatial'), or with
                `pass_aux_data` (array, aux_data) -> (array, aux_data).
            output_keys: signature of the output; its flattened size must be out_channels.
            output_is_torus: is_torus of the output MultiImage.
            pass_aux_data: whether `model` takes and returns aux_data.
        """
        if not callable(model):
            raise TypeError(f"ModelWrapper: `model` (={type(model).__name__}) must be callable")
        self.D = D
        self.model = model
        self.output_keys = output_keys
        self.output_is_torus = output_is_torus
        self.pass_aux_data = pass_aux_data

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the wrapped model to `x` (unbatched)."""
        flat = x.to_scalar_multi_image()[((), 0)]
        if self.pass_aux_data:
            out, aux_data = self.model(flat, aux_data)
        else:
            out = self.model(flat)
        expected = sum(c * self.D ** len(k) for (k, _), c in self.output_keys)
        if out.shape[0] != expected:
            raise ValueError(
                f"ModelWrapper: the wrapped model returned {out.shape[0]} channels, but "
                f"`output_keys` {tuple(self.output_keys)} need {expected}"
            )
        scalar = geom.MultiImage({((), 0): out}, self.D, self.output_is_torus)
        return scalar.from_scalar_multi_image(self.output_keys), aux_data


class _Operators(Sequence):
    """An immutable, hashable list of group elements (D x D matrices) for static fields."""

    def __init__(self, operators) -> None:
        mats = []
        for gg in operators:
            mat = np.array(gg, copy=True)
            if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
                raise ValueError(
                    f"GroupAverage: every operator must be a square matrix, got shape {mat.shape}"
                )
            mat.setflags(write=False)
            mats.append(mat)
        self._mats = tuple(mats)
        self._hash = hash(tuple((m.shape, m.dtype.str, m.tobytes()) for m in self._mats))

    def __getitem__(self, i):
        return self._mats[i]

    def __len__(self) -> int:
        return len(self._mats)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        if not isinstance(other, _Operators) or len(other) != len(self):
            return False
        return all(
            a.shape == b.shape and np.array_equal(a, b) for a, b in zip(self._mats, other._mats)
        )

    def __repr__(self) -> str:
        return f"<{len(self)} operators>"


class GroupAverage(MultiImageModule):
    """Symmetrise a model over a finite group: (1/|G|) sum_g g^-1 f(g x).

    With `always_average` it averages in training too; otherwise only when `inference` is True
    (e.g. through eqx.nn.inference_mode), to test whether averaging a model trained without
    symmetry helps. Averaging over a whole group makes any model equivariant.
    """

    model: MultiImageModule
    inference: bool
    operators: Sequence[np.ndarray] = eqx.field(static=True)
    always_average: bool = eqx.field(static=True)

    def __init__(
        self,
        model: MultiImageModule,
        operators: list[np.ndarray],
        always_average: bool = False,
        inference: bool = False,
    ) -> None:
        """
        Args:
            model: a MultiImageModule (called as model(x, aux_data)).
            operators: the group elements, e.g. geom.make_all_operators(D) (orthogonal).
            always_average: average in training as well as in inference.
            inference: whether the model is in inference mode.
        """
        self.model = model
        self.operators = _Operators(operators)
        self.always_average = always_average
        self.inference = inference

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the (averaged) model to `x` (unbatched)."""
        if not ((self.always_average or self.inference) and len(self.operators) > 0):
            return self.model(x, aux_data)
        total = None
        out_aux = aux_data
        for gg in self.operators:
            out, out_aux = self.model(x.times_group_element(gg), aux_data)
            back = out.times_group_element(gg.T)
            total = back if total is None else total + back
        return total / len(self.operators), out_aux


class LastStepIdentity(AnyDimensionalModel):
    """Baseline that predicts the last input channel of every key (or zeros if `residual`)."""

    residual: bool = eqx.field(static=True)

    def __init__(self, residual: bool = False):
        """
        Args:
            residual: predict zeros, for models whose prediction is added to the input.
        """
        self.residual = residual

    def convertD(
        self, conv_filters: geom.MultiImage, rescale: geom.Rescaling, key: jax.Array, **kwargs
    ) -> "LastStepIdentity":
        """Nothing depends on D: a copy of this model."""
        return type(self)(self.residual)

    def __call__(
        self, x: geom.MultiImage, batch_stats: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Blocks (c, *spatial, *tensor) -> (1, *spatial, *tensor): the last channel (or 0)."""
        out = x.empty()
        for (k, p), block in x.items():
            last = block[-1:]
            out.append(k, p, jnp.zeros_like(last) if self.residual else last)
        return out, batch_stats


class SimpleConvSeries(AnyDimensionalModel):
    """`depth` equivariant ConvBlocks: input -> width channels per key -> ... -> target, with
    `activation_f` after every block but the last.

    Shapes: input of signature `input_keys`, output of signature `target_keys` (unbatched).
    """

    layers: list[ConvBlock]

    D: int = eqx.field(static=True)
    input_keys: geom.Signature = eqx.field(static=True)
    target_keys: geom.Signature = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    use_bias: Union[bool, str] = eqx.field(static=True)
    activation_f: Optional[Union[Callable, str]] = eqx.field(static=True)

    def __init__(
        self,
        input_keys: geom.Signature,
        target_keys: geom.Signature,
        conv_filters: geom.MultiImage,
        width: int,
        depth: int,
        use_bias: Union[bool, str],
        activation_f: Optional[Union[Callable, str]],
        key: jax.Array,
    ) -> None:
        """
        Args:
            input_keys, target_keys: signatures of input and output.
            conv_filters: invariant filters (their D is the model's).
            width: channels per key of the hidden layers (union of input and target keys).
            depth: number of ConvBlocks, >= 1.
            use_bias: convolution bias.
            activation_f: None, a name in ACTIVATION_REGISTRY or an elementwise callable.
            key: jax.random key.
        """
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"SimpleConvSeries: `depth` (={depth}) must be an int >= 1")
        check_key(key, "SimpleConvSeries")
        input_keys = as_signature(input_keys, "SimpleConvSeries", "input_keys")
        target_keys = as_signature(target_keys, "SimpleConvSeries", "target_keys")
        self.D = conv_filters.D
        self.input_keys = input_keys
        self.target_keys = target_keys
        self.width = width
        self.depth = depth
        self.use_bias = use_bias
        self.activation_f = activation_f

        mid_keys = geom.signature_union(input_keys, target_keys, width) if depth > 1 else input_keys
        last_key, *keys = random.split(key, num=depth)
        self.layers = []
        for i, subkey in enumerate(keys):
            self.layers.append(
                ConvBlock(
                    self.D,
                    input_keys if i == 0 else mid_keys,
                    mid_keys,
                    use_bias,
                    activation_f,
                    True,
                    conv_filters,
                    key=subkey,
                )
            )
        self.layers.append(
            ConvBlock(self.D, mid_keys, target_keys, use_bias, None, True, conv_filters, key=last_key)
        )

    def convertD(
        self, conv_filters: geom.MultiImage, rescale: geom.Rescaling, key: jax.Array, **kwargs
    ) -> "SimpleConvSeries":
        """Rebuild for the dimension of `conv_filters`, keeping the weights."""
        new_model = type(self)(
            self.input_keys,
            self.target_keys,
            conv_filters,
            self.width,
            self.depth,
            self.use_bias,
            self.activation_f,
            key,
        )
        return self.transfer_weights(new_model, rescale, verbose=False)

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the blocks in turn to `x` (unbatched)."""
        check_signature("SimpleConvSeries", x, self.D, self.input_keys)
        for layer in self.layers:
            x, aux_data = layer(x, aux_data)
        return x, aux_data
