"""Spatial domain decomposition of ConvContract over a device mesh.

    mesh = jax.make_mesh((2, 2), ("batch", "space"))
    with kernels.spatial_sharding(mesh, {0: "space"}, batch_axis="batch"):
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model, x)   # traced inside the block

While a `spatial_sharding` is active (at trace time), every `kernels.conv_contract` runs under
`shard_map`: each device holds a slab of the grid along the named spatial axes, receives from its
neighbours the halo planes the filter reaches into ((M-1)/2 * rhs_dilation for 'SAME'/'TORUS'
padding) through `lax.ppermute`, and runs the local backend (fused kernels included: XLA cannot
partition a custom call, shard_map hands it whole local blocks) on its slab with no padding along
the split axes. Torus axes pass halos around the ring; other axes get zero halos at the ends.

Under the user's `jax.vmap` over a batch, a `custom_vmap` rule puts the batch on `batch_axis` of
the mesh (data parallelism composed with the spatial split). Everything outside ConvContract
(norms, pooling, activations) is plain lax on the sharded arrays shard_map returns, so XLA's SPMD
partitioner splits it and reduces across shards by itself.

The split is exact: the local problem is the slice of the global padded (wrapped, dilated,
zero-padded) input that the shard's outputs read, so strides, rhs/lhs dilations (the UNet's
transposed convolution) and explicit paddings work whenever every shard's window has the same
shape. Configurations where it does not (e.g. 'VALID' padding, whose output does not split
evenly) and grids not divisible by the device count raise a ValueError saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import _bias, _registry
from ._spec import ConvSpec

# backends built from lax ops only: shard_map's replication check understands them
_LAX_BACKENDS = ("reference", "dense")

AxisMap = Union[Mapping[int, str], Sequence[Optional[str]]]

_local = threading.local()


# ---- the layout: which grid axis lives on which mesh axis --------------------------------------
@dataclasses.dataclass(frozen=True)
class SpatialSharding:
    """How ConvContract inputs are laid out over a mesh.

    Attributes:
        mesh: a jax.sharding.Mesh.
        axis_map: sorted (spatial axis, mesh axis name) pairs; spatial axis 0 is the first grid
            axis of a block (c, *spatial, *tensor).
        batch_axis: mesh axis that splits the vmapped batch (data parallelism), or None.
        check_vma: shard_map's replication check (check_vma / check_rep); None: on for the lax
            backends, off for the fused ones (a pallas_call's outputs carry no replication type).
            Gradients are right either way.
    """

    mesh: Mesh
    axis_map: tuple[tuple[int, str], ...]
    batch_axis: Optional[str] = None
    check_vma: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"`mesh` (={type(self.mesh).__name__}) must be a jax.sharding.Mesh")
        names = tuple(self.mesh.axis_names)
        used = [name for _, name in self.axis_map]
        if self.batch_axis is not None:
            used.append(self.batch_axis)
        for name in used:
            if name not in names:
                raise ValueError(f"mesh axis {name!r} is not an axis of the mesh (axes {names})")
        if len(set(used)) != len(used):
            raise ValueError(
                f"each mesh axis may split one thing only; axis_map={dict(self.axis_map)}, "
                f"batch_axis={self.batch_axis!r}"
            )
        axes = [ax for ax, _ in self.axis_map]
        if len(set(axes)) != len(axes) or any(ax < 0 for ax in axes):
            raise ValueError(f"`axis_map` (={dict(self.axis_map)}) must map distinct axes >= 0")

    def devices_of(self, name: str) -> int:
        return int(self.mesh.shape[name])

    def block_spec(self, ndim: int, D: int, batched: bool = True) -> PartitionSpec:
        """PartitionSpec of a block (batch?, c, *spatial, *tensor) with `ndim` dimensions."""
        lead = 1 if batched else 0
        if ndim < lead + 1 + D:
            raise ValueError(
                f"a block with {ndim} dims cannot be (batch, c, *spatial[{D}], ...)"
                if batched
                else f"a block with {ndim} dims cannot be (c, *spatial[{D}], ...)"
            )
        for ax, _ in self.axis_map:
            if ax >= D:
                raise ValueError(f"`axis_map` names spatial axis {ax}, but the grid has D={D} axes")
        spatial = dict(self.axis_map)
        entries = ([self.batch_axis] if batched else []) + [None]
        entries += [spatial.get(ax) for ax in range(D)]
        entries += [None] * (ndim - len(entries))
        return PartitionSpec(*entries)

    def place(self, tree: Any, D: int, batched: bool = True) -> Any:
        """device_put every block of `tree` (e.g. a MultiImage) with this layout.

        Leaves with at least (batch, c, *spatial) dims are split; smaller leaves are replicated.
        Raises ValueError when a split axis is not divisible by its mesh axis.
        """
        lead = 1 if batched else 0

        def put(leaf):
            leaf = jnp.asarray(leaf)
            if leaf.ndim < lead + 1 + D:
                return jax.device_put(leaf, NamedSharding(self.mesh, PartitionSpec()))
            spec = self.block_spec(leaf.ndim, D, batched)
            for dim, name in enumerate(spec):
                if name is not None and leaf.shape[dim] % self.devices_of(name):
                    what = "batch axis" if batched and dim == 0 else f"spatial axis {dim - lead - 1}"
                    raise ValueError(
                        f"{what} (={leaf.shape[dim]}) of a block of shape {leaf.shape} is not "
                        f"divisible by the {self.devices_of(name)} devices of mesh axis {name!r}"
                    )
            return jax.device_put(leaf, NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map(put, tree)


def make_layout(
    mesh: Mesh, axis_map: AxisMap, batch_axis: Optional[str] = None, *, check_vma: Optional[bool] = None
) -> SpatialSharding:
    """A `SpatialSharding` from `{spatial axis: mesh axis}` or a per-axis sequence of names/None."""
    if isinstance(axis_map, Mapping):
        pairs = axis_map.items()
    elif isinstance(axis_map, (tuple, list)):
        pairs = [(ax, name) for ax, name in enumerate(axis_map) if name is not None]
    else:
        raise TypeError(
            f"`axis_map` (={axis_map!r}) must be a dict {{spatial axis: mesh axis name}} or a "
            "sequence of mesh axis names (None for unsplit axes)"
        )
    normalised = []
    for ax, name in pairs:
        if not isinstance(ax, (int, np.integer)) or isinstance(ax, bool):
            raise ValueError(f"`axis_map` key {ax!r} must be a spatial axis index (int)")
        normalised.append((int(ax), name))
    if not normalised:
        raise ValueError(f"`axis_map` (={axis_map!r}) splits no spatial axis")
    return SpatialSharding(mesh, tuple(sorted(normalised)), batch_axis, check_vma)


@contextlib.contextmanager
def spatial_sharding(
    mesh: Mesh, axis_map: AxisMap, batch_axis: Optional[str] = None, *, check_vma: Optional[bool] = None
):
    """Within the block, ConvContract runs domain-decomposed over `mesh` (see module docstring).

    Also a decorator: `jax.jit(kernels.spatial_sharding(mesh, {0: "x"})(step))` enters it on
    every trace. The layout is read when a function is traced. Entered outside jit, the block also
    sets `mesh` as JAX's current mesh (jax.set_mesh), which is part of jit's cache key: a step
    traced before the block is traced again inside it. Two layouts on the same mesh are not told
    apart by that key: give each its own jitted function.

    Args:
        mesh: the jax.sharding.Mesh.
        axis_map: {spatial axis: mesh axis name}, e.g. {0: "space"}, or ("space", None, None).
        batch_axis: mesh axis that splits the vmapped batch, or None.
        check_vma: shard_map's replication check; None picks it per backend.
    """
    layout = make_layout(mesh, axis_map, batch_axis, check_vma=check_vma)
    previous = getattr(_local, "layout", None)
    with contextlib.ExitStack() as stack:
        _enter_mesh(stack, mesh)
        _local.layout = layout
        try:
            yield layout
        finally:
            _local.layout = previous


def _enter_mesh(stack: contextlib.ExitStack, mesh: Mesh) -> None:
    """Make `mesh` JAX's current mesh, so jit caches traces per mesh; inside a trace (decorator
    use under jit) JAX refuses, and the enclosing trace is fresh anyway."""
    set_mesh = getattr(jax, "set_mesh", None) or getattr(jax.sharding, "use_mesh", None)
    if set_mesh is None:
        return
    try:
        stack.enter_context(set_mesh(mesh))
    except ValueError:
        pass


def active_spatial_sharding() -> Optional[SpatialSharding]:
    """The layout of the innermost active `spatial_sharding` block, or None."""
    return getattr(_local, "layout", None)


# ---- planning: the halo and local padding of each split axis -----------------------------------
@dataclasses.dataclass(frozen=True)
class AxisPlan:
    """One split spatial axis: what each shard receives and how its local problem is padded.

    halo_lo/hi: input cells taken from the previous/next shard (negative: own edge cells that
    no output reads, dropped). zero_lo/hi: zero padding of the local problem (cells of the
    global zero padding, or dilation holes, at the ends of the shard's window).
    """

    axis: int
    mesh_axis: str
    devices: int
    n_global: int
    n_local: int
    halo_lo: int
    halo_hi: int
    zero_lo: int
    zero_hi: int
    wrap: bool
    wrap_lo: int
    wrap_hi: int


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def plan_axis(spec: ConvSpec, spatial: Sequence[int], axis: int, mesh_axis: str, devices: int) -> AxisPlan:
    """Plan the split of spatial `axis` over the `devices` of `mesh_axis`; ValueError if impossible.

    Along one axis, input cell g (g < 0 or >= N: wrapped copies) sits at position
    q(g) = zero_lo + lhs_dilation * (wrap_lo + g) of the global padded line, and output cell j
    reads positions j * stride + t * rhs_dilation. Shard i owns outputs [i m, (i+1) m); its window
    starts at i m stride, which must advance by exactly n lhs_dilation per shard (n input cells)
    for all shards to run the same local problem.
    """
    n_global = int(spatial[axis])
    if n_global % devices:
        raise ValueError(
            f"spatial axis {axis} (={n_global}) is not divisible by the {devices} devices of "
            f"mesh axis {mesh_axis!r}"
        )
    n = n_global // devices
    out_global = spec.out_spatial(spatial)[axis]
    stride, lhs, rhs = spec.stride[axis], spec.lhs_dilation[axis], spec.rhs_dilation[axis]
    wrap_lo, wrap_hi = spec.torus_pad[axis]
    zl, _ = spec.zero_pad[axis]
    m_filter = spec.filter_shape[axis]
    if out_global % devices or (out_global // devices) * stride != n * lhs:
        raise ValueError(
            f"spatial axis {axis} (={n_global} cells, {out_global} outputs) cannot be split over "
            f"the {devices} devices of mesh axis {mesh_axis!r}: with stride {stride}, lhs_dilation "
            f"{lhs} and padding (wrap {spec.torus_pad[axis]}, zeros {spec.zero_pad[axis]}) the "
            "shards' input windows differ; use 'SAME'/'TORUS'-style padding on split axes"
        )
    m = out_global // devices
    first, last = 0, (m - 1) * stride + (m_filter - 1) * rhs  # shard 0's window, inclusive
    g_min = _ceil_div(first - zl, lhs) - wrap_lo
    g_max = (last - zl) // lhs - wrap_lo
    halo_lo, halo_hi = -g_min, g_max - (n - 1)
    zero_lo = zl + lhs * (wrap_lo + g_min) - first
    zero_hi = last - (zl + lhs * (wrap_lo + g_max))
    for side, halo in (("previous", halo_lo), ("next", halo_hi)):
        if halo > n or -halo >= n:
            raise ValueError(
                f"spatial axis {axis}: each of the {devices} shards of mesh axis {mesh_axis!r} holds "
                f"{n} cells, but the filter reaches {abs(halo)} cells into the {side} shard; use "
                "fewer devices on that axis or a larger grid"
            )
    return AxisPlan(
        axis=axis,
        mesh_axis=mesh_axis,
        devices=devices,
        n_global=n_global,
        n_local=n,
        halo_lo=halo_lo,
        halo_hi=halo_hi,
        zero_lo=zero_lo,
        zero_hi=zero_hi,
        wrap=bool(wrap_lo or wrap_hi),
        wrap_lo=wrap_lo,
        wrap_hi=wrap_hi,
    )


def plan(spec: ConvSpec, spatial: Sequence[int], layout: SpatialSharding) -> tuple[ConvSpec, tuple[AxisPlan, ...]]:
    """The local ConvSpec every shard runs, and the plan of each split axis (mesh axes of size 1
    leave their spatial axis whole)."""
    plans = []
    for axis, name in layout.axis_map:
        if axis >= spec.D:
            raise ValueError(
                f"`axis_map` names spatial axis {axis}, but the layer is {spec.D}-dimensional"
            )
        devices = layout.devices_of(name)
        if devices > 1:
            plans.append(plan_axis(spec, spatial, axis, name, devices))
    torus_pad, zero_pad, is_torus = list(spec.torus_pad), list(spec.zero_pad), list(spec.is_torus)
    for p in plans:
        torus_pad[p.axis] = (0, 0)  # the halos carry the wrap now
        zero_pad[p.axis] = (p.zero_lo, p.zero_hi)
        is_torus[p.axis] = False
    local = dataclasses.replace(
        spec, torus_pad=tuple(torus_pad), zero_pad=tuple(zero_pad), is_torus=tuple(is_torus)
    )
    return local, tuple(plans)


def local_spatial(spatial: Sequence[int], plans: Sequence[AxisPlan]) -> tuple[int, ...]:
    """Spatial dims of one shard's input after the halo exchange."""
    out = list(spatial)
    for p in plans:
        out[p.axis] = p.n_local + p.halo_lo + p.halo_hi
    return tuple(out)


# ---- the halo exchange ----------------------------------------------------------------------
def _mask_outside(halo: jax.Array, dim: int, first_cell, p: AxisPlan) -> jax.Array:
    """Zero halo cells beyond the wrapped extent [-wrap_lo, N + wrap_hi) (their global index
    starts at `first_cell`): a ring passes real data there, the padded line has zeros."""
    size = halo.shape[dim]
    cells = first_cell + jnp.arange(size)
    inside = (cells >= -p.wrap_lo) & (cells < p.n_global + p.wrap_hi)
    shape = [1] * halo.ndim
    shape[dim] = size
    return jnp.where(inside.reshape(shape), halo, jnp.zeros((), halo.dtype))


def exchange_halos(x: jax.Array, dim: int, p: AxisPlan) -> jax.Array:
    """Inside shard_map: this shard's block with halo cells of its neighbours along `dim`."""
    n, P = p.n_local, p.devices
    core = jax.lax.slice_in_dim(x, max(0, -p.halo_lo), n - max(0, -p.halo_hi), axis=dim)
    parts = [core]
    index = jax.lax.axis_index(p.mesh_axis)
    if p.halo_lo > 0:
        # my last cells become the next shard's lower halo; a non-torus end receives nothing (zeros)
        perm = [(j, j + 1) for j in range(P - 1)] + ([(P - 1, 0)] if p.wrap else [])
        send = jax.lax.slice_in_dim(x, n - p.halo_lo, n, axis=dim)
        halo = jax.lax.ppermute(send, p.mesh_axis, perm)
        if p.wrap and p.halo_lo > p.wrap_lo:
            halo = _mask_outside(halo, dim, index * n - p.halo_lo, p)
        parts.insert(0, halo)
    if p.halo_hi > 0:
        perm = [(j + 1, j) for j in range(P - 1)] + ([(0, P - 1)] if p.wrap else [])
        send = jax.lax.slice_in_dim(x, 0, p.halo_hi, axis=dim)
        halo = jax.lax.ppermute(send, p.mesh_axis, perm)
        if p.wrap and p.halo_hi > p.wrap_hi:
            halo = _mask_outside(halo, dim, (index + 1) * n, p)
        parts.append(halo)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=dim)


# ---- the sharded operation --------------------------------------------------------------------
def _shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs, check: bool) -> Callable:
    if hasattr(jax, "shard_map"):  # jax >= 0.8
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map  # older jax

    return shard_map(fn, mesh, in_specs, out_specs, check_rep=check)


def _sharded_call(
    spec: ConvSpec,
    local_spec: ConvSpec,
    plans: tuple[AxisPlan, ...],
    layout: SpatialSharding,
    run: Callable,
    mode: str,
    batched: bool,
    check_vma: bool,
) -> Callable:
    """(inputs, weights) -> outputs as one shard_map; `batched`: blocks carry a leading batch
    axis split over layout.batch_axis."""
    lead = 1 if batched else 0
    split = {p.axis: p.mesh_axis for p in plans}

    def block_spec(k: int) -> PartitionSpec:
        entries = ([layout.batch_axis] if batched else []) + [None]
        entries += [split.get(ax) for ax in range(spec.D)] + [None] * k
        return PartitionSpec(*entries)

    in_specs = (
        tuple(block_spec(k) for k, _, _ in spec.in_keys),
        tuple(PartitionSpec() for _ in spec.pairs),
    )
    out_specs = tuple(block_spec(k) for k, _, _ in spec.out_keys)

    def local(xs, ws):
        xs = list(xs)
        for p in plans:
            xs = [exchange_halos(x, lead + 1 + p.axis, p) for x in xs]
        if batched:
            return tuple(jax.vmap(lambda blocks: tuple(run(local_spec, blocks, ws, mode)))(tuple(xs)))
        return tuple(run(local_spec, tuple(xs), ws, mode))

    mapped = _shard_map(local, layout.mesh, in_specs, out_specs, check_vma)
    if not _has_explicit_axes(layout.mesh):
        return mapped  # Auto axes: shard_map reshards mismatched operands itself

    def conformed(xs, ws):
        # Explicit axes: operand types must match in_specs exactly
        xs = tuple(_reshard(x, layout.mesh, s) for x, s in zip(xs, in_specs[0]))
        ws = tuple(_reshard(w, layout.mesh, PartitionSpec()) for w in ws)
        return mapped(xs, ws)

    return conformed


def _has_explicit_axes(mesh: Mesh) -> bool:
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ())


def _reshard(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))


def sharded_conv_contract(
    spec: ConvSpec,
    inputs: Sequence[jax.Array],
    weights: Sequence[jax.Array],
    layout: SpatialSharding,
    *,
    backend: Optional[str] = None,
    mode: str = "tf32",
    bias=None,
) -> tuple[jax.Array, ...]:
    """ConvContract of unbatched blocks (batch with jax.vmap), domain-decomposed over `layout`.

    Args:
        spec, inputs, weights: as kernels.conv_contract (operands already checked).
        layout: the mesh layout (`spatial_sharding` / `make_layout`).
        backend: the backend asked for; chosen for the local problem of one shard.
        mode: a resolved precision mode (kernels.resolve_precision).
        bias: as kernels.conv_contract; added to the global outputs after the split
            convolution (a "mean" bias needs the global mean, which no shard has alone).
    """
    inputs, weights = tuple(inputs), tuple(weights)
    outputs = _split_conv_contract(spec.without_bias(), inputs, weights, layout, backend, mode)
    if not spec.has_bias:
        return outputs
    return _bias.apply_bias(spec, inputs, weights, outputs, bias)


def _split_conv_contract(
    spec: ConvSpec,
    inputs: tuple,
    weights: tuple,
    layout: SpatialSharding,
    backend: Optional[str],
    mode: str,
) -> tuple[jax.Array, ...]:
    spatial = tuple(inputs[0].shape[1 : 1 + spec.D])
    local_spec, plans = plan(spec, spatial, layout)
    choice = _registry.choose(local_spec, local_spatial(spatial, plans), inputs[0].dtype, backend,
                              _registry.traced_batch(inputs[0]))
    # a bias-free spec: a fused-bias backend gets bias None
    run = functools.partial(_registry.run_backend, choice.backend)
    if not plans:  # every named mesh axis has one device
        return tuple(run(spec, inputs, weights, mode))
    check = layout.check_vma
    if check is None:
        check = choice.backend in _LAX_BACKENDS
    unbatched = _sharded_call(spec, local_spec, plans, layout, run, mode, False, check)
    batch_axis = layout.batch_axis
    if batch_axis is None or layout.devices_of(batch_axis) == 1:
        return unbatched(inputs, weights)  # vmap of shard_map: the batch stays whole per device

    @jax.custom_batching.custom_vmap
    def op(xs, ws):
        return unbatched(xs, ws)

    @op.def_vmap
    def _batched_rule(axis_size, in_batched, xs, ws):
        xs_batched, ws_batched = in_batched
        out_batched = tuple(True for _ in spec.out_keys)
        if any(ws_batched):  # per-example weights: split space only, keep the batch whole
            axes = (
                tuple(0 if b else None for b in xs_batched),
                tuple(0 if b else None for b in ws_batched),
            )
            return jax.vmap(unbatched, in_axes=axes)(xs, ws), out_batched
        devices = layout.devices_of(batch_axis)
        if axis_size % devices:
            raise ValueError(
                f"the vmapped batch (={axis_size}) is not divisible by the {devices} devices of "
                f"mesh axis {batch_axis!r}"
            )
        xs = tuple(
            x if b else jnp.broadcast_to(x, (axis_size,) + x.shape) for x, b in zip(xs, xs_batched)
        )
        call = _sharded_call(spec, local_spec, plans, layout, run, mode, True, check)
        return call(xs, ws), out_batched

    return op(inputs, weights)
