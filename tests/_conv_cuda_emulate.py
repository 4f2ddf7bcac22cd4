"""forward_kernel.cuh's index arithmetic and arithmetic in numpy, lane by lane, for the CPU tests:
the slice copies (every lane's cp.async source and destination, the wrap floats), the ring of
three y slices per strip (at dilation d: rows y - d, y, y + d of one y phase) and the MID hook
that refills the oldest one, the stencil reads at each
lane's base plus the walk's immediates, the symmetric walk (ROW / ZC / XC / NZ of
`_plan.row_groups`), the mma fragments (A from the Z registers, B from the packed weights, C to
the lanes), the warp halves' meeting in the staging area (at dilation 8 a view of the vector
phase's weights, poisoned after use and copied in again before the strip's next row) and its
16-byte stores; with several
channel groups, one pass of the CTA per group (the group's weight copy, the ring refilled with its
channels) and the read-add-store epilogue of the passes after the first. Vectorised over the 32
lanes of a warp; float64 arithmetic (tf32 rounding of Z optional, as the kernel's one integer
add; or the fp32 kernels' 3xTF32 split of Z and the weights). Counts every shared-memory float a copy writes and every output float stored and read,
with the thread that did it, so the tests can check that each slice float is written once per
copy and each output float G times and read G - 1 times, all by one thread. D = 2 layers
(conv_contract_d2.cu) as a grid of one z plane: one row a channel in each y slice, vector blocks
of two components, up to four n-tiles of outputs."""

from __future__ import annotations

import numpy as np

import kernels
from bench import _cases
from kernels.cuda import _plan

LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3


def library_emulated(monkeypatch, why: str = "emulated") -> None:
    """The CUDA library as if built and registered, for tests whose FFI calls an emulation or a
    stand-in answers: every module's `registered` check passes; the coverage checks stay real."""
    from kernels import cuda
    from kernels.cuda import conv_contract, weight_gradient

    for module in (cuda, conv_contract, weight_gradient):
        monkeypatch.setattr(module, "registered", lambda: (True, why))


def x_window(x0: int, w: int, nx: int, d: int) -> tuple[int, int, int]:
    """common.cuh's XWindow of the window of w pixels from x0 in rows of nx: (x0, xl, xr), where the
    d wrap pixels before and after it start."""
    return x0, (x0 - d if x0 >= d else nx - d), (x0 + w if x0 + w < nx else 0)


def slice_copies(m: int, pitch: int, dst_c: int, src_c: int, zoff, volume: int, nx: int, planar: bool, d: int = 1,
                 win=None, rows: int = 3):
    """common.cuh's copy_channel_rows for one channel, as (destination, source, lane mask) lane
    vectors per cp.async: dst_c the row dz = -d's interior x = 0 in shared memory, src_c the
    channel's first float, zoff[k] row k's offset in a component's volume, nx the x window's pixels,
    d the dilation (d wrap pixels on each side), win its (x0, xl, xr) in the rows (`x_window`; None:
    the whole row). Minor: lane l copies floats l, l + 32, ... of the window's run and wrap floats
    w = l, l + 32, ... < 2 d m; planar (m = 3, or 2 in 2D): component i's run at i * volume, lane
    l's pixels to m x + i, and wrap floats w < 2 d m (component w % m). rows: the z rows a slice
    holds (3; 1 in 2D)."""
    x0, xl, xr = win if win is not None else (0, nx - d, 0)
    copies = []
    every = LANE >= 0
    wrap = d * m
    if not planar:
        row = nx * m
        k_full, k_rem = divmod(row, 32)
        for dz in range(rows):
            src, dst = src_c + zoff[dz] + LANE, dst_c + dz * pitch + LANE
            inner = src + x0 * m
            copies += [(dst + 32 * k, inner + 32 * k, every) for k in range(k_full)]
            if k_rem:
                copies.append((dst + 32 * k_full, inner + 32 * k_full, LANE < k_rem))
            for w0 in range(0, 2 * wrap, 32):
                w = w0 + LANE
                copies.append((dst + w0 - wrap, src + w0 + xl * m, w < wrap))
                copies.append((dst + w0 + row - wrap, src + w0 - wrap + xr * m, (w >= wrap) & (w < 2 * wrap)))
        return copies
    assert m in (2, 3), "only vector blocks have a planar layout"
    k_full, k_rem = divmod(nx, 32)
    for dz in range(rows):
        for i in range(m):
            src, dst = src_c + i * volume + zoff[dz] + x0 + LANE, dst_c + dz * pitch + m * LANE + i
            copies += [(dst + 32 * m * k, src + 32 * k, every) for k in range(k_full)]
            if k_rem:
                copies.append((dst + 32 * m * k_full, src + 32 * k_full, LANE < k_rem))
        for w0 in range(0, 2 * wrap, 32):
            w = w0 + LANE
            i, x = w % m, w // m
            src = src_c + i * volume + zoff[dz] + np.where(x < d, xl + x, xr + x - d)
            dst = dst_c + dz * pitch + m * np.where(x < d, x - d, nx + x - d) + i
            copies.append((dst, src, w < 2 * wrap))
    return copies


def to_physical(x1: np.ndarray, planar: bool) -> np.ndarray:
    """A vector block (..., c, nz, ny, nx, 3) (or (..., c, 1, ny, nx, 2) of a 2D layer) flattened
    in the kernel's memory order."""
    return (np.moveaxis(x1, -1, -4) if planar else x1).reshape(-1)


def from_physical(flat: np.ndarray, shape: tuple, planar: bool) -> np.ndarray:
    """`to_physical`'s inverse: the flat buffer as the logical (..., c, nz, ny, nx, m) block."""
    if not planar:
        return flat.reshape(shape)
    return np.moveaxis(flat.reshape(shape[:-4] + shape[-1:] + shape[-4:-1]), -4, -1)


def standard_spec(c_in: int, c_out: int, dilation: int = 1):
    """The standard D=3 {scalar, vector} layer (bench/_cases.fixture_spec's filters) with c_in
    input and c_out output channels per key (and rhs_dilation `dilation` on every axis): 32 inputs
    make the kernel's warp halves take two chunk rounds per phase."""
    data = np.load(_cases.FIXTURE_FILTERS)
    basis = lambda k: data[f"filters/D3M3/k{k}p0"]  # noqa: E731
    pairs = [(0, 0, basis(0)), (0, 1, basis(1)), (1, 0, basis(1)), (1, 1, basis(2))]
    return kernels.make_spec(3, [(0, 0, c_in), (1, 0, c_in)], [(0, 0, c_out), (1, 0, c_out)], pairs, True,
                             rhs_dilation=dilation)


CANONICAL_NAN = np.uint32(0x7FFFFFFF).view(np.float32)


def tf32_operand(x):
    """What the mma reads of a float the kernel computed (common.cuh's tf32_bits), as float64: the
    GPU's arithmetic returns every NaN as the canonical 0x7fffffff, and the mma truncates to tf32.
    (numpy keeps a NaN's payload, so without the first step a bit trick that loses the canonical
    NaN would pass here and fail on the GPU.)"""
    x = np.asarray(x, np.float64).astype(np.float32)
    return np.asarray(_plan.truncate_tf32(np.where(np.isnan(x), CANONICAL_NAN, x)), np.float64)


def split_tf32(x):
    """common.cuh's split_tf32 of float64 values taken as float32: [hi, lo], hi x rounded to tf32,
    lo the float32 remainder x - hi rounded to tf32 (as the mma reads it)."""
    x32 = np.asarray(x, np.float64).astype(np.float32)
    hi = _plan.round_tf32(x32)
    lo = _plan.round_tf32((x32 - hi).astype(np.float32))
    return [np.asarray(hi, np.float64), np.asarray(lo, np.float64)]


def mma_fragments(a, b, fp32=False):
    """mma.sync.m16n8k8 on the lanes' fragments, a (4, 32) and b (2, 32) (the A and B registers of
    every lane), as the kernels issue it: one product of the operands as given, or with `fp32`
    3xTF32's three in the kernels' order (a's remainder x b, a x b's remainder, a x b); the D
    fragment (4, 32) to add to the accumulators."""
    As, Bs = [], []
    for part in (split_tf32(a) if fp32 else [a]):
        A = np.zeros((16, 8))
        A[G, TID], A[G + 8, TID], A[G, TID + 4], A[G + 8, TID + 4] = part
        As.append(A)
    for part in (split_tf32(b) if fp32 else [b]):
        B = np.zeros((8, 8))
        B[TID, G], B[TID + 4, G] = part
        Bs.append(B)
    products = [(As[1], Bs[0]), (As[0], Bs[1]), (As[0], Bs[0])] if fp32 else [(As[0], Bs[0])]
    D = sum(A @ B for A, B in products)
    return np.stack([D[G, 2 * TID], D[G, 2 * TID + 1], D[G + 8, 2 * TID], D[G + 8, 2 * TID + 1]])


class Emulator:
    """One batch element: x0 (c0, nz, ny, nx), x1 (c1, nz, ny, nx, 3), packed weights; `n_groups`
    channel groups (None: the kernel's choice, `_plan.groups`). A D = 2 layer's x0 (c0, ny, nx), x1
    (c1, ny, nx, 2) and results (conv_contract_d2.cu) as a grid of one z plane: one row a channel in
    each y slice, vector blocks of two components, 16 or 32 outputs (two or four n-tiles); planar,
    channel groups at dilation 1 only, no residuals, not fp32 (what the 2D kernels are compiled for). Output
    groups: the results hold `out_channels` channels per key (None: the layer's o) of which this launch writes
    `first_channel` .. + o - 1, starting from `out` (the previous group's results, aliased) or, if
    None, from fresh memory. `planar`: the vector blocks x1 and y1 lie component-planar in memory
    (arrays in and out are logical; the emulated index arithmetic runs on the planar buffers).
    `residuals`: per key None or an array of the results' shape, read at the results' addresses
    and added by the first pass (`residual_reads` counts the reads)."""

    def __init__(self, spec, x0, x1, packed, strip: int, tf32: bool = True, offsets=None, n_groups=None,
                 out_channels=None, first_channel=0, out=None, planar=False, fp32=False, residuals=None):
        if spec.D == 2:  # one z plane
            assert planar and not fp32 and residuals is None, "the 2D kernels: planar, TF32, no residuals"
            x0, x1 = np.asarray(x0)[:, None], np.asarray(x1)[:, None]
            out = None if out is None else [np.asarray(a)[:, None] for a in out]
        self.dims = spec.D
        self.comps, self.rows = _plan.vector_comps(spec.D), _plan.slice_rows(spec.D)
        self.c0, self.nz, self.ny, self.nx = x0.shape
        self.lay = _plan.layout(spec, self.nx, n_groups)  # one group's channels and weights
        self.n_groups = self.lay.groups
        self.d = self.lay.dilation
        self.w = self.lay.nx  # a CTA's x window (the whole row where lay.windows is 1)
        self.groups, self.phases = _plan.phases(spec)
        self.o = spec.out_keys[0][2]
        self.nt = self.o // 8
        self.planar = planar
        self.x = [np.asarray(x0, np.float64).reshape(-1), to_physical(np.asarray(x1, np.float64), planar)]
        self.packed = np.asarray(packed, np.float64)
        self.strip, self.tf32, self.fp32 = strip, tf32, fp32  # fp32: the 3xTF32 kernels (packed unrounded)
        # the epilogue's `off` operand: o scalar offsets, then (o, comps) vector ones
        self.off = np.zeros((1 + self.comps) * self.o) if offsets is None else np.asarray(offsets, np.float64)
        c = self.lay.channels
        self.w_base = [(c[1] // _plan.CHUNK) * len(self.phases[0].tiles) * self.nt * 64, 0]
        self.o_total, self.o_base = out_channels or self.o, first_channel
        # fresh outputs are NaN until stored, so a read before the first store shows
        pixels = self.o_total * self.nz * self.ny * self.nx
        self.out = ([np.full(pixels, np.nan), np.full(pixels * self.comps, np.nan)] if out is None else
                    [np.array(out[0], np.float64).reshape(-1), to_physical(np.array(out[1], np.float64), planar)])
        self.out_writes = [np.zeros(a.size, int) for a in self.out]
        self.out_reads = [np.zeros(a.size, int) for a in self.out]
        self.out_thread = [np.full(a.size, -1) for a in self.out]  # (CTA, thread) of every access
        residuals = residuals or (None, None)
        self.res = [None if residuals[0] is None else np.asarray(residuals[0], np.float64).reshape(-1),
                    None if residuals[1] is None else to_physical(np.asarray(residuals[1], np.float64), planar)]
        self.residual_reads = [None if r is None else np.zeros(r.size, int) for r in self.res]

    # ---- load_slice ---------------------------------------------------------------------------
    def load_slice(self, key, slot, z, yy, writes, grp=0, x0=0):
        lay, nx = self.lay, self.nx
        m, P = (self.comps if key else 1), lay.pitch[key]
        planar = self.planar and key == 1
        run, C, warps = (nx if planar else nx * m), lay.channels[key], self.w // 8
        win = x_window(x0, self.w, nx, self.d)
        zz = [(z - self.d) % self.nz, z, (z + self.d) % self.nz]
        plane = self.ny * run
        zoff = [zz[k] * plane + yy * run for k in range(3)]
        volume, channel = self.nz * plane, m * self.nz * self.ny * nx
        base = lay.region[key] + self.d * m  # interior x = 0 of row 0
        for warp in range(warps):
            for c in range(warp, C, warps):
                dst_c, src_c = base + lay.chan(key, c), (grp * C + c) * channel  # the group's channel c
                for dst, src, mask in slice_copies(m, P, dst_c, src_c, zoff, volume, self.w, planar, self.d, win,
                                                   self.rows):
                    np.add.at(writes, dst[mask], 1)
                    slot[dst[mask]] = self.x[key][src[mask]]

    # ---- the kernel ---------------------------------------------------------------------------
    def run(self):
        """Every CTA (z, y phase, strip) of the batch element; returns the outputs (o, nz, ny, nx),
        (o, nz, ny, nx, 3) (2D: (o, ny, nx), (o, ny, nx, 2)) and the shared-memory write counts of
        every slice copy (the tests' coverage checks)."""
        copies = []
        d = self.d
        rows = self.ny // d
        for z in range(self.nz):
            for phase in range(d):
                for j0 in range(0, rows, self.strip):
                    for x0 in range(0, self.nx, self.w):
                        for grp in range(self.n_groups):
                            copies += self.cta(z, phase, j0, min(j0 + self.strip, rows), grp, x0)
        shape = (self.o_total, self.nz, self.ny, self.nx)
        y0, y1 = self.out[0].reshape(shape), from_physical(self.out[1], shape + (self.comps,), self.planar)
        if self.dims == 2:
            y0, y1 = y0[:, 0], y1[:, 0]
        return y0, y1, copies

    def group_weights(self, grp):
        """The kernel's copy of a group's packed weights into shared memory: float e (16-byte
        steps) from the group's range of the vector phase (e < its size) or of the scalar one."""
        wv_n = self.w_base[0]
        ws_n = self.lay.weight_floats - wv_n
        wv = grp * wv_n
        ws = self.n_groups * wv_n + grp * ws_n - wv_n
        s_w = np.full(self.lay.weight_floats, np.nan)
        for e in range(0, self.lay.weight_floats, 4):
            src = (wv if e < wv_n else ws) + e
            s_w[e : e + 4] = self.packed[src : src + 4]
        return s_w

    def cta(self, z, phase, j0, j1, grp=0, x0=0):
        """One pass of the CTA (z, rows y = phase + d j for j0 <= j < j1, the x window from x0) over
        channel group grp; the ring and the weights start over (the kernel's barrier between
        passes), the outputs do not."""
        self.x0 = x0
        sf, d = self.lay.slice_floats, self.d
        ring = np.full(3 * sf, np.nan)
        self.s_w = self.group_weights(grp)
        y0 = phase + d * j0
        self.cta_id = ((z * self.ny + y0) * self.nx + x0) * 256  # + thread: who touched an output float
        copies = []
        for k in range(3):
            for key in (1, 0):
                w = np.zeros(sf, int)
                yy = (y0 + (k - 1) * d) % self.ny
                self.load_slice(key, ring[k * sf : (k + 1) * sf], z, yy, w, grp, x0)
                copies.append((key, z, yy, w))
        segs = self.w // _plan.SEG
        warps = [(seg, half) for half in (0, 1) for seg in range(segs)]
        oldest = 0
        for j in range(j0, j1):
            y = phase + d * j
            mid = (oldest + 1) % 3
            newest = (mid + 1) % 3
            sl = [ring[s * sf : (s + 1) * sf] for s in (oldest, mid, newest)]
            nxt = ring[oldest * sf : (oldest + 1) * sf]
            more, y_next = j + 2 <= j1, (y + 2 * d) % self.ny
            acc = {w: np.zeros((len(self.groups), self.nt, 4, 32)) for w in warps}
            for ph in self.phases:
                n_chunks = self.lay.channels[ph.key] // _plan.CHUNK
                groups = _plan.row_groups(ph)
                first = [g for g in groups if g.dy == -1]
                rest = [g for g in groups if g.dy != -1]
                # chunk rounds: every warp's chunk h = half + 2 r; the MID hook of the last round
                for r in range(n_chunks // 2):
                    states = {w: self.chunk_start(ph, w, w[1] + 2 * r) for w in warps}
                    for w in warps:
                        self.walk(ph, states[w], first, sl)
                    if r == n_chunks // 2 - 1 and more:  # MID: __syncthreads, then the copy
                        w = np.zeros(sf, int)
                        self.load_slice(ph.key, nxt, z, y_next, w, grp, x0)
                        copies.append((ph.key, z, y_next, w))
                    for w in warps:
                        self.walk(ph, states[w], rest, sl)
                        self.mma(ph, states[w], acc[w])
            oldest = mid
            for seg in range(segs):
                self.store(seg, z, y, acc[(seg, 0)], acc[(seg, 1)], grp)
            if self.lay.stage_in_weights and j + 1 < j1:  # after a barrier: the vector weights again
                vector = self.lay.vector_weight_floats
                self.s_w[:vector] = self.group_weights(grp)[:vector]
        return copies

    def chunk_start(self, ph, warp, h):
        seg, _ = warp
        lay = self.lay
        m, P = (self.comps if ph.key else 1), lay.pitch[ph.key]
        c0 = h * _plan.CHUNK + TID
        c1 = c0 + 4
        px = (seg * _plan.SEG + _plan.lane_pixel(G, self.d)) * m + lay.region[ph.key]
        offs = [px + lay.chan(ph.key, c) for c in (c0, c1)]
        return {"h": h, "offs": offs, "m": m, "P": P, "xs": m * self.d, "mid": self.rows // 2,
                "zt": np.zeros((len(ph.tiles), 4, 32))}

    def walk(self, ph, st, groups, sl):
        # xs: floats between a row read's four x (kXs: the pixel's floats times the dilation); mid:
        # the rows before row dz = 0 in a slice (kMid: 1, or 0 where a slice holds one row)
        P, zt, xs, mid = st["P"], st["zt"], st.get("xs", st["m"]), st.get("mid", 1)
        for grp in groups:
            u = {}
            for dz in grp.dzs:  # u[dz][ch][s]
                u[dz] = np.stack([[sl[grp.dy + 1][off + (dz + mid) * P + grp.i + s * xs] for s in range(4)]
                                  for off in st["offs"]])
            zc = {0: u.get(0)}
            for zk in grp.zc:
                zc[zk] = u[-1] + u[1] if zk == 1 else u[1] - u[-1]
            for t, zk, xk, coef in grp.uses:
                zv = zc[zk]
                if xk == 0:
                    val = zv[:, 1:3]
                elif xk == 1:
                    val = zv[:, 0:2] + zv[:, 2:4]
                else:
                    val = zv[:, 2:4] - zv[:, 0:2]
                # A fragment order: (p 0, ch 0), (p 1, ch 0), (p 0, ch 1), (p 1, ch 1)
                zt[t] += coef * np.stack([val[0, 0], val[0, 1], val[1, 0], val[1, 1]])

    def mma(self, ph, st, acc):
        n_t = len(ph.tiles)
        # load_b<NT>: a lane's 2 NT floats from kLaneB lane on, at 4 n-tiles two float4s with n-tiles
        # 2, 3 128 floats after 0, 1 (pack_weights' n_hi)
        lane_b = 4 if self.nt == 4 else 2 * self.nt
        for t, tile in enumerate(ph.tiles):
            a = st["zt"][t]  # fp32: as the kernel holds it, split at the mma
            a = tf32_operand(a) if self.tf32 and not self.fp32 else a
            for n in range(self.nt):
                idx = (self.w_base[ph.key] + st["h"] * n_t * self.nt * 64 + lane_b * LANE + t * self.nt * 64
                       + 128 * (n >> 1) + 2 * (n & 1))
                acc[tile.group, n] += mma_fragments(a, np.stack([self.s_w[idx], self.s_w[idx + 1]]), self.fp32)

    def store(self, seg, z, y, acc0, acc1, grp=0):
        """The halves' meeting in the staging area and the segment's 16-byte stores: the first
        group's with the bias offsets, a later one's added to what the previous pass stored
        (loaded by each thread before the halves meet, as the kernel does)."""
        o, s0, s1 = self.o, *_plan.stage_pitch(self.dims)
        m = self.comps
        kv = 4 * m  # float4s of an output's 16 vector pixels (kV)
        o_rows = self.nz * self.ny
        row = self.o_base * o_rows + z * self.ny + y  # (o = o_base, z, y) of one batch element
        segs = self.w // _plan.SEG
        x = self.x0 + seg * _plan.SEG  # the segment's first pixel in the row
        # thread t = half * 32 + lane of the segment (warp (half, seg)): its float4 f = t + 64 i
        # of the row, scalar f < 4 o at dst0(f), vector f < kv o at dst1(f)
        dst0 = lambda f: (row + (f >> 2) * o_rows) * self.nx + x + 4 * (f & 3) + np.arange(4)  # noqa: E731
        if self.planar:  # output o's float4 r: component r // 4, pixels 4 (r % 4) ..
            dst1 = lambda f: ((((self.o_base + f // kv) * m + f % kv // 4) * o_rows + z * self.ny + y) * self.nx  # noqa: E731
                              + x + 4 * (f % 4) + np.arange(4))
        else:
            dst1 = lambda f: (row + (f // kv) * o_rows) * m * self.nx + m * x + 4 * (f % kv) + np.arange(4)  # noqa: E731
        thread = lambda t: self.cta_id + ((t >> 5) * segs + seg) * 32 + (t & 31)  # noqa: E731
        prev = {}
        if grp > 0:
            for t in range(64):
                for key, dst, n in ((0, dst0, o * 4), (1, dst1, o * kv)):
                    for f in range(t, n, 64):
                        prev[key, f] = self.load(key, dst(f), grp, thread(t))
        if self.lay.stage_in_weights:  # over the vector phase's weights, which the next row copies in again
            at = seg * o * (s0 + s1)
            assert at + o * (s0 + s1) <= self.lay.vector_weight_floats
            stage = self.s_w[at : at + o * (s0 + s1)]
            stage[:] = np.nan
        else:
            stage = np.full(o * (s0 + s1), np.nan)
        frag = lambda q, n, k: ((q * self.nt + n) * 4 + k) * 32 + LANE  # noqa: E731
        assert len(self.groups) * self.nt * 4 * 32 <= stage.size
        for q in range(len(self.groups)):  # half 1: partials in fragment order
            for n in range(self.nt):
                for k in range(4):
                    stage[frag(q, n, k)] = acc1[q, n, k]
        total = np.zeros_like(acc0)
        for q in range(len(self.groups)):  # half 0 reads all of them (then __syncwarp) ...
            for n in range(self.nt):
                for k in range(4):
                    total[q, n, k] = acc0[q, n, k] + stage[frag(q, n, k)]
        stage[:] = np.nan  # ... so nothing of the partials may be read after its own stores
        for q, (blk, comp) in enumerate(self.groups):
            for n in range(self.nt):
                for k in range(4):
                    oo, xx = n * 8 + 2 * TID + (k & 1), _plan.lane_pixel(G, self.d) + self.d * (k >> 1)
                    if blk == 0:
                        at = oo * s0 + xx
                    else:
                        at = o * s0 + oo * s1 + (_plan.SEG * comp + xx if self.planar else 3 * xx + comp)
                    assert len(set(at.tolist())) == 32 and np.isnan(stage[at]).all()  # each float once
                    stage[at] = total[q, n, k]
        for t in range(64):
            for f in range(t, o * 4, 64):
                oo, x4 = f >> 2, f & 3
                v = stage[oo * s0 + 4 * x4 + np.arange(4)]
                self.put(0, dst0(f), v + (self.off[oo] + self.residual(0, dst0(f)) if grp == 0 else prev[0, f]), grp,
                         thread(t))
            for f in range(t, o * kv, 64):
                oo, x4 = f // kv, f % kv
                if self.planar:  # four pixels of one component
                    comps = np.full(4, x4 // 4)
                else:
                    j = x4 % 3  # the kernel's component of float 4 x4 of the row (4 = 1 mod 3; 3D only)
                    comps = np.array([j, (j + 1) % 3, (j + 2) % 3, j])
                v = stage[o * s0 + oo * s1 + 4 * x4 + np.arange(4)]
                self.put(1, dst1(f), v + (self.off[o + m * oo + comps] + self.residual(1, dst1(f)) if grp == 0
                                          else prev[1, f]), grp, thread(t))

    def residual(self, key, dst):
        """The first pass's read of a key's residual at an output float4's addresses (0 without one)."""
        if self.res[key] is None:
            return 0.0
        self.residual_reads[key][dst] += 1
        return self.res[key][dst]

    def load(self, key, dst, grp, thread):
        """A later pass's read of an output float4: what this thread stored there in the
        previous pass (and nobody else since)."""
        assert (self.out_thread[key][dst] == thread).all(), "an output float read by a thread that did not store it"
        assert (self.out_writes[key][dst] == grp).all(), "a pass read a float its predecessor did not store"
        self.out_reads[key][dst] += 1
        return self.out[key][dst].copy()

    def put(self, key, dst, v, grp, thread):
        owner = self.out_thread[key][dst]
        assert ((owner == -1) | (owner == thread)).all(), "an output float stored by two threads"
        assert (self.out_writes[key][dst] == grp).all()  # once per pass
        self.out_thread[key][dst] = thread
        self.out_writes[key][dst] += 1
        self.out[key][dst] = v
