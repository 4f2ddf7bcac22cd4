"""bench/walk_cost.py: its sub-phases reproduce the CUDA forward's own walk where the kernel covers
the layer (kernels.cuda._walk.phases: 948 FP32 instructions a warp-row on the standard layer), and
on any layer every basis nonzero is walked exactly once at any cap; a 2D layer walks the plane dz = 0."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from bench import _cases, _configs, walk_cost
from kernels._fused.basis import basis_nonzeros
from kernels.cuda import _walk

STANDARD = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])


@functools.cache
def _k2_spec():
    return _cases.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])


def _uses(phases) -> int:
    return sum(len(uses) for p in phases for _, uses in p.rows)


def test_the_standard_layer_walks_as_the_kernel_does():
    _, kernel = _walk.phases(STANDARD)
    ours = walk_cost.sub_phases(STANDARD, 27)
    assert [len(p.tiles) for p in ours] == [len(p.tiles) for p in kernel] == [27, 13]
    assert [_walk.walk_cost(p) for p in ours] == [_walk.walk_cost(p) for p in kernel]
    assert sum(_walk.walk_cost(p) for p in ours) == 948  # forward_kernel.cuh's header
    assert [[(g.dy, g.i, g.dzs) for g in _walk.row_groups(p)] for p in ours] == \
        [[(g.dy, g.i, g.dzs) for g in _walk.row_groups(p)] for p in kernel]
    w = walk_cost.walk_counts(STANDARD, 27, 16, 4, (64, 64, 64))
    assert (w.phases, w.tiles, w.fp32) == (2, 40, 948) and w.fp32_total == 948 * 4 * 64**3 // 16 * 2


@pytest.mark.parametrize("cap", [1, 5, 27, 1000])
def test_every_nonzero_is_walked_once(cap):
    spec = _k2_spec()
    phases = walk_cost.sub_phases(spec, cap)
    assert _uses(phases) == len(basis_nonzeros(spec)) == 2895
    assert sum(len(p.tiles) for p in phases) == 441 and all(len(p.tiles) <= cap for p in phases)
    assert [spec.in_keys[p.key][0] for p in phases] == sorted((spec.in_keys[p.key][0] for p in phases), reverse=True)
    smaller = walk_cost.walk_counts(spec, max(cap // 2, 1), 8, 2, (64, 64, 64))
    assert smaller.lds >= walk_cost.walk_counts(spec, cap, 8, 2, (64, 64, 64)).lds  # re-reads, never fewer


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"`cap` \(=0\) must be a positive int"):
        walk_cost.sub_phases(STANDARD, 0)
    with pytest.raises(ValueError, match=r"`channels` \(=12\) must be a multiple of 8"):
        walk_cost.walk_counts(STANDARD, 27, 12, 1, (8, 8, 8))
    d2 = _cases.fixture_spec(_configs.CONFIGS["d2_n64_b4_c8"])
    five = dataclasses.replace(d2, filter_shape=(5, 5))
    with pytest.raises(ValueError, match=r"`spec` has D=2 and filters \(5, 5\)"):
        walk_cost.sub_phases(five, 27)


def test_a_2d_layer_walks_the_plane_dz_0():
    """The 2D standard layer (3x3 filters): every nonzero walked once in two phases (the vector
    key's tiles, then the scalar key's), each row group loading one row and forming no z class;
    236 FP32 instructions a warp-row against the 3D standard layer's 948 (bench/NOTES.md)."""
    spec = _cases.fixture_spec(_configs.CONFIGS["d2_n256_b16_c32"])
    phases = walk_cost.sub_phases(spec, 27)
    assert _uses(phases) == len(basis_nonzeros(spec)) == 67
    assert [spec.in_keys[p.key][0] for p in phases] == [1, 0] and sum(len(p.tiles) for p in phases) == 19
    groups = [g for p in phases for g in _walk.row_groups(p)]
    assert all(g.dzs == (0,) and g.zc == () for g in groups)
    # each tap of a phase's rows is the nonzero's (dy, dx): the 3x3 plane, dz = 0
    taps = {(dz, dy, t[1]) for p in phases for (dz, dy, _), uses in p.rows for t in uses}
    assert {dz for dz, _, _ in taps} == {0} and {(dy, dx) for _, dy, dx in taps} <= {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    w = walk_cost.walk_counts(spec, 27, 32, 16, (256, 256))
    assert (w.phases, w.tiles, w.fp32, w.lds) == (2, 19, 236, 72)
