"""Weak and strong scaling of ConvContract fwd+bwd and of a UNet train step over 1, 2, 4 GPUs.

    PYTHONPATH=. python -m bench.scaling --out bench/results/scaling            # the GPU run
    PYTHONPATH=. python -m bench.scaling --big 384 --what unet --out DIR        # + one step on a grid
                                                                                #   one GPU cannot hold
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m bench.scaling --smoke --out DIR

The grid (D=3, batch 1) is split along its first axis over a 1D mesh "space" of the first P
devices (kernels.spatial_sharding), so each device holds a slab and exchanges halo planes:
  weak:   (n*P, n, n) for P devices, n = --weak-n (128): the same slab per device.
  strong: (N, N, N), N = --strong-n (256): the slab shrinks as P grows.
Efficiency: weak t(1)/t(P); strong t(1)/(P t(P)), against the smallest P that ran when one device
ran out of memory. Every time is the median of --repeats calls of an AOT-compiled step after
warm-up (no tracing or compiling timed). Strong-scaling losses are compared with the 1-device
loss: the split must not change the numbers. Writes scaling.json and scaling.png to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import kernels
from bench import _device, _timing
from kernels import _sharding

SEED = 20261121
MESH_AXIS = "space"
SPLIT = {0: MESH_AXIS}

FULL = dict(weak_n=128, strong_n=256, channels=16, unet_depth=8, unet_levels=3, repeats=10, warmup=2)
SMOKE = dict(weak_n=8, strong_n=16, channels=2, unet_depth=2, unet_levels=1, repeats=2, warmup=1)


def log(message: str) -> None:
    print(f"[scaling {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- meshes and data ------------------------------------------------------------------------
def make_mesh(n_devices: int) -> Mesh:
    devices = jax.devices()[:n_devices]
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:  # Auto: XLA partitions everything outside ConvContract itself
        return jax.make_mesh((n_devices,), (MESH_AXIS,), axis_types=(axis_type.Auto,), devices=devices)
    return Mesh(np.array(devices), (MESH_AXIS,))


def layout_for(mesh: Mesh) -> _sharding.SpatialSharding:
    return _sharding.make_layout(mesh, SPLIT)


def random_image(key, signature, D: int, spatial: tuple, layout: _sharding.SpatialSharding):
    """A batch-1 MultiImage generated already split: a grid too large for one device never
    exists whole on one device."""
    from ginjax import geometric as geom

    blocks = {}
    for (k, parity), channels in signature:
        key, sub = jax.random.split(key)
        shape = (1, channels) + tuple(spatial) + (D,) * len(k)
        sharding = NamedSharding(layout.mesh, layout.block_spec(len(shape), D))
        make = jax.jit(lambda s, shape=shape: jax.random.normal(s, shape, jnp.float32), out_shardings=sharding)
        blocks[(k, parity)] = make(sub)
    return geom.MultiImage(blocks, D, True)


def replicate(tree, mesh: Mesh):
    import equinox as eqx

    params, static = eqx.partition(tree, eqx.is_array)
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    return eqx.combine(params, static)


# ---- the two workloads ----------------------------------------------------------------------
def _filters(D: int, M: int):
    from bench._cases import invariant_filters  # noqa: PLC0415

    return invariant_filters(D, M, (0, 1, 2))


def _signature(scalar: int, vector: int):
    from ginjax import geometric as geom

    return geom.Signature(((((), 0), scalar), (((False,), 0), vector)))


def conv_workload(cfg: dict, spatial: tuple, mesh: Mesh) -> tuple[Callable, tuple]:
    """ConvContract fwd+bwd: value_and_grad of a mean square w.r.t. weights and input.
    Keys {scalar, vector} with `channels` each, in and out, as the standard layers of
    docs/ARCHITECTURE.md (section 5)."""
    import equinox as eqx
    from ginjax import layers

    D = len(spatial)
    sig = _signature(cfg["channels"], cfg["channels"])
    k_layer, k_x = jax.random.split(jax.random.PRNGKey(SEED))
    layer = replicate(layers.ConvContract(sig, sig, _filters(D, 3), key=k_layer), mesh)
    x = random_image(k_x, sig, D, spatial, layout_for(mesh))
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    def loss(params, x):
        out = jax.vmap(eqx.combine(params, static))(x)
        return sum(jnp.mean(jnp.square(block)) for block in out.values())

    return jax.value_and_grad(loss, argnums=(0, 1)), (params, x)


def unet_workload(cfg: dict, spatial: tuple, mesh: Mesh) -> tuple[Callable, tuple]:
    """One UNet training step: value_and_grad of an MSE loss and an Adam update."""
    import equinox as eqx
    import optax
    from ginjax import models

    D = len(spatial)
    in_sig, out_sig = _signature(2, 2), _signature(1, 1)
    k_model, k_x, k_y = jax.random.split(jax.random.PRNGKey(SEED), 3)
    model = models.UNet(
        D, in_sig, out_sig, cfg["unet_depth"], num_downsamples=cfg["unet_levels"], num_conv=1,
        conv_filters=_filters(D, 3), upsample_filters=_filters(D, 2), key=k_model,
    )
    model = replicate(model, mesh)
    layout = layout_for(mesh)
    x = random_image(k_x, in_sig, D, spatial, layout)
    y = random_image(k_y, out_sig, D, spatial, layout)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(1e-3)
    opt_state = replicate(optim.init(params), mesh)

    def loss(params, x, y):
        out = jax.vmap(lambda xi: eqx.combine(params, static)(xi)[0])(x)
        return sum(jnp.mean(jnp.square(out[k] - y[k])) for k in y.keys())

    def step(params, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step, (params, opt_state, x, y)


WORKLOADS = {"conv": conv_workload, "unet": unet_workload}


def loss_of(kind: str, out) -> float:
    return float(out[0] if kind == "conv" else out[2])


# ---- measuring ------------------------------------------------------------------------------
def compile_step(fn: Callable, args: tuple, mesh: Mesh):
    def traced(*a):  # a fresh function: jit must trace inside the sharding block
        return fn(*a)

    with _sharding.spatial_sharding(mesh, SPLIT):
        return jax.jit(traced).lower(*args).compile()


def temp_bytes(compiled) -> Optional[int]:
    return _timing.memory_of(compiled)["temp_bytes"]


def time_calls(compiled, args: tuple, repeats: int, warmup: int) -> tuple[list[float], Any]:
    """`repeats` synchronised calls (ms each, one per round) after `warmup` calls, with the shared
    loop of bench/_timing.py; and the output of the first call."""
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    timing = _timing.time_compiled(
        compiled, args, min_rounds=repeats, max_rounds=repeats, warmup=max(warmup - 1, 0), warmup_s=0.0,
        first_call_s=time.perf_counter() - start, calls_per_round=1,
    )
    return [1e3 * t for t in timing.samples_s], out


def run_one(kind: str, scaling: str, n_devices: int, spatial: tuple, cfg: dict) -> dict:
    row = {
        "workload": kind,
        "scaling": scaling,
        "devices": n_devices,
        "grid": list(spatial),
        "grid_per_device": [spatial[0] // n_devices] + list(spatial[1:]),
    }
    mesh = make_mesh(n_devices)
    start = time.perf_counter()
    try:
        fn, args = WORKLOADS[kind](cfg, spatial, mesh)
        compiled = compile_step(fn, args, mesh)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        row["temp_bytes_per_device"] = temp_bytes(compiled)
        times, out = time_calls(compiled, args, cfg["repeats"], cfg["warmup"])
    except Exception as err:  # noqa: BLE001 - an OOM on one device is a result, not a crash
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        log(f"{kind} {scaling} P={n_devices} grid={spatial}: FAILED {row['error']}")
        return row
    row["times_ms"] = [round(t, 3) for t in times]
    row["median_ms"] = round(statistics.median(times), 3)
    row["loss"] = loss_of(kind, out)
    row["cells_per_s"] = math.prod(spatial) / (row["median_ms"] / 1e3)
    log(f"{kind} {scaling} P={n_devices} grid={spatial}: {row['median_ms']:.2f} ms (compile {row['compile_s']} s)")
    return row


def add_efficiency(rows: list[dict]) -> None:
    """Efficiency against the smallest device count that ran, per (workload, scaling)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if "median_ms" in row:
            groups.setdefault((row["workload"], row["scaling"]), []).append(row)
    for (_, scaling), group in groups.items():
        base = min(group, key=lambda r: r["devices"])
        for row in group:
            ratio = base["median_ms"] / row["median_ms"]
            if scaling == "strong":
                ratio *= base["devices"] / row["devices"]
                if "loss" in base and base["loss"] != 0:
                    row["loss_rel_diff_vs_base"] = abs(row["loss"] - base["loss"]) / abs(base["loss"])
            row["efficiency"] = round(ratio, 4)
            row["efficiency_base_devices"] = base["devices"]


def big_step(cfg: dict, n: int, n_devices: int, compile_one_device: bool = False) -> dict:
    """One UNet step on an n^3 grid over all devices, and what one device would need: the step's
    per-device temp bytes times the device count (compiling the 1-device step for its own
    memory analysis takes minutes at these sizes: `compile_one_device` does it anyway)."""
    spatial = (n,) * 3
    row = run_one("unet", "big", n_devices, spatial, dict(cfg, repeats=1, warmup=1))
    stats = [getattr(d, "memory_stats", lambda: None)() or {} for d in jax.devices()[:n_devices]]
    row["device_memory_bytes"] = stats[0].get("bytes_limit")
    row["peak_bytes_in_use_per_device"] = [s.get("peak_bytes_in_use") for s in stats]
    one: dict = {"devices": 1}
    if row.get("temp_bytes_per_device"):
        one["temp_bytes_estimate"] = row["temp_bytes_per_device"] * n_devices
    if compile_one_device:
        try:
            mesh = make_mesh(1)
            fn, args = unet_workload(cfg, spatial, mesh)
            one["temp_bytes"] = temp_bytes(compile_step(fn, args, mesh))
        except Exception as err:  # noqa: BLE001 - the point: it may not even allocate the inputs
            one["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
    row["one_device"] = one
    log(f"big: {row.get('median_ms')} ms on {n_devices} devices; one device would need "
        f"{one.get('temp_bytes_estimate', 0) / 2**30:.0f} GiB of temp, it has {(row['device_memory_bytes'] or 0) / 2**30:.0f} GiB")
    return row


# ---- output ---------------------------------------------------------------------------------
def device_info() -> dict:
    return dict(_device.device_info(), backends=list(kernels.available_backends()))


def plot(results: dict, path: pathlib.Path) -> bool:
    """Efficiency (top) and step time (bottom) against the GPU count; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["rows"] if "median_ms" in r and r["scaling"] in ("weak", "strong")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for col, scaling in enumerate(("weak", "strong")):
        top, bottom = axes[0][col], axes[1][col]
        for kind, marker in (("conv", "o"), ("unet", "s")):
            group = sorted((r for r in rows if r["workload"] == kind and r["scaling"] == scaling), key=lambda r: r["devices"])
            if not group:
                continue
            p = [r["devices"] for r in group]
            label = "ConvContract fwd+bwd" if kind == "conv" else "UNet train step"
            top.plot(p, [r["efficiency"] for r in group], marker=marker, label=label)
            bottom.plot(p, [r["median_ms"] for r in group], marker=marker, label=label)
        top.axhline(1.0, color="grey", lw=0.8)
        if scaling == "weak":
            top.axhline(0.85, color="red", lw=0.8, ls="--", label="target 85%")
        top.set_ylim(0, 1.15)
        cfg = results["config"]
        size = f"{cfg['weak_n']}^3 per device" if scaling == "weak" else f"{cfg['strong_n']}^3 in all"
        top.set_title(f"{scaling} scaling ({size})")
        top.set_ylabel("efficiency")
        bottom.set_ylabel("median step time (ms)")
        bottom.set_xlabel("devices")
        top.legend(fontsize=8)
    counts = sorted({r["devices"] for r in rows}) or [1]
    for ax in axes[1]:
        ax.set_xticks(counts)
    fig.suptitle(f"Domain-decomposed ConvContract on {results['device']['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for scaling.json and scaling.png")
    parser.add_argument("--devices", default="1,2,4", help="device counts, e.g. 1,2,4 (default)")
    parser.add_argument("--what", default="conv,unet", help="workloads: conv, unet (default both)")
    parser.add_argument("--scaling", default="weak,strong", help="weak, strong (default both)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CPU with simulated devices")
    parser.add_argument("--big", type=int, default=None, help="also one UNet step on a BIG^3 grid over all devices")
    parser.add_argument("--plot-only", default=None, help="re-plot an existing scaling.json into --out")
    for name, value in FULL.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {value} ({SMOKE[name]} with --smoke)")
    return parser.parse_args(argv)


def _choices(value: str, allowed: tuple, flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in chosen if v not in allowed]
    if bad or not chosen:
        raise SystemExit(f"`{flag}` (={value!r}) must be a comma list of {allowed}")
    return chosen


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        results = json.loads(pathlib.Path(args.plot_only).read_text())
        ok = plot(results, out / "scaling.png")
        print(out / "scaling.png" if ok else "matplotlib is not installed: no plot written")
        return 0
    cfg = dict(SMOKE if args.smoke else FULL)
    for name in FULL:
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    counts = sorted({int(p) for p in args.devices.split(",")})
    if counts[-1] > jax.device_count():
        raise SystemExit(
            f"`--devices` (={args.devices}) asks for {counts[-1]} devices, jax sees {jax.device_count()}"
        )
    what = _choices(args.what, tuple(WORKLOADS), "--what")
    scalings = _choices(args.scaling, ("weak", "strong"), "--scaling")
    for p in counts:
        if cfg["strong_n"] % (p * 2 ** cfg["unet_levels"]) and "strong" in scalings:
            raise SystemExit(f"`--strong-n` (={cfg['strong_n']}) must split over {p} devices and {cfg['unet_levels']} UNet levels")

    results = {"device": device_info(), "config": dict(cfg, devices=counts), "rows": []}
    log(f"{results['device']} config={results['config']}")
    started = time.perf_counter()
    for kind in what:
        for scaling in scalings:
            for p in counts:
                n = cfg["weak_n"]
                spatial = (n * p, n, n) if scaling == "weak" else (cfg["strong_n"],) * 3
                results["rows"].append(run_one(kind, scaling, p, spatial, cfg))
                add_efficiency(results["rows"])
                # after every row: a run cut short by a time limit still leaves its numbers
                (out / "scaling.json").write_text(json.dumps(results, indent=2))
    if args.big:
        results["rows"].append(big_step(cfg, args.big, counts[-1]))
        (out / "scaling.json").write_text(json.dumps(results, indent=2))
    results["wall_s"] = round(time.perf_counter() - started, 1)

    (out / "scaling.json").write_text(json.dumps(results, indent=2))
    for row in results["rows"]:
        if "efficiency" in row:
            log(f"{row['workload']:5s} {row['scaling']:6s} P={row['devices']}: {row['median_ms']:9.2f} ms  efficiency {row['efficiency']:.1%}")
    if plot(results, out / "scaling.png"):
        log(f"wrote {out / 'scaling.json'} and {out / 'scaling.png'}")
    else:
        log(f"wrote {out / 'scaling.json'}; matplotlib is missing, plot later with --plot-only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
