"""UNet (Ronneberger et al. 2015, arXiv:1505.04597), equivariant or not."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import equinox as eqx
import jax
import jax.random as random

from ginjax._validate import as_signature, check_key
from ginjax import geometric as geom
from ginjax import layers
from ginjax.models._base import AnyDimensionalModel
from ginjax.models._blocks import ConvBlock, make_conv
from ginjax.models._common import (
    check_signature,
    in_signature_order,
    model_signatures,
    scaled_signature,
)


class UNet(AnyDimensionalModel):
    """A UNet on MultiImages.

    `num_conv` ConvBlocks embed the input into `mid_keys`; each of `num_downsamples` levels max
    pools by 2 (by tensor norm when equivariant) and applies `num_conv` ConvBlocks doubling the
    channels; each level up upsamples by 2 with a transposed convolution (ConvContract with
    lhs_dilation 2 and `upsample_filters` when equivariant), concatenates the skip connection
    and applies `num_conv` ConvBlocks; a final convolution decodes to `output_keys`.

    The non-equivariant version flattens all tensor components into scalar channels.

    Shapes: input of signature `input_keys` with spatial sizes divisible by 2**num_downsamples;
    output of signature `output_keys`, same spatial sizes (unbatched).
    """

    embedding: list[ConvBlock]
    downsample_blocks: list[tuple[layers.MaxNormPool, list[ConvBlock]]]
    upsample_blocks: list[tuple[Union[layers.ConvContract, layers.LayerWrapper], list[ConvBlock]]]
    decode: Union[layers.ConvContract, layers.LayerWrapper]

    D: int = eqx.field(static=True)
    equivariant: bool = eqx.field(static=True)
    use_bias: Union[bool, str] = eqx.field(static=True)
    activation_f: Optional[Union[Callable, str]] = eqx.field(static=True)
    use_group_norm: bool = eqx.field(static=True)
    use_batch_norm: bool = eqx.field(static=True)
    input_keys: geom.Signature = eqx.field(static=True)
    output_keys: geom.Signature = eqx.field(static=True)
    mid_keys: geom.Signature = eqx.field(static=True)
    padding_mode: str = eqx.field(static=True)

    def __init__(
        self,
        D: int,
        input_keys: geom.Signature,
        output_keys: geom.Signature,
        depth: int,
        num_downsamples: int = 4,
        num_conv: int = 2,
        use_bias: Union[bool, str] = "auto",
        activation_f: Optional[Union[Callable, str]] = jax.nn.gelu,
        equivariant: bool = True,
        conv_filters: Optional[geom.MultiImage] = None,
        upsample_filters: Optional[geom.MultiImage] = None,
        kernel_size: Optional[Union[int, Sequence[int]]] = None,
        use_group_norm: bool = False,
        use_batch_norm: bool = False,
        mid_keys: Optional[geom.Signature] = None,
        padding_mode: str = "ZEROS",
        key: Any = None,
    ) -> None:
        """
        Args:
            D: dimension of the space.
            input_keys, output_keys: signatures of input and output.
            depth: channels per key at the top level (ignored when `mid_keys` is given).
            num_downsamples: number of pooling levels.
            num_conv: ConvBlocks per level.
            use_bias: convolution bias (see ConvContract / make_conv).
            activation_f: None, a name in ACTIVATION_REGISTRY or an elementwise callable.
            equivariant: equivariant layers or plain ones.
            conv_filters: invariant filters of the convolutions (equivariant).
            upsample_filters: invariant filters of the upsampling convolutions (equivariant,
                e.g. side 2).
            kernel_size: kernel side length(s) (non-equivariant).
            use_group_norm: GroupNorm in every ConvBlock.
            use_batch_norm: BatchNorm in every ConvBlock (non-equivariant only).
            mid_keys: signature of the top level; defaults to the union of input and output
                keys with `depth` channels each (a single scalar key if not equivariant).
            padding_mode: padding mode of the non-equivariant convolutions.
            key: jax.random key.
        """
        check_key(key, "UNet")
        if not isinstance(num_conv, int) or num_conv <= 0:
            raise ValueError(f"UNet: `num_conv` (={num_conv}) must be a positive int")
        if not isinstance(num_downsamples, int) or num_downsamples < 0:
            raise ValueError(
                f"UNet: `num_downsamples` (={num_downsamples}) must be a non-negative int"
            )
        input_keys = as_signature(input_keys, "UNet", "input_keys")
        output_keys = as_signature(output_keys, "UNet", "output_keys")
        self.input_keys = input_keys
        self.output_keys = output_keys
        if equivariant:
            if use_batch_norm:
                raise ValueError(
                    "UNet: `use_batch_norm` (=True) needs equivariant=False; use "
                    "`use_group_norm` for the equivariant model"
                )
            if conv_filters is None:
                raise ValueError("UNet: `conv_filters` (=None) is required when equivariant")
            if upsample_filters is None and num_downsamples > 0:
                raise ValueError(
                    "UNet: `upsample_filters` (=None) is required when equivariant and "
                    f"num_downsamples (={num_downsamples}) > 0"
                )
        block_in, block_out, mid_keys = model_signatures(
            D, input_keys, output_keys, depth, equivariant, mid_keys, "UNet"
        )

        self.D = D
        self.equivariant = equivariant
        self.use_bias = use_bias
        self.activation_f = activation_f
        self.use_group_norm = use_group_norm
        self.use_batch_norm = use_batch_norm
        self.mid_keys = mid_keys
        self.padding_mode = padding_mode

        def block(in_keys, out_keys, subkey) -> ConvBlock:
            return ConvBlock(
                D,
                in_keys,
                out_keys,
                use_bias,
                activation_f,
                equivariant,
                conv_filters,
                kernel_size,
                use_group_norm,
                use_batch_norm,
                padding_mode=padding_mode,
                key=subkey,
            )

        self.embedding = []
        for i in range(num_conv):
            key, subkey = random.split(key)
            self.embedding.append(block(block_in if i == 0 else mid_keys, mid_keys, subkey))

        self.downsample_blocks = []
        for level in range(1, num_downsamples + 1):
            level_keys = scaled_signature(mid_keys, 2**level)
            convs = []
            for i in range(num_conv):
                in_keys = scaled_signature(mid_keys, 2 ** (level - 1)) if i == 0 else level_keys
                key, subkey = random.split(key)
                convs.append(block(in_keys, level_keys, subkey))
            self.downsample_blocks.append((layers.MaxNormPool(2, equivariant), convs))

        if equivariant:
            up_padding, up_stride, up_kernel = ((1, 1),) * D, (1,) * D, None
        else:  # ConvTranspose: the geometry of the 2x2 stride-2 convolution it transposes
            up_padding, up_stride, up_kernel = "VALID", (2,) * D, (2,) * D
        self.upsample_blocks = []
        for level in reversed(range(num_downsamples)):
            below = scaled_signature(mid_keys, 2 ** (level + 1))
            here = scaled_signature(mid_keys, 2**level)
            key, subkey = random.split(key)
            upsample = make_conv(
                D,
                below,
                here,
                use_bias,
                equivariant,
                upsample_filters,
                up_kernel,
                up_stride,
                up_padding,
                (2,) * D,
                padding_mode=padding_mode,
                key=subkey,
            )
            convs = []
            for i in range(num_conv):
                # the skip connection doubles the channels entering the first block
                key, subkey = random.split(key)
                convs.append(block(below if i == 0 else here, here, subkey))
            self.upsample_blocks.append((upsample, convs))

        key, subkey = random.split(key)
        self.decode = make_conv(
            D,
            mid_keys,
            block_out,
            use_bias,
            equivariant,
            conv_filters,
            kernel_size,
            padding_mode=padding_mode,
            key=subkey,
        )

    def convertD(
        self,
        conv_filters: geom.MultiImage,
        rescale: geom.Rescaling,
        key: jax.Array,
        **kwargs,
    ) -> "UNet":
        """Rebuild for the dimension of `conv_filters` (equivariant models only).

        Args:
            conv_filters: the new dimension's invariant filters.
            rescale: the weight rescaling, a geom.Rescaling.
            key: jax.random key to build the new model (its weights are overwritten).
            upsample_filters: keyword, the new dimension's upsampling filters (required).

        Returns:
            the converted UNet with this model's weights.
        """
        if not self.equivariant:
            raise ValueError("UNet.convertD: only equivariant models (equivariant=True) convert")
        if "upsample_filters" not in kwargs:
            raise ValueError(
                "UNet.convertD: pass the new dimension's `upsample_filters` as a keyword"
            )
        new_model = type(self)(
            conv_filters.D,
            self.input_keys,
            self.output_keys,
            0,  # unused: mid_keys is given
            len(self.downsample_blocks),
            len(self.embedding),
            self.use_bias,
            self.activation_f,
            self.equivariant,
            conv_filters,
            kwargs["upsample_filters"],
            None,
            self.use_group_norm,
            self.use_batch_norm,
            self.mid_keys,
            self.padding_mode,
            key,
        )
        return self.transfer_weights(new_model, rescale)

    def __call__(
        self, x: geom.MultiImage, batch_stats: Optional[eqx.nn.State] = None
    ) -> tuple[geom.MultiImage, Optional[eqx.nn.State]]:
        """Apply the UNet to `x` (unbatched); returns the output and the batch_stats."""
        check_signature("UNet", x, self.D, self.input_keys)
        levels = len(self.downsample_blocks)
        spatial = x.get_spatial_dims()
        if any(n % (2**levels) != 0 for n in spatial):
            raise ValueError(
                f"UNet: every spatial size must be divisible by 2**num_downsamples "
                f"(={2**levels}, num_downsamples={levels}), but `x` has spatial shape {spatial}"
            )
        if not self.equivariant:
            x = in_signature_order(x, self.input_keys).to_scalar_multi_image()
        for layer in self.embedding:
            x, batch_stats = layer(x, batch_stats)

        skips = []
        for pool, convs in self.downsample_blocks:
            skips.append(x)
            x = pool(x)
            for layer in convs:
                x, batch_stats = layer(x, batch_stats)

        for (upsample, convs), skip in zip(self.upsample_blocks, reversed(skips)):
            x = upsample(x).concat(skip)
            for layer in convs:
                x, batch_stats = layer(x, batch_stats)

        x = self.decode(x)
        if not self.equivariant:
            x = geom.MultiImage.from_scalar_multi_image(x, self.output_keys)
        return x, batch_stats
