"""Drop-in ginjax 0.1.8 (equivariant CNNs on geometric images) on fused ConvContract kernels.

Submodules: geometric (MultiImage, filters, group operations), layers, models, ml (training),
data (time-series helpers). ConvContract's backend is chosen by the `kernels` package.
"""

from ginjax import geometric, layers, models, ml, data

__version__ = "0.2.0"
__all__ = ["geometric", "layers", "models", "ml", "data"]
