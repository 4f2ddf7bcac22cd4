// Shared by the CUDA ConvContract kernels (forward_kernel.cuh, weight_gradient.cu): the tf32 mma,
// cp.async, and the generated stencil walk's hooks. Included inside each file's anonymous
// namespace.
#pragma once

// The generated tables' index of dilation D (_plan.DILATIONS: 1, 2, 4, 8).
constexpr int dil_index(int D) { return D == 1 ? 0 : D == 2 ? 1 : D == 4 ? 2 : 3; }

// Pixels a warp takes along x: the forward's mma M, the weight gradient's two k-steps of 8.
constexpr int kSeg = 16;

// The checks of a launch's rows that the forward and the weight gradient decode alike from their
// `geom` (window_at and dilation_at: the entries' indices, for the messages): the x window of
// `window` pixels against the rows' x extent `row`, the dilation, and the CTAs' strip against the
// grid's extents. An empty string, or why the call is refused.
inline std::string CheckRows(int window, int row, int window_at, int dilation, int dilation_at, int strip, int nz,
                             int ny) {
  if (window < 1 || row < window || row % window)
    return "the x window (`geom`[" + std::to_string(window_at) + "] = " + std::to_string(window) +
           ") must divide the x extent (" + std::to_string(row) + ")";
  if (row > window && window != 32 && window != 64) return "x windows must be 32 or 64 pixels wide";
  if (window % kSeg || window > 4 * kSeg) return "the x window must be 16, 32, 48 or 64";
  if (dilation != 1 && dilation != 2 && dilation != 4 && dilation != 8)
    return "the dilation (`geom`[" + std::to_string(dilation_at) + "] = " + std::to_string(dilation) +
           ") must be 1, 2, 4 or 8";
  if (strip < 1 || nz < 1 || ny < 1) return "strip, nz and ny must be >= 1";
  if (ny % dilation) return "ny must be a multiple of the dilation (a CTA's rows are one y phase)";
  return "";
}

// A launch's slice of output channels, base .. base + count - 1, within the `total` of `what`.
inline std::string CheckOutputSlice(int base, int count, int total, const char* what) {
  if (base < 0 || base % count || base + count > total)
    return "the launch's output channels (" + std::to_string(base) + " + " + std::to_string(count) +
           ") must be a whole group within the " + what + "' " + std::to_string(total);
  return "";
}

// The x (within a 16-pixel segment) of a lane's first pixel at dilation D, its second being x + D
// (_walk.lane_pixel): the forward's mma rows g and g + 8, the weight gradient's B rows tid and
// tid + 4 of k-step 0. A lane's four row reads x - D, x, x + D, x + 2D serve both pixels' taps.
template <int D>
__device__ __forceinline__ int lane_pixel(int g) { return 2 * D * (g / D) + g % D; }

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A float as the tf32 operand of an mma: its bits as they are. The tensor cores read the top 19
// bits, i.e. truncate toward zero, which keeps inf and every NaN the arithmetic makes. (Rounding by
// adding 0x1000 to the bits, one instruction, carried the canonical NaN 0x7fffffff into the sign
// bit: the mma read -0 and a NaN input vanished from the outputs. cvt.rna, NaN-safe, costs a
// compare and a predicated add.) Truncation's mean relative error, -2^-12 / ln 2 for log-uniform
// mantissas, is taken out where the operands meet (_plan.TF32_TRUNCATION_BIAS): the forward's
// packed weights carry 1 / (1 - bias), the weight gradient's dW 1 / (1 - bias)^2.
__device__ __forceinline__ uint32_t tf32_bits(float x) { return __float_as_uint(x); }

// x rounded to tf32, to nearest with ties away; inf and NaN kept (cvt.rna.tf32.f32).
__device__ __forceinline__ uint32_t tf32_round(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// 3xTF32's split of a float: hi, x rounded to tf32, and lo, the remainder x - hi (exact in fp32)
// rounded to tf32; hi + lo carries ~21 of x's 24 bits. A NaN stays NaN in both; an inf makes lo
// NaN (inf - inf), so an inf input reaches its outputs as NaN, still non-finite.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = tf32_round(x);
  lo = tf32_round(x - __uint_as_float(hi));
}

__device__ __forceinline__ void cp_async4(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(src) : "memory");
}

// 16 bytes, of which the first `bytes` (0, 4, .., 16) from src and the rest zeros (src 16-byte aligned)
__device__ __forceinline__ void cp_async16_zfill(float* dst, const float* src, int bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
}

// A hint that `ptr`'s 128-byte line will be read soon: into L2, no register, no wait.
__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Where a CTA's x window (NX pixels from x0 of a row of nx; the whole row where NX = nx) and its
// wrap come from: the interior x0 .. x0 + NX - 1, the kD pixels before it from xl = (x0 - kD) mod nx
// and the kD after it from xr = (x0 + NX) mod nx, each a contiguous run of the row (x0 is a
// multiple of NX >= 16 > kD).
struct XWindow {
  int x0, xl, xr;
};

// The three z rows (dz = -d, 0, d; d the dilation kD; kRows = 1: the one row of a 2D layer) of one
// channel of a y slice into shared memory, by one warp. dst: the row dz = -d's interior x = 0 in shared memory (row dz at + (dz / d
// + 1) kPitch, the wrap x = -d .. -1 and x = NX .. NX + d - 1 before and after the interior, kM
// floats a pixel); src: the channel's first float in global memory (x = 0 of its row); zoff[k]: row
// k's offset within one component's volume; win: the window's runs (XWindow). Components minor
// (kPlanar false): the interior is one run of NX kM floats; lane l copies floats l, l + 32, ... and
// the wrap floats w = l (and l + 32 where 2 d kM > 32), w < d kM before the interior, the next
// d kM after it. Component-planar (kPlanar, kM = 3 or 2): component i's row is a run at i * volume;
// lane l copies its pixels l, l + 32, ... of each component to kM x + i (stride kM floats: 32
// distinct banks for kM odd, 16 for kM = 2), and wrap floats w < 2 d kM: pixel w / kM (before) or
// w / kM - d (after) of component w % kM.
// Either way every address is a per-row base (+ lane) plus an immediate, and a warp's load of the
// interior is 128 consecutive bytes.
template <int NX, int kM, int kPitch, bool kPlanar, int kD = 1, int kRows = 3>
__device__ __forceinline__ void copy_channel_rows(float* dst, const float* src, const int (&zoff)[3], int volume,
                                                  int lane, const XWindow& win) {
  constexpr int kWrap = kD * kM;  // wrap floats on each side
  if constexpr (!kPlanar) {
    constexpr int kRow = NX * kM, kFull = kRow / 32, kRem = kRow % 32;
#pragma unroll
    for (int dz = 0; dz < kRows; ++dz) {
      const float* s = src + lane + zoff[dz];
      const float* si = s + win.x0 * kM;
      float* d = dst + lane + dz * kPitch;
#pragma unroll
      for (int k = 0; k < kFull; ++k) cp_async4(d + 32 * k, si + 32 * k);
      if (kRem && lane < kRem) cp_async4(d + 32 * kFull, si + 32 * kFull);
#pragma unroll
      for (int w0 = 0; w0 < 2 * kWrap; w0 += 32) {
        const int w = w0 + lane;
        if (w < kWrap) cp_async4(d + w0 - kWrap, s + w0 + win.xl * kM);
        else if (w < 2 * kWrap) cp_async4(d + w0 + kRow - kWrap, s + w0 - kWrap + win.xr * kM);
      }
    }
  } else {
    static_assert(kM == 3 || kM == 2, "only vector blocks have a planar layout here");
    constexpr int kFull = NX / 32, kRem = NX % 32;
#pragma unroll
    for (int dz = 0; dz < kRows; ++dz) {
#pragma unroll
      for (int i = 0; i < kM; ++i) {
        const float* s = src + i * volume + zoff[dz] + win.x0 + lane;
        float* d = dst + dz * kPitch + kM * lane + i;
#pragma unroll
        for (int k = 0; k < kFull; ++k) cp_async4(d + 32 * kM * k, s + 32 * k);
        if (kRem && lane < kRem) cp_async4(d + 32 * kM * kFull, s + 32 * kFull);
      }
#pragma unroll
      for (int w0 = 0; w0 < 2 * kWrap; w0 += 32) {
        const int w = w0 + lane, i = w % kM, x = w / kM;  // x < kD: pixel x - kD; else pixel NX + x - kD
        const float* s = src + i * volume + zoff[dz] + (x < kD ? win.xl + x : win.xr + x - kD);
        if (w < 2 * kWrap) cp_async4(dst + dz * kPitch + kM * (x < kD ? x - kD : NX + x - kD) + i, s);
      }
    }
  }
}

// A CTA's rows and x window (both kernels): grid x = x windows x y phases x strips. Rows y =
// phase + D j, j0 <= j < j1, of one phase (y mod D): with taps at y - D, y, y + D consecutive rows
// of a phase share two of their three slices; the window holds NX pixels from x0 (kWin; else the
// whole row, x0 = 0 at compile time); zz the z rows z - D, z, z + D.
template <int NX, int D, bool kWin>
struct CtaRows {
  int x0, phase, j0, j1, y0, ny, zz[3];

  __device__ __forceinline__ CtaRows(int windows, int strip, int nz, int ny_, int z) : ny(ny_) {
    const int xw = kWin ? blockIdx.x % windows : 0, rest = kWin ? blockIdx.x / windows : blockIdx.x;
    x0 = xw * NX, phase = rest % D, j0 = rest / D * strip, j1 = min(j0 + strip, ny / D), y0 = phase + D * j0;
    zz[0] = wrap(z - D % nz, nz), zz[1] = z, zz[2] = wrap(z + D % nz, nz);
  }
  __device__ __forceinline__ static int wrap(int v, int n) { return v < 0 ? v + n : (v >= n ? v - n : v); }  // v in [-n, 2n)
  __device__ __forceinline__ int wrap_y(int yy) const { return wrap(yy, ny); }
};

// Rows of channels first .. first + n - 1 of block x (kM floats a pixel, channels of nz x ny x nx
// pixels) for one y slice (row yy, z rows zz, the x window of NX pixels from x0) into shared
// memory, a warp per channel: channel c's row dz = -d's interior x = 0 at base + chan(c)
// (copy_channel_rows). The window's wrap runs are derived here, so a kernel keeps only x0 live;
// without kWin the row is the whole window (nx = NX, x0 = 0), all of it compile-time. kRings: the
// CTA's warps split into that many sets of NX / 8, each filling its own ring (the forward's twin
// rings), a set's warp w copying channels w, w + NX / 8, ... kRows: the z rows a slice holds (3; 1
// in 2D, where nz = 1).
template <int NX, int kM, int kPitch, bool kPlanar, int kD, bool kWin, int kRings = 1, int kRows = 3, class Chan>
__device__ __forceinline__ void copy_slice_channels(float* base, const float* x, size_t first, int n, int nz, int ny,
                                                    int nx_, int yy, const int (&zz)[3], int x0_, Chan chan) {
  constexpr int kWarps = NX / 8;
  const int nx = kWin ? nx_ : NX, x0 = kWin ? x0_ : 0;
  const XWindow win{x0, x0 >= kD ? x0 - kD : nx - kD, x0 + NX < nx ? x0 + NX : 0};
  const int lane = threadIdx.x & 31;
  const int run = kPlanar ? nx : nx * kM;  // floats of one row run
  const int plane = ny * run;              // floats of one (channel[, component], z) plane
  // offsets inside a channel's (component's) volume (32-bit: one channel of one batch element);
  // the 64-bit channel base once per channel
  const int zoff[3] = {zz[0] * plane + yy * run, zz[1] * plane + yy * run, zz[2] * plane + yy * run};
  const int volume = nz * plane;  // planar: one component's floats
  const size_t channel = (size_t)kM * nz * ny * nx;
#pragma unroll 1  // unrolled, ptxas rematerialises the slot addresses per copy (registers are scarce at MID)
  for (int c = kRings == 1 ? threadIdx.x >> 5 : (threadIdx.x >> 5) % kWarps; c < n; c += kWarps)
    copy_channel_rows<NX, kM, kPitch, kPlanar, kD, kRows>(base + chan(c), x + (first + c) * channel, zoff, volume, lane,
                                                          win);
}

// The generated walk's hooks (stencil_d3.inc, stencil_d2.inc, weight_gradient_d3.inc): ROW loads
// u[dz + 1] from the lane's row bases r0 / r1 per y slice (the channel pair in the forward, the
// k-step pair in the weight gradient; kXs floats between its four x reads; row dz at (dz + kMid)
// pitches, kMid 1 where a slice holds three z rows, 0 where it holds one), ZC / XC form the
// symmetric classes, NZ accumulates a Z tile.
#define GJ_ROW(dz, dy, i)                                                        \
  _Pragma("unroll") for (int s = 0; s < 4; ++s) {                                \
    u[(dz) + 1][0][s] = r0[(dy) + 1][((dz) + kMid) * kP + (i) + s * kXs];        \
    u[(dz) + 1][1][s] = r1[(dy) + 1][((dz) + kMid) * kP + (i) + s * kXs];        \
  }
#define GJ_Z(zk, ch, s) ((zk) == 0 ? u[1][ch][s] : zc[zk][ch][s])
#define GJ_ZC(zk)                                                                             \
  _Pragma("unroll") for (int ch = 0; ch < 2; ++ch) _Pragma("unroll") for (int s = 0; s < 4; ++s) \
    zc[zk][ch][s] = (zk) == 1 ? u[0][ch][s] + u[2][ch][s] : u[2][ch][s] - u[0][ch][s];
#define GJ_XC(zk, xk)                                                                           \
  _Pragma("unroll") for (int ch = 0; ch < 2; ++ch) _Pragma("unroll") for (int q = 0; q < 2; ++q) \
    xc[zk][xk][ch][q] = (xk) == 1 ? GJ_Z(zk, ch, q) + GJ_Z(zk, ch, q + 2) : GJ_Z(zk, ch, q + 2) - GJ_Z(zk, ch, q);
#define GJ_VAL(zk, xk, ch, q) ((xk) == 0 ? GJ_Z(zk, ch, (q) + 1) : xc[zk][xk][ch][q])
#define GJ_NZ(T, zk, xk, coef)                                  \
  zt[T][0] = fmaf(coef, GJ_VAL(zk, xk, 0, 0), zt[T][0]);        \
  zt[T][1] = fmaf(coef, GJ_VAL(zk, xk, 0, 1), zt[T][1]);        \
  zt[T][2] = fmaf(coef, GJ_VAL(zk, xk, 1, 0), zt[T][2]);        \
  zt[T][3] = fmaf(coef, GJ_VAL(zk, xk, 1, 1), zt[T][3]);
