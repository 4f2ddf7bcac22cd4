"""Filter groups of the `triton` backend (kernels/triton/_filter_groups.py): a layer whose forward
kernel would keep too many Z tiles live runs as launches over groups of its filters, summed.
The plan on the CPU for the 2-tensor layer that needs it; the split's values and gradients
through Triton's interpreter against `reference`, with the cap lowered so a small layer splits."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import kernels
from conftest import jaxpr_equations, rel_l2

triton_backend = pytest.importorskip("kernels.triton")
from kernels.triton import conv_contract as triton_entry  # noqa: E402
from kernels.triton._filter_groups import LIVE_Z_CAP, filter_groups, peak_live_z  # noqa: E402
from kernels.triton._tiling import BlockSizes  # noqa: E402
from kernels.triton import _launch  # noqa: E402
from test_conv_contract_triton import (  # noqa: E402
    _count_launches, check_close, make_layer, operands, triton_calls_lowered_for_cuda)


def _covers_every_filter_once(spec, groups):
    seen = []
    for g in groups:
        assert len(g.spec.pairs) == len(g.filters)
        for (t, f), pair in zip(g.filters, g.spec.pairs):
            assert f == tuple(range(f[0], f[-1] + 1))  # consecutive: the launcher slices them
            assert (pair.basis.array == spec.pairs[t].basis.array[list(f)]).all()
            assert g.spec.in_keys[pair.in_index] == spec.in_keys[spec.pairs[t].in_index]
            assert g.inputs[pair.in_index] == spec.pairs[t].in_index
            assert g.outputs[pair.out_index] == spec.pairs[t].out_index
            seen += [(t, n) for n in f]
    assert sorted(seen) == [(t, n) for t, p in enumerate(spec.pairs) for n in range(p.basis.n_filters)]


@pytest.mark.slow  # ~25 s: ginjax computes the layer's k = 3 and 4 invariant filters (not in tests/data)
def test_the_two_tensor_layer_splits_within_the_cap():
    """d3_n64_b2_c8_k2's forward kernel would keep 86 Z tiles live (its compile never finished on
    the H200): it splits into groups that each stay within the cap, every filter of every pair in
    exactly one group; the standard layer and a plain 2D one stay one launch."""
    from bench import _cases, _configs

    spec = _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])  # every invariant filter
    spatial, blocks = (64,) * 3, BlockSizes()
    assert peak_live_z(spec, spatial, "tf32", blocks) > 4 * LIVE_Z_CAP
    groups = filter_groups(spec, spatial, "tf32", blocks)
    assert groups is not None and 2 <= len(groups) <= 16
    _covers_every_filter_once(spec, groups)
    for g in groups:
        assert peak_live_z(g.spec, spatial, "tf32", blocks) <= LIVE_Z_CAP or sum(len(f) for _, f in g.filters) == 1
        assert not g.spec.has_bias
    standard = make_layer(3, 3, [("s", 16), ("v", 16)], [("s", 16), ("v", 16)])
    assert filter_groups(standard, spatial, "tf32", blocks) is None
    assert filter_groups(make_layer(2, 3, [("s", 8), ("v", 8)], [("s", 8), ("v", 8)]), (256, 256), "tf32", blocks) is None


def test_split_layer_matches_reference_with_bias_and_gradients(monkeypatch, cap=3):
    """With the cap lowered a small 2D layer (scalars, vectors, 2-tensors; 'add' and 'mean'
    biases on a torus) runs as several launches; vmapped over a batch its outputs and its
    gradients in inputs, weights and bias equal `reference`'s, every element written."""
    spec = make_layer(2, 3, [("s", 2), ("v", 1), ("t", 1)], [("s", 1), ("v", 2), ("t", 1)])
    spec = kernels.make_spec(spec.D, spec.in_keys, spec.out_keys, [(p.in_index, p.out_index, p.basis.array) for p in spec.pairs],
                             True, bias_modes=("add", "mean", "none"))
    groups = filter_groups(spec.without_bias(), (5, 5), "fp32", BlockSizes.for_layer(spec.without_bias(), (5, 5)), cap=cap)
    assert groups is not None and len(groups) >= 2
    _covers_every_filter_once(spec, groups)
    monkeypatch.setattr(triton_entry, "filter_groups", functools.partial(filter_groups, cap=cap))
    monkeypatch.setenv("GINJAX_TRITON_PARITY", "off")  # else the grouped layer runs parity-blocked
    xs, ws = operands(spec, 5, seed=17, batch=2)
    bias = [jnp.asarray([0.5]), jnp.asarray([2.0, -0.75]), None]

    def vf(backend):
        return jax.vmap(lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, backend=backend, precision="fp32"),
                        in_axes=(0, None, None))

    monkeypatch.setattr(triton_backend, "filter_groups", functools.partial(filter_groups, cap=cap))
    said = kernels.explain(spec, (5, 5), backend="triton").reason
    assert f"as {len(groups)} launches over groups of the filters" in said, said
    calls = _count_launches(monkeypatch)
    launched = []  # (batch, output keys with a prior) of every launch traced
    real_launch = triton_entry.launch

    def spy(spec, mode, blocks, xs, ws, poison=None, offsets=(), priors=()):
        launched.append((int(xs[0].shape[0]), tuple(b for b, p in enumerate(priors) if p is not None)))
        return real_launch(spec, mode, blocks, xs, ws, poison, offsets, priors)

    monkeypatch.setattr(triton_entry, "launch", spy)
    got = vf("triton")(xs, ws, bias)
    carried = [c for batch, c in launched if batch == 2]  # the batched launches (vmap folded in)
    assert len(calls) == len(groups)  # one batched launch per group
    check_close(got, vf("reference")(xs, ws, bias), "fp32")
    # a group adds into the outputs earlier groups wrote (its kernel's priors), so no partial
    # output is summed outside the kernels: no output-sized add in the program
    written, want_carried = set(), []
    for group in groups:
        want_carried.append(tuple(n for n, b in enumerate(group.outputs) if b in written))
        written.update(group.outputs)
    assert carried == want_carried and any(want_carried)
    jaxpr = jax.make_jaxpr(vf("triton"))(xs, ws, bias)
    adds = [e for e in jaxpr_equations(jaxpr.jaxpr) if e.primitive.name == "add" and e.outvars[0].aval.ndim >= 4]
    assert not adds, adds

    def loss(backend):
        return lambda x, w, b: sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(vf(backend)(x, w, b)))

    got = jax.grad(loss("triton"), argnums=(0, 1, 2))(xs, ws, bias)
    want = jax.grad(loss("reference"), argnums=(0, 1, 2))(xs, ws, bias)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert rel_l2(g, r) <= 1e-5


def test_priors_lower_to_aliased_operands(monkeypatch):
    """On the GPU a launch with a prior for one output key takes it as an operand in that output's
    (component-planar) layout, aliased to the output: the group adds in place. With test poison
    only the other output gets a poisoned buffer (the carried one starts as the prior)."""
    spec = make_layer(2, 3, [("s", 2), ("v", 1)], [("s", 1), ("v", 2)])
    xs, ws = operands(spec, 6, seed=5)
    prior = jnp.ones((1, 2, 6, 6, 2), jnp.float32)

    def run(poison):
        return lambda xs, ws, p: _launch.launch(spec, "tf32", BlockSizes(), [x[None] for x in xs],
                                                [w[None] for w in ws], poison=poison, priors=(None, p))

    vector = "dense<[3, 2, 4, 1, 0]> : tensor<5xindex>"
    (call,) = triton_calls_lowered_for_cuda(monkeypatch, run(None), xs, ws, prior)
    n = len(xs) + len(ws)  # the prior follows the inputs and weights (no offsets here)
    assert f"output_tuple_indices = [1], operand_index = {n}," in call, call
    assert call.count("output_operand_alias<") == 1
    layouts = re.search(r"operand_layouts = \[(.*?)\], (output_operand_aliases|result_layouts)", call).group(1)
    assert layouts.count("dense") == n + 1 and layouts.endswith(vector), call
    (call,) = triton_calls_lowered_for_cuda(monkeypatch, run(float("nan")), xs, ws, prior)
    aliases = re.findall(r"output_tuple_indices = \[(\d)\], operand_index = (\d+)", call)
    assert sorted(aliases) == [("0", str(n + 1)), ("1", str(n))], call
    with pytest.raises(ValueError, match=r"`priors\[1\]` has shape"):
        jax.eval_shape(run(None), xs, ws, prior[:, :1])
