"""A/B of train-step variants in one process: the same model step compiled under each variant (an
environment variable or a module attribute set while it is traced and compiled), then timed in
alternation, so that clocks and neighbours weigh on every variant alike. For glue choices that
cannot be judged on a CPU (which layout XLA gives a reduction, whether a fused kernel beats XLA's
fusions), several of which one GPU call can settle.

    python -m bench.step_variants OUT_DIR [--configs resnet_d3_n64_b4,...] [--variants baseline,vn-minor,...]

Rows (per config and variant: median ms of each alternation, their median, compile s, temp
bytes) go to OUT_DIR/step_variants.json after every config.

A variant `backend=NAME` compiles the step with every ConvContract on backend NAME (e.g.
`--variants backend=auto,backend=dense`): `auto` against one backend, timed in alternation too.
A variant `table=PATH` compiles it with `auto` ranking from the measured table at PATH instead of
kernels/measured/<device>.json (e.g. `--variants baseline,table=/tmp/old.json`: a table against
the one before it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pathlib
import statistics
import time


class Computed:
    """A patch's value computed when its variant is applied (the module it reads is imported then)."""

    def __init__(self, make) -> None:
        self.make = make


def _vn_tiling_c32_before() -> dict:
    """The VectorNeuron's default tilings with the 32-channel backward at session 33's register
    pick (16 pixels, 8 warps) instead of the measured (32, 4)."""
    from kernels.triton import _vn_kernel

    return {**_vn_kernel._DEFAULT_TILING, (32, False): (_vn_kernel._DEFAULT_TILING[32, False][0], (16, 8))}


# name -> (environment variables, (module, attribute, value) patches); baseline: as shipped
VARIANTS: dict[str, tuple[dict, tuple]] = {
    "baseline": ({}, ()),
    "vn-minor": ({"GINJAX_VN_LAYOUT": "minor"}, ()),
    # session 18's layouts: the CUDA ConvContract kernels and the sums kernel components minor
    # beside planar VectorNeuron kernels (XLA transposes between them); the default since session 19
    # is every block kernel planar on a GPU (kernels/_layout.py)
    "cuda-minor": ({"GINJAX_BLOCK_LAYOUT": "minor", "GINJAX_VN_LAYOUT": "planar"}, ()),
    # every block kernel components minor (the packed minor VectorNeuron beside the minor CUDA kernels)
    "blocks-minor": ({"GINJAX_BLOCK_LAYOUT": "minor"}, ()),
    "vn-planar": ({"GINJAX_VN_LAYOUT": "planar"}, ()),
    # dilated layers (DilResNet's) and rows over 64 pixels (the N=128 grids) back on Triton: the CUDA
    # kernels' dilated and x-window instantiations turned off (both on by default since session 21)
    "triton-dilated": ({"GINJAX_CUDA_DILATED": "0"}, ()),
    "triton-windows": ({"GINJAX_CUDA_X_WINDOWS": "0"}, ()),
    "triton-dilated-windows": ({"GINJAX_CUDA_DILATED": "0", "GINJAX_CUDA_X_WINDOWS": "0"}, ()),
    # the forward and input gradient of rows of 64 pixels whose ring does not fit (dilation 8 at x
    # 64) on Triton's kernel instead of CUDA x windows of 32 (the weight gradient stays CUDA)
    "triton-narrow-windows": ({"GINJAX_CUDA_NARROW_WINDOWS": "0"}, ()),
    # a "mean" bias's input means beside the CUDA forward on the per-channel sums kernel instead
    # of XLA's two reductions a block
    "means-triton": ({"GINJAX_INPUT_MEANS": "triton"}, ()),
    "plain-middle-sum": ({}, (("kernels._reduce", "_split", lambda n, t: None),)),
    # thin layers on `dense` in two stages instead of one convolution (kernels/_thin.py, session 26;
    # off by default since session 34)
    "thin-two-stages": ({"GINJAX_DENSE_THIN": "1"}, ()),
    # the thin first and last layers on Triton's kernels instead of the CUDA kernels with zero
    # channels (kernels/triton/_cuda_padding.py; the default since session 35)
    "thin-on-triton": ({"GINJAX_CUDA_PAD_CHANNELS": "0"}, ()),
    # Triton's VectorNeuron backward of 32-channel blocks (the UNet's second level) at its tiling
    # before session 34
    "vn-c32-tiling-before": ({}, (("kernels.triton._vn_kernel", "_DEFAULT_TILING", Computed(_vn_tiling_c32_before)),)),
    # the UNet's upsampling GEMM with its product channels first, so the interleave of its phases
    # and the blocks' unpacking read contiguous rows (kernels/_resample.py, session 32; a GPU's
    # default since session 33), or last
    "subpixel-channels-first": ({"GINJAX_SUBPIXEL_ORDER": "channels-first"}, ()),
    "subpixel-channels-last": ({"GINJAX_SUBPIXEL_ORDER": "channels-last"}, ()),
    # a residual block's input added to its last convolution's output by XLA after the CUDA
    # forward, instead of in the forward's epilogue (session 29, on by default)
    "residual-after": ({"GINJAX_CUDA_RESIDUAL": "0"}, ()),
    # ... and DilResNet's (its blocks end with the VectorNeuron) after Triton's VectorNeuron forward
    # instead of in it (session 29, on by default)
    "vn-residual-after": ({"GINJAX_VN_RESIDUAL": "0"}, ()),
    # rows of 32 on one ring a CTA (4 warps an SM) instead of twin rings (session 30, on by default)
    "one-ring": ({"GINJAX_CUDA_TWIN": "0"}, ()),
    # the Triton VectorNeuron, forward and backward (the GPU default until session 28)
    "vn-triton": ({"GINJAX_VN_IMPL": "triton"}, ()),
    "vn-xla": ({"GINJAX_VN_IMPL": "xla"}, ()),
    # the layers after a VectorNeuron whose forward is Triton's reduce its output for their bias's
    # means themselves instead of taking the means its kernel added up (on by default, session 28)
    "vn-no-means": ({"GINJAX_VN_MEANS": "0"}, ()),
    # The CUDA VectorNeuron's kernels, every choice spelled out (the default since session 28 is
    # vn-cuda-ffma-triton-fwd; without the built library each is vn-triton): the CUDA forward and
    # the tensor-core backward (16 channels; the FFMA one elsewhere)...
    "vn-cuda": ({"GINJAX_VN_IMPL": "cuda", "GINJAX_VN_CUDA_MMA": "1", "GINJAX_VN_CUDA_FORWARD": "cuda"}, ()),
    # ... with the FFMA backward for 16 channels too ...
    "vn-cuda-ffma": ({"GINJAX_VN_IMPL": "cuda", "GINJAX_VN_CUDA_MMA": "0", "GINJAX_VN_CUDA_FORWARD": "cuda"}, ()),
    # ... Triton's forward kernel (with the means) beside the tensor-core backward ...
    "vn-cuda-triton-fwd": ({"GINJAX_VN_IMPL": "cuda", "GINJAX_VN_CUDA_MMA": "1",
                            "GINJAX_VN_CUDA_FORWARD": "triton"}, ()),
    # ... and beside the FFMA backward
    "vn-cuda-ffma-triton-fwd": ({"GINJAX_VN_IMPL": "cuda", "GINJAX_VN_CUDA_MMA": "0",
                                 "GINJAX_VN_CUDA_FORWARD": "triton"}, ()),
    # the Triton VectorNeuron's backward reading the forward's d = W x instead of recomputing it
    "vn-save-mix": ({"GINJAX_VN_SAVE_MIX": "1"}, ()),
    # the norms' statistics, their affine gradients and the bias gradients beside the CUDA kernels
    # as one Triton kernel (kernels/triton/channel_sums.py; the default on a GPU), and as XLA's
    # column reductions
    "channel-sums-triton": ({"GINJAX_CHANNEL_SUMS": "triton"}, ()),
    "channel-sums-xla": ({"GINJAX_CHANNEL_SUMS": "xla"}, ()),
    # layers with 32, 48, ... output channels per key on the CUDA kernels as launches of 16 each
    # (the default: the UNet decoder's input gradient, 16 + 16 -> 32 + 32, leaves Triton's
    # kernel), and such layers on Triton's kernels
    "cuda-output-groups": ({"GINJAX_CUDA_OUTPUT_GROUPS": "1"}, ()),
    "no-cuda-output-groups": ({"GINJAX_CUDA_OUTPUT_GROUPS": "0"}, ()),
    # the triton backend's forward and input gradient on the CUDA forward kernel where it covers
    # a layer (the default where the library is built), and on Triton's kernels only
    "cuda-fwd": ({"GINJAX_TRITON_FORWARD": "cuda"}, ()),
    "triton-fwd": ({"GINJAX_TRITON_FORWARD": "triton"}, ()),
    # and its weight gradient on kernels/cuda's weight-gradient kernel where that covers the layer
    # (the default where the library is built), and on Triton's kernel only
    "cuda-dw": ({"GINJAX_TRITON_WEIGHT_GRAD": "cuda"}, ()),
    "triton-dw": ({"GINJAX_TRITON_WEIGHT_GRAD": "triton"}, ()),
    # the CUDA forward's channel-group passes on and off (kernels/cuda/_plan.py): layers whose
    # input channels do not fit its shared memory in one group run on it, or on Triton's kernel
    "cuda-groups": ({"GINJAX_CUDA_CHANNEL_GROUPS": "1"}, ()),
    "no-cuda-groups": ({"GINJAX_CUDA_CHANNEL_GROUPS": "0"}, ()),
    # ConvBlocks' GroupNorm applied as its own pass before the VectorNeuron, and handed to the
    # Triton VectorNeuron kernels as their affine prologue (planar blocks; layers.normalize_and_activate)
    "norm-apart": ({"GINJAX_VN_NORM_PROLOGUE": "0"}, ()),
    "norm-prologue": ({"GINJAX_VN_NORM_PROLOGUE": "1"}, ()),
}


BACKEND_PREFIX = "backend="
TABLE_PREFIX = "table="


def _table_loader(path: pathlib.Path):
    """A stand-in for `kernels._measured.load` that returns the table at `path` for its device and
    no table for any other, so the step ranks by that table alone (as the stand-in of its compute
    capability where the device is another)."""
    data = json.loads(path.read_text())
    if not data.get("device_kind"):
        raise ValueError(f"variant {TABLE_PREFIX}{path}: the table names no `device_kind`")

    def load(device_kind: str):
        return data if data["device_kind"] == device_kind else None

    load.cache_clear = lambda: None
    load.device_kind = data["device_kind"]
    return load


def _check_table_device(name: str, kind: str) -> None:
    """A table variant ranks this device only by a table of this device or of the device whose table
    stands in for its compute capability: one of another capability would leave `auto` without a
    table, silently, and a sibling's of the same capability (which `device_table` lays only under
    those two) would rank by rows the device never ranks by alone."""
    from kernels import _measured, _registry

    here = _registry.device_kind()
    stand_in = _measured.kinds_by_capability().get(_registry.device_capability())
    if kind not in (here, stand_in):
        raise ValueError(f"variant (={name!r}): the table is for {kind!r}; this device is {here!r}"
                         + (f" (its compute capability's table is the {stand_in!r}'s)" if stand_in else ""))


def _backend_of(name: str):
    """The ConvContract backend a variant compiles the step under (None: the config's own)."""
    return name[len(BACKEND_PREFIX):] if name.startswith(BACKEND_PREFIX) else None


def _check(name: str) -> None:
    from kernels import registered_backends

    backend = _backend_of(name)
    if backend is not None:
        known = ("auto",) + registered_backends()
        if backend not in known:
            raise ValueError(f"variant (={name!r}) names backend {backend!r}; backends are {sorted(known)}")
    elif name.startswith(TABLE_PREFIX):
        if not pathlib.Path(name[len(TABLE_PREFIX):]).is_file():
            raise ValueError(f"variant (={name!r}) names no table file")
    elif name not in VARIANTS:
        raise ValueError(f"variant (={name!r}) must be one of {sorted(VARIANTS)}, {BACKEND_PREFIX}<backend> "
                         f"or {TABLE_PREFIX}<path>")


@contextlib.contextmanager
def variant(name: str):
    """Apply variant `name` for the duration of the block (restored after, also on error)."""
    _check(name)
    env, patches = VARIANTS.get(name, ({}, ()))
    if name.startswith(TABLE_PREFIX):
        loader = _table_loader(pathlib.Path(name[len(TABLE_PREFIX):]))
        _check_table_device(name, loader.device_kind)
        patches = (("kernels._measured", "load", loader),)
    from kernels._env import environment

    saved = []
    with environment(env):
        try:
            for module, attr, value in patches:
                mod = importlib.import_module(module)
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, value.make() if isinstance(value, Computed) else value)
            yield
        finally:
            for mod, attr, value in reversed(saved):
                setattr(mod, attr, value)


def measure(config: str, names, alternations: int, max_time: float) -> dict:
    import jax

    from bench import _cases, _configs, _timing

    case = _cases.ModelCase(_configs.CONFIGS[config])
    fn, args = case.function("step")
    compiled, rows = {}, {}
    for name in names:
        t0, phases = time.perf_counter(), {}
        with variant(name):
            compiled[name] = _timing.compile_for(fn, args, _backend_of(name), phases=phases)
        rows[name] = {"compile_s": round(time.perf_counter() - t0, 1), **{f"compile_{k}": round(v, 1) if isinstance(v, float) else v for k, v in phases.items()},
                      **_timing.memory_of(compiled[name]), "ms": []}
        jax.block_until_ready(compiled[name](*args))
    for _ in range(alternations):
        for name in names:
            t = _timing.time_compiled(compiled[name], args, max_time=max_time, min_rounds=3, warmup=1)
            rows[name]["ms"].append(round(t.ms, 3))
    for name in names:
        rows[name]["median_ms"] = statistics.median(rows[name]["ms"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_variants", description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--configs", default="resnet_d3_n64_b4,dilresnet_d3_n64_b4", help="model configs or sets (e.g. models-b1)")
    p.add_argument("--variants", default="baseline,plain-middle-sum")
    p.add_argument("--alternations", type=int, default=3)
    p.add_argument("--max-time", type=float, default=0.3)
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    for name in names:
        try:
            _check(name)
        except ValueError as e:
            p.error(f"--variants: {e}")
    if args.alternations < 1:
        p.error(f"--alternations (={args.alternations}) must be >= 1")
    path = pathlib.Path(args.out) / "step_variants.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    import jax

    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "configs": {}}
    from bench import _configs

    try:
        configs = _configs.parse_selection(args.configs, tuple(_configs.CONFIGS), "--configs", _configs.CONFIG_SETS)
    except ValueError as e:
        p.error(str(e))
    for config in configs:
        try:
            result["configs"][config] = measure(config, names, args.alternations, args.max_time)
        except Exception as e:  # noqa: BLE001 - recorded; the next config still runs
            result["configs"][config] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        path.write_text(json.dumps(result, indent=1))
        for name, row in result["configs"][config].items():
            print(config, name, row if isinstance(row, str) else {k: v for k, v in row.items() if k != "ms"}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
