// Forward ConvContract in CUDA C++ for Hopper (sm_90a), behind an XLA FFI custom call: the D=3
// {scalar, vector} torus layer with 3x3x3 invariant filters in the factorised form
//
//   Z_T[p, c]        = sum over tile T's basis nonzeros (tap, i, coef): coef * X_a[c, p + tap, i]
//   out_(b,j)[p, o] += sum over the tiles T of group (b, j), c:  Z_T[p, c] * w_t[o, c, f]
//
// (tiles, groups and phases: kernels/cuda/_plan.py; the basis walk: stencil_d3.inc, generated).
//
// Work split. A CTA owns one (batch, z) and a strip of y rows, all x, and slides along y: a ring
// of three y slices (3 z rows x every input channel of both blocks) lives in shared memory, so
// each input row is fetched from L2 once per CTA plus three z neighbours (not 9x as one row per
// CTA did). Warps: (x segment of 16 pixels) x (warp half: even / odd channel chunks of 8).
// Per output row and chunk a warp computes Z tiles straight in the registers of the mma A
// fragment: lane (g, tid) owns pixels x = 2g, 2g + 1 of its segment (mma rows g, g + 8) and
// channels tid, tid + 4 (A columns), so one input row read (x = 2g - 1 .. 2g + 2, both
// channels: 8 shared loads) serves the three dx taps of both pixels, and every Z tile of the
// phase (27 reading the vector block, then 13 reading the scalar one) is live at once, so each
// of the phase's input rows is read once per chunk.
//
// Why the stencil on FMA and the channel GEMM on mma.sync.m16n8k8 TF32: the stencil is sparse
// (342 nonzeros over 40 tiles, 108 distinct shifted reads) and belongs on the FP32 pipe, where
// its result is already in the A fragment's registers; the GEMM (10,240 MACs a pixel) on FMA
// would double the FP32 work, while on the tensor cores it is ~15 % of the stencil's issue
// slots. wgmma would need Z in shared memory (tf32 A comes only from shared memory), i.e. one
// store and one barrier per Z element: mma.sync takes A from registers.
//
// The y ring: slices y-1, y, y+1; slice y+2 overwrites y-1's slot once every warp is past the
// dy = -1 rows of the phase (MID in the generated walk), so the copy overlaps the rest of the
// row. Copies are 4-byte cp.async: the rows are laid out with per-channel pitch and skew
// (_plan.row_layout) that make every stencil read one bank wavefront, which 16-byte-aligned rows
// cannot; the x wrap is in the copy's source index. The warp halves' partial outputs meet in
// shared memory; half 0 stores them.
//
// Operands (unbatched shapes; any leading batch dims, the same on all): x0 (c0, nz, ny, nx),
// x1 (c1, nz, ny, nx, 3), w packed by _plan.pack_weights (per batch element), results y0
// (o, nz, ny, nx), y1 (o, nz, ny, nx, 3). Attribute `geom`: nz, ny, nx, c0, c1, o, strip,
// pitch0, pitch1, skew0[4], skew1[4], weight floats.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "stencil_d3.inc"

constexpr int kSeg = 16;   // pixels per warp (mma M)
constexpr int kChunk = 8;  // channels per mma k-step
constexpr int kMaxThreads = 256;

struct Params {
  const float* x[2];
  const float* w;
  float* y[2];
  int nz, ny, nx, c[2], o, strip;
  int pitch[2], skew[2][4];
  int w_floats, slice_floats, zrow_floats, region[2], w_base[2];
};

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async4(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void pair_barrier(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(64) : "memory");
}

// One y slice of input block `key` (3 z rows around z, every channel, x = -1 .. nx wrapped) into
// `slice`: a warp per (z row, channel), lanes along the row.
template <int KEY>
__device__ void load_slice(const Params& p, float* slice, int b, int z, int yy) {
  constexpr int m = KEY ? 3 : 1;
  const int C = p.c[KEY], row = p.nx * m, width = row + 2 * m;
  const int lane = threadIdx.x & 31;
  for (int r = threadIdx.x >> 5; r < 3 * C; r += blockDim.x >> 5) {
    const int dz = r / C, c = r - dz * C;
    int zz = z + dz - 1;
    zz += zz < 0 ? p.nz : (zz >= p.nz ? -p.nz : 0);
    const float* src = p.x[KEY] + ((((size_t)b * C + c) * p.nz + zz) * p.ny + yy) * (size_t)row;
    float* dst = slice + dz * p.zrow_floats + p.region[KEY] + c * p.pitch[KEY] + p.skew[KEY][c & 3];
    for (int e = lane; e < width; e += 32) {
      int xs = e - m;  // (x', i) at e = (x' + 1) m + i reads x' mod nx
      xs += xs < 0 ? row : (xs >= row ? -row : 0);
      cp_async4(dst + e, src + xs);
    }
  }
}

// The generated walk's hooks (stencil_d3.inc): ROW loads v, NZ accumulates a Z tile, MID frees
// the oldest y slice of this phase's block once the whole CTA is past its dy = -1 rows.
#define GJ_ROW(dz, dy, i)                                                         \
  {                                                                               \
    const float* r_ = sl[(dy) + 1] + ((dz) + 1) * p.zrow_floats + (i);            \
    _Pragma("unroll") for (int s = 0; s < 4; ++s) {                               \
      v[0][s] = r_[off0 + s * kM];                                                \
      v[1][s] = r_[off1 + s * kM];                                                \
    }                                                                             \
  }
#define GJ_NZ(T, dx, coef)                               \
  zt[T][0] = fmaf(coef, v[0][(dx) + 1], zt[T][0]);       \
  zt[T][1] = fmaf(coef, v[0][(dx) + 2], zt[T][1]);       \
  zt[T][2] = fmaf(coef, v[1][(dx) + 1], zt[T][2]);       \
  zt[T][3] = fmaf(coef, v[1][(dx) + 2], zt[T][3]);
#define GJ_MID()                                                        \
  if (last) {                                                           \
    __syncthreads();                                                    \
    if (more) load_slice<kKey>(p, next, b, z, y_next);                  \
    cp_async_commit();                                                  \
  }

// One phase of one output row: the warp half's chunks of the phase's block, each a stencil walk
// into the Z tiles and their mma into the groups' accumulators.
#define GJ_PHASE(NAME)                                                                          \
  {                                                                                             \
    constexpr int kKey = GJ_##NAME##_KEY, kM = kKey ? 3 : 1, kTiles = GJ_##NAME##_TILES;      \
    const int n_chunks = p.c[kKey] / kChunk;                                                    \
    for (int h = half; h < n_chunks; h += 2) {                                                  \
      const bool last = h + 2 >= n_chunks;                                                      \
      const int c0 = h * kChunk + tid, c1 = c0 + 4;                                             \
      const int px = (seg * kSeg + 2 * g) * kM + p.region[kKey];                                \
      const int off0 = px + c0 * p.pitch[kKey] + p.skew[kKey][c0 & 3];                          \
      const int off1 = px + c1 * p.pitch[kKey] + p.skew[kKey][c1 & 3];                          \
      float zt[kTiles][4];                                                                      \
      _Pragma("unroll") for (int t = 0; t < kTiles; ++t) zt[t][0] = zt[t][1] = zt[t][2] = zt[t][3] = 0.f; \
      float v[2][4];                                                                            \
      GJ_##NAME##_STENCIL(GJ_ROW, GJ_NZ, GJ_MID)                                                \
      const float* wt = s_w + p.w_base[kKey] + h * kTiles * NT * 64 + 2 * lane;                 \
      _Pragma("unroll") for (int t = 0; t < kTiles; ++t) {                                      \
        const uint32_t a[4] = {to_tf32(zt[t][0]), to_tf32(zt[t][1]), to_tf32(zt[t][2]),        \
                               to_tf32(zt[t][3])};                                              \
        _Pragma("unroll") for (int n = 0; n < NT; ++n) {                                        \
          const float2 bw = *reinterpret_cast<const float2*>(wt + (t * NT + n) * 64);           \
          mma_tf32(acc[k##NAME##TileGroup[t]][n], a, __float_as_uint(bw.x), __float_as_uint(bw.y)); \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }

// NT: output channels / 8 (the mma n-tiles of each group).
template <int NT>
__global__ void __launch_bounds__(kMaxThreads, 1) forward_kernel(const Params p) {
  extern __shared__ float smem[];
  float* ring = smem;
  float* s_w = ring + 3 * p.slice_floats;
  float* s_red = s_w + p.w_floats;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_seg = blockDim.x >> 6;
  const int seg = warp % n_seg, half = warp / n_seg;
  const int g = lane >> 2, tid = lane & 3;
  const int b = blockIdx.z, z = blockIdx.y;
  const int y0 = blockIdx.x * p.strip, y1 = min(y0 + p.strip, p.ny);
  auto slot = [&](int yy) { return ring + ((yy - y0 + 1) % 3) * p.slice_floats; };
  auto wrap_y = [&](int yy) { return yy < 0 ? yy + p.ny : (yy >= p.ny ? yy - p.ny : yy); };

  const float* wg = p.w + (size_t)b * p.w_floats;  // tf32 once, here
  for (int e = threadIdx.x; e < p.w_floats; e += blockDim.x) s_w[e] = __uint_as_float(to_tf32(wg[e]));
  for (int yy = y0 - 1; yy <= y0 + 1; ++yy) load_slice<1>(p, slot(yy), b, z, wrap_y(yy));
  cp_async_commit();
  for (int yy = y0 - 1; yy <= y0 + 1; ++yy) load_slice<0>(p, slot(yy), b, z, wrap_y(yy));
  cp_async_commit();

  float acc[GJ_GROUPS][NT][4];
#pragma unroll
  for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[q][n][0] = acc[q][n][1] = acc[q][n][2] = acc[q][n][3] = 0.f;

  for (int y = y0; y < y1; ++y) {
    const float* sl[3] = {slot(y - 1), slot(y), slot(y + 1)};
    float* next = slot(y + 2);  // y - 1's slot
    const bool more = y + 2 <= y1;  // row y + 1 is in the strip and needs slice y + 2
    const int y_next = wrap_y(y + 2);
    // groups in flight: this row's vector slice (oldest) and scalar slice (newest)
    cp_async_wait<1>();
    __syncthreads();
    GJ_PHASE(V)
    cp_async_wait<1>();  // all but the vector slice y + 2 just issued
    __syncthreads();
    GJ_PHASE(S)

    float* red = s_red + seg * (GJ_GROUPS * NT * 4 * 32) + lane;
    if (half == 1) {
#pragma unroll
      for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            red[((q * NT + n) * 4 + k) * 32] = acc[q][n][k];
            acc[q][n][k] = 0.f;
          }
    }
    pair_barrier(1 + seg);
    if (half == 0) {
#pragma unroll
      for (int q = 0; q < GJ_GROUPS; ++q) {
        const int blk = kGroupBlock[q], m = blk ? 3 : 1;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            const int o = n * 8 + 2 * tid + (k & 1), x = seg * kSeg + 2 * g + (k >> 1);
            const size_t pix = ((((size_t)b * p.o + o) * p.nz + z) * p.ny + y) * p.nx + x;
            p.y[blk][pix * m + kGroupComp[q]] = acc[q][n][k] + red[((q * NT + n) * 4 + k) * 32];
            acc[q][n][k] = 0.f;
          }
      }
    }
  }
  cp_async_wait<0>();
}

template <int NT>
cudaError_t launch(const Params& p, int batch, cudaStream_t stream) {
  const int threads = 64 * (p.nx / kSeg);
  const size_t smem = sizeof(float) * (3 * (size_t)p.slice_floats + p.w_floats + (p.nx / kSeg) * GJ_GROUPS * NT * 4 * 32);
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<NT>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid((p.ny + p.strip - 1) / p.strip, p.nz, batch);
  forward_kernel<NT><<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

ffi::Error Forward(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                   ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                   ffi::Span<const int64_t> geom) {
  auto bad = [](const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda ConvContract: " + why); };
  if (geom.size() != 18) return bad("`geom` must have 18 entries");
  Params p{};
  p.nz = (int)geom[0], p.ny = (int)geom[1], p.nx = (int)geom[2];
  p.c[0] = (int)geom[3], p.c[1] = (int)geom[4], p.o = (int)geom[5], p.strip = (int)geom[6];
  p.pitch[0] = (int)geom[7], p.pitch[1] = (int)geom[8];
  for (int k = 0; k < 4; ++k) p.skew[0][k] = (int)geom[9 + k], p.skew[1][k] = (int)geom[13 + k];
  p.w_floats = (int)geom[17];
  if (p.nx % kSeg || p.nx < kSeg || p.nx > 4 * kSeg) return bad("nx must be 16, 32, 48 or 64");
  if (p.c[0] % (2 * kChunk) || p.c[1] % (2 * kChunk)) return bad("input channels must be multiples of 16");
  if (p.o != 8 && p.o != 16) return bad("output channels must be 8 or 16");
  if (p.strip < 1 || p.nz < 1 || p.ny < 1) return bad("strip, nz and ny must be >= 1");
  const int64_t pix = (int64_t)p.nz * p.ny * p.nx;
  const int64_t batch = x0.element_count() / (p.c[0] * pix);
  if (batch < 1 || batch > 65535) return bad("batch must be in [1, 65535]");
  if (x0.element_count() != batch * p.c[0] * pix || x1.element_count() != batch * p.c[1] * pix * 3 ||
      w.element_count() != batch * p.w_floats || y0->element_count() != batch * p.o * pix ||
      y1->element_count() != batch * p.o * pix * 3)
    return bad("operand sizes do not match `geom` and the batch");
  p.x[0] = x0.typed_data(), p.x[1] = x1.typed_data(), p.w = w.typed_data();
  p.y[0] = y0->typed_data(), p.y[1] = y1->typed_data();
  p.region[0] = 0, p.region[1] = p.c[0] * p.pitch[0];
  p.zrow_floats = p.region[1] + p.c[1] * p.pitch[1];
  p.slice_floats = 3 * p.zrow_floats;
  const int nt = p.o / 8;
  p.w_base[1] = 0, p.w_base[0] = (p.c[1] / kChunk) * GJ_V_TILES * nt * 64;
  if (p.w_base[0] + (p.c[0] / kChunk) * GJ_S_TILES * nt * 64 != p.w_floats) return bad("packed weights have the wrong size");
  const cudaError_t err = nt == 1 ? launch<1>(p, (int)batch, stream) : launch<2>(p, (int)batch, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ginjax cuda ConvContract: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geom"));
