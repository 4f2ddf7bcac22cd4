"""The per-channel sums kernel (kernels.triton.channel_sums) on the host through Triton's
interpreter (TRITON_INTERPRET=1), against float64 numpy on fresh random inputs, reading its
operands components-minor and component-planar (`planar`: the same sums, bit for bit); the norms
and the bias gradient with GINJAX_CHANNEL_SUMS=triton against the default XLA path, values and
gradients at fp32, in either GINJAX_BLOCK_LAYOUT. Its partials start as NaN on the interpreter
path, so a program that fails to write shows up as non-finite."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from conftest import rel_l2

triton_backend = pytest.importorskip("kernels.triton")
from kernels import _layout, _reduce  # noqa: E402
from kernels.triton import conv_contract as triton_conv  # noqa: E402
from kernels.triton import channel_sums as sums_module  # noqa: E402
from kernels.triton.channel_sums import channel_sums_triton, chunking, plan_channel_sums  # noqa: E402

from ginjax._norm_stats import scalar_group_norm, vector_group_norm  # noqa: E402

if not triton_backend.availability()[0]:
    pytest.skip(f"triton backend unavailable: {triton_backend.availability()[1]}", allow_module_level=True)

TOL = 1e-5  # fp32 (ARCHITECTURE.md)


def _normal(rng, shape, loc=0.0):
    return jnp.asarray(rng.normal(loc, 1.0, size=shape), jnp.float32)


def _want(a, b=None):
    a = np.asarray(a, np.float64)
    b = a if b is None else np.asarray(b, np.float64)
    return a.sum(axis=-2), np.einsum("...cpi,...cpj->...cij", a, b)


def _check(got, want):
    got = np.asarray(got)
    assert np.isfinite(got).all(), "a sum was not written (NaN) or overflowed"
    assert rel_l2(got, want) <= TOL


# (c, P, T): a ragged last tile (P not a multiple of the 512-pixel tile), one pixel run, several
CASES = [(3, 1000, 3), (2, 777, 1), (4, 513, 2), (1, 64, 4), (5, 3000, 3)]
# the kernel's operand layouts: components minor (row-major) and component-planar
LAYOUTS = pytest.mark.parametrize("planar", [False, True], ids=["minor", "planar"])


@LAYOUTS
@pytest.mark.parametrize("c, P, T", CASES)
def test_sums_and_products(c, P, T, planar):
    rng = np.random.default_rng(c * P + T)
    a, b = _normal(rng, (c, P, T), loc=1.0), _normal(rng, (c, P, T))
    first, products = channel_sums_triton(a, planar=planar)
    want_first, want_products = _want(a)
    _check(first, want_first)
    _check(products, want_products)
    first, products = channel_sums_triton(a, b, planar=planar)
    _check(first, want_first)
    _check(products, _want(a, b)[1])


@LAYOUTS
@pytest.mark.parametrize("c, P, T", CASES[:3])
def test_shift_is_subtracted_as_the_block_is_read(c, P, T, planar):
    """shift (c, T): the sums of a - shift (b = a) and of a (b - shift), ragged last tiles
    included (a masked pixel adds nothing, not -shift); under vmap with a per-example shift."""
    rng = np.random.default_rng(c + P + T)
    a, b, shift = _normal(rng, (c, P, T), loc=3.0), _normal(rng, (c, P, T)), _normal(rng, (c, T), loc=3.0)
    d = np.asarray(a, np.float64) - np.asarray(shift, np.float64)[:, None]
    first, products = channel_sums_triton(a, shift=shift, planar=planar)
    _check(first, d.sum(axis=1))
    _check(products, _want(d)[1])
    first, products = channel_sums_triton(a, b, shift=shift, planar=planar)
    _check(first, _want(a)[0])
    _check(products, _want(a, np.asarray(b, np.float64) - np.asarray(shift, np.float64)[:, None])[1])
    shifts = jnp.stack([shift, 2 * shift])
    first, products = jax.vmap(lambda s: channel_sums_triton(a, shift=s, planar=planar))(shifts)
    for n in range(2):
        dn = np.asarray(a, np.float64) - (n + 1) * np.asarray(shift, np.float64)[:, None]
        _check(first[n], dn.sum(axis=1))
        _check(products[n], _want(dn)[1])
    with pytest.raises(ValueError, match="`shift`"):
        channel_sums_triton(a, shift=shift[:1], planar=planar)


@LAYOUTS
@pytest.mark.parametrize("T", [1, 3, 9])
def test_first_sums_only(T, planar):
    """products=False (the bias gradients' sums, `_spatial_sums`), 2-tensors (T = 9) included."""
    a = _normal(np.random.default_rng(T), (3, 611, T), loc=-2.0)
    first, products = channel_sums_triton(a, products=False, planar=planar)
    assert products is None
    _check(first, _want(a)[0])


@LAYOUTS
def test_vmapped_batch_is_one_launch_with_a_shared_operand(planar):
    rng = np.random.default_rng(7)
    a, b = _normal(rng, (3, 2, 700, 3)), _normal(rng, (2, 700, 3))
    f = jax.vmap(lambda x: channel_sums_triton(x, b, planar=planar))
    first, products = f(a)
    _check(first, np.asarray(a, np.float64).sum(axis=2))
    _check(products, np.einsum("ncpi,cpj->ncij", np.asarray(a, np.float64), np.asarray(b, np.float64)))
    # one launch for the batch: the interpreter's callbacks are the kernel and the partials' sum
    assert str(jax.make_jaxpr(f)(a)).count("pure_callback") == 2


def test_bit_identical_run_to_run():
    a = _normal(np.random.default_rng(3), (4, 5000, 3))
    one, two = channel_sums_triton(a), channel_sums_triton(a)
    for x, y in zip(one, two):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("shifted", [False, True], ids=["plain", "shifted"])
@pytest.mark.parametrize("c, P, T", [(3, 1000, 3), (4, 513, 2), (2, 1300, 4)])
def test_planar_sums_equal_the_minor_ones_bit_for_bit(c, P, T, shifted):
    """Each lane adds the same pixels in the same order whichever layout it reads them from, so
    the planar kernel's sums are the row-major kernel's exactly: a = b, a and b, first sums only,
    several channels, ragged last tiles, and a vmapped batch with a shared operand."""
    rng = np.random.default_rng(c * T + P)
    a, b = _normal(rng, (2, c, P, T), loc=1.0), _normal(rng, (c, P, T))
    shift = _normal(rng, (c, T), loc=1.0) if shifted else None
    calls = [lambda x, planar: channel_sums_triton(x, shift=shift, planar=planar),
             lambda x, planar: channel_sums_triton(x, b, shift=shift, planar=planar),
             lambda x, planar: channel_sums_triton(x, products=False, planar=planar)[:1]]
    for call in calls:
        pairs = list(zip(call(a[0], False), call(a[0], True)))
        pairs += zip(jax.vmap(lambda x: call(x, False))(a), jax.vmap(lambda x: call(x, True))(a))
        for minor, planar in pairs:
            assert np.isfinite(np.asarray(planar)).all()
            np.testing.assert_array_equal(np.asarray(planar), np.asarray(minor))


def test_planar_kernel_is_its_own_and_indexes_component_runs(monkeypatch):
    """The planar kernel has a name of its own (the plan cache and the profiler tell the two apart)
    and loads each component as a contiguous run from a per-component base; the row-major one is
    the stride-T kernel. For T = 1 the layouts coincide: the row-major kernel runs."""
    minor, chunks = plan_channel_sums(3, 1000, 3, 2, True, True, (True, False), False)
    planar, planar_chunks = plan_channel_sums(3, 1000, 3, 2, True, True, (True, False), False, planar=True)
    assert chunks == planar_chunks and minor.programs_per_batch == planar.programs_per_batch
    assert "_planar" not in minor.name
    assert planar.name == minor.name.replace("channel_sums_ab", "channel_sums_ab_planar")
    assert "a_row + p * 3 + 2" in minor.source and "a_row2" not in minor.source
    assert "a_row2 = a_row + 2000" in planar.source and "tl.load(b_row2 + p, mask=m" in planar.source
    assert "p * 3" not in planar.source
    launches = []
    real = sums_module._batched
    monkeypatch.setattr(sums_module, "_batched", lambda *key: launches.append(key) or real(*key))
    a = _normal(np.random.default_rng(0), (2, 100, 1))
    _check(channel_sums_triton(a, planar=True)[0], _want(a)[0])
    channel_sums_triton(jnp.concatenate([a, a], axis=2), planar=True)
    assert [key[-1] for key in launches] == [False, True]  # (products, two, shifted, planar)


@pytest.mark.parametrize("planar", [False, True], ids=["minor", "planar"])
def test_gpu_lowering_asks_for_the_operand_layout(monkeypatch, planar):
    """Lowered for CUDA (jaxlib's kernel objects faked): the sums kernel's custom call asks XLA
    for a and b row-major, or with `planar` component-planar ((B, c, T, P) in memory: minor-to-
    major [2, 3, 1, 0]); the shift stays row-major either way."""
    from test_conv_contract_triton import triton_calls_lowered_for_cuda

    rng = np.random.default_rng(1)
    a, b, shift = _normal(rng, (3, 40, 3)), _normal(rng, (3, 40, 3)), _normal(rng, (3, 3))
    calls = triton_calls_lowered_for_cuda(
        monkeypatch, lambda a, b, s: channel_sums_triton(a, b, shift=s, planar=planar), a, b, shift)
    assert len(calls) == 2, calls  # the kernel and its partials' sum
    block = "dense<[2, 3, 1, 0]>" if planar else "dense<[3, 2, 1, 0]>"
    shift_layout = "dense<[2, 1, 0]> : tensor<3xindex>"
    layouts = f"operand_layouts = [{block} : tensor<4xindex>, {block} : tensor<4xindex>, {shift_layout}]"
    assert layouts in calls[0], calls[0]


def test_chunking_covers_every_pixel_once():
    for c, P, T, batch in [(16, 64**3, 3, 4), (1, 100, 1, 1), (64, 4096, 3, 1), (2, 513, 9, 3)]:
        per, chunks = chunking(c, P, T, batch)
        assert per * chunks >= P > per * (chunks - 1)
        assert per % (512 if T <= 4 else 128) == 0


def test_bad_arguments_name_themselves():
    a = jnp.zeros((2, 10, 3), jnp.float32)
    with pytest.raises(ValueError, match="`a`"):
        channel_sums_triton(a[0])
    with pytest.raises(ValueError, match="float32"):
        channel_sums_triton(a.astype(jnp.float16))
    with pytest.raises(ValueError, match="`b`"):
        channel_sums_triton(a, a[:, :5])
    with pytest.raises(ValueError, match="`products`"):
        channel_sums_triton(a, a, products=False)
    with pytest.raises(ValueError, match="T \\(=9\\)"):
        channel_sums_triton(jnp.zeros((2, 10, 9), jnp.float32))


def test_switch_is_checked(monkeypatch):
    monkeypatch.setenv(_reduce.SUMS_ENV, "cuda")
    with pytest.raises(ValueError, match="GINJAX_CHANNEL_SUMS"):
        _reduce.channel_sums_impl()
    monkeypatch.delenv(_reduce.SUMS_ENV)
    assert jax.default_backend() == "cpu"  # the default is "triton" on a GPU only
    assert _reduce.channel_sums_impl() == "xla"
    assert not _reduce.fused_sums_cover(jnp.zeros((2, 10, 3), jnp.float32), products=True)


def _value_and_grads(f, args, g):
    y, vjp = jax.vjp(f, *args)
    return (y,) + vjp(g)


def _same_with_and_without(monkeypatch, f, args, g):
    """f's value and gradients with the fused sums against the XLA path, and the fused path taken
    (jitted: one trace per path, not an eager dispatch per operation)."""
    def step(*a):  # a new function per path: jit caches a trace by the function it is given
        return _value_and_grads(f, a, g)

    monkeypatch.setenv(_reduce.SUMS_ENV, "xla")
    assert "pure_callback" not in str(jax.make_jaxpr(step)(*args))
    want = jax.jit(step)(*args)
    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")

    def step(*a):  # noqa: F811
        return _value_and_grads(f, a, g)

    assert "pure_callback" in str(jax.make_jaxpr(step)(*args))
    got = jax.jit(step)(*args)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        _check(x, np.asarray(y, np.float64))


@pytest.mark.parametrize("layout", ["minor", "planar"])
@pytest.mark.parametrize("D, groups", [(3, 2), (2, 1)])
def test_vector_group_norm_with_fused_sums(monkeypatch, D, groups, layout):
    monkeypatch.setenv(_layout.ENV, layout)  # the layout the fused sums read the block in
    rng = np.random.default_rng(10 + D)
    block = _normal(rng, (2, 4) + (5,) * D + (D,), loc=2.0) * jnp.arange(1, D + 1)
    scale, bias = _normal(rng, (4,)), _normal(rng, (4,))
    f = jax.vmap(lambda b, s, t: vector_group_norm(b, groups, D, 1e-5, "eigh", s, t), in_axes=(0, None, None))
    _same_with_and_without(monkeypatch, f, (block, scale, bias), _normal(rng, block.shape))


def test_scalar_group_norm_with_fused_sums(monkeypatch):
    import equinox as eqx

    rng = np.random.default_rng(11)
    norm = eqx.nn.GroupNorm(2, 4)
    norm = eqx.tree_at(lambda n: (n.weight, n.bias), norm, (_normal(rng, (4,)), _normal(rng, (4,))))
    x = _normal(rng, (2, 4, 6, 6, 6), loc=3.0)
    f = jax.vmap(lambda b: scalar_group_norm(norm, b))
    _same_with_and_without(monkeypatch, f, (x,), _normal(rng, x.shape))


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_bias_gradient_sums_with_fused_sums(monkeypatch, layout):
    """The bias gradients' sums next to the CUDA weight gradient, read in the layout those kernels
    fix for the cotangents (scalars, vectors and 2-tensors)."""
    rng = np.random.default_rng(12)
    cotangents = (_normal(rng, (4, 6, 7, 5)), _normal(rng, (3, 6, 7, 5, 3)), _normal(rng, (2, 6, 7, 5, 3, 3)))
    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
    got = triton_conv._spatial_sums(cotangents, (0, 1, 2), 3, fixed_layout=layout)
    for b, g in enumerate(cotangents):
        _check(got[b], np.asarray(g, np.float64).sum(axis=(1, 2, 3)))
    assert "pure_callback" in str(jax.make_jaxpr(
        lambda gs: triton_conv._spatial_sums(gs, (1,), 3, fixed_layout=layout))(cotangents))
    # no layout fixed (the Triton kernels' own cotangents): the XLA path, whatever the switch says
    assert "pure_callback" not in str(jax.make_jaxpr(lambda gs: triton_conv._spatial_sums(gs, (1,), 3))(cotangents))


def _spy_on_kernel(monkeypatch) -> list:
    """The `planar` of every later channel_sums_triton call through kernels._reduce (which looks the
    kernel up when it runs), the real kernel still computing the sums."""
    seen, real = [], sums_module.channel_sums_triton

    def spy(*args, planar=False, **kwargs):
        seen.append(planar)
        return real(*args, planar=planar, **kwargs)

    monkeypatch.setattr(sums_module, "channel_sums_triton", spy)
    return seen


@pytest.mark.parametrize("layout", ["minor", "planar"])
def test_norm_sums_follow_the_block_layout(monkeypatch, layout):
    """With the fused sums on, GINJAX_BLOCK_LAYOUT (`block_layout()`) decides how the kernel reads
    the norms' blocks (`_reduce.sums_planar`, read when the caller is traced): the statistics
    (`channel_sums`, shifted, b = a), the affine map's backward (`channel_affine`: the sums of
    (gy, x - shift)) and `channel_sums_value` itself call it with `planar` set so, and still give
    the float64 sums and gradients."""
    from ginjax._norm_stats import channel_affine, channel_sums

    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
    monkeypatch.setenv(_layout.ENV, layout)
    planar = layout == "planar"
    assert _layout.block_layout() == layout and _reduce.sums_planar() == planar
    seen = _spy_on_kernel(monkeypatch)
    rng = np.random.default_rng(21)
    c, P, T = 4, 700, 3
    x, gy = _normal(rng, (c, P, T), loc=2.0), _normal(rng, (c, P, T))
    m, v, shift = _normal(rng, (c, T, T)), _normal(rng, (c, T)), _normal(rng, (c, T), loc=2.0)
    d = np.asarray(x, np.float64) - np.asarray(shift, np.float64)[:, None]

    first, products = _reduce.channel_sums_value(True, x, None, shift, planar=_reduce.sums_planar())
    _check(first, d.sum(axis=1))
    _check(products, _want(d)[1])
    first, products = jax.jit(lambda x, s: channel_sums(x, shift=s))(x, shift)
    _check(first, d.sum(axis=1))
    _check(products, _want(d)[1])
    _, vjp = jax.vjp(channel_affine, m, v, x, shift)
    gm, gv, gx, gs = vjp(gy)
    _check(gm, _want(gy, d)[1])
    _check(gv, np.asarray(gy, np.float64).sum(axis=1))
    mt = np.swapaxes(np.asarray(m, np.float64), 1, 2)
    _check(gx, np.einsum("cij,cpj->cpi", mt, np.asarray(gy, np.float64)))
    _check(gs, -np.einsum("cij,cj->ci", mt, np.asarray(gy, np.float64).sum(axis=1)))
    assert seen == [planar] * 3, seen


@pytest.mark.parametrize("planar", [False, True], ids=["minor", "planar"])
def test_vector_neuron_affine_backward_sums_in_the_kernels_layout(monkeypatch, planar):
    """The Triton VectorNeuron with a norm's map: its backward's channel sums of (g, x) (gm, gv) run
    on the sums kernel, which reads them in the layout the VectorNeuron kernels read x and wrote g
    in (`planar`); the value and all gradients equal the composition's (map, then XLA)."""
    from test_vector_neuron_affine_triton import check_against_composition

    monkeypatch.setenv(_reduce.SUMS_ENV, "triton")
    monkeypatch.setenv(_layout.ENV, "minor" if planar else "planar")  # not what decides the kernels' sums
    seen = _spy_on_kernel(monkeypatch)
    check_against_composition(3, (4, 5, 6, 7, 3), jax.nn.gelu, planar, seed=3)
    # the kernels' backward, then the composition's `channel_affine` (which follows GINJAX_BLOCK_LAYOUT)
    assert seen == [planar, not planar], seen


_COMPILE_FOR_HOPPER = """
from kernels.triton.channel_sums import plan_channel_sums

for T, products, two, shifted, planar in [
        (3, True, False, False, False), (3, True, True, False, False), (1, False, False, False, False),
        (9, False, False, False, False), (3, True, False, True, False), (3, True, True, True, False),
        (3, True, False, True, True), (3, True, True, True, True), (9, False, False, False, True)]:
    flags = ((True, False) if two else (True,)) + ((True,) if shifted else ())
    plan, _ = plan_channel_sums(16, 64**3, T, 4, products, two, flags, shifted, planar)
    compiled = compile_for_hopper(plan)
    assert compiled.asm.get("cubin"), plan.name
    assert "ld.global" in compiled.asm["ptx"] and "st.global" in compiled.asm["ptx"], plan.name
    print("compiled", plan.name)
"""


def test_kernel_compiles_for_hopper():
    """If this Triton can compile offline, the generated sources for the ResNet's standard block
    (a = b, a and b, first sums of scalars and of 2-tensors, a = b and a and b with a shift; the
    planar ones of the last three) compile to sm_90 cubins without a GPU (tests/_hopper_compile.py)."""
    from _hopper_compile import run_offline

    lines = run_offline(_COMPILE_FOR_HOPPER, timeout=300)
    assert sum(line.startswith("compiled") for line in lines) == 9, lines
