"""The benchmark configurations, by the names tooling reads (see issue 3; keep them stable).

A layer configuration is one ginjax ConvContract on a torus, keys {scalar, vector} (plus the
2-tensor for `..._k2`) with `c` channels each in and out, 3x3(x3) invariant filters, vmapped over
a batch of B. A model configuration is one training step of a ginjax model. Names carry the
geometry: `d3_n64_b4_c16` = D=3, N=64 cells per axis, batch 4, 16 channels per key.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

LAYER_MODES = ("fwd", "fwd_bwd")
MODEL_MODES = ("step",)
MODES = LAYER_MODES + MODEL_MODES


@dataclasses.dataclass(frozen=True)
class LayerConfig:
    """One ConvContract benchmark: keys of tensor order 0..k_max, `c` channels per key in and out."""

    name: str
    D: int
    N: int
    B: int
    c: int
    k_max: int = 1
    quick: bool = False
    M: int = 3
    rhs_dilation: int = 1

    @property
    def kind(self) -> str:
        return "layer"

    @property
    def modes(self) -> tuple[str, ...]:
        return LAYER_MODES

    @property
    def spatial(self) -> tuple[int, ...]:
        return (self.N,) * self.D

    @property
    def filter_ks(self) -> tuple[int, ...]:
        # a pair (k_a, k_b) needs a filter of order k_a + k_b; order <= 2 is ginjax's usual bank
        return tuple(range(max(2, 2 * self.k_max) + 1))

    @property
    def keys(self) -> tuple[tuple[tuple[bool, ...], int], ...]:
        """The MultiImage keys ((False,)*k, parity 0), in and out."""
        return tuple(((False,) * k, 0) for k in range(self.k_max + 1))

    @property
    def pixels(self) -> int:
        return self.N**self.D


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One model training step (value_and_grad of an MSE loss w.r.t. the model)."""

    name: str
    model: str  # attribute of ginjax.models
    D: int
    N: int
    B: int
    depth: int
    model_kwargs: tuple[tuple[str, Union[int, str]], ...] = ()
    in_channels: tuple[int, int] = (2, 2)  # (scalar, vector)
    out_channels: tuple[int, int] = (1, 1)
    small: bool = False  # CPU-sized: checks the model path, not part of quick/full
    M: int = 3
    extra: bool = False  # outside quick/full/all: the batch-1 and 2D steps `auto` is checked on

    @property
    def quick(self) -> bool:
        return False

    @property
    def kind(self) -> str:
        return "model"

    @property
    def modes(self) -> tuple[str, ...]:
        return MODEL_MODES

    @property
    def spatial(self) -> tuple[int, ...]:
        return (self.N,) * self.D

    @property
    def pixels(self) -> int:
        return self.N**self.D


Config = Union[LayerConfig, ModelConfig]

LAYER_CONFIGS: tuple[LayerConfig, ...] = (
    LayerConfig("d3_n64_b4_c16", D=3, N=64, B=4, c=16),
    LayerConfig("d3_n64_b2_c32", D=3, N=64, B=2, c=32),
    LayerConfig("d3_n128_b1_c16", D=3, N=128, B=1, c=16),
    LayerConfig("d2_n256_b16_c32", D=2, N=256, B=16, c=32),
    LayerConfig("d3_n64_b2_c8_k2", D=3, N=64, B=2, c=8, k_max=2),
    LayerConfig("d3_n16_b2_c8", D=3, N=16, B=2, c=8, quick=True),
    LayerConfig("d2_n64_b4_c8", D=2, N=64, B=4, c=8, quick=True),
    # the foundation issue's CPU comparison (dense vs reference at N=32, 16 channels per key)
    LayerConfig("d3_n32_b1_c16", D=3, N=32, B=1, c=16),
)

MODEL_CONFIGS: tuple[ModelConfig, ...] = (
    ModelConfig("unet_d3_n64_b4", "UNet", D=3, N=64, B=4, depth=16, model_kwargs=(("num_downsamples", 3),)),
    ModelConfig("resnet_d3_n64_b4", "ResNet", D=3, N=64, B=4, depth=16, model_kwargs=(("num_blocks", 4),)),
    ModelConfig("dilresnet_d3_n64_b4", "DilResNet", D=3, N=64, B=4, depth=16, model_kwargs=(("num_blocks", 2),)),
    # CPU-sized steps (set `small-models`): a check of the model path; compiling them takes
    # about a minute on 2 CPU cores, too slow for the quick set
    ModelConfig("unet_d2_n16_b2", "UNet", D=2, N=16, B=2, depth=4, model_kwargs=(("num_downsamples", 2),), small=True),
    ModelConfig("resnet_d2_n16_b2", "ResNet", D=2, N=16, B=2, depth=4, model_kwargs=(("num_blocks", 1),), small=True),
    ModelConfig(
        "dilresnet_d2_n16_b2", "DilResNet", D=2, N=16, B=2, depth=4, model_kwargs=(("num_blocks", 1),), small=True
    ),
)

# `auto` must not be slower than `dense` on the batch-1 steps of every model at these sizes (issue 14)
_KWARGS = {"UNet": (("num_downsamples", 3),), "ResNet": (("num_blocks", 4),), "DilResNet": (("num_blocks", 2),)}
MODEL_CONFIGS += tuple(
    ModelConfig(f"{model.lower()}_d3_n{n}_b1", model, D=3, N=n, B=1, depth=16, model_kwargs=kwargs, extra=True)
    for n in (32, 64, 128)
    for model, kwargs in _KWARGS.items()
)
# The same models on a 2D grid at the standard 2D layer's size (256^2, 32 channels per key), at
# batch 8: the steps of 2D users, whose layers run on Triton's kernels (the CUDA ones are D=3)
MODEL_CONFIGS += tuple(
    ModelConfig(f"{model.lower()}_d2_n256_b8", model, D=2, N=256, B=8, depth=32, model_kwargs=kwargs, extra=True)
    for model, kwargs in _KWARGS.items()
)

CONFIGS: dict[str, Config] = {c.name: c for c in LAYER_CONFIGS + MODEL_CONFIGS}

# Small layers whose speeds `auto` ranks backends by on a CPU (`python -m bench measure-auto
# --configs cpu-small`): the sizes of CPU prototyping and of the test suite's models (1-8
# channels per key, 4-16 cells a side), plain and dilated (DilResNet), at batch 1 and 4. Only
# measure-auto takes them, as single layers (their times are mostly call overhead: no bench run).
AUTO_LAYER_GRID: dict[str, LayerConfig] = {
    c.name: c
    for c in (
        LayerConfig(f"cpu_d{D}_n{N}_b{B}_c{ch}" + (f"_dil{d}" if d > 1 else ""), D=D, N=N, B=B, c=ch, rhs_dilation=d)
        for D, sides in ((2, (4, 8, 16)), (3, (4, 8)))
        for N in sides
        for ch in (1, 2, 4, 8)
        for d in (1, 2)
        for B in (1, 4)
    )
}
AUTO_LAYER_SETS: dict[str, tuple[str, ...]] = {"cpu-small": tuple(AUTO_LAYER_GRID)}

# named sets accepted wherever configs are selected
_SMALL = tuple(c.name for c in MODEL_CONFIGS if c.small)
_EXTRA = tuple(c.name for c in MODEL_CONFIGS if c.extra and c.D == 3)
_MODELS_2D = tuple(c.name for c in MODEL_CONFIGS if c.extra and c.D == 2)
CONFIG_SETS: dict[str, tuple[str, ...]] = {
    "quick": tuple(c.name for c in LAYER_CONFIGS if c.quick),
    "full": tuple(c.name for c in CONFIGS.values() if not c.quick and c.name not in _SMALL + _EXTRA + _MODELS_2D),
    "all": tuple(c for c in CONFIGS if c not in _SMALL + _EXTRA + _MODELS_2D),  # quick + full: the GPU default
    "layers": tuple(c.name for c in LAYER_CONFIGS),
    "models": tuple(c.name for c in MODEL_CONFIGS if not c.small and not c.extra),
    "models-b1": _EXTRA,
    "models-2d": _MODELS_2D,
    "small-models": _SMALL,
}
# the steps `python -m bench measure-auto` measures the layers of (and `auto` is checked on)
CONFIG_SETS["auto-models"] = CONFIG_SETS["models"] + CONFIG_SETS["models-b1"] + CONFIG_SETS["models-2d"]

# Dense throughput ceilings measured on the device (TFLOP/s), by precision mode; keyed by a
# lower-case substring of jax's device_kind: the H200's dense matmul peaks at TF32 and BF16.
DEVICE_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "h200": {"bf16": 790.0, "tf32": 395.0},
}


# `auto` (the dispatcher's own pick per layer) is a bench backend too, on request only.
AUTO = "auto"


def bench_backends() -> tuple[str, ...]:
    """The backends a benchmark case can name: the registered ones, then `auto`."""
    import kernels

    return tuple(kernels.registered_backends()) + (AUTO,)


def case_id(config: Config, mode: str, backend: str) -> str:
    """The pytest parameter id: `[quick-]{config}-{mode}-{backend}`."""
    prefix = "quick-" if config.quick else ""
    return f"{prefix}{config.name}-{mode}-{backend}"


def cases(configs, backends) -> list[tuple[tuple[str, str, str], str]]:
    """((config name, mode, backend), case_id) for every mode of every config on every backend:
    the parametrisation of the bench/test_*.py benchmarks."""
    return [
        ((cfg.name, mode, backend), case_id(cfg, mode, backend))
        for cfg in configs
        for mode in cfg.modes
        for backend in backends
    ]


def group_name(config: Config, mode: str) -> str:
    return f"{config.name}-{mode}"


def default_set(platform: str) -> str:
    """The set `python -m bench` and `pytest bench/` run when none is given: quick on CPU."""
    return "quick" if platform == "cpu" else "all"


def parse_selection(value: Optional[str], choices: tuple[str, ...], flag: str, sets: Optional[dict] = None) -> tuple[str, ...]:
    """Turn 'a,b' (or a set name) into a tuple of names, rejecting unknown names.

    Raises ValueError naming the flag and the bad value.
    """
    if value is None or value.strip() == "":
        return choices
    out: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if sets and part in sets:
            names = sets[part]
        elif part in choices:
            names = (part,)
        else:
            known = list(choices) + (sorted(sets) if sets else [])
            raise ValueError(f"{flag} (={value!r}): unknown name {part!r}; choose from {', '.join(known)}")
        out.extend(n for n in names if n not in out)
    return tuple(out)


def select_configs(value: Optional[str], platform: str) -> tuple[str, ...]:
    """Configs chosen by a --configs/--bench-configs value ('auto' or None: the device default)."""
    if value is None or value.strip() in ("", "auto"):
        value = default_set(platform)
    return parse_selection(value, tuple(CONFIGS), "--configs", CONFIG_SETS)


def peak_tflops(device_kind: str, precision: str) -> Optional[float]:
    kind = device_kind.lower()
    for needle, peaks in DEVICE_PEAK_TFLOPS.items():
        if needle in kind:
            return peaks.get(precision)
    return None
