"""Model base classes: MultiImageModule and AnyDimensionalModel (conversion between D)."""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax

from ginjax import geometric as geom
from ginjax import layers
from ginjax.models import _rescale
from ginjax.models._rescale import get_filter_sum, get_scaled_filters

__all__ = [
    "AnyDimensionalModel",
    "MultiImageModule",
    "count_params",
    "get_filter_sum",
    "get_scaled_filters",
]


def _is_conv(node) -> bool:
    return isinstance(node, layers.ConvContract)


def count_params(model: eqx.Module) -> int:
    """Number of trainable parameters of `model`.

    Every array counts except the fixed invariant filter bases (and any other constant) held by
    ConvContract layers, of which only `weights` and `bias` are parameters.
    """
    total = 0
    for leaf in jax.tree_util.tree_leaves(model, is_leaf=_is_conv):
        if _is_conv(leaf):
            for array in jax.tree_util.tree_leaves((leaf.weights, leaf.bias)):
                total += int(array.size)
        elif eqx.is_array(leaf):
            total += int(leaf.size)
    return total


class MultiImageModule(eqx.Module):
    """A model from a MultiImage (and optional auxiliary state, e.g. BatchNorm statistics) to a
    MultiImage and that state. Subclasses return the state even when they do not use it."""

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Identity: returns (x, aux_data)."""
        return x, aux_data


class AnyDimensionalModel(MultiImageModule):
    """A MultiImage model that can be rebuilt for another dimension D with `convertD`.

    The new model gets the old model's arrays; the ConvContract weights are mapped onto the new
    dimension's invariant filters (`_extend_weights`) and optionally rescaled (`Rescaling`).
    The static methods are documented in ginjax.models._rescale.
    """

    _extend_weights = staticmethod(_rescale.extend_weights)
    volume_rescale_weights = staticmethod(_rescale.volume_rescale_weights)
    spin_embed_rescale_weights = staticmethod(_rescale.spin_embed_rescale_weights)
    compat_flex_rescale_weights = staticmethod(_rescale.compat_flex_rescale_weights)
    compatibility_norm_rescale_weights = staticmethod(_rescale.compatibility_norm_rescale_weights)
    compatibility_rescale_weights = staticmethod(_rescale.compatibility_rescale_weights)
    _transfer_conv_weights = staticmethod(_rescale.transfer_conv_weights)

    def transfer_weights(self, new_model, rescale: geom.Rescaling, verbose: bool = False):
        """Copy this model's parameters into `new_model` (same architecture, any D).

        Every array is copied from `self` except inside ConvContract layers, which keep the new
        model's filters and receive this model's weights mapped onto them
        (`_transfer_conv_weights`) and this model's biases.

        Args:
            new_model: a model built with the same hyperparameters, possibly another D.
            rescale: the weight rescaling, a geom.Rescaling.
            verbose: print details of the rescaling.

        Returns:
            the new model with transferred parameters.
        """
        old_leaves = jax.tree_util.tree_leaves(self, is_leaf=_is_conv)
        new_leaves, treedef = jax.tree_util.tree_flatten(new_model, is_leaf=_is_conv)
        if len(old_leaves) != len(new_leaves):
            raise ValueError(
                f"transfer_weights: `new_model` ({type(new_model).__name__}) does not have the "
                f"structure of this model ({len(new_leaves)} vs {len(old_leaves)} leaves); build "
                "it with the same hyperparameters"
            )
        merged = []
        for old, new in zip(old_leaves, new_leaves):
            if _is_conv(old) != _is_conv(new):
                raise ValueError("transfer_weights: `new_model` has a different layer structure")
            if _is_conv(new):
                merged.append(self._transfer_conv(old, new, rescale, verbose))
            elif eqx.is_array(new):
                merged.append(old)
            else:
                merged.append(new)
        return jax.tree_util.tree_unflatten(treedef, merged)

    @staticmethod
    def _transfer_conv(old_conv, new_conv, rescale: geom.Rescaling, verbose: bool):
        weights = _rescale.transfer_conv_weights(
            old_conv.weights, old_conv.invariant_filters, new_conv.invariant_filters, rescale, verbose
        )
        pairs = [(i, o) for i in new_conv.weights for o in new_conv.weights[i]]
        if sorted(pairs, key=str) != sorted(
            [(i, o) for i in weights for o in weights[i]], key=str
        ):
            raise ValueError("transfer_weights: a ConvContract has different key pairs in D")
        bias_keys = list(new_conv.bias)
        if set(bias_keys) != set(old_conv.bias):
            raise ValueError("transfer_weights: a ConvContract has different bias keys")
        return eqx.tree_at(
            lambda c: [c.weights[i][o] for i, o in pairs] + [c.bias[b] for b in bias_keys],
            new_conv,
            [weights[i][o] for i, o in pairs] + [old_conv.bias[b] for b in bias_keys],
        )

    def convertD(self, conv_filters: geom.MultiImage, rescale: geom.Rescaling, key: jax.Array, **kwargs):
        """Rebuild this model for the dimension of `conv_filters`, keeping its weights.

        Args:
            conv_filters: the invariant filters of the new dimension.
            rescale: the weight rescaling, a geom.Rescaling.
            key: jax.random key for building the new model (its weights are overwritten).

        Returns:
            the converted model. Subclasses implement this; the base class raises.
        """
        raise NotImplementedError(
            f"AnyDimensionalModel.convertD: {type(self).__name__} does not implement convertD"
        )
