"""The parity-blocked convolution (kernels/triton/parity_conv.py) on the host: its generated
forward, input-gradient and weight-gradient kernels through Triton's interpreter, against the
`reference` and `dense` backends on fresh random inputs. Outputs on the interpreter path start as
NaN, so an element the kernels fail to write shows up as non-finite.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import kernels
from bench._cases import layer_spec
from bench._configs import CONFIGS
from conftest import gradient_errors

triton_backend = pytest.importorskip("kernels.triton")
if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

from kernels.triton import _parity_plan, _parity_source, parity_conv  # noqa: E402
from kernels.triton.parity_conv import PARITY_ENV, conv_contract_parity, parity_supported  # noqa: E402
from test_conv_contract_triton import check_close, make_layer, operands, run  # noqa: E402


def _loss(f, xs, ws):
    return sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(f(xs, ws)))


def _check_gradients(f, g, xs, ws, tol):
    """Gradients in inputs and weights, each block measured at the larger of its own norm and the
    whole gradient's (`gradient_errors`: a block that cancels by symmetry is rounding noise)."""
    got = jax.grad(lambda x, w: _loss(f, x, w), argnums=(0, 1))(xs, ws)
    want = jax.grad(lambda x, w: _loss(g, x, w), argnums=(0, 1))(xs, ws)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(got))
    assert max(gradient_errors(got, want)) <= tol, gradient_errors(got, want)


FORWARD_CASES = [
    ("d3-s-v-t-torus", 3, 3, [("s", 2), ("v", 2), ("t", 1)], [("s", 2), ("v", 1), ("t", 2)], True, {}, 4),
    ("d3-same-mixed-pseudo", 3, 3, [("s", 1), ("pv", 1), ("t", 1)], [("pv", 2), ("t", 1)], (True, False, True),
     {}, 4),
    ("d2-all-orders-zero-pad", 2, 3, [("s", 2), ("v", 2), ("pv", 1), ("t", 1)],
     [("s", 1), ("v", 2), ("pt", 1)], False, {"padding": "SAME"}, (6, 19)),
    ("d2-dilated-torus", 2, 3, [("s", 2), ("t", 1)], [("v", 2), ("t", 1)], True, {"rhs_dilation": 2}, 7),
    ("d2-m5", 2, 5, [("s", 1), ("v", 2)], [("s", 2), ("t", 1)], (True, False), {}, 7),
    # 'SAME' zero-pads a torus axis too: the plan must pad with zeros, not wrap
    ("d2-torus-axis-same-pad", 2, 3, [("s", 1), ("v", 1)], [("v", 1), ("t", 1)], (False, True),
     {"padding": "SAME"}, (5, 6)),
]


@pytest.mark.parametrize("name, D, M, ins, outs, is_torus, geometry, N", FORWARD_CASES,
                         ids=[case[0] for case in FORWARD_CASES])
def test_forward_and_gradients_match(name, D, M, ins, outs, is_torus, geometry, N):
    """Outputs against `reference`, gradients in inputs and weights against `dense`'s autodiff:
    tori, zero padding, pseudo-tensor keys (their classes flip), 2-tensors, dilation, a 5-tap
    filter (two sum/difference groups an axis), and an x axis of 19 (two masked pixel blocks)."""
    spec = make_layer(D, M, ins, outs, is_torus, **geometry)
    spatial = (N,) * D if isinstance(N, int) else N
    assert parity_supported(spec, spatial) is None
    xs, ws = operands(spec, spatial, seed=zlib.crc32(name.encode()))
    got = conv_contract_parity(spec, xs, ws, "fp32")
    check_close(got, run(spec, xs, ws, "reference"), "fp32")
    dense = kernels.dense.conv_contract_dense
    _check_gradients(lambda x, w: conv_contract_parity(spec, x, w, "fp32"), lambda x, w: dense(spec, x, w, "fp32"),
                     xs, ws, 1e-5)


@pytest.mark.parametrize("concat", [1, 2, 8])
def test_concatenated_dots_match(concat, monkeypatch):
    """The forward with a chunk's dots into one output class concatenated along K (tl.join, then
    a reshape; the weight tiles interleaved to match `join_order`), its input gradient the same
    kernel, and the per-class weight gradient with the same runs along M: outputs against
    `reference`, gradients against `dense`'s autodiff, on a layer whose runs split unevenly (a
    5-tap filter: 3 sums a non-difference axis) and one with every order; the forward's weight
    loads hoisted 1-2 dots ahead (the same lines, reordered). The generated source must hold
    concatenated dots, fewer than the plan's."""
    monkeypatch.setenv(parity_conv.BLOCKS_ENV, f"16,4,{concat},{concat % 3}")
    monkeypatch.setenv(parity_conv.WEIGHT_GRAD_BLOCKS_ENV, f"16,4,{concat}")
    for name, D, M, ins, outs, is_torus, geometry, N in (FORWARD_CASES[0], FORWARD_CASES[4]):
        spec = make_layer(D, M, ins, outs, is_torus, **geometry)
        plan = parity_conv.packed_layer(spec).plan
        source, _ = _parity_source.forward_source(plan, (N,) * D, plan.out_groups()[0], 16, (True, False), "tf32",
                                                "k", concat)
        assert concat == 1 or ("tl.reshape(tl.join(" in source and source.count("tl.dot(") < len(plan.dots))
        hoisted, _ = _parity_source.forward_source(plan, (N,) * D, plan.out_groups()[0], 16, (True, False), "tf32",
                                                 "k", concat, 2)
        assert sorted(hoisted.splitlines()) == sorted(source.splitlines()) and hoisted != source
        xs, ws = operands(spec, (N,) * D, seed=zlib.crc32(name.encode()) + concat)
        check_close(conv_contract_parity(spec, xs, ws, "fp32"), run(spec, xs, ws, "reference"), "fp32")
        dense = kernels.dense.conv_contract_dense
        _check_gradients(lambda x, w: conv_contract_parity(spec, x, w, "fp32"),
                         lambda x, w: dense(spec, x, w, "fp32"), xs, ws, 1e-5)



def test_narrow_output_groups_match(monkeypatch):
    """`out_width` 16 (GINJAX_PARITY_BLOCKS' fifth field): the forward and the input gradient
    in one launch per output class (16-column groups), each reloading the input tiles: outputs
    against `reference`, gradients against `dense`'s autodiff, and the launches counted."""
    name, D, M, ins, outs, is_torus, geometry, N = FORWARD_CASES[0]
    spec = make_layer(D, M, ins, outs, is_torus, **geometry)
    plan = parity_conv.packed_layer(spec).plan
    narrow, wide = len(plan.out_groups(16)), len(plan.out_groups())
    assert narrow > wide == 1 and narrow == len(plan.out_classes), (narrow, wide)
    monkeypatch.setenv(parity_conv.BLOCKS_ENV, "16,4,1,2,16")
    xs, ws = operands(spec, (N,) * D, seed=zlib.crc32(name.encode()) + 16)
    check_close(conv_contract_parity(spec, xs, ws, "fp32"), run(spec, xs, ws, "reference"), "fp32")
    closed = jax.make_jaxpr(lambda x, w: conv_contract_parity(spec, x, w, "fp32"))(xs, ws)
    assert str(closed).count("pure_callback") == narrow, closed
    dense = kernels.dense.conv_contract_dense
    _check_gradients(lambda x, w: conv_contract_parity(spec, x, w, "fp32"), lambda x, w: dense(spec, x, w, "fp32"),
                     xs, ws, 1e-5)


def test_dots_are_the_dense_filters_nonzeros():
    """The plan's GEMMs cover exactly the nonzeros of the layer's filter rewritten to sums and
    differences (computed here from the dense filter, not from the plan): nothing left out, and
    for the issue's 2-tensor layer the 38,912 multiply-adds a pixel against dense's 292,032."""
    spec = make_layer(3, 3, [("s", 8), ("v", 8), ("t", 8)], [("s", 8), ("v", 8), ("t", 8)])
    layer = parity_conv.packed_layer(spec)
    plan = layer.plan
    xs, ws = operands(spec, 4, seed=3)
    wc = np.asarray(parity_conv.combo_filter(spec, layer, ws))
    nonzero = np.abs(wc) > 1e-6 * np.abs(wc).max()
    covered = np.zeros_like(nonzero)
    combos, rows, cols, valid = parity_conv._dot_gather(plan)
    for d in range(len(plan.dots)):
        r, c = rows[d][valid[d].any(1)], cols[d][valid[d].any(0)]
        covered[combos[d]][np.ix_(r, c)] = True
    assert not (nonzero & ~covered).any()
    assert int(valid.sum()) == 38_912 == int(covered.sum())
    assert spec.cin * spec.cout * 27 == 292_032


def test_vmap_is_one_launch_per_kernel_and_matches_per_example():
    spec = make_layer(3, 3, [("s", 1), ("t", 1)], [("v", 1), ("t", 1)])
    xs, ws = operands(spec, 4, seed=7, batch=2)
    f = jax.vmap(lambda x, w: conv_contract_parity(spec, x, w, "fp32"), in_axes=(0, None))
    got = f(xs, ws)
    for b in range(2):
        want = run(spec, [x[b] for x in xs], ws, "reference")
        check_close([g[b] for g in got], want, "fp32")
    closed = jax.make_jaxpr(f)(xs, ws)
    assert str(closed).count("pure_callback") == 1, closed
    grads = jax.make_jaxpr(jax.grad(lambda x, w: _loss(f, x, w), argnums=(0, 1)))(xs, ws)
    # forward, input gradient, and the weight gradient's kernels, one per input class: 0 (the
    # scalar and the tensor's diagonal), and the off-diagonal pairs' 3, 5, 6
    plan = parity_conv.packed_layer(spec).plan
    assert [c for c, _, _ in plan.in_classes] == [0, 3, 5, 6]
    assert str(grads).count("pure_callback") == 2 + 4
    _check_gradients(f, jax.vmap(lambda x, w: run(spec, x, w, "reference"), in_axes=(0, None)), xs, ws, 1e-5)


@pytest.mark.parametrize("mode, dtype", [("tf32", jnp.float32), ("bf16", jnp.bfloat16)])
def test_lower_precisions(mode, dtype):
    spec = make_layer(3, 3, [("s", 3), ("t", 2)], [("s", 2), ("v", 2), ("t", 1)])
    xs, ws = operands(spec, 4, seed=13)
    want = run(spec, xs, ws, "reference")
    got = conv_contract_parity(spec, [x.astype(dtype) for x in xs], ws, mode)
    check_close(got, want, mode)


def test_triton_backend_runs_it_with_bias_and_residual(monkeypatch):
    """Through `kernels.conv_contract` with GINJAX_TRITON_PARITY=on: the layer's bias ('add' and
    a torus 'mean') and a residual added after the kernels, vmapped, against `reference`;
    `explain` says which form runs under on, off and auto. Under auto the issue's 2-tensor layer
    (8 channels a key, which the factorised kernels run in filter groups) takes the parity form
    and this small one (one launch of theirs) does not."""
    monkeypatch.setenv(PARITY_ENV, "on")
    base = make_layer(3, 3, [("s", 2), ("v", 2), ("t", 2)], [("s", 2), ("v", 2), ("t", 2)])
    spec = kernels.make_spec(3, base.in_keys, base.out_keys,
                             [(p.in_index, p.out_index, p.basis.array) for p in base.pairs], True,
                             bias_modes=("add", "mean", "none"))
    xs, ws = operands(spec, 4, seed=17, batch=2)
    bias = [jnp.linspace(-1.0, 1.0, 2), jnp.asarray([0.5, -2.0]), None]
    residual = [None, None, jnp.ones((2, 2, 4, 4, 4, 3, 3))]
    assert "parity-blocked" in kernels.explain(spec, (4,) * 3, backend="triton").reason

    def call(backend):
        return jax.vmap(lambda x, w, b, r: kernels.conv_contract(spec, x, w, bias=b, residual=r, backend=backend,
                                                                  precision="fp32"),
                        in_axes=(0, None, None, 0))

    want = call("reference")(xs, ws, bias, residual)
    closed = str(jax.make_jaxpr(call("triton"))(xs, ws, bias, residual))
    assert closed.count("pure_callback") == 1 and "parity_fwd" not in closed  # names live in the callback
    check_close(call("triton")(xs, ws, bias, residual), want, "fp32")
    monkeypatch.setenv(PARITY_ENV, "off")
    assert "parity-blocked" not in kernels.explain(spec, (4,) * 3, backend="triton").reason
    monkeypatch.setenv(PARITY_ENV, "auto")
    assert "parity-blocked" not in kernels.explain(spec, (4,) * 3, backend="triton").reason
    k2 = layer_spec(CONFIGS["d3_n64_b2_c8_k2"])  # the full basis (the tests' fixture filters are fewer)
    assert "parity-blocked" in kernels.explain(k2, (64,) * 3, backend="triton").reason


def _callback_shapes(closed) -> list[list[tuple[int, ...]]]:
    """Per pure_callback (a kernel launch on the interpreter path) in a traced program, nested
    jaxprs included, its results' shapes."""
    from bench._flops import equations

    return [[tuple(v.aval.shape) for v in e.outvars] for e in equations(closed.jaxpr)
            if e.primitive.name == "pure_callback"]


def test_the_forward_writes_the_blocks_with_offsets_and_priors(monkeypatch):
    """One launch holds every output class, so the forward writes the layer's blocks itself
    (its results are the blocks, no packed rows for XLA to unpack), each plus its bias offset and
    its prior where it has one, and the input gradient writes the input's blocks: a layer whose
    class 0 spans the scalar block and the 2-tensor's diagonal (two runs of planes, one of them
    periodic), offsets on two keys, priors on two. Values against `reference` plus the same
    offsets and priors; gradients in inputs, weights, offsets and priors against `dense`'s
    autodiff; the same with GINJAX_PARITY_BLOCK_EPILOGUE=off (packed rows, XLA's unpack and adds:
    the path of the CUDA forward and of narrow output groups)."""
    spec = make_layer(2, 3, [("s", 2), ("v", 1), ("t", 1)], [("s", 2), ("v", 1), ("t", 2)])
    N, D = 6, 2
    xs, ws = operands(spec, N, seed=31)
    rng = np.random.default_rng(31)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    offsets = [normal(2), None, normal(2, 2, 2)]
    priors = [None, normal(1, N, N, 2), normal(2, N, N, 2, 2)]

    def with_extras(ys, offs, prs):
        ys = [y if o is None else y + o.reshape(o.shape[:1] + (1,) * D + o.shape[1:]) for y, o in zip(ys, offs)]
        return [y if p is None else y + p for y, p in zip(ys, prs)]

    def parity(x, w, offs, prs):
        return conv_contract_parity(spec, x, w, "fp32", offsets=offs, priors=prs)

    def dense(x, w, offs, prs):
        return with_extras(kernels.dense.conv_contract_dense(spec, x, w, "fp32"), offs, prs)

    def loss(f):
        return lambda *a: sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(f(*a)))

    values = with_extras(run(spec, xs, ws, "reference"), offsets, priors)
    want = jax.grad(loss(dense), argnums=(0, 1, 2, 3))(xs, ws, offsets, priors)
    blocks = [(1,) + tuple(y.shape) for y in values]
    for switch, launch in (("on", [blocks]), ("off", [[(1, spec.cout, N, N)]])):  # off: packed rows, XLA adds
        monkeypatch.setenv(parity_conv.BLOCK_EPILOGUE_ENV, switch)
        f = lambda *a: parity(*a)  # noqa: E731  (a function of its own: make_jaxpr caches traces by function)
        assert _callback_shapes(jax.make_jaxpr(f)(xs, ws, offsets, priors)) == launch
        check_close(f(xs, ws, offsets, priors), values, "fp32")
        launches = _callback_shapes(jax.make_jaxpr(jax.grad(loss(f), argnums=(0, 1, 2, 3)))(xs, ws, offsets, priors))
        # the input gradient's results: the input blocks, or packed rows
        assert ([(1,) + tuple(x.shape) for x in xs] in launches) == (switch == "on"), launches
        got = jax.grad(loss(f), argnums=(0, 1, 2, 3))(xs, ws, offsets, priors)
        assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree_util.tree_leaves(got))
        assert max(gradient_errors(got, want)) <= 1e-5, (switch, gradient_errors(got, want))


def test_the_bias_and_its_means_gradient_go_to_the_epilogues(monkeypatch):
    """The layer's bias through `kernels.conv_contract` ('add' and torus 'mean' blocks, a given
    mean for one input): the forward's epilogue adds its offsets, and the means' gradient (a
    constant over the pixels) goes into the input gradient's epilogue, the launches show it; values
    and gradients in inputs, weights and bias against `dense`'s autodiff."""
    monkeypatch.setenv(PARITY_ENV, "on")
    base = make_layer(2, 3, [("s", 2), ("v", 1), ("t", 1)], [("s", 2), ("v", 1), ("t", 2)])
    spec = kernels.make_spec(2, base.in_keys, base.out_keys,
                             [(p.in_index, p.out_index, p.basis.array) for p in base.pairs], True,
                             bias_modes=("add", "mean", "mean"))
    xs, ws = operands(spec, 6, seed=37)
    rng = np.random.default_rng(37)
    bias = [jnp.asarray(rng.normal(size=n), jnp.float32) for n in (2, 1, 2)]
    given = [None, None, jnp.mean(xs[2], axis=(1, 2))]
    launches = []
    real = parity_conv._batched_forward

    def spy(plan, spatial, group, precision, rows, offsets, priors, blocks):
        launches.append((plan.cout, rows is not None, offsets))
        return real(plan, spatial, group, precision, rows, offsets, priors, blocks)

    monkeypatch.setattr(parity_conv, "_batched_forward", spy)

    def layer(backend):
        return lambda x, w, b: kernels.conv_contract(spec, x, w, bias=b, input_means=given, backend=backend,
                                                     precision="fp32")

    loss = lambda f: lambda *a: sum(jnp.sum(jnp.sin(o) * (n + 1)) for n, o in enumerate(f(*a)))  # noqa: E731
    check_close(layer("triton")(xs, ws, bias), layer("dense")(xs, ws, bias), "fp32")
    got = jax.grad(loss(layer("triton")), argnums=(0, 1, 2))(xs, ws, bias)
    want = jax.grad(loss(layer("dense")), argnums=(0, 1, 2))(xs, ws, bias)
    assert max(gradient_errors(got, want)) <= 1e-5, gradient_errors(got, want)
    # the forward with the bias's three offsets, the input gradient with the means' gradient of
    # every input (a mean reaches the vector and 2-tensor outputs)
    assert (spec.cout, True, (True, True, True)) in launches, launches
    assert (spec.cin, True, (True, True, True)) in launches, launches


def test_bad_offsets_and_priors_are_refused_by_name():
    spec = make_layer(2, 3, [("s", 1)], [("s", 2), ("v", 1)])
    xs, ws = operands(spec, 8, seed=4)
    cases = [({"offsets": [None]}, "`offsets` has 1 entries; the layer has 2"),
             ({"priors": [None, None, None]}, "`priors` has 3 entries"),
             ({"offsets": [None, jnp.zeros((1,))]}, r"`offsets\[1\]` has shape \(1,\); output key 1 needs \(1, 2\)"),
             ({"priors": [jnp.zeros((2, 8, 7)), None]},
              r"`priors\[0\]` has shape \(2, 8, 7\); output key 0 is \(2, 8, 8\)"),
             ({"bias": [jnp.zeros(2), None]}, "`bias` needs `bias_spec`")]
    for kwargs, said in cases:
        with pytest.raises(ValueError, match=said):
            conv_contract_parity(spec, xs, ws, "fp32", **kwargs)


def test_index_expression_gives_each_runs_planes():
    """The epilogue's static plane of each column (`index_expression`), evaluated as the kernel
    would on its columns: the periodic runs a class has in a block (channel-major over evenly or
    unevenly spaced components), affine runs, one plane, and an arbitrary list."""
    cases = [[5], [0, 3, 6, 9], [0, 4, 8, 9, 13, 17, 18, 22, 26], [1, 2, 10, 11, 19, 20],
             [0, 1, 5, 9, 10, 14], [7, 3, 11, 2, 8], list(range(12, 44))]
    for values in cases:
        for offset in (0, 3):
            expr = _parity_source.index_expression(values, f"(jj - {offset})" if offset else "jj")
            jj = np.arange(offset + len(values) + 4)
            got = eval(expr, {"tl": type("tl", (), {"where": staticmethod(np.where)})}, {"jj": jj})
            assert np.array_equal(np.broadcast_to(got, jj.shape)[offset:offset + len(values)], values), (values, expr)


@pytest.mark.parametrize(
    "geometry, why",
    [
        ({"padding": "VALID"}, "padding other than SAME or TORUS"),
        ({"stride": 2}, "stride or lhs_dilation"),
    ],
)
def test_unsupported_layers_say_why(geometry, why):
    spec = make_layer(2, 3, [("s", 1), ("t", 1)], [("s", 1)], False, **geometry)
    assert why in parity_supported(spec, (8, 8))
    xs, ws = operands(spec, 8, seed=1)
    with pytest.raises(ValueError, match=why):
        conv_contract_parity(spec, xs, ws, "fp32")


def test_env_choices_are_checked(monkeypatch):
    """Bad values of the switches are refused by name, before anything is planned: the weight
    gradient's in the backward, where they are read."""
    spec = make_layer(2, 3, [("s", 1)], [("s", 1)])
    monkeypatch.setenv(PARITY_ENV, "sometimes")
    with pytest.raises(ValueError, match=PARITY_ENV):
        parity_conv.parity_runs(spec, (8, 8), True)
    monkeypatch.delenv(PARITY_ENV)
    xs, ws = operands(spec, 8, seed=2)
    forward = lambda: conv_contract_parity(spec, xs, ws, "fp32")  # noqa: E731
    backward = lambda: jax.grad(lambda w: sum(jnp.sum(o) for o in conv_contract_parity(spec, xs, w, "fp32")))(ws)  # noqa: E731
    cases = [(parity_conv.PRECISION_ENV, "fast", forward, parity_conv.PRECISION_ENV),
             (parity_conv.BLOCKS_ENV, "64", forward, parity_conv.BLOCKS_ENV),
             (parity_conv.BLOCKS_ENV, "48,4", forward, "block_x"), (parity_conv.BLOCKS_ENV, "64,3", forward, "num_warps"),
             (parity_conv.BLOCKS_ENV, "64,4,3", forward, "concat"),
             (parity_conv.BLOCKS_ENV, "64,4,1,9", forward, "lookahead"),
             (parity_conv.BLOCKS_ENV, "64,4,1,2,48", forward, "out_width"),
             (parity_conv.BLOCK_EPILOGUE_ENV, "yes", forward, parity_conv.BLOCK_EPILOGUE_ENV),
             (parity_conv.WEIGHT_GRAD_BLOCKS_ENV, "32,8,8,1,128,1", backward, parity_conv.WEIGHT_GRAD_BLOCKS_ENV)]
    for env, value, call, said in cases:
        monkeypatch.setenv(env, value)
        with pytest.raises(ValueError, match=said):
            call()
        monkeypatch.delenv(env)


@pytest.mark.parametrize("D, k, parity", list(itertools.product((2, 3), (0, 1, 2), (0, 1))))
def test_component_classes_follow_reflections(D, k, parity):
    """A component's class bit a is the sign it takes under the reflection of axis a (times -1
    for a pseudo-tensor key): checked by reflecting a random tensor."""
    rng = np.random.default_rng(D * 10 + k + parity)
    t = rng.normal(size=(D,) * k)
    for a in range(D):
        R = np.eye(D)
        R[a, a] = -1
        u = t
        for axis in range(k):
            u = np.moveaxis(np.tensordot(R, u, axes=(1, axis)), 0, axis)
        u = u * (-1.0) ** parity
        for i, idx in enumerate(np.ndindex(*(D,) * k)):
            bit = (_parity_plan.component_class(D, k, parity, i) >> a) & 1
            assert np.isclose(u[idx], t[idx] * (-1.0) ** bit)


def test_offsets_go_64_bit_only_past_int32():
    """The kernels index rows with int32 offsets (64-bit offset tiles cost two registers an
    element) unless a batch element's rows span more than 2^31 - 1 elements: checked on the
    generated source of a layer at 64^3 (27 M elements) and at 512^3 (2.3 G; not run here)."""
    spec = make_layer(3, 3, [("s", 8), ("v", 8), ("t", 8)], [("s", 8), ("v", 8), ("t", 8)])
    plan = parity_conv.packed_layer(spec).plan
    for n, wide in ((64, False), (512, True)):
        spatial = (n,) * 3
        fwd, _ = _parity_source.forward_source(plan, spatial, plan.out_groups()[0], 64, (True, False), "tf32", "k")
        dw, _ = _parity_source.weight_grad_source(plan, spatial, 0, 32, 4, 8, (True, True), "tf32", "k")
        for source in (fwd, dw):
            assert (".to(tl.int64) * " in source) == wide  # row offsets
            assert ".to(tl.int64)\n" in source  # the batch index is 64-bit always


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")  # the interpreter's inf * 0
def test_nan_and_inf_reach_exactly_the_parity_blocks_outputs():
    """A NaN and an inf input (one at the grid's edge: the halo and the wrap) reach output pixel
    p - t for each tap t, in every output class that a combination holding t feeds from the
    input's class (the classes differing from it only on t's nonzero axes: the GEMM multiplies
    the tile row into all of that class's columns, zero weights included, as `dense` does); every
    other output is finite and equals `reference` on the clean inputs."""
    spec = make_layer(3, 3, [("s", 2), ("v", 2), ("t", 1)], [("s", 1), ("v", 1), ("t", 1)])
    N, D = 5, 3
    xs, ws = operands(spec, N, seed=21)
    hits = [(0, 1, (2, 2, 2), 0, np.nan), (1, 0, (0, 4, 1), 2, np.inf)]  # (block, channel, pixel, comp, value)
    bad = [np.array(x, np.float32) for x in xs]
    clean = [np.array(x, np.float32) for x in xs]
    for block, ch, pixel, comp, value in hits:
        index = (ch,) + pixel + ((comp,) if bad[block].ndim > 1 + D else ())
        bad[block][index], clean[block][index] = value, 0.0
    got = [np.asarray(y, np.float64) for y in conv_contract_parity(spec, [jnp.asarray(x) for x in bad], ws, "fp32")]
    want = run(spec, [jnp.asarray(x) for x in clean], ws, "reference")
    for b, (k_b, p_b, o) in enumerate(spec.out_keys):
        reached = np.zeros((N,) * D + (D**k_b,), bool)
        for block, _, pixel, comp, _ in hits:
            k_a, p_a, _ = spec.in_keys[block]
            cls_in = _parity_plan.component_class(D, k_a, p_a, comp)
            for t in itertools.product((-1, 0, 1), repeat=D):
                paired = sum(1 << a for a in range(D) if t[a])
                at = tuple((p - s) % N for p, s in zip(pixel, t))
                for j in range(D**k_b):
                    if (_parity_plan.component_class(D, k_b, p_b, j) ^ cls_in) & ~paired == 0:
                        reached[at + (j,)] = True
        g = got[b].reshape((o,) + (N,) * D + (-1,))
        w = np.asarray(want[b], np.float64).reshape(g.shape)
        assert reached.any() and not reached.all()
        assert np.array_equal(~np.isfinite(g), np.broadcast_to(reached, g.shape)), b
        assert np.abs(np.where(reached, 0, g - w)).max() <= 1e-4 * np.abs(w).max()
