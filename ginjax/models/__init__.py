"""Equivariant (and plain) models on MultiImages: the ginjax 0.1.8 `ginjax.models` interface.

Every model is an equinox Module called unbatched as `model(x, aux_data) -> (y, aux_data)`;
its equivariant convolutions are `ginjax.layers.ConvContract`, so the kernels backend selection
(GINJAX_BACKEND, kernels.use_backend) applies to every model.
"""

from ginjax.models._base import (
    AnyDimensionalModel,
    MultiImageModule,
    count_params,
    get_filter_sum,
    get_scaled_filters,
)
from ginjax.models._blocks import ACTIVATION_REGISTRY, ConvBlock, handle_activation, make_conv
from ginjax.models._resnet import DilResNet, ResNet
from ginjax.models._unet import UNet
from ginjax.models._wrappers import (
    GroupAverage,
    LastStepIdentity,
    ModelWrapper,
    SimpleConvSeries,
)

__all__ = [
    "ACTIVATION_REGISTRY",
    "AnyDimensionalModel",
    "ConvBlock",
    "DilResNet",
    "GroupAverage",
    "LastStepIdentity",
    "ModelWrapper",
    "MultiImageModule",
    "ResNet",
    "SimpleConvSeries",
    "UNet",
    "count_params",
    "get_filter_sum",
    "get_scaled_filters",
    "handle_activation",
    "make_conv",
]
