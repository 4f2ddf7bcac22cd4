"""FilterBank: the invariant filters of a ConvContract as one immutable, hashable constant.

The fused kernels specialise on the filter values (the nonzeros of each basis), so the values
must be known when a function is traced. A FilterBank is a MultiImage that JAX and equinox see as
ONE non-array leaf: `eqx.filter_jit` treats it as static (hashed by content), gradients and
optimisers skip it, and `eqx.tree_at(lambda m: m.invariant_filters, layer, new_bank)` replaces it
like any other leaf, so the layer computes with what it holds.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kernels import FilterBasis

from ginjax import geometric as geom


class TracedFiltersError(TypeError):
    """Filters given as traced values (inside jit/vmap), which cannot be static constants."""


class FilterBank(geom.MultiImage):
    """An immutable MultiImage of invariant filters, hashable by content.

    Built from a MultiImage (`FilterBank(filters)`) or with MultiImage's own arguments. The blocks
    are concrete floating-point arrays of shape (n_filters, *(M,)*D, *(D,)*k); setting a block
    raises. `copy()` and `empty()` return plain (mutable) MultiImages.
    """

    def __init__(
        self,
        data: Any,
        D: Optional[int] = None,
        is_torus: Any = True,
        metric_tensor: Any = None,
        metric_tensor_inv: Any = None,
    ) -> None:
        if isinstance(data, geom.MultiImage):
            D, is_torus = data.D, data.is_torus
            data = dict(data.items())
        if not isinstance(data, dict):
            raise TypeError(
                f"FilterBank: `data` (={type(data).__name__}) must be a geom.MultiImage of "
                "invariant filters"
            )
        blocks = {}
        for key, block in data.items():
            try:
                arr = np.asarray(block)
            except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
                raise TracedFiltersError(
                    f"FilterBank: the filters for key {key} are traced values; the kernels "
                    "specialise on the filter values, so build the FilterBank (and the layer) "
                    "outside jit/vmap from concrete arrays"
                ) from None
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(
                    f"FilterBank: the filters for key {key} have dtype {arr.dtype}; invariant "
                    "filters must be floating point"
                )
            blocks[key] = jnp.asarray(arr)
        self._frozen = False
        super().__init__(blocks, D, is_torus, metric_tensor, metric_tensor_inv)
        self._bases = {key: FilterBasis(np.asarray(b)) for key, b in self.items()}
        self._hash = hash((self.D, self.is_torus, tuple(self._bases.items())))
        self._frozen = True

    @property
    def bases(self) -> dict:
        """key -> kernels.FilterBasis (the static form the kernels take)."""
        return self._bases

    def __setitem__(self, idx: Any, val: Any) -> Any:
        if getattr(self, "_frozen", False):
            raise TypeError(
                "FilterBank is immutable: build a new one, e.g. "
                "FilterBank(filters.copy()) after changing the copy"
            )
        return super().__setitem__(idx, val)

    def append(self, k: Any, parity: int, image_block: Any, axis: int = 0) -> Any:
        if getattr(self, "_frozen", False):
            raise TypeError("FilterBank is immutable: append to `bank.copy()` instead")
        return super().append(k, parity, image_block, axis)

    def copy(self) -> geom.MultiImage:
        return geom.MultiImage(
            dict(self.items()), self.D, self.is_torus, self.metric_tensor, self.metric_tensor_inv
        )

    def empty(self, same_metric: bool = True) -> geom.MultiImage:
        return self.copy().empty(same_metric)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object, *args: Any, **kwargs: Any) -> bool:
        if self is other:
            return True
        if isinstance(other, FilterBank):
            return (
                self._hash == other._hash
                and self.D == other.D
                and self.is_torus == other.is_torus
                and list(self._bases.items()) == list(other._bases.items())
            )
        return super().__eq__(other, *args, **kwargs)


# A pytree node without children: the bank lives in the tree's structure (hashed by content), so
# plain jax.jit, make_jaxpr and vmap take a module holding one, as they took 0.1.8's array leaves.
jax.tree_util.register_pytree_node(FilterBank, lambda bank: ((), bank), lambda bank, _: bank)
