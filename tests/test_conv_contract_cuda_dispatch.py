"""The `triton` backend's CUDA forward (GINJAX_TRITON_FORWARD, default "cuda") on a CPU: the input
gradient's transposed layer rewritten on the forward layer's bases (a signed permutation of its
filters, so the one compiled CUDA stencil serves both directions), and the dispatch: forward and
input gradient to the CUDA call where it covers them, the bias offsets added after it, the
weight gradient on triton's kernel, gradients equal to `reference`. The CUDA call itself is a
stand-in here (`dense` with a record of the specs it was asked for); the compiled kernel's
numbers are tests/test_conv_contract_cuda_gpu.py's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from _conv_cuda_emulate import library_emulated
from conftest import gradient_errors, rel_l2
from kernels import cuda
from kernels._fused import signed_permutation, transposed_spec, transposed_weights, with_bases_of
from kernels._spec import FilterBasis, Pair
from kernels.cuda import _plan

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import _cuda_dispatch, conv_contract as triton_entry  # noqa: E402

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])


def small_layer(c=2, N=5, batch=2, seed=0):
    """The standard layer's bases with c channels per key, on an N^3 torus."""
    spec = dataclasses.replace(
        SPEC,
        in_keys=tuple(k[:2] + (c,) for k in SPEC.in_keys),
        out_keys=tuple(k[:2] + (c,) for k in SPEC.out_keys),
    )
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(rng.standard_normal((batch,) + spec.in_shape(a, (N,) * 3)), jnp.float32) for a in range(2)]
    ws = [jnp.asarray(rng.standard_normal((c, c, p.basis.n_filters)) / np.sqrt(c * p.basis.n_filters), jnp.float32)
          for p in spec.pairs]
    return spec, xs, ws


def test_the_transposed_standard_layer_is_its_forward_bases_up_to_signs():
    spec_t, _ = transposed_spec(SPEC)
    assert not _plan.coverage(spec_t, (64, 64, 64), "float32")[0]  # its own basis is not compiled
    twin, move = with_bases_of(spec_t, SPEC)
    assert _plan.coverage(twin, (64, 64, 64), "float32")[0]
    by_keys = {(p.in_index, p.out_index): p.basis for p in SPEC.pairs}
    for p in spec_t.pairs:
        perm, signs = signed_permutation(p.basis, by_keys[p.in_index, p.out_index])
        # scalar <-> vector filters are odd under the flip: their signs turn
        assert set(signs) == ({-1.0} if p.in_index != p.out_index else {1.0}), (p.in_index, p.out_index, signs)
    # the rewritten layer is the same linear map, on fresh operands
    spec, xs, ws = small_layer(c=3, N=4, batch=1, seed=11)
    spec_t, _ = transposed_spec(spec)
    twin, move = with_bases_of(spec_t, spec)
    gs = [x[0] for x in xs]
    wt = transposed_weights(ws)
    want = kernels.conv_contract(spec_t, gs, wt, backend="reference", precision="fp32")
    got = kernels.conv_contract(twin, gs, move(wt), backend="reference", precision="fp32")
    for g, w in zip(got, want):
        assert rel_l2(g, w) <= 1e-6


def test_with_bases_of_refuses_filters_that_are_not_a_signed_permutation():
    pair = SPEC.pairs[-1]
    bent = pair.basis.array.copy()
    bent[0] = bent[0] + 0.5 * bent[1]  # a combination of two filters, not one of them
    assert signed_permutation(FilterBasis(bent), pair.basis) is None
    spec = dataclasses.replace(SPEC, pairs=SPEC.pairs[:-1] + (Pair(pair.in_index, pair.out_index, FilterBasis(bent)),))
    assert with_bases_of(spec, SPEC) is None
    perm, signs = signed_permutation(FilterBasis(-pair.basis.array[::-1]), pair.basis)
    n = pair.basis.n_filters
    assert perm == tuple(range(n - 1, -1, -1)) and signs == (-1.0,) * n


def test_an_unknown_forward_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "cudnn")
    with pytest.raises(ValueError, match=r"`GINJAX_TRITON_FORWARD` \(='cudnn'\) must be one of"):
        _cuda_dispatch.forward_impl()


def _loss(spec, offsets):
    def loss(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="triton")
                        if offsets is None else
                        triton_entry.conv_contract_triton(spec, x, ws, offsets=offs))(xs)
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs
    return loss


def _dense_with_offsets(s, inputs, weights, offsets=None, fp32=False):
    """The CUDA forward's contract on `dense`: unbatched blocks, each key's (o, *tensor) offset
    added at every pixel (the epilogue's bias); asked at tf32 here (`fp32`: the 3xTF32 kernels)."""
    assert not fp32, "a tf32 call reached the CUDA forward as fp32"
    outs = kernels.conv_contract(s, inputs, weights, backend="dense", precision="fp32")
    return tuple(y if off is None else y + off.reshape(off.shape[:1] + (1,) * 3 + off.shape[1:])
                 for y, off in zip(outs, offsets or (None,) * len(outs)))


def _weight_gradient_stand_in(monkeypatch, weight_gradient):
    """kernels.cuda's weight gradient replaced by `weight_gradient` (per pair dW), its cotangent
    sums (the kernel's second result, the layer's bias gradient) taken here by jnp."""

    def with_sums(s, inputs, cotangents, **kw):  # the launch's o rows from `first_channel` on
        first, o = kw.get("first_channel", 0), s.out_keys[0][2]
        sums = tuple(jnp.sum(g[first : first + o], axis=(1, 2, 3)) for g in cotangents)
        return weight_gradient(s, inputs, cotangents, **kw), sums

    monkeypatch.setattr(cuda, "weight_gradient_call", weight_gradient)
    monkeypatch.setattr(cuda, "weight_gradient_and_sums", with_sums)


def _install_cuda_stand_ins(monkeypatch, covers, forward, weight_gradient):
    """kernels.cuda's forward and weight gradient replaced (both cover what `covers` says), with
    the default dispatch (no GINJAX_TRITON_FORWARD / _WEIGHT_GRAD)."""
    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "coverage", covers)
    monkeypatch.setattr(cuda, "weight_gradient_coverage", covers)
    monkeypatch.setattr(cuda, "forward_call", forward)
    _weight_gradient_stand_in(monkeypatch, weight_gradient)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)


def test_forward_and_input_gradient_go_to_the_cuda_call_where_it_covers_them(monkeypatch):
    spec, xs, ws = small_layer()
    offsets = (None, jnp.asarray(np.random.default_rng(5).standard_normal((2, 3)), jnp.float32))
    asked, given = [], []

    def covers(s, spatial, dtype):  # the compiled stencil: the forward layer's bases, in its order
        return [p.basis for p in s.pairs] == [p.basis for p in spec.pairs], "stand-in"

    def call(s, inputs, weights, offsets=None, fp32=False):  # the kernel's contract: unbatched blocks, batched by vmap
        asked.append(s)
        given.append(offsets)
        return _dense_with_offsets(s, inputs, weights, offsets, fp32)

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "coverage", covers)
    monkeypatch.setattr(cuda, "forward_call", call)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)  # the default
    (value, outs), grads = jax.value_and_grad(_loss(spec, offsets), argnums=(0, 1, 2), has_aux=True)(xs, ws, offsets)
    # forward on the layer itself, input gradient on its transpose spelled in the forward's bases
    assert [s.in_keys for s in asked] == [spec.in_keys, spec.out_keys]
    assert all([p.basis for p in s.pairs] == [p.basis for p in spec.pairs] for s in asked)
    # the bias offsets go to the forward's epilogue (no XLA add after it), none to the input gradient
    assert given[0][0] is None and given[0][1].shape == (2, 3) and given[1] is None

    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")

    def reference(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"))(xs)
        outs = (outs[0], outs[1] + offs[1][None, :, None, None, None, :])
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs

    (want_value, want_outs), want_grads = jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True)(xs, ws, offsets)
    for o, w in zip(outs, want_outs):
        assert rel_l2(o, w) <= kernels.TOLERANCE["tf32"]
    errors = gradient_errors(grads, want_grads, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["tf32"], errors


def test_without_the_library_the_backend_runs_its_own_kernels(monkeypatch):
    """Where the CUDA call cannot run a layer (here: not built, or not a GPU), the default leaves
    the triton kernels to do the work, with the numbers GINJAX_TRITON_FORWARD=triton gives."""
    if _cuda_dispatch.cuda_forward_covers(SPEC, (64, 64, 64), "float32")[0]:
        pytest.skip("the CUDA kernel runs here: the fallback is not what runs")
    spec, xs, ws = small_layer(c=2, N=4, batch=1, seed=2)
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")
    run = jax.jit(lambda xs, ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="triton"))(xs))
    want = run(xs, ws)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD")
    got = jax.jit(lambda xs, ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="triton"))(xs))(xs, ws)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_the_cuda_forward_runs_only_where_asked_built_and_on_hopper(monkeypatch):
    """The reasons `cuda_forward_covers` gives, one gate at a time, the covered layer fixed."""
    monkeypatch.setattr(cuda, "coverage", lambda s, spatial, dtype: (True, "stand-in"))
    monkeypatch.setattr(cuda, "ffi_availability", lambda *a: (True, "stand-in"))
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "9.0")
    assert _cuda_dispatch.cuda_forward_covers(SPEC, (64, 64, 64), "float32") == (True, "stand-in")
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")
    assert _cuda_dispatch.cuda_forward_covers(SPEC, (64, 64, 64), "float32") == (False, "GINJAX_TRITON_FORWARD=triton")
    monkeypatch.delenv("GINJAX_TRITON_FORWARD")
    monkeypatch.setattr(cuda, "_compute_capability", lambda: "8.0")
    ok, why = _cuda_dispatch.cuda_forward_covers(SPEC, (64, 64, 64), "float32")
    assert not ok and "compute capability is 8.0" in why, why
    monkeypatch.setattr(cuda, "ffi_availability", lambda *a: (False, "not built"))
    assert _cuda_dispatch.cuda_forward_covers(SPEC, (64, 64, 64), "float32") == (False, "not built")


def test_explain_says_what_runs_the_triton_backend_s_directions(monkeypatch):
    monkeypatch.setattr(_cuda_dispatch, "cuda_forward_covers", lambda spec, spatial, dtype: (False, "stand-in"))
    assert "CUDA" not in kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    monkeypatch.setattr(_cuda_dispatch, "cuda_forward_covers", lambda spec, spatial, dtype: (True, "stand-in"))
    monkeypatch.setattr(_cuda_dispatch, "cuda_weight_grad_covers", lambda spec, spatial, dtype: (False, "stand-in"))
    reason = kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    assert "the forward and the input gradient on kernels/cuda's CUDA kernels" in reason, reason
    assert "the weight gradient on Triton's kernels" in reason, reason
    monkeypatch.setattr(_cuda_dispatch, "cuda_weight_grad_covers", lambda spec, spatial, dtype: (True, "stand-in"))
    reason = kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    assert "the forward and the input gradient and the weight gradient on kernels/cuda's" in reason, reason
    assert "Triton's kernels" not in reason, reason
    # the precisions: fp32 by 3xTF32 for the forward (on by default), the weight gradient's opt-in
    monkeypatch.delenv("GINJAX_CUDA_FP32", raising=False)
    monkeypatch.delenv("GINJAX_CUDA_FP32_WEIGHT_GRAD", raising=False)
    reason = kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    assert "and the forward's fp32 by 3xTF32" in reason and "weight gradient's fp32" not in reason, reason
    monkeypatch.setenv("GINJAX_CUDA_FP32_WEIGHT_GRAD", "1")
    reason = kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    assert "the forward's and the weight gradient's fp32 by 3xTF32" in reason, reason
    monkeypatch.setenv("GINJAX_CUDA_FP32", "0")
    assert "3xTF32" not in kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    # bf16 calls on the TF32 kernels (on by default)
    monkeypatch.delenv("GINJAX_CUDA_BF16", raising=False)
    assert "bf16 calls too, at tf32" in kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    monkeypatch.setenv("GINJAX_CUDA_BF16", "0")
    assert "bf16" not in kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    # twin rings where the forward runs rows of 32 (nz even); not at 64, nor with GINJAX_CUDA_TWIN=0
    monkeypatch.delenv("GINJAX_CUDA_TWIN", raising=False)
    assert "twin rings" in kernels.explain(SPEC, (32, 32, 32), backend="triton").reason
    assert "twin rings" not in kernels.explain(SPEC, (64, 64, 64), backend="triton").reason
    assert "twin rings" not in kernels.explain(SPEC, (31, 32, 32), backend="triton").reason
    monkeypatch.setenv("GINJAX_CUDA_TWIN", "0")
    assert "twin rings" not in kernels.explain(SPEC, (32, 32, 32), backend="triton").reason


def test_the_weight_gradient_goes_to_the_cuda_call_when_asked(monkeypatch):
    """By default (GINJAX_TRITON_WEIGHT_GRAD unset or "cuda") the weight gradient comes from
    kernels.cuda's call (a stand-in: dense's VJP, with a record of the calls), the bias gradient as
    the cotangents' spatial sums; gradients equal to `reference`, bias included. Under "triton"
    the call is never made."""
    spec, xs, ws = small_layer(c=2, N=4, batch=2, seed=7)
    offsets = (jnp.asarray(np.random.default_rng(8).standard_normal((2,)), jnp.float32),
               jnp.asarray(np.random.default_rng(9).standard_normal((2, 3)), jnp.float32))
    asked = []

    def call(s, inputs, cotangents, fp32=False):
        assert not fp32  # a tf32 call stays tf32
        asked.append(s)
        _, vjp = jax.vjp(lambda w: kernels.conv_contract(s, inputs, w, backend="dense", precision="fp32"), ws)
        return vjp(tuple(cotangents))[0]

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "weight_gradient_coverage", lambda s, spatial, dtype: (True, "stand-in"))
    _weight_gradient_stand_in(monkeypatch, call)
    monkeypatch.setenv("GINJAX_TRITON_FORWARD", "triton")
    monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "triton")
    loss = _loss(spec, offsets)
    grads_triton = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2))(xs, ws, offsets)
    assert asked == []
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD")
    grads = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2))(xs, ws, offsets)
    assert asked and all(s == spec for s in asked)

    def reference(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"))(xs)
        outs = (outs[0] + offs[0][None, :, None, None, None], outs[1] + offs[1][None, :, None, None, None, :])
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    want = jax.grad(reference, argnums=(0, 1, 2))(xs, ws, offsets)
    for got in (grads, grads_triton):
        errors = gradient_errors(got, want, element_scale=1.0)
        assert max(errors) <= kernels.TOLERANCE["tf32"], errors


@pytest.mark.parametrize("mode", ["tf32", "bf16", "fp32"])
def test_which_precisions_reach_the_cuda_calls(monkeypatch, mode):
    """tf32 calls, and bf16 ones (GINJAX_CUDA_BF16 unset: on), run all three directions on the CUDA
    calls at TF32 (`fp32` False); with GINJAX_CUDA_BF16=0 a bf16 call makes none and Triton's bf16
    kernels run it. fp32 runs the forward's 3xTF32 calls (`fp32` True) and, by default, Triton's
    fp32 weight gradient. Every result within its mode's tolerance of `reference`."""
    spec, xs, ws = small_layer(c=2, N=4, batch=2, seed=21)
    forwards, weight_grads = [], []

    def covers(s, spatial, dtype):  # the compiled stencil: the forward layer's bases, in its order
        return [p.basis for p in s.pairs] == [p.basis for p in spec.pairs], "stand-in"

    def forward(s, inputs, weights, offsets=None, fp32=False):
        forwards.append(fp32)
        return _dense_with_offsets(s, inputs, weights, offsets)

    def weight_gradient(s, inputs, cotangents, fp32=False):
        weight_grads.append(fp32)
        _, vjp = jax.vjp(lambda w: kernels.conv_contract(s, inputs, w, backend="dense", precision="fp32"), ws)
        return vjp(tuple(cotangents))[0]

    _install_cuda_stand_ins(monkeypatch, covers, forward, weight_gradient)
    monkeypatch.setattr(cuda._plan, "fp32_coverage", lambda s, spatial, dtype: (True, "stand-in"))
    monkeypatch.delenv(_plan.BF16_ENV, raising=False)
    monkeypatch.delenv(_plan.FP32_ENV, raising=False)
    monkeypatch.delenv("GINJAX_CUDA_FP32_WEIGHT_GRAD", raising=False)

    def value(backend, precision):
        def f(xs, w):
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, w, backend=backend, precision=precision))(xs)
            return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(xs, ws)

    (_, got), grads = value("triton", mode)
    expected = {"tf32": ([False, False], [False]), "bf16": ([False, False], [False]), "fp32": ([True, True], [])}[mode]
    assert (forwards, weight_grads) == expected, (forwards, weight_grads)
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = value("reference", "fp32")
    for o, w in zip(got, want):
        assert rel_l2(o, w) <= kernels.TOLERANCE[mode]
    errors = gradient_errors(grads, want_grads, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE[mode], errors
    if mode == "bf16":  # turned off: Triton's bf16 kernels, no CUDA call
        forwards.clear(), weight_grads.clear()
        monkeypatch.setenv(_plan.BF16_ENV, "0")
        (_, got), grads = value("triton", mode)
        assert (forwards, weight_grads) == ([], [])
        errors = gradient_errors(grads, want_grads, element_scale=1.0)
        assert max(rel_l2(o, w) for o, w in zip(got, want)) <= kernels.TOLERANCE["bf16"]
        assert max(errors) <= kernels.TOLERANCE["bf16"], errors


def test_an_unknown_weight_gradient_kernel_is_refused(monkeypatch):
    monkeypatch.setenv("GINJAX_TRITON_WEIGHT_GRAD", "cudnn")
    with pytest.raises(ValueError, match=r"`GINJAX_TRITON_WEIGHT_GRAD` \(='cudnn'\) must be one of"):
        _cuda_dispatch.weight_grad_impl()


def test_a_layer_bias_puts_the_means_gradient_in_the_cuda_input_gradient(monkeypatch):
    """The public API on the triton backend with the layer's bias (scalar "add", vector "mean" on
    a torus), vmapped, on CUDA stand-ins: the forward's epilogue gets per-example offsets for both
    keys, the input gradient's gets the inputs' means' gradient (per example, per input key), and
    values and gradients (inputs, weights, bias) equal `reference`'s."""
    spec, xs, ws = small_layer(c=2, N=4, batch=3, seed=13)
    spec = dataclasses.replace(spec, bias_modes=("add", "mean"))
    bias = [jnp.asarray([0.5, -1.25], jnp.float32), jnp.asarray([2.0, 0.75], jnp.float32)]
    given = []  # per call (the forward's, then the input gradient's, traced in that order): offsets' shapes

    def covers(s, spatial, dtype):
        return [p.basis for p in s.pairs] == [p.basis for p in spec.pairs], "stand-in"

    def call(s, inputs, weights, offsets=None, **kw):
        given.append(None if offsets is None else tuple(None if o is None else o.shape for o in offsets))
        return _dense_with_offsets(s, inputs, weights, offsets)

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "coverage", covers)
    monkeypatch.setattr(cuda, "forward_call", call)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    rng = np.random.default_rng(14)
    cots = [jnp.asarray(rng.standard_normal((3, 2, 4, 4, 4) + (3,) * b), jnp.float32) for b in range(2)]

    def loss(backend, mode):  # the CUDA path runs where tf32 is asked for (the stand-ins compute fp32)
        run = jax.vmap(lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, backend=backend, precision=mode),
                       in_axes=(0, None, None))
        return lambda x, w, b: sum(jnp.vdot(o, c) for o, c in zip(run(x, w, b), cots))

    got = jax.jit(jax.value_and_grad(loss("triton", "tf32"), argnums=(0, 1, 2)))(xs, ws, bias)
    assert given == [((2,), (2, 3))] * 2  # unbatched inside the vmap
    with jax.default_matmul_precision("highest"):
        want = jax.jit(jax.value_and_grad(loss("reference", "fp32"), argnums=(0, 1, 2)))(xs, ws, bias)
    errors = gradient_errors(got[1], want[1], element_scale=1.0)
    assert rel_l2(got[0], want[0]) <= 1e-5 and max(errors) <= 1e-5, errors


def test_the_forward_strip_shortens_where_a_launch_would_leave_sms_idle(monkeypatch):
    from kernels.cuda import _tiling
    from kernels.cuda import conv_contract as cuda_entry

    assert _tiling.strip_for(64, 64, 4, 32) == 32  # the standard layer: 512 CTAs as before
    assert _tiling.strip_for(32, 32, 1, 32) == 4  # batch 1, 32^3: 256 CTAs, not 32
    assert _tiling.strip_for(64, 64, 1, 32) == 16
    assert _tiling.strip_for(4, 4, 1, 32) == 2  # never below 2 rows
    for nz, ny, batch in ((64, 64, 4), (32, 32, 1), (16, 48, 2), (5, 7, 3)):
        strip = _tiling.strip_for(nz, ny, batch, 32)
        ctas = batch * nz * -(-ny // strip)
        assert ctas >= _tiling.MIN_CTAS or strip == 2
        assert strip == 32 or batch * nz * -(-ny // (2 * strip)) < _tiling.MIN_CTAS  # the longest such
    seen = []
    library_emulated(monkeypatch)
    monkeypatch.setattr(cuda_entry, "_forward", lambda spec, blocks, inputs, weights, *rest: seen.append(blocks.strip_rows) or
                        tuple(jnp.zeros((k[2],) + inputs[0].shape[1:4] + (3,) * k[0]) for k in spec.out_keys))
    spec, xs, ws = small_layer(c=2, N=32, batch=1)
    jax.eval_shape(lambda xs: jax.vmap(lambda x: cuda_entry.forward_call(spec, x, ws))(xs), xs)
    jax.eval_shape(lambda x: cuda_entry.forward_call(spec, x, ws), [x[0] for x in xs])
    assert seen == [4, 4]  # the vmapped batch of 1 and an unbatched call alike


def test_output_groups_split_a_wide_layer_into_covered_launches(monkeypatch):
    """GINJAX_CUDA_OUTPUT_GROUPS=1: a layer with 32 output channels per key, which the CUDA
    kernels do not cover (8 or 16), runs its forward (bias offsets sliced per group), its input
    gradient (the transposed layer 32 -> 32, on the forward's bases) and its weight gradient as
    two covered launches of 16 output channels each (stand-ins: dense, with a record); values and
    gradients equal to `reference`. On by default; off ("0"): no such launch."""
    spec = dataclasses.replace(SPEC, in_keys=tuple(k[:2] + (32,) for k in SPEC.in_keys),
                               out_keys=tuple(k[:2] + (32,) for k in SPEC.out_keys))
    rng = np.random.default_rng(21)
    N, batch = 3, 2
    xs = [jnp.asarray(rng.standard_normal((batch,) + spec.in_shape(a, (N,) * 3)), jnp.float32) for a in range(2)]
    ws = [jnp.asarray(rng.standard_normal((32, 32, p.basis.n_filters)) / np.sqrt(32 * p.basis.n_filters), jnp.float32)
          for p in spec.pairs]
    offsets = (jnp.asarray(rng.standard_normal((32,)), jnp.float32), jnp.asarray(rng.standard_normal((32, 3)), jnp.float32))
    forward_asked, dw_asked = [], []

    def covers(s, spatial, dtype):  # the compiled kernels: the forward's bases, 16 outputs per key
        return ([p.basis for p in s.pairs] == [p.basis for p in spec.pairs]
                and all(o == 16 for _, _, o in s.out_keys)), "stand-in"

    def forward(s, inputs, weights, offs=None, *, out_channels=None, first_channel=0, into=None, fp32=False):
        # the kernel's contract: results of out_channels per key, this launch's slice written into
        # the previous launch's results (fresh ones: NaN, so a slice nobody writes shows)
        forward_asked.append((s, offs, out_channels, first_channel, into is not None))
        part = _dense_with_offsets(s, inputs, weights, offs, fp32)
        if into is None:
            into = tuple(jnp.full((out_channels,) + y.shape[1:], jnp.nan, y.dtype) for y in part)
        return tuple(full.at[first_channel : first_channel + y.shape[0]].set(y) for full, y in zip(into, part))

    def weight_gradient(s, inputs, cotangents, *, first_channel=0, fp32=False):
        assert not fp32  # a tf32 call stays tf32
        # the kernel's contract: the whole cotangents, of which it reads its 16 rows in place
        dw_asked.append((s, first_channel, cotangents[1].shape[0]))
        rows = tuple(c[first_channel : first_channel + 16] for c in cotangents)
        shapes = [(16, 32, p.basis.n_filters) for p in s.pairs]
        zeros = [jnp.zeros(sh, jnp.float32) for sh in shapes]
        _, vjp = jax.vjp(lambda w: kernels.conv_contract(s, inputs, w, backend="dense", precision="fp32"), zeros)
        return vjp(rows)[0]

    _install_cuda_stand_ins(monkeypatch, covers, forward, weight_gradient)
    monkeypatch.setenv(_cuda_dispatch.OUTPUT_GROUPS_ENV, "1")
    loss = _loss(spec, offsets)
    (value, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(xs, ws, offsets)
    # forward: two launches with the offsets' rows 0-15 and 16-31; input gradient: two more
    assert len(forward_asked) == 4 and len(dw_asked) == 2
    assert all(all(o == 16 for _, _, o in asked[0].out_keys) for asked in forward_asked)
    # each forward launch gets its 16 rows of each key's offsets (which rows: the values below)
    assert all(asked[1][0].shape == (16,) and asked[1][1].shape == (16, 3) for asked in forward_asked[:2])
    assert forward_asked[2][1] is None and forward_asked[3][1] is None
    # each writes its channel slice of one 32-channel result, the second into the first's
    assert [asked[2:] for asked in forward_asked] == [(32, 0, False), (32, 16, True)] * 2
    assert [asked[1:] for asked in dw_asked] == [(0, 32), (16, 32)]  # rows read in place, no slice copied
    assert "as 2 launches of 16 output channels per key" in kernels.explain(spec, (N,) * 3, backend="triton").reason

    def reference(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"))(xs)
        outs = (outs[0] + offs[0][None, :, None, None, None], outs[1] + offs[1][None, :, None, None, None, :])
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs

    (_, want_outs), want = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2), has_aux=True))(xs, ws, offsets)
    for o, w in zip(outs, want_outs):
        assert rel_l2(o, w) <= kernels.TOLERANCE["tf32"]
    errors = gradient_errors(grads, want, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["tf32"], errors
    # off: the split is never taken (the layer stays on Triton's kernels)
    monkeypatch.setenv(_cuda_dispatch.OUTPUT_GROUPS_ENV, "0")
    assert _cuda_dispatch.output_split(spec, lambda s: covers(s, None, None)[0]) is None
    monkeypatch.setenv(_cuda_dispatch.OUTPUT_GROUPS_ENV, "2")
    with pytest.raises(ValueError, match="GINJAX_CUDA_OUTPUT_GROUPS"):
        _cuda_dispatch.output_groups_enabled()
    monkeypatch.delenv(_cuda_dispatch.OUTPUT_GROUPS_ENV)
    assert _cuda_dispatch.output_groups_enabled()


def test_output_split_needs_equal_multiples_of_the_group(monkeypatch):
    monkeypatch.setenv(_cuda_dispatch.OUTPUT_GROUPS_ENV, "1")
    covers_all = lambda s: True  # noqa: E731

    def wide(o0, o1):
        return dataclasses.replace(SPEC, out_keys=(SPEC.out_keys[0][:2] + (o0,), SPEC.out_keys[1][:2] + (o1,)))

    assert _cuda_dispatch.output_split(wide(64, 64), covers_all)[1] == 4
    assert _cuda_dispatch.output_split(wide(16, 16), covers_all) is None  # one launch already
    assert _cuda_dispatch.output_split(wide(32, 16), covers_all) is None  # keys differ
    assert _cuda_dispatch.output_split(wide(24, 24), covers_all) is None  # not a multiple of 16
    assert _cuda_dispatch.output_split(wide(32, 32), lambda s: False) is None


def test_bias_gradient_is_the_cuda_weight_gradients_sums(monkeypatch):
    """Next to the CUDA weight gradient the bias gradients (the cotangents' pixel sums) are that
    call's second result, which the kernel takes from the gY rows it stages: no other pass reads
    the cotangents for them, not even with GINJAX_CHANNEL_SUMS=triton (the Triton sums kernel,
    interpreted here: a pure_callback). Gradients as with every sum taken by jnp; sums from the
    call scaled by 2 double the offsets' gradient and nothing else."""
    from kernels import _reduce

    spec, xs, ws = small_layer(c=2, N=4, batch=2, seed=13)
    offsets = (jnp.asarray(np.random.default_rng(14).standard_normal((2,)), jnp.float32),
               jnp.asarray(np.random.default_rng(15).standard_normal((2, 3)), jnp.float32))

    def weight_gradient(s, inputs, cotangents, fp32=False):
        assert not fp32  # a tf32 call stays tf32
        _, vjp = jax.vjp(lambda w: kernels.conv_contract(s, inputs, w, backend="dense", precision="fp32"), ws)
        return vjp(tuple(cotangents))[0]

    covers = lambda s, spatial, dtype: ([p.basis for p in s.pairs] == [p.basis for p in spec.pairs], "stand-in")  # noqa: E731
    _install_cuda_stand_ins(monkeypatch, covers, _dense_with_offsets, weight_gradient)
    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")

    def grads_and_callbacks():
        step = jax.grad(lambda *a: _loss(spec, offsets)(*a)[0], argnums=(0, 1, 2))
        return step(xs, ws, offsets), str(jax.make_jaxpr(step)(xs, ws, offsets)).count("pure_callback")

    got, callbacks = grads_and_callbacks()
    assert callbacks == 0

    def reference(xs, ws, offs):
        outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="dense", precision="fp32"))(xs)
        outs = (outs[0] + offs[0][None, :, None, None, None], outs[1] + offs[1][None, :, None, None, None, :])
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs))

    want = jax.grad(reference, argnums=(0, 1, 2))(xs, ws, offsets)
    errors = gradient_errors(got, want, element_scale=1.0)
    assert max(errors) <= 1e-5, errors
    with_sums = cuda.weight_gradient_and_sums
    monkeypatch.setattr(cuda, "weight_gradient_and_sums",
                        lambda *a, **kw: (lambda dw, sums: (dw, tuple(2 * s for s in sums)))(*with_sums(*a, **kw)))
    doubled, _ = grads_and_callbacks()
    for a, b in zip(jax.tree.leaves(doubled[2]), jax.tree.leaves(got[2])):
        np.testing.assert_allclose(a, 2 * b, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(doubled[:2]), jax.tree.leaves(got[:2])):
        np.testing.assert_array_equal(a, b)
