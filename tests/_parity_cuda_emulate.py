"""kernels/cuda/parity_conv.cu's forward emulated lane by lane in numpy (the tests' CPU check of its
addressing): the same table and `geom`, the same shared-memory stages as flat arrays written by
the kernel's loops, each lane's four A elements read at the kernel's addresses and combined by its
butterfly, the mma.sync.m16n8k8 fragments assembled into matrices, and the epilogue's stores. The
arithmetic is float64 without tf32 rounding, so an addressing error shows as a large difference
from `reference`, not a rounding one."""

from __future__ import annotations

import numpy as np

from kernels.cuda.parity_forward import (CAP, CHUNK, CHUNK_FIELDS, COMBOS, NTILE_FLOATS, OUT_FIELDS, SLOTS, TILE,
                                         row_floats)

WARPS = 4


class _Tab:
    def __init__(self, t: np.ndarray, chunks: int, dots: int):
        self.t, self.chunks, self.dots = t, chunks, dots

    def chunk(self, c, f):
        return int(self.t[CHUNK_FIELDS * c + f])

    def dot_of(self, c, combo):
        return int(self.t[CHUNK_FIELDS * self.chunks + COMBOS * c + combo])

    def dot(self, d, f):
        return int(self.t[(CHUNK_FIELDS + COMBOS) * self.chunks + 2 * d + f])

    def out(self, b, f):
        return int(self.t[(CHUNK_FIELDS + COMBOS) * self.chunks + 2 * self.dots + OUT_FIELDS * b + f])


def emulate(x: np.ndarray, w: np.ndarray, tab: np.ndarray, geom) -> np.ndarray:
    """y (B, cout, nz, ny, nx) from x (B, cin, nz, ny, row) (nx + 2h padded to a multiple of 4:
    parity_forward.row_floats), w (B, w_total) (parity_forward.stage_weights), tab, geom."""
    nz, ny, nx, h, dz, dy, dx, wrap_z, wrap_y, cin, cout, chunks, dots, n_out, w_total, xp, w_stage, _ = (
        int(v) for v in geom)
    B = x.shape[0]
    T = _Tab(np.asarray(tab).reshape(-1)[: int(geom[17])], chunks, dots)  # a broadcast batch's first
    row = row_floats(nx, h)  # a packed row, padded to 16-byte copies
    copies = row_floats(TILE, h) // 4  # 16-byte copies a staged row
    y = np.full((B, cout, nz, ny, nx), np.nan)
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    warp = np.arange(WARPS)[:, None]
    px = 16 * warp + g[None, :]  # (4, 32)
    ntiles = [T.out(b, 2) for b in range(SLOTS)]  # slot b: output class bits b (0 n-tiles: no such class)
    xf = x.reshape(B, -1)
    for batch in range(B):
        for z in range(nz):
            for yy in range(ny):
                src = []
                for zr in range(3):
                    for yr in range(3):
                        zz, y2, ok = z + (zr - 1) * dz, yy + (yr - 1) * dy, True
                        if wrap_z:
                            zz %= nz
                        else:
                            ok = ok and 0 <= zz < nz
                        if wrap_y:
                            y2 %= ny
                        else:
                            ok = ok and 0 <= y2 < ny
                        src.append((zz * ny + y2) * row if ok else -1)
                for x0 in range(0, nx, TILE):
                    acc = np.zeros((SLOTS, CAP, WARPS, 32, 4))
                    for ch in range(chunks):
                        r0, rows, d0, nd, cls, w_at, w_len = (T.chunk(ch, f) for f in range(CHUNK_FIELDS))
                        ksteps = 2 if rows > 8 else 1  # k-step 1 of a chunk of <= 8 rows: neither staged nor run
                        xs = np.full(CHUNK * 9 * xp, np.nan)  # unwritten stage cells stay NaN
                        plane = nz * ny * row
                        for k in range(8 * ksteps):  # row k at [k][r][xi], a 16-byte copy at a time
                            for r in range(9):
                                for c in range(copies):
                                    for xi in range(4 * c, 4 * c + 4):
                                        v = 0.0
                                        if k < rows and src[r] >= 0 and x0 + 4 * c < row:
                                            v = xf[batch, (r0 + k) * plane + src[r] + x0 + xi]
                                        xs[(k * 9 + r) * xp + xi] = v
                        ws = np.full(w_stage, np.nan)
                        ws[:w_len] = w[batch, w_at:w_at + w_len]  # the chunk's tiles: one run
                        # the chunk's dot per combination as the kernel stages it: its offset, or -1
                        staged = [-1 if T.dot_of(ch, c) < 0 else T.dot(T.dot_of(ch, c), 1) for c in range(COMBOS)]
                        for s in range(ksteps):
                            for G in range(8):
                                _group(acc, xs, ws, staged, cls, ntiles, xp, h, dx, px, s, g, t, (G >> 2) & 1, (G >> 1) & 1, G & 1)
                    for b in range(SLOTS):
                        o0, width = T.out(b, 0), T.out(b, 1)
                        for nt in range(ntiles[b]):
                            for i in range(4):
                                col = 8 * nt + 2 * t + (i & 1)  # (32,)
                                xx = x0 + px + 8 * (i >> 1)  # (4, 32)
                                for wv in range(WARPS):
                                    for ln in range(32):
                                        if col[ln] < width and xx[wv, ln] < nx:
                                            y[batch, o0 + col[ln], z, yy, xx[wv, ln]] = acc[b, nt, wv, ln, i]
    return y


def _group(acc, xs, ws, staged, cls, ntiles, xp, h, dx, px, s, g, t, GZ, GY, GX):
    NZ, NY, NX = (2 if a else 1 for a in (GZ, GY, GX))
    v = np.zeros((4, NZ, NY, NX) + px.shape)
    for e in range(4):  # e: pixel g + 8 (e & 1), row 8 s + t + 4 (e >> 1)
        base = (8 * s + t + 4 * (e >> 1)) * 9 * xp + px + 8 * (e & 1) + h  # (4, 32)
        for iz in range(NZ):
            for iy in range(NY):
                for ix in range(NX):
                    zr, yr = (2 * iz if GZ else 1), (2 * iy if GY else 1)
                    xo = (2 * ix - 1) * dx if GX else 0
                    v[e, iz, iy, ix] = xs[base + (3 * zr + yr) * xp + xo]
    for axis, on in ((3, GX), (2, GY), (1, GZ)):
        if on:
            m, p = np.take(v, 0, axis=axis).copy(), np.take(v, 1, axis=axis).copy()
            idx = [slice(None)] * v.ndim
            idx[axis] = 0
            v[tuple(idx)] = p + m
            idx[axis] = 1
            v[tuple(idx)] = p - m
    for iz in range(NZ):
        for iy in range(NY):
            for ix in range(NX):
                combo = 9 * (1 + iz if GZ else 0) + 3 * (1 + iy if GY else 0) + (1 + ix if GX else 0)
                b = cls ^ ((1 if GZ and iz else 0) | (2 if GY and iy else 0) | (4 if GX and ix else 0))
                off = staged[combo]
                if off < 0:
                    continue
                a = v[:, iz, iy, ix]  # (4 elements, 4 warps, 32 lanes)
                A = np.zeros((px.shape[0], 16, 8))
                for wv in range(px.shape[0]):
                    A[wv, g, t], A[wv, g + 8, t] = a[0, wv], a[1, wv]
                    A[wv, g, t + 4], A[wv, g + 8, t + 4] = a[2, wv], a[3, wv]
                for nt in range(ntiles[b]):
                    w0 = off + nt * NTILE_FLOATS + 2 * (8 * (4 * s + t) + g)  # the float2 (b0, b1)
                    Bm = np.zeros((8, 8))
                    Bm[t, g], Bm[t + 4, g] = ws[w0], ws[w0 + 1]
                    D = A @ Bm  # (4, 16, 8)
                    acc[b, nt, :, :, 0] += D[:, g, 2 * t]
                    acc[b, nt, :, :, 1] += D[:, g, 2 * t + 1]
                    acc[b, nt, :, :, 2] += D[:, g + 8, 2 * t]
                    acc[b, nt, :, :, 3] += D[:, g + 8, 2 * t + 1]
