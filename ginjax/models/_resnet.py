"""ResNet and the dilated ResNet of Stachenfeld et al. (arXiv:2112.15275)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.random as random

from ginjax._validate import as_signature, check_count, check_key
from ginjax import geometric as geom
from ginjax.models._base import AnyDimensionalModel
from ginjax.models._blocks import ConvBlock
from ginjax.models._common import check_signature, in_signature_order, model_signatures

_DILATIONS = (1, 2, 4, 8, 4, 2, 1)


def _residual_layers(
    D, block_in, block_out, mid_keys, num_blocks, block_conv_kwargs, use_bias, activation_f,
    equivariant, conv_filters, kernel_size, use_group_norm, padding_mode, key,
) -> tuple[list[ConvBlock], list[list[ConvBlock]], list[ConvBlock]]:
    """(encoder, blocks, decoder) of a residual model.

    The encoder is two 1x1 (non-equivariant) ConvBlocks into `mid_keys`, the decoder two out of
    it (the last without activation); each of the `num_blocks` residual blocks has one ConvBlock
    per entry of `block_conv_kwargs`, the extra ConvBlock arguments that make the models differ.
    The key is split for the encoder, then for each block's ConvBlocks, then for the decoder.
    """
    key, enc1, enc2 = random.split(key, num=3)
    blocks = []
    for _ in range(num_blocks):
        block = []
        for conv_kwargs in block_conv_kwargs:
            key, subkey = random.split(key)
            block.append(
                ConvBlock(
                    D, mid_keys, mid_keys, use_bias, activation_f, equivariant, conv_filters,
                    kernel_size, use_group_norm, padding_mode=padding_mode, key=subkey,
                    **conv_kwargs,
                )
            )
        blocks.append(block)
    key, dec1, dec2 = random.split(key, num=3)

    def one_by_one(in_keys, out_keys, act, subkey):
        return ConvBlock(
            D, in_keys, out_keys, use_bias, act, equivariant, conv_filters, 1,
            padding_mode=padding_mode, key=subkey,
        )

    encoder = [
        one_by_one(block_in, mid_keys, activation_f, enc1),
        one_by_one(mid_keys, mid_keys, activation_f, enc2),
    ]
    decoder = [
        one_by_one(mid_keys, mid_keys, activation_f, dec1),
        one_by_one(mid_keys, block_out, None, dec2),
    ]
    return encoder, blocks, decoder


def _checked_signatures(name, key, num_blocks, input_keys, output_keys):
    """The argument checks DilResNet and ResNet open with; returns (input_keys, output_keys) as
    signatures."""
    check_key(key, name)
    check_count(num_blocks, name, "num_blocks")
    input_keys = as_signature(input_keys, name, "input_keys")
    output_keys = as_signature(output_keys, name, "output_keys")
    return input_keys, output_keys


def _init_residual_model(
    model, name, D, input_keys, output_keys, depth, num_blocks, block_conv_kwargs, use_bias,
    activation_f, equivariant, conv_filters, kernel_size, use_group_norm, mid_keys, padding_mode,
    key,
) -> None:
    """Set the fields DilResNet and ResNet share on `model` (inside its __init__) and build its
    layers with `_residual_layers`; the signatures come from `_checked_signatures`."""
    if equivariant and conv_filters is None:
        raise ValueError(f"{name}: `conv_filters` (=None) is required when equivariant")
    model.D = D
    model.equivariant = equivariant
    model.output_keys = output_keys
    model.input_keys = input_keys
    block_in, block_out, mid_keys = model_signatures(
        D, input_keys, output_keys, depth, equivariant, mid_keys, name
    )
    model.use_bias = use_bias
    model.activation_f = activation_f
    model.use_group_norm = use_group_norm
    model.mid_keys = mid_keys
    model.padding_mode = padding_mode

    model.encoder, model.blocks, model.decoder = _residual_layers(
        D, block_in, block_out, mid_keys, num_blocks, block_conv_kwargs, use_bias, activation_f,
        equivariant, conv_filters, kernel_size, use_group_norm, padding_mode, key,
    )


def _run_residual(model, x: geom.MultiImage) -> geom.MultiImage:
    check_signature(type(model).__name__, x, model.D, model.input_keys)
    if not model.equivariant:
        x = in_signature_order(x, model.input_keys).to_scalar_multi_image()
    for layer in model.encoder:
        x, _ = layer(x)
    for block in model.blocks:
        residual = x
        for layer in block[:-1]:
            x, _ = layer(x)
        # the block's last ConvBlock adds the residual as it writes its output (its ConvContract
        # in preactivation order, else its VectorNeuron)
        x, _ = block[-1](x, residual=residual) if block else (x + residual, None)
    for layer in model.decoder:
        x, _ = layer(x)
    if not model.equivariant:
        x = geom.MultiImage.from_scalar_multi_image(x, model.output_keys)
    return x


class DilResNet(AnyDimensionalModel):
    """Dilated ResNet: encoder, `num_blocks` residual blocks of seven ConvBlocks with dilations
    1, 2, 4, 8, 4, 2, 1, decoder.

    Shapes: input of signature `input_keys`, output of signature `output_keys`, same spatial
    sizes (unbatched). `aux_data` is passed through unused.
    """

    encoder: list[ConvBlock]
    blocks: list[list[ConvBlock]]
    decoder: list[ConvBlock]

    D: int = eqx.field(static=True)
    output_keys: geom.Signature = eqx.field(static=True)
    input_keys: geom.Signature = eqx.field(static=True)
    use_bias: Union[bool, str] = eqx.field(static=True)
    activation_f: Optional[Union[Callable, str]] = eqx.field(static=True)
    equivariant: bool = eqx.field(static=True)
    use_group_norm: bool = eqx.field(static=True)
    mid_keys: geom.Signature = eqx.field(static=True)
    padding_mode: str = eqx.field(static=True)

    def __init__(
        self,
        D: int,
        input_keys: geom.Signature,
        output_keys: geom.Signature,
        depth: int,
        num_blocks: int = 4,
        use_bias: Union[bool, str] = "auto",
        activation_f: Optional[Union[Callable, str]] = jax.nn.relu,
        equivariant: bool = True,
        conv_filters: Optional[geom.MultiImage] = None,
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        use_group_norm: bool = False,
        mid_keys: Optional[geom.Signature] = None,
        padding_mode: str = "ZEROS",
        key: Any = None,
    ) -> None:
        """
        Args:
            D: dimension of the space.
            input_keys, output_keys: signatures of input and output.
            depth: channels per key of the hidden layers (ignored when `mid_keys` is given).
            num_blocks: number of dilated residual blocks.
            use_bias: convolution bias (see make_conv).
            activation_f: None, a name in ACTIVATION_REGISTRY or an elementwise callable.
            equivariant: equivariant layers (needs `conv_filters`) or plain ones (needs
                `kernel_size`).
            conv_filters: invariant filters.
            kernel_size: kernel side length(s) of the dilated plain convolutions.
            use_group_norm: GroupNorm in the dilated ConvBlocks.
            mid_keys: hidden signature; defaults to the union of input and output keys with
                `depth` channels each (a single scalar key if not equivariant).
            padding_mode: padding mode of the non-equivariant convolutions.
            key: jax.random key.
        """
        input_keys, output_keys = _checked_signatures(
            "DilResNet", key, num_blocks, input_keys, output_keys
        )
        _init_residual_model(
            self, "DilResNet", D, input_keys, output_keys, depth, num_blocks,
            [{"rhs_dilation": (dilation,) * D} for dilation in _DILATIONS],
            use_bias, activation_f, equivariant, conv_filters, kernel_size, use_group_norm,
            mid_keys, padding_mode, key,
        )

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the model to `x` (unbatched); returns the output and `aux_data` unchanged."""
        return _run_residual(self, x), aux_data

    def convertD(
        self, conv_filters: geom.MultiImage, rescale: geom.Rescaling, key: jax.Array, **kwargs
    ) -> "DilResNet":
        """Rebuild for the dimension of `conv_filters` (equivariant only), keeping the weights."""
        if not self.equivariant:
            raise ValueError(
                "DilResNet.convertD: only equivariant models (equivariant=True) convert"
            )
        new_model = type(self)(
            conv_filters.D,
            self.input_keys,
            self.output_keys,
            0,  # unused: mid_keys is given
            len(self.blocks),
            self.use_bias,
            self.activation_f,
            self.equivariant,
            conv_filters,
            None,
            self.use_group_norm,
            self.mid_keys,
            self.padding_mode,
            key,
        )
        return self.transfer_weights(new_model, rescale)


class ResNet(AnyDimensionalModel):
    """ResNet: encoder, `num_blocks` residual blocks of `num_conv` ConvBlocks (by default with
    GroupNorm, in preactivation order), decoder.

    Shapes: input of signature `input_keys`, output of signature `output_keys`, same spatial
    sizes (unbatched). `aux_data` is passed through unused.
    """

    encoder: list[ConvBlock]
    blocks: list[list[ConvBlock]]
    decoder: list[ConvBlock]

    D: int = eqx.field(static=True)
    equivariant: bool = eqx.field(static=True)
    output_keys: geom.Signature = eqx.field(static=True)
    input_keys: geom.Signature = eqx.field(static=True)
    use_bias: Union[bool, str] = eqx.field(static=True)
    activation_f: Union[Callable, str] = eqx.field(static=True)
    use_group_norm: bool = eqx.field(static=True)
    preactivation_order: bool = eqx.field(static=True)
    mid_keys: geom.Signature = eqx.field(static=True)
    padding_mode: str = eqx.field(static=True)

    def __init__(
        self,
        D: int,
        input_keys: geom.Signature,
        output_keys: geom.Signature,
        depth: int,
        num_blocks: int = 8,
        num_conv: int = 2,
        use_bias: Union[bool, str] = "auto",
        activation_f: Union[Callable, str] = jax.nn.gelu,
        equivariant: bool = True,
        conv_filters: Optional[geom.MultiImage] = None,
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        use_group_norm: bool = True,
        preactivation_order: bool = True,
        mid_keys: Optional[geom.Signature] = None,
        padding_mode: str = "ZEROS",
        key: Any = None,
    ) -> None:
        """
        Args:
            D: dimension of the space.
            input_keys, output_keys: signatures of input and output.
            depth: channels per key of the hidden layers (ignored when `mid_keys` is given).
            num_blocks: number of residual blocks.
            num_conv: ConvBlocks per residual block.
            use_bias: convolution bias (see make_conv).
            activation_f: a name in ACTIVATION_REGISTRY or an elementwise callable.
            equivariant: equivariant layers (needs `conv_filters`) or plain ones (needs
                `kernel_size`).
            conv_filters: invariant filters.
            kernel_size: kernel side length(s) of the residual plain convolutions.
            use_group_norm: GroupNorm in the residual ConvBlocks.
            preactivation_order: norm -> activation -> conv in the residual ConvBlocks.
            mid_keys: hidden signature; defaults to the union of input and output keys with
                `depth` channels each (a single scalar key if not equivariant).
            padding_mode: padding mode of the non-equivariant convolutions (e.g. 'CIRCULAR').
            key: jax.random key.
        """
        input_keys, output_keys = _checked_signatures(
            "ResNet", key, num_blocks, input_keys, output_keys
        )
        if not isinstance(num_conv, int) or num_conv <= 0:
            raise ValueError(f"ResNet: `num_conv` (={num_conv}) must be a positive int")
        _init_residual_model(
            self, "ResNet", D, input_keys, output_keys, depth, num_blocks,
            [{"preactivation_order": preactivation_order}] * num_conv,
            use_bias, activation_f, equivariant, conv_filters, kernel_size, use_group_norm,
            mid_keys, padding_mode, key,
        )
        self.preactivation_order = preactivation_order

    def __call__(
        self, x: geom.MultiImage, aux_data: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the model to `x` (unbatched); returns the output and `aux_data` unchanged."""
        return _run_residual(self, x), aux_data

    def convertD(
        self, conv_filters: geom.MultiImage, rescale: geom.Rescaling, key: jax.Array, **kwargs
    ) -> "ResNet":
        """Rebuild for the dimension of `conv_filters` (equivariant only), keeping the weights."""
        if not self.equivariant:
            raise ValueError("ResNet.convertD: only equivariant models (equivariant=True) convert")
        new_model = type(self)(
            conv_filters.D,
            self.input_keys,
            self.output_keys,
            0,  # unused: mid_keys is given
            len(self.blocks),
            len(self.blocks[0]) if self.blocks else 2,
            self.use_bias,
            self.activation_f,
            self.equivariant,
            conv_filters,
            None,
            self.use_group_norm,
            self.preactivation_order,
            self.mid_keys,
            self.padding_mode,
            key,
        )
        return self.transfer_weights(new_model, rescale)
