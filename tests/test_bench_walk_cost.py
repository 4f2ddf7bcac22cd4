"""bench/walk_cost.py: its sub-phases reproduce the CUDA forward's own walk where the kernel covers
the layer (kernels.cuda._walk.phases: 948 FP32 instructions a warp-row on the standard layer), and
on any layer every basis nonzero is walked exactly once at any cap."""

from __future__ import annotations

import functools

import pytest

from bench import _cases, _configs, walk_cost
from kernels._fused.basis import basis_nonzeros
from kernels.cuda import _walk

STANDARD = _cases.fixture_spec(_configs.CONFIGS["d3_n64_b4_c16"])


@functools.cache
def _k2_spec():
    return walk_cost.layer_spec(_configs.CONFIGS["d3_n64_b2_c8_k2"])


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
    with pytest.raises(ValueError, match=r"`spec` has D=2"):
        walk_cost.sub_phases(d2, 27)
