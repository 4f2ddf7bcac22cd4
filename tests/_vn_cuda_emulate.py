"""vector_neuron.cu's arithmetic in numpy, loop for loop, for the CPU tests: the channel loop (d_c
from W's row c, k ascending; the local terms; the W^T gd accumulation in channel order), the
tiles of THREADS pixels, the backward's fixed share of tiles per CTA and, within a tile, the
splits' every-SPLITS-th (pixel, component) rows of the gW blocks, added in split order, then the
CTAs' partials. Vectorised over the pixels of a tile (the kernel's threads), any float dtype
(the tests run it in float64, against autodiff of ginjax's XLA path)."""

from __future__ import annotations

import numpy as np

from kernels._vn_args import ACTIVATIONS
from kernels.cuda.vector_neuron import THREADS

GELU_C = np.sqrt(2.0 / np.pi)
GELU_A = 0.044715


def local_gain(s, eps, act: str, derivative: bool):
    """h(s) and (with `derivative`) h'(s): vector_neuron.cu local_gain."""
    if act == "relu":
        a = np.where(s > 0, s, 0.0)
        da = np.where(s > 0, 1.0, 0.0)
    elif act == "gelu":
        z = GELU_C * (s + GELU_A * (s * s * s))
        ez = np.exp(-2.0 * np.abs(z))
        th = (1.0 - ez) / (1.0 + ez)
        th = np.where(z < 0, -th, th)
        cdf = 0.5 * (1.0 + th)
        a = s * cdf
        da = cdf + s * 0.5 * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_A * (s * s))
    else:
        raise ValueError(f"`act` (={act!r}) must be one of {ACTIVATIONS}")
    q = np.abs(s) + eps
    gain = a / q
    h = (gain - 1.0) * s
    if not derivative:
        return h, None
    sgn = np.where(s > 0, 1.0, np.where(s < 0, -1.0, 0.0))
    return h, (da / q - a * sgn / (q * q)) * s + (gain - 1.0)


def _mix_row(w, c, x):
    """d_c (T, P) = sum over k ascending of W[c, k] x[k]."""
    d = np.zeros_like(x[0])
    for k in range(x.shape[0]):
        d = d + w[c, k] * x[k]
    return d


def _unit(d, xc, eps):
    nsq = np.zeros_like(d[0])
    for t in range(d.shape[0]):
        nsq = nsq + d[t] * d[t]
    n = np.where(nsq > 0, np.sqrt(np.where(nsq > 0, nsq, 1.0)), 0.0)
    inv = 1.0 / (n + eps)
    u = d * inv
    s = np.zeros_like(n)
    for t in range(d.shape[0]):
        s = s + xc[t] * u[t]
    return n, inv, u, s


def forward(w, x, act: str, eps: float):
    """y (C, T, S) of one example: x (C, T, S) planar, w (C, C)."""
    y = np.empty_like(x)
    for c in range(x.shape[0]):
        d = _mix_row(w, c, x)
        _, _, u, s = _unit(d, x[c], eps)
        h, _ = local_gain(s, eps, act, False)
        y[c] = x[c] + h * u
    return y


def _tile_backward(w, x, gy, act, eps):
    """gx and gd (C, T, P) of one tile: the kernel's channel loop."""
    C = x.shape[0]
    acc = np.zeros_like(x)
    gd_all = np.empty_like(x)
    for c in range(C):
        d = _mix_row(w, c, x)
        n, inv, u, s = _unit(d, x[c], eps)
        h, dh = local_gain(s, eps, act, True)
        gyu = np.zeros_like(s)
        for t in range(x.shape[1]):
            gyu = gyu + gy[c, t] * u[t]
        gs = gyu * dh
        inv_n = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)
        gu = h * gy[c] + gs * x[c]
        gud = np.zeros_like(s)
        for t in range(x.shape[1]):
            gud = gud + gu[t] * d[t]
        coef = gud * (inv * inv * inv_n)
        gd = gu * inv - coef * d
        gd_all[c] = gd
        acc[c] = acc[c] + (gy[c] + gs * u)
        for k in range(C):
            acc[k] = acc[k] + w[c, k] * gd
    return acc, gd_all


def splits(channels: int) -> int:
    """Threads sharing one 2 x 4 block of gW (vector_neuron.cu Bwd::kSplits)."""
    return THREADS // (channels * channels // 8)


def backward(w, x, gy, act: str, eps: float, groups: int):
    """gx (C, T, S), the CTAs' partials (groups, C, C) and gW (C, C) of one example."""
    C, T, S = x.shape
    tiles = -(-S // THREADS)
    n_split = splits(C)
    gx = np.empty_like(x)
    part = np.zeros((groups, C, C), x.dtype)
    pad = tiles * THREADS - S
    xp = np.concatenate([x, np.zeros((C, T, pad), x.dtype)], axis=2)  # past the end: zeros
    gp = np.concatenate([gy, np.zeros((C, T, pad), x.dtype)], axis=2)
    for grp in range(groups):
        acc = np.zeros((n_split, C, C), x.dtype)  # one split's blocks, all of gW
        for tile in range(grp, tiles, groups):
            sl = slice(tile * THREADS, (tile + 1) * THREADS)
            gxt, gd = _tile_backward(w, xp[:, :, sl], gp[:, :, sl], act, eps)
            end = min(THREADS, S - tile * THREADS)
            gx[:, :, tile * THREADS : tile * THREADS + end] = gxt[:, :, :end]
            # rows j = pixel * T + t, split sp takes j = sp, sp + n_split, ...
            gd_rows = gd.transpose(2, 1, 0).reshape(THREADS * T, C)
            x_rows = xp[:, :, sl].transpose(2, 1, 0).reshape(THREADS * T, C)
            for sp in range(n_split):  # the split's rows, as one product (the set the kernel adds)
                acc[sp] += gd_rows[sp::n_split].T @ x_rows[sp::n_split]
        total = acc[0].copy()
        for sp in range(1, n_split):
            total = total + acc[sp]
        part[grp] = total
    return gx, part, part.sum(axis=0)
