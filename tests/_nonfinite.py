"""A NaN and an inf in a torus layer's inputs: which outputs they may reach, and the check that a
kernel's outputs (or weight gradient) are non-finite exactly there and match the reference
elsewhere.

A fused kernel walks only the basis' nonzero taps, so a non-finite input reaches output pixel
p - d (y - 1) (per axis, wrapped; d the dilation) for every tap y and output component j with a
nonzero B[f, y, i, j] of a pair reading its component i; a dense convolution would also spread
it through 0 * NaN. In the weight gradient, dW[o, c, f] = sum_p gY[p, o] Z_f[p, c] takes the hit of
input channel c through every filter f with a nonzero tap on its component. Shared by the Triton
kernel's test and the CUDA kernels' CPU tests (on the lane emulations) and GPU tests.
"""

from __future__ import annotations

import numpy as np


def reached_outputs(spec, spatial, hits):
    """Per output block, a bool array (*spatial, components) of the outputs the `hits` reach.

    hits: (input block, pixel tuple, component) of every non-finite input (any channel: the
    channel GEMM carries it to every output channel). Torus layers, stride 1, odd filters."""
    if not all(spec.is_torus) or any(s != 1 for s in spec.stride):
        raise ValueError(f"`spec` (torus {spec.is_torus}, stride {spec.stride}) must be a stride-1 torus layer")
    out = [np.zeros(tuple(spatial) + (spec.D ** k,), bool) for k, _, _ in spec.out_keys]
    for pair in spec.pairs:
        k_a, k_b = spec.in_keys[pair.in_index][0], spec.out_keys[pair.out_index][0]
        B = pair.basis.array.reshape((pair.basis.n_filters,) + tuple(spec.filter_shape) + (spec.D**k_a, spec.D**k_b))
        centre = [m // 2 for m in spec.filter_shape]
        for block, src, comp in hits:
            if block != pair.in_index:
                continue
            taps = np.argwhere(B[..., comp, :] != 0)  # (f, y_1 .. y_D, j)
            for row in taps:
                y, j = row[1:-1], row[-1]
                p = tuple((s - d * (t - c)) % n for s, t, c, d, n in zip(src, y, centre, spec.rhs_dilation, spatial))
                out[pair.out_index][p + (j,)] = True
    return out


def poison(inputs, hits, values):
    """Copies of `inputs` (numpy, one example: (c, *spatial[, comps])) with values[n] at hits[n]
    ((block, channel, pixel, component)), and the clean copies with 0 there."""
    bad = [np.array(x, np.float32) for x in inputs]
    clean = [np.array(x, np.float32) for x in inputs]
    for (block, channel, pixel, comp), value in zip(hits, values):
        index = (channel,) + tuple(pixel) + ((comp,) if bad[block].ndim > 1 + len(pixel) else ())
        bad[block][index] = value
        clean[block][index] = 0.0
    return bad, clean


def check_nonfinite_exactly_reached(spec, spatial, hits, got, want, tol):
    """`got` (per output block, (o, *spatial[, comps])) is non-finite exactly where the `hits`
    ((block, channel, pixel, component)) reach, in every output channel, and within `tol` (rel L2)
    of `want` (the clean inputs' outputs) everywhere else."""
    reached = reached_outputs(spec, spatial, [(b, p, i) for b, _, p, i in hits])
    assert any(r.any() for r in reached), "the hits reach no output: the check would prove nothing"
    for b, (g, w, r) in enumerate(zip(got, want, reached)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        g = g.reshape(g.shape[:1 + spec.D] + (-1,))
        w = w.reshape(g.shape)
        bad = ~np.isfinite(g)
        expect = np.broadcast_to(r, g.shape)
        wrong = np.argwhere(bad != expect)
        assert not len(wrong), f"output block {b}: non-finite at {len(wrong)} wrong places, e.g. {wrong[:3].tolist()}"
        err = np.linalg.norm(np.where(bad, 0, g - w)) / np.linalg.norm(np.where(bad, 0, w))
        assert err <= tol, f"output block {b}: rel L2 {err:.2e} away from the reached outputs (tolerance {tol})"


# The NaN a GPU's arithmetic makes (numpy's np.nan is 0x7fc00000): what an upstream op leaves in
# memory, and the bit pattern an integer add of 0x1000 (a tf32 rounding) turns into -0.
CANONICAL_NAN = np.uint32(0x7FFFFFFF).view(np.float32)


def standard_hits(spatial):
    """The GPU's canonical NaN in scalar channel 3 and an inf in the last component of vector channel
    5 (2 in 3D, 1 in 2D), at pixels away from each other (so the reached sets overlap only where the
    grid is small)."""
    first = tuple(n // 2 for n in spatial)
    second = tuple((n // 2 + n // 3 + 1) % n for n in spatial)
    return [(0, 3, first, 0), (1, 5, second, len(spatial) - 1)], [CANONICAL_NAN, np.inf]


def cotangent_hit(spatial, channel: int = 7):
    """A canonical NaN in the cotangent of output block 1 (vector), `channel`, component 1: the
    weight gradient reads it from memory as it is (no arithmetic makes it canonical first)."""
    return (1, channel, tuple((n // 3) % n for n in spatial), 1), CANONICAL_NAN


def poison_weight_gradient_operands(inputs, cotangents, spatial, cotangent_channel: int = 7):
    """One example's inputs and cotangents (numpy, (c, *spatial[, comps])) poisoned for the weight
    gradient's check: `standard_hits` in the inputs, `cotangent_hit` in the cotangents. Returns
    (input hits, cotangent hits, bad inputs, clean inputs, bad cotangents, clean cotangents)."""
    hits, values = standard_hits(spatial)
    bad, clean = poison(inputs, hits, values)
    g_hit, g_value = cotangent_hit(spatial, cotangent_channel)
    bad_g, clean_g = poison(cotangents, [g_hit], [g_value])
    return hits, [g_hit], bad, clean, bad_g, clean_g


def reached_weights(spec, hits, cotangent_hits=()):
    """Per pair, a bool array (o, c, filters) of the weight-gradient entries the input `hits`
    ((block, channel, pixel, component)) reach: every output channel (the cotangents are nonzero
    everywhere), the hit's channel, each filter with a nonzero tap on the hit's component; and
    those the `cotangent_hits` (the same, in the output cotangents) reach: the hit's output
    channel, every input channel, each filter with a nonzero tap into the hit's component."""
    out = []
    for pair in spec.pairs:
        k_a, k_b = spec.in_keys[pair.in_index][0], spec.out_keys[pair.out_index][0]
        B = pair.basis.array.reshape((pair.basis.n_filters, -1, spec.D**k_a, spec.D**k_b))
        r = np.zeros((spec.out_keys[pair.out_index][2], spec.in_keys[pair.in_index][2], pair.basis.n_filters), bool)
        for block, channel, _, comp in hits:
            if block == pair.in_index:
                r[:, channel, np.any(B[:, :, comp, :] != 0, axis=(1, 2))] = True
        for block, channel, _, comp in cotangent_hits:
            if block == pair.out_index:
                r[channel, :, np.any(B[:, :, :, comp] != 0, axis=(1, 2))] = True
        out.append(r)
    return out


def check_weights_nonfinite_exactly_reached(spec, hits, got, want, tol, cotangent_hits=()):
    """`got` (per pair, (o, c, filters)) is non-finite exactly where `reached_weights` says and
    within `tol` (rel L2) of `want` (the clean inputs' dW) everywhere else."""
    reached = reached_weights(spec, hits, cotangent_hits)
    assert any(r.any() for r in reached) and not all(r.all() for r in reached), "a check that proves nothing"
    for t, (g, w, r) in enumerate(zip(got, want, reached)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        bad = ~np.isfinite(g)
        wrong = np.argwhere(bad != r)
        assert not len(wrong), f"pair {t}: non-finite at {len(wrong)} wrong places, e.g. {wrong[:3].tolist()}"
        err = np.linalg.norm(np.where(bad, 0, g - w)) / max(np.linalg.norm(np.where(bad, 0, w)), 1e-30)
        assert err <= tol, f"pair {t}: rel L2 {err:.2e} away from the reached entries (tolerance {tol})"
