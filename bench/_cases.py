"""Building the benchmark cases of bench/_configs.py: a ginjax ConvContract layer or model with
its batched inputs, and the function (`fwd`, `fwd_bwd` or a train `step`) timed on it."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import numpy as np

import jax
import jax.numpy as jnp

import kernels

from . import _configs
from ._configs import Config, LayerConfig, ModelConfig
from ._device import backend_runs_here
from ._flops import conv_flops, tree_bytes

SEED = 20261121


@functools.lru_cache(maxsize=16)
def invariant_filters(D: int, M: int, ks: tuple[int, ...]):
    """get_invariant_filters([M], ks, [0, 1], D, make_all_operators(D)) as a MultiImage."""
    from ginjax import geometric as geom

    filters = geom.get_invariant_filters([M], list(ks), [0, 1], D, geom.make_all_operators(D))
    if not isinstance(filters, geom.MultiImage):
        raise TypeError(f"get_invariant_filters returned {type(filters).__name__}, expected a MultiImage")
    return filters


def _random_multi_image(key, signature, D: int, B: int, spatial: tuple[int, ...]):
    from ginjax import geometric as geom

    data = {}
    for (k, parity), channels in signature:
        key, sub = jax.random.split(key)
        data[(k, parity)] = jax.random.normal(sub, (B, channels) + spatial + (D,) * len(k), jnp.float32)
    return geom.MultiImage(data, D, True)


def _signature(pairs):
    from ginjax import geometric as geom

    return geom.Signature(tuple(pairs))


def _layer(cfg: LayerConfig):
    """(the config's ConvContract, its signature, the key its input is drawn with)."""
    from ginjax import layers

    sig = _signature((key, cfg.c) for key in cfg.keys)
    filters = invariant_filters(cfg.D, cfg.M, cfg.filter_ks)
    k_layer, k_x = jax.random.split(jax.random.PRNGKey(SEED))
    return layers.ConvContract(sig, sig, filters, key=k_layer), sig, k_x


def layer_spec(cfg: LayerConfig) -> kernels.ConvSpec:
    """The ConvSpec of a layer config's ConvContract (`LayerCase(cfg).spec()`) without drawing
    its input: a 2-tensor config's (d3_n64_b2_c8_k2) is 54 M floats."""
    layer, _, _ = _layer(cfg)
    return layer.conv_spec()


class LayerCase:
    """A ginjax ConvContract (backend 'auto', so `kernels.use_backend` picks it) and a batched input."""

    def __init__(self, cfg: LayerConfig):
        self.cfg = cfg
        self.layer, sig, k_x = _layer(cfg)
        self.x = _random_multi_image(k_x, sig, cfg.D, cfg.B, cfg.spatial)

    def spec(self) -> kernels.ConvSpec:
        return self.layer.conv_spec()

    def function(self, mode: str) -> tuple[Callable, tuple]:
        """(f, args): f(params, x) for `mode`, with the layer's arrays passed as arguments."""
        import equinox as eqx

        params, static = eqx.partition(self.layer, eqx.is_inexact_array)

        def forward(params, x):
            return jax.vmap(eqx.combine(params, static))(x)

        if mode == "fwd":
            return forward, (params, self.x)
        if mode == "fwd_bwd":

            def loss(params, x):
                out = forward(params, x)
                return sum(jnp.mean(jnp.square(block)) for block in out.values())

            return jax.value_and_grad(loss, argnums=(0, 1)), (params, self.x)
        raise ValueError(f"`mode` (={mode!r}) must be one of ('fwd', 'fwd_bwd') for a layer config")

    def gflop(self, mode: str) -> float:
        # forward: one dense-equivalent conv; backward adds dX and dW, each as large again
        fwd = self.cfg.B * self.spec().dense_flops(self.cfg.spatial)
        return fwd * (3 if mode == "fwd_bwd" else 1) / 1e9

    def io_bytes(self) -> int:
        forward, args = self.function("fwd")
        with kernels.use_backend("dense"):  # shapes only; any backend gives the same
            out = jax.eval_shape(forward, *args)
        return tree_bytes(self.x) + tree_bytes(out)

    def coverage(self, backend: str) -> tuple[bool, str]:
        """Whether `backend` runs this layer itself (not by falling back); the reason if not."""
        ok, why = backend_runs_here(backend)
        if not ok:
            return False, why
        choice = kernels.explain(self.spec(), self.cfg.spatial, backend=backend)
        if backend == _configs.AUTO:
            return True, f"auto picks {choice.backend}: {choice.reason}"
        if choice.backend != backend:
            return False, choice.reason
        return True, choice.reason


class ModelCase:
    """A ginjax model (every ConvContract on backend 'auto'), a batched input and a target."""

    def __init__(self, cfg: ModelConfig):
        from ginjax import models

        self.cfg = cfg
        scalar, vector = ((), 0), ((False,), 0)
        in_sig = _signature(((scalar, cfg.in_channels[0]), (vector, cfg.in_channels[1])))
        out_sig = _signature(((scalar, cfg.out_channels[0]), (vector, cfg.out_channels[1])))
        conv_filters = invariant_filters(cfg.D, cfg.M, (0, 1, 2))
        kwargs: dict[str, Any] = dict(cfg.model_kwargs)
        if cfg.model == "UNet":
            kwargs["upsample_filters"] = invariant_filters(cfg.D, 2, (0, 1, 2))
        key = jax.random.PRNGKey(SEED)
        k_model, k_x, k_y = jax.random.split(key, 3)
        cls = getattr(models, cfg.model)
        self.model = cls(cfg.D, in_sig, out_sig, cfg.depth, conv_filters=conv_filters, key=k_model, **kwargs)
        self.x = _random_multi_image(k_x, in_sig, cfg.D, cfg.B, cfg.spatial)
        self.y = _random_multi_image(k_y, out_sig, cfg.D, cfg.B, cfg.spatial)

    def _forward(self):
        import equinox as eqx

        params, static = eqx.partition(self.model, eqx.is_inexact_array)

        def forward(params, x):
            def one(xi):
                out = eqx.combine(params, static)(xi)
                return out[0] if isinstance(out, tuple) else out  # models return (out, aux)

            return jax.vmap(one)(x)

        return forward, params

    def function(self, mode: str) -> tuple[Callable, tuple]:
        if mode != "step":
            raise ValueError(f"`mode` (={mode!r}) must be 'step' for a model config")
        forward, params = self._forward()

        def loss(params, x, y):
            out = forward(params, x)
            return sum(jnp.mean(jnp.square(out[k] - y[k])) for k in y.keys())

        return jax.value_and_grad(loss), (params, self.x, self.y)

    def gflop(self, mode: str) -> float:
        forward, params = self._forward()
        with kernels.use_backend("dense"):  # one conv per layer: its FLOPs are the dense ones
            fwd = conv_flops(forward, params, self.x)
        return 3 * fwd / 1e9

    def io_bytes(self) -> int:
        forward, params = self._forward()
        with kernels.use_backend("dense"):  # shapes only; any backend gives the same
            out = jax.eval_shape(forward, params, self.x)
        return tree_bytes(self.x) + tree_bytes(out)

    def coverage(self, backend: str) -> tuple[bool, str]:
        ok, why = backend_runs_here(backend)
        return (True, "layers the backend does not cover fall back to dense") if ok else (False, why)


def build_case(cfg: Config):
    return LayerCase(cfg) if isinstance(cfg, LayerConfig) else ModelCase(cfg)



# ---- kernel-level operands (no ginjax): the Pallas timing and `measure-auto` ------------------
FIXTURE_FILTERS = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "ginjax-0.1.8" / "invariant_filters.npz"


def fixture_spec(cfg: LayerConfig) -> kernels.ConvSpec:
    """The ConvSpec of a standard layer config (keys scalar and vector, 3^D invariant filters of
    ginjax 0.1.8 from tests/data), built without ginjax."""
    if cfg.k_max != 1 or cfg.M != 3:
        raise ValueError(f"`cfg` (={cfg.name}) must have k_max 1 and M 3 for the fixture spec")
    data = np.load(FIXTURE_FILTERS)
    basis = lambda k: data[f"filters/D{cfg.D}M3/k{k}p0"]  # noqa: E731
    keys = [(0, 0, cfg.c), (1, 0, cfg.c)]
    pairs = [(0, 0, basis(0)), (0, 1, basis(1)), (1, 0, basis(1)), (1, 1, basis(2))]
    return kernels.make_spec(cfg.D, keys, keys, pairs, True, rhs_dilation=cfg.rhs_dilation)


def with_channels(spec: kernels.ConvSpec, cin: int, cout: int) -> kernels.ConvSpec:
    """`spec` with cin channels on every input key and cout on every output key."""
    return dataclasses.replace(spec, in_keys=tuple(k[:2] + (cin,) for k in spec.in_keys),
                               out_keys=tuple(k[:2] + (cout,) for k in spec.out_keys))


def spec_operands(spec: kernels.ConvSpec, spatial: tuple[int, ...], batch: int, seed: int = 0, dtype="float32"):
    """Random batched (inputs, weights, output cotangents) of a ConvSpec; weights scaled so the
    outputs stay O(1)."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(dtype)
    xs = [jnp.asarray(rng.standard_normal((batch,) + spec.in_shape(a, spatial)), dtype) for a in range(len(spec.in_keys))]
    ws = []
    for p in spec.pairs:
        o, c = spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2]
        ws.append(jnp.asarray(rng.standard_normal((o, c, p.basis.n_filters)) / np.sqrt(c * p.basis.n_filters), dtype))
    out_spatial = spec.out_spatial(spatial)
    cots = [jnp.asarray(rng.standard_normal((batch, c) + out_spatial + (spec.D,) * k), dtype) for k, _, c in spec.out_keys]
    return xs, ws, cots


def layer_functions(run: Callable) -> dict[str, Callable]:
    """{'fwd': f(xs, ws, cots), 'fwd_bwd': value_and_grad of <f(xs, ws), cots> w.r.t. xs and ws} for
    run(x, ws) -> output blocks of one sample, vmapped over the batch. The cotangents are an
    argument, not a closure: closed-over arrays become HLO constants that XLA constant-folds
    (minutes of compile time for a 128^3 grid)."""

    def forward(xs, ws):
        return jax.vmap(lambda x: run(x, ws))(xs)

    def loss(xs, ws, cots):
        return sum(jnp.vdot(o, g) for o, g in zip(forward(xs, ws), cots))

    return {"fwd": lambda xs, ws, cots: forward(xs, ws), "fwd_bwd": jax.value_and_grad(loss, argnums=(0, 1))}


# Cases stay cached for the whole session: the suite runs the reference and dense backends of every
# config before the fused ones (see conftest), so each config comes round twice. All of them
# together take a few GB, small beside an H200's memory.
_CASES: dict = {}


def cached_case(cfg: Config):
    if cfg.name not in _CASES:
        _CASES[cfg.name] = build_case(cfg)
    return _CASES[cfg.name]
