// The parity-blocked convolution's forward on mma.sync (XLA FFI target "ginjax_cuda_parity_forward"),
// for D = 3 layers with 3x3x3 filters: the plan, the filter's rewrite and the packing are
// kernels/triton/_parity_plan.py's and parity_conv.py's; this kernel replaces the Triton forward
// (and, on the transposed plan, the input gradient) where kernels/cuda/parity_forward.py's
// `covers` allows.
//
// Why. The Triton forward builds every combination tile (sums and differences of opposite taps) in
// registers, then sends it through shared memory into wgmma's operand layout with a fence and a
// barrier per dot: ~850 cycles a dot for 216 dots a program (bench/NOTES.md, "Session 48"). Here
// mma.sync.m16n8k8 takes its A fragment from registers, so a lane computes the combinations of
// its own four A elements from the taps in shared memory and hands them to the tensor cores as
// they are: no trip back through shared memory, no barrier between dots.
//
// Work split. A CTA (4 warps) owns 64 pixels of one x row (blockIdx: row (z, y), x tile, batch);
// warp w pixels 16 w .. 16 w + 15, the mma's M. For each input chunk (16 packed rows of one class)
// the CTA stages in shared memory
//   - the chunk's rows at the 3 x 3 (z, y) neighbour rows (dilated, wrapped or zero per axis), x
//     from the tile's first pixel to its last plus the x halo (the packed operand carries h cells
//     a side, wrapped or zero: parity_conv.with_halo), rows 8 s + t and 8 s + t + 4 side by side
//     (a lane's A elements e and e + 2: one 8-byte read): xs[4 s + t][zr][yr][XP][2] with XP = 4
//     mod 16, so that a half warp's reads (pixel g, row t) cover the 32 banks once;
//   - the chunk's dots' weight tiles rounded to tf32, rows paired the same way ([4 s + t][pitch][2],
//     pitch = 4 mod 16: the B fragment b0, b1 of an n-tile is one conflict-free 8-byte read);
// then walks the 8 group tuples (gz, gy, gx) in {0, 1}^3 and its two k-steps of 8 rows: a lane
// loads the 2^(gz+gy+gx) taps of each of its four A elements, butterflies them into the group's
// combinations (x, then y, then z: s = plus + minus, d = plus - minus), and for each combination
// with a dot (the chunk's dot table, staged from tab) runs the dot's n-tiles into the accumulators of its output class.
// Accumulators: 8 class slots x CAP n-tiles of 8 columns (a class of up to 8 CAP rows); the slot
// a dot goes to is a runtime value, so each dot branches (warp-uniform) to the unrolled code of
// its slot, which keeps every accumulator in registers.
//
// Operands (a leading batch of B on each, vmap_method="broadcast_all"): x (B, cin, nz, ny, nx + 2 h)
// packed with its x halo, w (B, dots, 16, P) the dots' weight tiles (parity_conv.dot_weights), tab
// (B, tab_size) int32 (kernels/cuda/parity_forward.py's `table`; only batch 0's is read); result y
// (B, cout, nz, ny, nx). Attribute `geom`: nz, ny, nx, h, dz, dy, dx, wrap_z, wrap_y, cin, cout,
// chunks, dots, out classes, P, XP, the largest chunk's weight-stage floats, tab_size.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"

// ---- device code (tests/test_parity_forward_cuda.py compiles this part for the host as well,
// tests/parity_cuda_host.cpp: there mma_tf32 and tf32_round are the harness's)
constexpr int kTile = 64;     // pixels of a CTA: 4 warps x 16
constexpr int kChunk = 16;    // packed rows of a chunk (kernels/_fused MIN_DOT_TILE)
constexpr int kCombos = 27;   // 3^3 per-axis combinations (x0, s_1, d_1 per axis)
constexpr int kSlots = 8;     // output class slots (2^3 classes)

struct ParityParams {
  const float* x;
  const float* w;
  const int* tab;
  float* y;
  int nz, ny, nx, h, dz, dy, dx, wrap_z, wrap_y, cin, cout, chunks, dots, n_out, P, xp, w_stage;
};

// tab (int32): per chunk (row start, rows, first dot, dots); per (chunk, combination) its dot or -1;
// per dot (output slot, weight-stage offset); per output slot (row start, rows, n-tiles, pitch).
struct Tab {
  const int* t;
  int chunks, dots;
  __device__ int chunk(int c, int f) const { return t[4 * c + f]; }
  __device__ int dot_of(int c, int combo) const { return t[4 * chunks + kCombos * c + combo]; }
  __device__ int dot(int d, int f) const { return t[(4 + kCombos) * chunks + 2 * d + f]; }
  __device__ int out(int b, int f) const { return t[(4 + kCombos) * chunks + 2 * dots + 4 * b + f]; }
};

// src[r] for a runtime r without a local-memory array: a select chain over the 9 rows.
__device__ __forceinline__ int src9(const int (&src)[9], int r) {
  int v = src[0];
#pragma unroll
  for (int i = 1; i < 9; ++i) v = r == i ? src[i] : v;
  return v;
}

// One dot: the A fragment `a` (tf32 bits) times the dot's weight tile, k-step s, into slot b.
template <int CAP>
__device__ __forceinline__ void dot_into(float (&acc)[kSlots][CAP][4], const uint32_t (&a)[4], const float* ws,
                                         int b, int pitch, const int (&ntiles)[kSlots], int s, int g, int t) {
  // rows 8 s + t and 8 s + t + 4 (b0, b1) side by side: one 8-byte read an n-tile
  const float2* w = reinterpret_cast<const float2*>(ws) + (4 * s + t) * pitch + g;
#pragma unroll
  for (int bb = 0; bb < kSlots; ++bb) {
    if (bb != b) continue;
#pragma unroll
    for (int nt = 0; nt < CAP; ++nt) {
      if (nt < ntiles[bb]) {
        const float2 b01 = w[8 * nt];
        mma_tf32(acc[bb][nt], a, __float_as_uint(b01.x), __float_as_uint(b01.y));
      }
    }
  }
}

// Sums and differences along one axis of a group's values u[n], n = (iz NY + iy) NX + ix: the pair
// (minus, plus) STRIDE apart becomes (s, d) = (plus + minus, plus - minus).
template <int STRIDE, int N>
__device__ __forceinline__ void butterfly(float (&u)[N]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
    if ((n / STRIDE) % 2) continue;
    const float m = u[n], p = u[n + STRIDE];
    u[n] = p + m, u[n + STRIDE] = p - m;
  }
}

// The group tuple (GZ, GY, GX)'s combinations of a lane's four A elements (k-step s), then their dots.
template <int CAP, int GZ, int GY, int GX>
__device__ __forceinline__ void group_dots(float (&acc)[kSlots][CAP][4], const float* xs, const float* ws,
                                           const int2* dots, const int (&ntiles)[kSlots], int xp, int h, int dx,
                                           int px, int s, int g, int t) {
  constexpr int NZ = GZ ? 2 : 1, NY = GY ? 2 : 1, NX = GX ? 2 : 1, N = NZ * NY * NX;
  // v[e][n]: element e's value at the taps' sign pattern n (per paired axis 0: minus, 1: plus),
  // then at the combination n (0: s, 1: d)
  float v[4][N];
  // rows t and t + 4 of k-step s side by side (elements e and e + 2): one 8-byte read a pixel
  const float2* rows = reinterpret_cast<const float2*>(xs) + (4 * s + t) * 9 * xp + px + h;
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const int iz = n / (NY * NX), iy = (n / NX) % NY, ix = n % NX;
    const int zr = GZ ? 2 * iz : 1, yr = GY ? 2 * iy : 1, xo = GX ? (2 * ix - 1) * dx : 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // pixels g, g + 8
      const float2 pair = rows[(3 * zr + yr) * xp + xo + 8 * half];
      v[half][n] = pair.x, v[2 + half][n] = pair.y;
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    if (GX) butterfly<1>(v[e]);
    if (GY) butterfly<NX>(v[e]);
    if (GZ) butterfly<NX * NY>(v[e]);
  }
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const int iz = n / (NY * NX), iy = (n / NX) % NY, ix = n % NX;
    // per axis: 0 = x0, 1 = s_1, 2 = d_1 (_parity_plan.combo_matrix's rows)
    const int combo = 9 * (GZ ? 1 + iz : 0) + 3 * (GY ? 1 + iy : 0) + (GX ? 1 + ix : 0);
    const int2 dot = dots[combo];  // (slot | pitch << 8, weight-stage offset); slot -1: no dot
    const int b = (int)(signed char)(dot.x & 0xff);
    if (b < 0) continue;
    const uint32_t a[4] = {tf32_round(v[0][n]), tf32_round(v[1][n]), tf32_round(v[2][n]), tf32_round(v[3][n])};
    dot_into<CAP>(acc, a, ws + dot.y, b, dot.x >> 8, ntiles, s, g, t);
  }
}

template <int CAP>
__global__ void __launch_bounds__(128, 2) parity_forward(ParityParams p) {
  extern __shared__ float smem[];
  __shared__ int2 dots[kCombos];  // the chunk's dot per combination (group_dots)
  float* xs = smem;
  float* ws = smem + kChunk * 9 * p.xp;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int z = blockIdx.x / p.ny, yy = blockIdx.x % p.ny, x0 = blockIdx.y * kTile, batch = blockIdx.z;
  const int nxh = p.nx + 2 * p.h, xw = kTile + 2 * p.h;
  const size_t plane = (size_t)p.nz * p.ny * nxh;
  const float* xb = p.x + (size_t)batch * p.cin * plane;
  const float* wb = p.w + (size_t)batch * p.dots * kChunk * p.P;
  const Tab tab{p.tab, p.chunks, p.dots};

  // the 3 x 3 neighbour rows: offset in a plane, or -1 where zero padding
  int src[9];
#pragma unroll
  for (int zr = 0; zr < 3; ++zr)
#pragma unroll
    for (int yr = 0; yr < 3; ++yr) {
      int zz = z + (zr - 1) * p.dz, y2 = yy + (yr - 1) * p.dy;
      bool ok = true;
      if (p.wrap_z) zz = ((zz % p.nz) + p.nz) % p.nz; else ok = ok && zz >= 0 && zz < p.nz;
      if (p.wrap_y) y2 = ((y2 % p.ny) + p.ny) % p.ny; else ok = ok && y2 >= 0 && y2 < p.ny;
      src[3 * zr + yr] = ok ? (zz * p.ny + y2) * nxh : -1;
    }
  int ntiles[kSlots];
#pragma unroll
  for (int b = 0; b < kSlots; ++b) ntiles[b] = b < p.n_out ? tab.out(b, 2) : 0;
  float acc[kSlots][CAP][4];
#pragma unroll
  for (int b = 0; b < kSlots; ++b)
#pragma unroll
    for (int nt = 0; nt < CAP; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[b][nt][i] = 0.f;

  const int px = 16 * warp + g;
  for (int ch = 0; ch < p.chunks; ++ch) {
    const int r0 = tab.chunk(ch, 0), rows = tab.chunk(ch, 1), d0 = tab.chunk(ch, 2), nd = tab.chunk(ch, 3);
    __syncthreads();  // the previous chunk's reads are done
    // a warp a staged row pair (k-step s, row t: rows 8 s + t and 8 s + t + 4) at neighbour row r,
    // its lanes along x: no index division
    for (int qr = warp; qr < 8 * 9; qr += 4) {
      const int q = qr / 9, r = qr - 9 * q, k0 = 8 * (q >> 2) + (q & 3), at = src9(src, r);
      const bool live0 = k0 < rows && at >= 0, live1 = k0 + 4 < rows && at >= 0;
      const float* from = xb + (size_t)(r0 + k0) * plane + (at >= 0 ? at : 0) + x0;
      float2* to = reinterpret_cast<float2*>(xs) + qr * p.xp;
      for (int xi = lane; xi < xw; xi += 32) {
        const bool in = x0 + xi < nxh;
        to[xi] = make_float2(live0 && in ? __ldg(from + xi) : 0.f, live1 && in ? __ldg(from + 4 * plane + xi) : 0.f);
      }
    }
    if (tid < kCombos) {
      const int d = tab.dot_of(ch, tid);
      const int b = d < 0 ? -1 : tab.dot(d, 0);
      dots[tid] = d < 0 ? make_int2(0xff, 0) : make_int2(b | tab.out(b, 3) << 8, tab.dot(d, 1));
    }
    for (int d = d0 + warp; d < d0 + nd; d += 4) {  // a warp a dot's tile, its lanes along the columns
      const int b = tab.dot(d, 0), off = tab.dot(d, 1), cols = 8 * tab.out(b, 2), pb = tab.out(b, 3);
      const float* wd = wb + (size_t)d * kChunk * p.P;
      float2* to = reinterpret_cast<float2*>(ws + off);
      for (int q = 0; q < 8; ++q) {  // rows k0 = 8 (q / 4) + q % 4 and k0 + 4 side by side
        const float* from = wd + (8 * (q >> 2) + (q & 3)) * p.P;
        for (int n = lane; n < cols; n += 32)
          to[q * pb + n] = make_float2(__uint_as_float(tf32_round(__ldg(from + n))),
                                       __uint_as_float(tf32_round(__ldg(from + 4 * p.P + n))));
      }
    }
    __syncthreads();
#pragma unroll 1
    for (int s = 0; s < 2; ++s) {
      group_dots<CAP, 0, 0, 0>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 0, 0, 1>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 0, 1, 0>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 0, 1, 1>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 1, 0, 0>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 1, 0, 1>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 1, 1, 0>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
      group_dots<CAP, 1, 1, 1>(acc, xs, ws, dots, ntiles, p.xp, p.h, p.dx, px, s, g, t);
    }
  }

  // the accumulators: lane (g, t) holds pixels g, g + 8 and columns 2 t, 2 t + 1 of each n-tile
  float* yb = p.y + (size_t)batch * p.cout * p.nz * p.ny * p.nx + ((size_t)z * p.ny + yy) * p.nx;
  const size_t out_plane = (size_t)p.nz * p.ny * p.nx;
#pragma unroll
  for (int b = 0; b < kSlots; ++b) {
    if (b >= p.n_out) break;
    const int o0 = tab.out(b, 0), width = tab.out(b, 1);
#pragma unroll
    for (int nt = 0; nt < CAP; ++nt) {
      if (nt >= ntiles[b]) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = 8 * nt + 2 * t + (i & 1), xx = x0 + px + 8 * (i >> 1);
        if (col < width && xx < p.nx) yb[(size_t)(o0 + col) * out_plane + xx] = acc[b][nt][i];
      }
    }
  }
}

// ---- host side
ffi::Error bad(const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda parity forward: " + why); }

template <int CAP>
cudaError_t launch(const ParityParams& p, int batch, cudaStream_t stream) {
  const size_t smem = sizeof(float) * ((size_t)kChunk * 9 * p.xp + p.w_stage);
  auto* kernel = parity_forward<CAP>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.nz * p.ny, (p.nx + kTile - 1) / kTile, batch);
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

ffi::Error ParityForward(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                         ffi::Buffer<ffi::S32> tab, ffi::ResultBuffer<ffi::F32> y, ffi::Span<const int64_t> geom) {
  if (geom.size() != 18) return bad("`geom` must have 18 entries (has " + std::to_string(geom.size()) + ")");
  ParityParams p{};
  int* f[] = {&p.nz, &p.ny, &p.nx, &p.h, &p.dz, &p.dy, &p.dx, &p.wrap_z, &p.wrap_y, &p.cin, &p.cout,
              &p.chunks, &p.dots, &p.n_out, &p.P, &p.xp, &p.w_stage};
  for (int i = 0; i < 17; ++i) {
    if (geom[i] < 0 || geom[i] > (1 << 30)) return bad("`geom`[" + std::to_string(i) + "] out of range");
    *f[i] = (int)geom[i];
  }
  const int64_t tab_size = geom[17];
  if (p.nz < 1 || p.ny < 1 || p.nx < 1 || p.chunks < 1 || p.dots < 1 || p.n_out < 1 || p.n_out > kSlots)
    return bad("empty sizes, or more than 8 output classes");
  if (p.h < p.dx || p.xp < kTile + 2 * p.h || p.xp % 16 != 4) return bad("the x halo or the stage pitch XP");
  if (p.nz * (int64_t)p.ny > (1LL << 31) - 1) return bad("nz * ny must fit a grid's x");
  const int64_t in_size = (int64_t)p.cin * p.nz * p.ny * (p.nx + 2 * p.h);
  if (in_size == 0 || x.element_count() % in_size) return bad("x's size is not a batch of (cin, nz, ny, nx + 2h)");
  const int64_t batch = x.element_count() / in_size;
  if (batch < 1 || batch > 65535) return bad("the batch must be 1 to 65535");
  if (w.element_count() != batch * p.dots * kChunk * p.P) return bad("w's size is not a batch of (dots, 16, P)");
  if (tab.element_count() != batch * tab_size && tab.element_count() != tab_size) return bad("tab's size");
  if (tab_size != (4 + kCombos) * (int64_t)p.chunks + 2 * (int64_t)p.dots + 4 * kSlots) return bad("tab_size");
  if (y->element_count() != batch * p.cout * p.nz * p.ny * (int64_t)p.nx) return bad("y's size");
  p.x = x.typed_data(), p.w = w.typed_data(), p.tab = tab.typed_data(), p.y = y->typed_data();
  cudaError_t err = launch<4>(p, (int)batch, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ginjax cuda parity forward: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaParityForward, ParityForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geom"));
