"""Measurement core shared by the pytest-benchmark suites: build a case, compile it for one backend,
time the compiled executable, and fill the benchmark's `extra_info`.

Every number comes from an ahead-of-time compiled executable (`jax.jit(f).lower(...).compile()`):
its `memory_analysis()` gives the temp bytes and the timed call is `block_until_ready(compiled(...))`
after warm-up, so neither tracing nor compilation is ever timed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

import jax
import jax.extend
import jax.numpy as jnp

import kernels

from . import _configs
from ._configs import Config, LayerConfig, ModelConfig, group_name

SEED = 20261121


# ---- device ------------------------------------------------------------------------------------
def slugify(text: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; used for results/<device-slug>/."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "unknown"


def device_info() -> dict:
    """What the numbers were measured on; goes into machine_info and every extra_info."""
    import jaxlib

    dev = jax.devices()[0]
    kind = str(getattr(dev, "device_kind", dev.platform))
    return {
        "platform": dev.platform,
        "device_kind": kind,
        "device_slug": slugify(kind),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        # the operand precision JAX's default matmul precision means for the kernels
        "precision": kernels.resolve_precision(None),
    }


# ---- building cases ----------------------------------------------------------------------------
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


class LayerCase:
    """A ginjax ConvContract (backend 'auto', so `kernels.use_backend` picks it) and a batched input."""

    def __init__(self, cfg: LayerConfig):
        from ginjax import layers

        self.cfg = cfg
        sig = _signature((key, cfg.c) for key in cfg.keys)
        filters = invariant_filters(cfg.D, cfg.M, cfg.filter_ks)
        key = jax.random.PRNGKey(SEED)
        k_layer, k_x = jax.random.split(key)
        self.layer = layers.ConvContract(sig, sig, filters, key=k_layer)
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


def backend_runs_here(backend: str) -> tuple[bool, str]:
    """Whether a backend can run on this machine; the registry's reason when it cannot."""
    try:
        with kernels.use_backend(backend):
            pass
    except ValueError as err:
        return False, str(err)
    return True, "available"


def models_missing(model_name: str) -> Optional[str]:
    """Why a model benchmark cannot run yet (None when ginjax.models has the model)."""
    try:
        from ginjax import models
    except ImportError as err:
        return f"ginjax.models cannot be imported ({err}); the models issue has not landed"
    if not hasattr(models, model_name):
        return f"ginjax.models has no {model_name} yet (the models issue has not landed)"
    return None


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


# ---- compiling ---------------------------------------------------------------------------------
def compile_for(fn: Callable, args: tuple, backend: str, precision: Optional[str] = None):
    """AOT-compile fn(*args) with every 'auto' ConvContract on `backend`.

    precision: None for JAX's default matmul precision, or a jax.default_matmul_precision name
    ('highest' for the reference oracle).
    """

    # A fresh function object per call: jit's trace cache is keyed on the function, and the
    # backend choice happens at trace time, outside anything jit knows about.
    def traced(*a):
        return fn(*a)

    ctx = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with kernels.use_backend(backend), ctx:
        return jax.jit(traced).lower(*args).compile()


def memory_of(compiled) -> dict:
    """temp/argument/output bytes from the executable's memory analysis (None where unknown)."""
    out = {"temp_bytes": None, "argument_bytes": None, "output_bytes": None}
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some runtimes do not implement it
        return out
    if stats is None:
        return out
    for field, attr in (
        ("temp_bytes", "temp_size_in_bytes"),
        ("argument_bytes", "argument_size_in_bytes"),
        ("output_bytes", "output_size_in_bytes"),
    ):
        value = getattr(stats, attr, None)
        out[field] = int(value) if value is not None else None
    return out


def tree_bytes(tree) -> int:
    return int(sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def conv_flops(fn: Callable, *args) -> int:
    """FLOPs of the conv_general_dilated ops in fn's forward jaxpr (2 * out elements * window)."""
    closed = jax.make_jaxpr(fn)(*args)
    return _jaxpr_conv_flops(closed.jaxpr)


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _jaxpr_conv_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape
            rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
            window = math.prod(rhs[d] for d in rhs_spec[1:])  # in-features per group * taps
            total += 2 * math.prod(out) * window
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                total += _jaxpr_conv_flops(sub)
    return total


# ---- checking ----------------------------------------------------------------------------------
@jax.jit
def _leaf_errors(actual: list, expected: list):
    nums, dens = [], []
    for a, e in zip(actual, expected):
        a = a.astype(jnp.float32)
        e = e.astype(jnp.float32)
        nums.append(jnp.linalg.norm((a - e).ravel()))
        dens.append(jnp.linalg.norm(e.ravel()))
    return jnp.stack(nums), jnp.stack(dens)


def rel_err(actual, expected, per_array: bool = True) -> float:
    """Relative L2 error ||a - e|| / ||e|| of two pytrees: the largest over the arrays, or with
    per_array=False that of all arrays as one vector.

    An array whose expected value is all zeros (e.g. the gradient of the fixed filter bank) counts
    as 0 when the actual one is zero too and as inf otherwise.
    """
    return rel_err_detail(actual, expected, per_array)[0]


def _readable(path: str) -> str:
    # value_and_grad results are (value, grads): name the parts; MultiImage leaves carry no keys
    for prefix, name in (("[0]", "value"), ("[1][0]", "grad[params]"), ("[1][1]", "grad[x]"), ("[1]", "grad")):
        if path.startswith(prefix):
            path = name + path[len(prefix):]
            break
    return re.sub(r"\[<flat index (\d+)>\]", r"[\1]", path) or "output"


def rel_err_detail(actual, expected, per_array: bool = True) -> tuple[float, str]:
    """`rel_err` and the pytree path of the array that sets it ('all' when per_array=False)."""
    a_leaves = jax.tree_util.tree_leaves(actual)
    e_paths, _ = jax.tree_util.tree_flatten_with_path(expected)
    if len(a_leaves) != len(e_paths) or not a_leaves:
        raise ValueError(f"results have {len(a_leaves)} arrays but the reference has {len(e_paths)}")
    nums, dens = (np.asarray(v, dtype=np.float64) for v in _leaf_errors(a_leaves, [e for _, e in e_paths]))
    names = [_readable(jax.tree_util.keystr(path)) for path, _ in e_paths]
    if not per_array:
        nums, dens = np.sqrt(np.sum(nums**2, keepdims=True)), np.sqrt(np.sum(dens**2, keepdims=True))
        names = ["all"]
    worst, worst_name = 0.0, names[0]
    for num, den, name in zip(nums, dens, names):
        if not np.isfinite(num):
            return math.inf, name
        err = (0.0 if num == 0.0 else math.inf) if den == 0.0 else float(num / den)
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


# ---- timing ------------------------------------------------------------------------------------
WARMUP_S = 0.25
QUEUED_CALLS = 5
QUEUE_BELOW_S = 0.05
WARM_CHECK_BELOW_S = 2.0
def measure(
    benchmark,
    run: Callable[[], Any],
    *,
    max_time: float,
    min_rounds: int,
    warmup: int,
    first_call_s: float = 0.0,
    max_rounds: int = 200,
    per_round: int = 1,
):
    """Warm up (`warmup` calls, then one to size the rounds), time `run` with pytest-benchmark;
    returns (p20, median, p80) seconds, or None when benchmarks are disabled.

    Rounds fill about `max_time` seconds (at least `min_rounds`). A case whose first call already
    took longer than `max_time` (a seconds-long model step) skips the extra calls and runs
    `min_rounds` rounds. Under --benchmark-disable, `run` executes once and nothing is timed.
    A round of `run` makes `per_round` calls; the statistics are per call.
    """
    if getattr(benchmark, "disabled", False):
        benchmark.pedantic(run, rounds=1, iterations=1)
        return None
    if first_call_s > max_time:
        rounds = min_rounds
    else:
        for _ in range(warmup):
            run()
        # then keep the GPU busy for WARMUP_S: its clocks ramp up from idle, and a median over
        # calls made at lower clocks read up to 1.4x slow on the H200 (bench/NOTES.md)
        start = time.perf_counter()
        while warmup and time.perf_counter() - start < WARMUP_S:
            run()
        start = time.perf_counter()
        run()
        once = max(time.perf_counter() - start, 1e-6)
        rounds = int(min(max_rounds, max(min_rounds, math.ceil(max_time / once))))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    data = np.asarray(benchmark.stats.stats.data, dtype=np.float64) / per_round
    p20, p50, p80 = np.percentile(data, [20, 50, 80])
    return float(p20), float(p50), float(p80)


# ---- one benchmark -----------------------------------------------------------------------------
# Cases and oracle results stay cached for the whole session: the suite runs the reference and
# dense backends of every config before the fused ones (see conftest), so each config comes round
# twice. All of them together take a few GB, small beside an H200's memory.
_CASES: dict = {}
_ORACLES: dict = {}


def cached_case(cfg: Config):
    if cfg.name not in _CASES:
        _CASES[cfg.name] = build_case(cfg)
    return _CASES[cfg.name]


def oracle_precision(cfg: Config) -> Optional[str]:
    """'highest' for layers. Models use the reference backend at the default precision: compiling
    a whole model twice more costs minutes on the GPU, and through 16 layers the error is set by
    the TF32 arithmetic of the backend under test, not by the oracle's."""
    return "highest" if cfg.kind == "layer" else None


def oracle_result(case, mode: str):
    """The `reference` backend's result on the case's inputs at `oracle_precision`, cached."""
    key = (case.cfg.name, mode)
    if key not in _ORACLES:
        fn, args = case.function(mode)
        compiled = compile_for(fn, args, "reference", precision=oracle_precision(case.cfg))
        _ORACLES[key] = jax.block_until_ready(compiled(*args))
    return _ORACLES[key]


_SIZES: dict = {}


def _case_sizes(case, mode: str) -> tuple[float, int]:
    """(gflop, io_bytes), cached: for a model both trace the whole forward pass."""
    key = (case.cfg.name, mode)
    if key not in _SIZES:
        _SIZES[key] = (case.gflop(mode), case.io_bytes())
    return _SIZES[key]


def progress(options: dict, message: str) -> None:
    """With --bench-progress, one line per phase, shown past pytest's output capture."""
    log = options.get("log")
    if log is not None:
        log(f"[bench {time.strftime('%H:%M:%S')}] {message}")


def run_benchmark(benchmark, cfg: Config, mode: str, backend: str, options: dict) -> dict:
    """Compile, check against the oracle, time, and fill `benchmark.extra_info`; returns it.

    Skips (pytest.skip) when the backend cannot run here or would only fall back to dense.
    Asserts, for layer configs, that the error is within kernels.TOLERANCE for the precision.
    """
    import pytest

    if cfg.kind == "model":
        missing = models_missing(cfg.model)
        if missing:
            pytest.skip(missing)
    label = f"{cfg.name}-{mode}-{backend}"
    if options.get("deadline") is not None and time.monotonic() > options["deadline"]:
        pytest.skip("the run's --bench-time-budget is spent")
    start = time.perf_counter()
    case = cached_case(cfg)
    progress(options, f"{label}: case ready ({time.perf_counter() - start:.1f} s)")
    ok, why = case.coverage(backend)
    if not ok:
        pytest.skip(f"{backend}: {why}")

    info = device_info()
    benchmark.group = group_name(cfg, mode)
    fn, args = case.function(mode)
    start = time.perf_counter()
    compiled = compile_for(fn, args, backend)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(compiled(*args))
    first_call_s = time.perf_counter() - start
    progress(options, f"{label}: compiled and ran once ({compile_s:.1f} s to compile)")
    start = time.perf_counter()
    if backend == "reference" and oracle_precision(cfg) is None:
        _ORACLES.setdefault((cfg.name, mode), result)  # it is its own oracle
    # layers: the worst array; models: the whole gradient as one vector (single tiny gradients of
    # a deep net are not a fair measure of a backend)
    err, worst_array = rel_err_detail(result, oracle_result(case, mode), per_array=cfg.kind == "layer")
    progress(options, f"{label}: rel err {err:.2e} vs the oracle, worst in {worst_array} ({time.perf_counter() - start:.1f} s)")
    finite = all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(result))
    del result

    # Calls of a few ms are timed QUEUED_CALLS to a round, queued back to back and synchronised
    # once, as a training loop runs them: a synchronised single call also times ~0.2-0.8 ms of
    # host round trip on the H200 (bench/NOTES.md), which is not the backend's cost.
    # decided on a warm call: a first call also loads modules (jax-triton's PTX) and once
    # left every triton case at 1 call per round next to 5 for dense (bench/NOTES.md)
    warm_call_s = first_call_s
    if first_call_s < WARM_CHECK_BELOW_S:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        warm_call_s = time.perf_counter() - start
    per_round = QUEUED_CALLS if warm_call_s < QUEUE_BELOW_S else 1

    def run():
        return jax.block_until_ready([compiled(*args) for _ in range(per_round)])

    stats = measure(
        benchmark,
        run,
        max_time=options["max_time"],
        min_rounds=options["min_rounds"],
        warmup=options["warmup"],
        first_call_s=first_call_s,
        per_round=per_round,
    )
    gflop, io_bytes = _case_sizes(case, mode)
    extra = {
        "backend": backend,
        "config": cfg.name,
        "mode": mode,
        "kind": cfg.kind,
        "D": cfg.D,
        "N": cfg.N,
        "B": cfg.B,
        "pixels": cfg.pixels,
        "gflop": gflop,
        "io_bytes": io_bytes,
        **memory_of(compiled),
        "rel_err_vs_reference": err,
        "rel_err_worst_array": worst_array,
        "oracle": f"reference@{oracle_precision(cfg) or 'default'}",
        "tolerance": kernels.TOLERANCE[info["precision"]],
        "compile_s": compile_s,
        "calls_per_round": per_round,
        **{k: info[k] for k in ("platform", "device_kind", "jax_version", "jaxlib_version", "precision")},
    }
    if isinstance(cfg, LayerConfig):
        extra.update(c=cfg.c, k_max=cfg.k_max, cin=case.spec().cin, cout=case.spec().cout)
    if stats is not None:
        p20, p50, p80 = stats
        extra.update(p20_s=p20, median_s=p50, p80_s=p80, tflops=gflop / 1e3 / p50)
    benchmark.extra_info.update(extra)
    if stats is not None:
        progress(options, f"{label}: median {stats[1] * 1e3:.3f} ms")

    assert finite, f"{backend} produced non-finite values on {cfg.name} {mode}"
    if isinstance(cfg, LayerConfig):
        assert err <= extra["tolerance"], (
            f"{backend} on {cfg.name} {mode}: relative error {err:.3g} vs the reference (worst in "
            f"{worst_array}) exceeds {extra['tolerance']:.1g} ({info['precision']})"
        )
    return extra
