"""Mapper: a ready-made `map_and_loss` for `train`, `evaluate` and the batch helpers."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp

from ginjax.geometric.constants import Losses
from ginjax.ml import _losses

_LOSS_FUNCTIONS = {
    Losses.SMSE: lambda x, y, reduce, eps: _losses.smse_loss(x, y, reduce),
    Losses.NRMSE: _losses.nrmse_loss,
    Losses.NRMSE_PER_PIXEL: _losses.nrmse_per_pixel_loss,
    Losses.L2_REL: _losses.l2_rel_error,
    Losses.L2_REL_PER_PIXEL: _losses.l2_per_pixel_rel_error,
}


class Mapper(eqx.Module):
    """Map a batch through a model (vmapped over the batch, axis name "batch" for batch norm) and
    score it with one or more `geom.Losses`.

    Args:
        losses: the losses to compute, in order; at least one
        residual: the model predicts a change: each output key gets the last channel of the same
            input key added
        reduce: batch reduction passed to the losses: "mean", "sum" or None
        eps: denominator offset for the relative losses (NRMSE, L2_REL and per-pixel variants)
    """

    losses: tuple = eqx.field(static=True)
    residual: bool = eqx.field(static=True)
    reduce: Optional[str] = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self,
        losses: Sequence[Losses],
        residual: bool = False,
        reduce: Optional[str] = "mean",
        eps: float = 0,
    ) -> None:
        losses = tuple(losses)
        if not losses:
            raise ValueError("`losses` (=[]) must hold at least one geom.Losses member")
        for loss in losses:
            if loss not in _LOSS_FUNCTIONS:
                raise ValueError(f"`losses` holds {loss!r}, which is not a geom.Losses member")
        if reduce not in ("mean", "sum", None):
            raise ValueError(f"`reduce` (={reduce!r}) must be 'mean', 'sum' or None")
        self.losses = losses
        self.residual = bool(residual)
        self.reduce = reduce
        self.eps = eps

    @eqx.filter_jit
    def map(
        self, model: Any, multi_image_x: Any, aux_data: Optional[Any] = None
    ) -> tuple[Any, Any]:
        """The model's prediction for a batch: (prediction, aux_data)."""
        batched_model = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
        out, aux_data = batched_model(multi_image_x, aux_data)
        if not self.residual:
            return out, aux_data
        prediction = out.empty()
        for key, delta in out.items():
            if key not in multi_image_x:
                raise ValueError(f"`residual=True` but the input has no key {key} to add to")
            prediction.append(key[0], key[1], multi_image_x[key][:, -1:] + delta)
        return prediction, aux_data

    @eqx.filter_jit
    def __call__(
        self, model: Any, multi_image_x: Any, multi_image_y: Any, aux_data: Optional[Any] = None
    ) -> tuple[jax.Array, Any]:
        """(loss, aux_data); with several losses the loss stacks them on its last axis."""
        prediction, aux_data = self.map(model, multi_image_x, aux_data)
        values = [
            _LOSS_FUNCTIONS[loss](prediction, multi_image_y, self.reduce, self.eps)
            for loss in self.losses
        ]
        loss = values[0] if len(values) == 1 else jnp.stack(values, axis=-1)
        return loss, aux_data
