"""Building blocks of the models: activations, convolutions and ConvBlock."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.random as random
from jaxtyping import ArrayLike

from ginjax._validate import check_key
from ginjax import geometric as geom
from ginjax import layers
from ginjax.models._base import MultiImageModule

ACTIVATION_REGISTRY: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jax.nn.tanh,
}

_SCALAR = ((), 0)


def _lookup_activation(name: str) -> Callable:
    if name not in ACTIVATION_REGISTRY:
        raise ValueError(
            f"`activation_f` (={name!r}) must be a callable, None or one of "
            f"{sorted(ACTIVATION_REGISTRY)}"
        )
    return ACTIVATION_REGISTRY[name]


def handle_activation(
    activation_f: Optional[Union[Callable, str]],
    equivariant: bool,
    input_keys: geom.Signature,
    D: int,
    key: ArrayLike,
) -> Callable[[Any], geom.MultiImage]:
    """The activation layer for a MultiImage of signature `input_keys`.

    Args:
        activation_f: None (identity), a name in ACTIVATION_REGISTRY, or an elementwise callable.
        equivariant: if True, a VectorNeuronNonlinear with that scalar activation; otherwise the
            activation applied elementwise through a LayerWrapper.
        input_keys: signature of the MultiImages the layer will see.
        D: dimension of the space.
        key: jax.random key (for the VectorNeuronNonlinear weights).

    Returns:
        a callable MultiImage -> MultiImage.
    """
    if isinstance(activation_f, str):
        activation_f = _lookup_activation(activation_f)
    elif activation_f is not None and not callable(activation_f):
        raise ValueError(
            f"`activation_f` (={activation_f!r}) must be a callable, None or one of "
            f"{sorted(ACTIVATION_REGISTRY)}"
        )
    if equivariant:
        if activation_f is None:
            return eqx.nn.Identity()
        return layers.VectorNeuronNonlinear(input_keys, D, activation_f, key=key)
    if activation_f is None:
        return layers.LayerWrapper(eqx.nn.Identity(), input_keys)
    return layers.LayerWrapper(activation_f, input_keys)


def make_conv(
    D: int,
    input_keys: geom.Signature,
    target_keys: geom.Signature,
    use_bias: Union[str, bool],
    equivariant: bool,
    invariant_filters: Optional[geom.MultiImage] = None,
    kernel_size: Optional[Union[int, Sequence[int]]] = None,
    stride: Union[tuple[int, ...], int] = 1,
    padding: Optional[Union[str, int, tuple[tuple[int, int], ...]]] = None,
    lhs_dilation: Optional[tuple[int, ...]] = None,
    rhs_dilation: Union[int, tuple[int, ...]] = 1,
    padding_mode: str = "ZEROS",
    key: Any = None,
) -> Union[layers.ConvContract, layers.LayerWrapper]:
    """A convolution layer: equivariant ConvContract, or a plain equinox convolution.

    Args:
        D: dimension of the space.
        input_keys, target_keys: signatures of input and output. The plain convolution needs a
            single scalar key on each side (flatten tensors with to_scalar_multi_image first).
        use_bias: ConvContract's use_bias; for the plain convolution True/'auto' or False.
        equivariant: ConvContract if True, else eqx.nn.Conv (eqx.nn.ConvTranspose when
            `lhs_dilation` is given: then `stride` and `padding` describe the forward
            convolution it transposes).
        invariant_filters: the filter bank, required if equivariant.
        kernel_size: side length(s) of the plain convolution's kernel, required if not
            equivariant (ignored otherwise).
        stride, padding, lhs_dilation, rhs_dilation: convolution geometry. For the plain
            convolution padding defaults to 'SAME'.
        padding_mode: plain convolution only, e.g. 'ZEROS' or 'CIRCULAR' (used with 'SAME').
        key: jax.random key.

    Returns:
        a ConvContract, or a LayerWrapper around the equinox convolution.
    """
    check_key(key, "make_conv")
    if equivariant:
        if invariant_filters is None:
            raise ValueError(
                "make_conv: `invariant_filters` (=None) is required for an equivariant "
                "convolution (equivariant=True)"
            )
        if invariant_filters.D != D:
            raise ValueError(
                f"make_conv: `invariant_filters` are for D={invariant_filters.D}, but `D` (={D})"
            )
        return layers.ConvContract(
            input_keys,
            target_keys,
            invariant_filters,
            use_bias,
            stride,
            padding,
            lhs_dilation,
            rhs_dilation,
            key,
        )

    if kernel_size is None:
        raise ValueError(
            "make_conv: `kernel_size` (=None) is required for a non-equivariant convolution"
        )
    for name, sig in (("input_keys", input_keys), ("target_keys", target_keys)):
        if len(sig) != 1 or sig[0][0] != _SCALAR:
            raise ValueError(
                f"make_conv: a non-equivariant convolution needs a single scalar key in "
                f"`{name}`, got {tuple(sig)} (convert with MultiImage.to_scalar_multi_image)"
            )
    if padding is None:
        padding = "SAME"
    if padding != "SAME":
        padding_mode = "ZEROS"  # equinox pads in other modes only for SAME-style padding here
    if use_bias == "auto":
        use_bias = True
    if not isinstance(use_bias, bool):
        raise ValueError(
            f"make_conv: `use_bias` (={use_bias!r}) must be True, False or 'auto' for a "
            "non-equivariant convolution"
        )
    in_c, out_c = input_keys[0][1], target_keys[0][1]
    if lhs_dilation is None:
        conv = eqx.nn.Conv(
            D,
            in_c,
            out_c,
            kernel_size,
            stride,
            padding,
            rhs_dilation,
            use_bias=use_bias,
            padding_mode=padding_mode,
            key=key,
        )
    else:
        conv = eqx.nn.ConvTranspose(
            D,
            in_c,
            out_c,
            kernel_size,
            stride,
            padding,
            dilation=rhs_dilation,
            use_bias=use_bias,
            padding_mode=padding_mode,
            key=key,
        )
    return layers.LayerWrapper(conv, input_keys)


class ConvBlock(MultiImageModule):
    """Convolution, normalisation (GroupNorm or BatchNorm) and activation.

    Order conv -> norm -> activation, or norm -> activation -> conv with preactivation_order.
    Equivariant blocks use ConvContract, LayerNorm and VectorNeuronNonlinear; non-equivariant
    ones an equinox convolution on a scalar MultiImage, eqx.nn.GroupNorm(1) or eqx.nn.BatchNorm
    and an elementwise activation.

    Shapes: input of signature `input_keys`, output of signature `output_keys` (unbatched).
    """

    conv: Union[layers.ConvContract, layers.LayerWrapper]
    group_norm: Optional[Union[layers.GroupNorm, layers.LayerWrapper]]
    batch_norm: Optional[layers.LayerWrapperAux]
    nonlinearity: Union[layers.VectorNeuronNonlinear, layers.LayerWrapper, Callable]

    D: int = eqx.field(static=True)
    equivariant: bool = eqx.field(static=True)
    use_batch_norm: bool = eqx.field(static=True)
    use_group_norm: bool = eqx.field(static=True)
    preactivation_order: bool = eqx.field(static=True)

    def __init__(
        self,
        D: int,
        input_keys: geom.Signature,
        output_keys: geom.Signature,
        use_bias: Union[bool, str] = "auto",
        activation_f: Optional[Union[Callable, str]] = jax.nn.gelu,
        equivariant: bool = True,
        conv_filters: Optional[geom.MultiImage] = None,
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        use_group_norm: bool = False,
        use_batch_norm: bool = False,
        preactivation_order: bool = False,
        key: Any = None,
        **conv_kwargs: Any,
    ) -> None:
        """
        Args:
            D: dimension of the space.
            input_keys, output_keys: signatures of input and output.
            use_bias: bias of the convolution (see make_conv).
            activation_f: None, a name in ACTIVATION_REGISTRY or an elementwise callable.
            equivariant: equivariant layers (needs `conv_filters`) or plain ones (needs
                `kernel_size`).
            conv_filters: the invariant filter bank.
            kernel_size: kernel side length(s) of the plain convolution.
            use_group_norm: add a (single group) GroupNorm after the convolution.
            use_batch_norm: add an eqx.nn.BatchNorm (non-equivariant only; needs the vmap axis
                names "pmap_batch" and "batch" and an eqx.nn.State).
            preactivation_order: norm -> activation -> conv instead of conv -> norm -> activation.
            key: jax.random key.
            conv_kwargs: stride, padding, lhs_dilation, rhs_dilation, padding_mode for make_conv.
        """
        check_key(key, "ConvBlock")
        if use_batch_norm and equivariant:
            raise ValueError(
                "ConvBlock: `use_batch_norm` (=True) is only available for non-equivariant blocks "
                "(equivariant=False); use `use_group_norm` for equivariant ones"
            )
        self.D = D
        self.equivariant = equivariant
        self.use_group_norm = use_group_norm
        self.use_batch_norm = use_batch_norm
        self.preactivation_order = preactivation_order

        conv_key, act_key = random.split(key)
        self.conv = make_conv(
            D,
            input_keys,
            output_keys,
            use_bias,
            equivariant,
            conv_filters,
            kernel_size,
            key=conv_key,
            **conv_kwargs,
        )
        # in preactivation order the norm and activation see the input, else the output
        norm_keys = input_keys if preactivation_order else output_keys
        if use_group_norm:
            if equivariant:
                self.group_norm = layers.LayerNorm(norm_keys, D)
            else:
                self.group_norm = layers.LayerWrapper(
                    eqx.nn.GroupNorm(1, norm_keys[0][1]), norm_keys
                )
        else:
            self.group_norm = None
        if use_batch_norm:
            self.batch_norm = layers.LayerWrapperAux(
                eqx.nn.BatchNorm(norm_keys[0][1], axis_name=["pmap_batch", "batch"]), norm_keys
            )
        else:
            self.batch_norm = None
        self.nonlinearity = handle_activation(activation_f, equivariant, norm_keys, D, act_key)

    def _norm_and_activate(
        self, x: geom.MultiImage, batch_stats: Optional[eqx.nn.State], residual: Optional[geom.MultiImage] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """norm -> activation, plus `residual` if given (added by the VectorNeuron's kernels as
        they write their output, else by `+`)."""
        vn = isinstance(self.nonlinearity, layers.VectorNeuronNonlinear)
        given = {} if residual is None else {"residual": residual}
        if self.use_group_norm and isinstance(self.group_norm, layers.GroupNorm) and vn:
            # the vector blocks' norm as the VectorNeuron's affine map (layers.normalize_and_activate)
            return layers.normalize_and_activate(self.group_norm, self.nonlinearity, x, **given), batch_stats
        if self.use_group_norm:
            x = self.group_norm(x)
        elif self.use_batch_norm:
            x, batch_stats = self.batch_norm(x, batch_stats)
        if vn:
            return self.nonlinearity(x, **given), batch_stats
        y = self.nonlinearity(x)
        return (y if residual is None else y + residual), batch_stats

    def __call__(
        self, x: geom.MultiImage, batch_stats: Optional[eqx.nn.State] = None, *,
        residual: Optional[geom.MultiImage] = None,
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the block to `x` (unbatched); returns the output and the (updated) batch_stats.

        `residual` (the residual models' use; not in ginjax 0.1.8's call): None, or a MultiImage
        added to the block's output by the layer that writes it: the ConvContract in
        preactivation order (its `residual`), else the VectorNeuron's kernels, so no pass of its
        own runs over the output."""
        if not self.preactivation_order:
            return self._norm_and_activate(self.conv(x), batch_stats, residual)
        x, batch_stats = self._norm_and_activate(x, batch_stats)
        if residual is not None and isinstance(self.conv, layers.ConvContract):
            return self.conv(x, residual=residual), batch_stats
        y = self.conv(x)
        return (y if residual is None else y + residual), batch_stats
