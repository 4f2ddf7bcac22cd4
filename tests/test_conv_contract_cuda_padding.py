"""Thin layers on the CUDA kernels with zero channels (kernels/triton/_cuda_padding.py,
GINJAX_CUDA_PAD_CHANNELS=1, the default) on a CPU: the padded layer each direction asks the CUDA calls for,
and values and gradients (inputs, weights, bias offsets) equal to `reference`. The CUDA calls are
stand-ins (`dense` with a record of the layers asked for), covering what the compiled kernels
cover: input channels in multiples of 16, 8 or 16 output channels a key, the forward layer's
bases; the kernels' own numbers are tests/test_conv_contract_cuda_gpu.py's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench import _cases, _configs
from conftest import gradient_errors, rel_l2
from kernels import cuda

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import _cuda_padding  # noqa: E402

SPEC = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])


def thin(cin: int, cout: int):
    return _cases.with_channels(SPEC, cin, cout)


def channels(spec):
    return tuple(c for _, _, c in spec.in_keys), tuple(o for _, _, o in spec.out_keys)


def test_the_padded_layer_of_each_thin_shape():
    first, last = _cuda_padding.padded_layer(thin(2, 16)), _cuda_padding.padded_layer(thin(16, 1))
    assert channels(first) == ((16, 16), (16, 16)) and channels(last) == ((16, 16), (8, 8))
    assert first.pairs == SPEC.pairs and first.bias_modes == SPEC.bias_modes
    assert _cuda_padding.padded_layer(SPEC) is None  # covered as it is: nothing to add
    assert channels(_cuda_padding.padded_layer(thin(2, 32))) == ((16, 16), (32, 32))  # then output groups
    assert channels(_cuda_padding.padded_layer(thin(20, 12))) == ((32, 32), (16, 16))
    uneven = dataclasses.replace(SPEC, in_keys=((0, 0, 3), (1, 0, 18)), out_keys=((0, 0, 1), (1, 0, 5)))
    assert channels(_cuda_padding.padded_layer(uneven)) == ((32, 32), (8, 8))


def test_pads_and_crops_are_zeros_and_corners():
    a = jnp.arange(2 * 3 * 3, dtype=jnp.float32).reshape(2, 3, 3)
    (p,) = _cuda_padding.pad_channels([a], [5])
    assert p.shape == (5, 3, 3) and np.array_equal(p[:2], a) and not np.any(p[2:])
    assert _cuda_padding.pad_channels([None], [5]) == (None,)
    (c,) = _cuda_padding.crop_channels([p], [2])
    assert np.array_equal(c, a)
    spec, padded = thin(2, 1), _cuda_padding.padded_layer(thin(2, 1))
    ws = [jnp.ones((1, 2, pr.basis.n_filters)) for pr in spec.pairs]
    big = _cuda_padding.pad_weights(padded, ws)
    assert [w.shape for w in big] == [(8, 16, pr.basis.n_filters) for pr in spec.pairs]
    assert all(float(jnp.sum(w)) == float(jnp.sum(v)) for w, v in zip(big, ws))
    assert [w.shape for w in _cuda_padding.crop_weights(spec, big)] == [w.shape for w in ws]
    with pytest.raises(ValueError, match="cannot pad"):
        _cuda_padding.pad_channels([a], [1])


def _operands(spec, N=4, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    xs = [jnp.asarray(rng.standard_normal((batch,) + spec.in_shape(a, (N,) * 3)), jnp.float32) for a in range(2)]
    ws = [jnp.asarray(rng.standard_normal((spec.out_keys[p.out_index][2], spec.in_keys[p.in_index][2],
                                           p.basis.n_filters)), jnp.float32) for p in spec.pairs]
    offsets = (jnp.asarray(rng.standard_normal((spec.out_keys[0][2],)), jnp.float32),
               jnp.asarray(rng.standard_normal((spec.out_keys[1][2], 3)), jnp.float32))
    return xs, ws, offsets


def _stand_ins(monkeypatch):
    """kernels.cuda's forward and weight gradient on `dense`, covering what the kernels do; the
    layers each was asked for, in order."""
    asked = {"forward": [], "weight_gradient": []}

    def covers(s, spatial, dtype):
        ins, outs = channels(s)
        ok = (all(c % 16 == 0 for c in ins) and len(set(outs)) == 1 and outs[0] in (8, 16)
              and [p.basis for p in s.pairs] == [p.basis for p in SPEC.pairs])
        return ok, "stand-in"

    def forward(s, inputs, weights, offsets=None, fp32=False, **kw):
        assert not kw, kw  # whole launches here
        asked["forward"].append(s)
        assert [x.shape[0] for x in inputs] == list(channels(s)[0])
        outs = kernels.conv_contract(s, inputs, weights, backend="dense", precision="fp32")
        return tuple(y if off is None else y + off.reshape(off.shape[:1] + (1,) * 3 + off.shape[1:])
                     for y, off in zip(outs, offsets or (None,) * len(outs)))

    def weight_gradient_and_sums(s, inputs, cotangents, fp32=False, **kw):
        asked["weight_gradient"].append(s)
        zeros = [jnp.zeros((s.out_keys[p.out_index][2], s.in_keys[p.in_index][2], p.basis.n_filters)) for p in s.pairs]
        _, vjp = jax.vjp(lambda w: kernels.conv_contract(s, inputs, w, backend="dense", precision="fp32"), zeros)
        return vjp(tuple(cotangents))[0], tuple(jnp.sum(g, axis=(1, 2, 3)) for g in cotangents)

    monkeypatch.setattr(cuda, "availability", lambda: (True, "stand-in"))
    monkeypatch.setattr(cuda, "coverage", covers)
    monkeypatch.setattr(cuda, "weight_gradient_coverage", covers)
    monkeypatch.setattr(cuda, "forward_call", forward)
    monkeypatch.setattr(cuda, "weight_gradient_and_sums", weight_gradient_and_sums)
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    return asked


def _value_and_grads(spec, backend, xs, ws, offsets):
    from kernels.triton import conv_contract as triton_entry

    def loss(xs, ws, offs):
        if backend == "triton":
            outs = jax.vmap(lambda x: triton_entry.conv_contract_triton(spec, x, ws, offsets=offs))(xs)
        else:
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference", precision="fp32"))(xs)
            outs = tuple(o + off.reshape((1,) + off.shape[:1] + (1,) * 3 + off.shape[1:]) for o, off in zip(outs, offs))
        return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(outs)), outs

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(xs, ws, offsets)


@pytest.mark.parametrize("cin, cout", [(2, 16), (16, 1)], ids=["first", "last"])
def test_thin_layers_run_padded_on_the_cuda_calls_with_reference_gradients(cin, cout, monkeypatch):
    spec = thin(cin, cout)
    xs, ws, offsets = _operands(spec, seed=cin + cout)
    asked = _stand_ins(monkeypatch)
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "0")  # off: Triton's kernels
    jax.eval_shape(lambda *a: _value_and_grads(spec, "triton", *a), xs, ws, offsets)  # traced, not run
    assert asked == {"forward": [], "weight_gradient": []}
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "1")
    (_, outs), grads = _value_and_grads(spec, "triton", xs, ws, offsets)
    padded = _cuda_padding.padded_layer(spec)
    # forward, then the input gradient on the transposed layer (its own padding: the cotangents'
    # channels to 16, the input gradients' to 8 or 16), then the weight gradient
    transposed = ((16, 16), (8, 8) if cin <= 8 else (16, 16))
    assert [channels(s) for s in asked["forward"]] == [channels(padded), transposed]
    assert [channels(s) for s in asked["weight_gradient"]] == [channels(padded)]
    (_, want), want_grads = _value_and_grads(spec, "reference", xs, ws, offsets)
    assert [o.shape for o in outs] == [w.shape for w in want]
    assert max(rel_l2(o, w) for o, w in zip(outs, want)) <= kernels.TOLERANCE["tf32"]
    errors = gradient_errors(grads, want_grads, element_scale=1.0)
    assert max(errors) <= kernels.TOLERANCE["tf32"], errors


def test_an_unknown_padding_switch_is_refused(monkeypatch):
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "yes")
    with pytest.raises(ValueError, match=r"`GINJAX_CUDA_PAD_CHANNELS` \(='yes'\) must be one of"):
        _cuda_padding.enabled()


def test_explain_names_the_padded_layer(monkeypatch):
    from kernels.triton import _cuda_dispatch

    _stand_ins(monkeypatch)
    monkeypatch.setattr(_cuda_dispatch, "cuda_forward_covers", cuda.coverage)
    monkeypatch.setattr(_cuda_dispatch, "cuda_weight_grad_covers", cuda.weight_gradient_coverage)
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "0")
    assert "CUDA" not in kernels.explain(thin(2, 16), (64, 64, 64), backend="triton").reason
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "1")
    reason = kernels.explain(thin(2, 16), (64, 64, 64), backend="triton").reason
    assert "the forward and the input gradient (with zero channels, as 16+16 -> 16+16" in reason, reason
    assert "the weight gradient (with zero channels, as 16+16 -> 16+16: GINJAX_CUDA_PAD_CHANNELS=1)" in reason, reason
    assert "(with zero channels, as 16+16 -> 8+8" in kernels.explain(thin(16, 1), (64, 64, 64), backend="triton").reason


def test_the_padded_first_layer_through_the_emulated_kernels(monkeypatch):
    """The first thin layer's value and weight gradient through the real CUDA entry points
    (coverage, geometry, weight packing, the FFI operands) with the kernels' host emulations
    behind the FFI calls: the padded launch (16 + 16 -> 16 + 16, its input's 14 zero channels) and
    the cropped results against `reference`."""
    from _conv_cuda_dw_emulate import emulated_dw_call
    from _conv_cuda_emulate import Emulator, library_emulated, standard_spec
    from kernels.cuda import _ffi

    library_emulated(monkeypatch)
    monkeypatch.setattr(cuda, "availability", lambda: (True, "emulated"))
    monkeypatch.setenv(_cuda_padding.PAD_CHANNELS_ENV, "1")
    monkeypatch.delenv("GINJAX_TRITON_FORWARD", raising=False)
    monkeypatch.delenv("GINJAX_TRITON_WEIGHT_GRAD", raising=False)
    spec, spatial = thin(2, 16), (1, 2, 16)
    launched = []

    def ffi_call(target, shapes, vmap_method, input_layouts, output_layouts=None, **kw):
        if target == _ffi.DW_TARGET:
            def record(geom):
                launched.append(("dw", int(geom[3]), int(geom[4])))
            return emulated_dw_call(standard_spec(16, 16), shapes, record)
        assert target == _ffi.TARGET and not kw, (target, kw)

        def call(x0, x1, w, off, geom):
            c0, c1, o, strip = (int(v) for v in geom[3:7])
            launched.append(("fwd", c0, c1, o))

            def host(x0, x1, w, off):  # broadcast_all: every operand with the vmapped axis first
                runs = [Emulator(standard_spec(c0, o), *(np.asarray(a[b]) for a in (x0, x1, w)), strip, tf32=False,
                                 offsets=np.asarray(off[b]), planar=bool(geom[21])).run()[:2] for b in range(len(x0))]
                return tuple(np.stack([r[k] for r in runs]).astype(np.float32) for k in range(2))

            return jax.pure_callback(host, tuple(shapes), x0, x1, w, off, vmap_method="broadcast_all")

        return call

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    rng = np.random.default_rng(3)
    xs = [jnp.asarray(rng.standard_normal((1,) + spec.in_shape(a, spatial)), jnp.float32) for a in range(2)]
    ws = [jnp.asarray(rng.standard_normal((16, 2, p.basis.n_filters)), jnp.float32) for p in spec.pairs]

    cots = [jnp.asarray(rng.standard_normal((1, o) + spatial + (3,) * k), jnp.float32) for k, _, o in spec.out_keys]

    def loss(backend, precision=None):  # linear in the outputs: dW does not see the forward's tf32
        def f(ws):
            outs = jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend=backend, precision=precision))(xs)
            return sum(jnp.vdot(o, c) for o, c in zip(outs, cots)), outs
        return jax.value_and_grad(f, has_aux=True)(ws)

    (_, got), grads = loss("triton")
    assert ("fwd", 16, 16, 16) in launched and ("dw", 16, 16) in launched, launched
    with jax.default_matmul_precision("highest"):
        (_, want), want_grads = loss("reference", "fp32")
    assert [o.shape for o in got] == [w.shape for w in want]
    assert max(rel_l2(o, w) for o, w in zip(got, want)) <= kernels.TOLERANCE["tf32"]
    # the emulation sums exactly where the kernel truncates to tf32, and the entry point scales
    # the truncation's mean error out (TRUNCATION_SCALE): scaled back, the gradients are exact
    from kernels.cuda.weight_gradient import TRUNCATION_SCALE

    errors = gradient_errors([g / TRUNCATION_SCALE for g in grads], want_grads, element_scale=1.0)
    assert max(errors) <= 1e-5, errors
