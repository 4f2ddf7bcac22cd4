"""Small signature helpers shared by the models."""

from __future__ import annotations

from typing import Optional

from ginjax import geometric as geom
from ginjax._validate import check_count


def flat_scalar_signature(signature: geom.Signature, D: int) -> geom.Signature:
    """The single scalar key holding every tensor component of `signature` as a channel."""
    channels = sum(c * D ** len(k) for (k, _), c in signature)
    return geom.Signature(((((), 0), channels),))


def model_signatures(
    D: int,
    input_keys: geom.Signature,
    output_keys: geom.Signature,
    depth: int,
    equivariant: bool,
    mid_keys: Optional[geom.Signature],
    model: str,
) -> tuple[geom.Signature, geom.Signature, geom.Signature]:
    """(block input, block output, mid) signatures; non-equivariant models flatten to scalars.
    `model` names the caller in errors: `depth` gives every hidden key its channels unless
    `mid_keys` is given, so it must then be a positive int."""
    if mid_keys is None:
        check_count(depth, model, "depth", minimum=1,
                    why="the channels of each key of the hidden signature (or pass `mid_keys`)")
    if equivariant:
        if mid_keys is None:
            mid_keys = geom.signature_union(input_keys, output_keys, depth)
        return input_keys, output_keys, mid_keys
    if mid_keys is None:
        mid_keys = geom.Signature(((((), 0), depth),))
    return flat_scalar_signature(input_keys, D), flat_scalar_signature(output_keys, D), mid_keys


def scaled_signature(signature: geom.Signature, factor: int) -> geom.Signature:
    """`signature` with every channel count multiplied by `factor`."""
    return geom.Signature(tuple((kp, c * factor) for kp, c in signature))


def check_signature(model: str, x: geom.MultiImage, D: int, signature: geom.Signature) -> None:
    """Raise a clear error unless `x` is an unbatched MultiImage of dimension D and `signature`."""
    if not isinstance(x, geom.MultiImage):
        raise TypeError(f"{model}: `x` (={type(x).__name__}) must be a geom.MultiImage")
    if x.D != D:
        raise ValueError(f"{model}: `x.D` (={x.D}) does not match the model's D (={D})")
    expected = {kp: c for kp, c in signature}
    got = {}
    for (k, p), block in x.items():
        if block.ndim != 1 + D + len(k):
            raise ValueError(
                f"{model}: block {(k, p)} of `x` has shape {tuple(block.shape)}, expected "
                f"(channels, *spatial{D}, *(D,)*{len(k)}); models are unbatched, use "
                "jax.vmap / eqx.filter_vmap for a batch"
            )
        got[(k, p)] = block.shape[0]
    if got != expected:
        raise ValueError(
            f"{model}: `x` has signature {tuple(got.items())}, but the model was built for "
            f"`input_keys` {tuple(expected.items())}"
        )


def in_signature_order(x: geom.MultiImage, signature: geom.Signature) -> geom.MultiImage:
    """`x` with its keys in the order of `signature`, so that flattening all tensor components
    into scalar channels (to_scalar_multi_image) gives the channel layout the model was built
    for, whatever order the caller inserted the keys in."""
    keys = [kp for kp, _ in signature]
    if list(x.keys()) == keys:
        return x
    out = x.empty()
    for k, p in keys:
        out.append(k, p, x[(k, p)])
    return out
