"""Shared test helpers: fixture paths, relative error, float64 context, and the ConvContract
specs and operands that the kernel-backend tests build from the recorded ginjax 0.1.8 cases."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

# Without an NVIDIA GPU, the Triton backend runs its kernels through Triton's interpreter on
# torch CPU tensors; the variable must be set before triton is imported.
if "TRITON_INTERPRET" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["TRITON_INTERPRET"] = "1"
# Likewise the CUDA kernels' library: without a GPU the tests see it as CI does, not built (an
# in-place build would register its targets and let a test pass here that fails there), unless
# GINJAX_CUDA_LIBRARY names one.
if "GINJAX_CUDA_LIBRARY" not in os.environ and shutil.which("nvidia-smi") is None:
    os.environ["GINJAX_CUDA_LIBRARY"] = os.path.join(tempfile.gettempdir(), "no-gpu-here", "_ginjax_cuda.so")

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

# One XLA compilation cache per test run, shared by the pytest-xdist workers and by the
# subprocesses tests start (they inherit the variable): a program one process compiled (a
# float64 oracle, a model's initialisers and steps) is loaded by the others instead of compiled
# again. The first process of the run makes the directory and removes it at
# the end, so no run ever loads another run's programs.
_XLA_CACHE = "GINJAX_TESTS_XLA_CACHE"
_own_xla_cache = False


def pytest_configure(config):
    global _own_xla_cache
    if _XLA_CACHE not in os.environ:  # the run's first process: the workers start after this
        os.environ[_XLA_CACHE] = tempfile.mkdtemp(prefix="ginjax-tests-xla-")
        _own_xla_cache = True
    jax.config.update("jax_compilation_cache_dir", os.environ[_XLA_CACHE])
    # not the single eager operations (tens of ms each): writing every one made them 20% slower
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:  # a size bound turns on jax's file lock: no process reads an entry another is writing
        import filelock  # noqa: F401

        jax.config.update("jax_compilation_cache_max_size", 1 << 40)
    except ImportError:  # unlocked: a torn read fails decompression and jax compiles instead
        pass


def pytest_unconfigure(config):
    if _own_xla_cache:
        shutil.rmtree(os.environ.pop(_XLA_CACHE), ignore_errors=True)


# CI explores the same examples every run (a red CI then means a regression, not a new draw);
# local runs keep drawing fresh ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
from hypothesis import assume
from hypothesis import strategies as st

FIXTURES = pathlib.Path(__file__).parent / "data" / "ginjax-0.1.8"

# Tests marked `slow` (deselected by default, `python -m pytest -m slow` runs them; CI runs them
# when time allows): file -> test name (or one parametrisation's id) -> why, with what still
# covers it by default. Every single test or parametrisation is listed here. Three rules over
# generated matrices mark theirs where the matrix is built, since they would be dozens of rows
# here: the many-draws variant of every hypothesis check (`drawn_examples` below), the backend x
# case rows of tests/test_conformance.py outside its DEFAULT_CASES, and the reference and Pallas
# rows of tests/test_conv_contract_layer.py's fixture matrix (each file says why).
SLOW: dict[str, dict[str, str]] = {
    "test_bench_step_variants.py": {
        "test_small_model_step_under_two_variants":
            "a model step compiled twice on the CPU (~60 CPU s); the variants' mechanics and that each"
            " changes its program are checked by default",
    },
    "test_bench_tooling.py": {
        "test_parity_sass_reports_a_kernels_resources_and_opcodes":
            "an offline sm_90 compile (~20 CPU s); the kernel it compiles runs through the interpreter"
            " by default in test_parity_conv_triton.py",
        "test_the_parity_spike_measures_each_variant_it_names":
            "bench.parity_spike through the interpreter (~45 CPU s); the switches it sets are each"
            " checked by default in test_parity_conv_triton.py",
        "test_quick_suite_is_a_correctness_check_of_every_available_backend":
            "the bench's quick suite in a subprocess on every backend, interpreters included: over"
            " 64 CPU s (cut off by its 600 s timeout on a loaded machine); the backends' correctness"
            " is test_conformance.py's, the bench command is checked by the other tests here",
        "test_compare_defaults_to_newest_baseline_against_a_fresh_run":
            "a second `python -m bench` run in a subprocess: 40 CPU s; compare's verdicts are"
            " checked on stored and synthetic runs by the tests around it",
    },
    # Kernel-internal checks in the CPU interpreters, 10-40 CPU seconds each; what covers each
    # mechanism by default is named.
    "test_parity_conv_triton.py": {
        "test_forward_and_gradients_match[d3-same-mixed-pseudo]":
            "30 CPU s; zero padding and pseudo-tensor keys run by default in d2-all-orders-zero-pad",
        "test_narrow_output_groups_match":
            "57 CPU s; `out_width` narrower than the default (measured slower at every width, session 49);"
            " the GPU test of other tilings (test_parity_conv_triton_gpu.py) compiles and checks it",
        "test_concatenated_dots_match[2]":
            "36 CPU s; the forward's joined dots are a tiling off its default (concat 1); the weight"
            " gradient joins 8 by default in every gradient test, the GPU test compiles and checks the forward's",
        "test_concatenated_dots_match[8]": "30-50 CPU s; as [2]",
        "test_concatenated_dots_match[1]":
            "27 CPU s; concat 1 is the forward's default tiling, which test_forward_and_gradients_match runs",
        "test_forward_and_gradients_match[d2-m5]":
            "27 CPU s; its halo of 2 is also d2-dilated-torus's (M = 3 at dilation 2), which runs by"
            " default with d2-all-orders-zero-pad",
        "test_forward_and_gradients_match[d2-torus-axis-same-pad]":
            "20 CPU s; zero padding runs by default in d2-all-orders-zero-pad",
        "test_vmap_is_one_launch_per_kernel_and_matches_per_example":
            "44 CPU s; a vmapped forward through the backend runs by default in"
            " test_triton_backend_runs_it_with_bias_and_residual (one launch), gradients unbatched",
    },
    "test_parity_forward_cuda.py": {
        "test_kernel_on_the_cpu_matches_reference[spatial0-True-1-host]":
            "60 CPU s (g++ on the kernel and a 70-pixel row); the host build runs by default on the"
            " dilated, zero-padded layer, the torus layer through the lane emulation",
    },
    "test_conv_contract_triton.py": {
        "test_bias_in_the_epilogue_with_gradients_under_vmap[True]":
            "the epilogue bias with a torus mean; [False] runs by default, test_conformance.py the kernels",
        "test_vmap_is_one_batched_launch": "also a GPU test (test_conv_contract_triton_gpu.py)",
        "test_block_layouts_forward_and_gradients[planar_in]": "planar and interleaved run by default",
        "test_many_tiles_chunks_and_masks": "ragged tiles: test_configurations_match_reference's odd grids",
        "test_bf16_operands_and_float64_fallback": "dtype coverage: test_conformance.py and the layer's dtype tests",
        "test_grad_vmap_of_grad_and_grad_of_vmap_under_jit":
            "transformations: test_conv_contract_triton_backward.py's vmap/grad test",
    },
    "test_conv_contract_triton_backward.py": {
        "test_weight_kernel_gpu_tiling_shares_and_ragged_round":
            "the GPU's tiling in the interpreter; the default tiling's gradients run in every conformance row",
    },
    "test_conv_contract_pallas.py": {
        "test_precision_modes_against_float64_oracle[fp32]": "[tf32] runs by default",
        "test_precision_modes_against_float64_oracle[bf16]": "[tf32] runs by default",
        "test_small_tiles_many_programs_and_poisoned_outputs[factorised]": "[taps] runs by default",
        "test_fixture_cases_taps[case01]": "[case08] runs by default",
        "test_fixture_cases_taps[case12]": "[case08] runs by default",
        "test_jit_of_grad_of_vmap_matches_reference": "drawn configurations run batched and unbatched by default",
        "test_input_gradient_plan_is_the_transpose": "the input gradient is checked in every pallas conformance row",
        "test_lowers_to_triton_for_cuda[bf16-factorised]": "[fp32-factorised] runs by default",
        "test_lowers_to_triton_for_cuda[tf32-factorised]": "[fp32-factorised] runs by default",
    },
    "test_conv_contract_bias.py": {
        "test_layer_bias_is_ginjax_semantics[auto-True]":
            "29 CPU s; 'auto' is 'scalar' on scalars and 'mean' on the rest: [scalar-True], [mean-True]"
            " and [auto-False] run by default",
        "test_gradients_match_the_plain_bias[reference-{'is_torus': True}]": "the dense row runs by default",
        "test_bias_modes_fused_backends[pallas]": "[triton] and [native] run by default",
    },
    "test_conv_contract_kernels.py": {
        "test_float32_against_float64_oracle[reference]": "[dense] runs by default",
    },
    "test_conv_contract_layer.py": {
        "test_equivariant_under_every_group_element[2-reference]": "[2-dense] (the same layer code) runs by default",
        "test_equivariant_under_every_group_element[3-reference]": "[3-dense] (the same layer code) runs by default",
    },
    "test_conv_contract_native.py": {
        "test_odd_sizes[3-spatial4-kwargs4]": "2-tensors: test_conformance.py's native rows (case01)",
        "test_odd_sizes[3-spatial3-kwargs3]": "mixed torus and rhs_dilation: native conformance rows and drawn layers",
    },
    "test_models.py": {
        "test_convertD_unet_to_3d_stays_equivariant":
            "100 CPU s; convertD is checked by test_convertD_compatibility_on_orthoplex_filters, 3D UNet"
            " equivariance by test_model_equivariant",
        "test_training_lowers_loss": "64 CPU s; training is tests/test_ml_training.py's",
        "test_non_equivariant_variants_run[UNet]": "[ResNet] runs by default",
        "test_model_equivariant[UNet-plain-2]": "[UNet-plain-3] and [UNet-groupnorm-2] run by default",
    },
    "test_conv_contract_cuda.py": {
        "test_fp32_calls_run_the_split_kernels_where_asked[minor]":
            "[planar] (the GPU's layout; the split dispatch is the same code) runs by default",
        "test_a_dilated_layer_runs_forward_and_input_gradient_on_the_emulated_kernel[minor-4]":
            "[planar-2] runs by default; dilation 4 in the minor layout is the lane emulation's"
            " (tests/test_conv_contract_cuda_plan.py and the emulation tests)",
    },
    "test_dense_thin.py": {
        "test_named_forms_on_wide_layers_match_reference_with_gradients[D = 2, torus-contract-first]":
            "13 CPU s; the contract form runs by default at D = 3, D = 2 in the stencil form",
        "test_named_forms_on_wide_layers_match_reference_with_gradients[D = 3, dilation 2-grouped-stencil-first]":
            "15 CPU s; the grouped stencil runs by default at D = 2, D = 3 in the contract form",
        "test_thin_forms_match_reference_with_gradients[last, torus]":
            "17 CPU s; [last, valid], [last, zero padding] and [last, D = 2] run by default",
        "test_thin_forms_match_reference_with_gradients[first, D = 2]":
            "16 CPU s; [first, dilation 2] runs by default, D = 2 in [last, D = 2]",
        "test_named_forms_on_wide_layers_match_reference_with_gradients[D = 3, dilation 2-stencil-first]":
            "17 CPU s; the stencil form runs by default at D = 2, D = 3 in the contract form",
        "test_the_thin_spike_times_each_way_and_restores_the_switch":
            "bench/thin_spike.py end to end (bench tooling); the thin forms and the switch are"
            " checked by test_thin_forms_match_reference_with_gradients and the tests around it",
        "test_thin_forms_match_reference_with_gradients[first, torus]":
            "[first, dilation 2] (the same first-layer form) runs by default",
    },
    "test_vector_neuron_means.py": {
        "test_models_take_the_means_from_the_vector_neurons[ResNet]":
            "[DilResNet] (the same residual blocks, VectorNeuron and bias-mean hand-off) runs by default",
        "test_models_take_the_means_from_the_vector_neurons[UNet]":
            "[DilResNet] (the same VectorNeuron and bias-mean hand-off) runs by default",
    },
    "test_glue.py": {
        "test_model_step_equals_plain_glue[ResNet-3]": "[ResNet-2] runs by default",
        "test_model_step_equals_plain_glue[DilResNet-2]":
            "[ResNet-2] (the same residual blocks, norms, VectorNeuron and bias means) runs by default",
        "test_model_step_equals_plain_glue[UNet-2]": "[ResNet-2] runs by default",
    },
    "test_resample.py": {
        "test_models_match_reference[UNet-2-1]": "[UNet-3-1] runs by default",
        "test_models_match_reference[ResNet-2-1]":
            "a model without pooling or upsampling; [UNet-3-1] (the same blocks and both) runs by default",
    },
    "test_sharding.py": {
        "test_model_sharded_cases":
            "UNet, ResNet, DilResNet in float64 on 4 simulated devices, in a subprocess; the split"
            " itself (kernels.spatial_sharding) is checked by test_conv_contract_sharded_cases",
        "test_scaling_benchmark_smoke":
            "bench.scaling end to end (bench tooling, not the library's API) in a subprocess",
    },
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    found: dict[str, set[str]] = {}
    for item in items:
        listed = SLOW.get(item.path.name, {})
        for key in {item.name, item.originalname} & listed.keys():
            item.add_marker(pytest.mark.slow)
            found.setdefault(item.path.name, set()).add(key)
    # a renamed or deleted test must not silently leave the list (checked when files are
    # collected whole: no -k, no node ids)
    if config.getoption("keyword") or any("::" in arg for arg in config.args):
        return
    for name in {item.path.name for item in items} & SLOW.keys():
        missing = set(SLOW[name]) - found.get(name, set())
        if missing:
            raise pytest.UsageError(f"tests/conftest.py SLOW lists tests that {name} lacks: {sorted(missing)}")


def drawn_examples(few: int, many: int):
    """Parametrise a hypothesis check by its number of drawn examples: the default run draws `few`,
    the `slow` run `many` (each example compiles several XLA programs, so the count is the cost).
    The test takes `examples` and calls `run_drawn` with it."""
    return pytest.mark.parametrize(
        "examples",
        [pytest.param(few, id=f"{few}-drawn"), pytest.param(many, id=f"{many}-drawn", marks=pytest.mark.slow)],
    )


def run_drawn(check, examples: int, **strategies) -> None:
    """Run `check(**drawn)` on `examples` hypothesis draws of `strategies` (the profile loaded
    above decides derandomisation; no deadline: first calls compile)."""
    run = settings(
        max_examples=examples, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )(given(**strategies)(check))
    run()


def residual_model_by_plus(model, x):
    """An equivariant residual model (ResNet, DilResNet) on unbatched `x` the plain way: each block's
    ConvBlocks in turn, then its input added by MultiImage `+` (what `_run_residual` fuses)."""
    for layer in model.encoder:
        x, _ = layer(x)
    for block in model.blocks:
        residual = x
        for layer in block:
            x, _ = layer(x)
        x = x + residual
    for layer in model.decoder:
        x, _ = layer(x)
    return x


def rel_l2(actual, expected) -> float:
    """Relative L2 error ||a - e|| / ||e||, computed in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    denom = np.linalg.norm(e)
    assert denom > 0, "reference is all zeros: the comparison would prove nothing"
    return float(np.linalg.norm(a - e) / denom)


def gradient_errors(got, want, element_scale: float = 0.0) -> list[float]:
    """Per block of the gradient pytrees `got` and `want` (same structure): ||g - w|| over the
    largest of ||w||, the norm of all of `want` together and element_scale * sqrt(block size),
    in float64. A block whose gradient cancels by symmetry (a sum of many O(1) terms) is rounding
    noise on both sides, 1e-16 in a float64 oracle and 1e-7 in fp32: measured against its own
    norm it would fail for nothing, so it is measured at the scale of the whole gradient, or,
    where every block cancels, at `element_scale`, the size of a term per element."""
    got, want = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(got) == len(want), (len(got), len(want))
    want = [np.asarray(w, np.float64) for w in want]
    total = np.sqrt(sum(np.sum(np.square(w)) for w in want))
    errors = []
    for g, w in zip(got, want):
        scale = max(np.linalg.norm(w), total, element_scale * np.sqrt(w.size))
        assert scale > 0, "the reference gradient is all zeros: the comparison would prove nothing"
        errors.append(float(np.linalg.norm(np.asarray(g, np.float64) - w) / scale))
    return errors


def jaxpr_equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside its equations (custom_vjp, pjit, cond
    branches, ...), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    yield from jaxpr_equations(getattr(inner, "jaxpr", inner))


@contextlib.contextmanager
def float64():
    """Enable 64-bit arrays inside the block only (the oracle precision of docs/ARCHITECTURE.md)."""
    with jax.enable_x64(True):
        yield


def fixture_filters(D: int, M: int) -> dict[tuple[int, int], np.ndarray]:
    """Invariant filter bases recorded from ginjax 0.1.8, keyed (k, parity)."""
    data = np.load(FIXTURES / "invariant_filters.npz")
    out = {}
    for name in data.files:
        if name.startswith(f"filters/D{D}M{M}/"):
            kp = name.rsplit("/", 1)[1]  # k{k}p{p}
            k, p = int(kp[1 : kp.index("p")]), int(kp[kp.index("p") + 1 :])
            out[(k, p)] = data[name]
    return out


def filter_bank(D: int, M: int, keep=None, *, ks=(0, 1, 2)):
    """`geom.get_invariant_filters([M], list(ks), [0, 1], D, geom.make_all_operators(D))` as
    recorded from ginjax 0.1.8 (tests/test_geometric_filters.py checks the live ones against the
    record; building them costs seconds of eager dispatch per call). `keep`: {(k, parity):
    filter indices} for a subset of the bank."""
    import jax.numpy as jnp
    import ginjax.geometric as geom  # here, not at the top: the kernel-backend tests do not need it

    blocks = {}
    for (k, p), arr in sorted(fixture_filters(D, M).items()):
        if k not in ks or (keep is not None and (k, p) not in keep):
            continue
        blocks[((False,) * k, p)] = jnp.asarray(arr if keep is None else arr[list(keep[(k, p)])])
    return geom.MultiImage(blocks, D)


def conv_contract_cases() -> list[str]:
    data = np.load(FIXTURES / "conv_contract.npz")
    return sorted({name.split("/")[0] for name in data.files})


def conv_contract_case(case: str) -> tuple[dict, dict[str, np.ndarray]]:
    data = np.load(FIXTURES / "conv_contract.npz")
    arrays = {name[len(case) + 1 :]: data[name] for name in data.files if name.startswith(case + "/")}
    meta = json.loads(str(arrays.pop("meta")))
    return meta, arrays


def nested_tuple(value):
    """`value` with every (nested) JSON list turned into a tuple, as make_spec and the layer take them."""
    if isinstance(value, list):
        return tuple(nested_tuple(v) for v in value)
    return value


def invariant_pairs(filters, in_keys, out_candidates):
    """Every (input, output) pair whose invariant filter (k_in + k_out, parity sum mod 2) is in
    `filters`, as make_spec's (in_index, out_index, basis) triples, and the output keys those pairs
    reach, in first-reached order (a candidate no pair reaches is dropped)."""
    out_keys, pairs = [], []
    for a, (ka, pa, _) in enumerate(in_keys):
        for kb, pb, cb in out_candidates:
            fk = (ka + kb, (pa + pb) % 2)
            if fk not in filters:
                continue
            if (kb, pb, cb) not in out_keys:
                out_keys.append((kb, pb, cb))
            pairs.append((a, out_keys.index((kb, pb, cb)), filters[fk]))
    return out_keys, pairs


def draw_keys_and_pairs(draw, key_types, max_keys):
    """Hypothesis draw of D (2 or 3), a filter side M, up to `max_keys` input and output
    (k, parity) types out of `key_types` with 1-3 channels each, and the invariant_pairs between
    them: (D, M, in_keys, out_keys, pairs); draws without any pair are rejected."""
    D = draw(st.sampled_from([2, 3]))
    M = draw(st.sampled_from([2, 3, 5] if D == 2 else [2, 3]))
    filters = fixture_filters(D, M)
    ins = draw(st.lists(st.sampled_from(key_types), min_size=1, max_size=max_keys, unique=True))
    outs = draw(st.lists(st.sampled_from(key_types), min_size=1, max_size=max_keys, unique=True))
    in_keys = [(k, p, draw(st.integers(1, 3))) for k, p in ins]
    out_candidates = [(k, p, draw(st.integers(1, 3))) for k, p in outs]
    out_keys, pairs = invariant_pairs(filters, in_keys, out_candidates)
    assume(pairs)
    return D, M, in_keys, out_keys, pairs


def draw_padding(draw, D, M):
    """Hypothesis draw of a make_spec padding: the centred modes only for odd M, and per-axis
    (low, high) pairs (a tuple) when 'explicit' is drawn."""
    if M % 2 == 1:
        padding = draw(st.sampled_from([None, "TORUS", "SAME", "VALID", 1, "explicit"]))
    else:
        padding = draw(st.sampled_from(["VALID", 1, "explicit"]))
    if padding == "explicit":
        padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(D))
    return padding


# every (k, parity) key type of tensor order up to 2: the fused backends' coverage
COVERED_KEYS = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def draw_covered_layer(draw):
    """Hypothesis draw of a layer inside the fused backends' coverage (stride 1, any padding,
    rhs_dilation 1-2, torus per axis) and a grid side N that fits its filters: (spec, N)."""
    import kernels  # here, not at the top: only the kernel-backend tests need it

    D, M, in_keys, out_keys, pairs = draw_keys_and_pairs(draw, COVERED_KEYS, 2)
    rhs = draw(st.integers(1, 2)) if M <= 3 else 1
    is_torus = draw(st.one_of(st.booleans(), st.tuples(*[st.booleans()] * D)))
    padding = draw_padding(draw, D, M)
    N = draw(st.integers(5, 7) if D == 2 else st.integers(4, 5))
    assume(N >= (M - 1) * rhs + 1)
    return kernels.make_spec(D, in_keys, out_keys, pairs, is_torus, 1, padding, None, rhs), N


def fixture_spec(meta, arrays):
    """The spec, inputs and weights of a recorded ginjax 0.1.8 ConvContract case (bias excluded),
    and its recorded outputs."""
    import kernels  # here, not at the top: only the kernel-backend tests need it

    D, M = meta["D"], meta["M"]
    ins = [tuple(t) for t in meta["input"]]
    out_keys, pairs = invariant_pairs(fixture_filters(D, M), ins, [tuple(t) for t in meta["target"]])
    name = lambda k, p: f"k{k}p{p}"
    weights = [arrays[f"w/{name(*ins[a][:2])}/{name(*out_keys[b][:2])}"] for a, b, _ in pairs]
    kw = meta["kwargs"]
    spec = kernels.make_spec(
        D, ins, out_keys, pairs, nested_tuple(meta["is_torus"]),
        stride=nested_tuple(kw.get("stride", 1)), padding=nested_tuple(kw.get("padding")),
        lhs_dilation=nested_tuple(kw.get("lhs_dilation")), rhs_dilation=nested_tuple(kw.get("rhs_dilation", 1)),
    )
    inputs = [arrays[f"x/{name(k, p)}"] for k, p, _ in ins]
    expected = [arrays[f"out/{name(k, p)}"] for k, p, _ in out_keys]
    return spec, inputs, weights, expected


def random_operands(spec, spatial, seed, batch=None, dtype=np.float64):
    """Fresh standard-normal numpy inputs and weights of `spec` (never zeros), inputs led by a
    `batch` axis when given; one draw order, so a seed means the same operands in every test file."""
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    inputs = [rng.standard_normal(lead + spec.in_shape(a, spatial)).astype(dtype) for a in range(len(spec.in_keys))]
    weights = [
        rng.standard_normal((spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2], p.basis.n_filters)).astype(dtype)
        for p in spec.pairs
    ]
    return inputs, weights


@pytest.fixture
def rng():
    return np.random.default_rng(20261121)


def assert_sanitizer_clean(code: str, timeout: int = 400, tool: str = "memcheck") -> None:
    """Run `code` (a Python script that prints "done" at its end) under compute-sanitizer's
    `tool` (memcheck, racecheck, synccheck) with this test run's sys.path; fail on any error it
    reports or a script failure."""
    import subprocess
    import sys

    if tool not in ("memcheck", "racecheck", "synccheck", "initcheck"):
        raise ValueError(f"`tool` (={tool!r}) must be one of compute-sanitizer's memcheck, racecheck, synccheck, initcheck")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(
        ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", sys.executable, "-c", code],
        capture_output=True, text=True, env=env, timeout=timeout,
    )
    assert out.returncode == 0 and "done" in out.stdout, (out.stdout[-3000:], out.stderr[-3000:])
    # racecheck sums up hazards, not errors
    summary = "RACECHECK SUMMARY: 0 hazards" if tool == "racecheck" else "ERROR SUMMARY: 0 errors"
    assert summary in out.stdout + out.stderr, (out.stdout[-3000:], out.stderr[-3000:])
