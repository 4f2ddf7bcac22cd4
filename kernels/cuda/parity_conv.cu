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
//     a side, wrapped or zero: parity_conv.with_halo, and its rows padded to a multiple of 4 floats,
//     so a staged row is 16-byte copies): xs[row][zr][yr][XP] with XP = 8 mod 32, so that a warp's
//     A reads (pixel g, row t: 9 XP t + g) cover the 32 banks once;
//   - the chunk's dots' weight tiles (rounded to tf32 by the caller), each as [n-tile][4 s + t][column g][2] with
//     rows t and t + 4 side by side: a lane's B fragment (b0, b1) of an n-tile is one 8-byte read,
//     a half warp's reads are 128 consecutive bytes, and the lane's address is the tile's offset
//     plus a per-k-step constant (no per-class pitch);
// then walks the 8 group tuples (gz, gy, gx) in {0, 1}^3 and its k-steps of 8 rows (one where the
// chunk has at most 8): a lane loads the 2^(gz+gy+gx) taps of each of its four A elements,
// butterflies them into the group's combinations (x, then y, then z: s = plus + minus, d = plus -
// minus), and for each combination with a dot (the chunk's dot table, staged from tab) runs the
// dot's n-tiles into the accumulators of its output class.
// Accumulators: 8 slots x CAP n-tiles of 8 columns (a class of up to 8 CAP rows), slot = the output
// class's bits (its per-axis component parities). A combination connects input class C to output
// class C ^ q, q its difference axes (_parity_plan.combo_q), so the code for a chunk is compiled per
// input class (chunk_dots<C>, one warp-uniform switch a chunk) and every dot's slot is a constant
// there: no branch on where a dot's result goes, only on its n-tiles (the class's width).
//
// Operands (a leading batch of B on each, vmap_method="broadcast_all"): x (B, cin, nz, ny, nx + 2 h)
// packed with its x halo, w (B, w_total) the dots' weight tiles in the stage's layout, rounded to
// tf32, a chunk's tiles one run (parity_forward.stage_weights), tab (B, tab_size) int32
// (parity_forward.table; only batch 0's is read); result y (B, cout, nz, ny, nx). Attribute `geom`:
// nz, ny, nx, h, dz, dy, dx, wrap_z, wrap_y, cin, cout, chunks, dots, out classes, w_total, XP, the
// largest chunk's weight-stage floats, tab_size.
//
// Staging is cp.async, 16 bytes a copy (no registers held, every copy of a chunk in flight at once;
// the zero padding by zero-fill): the accumulators take half the registers, so loads through
// registers would come back a few at a time, a round trip to L2 each.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"

// ---- device code (tests/test_parity_forward_cuda.py compiles this part for the host as well,
// tests/parity_cuda_host.cpp: there mma_tf32 and the cp.async copies are the harness's)
constexpr int kTile = 64;     // pixels of a CTA: 4 warps x 16
constexpr int kChunk = 16;    // packed rows of a chunk (kernels/_fused MIN_DOT_TILE)
constexpr int kCombos = 27;   // 3^3 per-axis combinations (x0, s_1, d_1 per axis)
constexpr int kSlots = 8;     // output class slots (2^3 classes)
constexpr int kMaxXw = 96;    // a staged row's x extent, kTile + 2 h: h <= 16

struct ParityParams {
  const float* x;
  const float* w;
  const int* tab;
  float* y;
  int nz, ny, nx, h, dz, dy, dx, wrap_z, wrap_y, cin, cout, chunks, dots, n_out, w_total, xp, w_stage;
};

// tab (int32): per chunk (row start, rows, first dot, dots, input class, first float and floats of its
// weight tiles in w); per (chunk, combination)
// its dot or -1; per dot (output slot, weight-stage offset); per slot, i.e. output class bits (row
// start, rows, n-tiles), n-tiles 0 where the layer has no such class.
constexpr int kChunkFields = 7;
constexpr int kOutFields = 3;
constexpr int kNTileFloats = 8 * 8 * 2;  // a weight tile's n-tile in the stage: 8 row pairs x 8 columns x 2
struct Tab {
  const int* t;
  int chunks, dots;
  __device__ int chunk(int c, int f) const { return t[kChunkFields * c + f]; }
  __device__ int dot_of(int c, int combo) const { return t[kChunkFields * chunks + kCombos * c + combo]; }
  __device__ int dot(int d, int f) const { return t[(kChunkFields + kCombos) * chunks + 2 * d + f]; }
  __device__ int out(int b, int f) const { return t[(kChunkFields + kCombos) * chunks + 2 * dots + kOutFields * b + f]; }
};

// One dot: the A fragment `a` (tf32 bits) times the dot's weight tile, k-step s, into the n-tiles
// of slot b (`live` bit CAP b + nt: the slot's class has n-tile nt). The callers' b is a constant
// once their loops unroll, so acc[b] stays in registers and the bit test is one instruction.
template <int CAP>
__device__ __forceinline__ void dot_into(float (&acc)[CAP][4], const uint32_t (&a)[4], const float2* w,
                                         uint32_t live, int b) {
  // w: the lane's (b0, b1) of n-tile 0 (rows 8 s + t and 8 s + t + 4, column g), the next n-tiles
  // a tile's n-tile further each
#pragma unroll
  for (int nt = 0; nt < CAP; ++nt) {
    if (live & (1u << (CAP * b + nt))) {
      const float2 b01 = w[kNTileFloats / 2 * nt];
      mma_tf32(acc[nt], a, __float_as_uint(b01.x), __float_as_uint(b01.y));
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

// The group tuple (GZ, GY, GX)'s combinations of a lane's four A elements (k-step s), then their
// dots into input class C's output slots.
template <int CAP, int C, int GZ, int GY, int GX>
__device__ __forceinline__ void group_dots(float (&acc)[kSlots][CAP][4], const float* xs, const float* ws,
                                           const int* dots, uint32_t live, int xp, int h, int dx,
                                           int px, int s, int g, int t) {
  constexpr int NZ = GZ ? 2 : 1, NY = GY ? 2 : 1, NX = GX ? 2 : 1, N = NZ * NY * NX;
  // v[e][n]: element e's value at the taps' sign pattern n (per paired axis 0: minus, 1: plus),
  // then at the combination n (0: s, 1: d)
  float v[4][N];
  // element e: row 8 s + t + 4 (e >> 1), pixel px + 8 (e & 1)
  const float* rows = xs + (8 * s + t) * 9 * xp + px + h;
  const int lane_w = 8 * (4 * s + t) + g;  // the lane's B pair in a weight tile's n-tile (float2s)
#pragma unroll
  for (int n = 0; n < N; ++n) {
    const int iz = n / (NY * NX), iy = (n / NX) % NY, ix = n % NX;
    const int zr = GZ ? 2 * iz : 1, yr = GY ? 2 * iy : 1, xo = GX ? (2 * ix - 1) * dx : 0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // pixels g, g + 8
      const float* at = rows + (3 * zr + yr) * xp + xo + 8 * half;
      v[half][n] = at[0], v[2 + half][n] = at[4 * 9 * xp];
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
    // the output class: C with the difference axes' bits flipped (bit a: axis a, z first)
    const int b = C ^ ((GZ && iz ? 1 : 0) | (GY && iy ? 2 : 0) | (GX && ix ? 4 : 0));
    const int off = dots[combo];  // the dot's weight-stage offset; -1: no dot
    if (off < 0) continue;
    // A as fp32 bits: the tensor cores read the tf32 bits and drop the rest (truncation, as Triton's
    // tf32 dots do); cvt.rna here would cost 2 instructions an element on sm_90, 8 a dot
    const uint32_t a[4] = {__float_as_uint(v[0][n]), __float_as_uint(v[1][n]), __float_as_uint(v[2][n]),
                           __float_as_uint(v[3][n])};
    dot_into<CAP>(acc[b], a, reinterpret_cast<const float2*>(ws + off) + lane_w, live, b);
  }
}

// A chunk of input class C: its k-steps (1 or 2), each the 8 group tuples.
template <int CAP, int C>
__device__ __forceinline__ void chunk_dots(float (&acc)[kSlots][CAP][4], const float* xs, const float* ws,
                                           const int* dots, uint32_t live, int xp, int h, int dx,
                                           int px, int ksteps, int g, int t) {
#pragma unroll 1
  for (int s = 0; s < ksteps; ++s) {
    group_dots<CAP, C, 0, 0, 0>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 0, 0, 1>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 0, 1, 0>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 0, 1, 1>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 1, 0, 0>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 1, 0, 1>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 1, 1, 0>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
    group_dots<CAP, C, 1, 1, 1>(acc, xs, ws, dots, live, xp, h, dx, px, s, g, t);
  }
}

template <int CAP>
__global__ void __launch_bounds__(128, 2) parity_forward(ParityParams p) {
  extern __shared__ float smem[];
  __shared__ int dots[kCombos];  // the chunk's dot per combination: its weight-stage offset, or -1
  __shared__ int src[9];
  float* xs = smem;
  float* ws = smem + kChunk * 9 * p.xp;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int z = blockIdx.x / p.ny, yy = blockIdx.x % p.ny, x0 = blockIdx.y * kTile, batch = blockIdx.z;
  // a packed row: nx + 2 h floats padded to a multiple of 4 (`row`); a staged one: xw of them, in
  // 16-byte copies
  const int row = (p.nx + 2 * p.h + 3) & ~3, xw = kTile + 2 * p.h, copies = (xw + 3) / 4;
  const size_t plane = (size_t)p.nz * p.ny * row;
  const float* xb = p.x + (size_t)batch * p.cin * plane;
  const float* wb = p.w + (size_t)batch * p.w_total;
  const Tab tab{p.tab, p.chunks, p.dots};

  // the 3 x 3 neighbour rows (3 zr + yr): offset in a plane, or -1 where zero padding; in shared
  // memory, not registers (the accumulators take half of them); visible after the first chunk's barrier
  if (tid < 9) {
    const int zr = tid / 3, yr = tid % 3;
    int zz = z + (zr - 1) * p.dz, y2 = yy + (yr - 1) * p.dy;
    bool ok = true;
    if (p.wrap_z) zz = ((zz % p.nz) + p.nz) % p.nz; else ok = ok && zz >= 0 && zz < p.nz;
    if (p.wrap_y) y2 = ((y2 % p.ny) + p.ny) % p.ny; else ok = ok && y2 >= 0 && y2 < p.ny;
    src[tid] = ok ? (zz * p.ny + y2) * row : -1;
  }
  // bit CAP b + nt: output class b has n-tile nt (one register for the 8 classes' widths)
  static_assert(kSlots * CAP <= 32, "the n-tile mask is one 32-bit word");
  uint32_t live = 0;
#pragma unroll
  for (int b = 0; b < kSlots; ++b) live |= ((1u << tab.out(b, 2)) - 1) << (CAP * b);
  float acc[kSlots][CAP][4];
#pragma unroll
  for (int b = 0; b < kSlots; ++b)
#pragma unroll
    for (int nt = 0; nt < CAP; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[b][nt][i] = 0.f;

  const int px = 16 * warp + g;
  for (int ch = 0; ch < p.chunks; ++ch) {
    const int r0 = tab.chunk(ch, 0), rows = tab.chunk(ch, 1);
    const int ksteps = rows > 8 ? 2 : 1;  // a chunk of at most 8 rows: k-step 1 would multiply zeros
    __syncthreads();  // the previous chunk's reads are done
    // a thread a (neighbour row r, 16-byte copy c) of every row k: the source and destination
    // step by a plane and a staged row; a zero-filled copy (a row past the chunk's, a zero-padded
    // neighbour row, x past a partial tile's row) reads nothing, but its source stays in bounds
    for (int i = tid; i < 9 * copies; i += 128) {
      const int r = i / copies, c = i - copies * r, at = src[r];
      const int bytes = at >= 0 && x0 + 4 * c < row ? 16 : 0;
      const float* from = xb + (size_t)r0 * plane + max(at, 0) + x0 + (bytes ? 4 * c : 0);
      float* to = xs + r * p.xp + 4 * c;
      for (int k = 0; k < 8 * ksteps; ++k, to += 9 * p.xp) {
        cp_async16_zfill(to, from, k < rows ? bytes : 0);
        if (k + 1 < rows) from += plane;
      }
    }
    {  // the chunk's weight tiles: one run of whole n-tiles (multiples of 4 floats, 16-byte aligned)
      const float* from = wb + tab.chunk(ch, 5);
      for (int i = 4 * tid; i < tab.chunk(ch, 6); i += 4 * 128) cp_async16(ws + i, from + i);
    }
    cp_async_commit();
    if (tid < kCombos) {
      const int d = tab.dot_of(ch, tid);
      dots[tid] = d < 0 ? -1 : tab.dot(d, 1);
    }
    cp_async_wait<0>();
    __syncthreads();
    switch (tab.chunk(ch, 4)) {  // warp-uniform: the chunk's input class
#define GJ_CHUNK(C) \
  case C: chunk_dots<CAP, C>(acc, xs, ws, dots, live, p.xp, p.h, p.dx, px, ksteps, g, t); break;
      GJ_CHUNK(0) GJ_CHUNK(1) GJ_CHUNK(2) GJ_CHUNK(3) GJ_CHUNK(4) GJ_CHUNK(5) GJ_CHUNK(6) GJ_CHUNK(7)
#undef GJ_CHUNK
    }
  }

  // the accumulators: lane (g, t) holds pixels g, g + 8 and columns 2 t, 2 t + 1 of each n-tile
  float* yb = p.y + (size_t)batch * p.cout * p.nz * p.ny * p.nx + ((size_t)z * p.ny + yy) * p.nx;
  const size_t out_plane = (size_t)p.nz * p.ny * p.nx;
#pragma unroll
  for (int b = 0; b < kSlots; ++b) {
    const int o0 = tab.out(b, 0), width = tab.out(b, 1);
#pragma unroll
    for (int nt = 0; nt < CAP; ++nt) {
      if (!(live & (1u << (CAP * b + nt)))) break;
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
              &p.chunks, &p.dots, &p.n_out, &p.w_total, &p.xp, &p.w_stage};
  for (int i = 0; i < 17; ++i) {
    if (geom[i] < 0 || geom[i] > (1 << 30)) return bad("`geom`[" + std::to_string(i) + "] out of range");
    *f[i] = (int)geom[i];
  }
  const int64_t tab_size = geom[17];
  if (p.nz < 1 || p.ny < 1 || p.nx < 1 || p.chunks < 1 || p.dots < 1 || p.n_out < 1 || p.n_out > kSlots)
    return bad("empty sizes, or more than 8 output classes");
  if (p.h < p.dx || kTile + 2 * p.h > kMaxXw || p.xp < ((kTile + 2 * p.h + 3) & ~3) || p.xp % 32 != 8)
    return bad("the x halo (at most 16) or the stage pitch XP");
  if (p.nz * (int64_t)p.ny > (1LL << 31) - 1) return bad("nz * ny must fit a grid's x");
  const int64_t in_size = (int64_t)p.cin * p.nz * p.ny * ((p.nx + 2 * p.h + 3) & ~3);
  if (in_size == 0 || x.element_count() % in_size) return bad("x's size is not a batch of (cin, nz, ny, nx + 2h padded to 4)");
  const int64_t batch = x.element_count() / in_size;
  if (batch < 1 || batch > 65535) return bad("the batch must be 1 to 65535");
  if (w.element_count() != batch * p.w_total || p.w_total % 4) return bad("w's size is not a batch of w_total (a multiple of 4)");
  if (tab.element_count() != batch * tab_size && tab.element_count() != tab_size) return bad("tab's size");
  if (tab_size != (kChunkFields + kCombos) * (int64_t)p.chunks + 2 * (int64_t)p.dots + kOutFields * kSlots)
    return bad("tab_size");
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
