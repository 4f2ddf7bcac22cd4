"""weight_gradient.cu's index arithmetic and arithmetic in numpy, lane by lane, for the CPU tests:
the slice copies on the weight gradient's row layout (the CTA's 16 channels of each block), the
gY rows staged one row ahead into two buffers, the three barriers of a row and the commit groups
they wait for (a copy's destination reads NaN from its issue to the wait that lands it, so a
read of a slot being refilled, or of a row not yet landed, poisons the result), the passes' walk
on the transposed lane mapping (the forward emulation's `walk`, its channel pair the k-step
pair), the A fragments read from the staged gY at a row's start, the mma into per-weight accumulators, the segments'
reduction in shared memory and the per-CTA partials, and each thread's share of the cotangent sums
(`GySum`) read from the same staged rows and added up at the end through the freed gY buffers; then
XLA's sum over the CTAs, `_dw_plan.unpack` and `unpack_sums`. Vectorised over the 32 lanes of a warp, float64 arithmetic (both operands as tf32
operands, truncated, optional). D = 2 layers (weight_gradient_d2.cu) as a grid of one z plane: one
row a channel in each y slice, vector blocks of two components, and up to two m-tiles of outputs."""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

import kernels
from bench import _cases
from conftest import float64

from _conv_cuda_emulate import Emulator, mma_fragments, slice_copies, tf32_operand, to_physical, x_window
from kernels.cuda import _dw_plan, _plan
from kernels.cuda.weight_gradient import TRUNCATION_SCALE

LANE = np.arange(32)
G, TID = LANE >> 2, LANE & 3
SEG, CH = _plan.SEG, _dw_plan.CHANNELS


def reference_dw(spec, xs, ws, cots):
    """dW of the batch (weights shared) by jax.vjp of `reference`, in float64 (jit: eager
    dispatch of the reference's einsums costs seconds)."""

    def vjp(x64, w64, c64):
        run = lambda ws: jax.vmap(lambda x: kernels.conv_contract(spec, x, ws, backend="reference"))(x64)  # noqa: E731
        return jax.vjp(run, w64)[1](tuple(c64))[0]

    with float64():
        x64, w64, c64 = ([jnp.asarray(np.asarray(a), jnp.float64) for a in group] for group in (xs, ws, cots))
        return [np.asarray(g) for g in jax.jit(vjp)(x64, w64, c64)]


def rel(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


def check_entry_point_batches(monkeypatch, spec, spatial, strip: int, planar: bool):
    """weight_gradient_and_sums with the FFI call replaced by the emulation (`emulated_dw_call`): the
    layer's target (the 2D one for D = 2), the vector blocks asked for in `planar`'s layout and `geom`
    the compiled layout's; under vmap one call for the batch of 3 (broadcast_all), one dW per
    example in the weights' layout, their sum the VJP of the shared weights; the sums per example."""
    from kernels.cuda import _ffi
    from kernels.cuda import conv_contract as cuda_entry
    from kernels.cuda import weight_gradient as wg

    vector = (cuda_entry.PLANAR_VECTOR if spec.D == 3 else cuda_entry.PLANAR_VECTOR_2D) if planar else None
    calls = []

    def ffi_call(target, shape, vmap_method, input_layouts):
        assert target == (_ffi.DW_TARGET if spec.D == 3 else _ffi.DW_TARGET_2D) and vmap_method == "broadcast_all"
        assert list(input_layouts) == [None, vector, None, vector]

        def record(geom):
            assert list(geom) == wg.geometry(spec, _plan.kernel_spatial(spec, spatial), strip, planar=planar)
            calls.append(geom)

        return emulated_dw_call(spec, shape, record)

    monkeypatch.setattr(jax.ffi, "ffi_call", ffi_call)
    monkeypatch.setattr(wg, "registered", lambda: (True, "the emulation stands in for the library"))
    xs, ws, cots = _cases.spec_operands(spec, spatial, 3, seed=10)
    got, sums = jax.vmap(lambda x, g: wg.weight_gradient_and_sums(spec, x, g, strip=strip))(xs, cots)
    assert len(calls) == 1
    for g, w, want in zip(got, ws, reference_dw(spec, xs, ws, cots)):
        assert g.shape == (3,) + w.shape and g.dtype == jnp.float32
        # the emulation's sums are exact; the entry point scales them for the kernel's truncation
        assert rel(jnp.sum(g, axis=0) / wg.TRUNCATION_SCALE, want) <= 1e-5
    for s, cot in zip(sums, cots):  # per batch element, unscaled: the sums meet no tf32 operand
        want = np.asarray(cot, np.float64).sum(axis=tuple(range(2, 2 + spec.D)))
        assert s.shape == want.shape and s.dtype == jnp.float32 and rel(s, want) <= 1e-6
    return xs, cots, got


def unpack_matches_the_fragment_order(spec):
    """`_dw_plan.unpack` of random partials (2 channel groups) puts fragment k of m-tile m of lane
    (g, tid) at o = 16 m + g + 8 (k >> 1), c = 16 group + 8 half + 2 tid + (k & 1)."""
    rng = np.random.default_rng(1)
    n_w, o_layer = len(_dw_plan.weights(spec)), spec.out_keys[0][2]
    n_m = _dw_plan.m_tiles(o_layer)
    part = rng.standard_normal((2, 2, n_w, n_m, 4, 32))
    got = _dw_plan.unpack(spec, part)
    index = {w: k for k, w in enumerate(_dw_plan.weights(spec))}
    for t, pair in enumerate(spec.pairs):
        assert got[t].shape == (o_layer, 32, pair.basis.n_filters)
        for f in range(pair.basis.n_filters):
            for kg in range(2):
                for half in range(2):
                    for m in range(n_m):
                        for k in range(4):
                            o, c = 16 * m + G + 8 * (k >> 1), 16 * kg + 8 * half + 2 * TID + (k & 1)
                            keep = o < o_layer
                            assert np.array_equal(got[t][o[keep], c[keep], f], part[kg, half, index[t, f], m, k][keep])


def emulated_partials(spec, ops, geom, shape):
    """The weight-gradient FFI call's result emulated from what the kernel gets (a pure_callback
    host, `broadcast_all` batching): operands x0, x1, gy0, gy1 with any leading batch axes, `geom`
    (strip, layout, first channel, precision), `shape` the unbatched result's. TF32 calls are
    emulated exactly (no truncation: the index arithmetic alone), fp32 ones with the kernel's split."""
    lead = ops[0].shape[: -1 - spec.D]
    flat = [np.asarray(a).reshape((-1,) + a.shape[len(lead):]) for a in ops]
    _, parts = DwEmulator(spec, *flat, int(geom[5]), tf32=False, first_channel=int(geom[12]),
                          planar=bool(geom[13]), fp32=bool(geom[16])).run()
    return parts.reshape(lead + shape.shape).astype(np.float32)


def emulated_dw_call(spec, shape, record=lambda geom: None):
    """A stand-in for the weight gradient's FFI call (what `jax.ffi.ffi_call(DW_TARGET, ...)`
    returns): `record(geom)` (a test's checks of the call), then `emulated_partials` through a
    pure_callback batched like the kernel (`broadcast_all`)."""

    def call(x0, x1, g0, g1, geom):
        record(geom)
        host = lambda *ops: emulated_partials(spec, ops, geom, shape)  # noqa: E731
        return jax.pure_callback(host, shape, x0, x1, g0, g1, vmap_method="broadcast_all")

    return call


class DwEmulator:
    """A batch: x0 (B, c, nz, ny, nx), x1 (B, c, nz, ny, nx, 3), gy0 (B, O, nz, ny, nx), gy1 (B, O,
    nz, ny, nx, 3) (a D = 2 layer's without the nz axis, vectors of 2 components) of which the
    launch reads output channels first_channel .. + o - 1 (o the layer's); `planar`: the vector
    blocks lie component-planar in memory (arrays in are logical)."""

    def __init__(self, spec, x0, x1, gy0, gy1, strip: int, tf32: bool = True, first_channel: int = 0,
                 planar: bool = False, fp32: bool = False):
        if spec.D == 2:  # one z plane
            x0, x1, gy0, gy1 = (np.asarray(a)[:, :, None] for a in (x0, x1, gy0, gy1))
        self.batch, self.c, self.nz, self.ny, self.nx = x0.shape
        self.comps, self.rows = _plan.vector_comps(spec.D), _plan.slice_rows(spec.D)
        self.sum_channels = _dw_plan.sum_channels(spec.D)
        self.o, self.o_total, self.o_base = spec.out_keys[0][2], gy0.shape[1], first_channel
        self.planar = planar
        # fp32: the 3xTF32 kernels (gY and Z split into rounded tf32 parts at each mma), no scale
        self.spec, self.strip, self.tf32, self.fp32 = spec, strip, tf32 and not fp32, fp32
        self.lay = _dw_plan.layout(spec, self.nx)
        self.d = self.lay.dilation
        self.w = self.lay.nx  # a CTA's x window (the whole row where lay.windows is 1)
        self.passes = _dw_plan.passes(spec)
        self.n_w = len(_dw_plan.weights(spec))
        self.mt = self.lay.m_tiles
        self.x = [np.asarray(x0, np.float64).reshape(-1), to_physical(np.asarray(x1, np.float64), planar)]
        self.gy = [np.asarray(gy0, np.float64).reshape(-1), to_physical(np.asarray(gy1, np.float64), planar)]
        self.gp = _dw_plan.gy_pitch(self.w, self.comps)
        self.sf, self.gf = self.lay.slice_floats, self.lay.gy_floats

    # ---- cp.async: issue (destination NaN while in flight), commit, wait --------------------------
    def issue(self, dst, src_buf, src):
        self.smem[dst] = np.nan
        self.group.append((dst, src_buf[src]))

    def commit(self):
        self.pending.append(self.group)
        self.group = []

    def wait(self, n):
        while len(self.pending) > n:
            for dst, vals in self.pending.pop(0):
                self.smem[dst] = vals

    # ---- copies -----------------------------------------------------------------------------------
    def load_slice(self, key, slot, b, kg, z, yy, x0=0):
        lay, nx = self.lay, self.nx
        m, P, skew = (self.comps if key else 1), lay.pitch[key], lay.skew[key]
        planar = self.planar and key == 1
        run, warps = (nx if planar else nx * m), self.w // 8
        win = x_window(x0, self.w, nx, self.d)
        zz = [(z - self.d) % self.nz, z, (z + self.d) % self.nz]
        plane = self.ny * run
        zoff = [zz[k] * plane + yy * run for k in range(3)]
        volume, channel = self.nz * plane, m * self.nz * self.ny * nx
        base = slot + lay.region[key] + self.d * m
        for warp in range(warps):
            for c in range(warp, CH, warps):
                dst_c, src_c = base + self.rows * c * P + skew[c & 7], (b * self.c + kg * CH + c) * channel
                for dst, src, mask in slice_copies(m, P, dst_c, src_c, zoff, volume, self.w, planar, self.d, win,
                                                   self.rows):
                    self.issue(dst[mask], self.x[key], src[mask])

    def load_gy(self, dst, b, z, y, x0=0):
        """The gY row y of the x window of w pixels from x0 (rows of nx)."""
        nx, w, o, (p0, p1) = self.nx, self.w, self.o, self.gp
        first, o_rows, zy = b * self.o_total + self.o_base, self.nz * self.ny, z * self.ny + y
        four = np.arange(4)
        for f in range(o * w // 4):  # one thread's 16-byte copy each
            oo, q = divmod(f, w // 4)
            self.issue(dst + oo * p0 + 4 * q + four, self.gy[0], ((first + oo) * o_rows + zy) * nx + x0 + 4 * q + four)
        m = self.comps
        for f in range(o * m * w // 4):
            oo, q = divmod(f, m * w // 4)  # float4 q of output oo's m w floats
            if self.planar:  # component q // (w / 4), pixels 4 (q % (w / 4)) ..
                src = ((m * (first + oo) + q // (w // 4)) * o_rows + zy) * nx + x0 + 4 * (q % (w // 4))
            else:
                src = ((first + oo) * o_rows + zy) * m * nx + m * x0 + 4 * q
            self.issue(dst + self.sum_channels * p0 + oo * p1 + 4 * q + four, self.gy[1], src + four)

    # ---- the kernel -------------------------------------------------------------------------------
    def row_ops(self):
        """A warp's row in program order: ("walk", pass, row group), ("mid", key) after the dy = -1
        rows of a phase's last pass, ("mma", pass)."""
        ops = []
        for k, p in enumerate(self.passes):
            mid = not p.last
            for grp in p.groups:
                if grp.dy > -1 and not mid:
                    ops.append(("mid", p.key))
                    mid = True
                ops.append(("walk", k, grp))
            if not mid:
                ops.append(("mid", p.key))
            ops.append(("mma", k))
        return ops

    def run(self):
        """Per pair, dW (B, o, c, F), and the per-CTA partials (B, CTAs, partial floats)."""
        strips, nz, groups = _dw_plan.grid(self.spec, (self.nz, self.ny, self.nx), self.strip)
        parts = np.zeros((self.batch, groups, nz * strips, self.lay.result_floats))
        d, rows, windows = self.d, self.ny // self.d, self.lay.windows
        for b in range(self.batch):
            for kg in range(groups):
                for z in range(nz):
                    for s in range(strips):  # grid x: x window s % windows, then y phase, then strip
                        xw, rest = s % windows, s // windows
                        j0 = rest // d * self.strip
                        parts[b, kg, z * strips + s] = self.cta(b, kg, z, rest % d, j0, min(j0 + self.strip, rows),
                                                                xw * self.w)
        n_dw = self.lay.partial_floats
        summed = parts[..., :n_dw].sum(axis=2).reshape(self.batch, groups, 2, self.n_w, self.mt, 4, 32)
        if self.tf32:  # weight_gradient_call's scale: both operands' truncation bias out
            summed = summed * TRUNCATION_SCALE
        dws = [_dw_plan.unpack(self.spec, summed[b]) for b in range(self.batch)]
        self.sums = _dw_plan.unpack_sums(self.o, parts[:, 0, :, n_dw:].sum(axis=1), self.spec.D)
        return tuple(np.stack(d) for d in zip(*dws)), parts.reshape(self.batch, groups * nz * strips, -1)

    def cta(self, b, kg, z, phase, j0, j1, x0=0):
        """The CTA of rows y = phase + d j, j0 <= j < j1, in the x window from x0."""
        sf, gf, d = self.sf, self.gf, self.d
        self.smem = np.full(self.lay.smem_bytes // 4, np.nan)
        self.group, self.pending = [], []
        gy = 3 * sf
        y0 = phase + d * j0
        for k in range(3):
            self.load_slice(1, k * sf, b, kg, z, (y0 + (k - 1) * d) % self.ny, x0)
            self.load_slice(0, k * sf, b, kg, z, (y0 + (k - 1) * d) % self.ny, x0)
        self.load_gy(gy + (j0 & 1) * gf, b, z, y0, x0)
        self.commit()
        self.wait(0)
        segs = self.w // SEG
        warps = [(seg, half) for half in (0, 1) for seg in range(segs)]
        acc = {w: np.zeros((self.n_w, self.mt, 4, 32)) for w in warps}
        sum_at, sum_step = self.sum_shares()
        gsum = np.zeros(len(sum_at))
        ops = self.row_ops()
        oldest = 0
        for j in range(j0, j1):
            y = phase + d * j
            mid, newest = (oldest + 1) % 3, (oldest + 2) % 3
            # views of the ring: reads see the NaN of copies in flight
            sl = [self.smem[s * sf : (s + 1) * sf] for s in (oldest, mid, newest)]
            more, y_next = j + 2 <= j1, (y + 2 * d) % self.ny
            if j > j0:
                self.wait(1)
            if j + 1 < j1:
                self.load_gy(gy + ((j + 1) & 1) * gf, b, z, y + d, x0)
            self.commit()
            # each warp's A fragments of gY row y, read once at the row's start
            states = {w: {"a": self.fragments(w[0], gy + (j & 1) * gf)} for w in warps}
            if kg == 0:  # each thread's kO pixels of its sum, from the same staged row
                k = np.arange(self.o)
                gsum += self.smem[gy + (j & 1) * gf + sum_at[:, None] + sum_step[:, None] * k].sum(axis=1)
            start = 0
            while start < len(ops):  # the warps run up to the next barrier (a MID) in any order
                stop = next((i for i in range(start, len(ops)) if ops[i][0] == "mid"), len(ops))
                for w in warps:
                    for op in ops[start:stop]:
                        self.step(op, w, states[w], sl, acc[w])
                if stop < len(ops):
                    key = ops[stop][1]
                    if key == 0:
                        self.wait(2)
                    if more:
                        self.load_slice(key, oldest * sf, b, kg, z, y_next, x0)
                    self.commit()
                start = stop + 1
            oldest = mid
        self.wait(0)
        # the segments' accumulators meet from float 0, [seg][half][w][m][k][lane] (over the ring, and
        # past it in 2D at 32 outputs), summed in segment order
        part = self.lay.partial_floats
        self.smem[: segs * part] = np.nan
        for (seg, half), a in acc.items():
            w, m, k = np.arange(self.n_w)[:, None, None, None], np.arange(self.mt)[:, None, None], np.arange(4)[:, None]
            at = seg * part + (((half * self.n_w + w) * self.mt + m) * 4 + k) * 32 + LANE
            assert np.isnan(self.smem[at]).all()
            self.smem[at] = a
        # the threads' sums after them (in 3D the freed gY buffers, past the ring)
        sums = self.lay.reduction_floats
        assert sums == max(3 * sf, segs * part) and sums + len(gsum) <= len(self.smem)
        self.smem[sums : sums + len(gsum)] = gsum
        out = self.smem[:part].copy()
        for seg in range(1, segs):
            out += self.smem[seg * part : (seg + 1) * part]
        return np.concatenate([out, self.sum_totals(self.smem[sums : sums + len(gsum)])])

    def sum_shares(self):
        """Per thread of the CTA that sums ((1 + D) w of its 4 w), the first float of its share of the cotangent sums
        in a staged gY row and the floats between its kO pixels: sum s = t // (w / kO) (kO scalar
        channels, then kO x D vector channel components), pixels kO (t % (w / kO)) on."""
        o, w, (p0, p1), m = self.o, self.w, self.gp, self.comps
        per = w // o
        t = np.arange((1 + m) * w)  # GySum's kThreads: all 4 w threads in 3D, the first 3 w in 2D
        s, x = t // per, (t % per) * o
        oo, j = (s - o) // m, (s - o) % m
        vec = self.sum_channels * p0 + oo * p1 + (j * w + x if self.planar else m * x + j)
        at = np.where(s < o, s * p0 + x, vec)
        step = np.where((s < o) | self.planar, 1, m)
        return at, step

    def sum_totals(self, part):
        """The result's `sum_floats` sums from the threads' partials, each in thread order; 0 past o."""
        per = self.w // self.o
        out = np.zeros(_dw_plan.sum_floats(self.spec.D))
        n = self.sum_channels
        for e in range(len(out)):
            oo, s = (e, e) if e < n else ((e - n) // self.comps, self.o + e - n)
            if oo < self.o:
                out[e] = sum(part[s * per + q] for q in range(per))
        return out

    def step(self, op, warp, st, sl, acc):
        seg, half = warp
        if op[0] == "walk":
            _, k, grp = op
            p = self.passes[k]
            if k not in st:
                m, P, skew = (self.comps if p.key else 1), self.lay.pitch[p.key], self.lay.skew[p.key]
                c = half * _plan.CHUNK + G
                off0 = (self.lay.region[p.key] + self.rows * c * P + np.asarray(skew)[c & 7]
                        + (seg * SEG + _dw_plan.k_pixel(TID, self.d)) * m)
                st[k] = {"offs": [off0, off0 + _dw_plan.kstep_shift(self.d) * m], "m": m, "P": P, "xs": m * self.d,
                         "mid": self.rows // 2, "zt": np.zeros((len(p.tiles), 4, 32))}
            Emulator.walk(None, None, st[k], [grp], sl)
        else:
            self.mma(self.passes[op[1]], st[op[1]]["zt"], st["a"], acc)

    def operand(self, v):
        return tf32_operand(v) if self.tf32 else v

    def fragments(self, seg, gyr):
        """a[q][s][m] = (a0, a1, a2, a3) of output group q, k-step s, m-tile m: gY_q[o][x] at o =
        16 m + g, + 8 (rows >= o zero), x = the k-step's pixel of B row tid (2 tid + 8 s at d = 1)
        and x + d, read from the staged row."""
        p0, p1 = self.gp
        d, mc = self.d, self.comps
        a = np.zeros((1 + mc, 2, self.mt, 4, 32))
        for s in range(2):
            x = seg * SEG + _dw_plan.k_pixel(TID, d) + _dw_plan.kstep_shift(d) * s
            for r8 in range(self.o // 8):  # the launch's rows of 8 outputs: m-tile r8 // 2, half r8 % 2
                m, r = divmod(r8, 2)
                o = 16 * m + G + 8 * r
                a[0, s, m, r], a[0, s, m, 2 + r] = self.smem[gyr + o * p0 + x], self.smem[gyr + o * p0 + x + d]
                for j in range(mc):
                    vec = gyr + self.sum_channels * p0 + o * p1
                    at = vec + j * self.w + x if self.planar else vec + mc * x + j  # pixel x's component j
                    step = d if self.planar else mc * d
                    a[1 + j, s, m, r], a[1 + j, s, m, 2 + r] = self.smem[at], self.smem[at + step]
        return self.operand(a)

    def mma(self, p, zt, a, acc):
        z = self.operand(zt)
        for t, (q, w) in enumerate(zip(p.group, p.weight)):
            for s in range(2):
                for m in range(self.mt):
                    acc[w][m] += mma_fragments(a[q, s, m], z[t, 2 * s : 2 * s + 2], self.fp32)
