// The VectorNeuron nonlinearity of one non-scalar block in CUDA C++, forward and backward, behind
// XLA FFI custom calls (kernels/cuda/vector_neuron.py). Per pixel and channel, x the block's T
// components and W (C, C) the channel mixing:
//
//   d = W x,  n = |d| (0 where d = 0),  u = d / (n + eps),  s = <x, u>,
//   h(s) = (act(s) / (|s| + eps) - 1) s,  y = x + h(s) u
//   gs = <gy, u> h'(s),  gu = h gy + gs x,  gd = gu / (n + eps) - <gu, d> d / ((n + eps)^2 n)
//   gx = gy + gs u + W^T gd,  gW = sum over pixels and components of gd x^T
//
// The elementwise formulas are those of kernels/triton/_vn_kernel.py `_emit_local` (the sign
// convention of |s|' at 0, gelu's tanh from exp(-2|z|)), so both kernels compute the same thing.
//
// Why this shape. Triton's fp32 `tl.dot` hands every thread whole operand rows through shared
// memory: its backward was bound by L1/shared traffic (bench/NOTES.md). Here one thread owns one
// pixel and keeps all C x T components of x in registers; W lives in shared memory and every
// thread of a warp reads the same element (a broadcast: one wavefront per float4 of W), so
// d = W x is C*C*T register FMAs with no operand re-reads. The channel loop computes one output
// channel's d_c, its local terms and (backward) gd_c at a time, so only x, and the backward's
// W^T gd accumulator, are C x T register arrays.
//
// The backward's loads. A CTA walks many tiles in sequence (2 CTAs an SM at C = 16, T = 3), so a
// load issued when its value is needed stalls the thread for a whole HBM round trip with little
// else resident to cover it. Each thread therefore copies its own pixel's x and gy of the *next*
// tile into shared memory (cp.async, [component row][pixel]: a warp's 32 pixels are 32 banks) while
// it works on this one: x as soon as this tile's x is in registers, gy once this tile's channel
// loop is done. Blocks of 32 channels (Bwd::kCopyX) copy only gy, so that two CTAs fit an SM, and
// load x at the tile's start from L2, where a prefetch a tile ahead put it. A thread reads back
// only what it copied itself, so its own cp.async wait orders them: no CTA barrier.
//
// The weight gradient. After a tile's gx, each thread stages its pixel's x and gd in shared
// memory, row-major per pixel with a pitch of T*C + 4 floats (== 4 mod 8: the float4 stores of
// any 8 consecutive pixels hit distinct bank quads). Then the CTA's threads each own a 2 x 4
// block of gW (SLOTS = C*C/8 blocks) and SPLITS = threads / SLOTS of them share one block, each
// walking every SPLITS-th pixel of the tile with its T components: one 8-byte gd and one 16-byte x
// read per 8 FMAs, and for C = 16 a warp is one split, so both reads are broadcasts. A CTA walks a fixed
// share of the tiles (tile = group, group + groups, ...), then adds its splits in order and
// writes one (C, C) partial; vector_neuron.py sums the partials in a fixed order. No atomics:
// the result is bit-identical run to run.
//
// A norm's affine map as a prologue (attribute affine = 1): the nonlinearity of x' = m_c (x - shift_c)
// + v_c per channel, computed in registers from x as it is read (the kernels of
// kernels/triton/_vn_kernel.py `_emit_affine` do the same), so the mapped block is never written;
// the backward's gx is then the gradient in x', and the map's own VJP is the caller's
// (kernels/_reduce.affine_backward). Past the last pixel x' = v - m shift is not 0, but gy is, so
// gs = gu = gd = 0 there and nothing reaches gW.
//
// Operands (unbatched shapes; any leading batch dims, the same on every operand): x, gy (C, T, S)
// row-major, w (C, C), aff (C, T*T + 2T: m row-major, v, shift per channel; any one float when
// affine = 0); results y, gx (C, T, S), part (groups, C * C). Attributes: channels, components,
// pixels, activation (0 relu, 1 gelu: each kernel is compiled per activation), eps, affine, and
// (backward) groups and tensor_cores (1: vector_neuron_mma.cuh's kernel, C = 16 and S % 4 == 0).
//
// Instructions (session 27, from the SASS of the (16, 3) backward: bench/NOTES.md): the activation
// a template argument, divisions as div.full.f32 (Triton's fp32 `/`), the prefetch's zeros by
// cp.async's source size and its addresses by one add a copy, gW's rows walked by pointer.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ---- device code (tests/test_vector_neuron_cuda.py compiles this part for the host as well)
constexpr int kThreads = 128;  // pixels per tile, one thread each
// The instantiated (C, T): vector_neuron.py's COVERED lists the same pairs.
#define GJ_VN_SIZES(X) X(8, 2) X(8, 3) X(8, 4) X(16, 2) X(16, 3) X(16, 4) X(32, 2)
constexpr int kRelu = 0, kGelu = 1;
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;
constexpr float kGeluA3 = 0.134145f;  // 3 kGeluA, the literal of the Triton kernel's h' (not 3.f * kGeluA)

// a / b as Triton compiles an fp32 division (div.full.f32: within 2 ulp, no slow path). IEEE `/`
// compiles to a call with a branch to a slow path: the backward's five divisions a channel held a
// fifth of its taken branches (bench/NOTES.md, "Session 27").
__device__ __forceinline__ float fast_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a / b;
#endif
}

// act(s), act'(s) (with `derivative`), h(s) and h'(s) of _vn_kernel._emit_local; the activation
// is a template argument, so the channel loop holds no branch on it.
template <bool kDerivative, int kAct>
__device__ __forceinline__ void local_gain(float s, float eps, float& h, float& dh) {
  float a, da = 0.f;
  if constexpr (kAct == kRelu) {
    a = s > 0.f ? s : 0.f;
    if (kDerivative) da = s > 0.f ? 1.f : 0.f;
  } else {
    const float z = kGeluC * (s + kGeluA * (s * s * s));
    const float ez = expf(-2.f * fabsf(z));  // tanh(z) from exp(-2|z|) <= 1: no overflow
    float th = fast_div(1.f - ez, 1.f + ez);
    th = z < 0.f ? -th : th;
    const float cdf = 0.5f * (1.f + th);
    a = s * cdf;
    if (kDerivative) da = cdf + s * 0.5f * (1.f - th * th) * kGeluC * (1.f + kGeluA3 * (s * s));
  }
  const float rq = fast_div(1.f, fabsf(s) + eps);  // 1 / q, q = |s| + eps
  const float gain = a * rq;
  h = (gain - 1.f) * s;
  if (kDerivative) {
    const float sgn = s > 0.f ? 1.f : (s < 0.f ? -1.f : 0.f);  // d|s|/ds, 0 at 0 (as jnp.abs)
    dh = (da - a * sgn * rq) * rq * s + (gain - 1.f);
  }
}

// A 4-byte asynchronous copy global -> shared, zeros where !ok (cp.async's source size 0 reads
// nothing and fills the destination with zeros: no branch, no separate store), and its waits (the
// host build of the device code, tests/vn_cuda_host.cpp, copies at once).
__device__ __forceinline__ void copy4_async(float* dst, const float* src, bool ok) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  // "memory": the compiler must not move this thread's earlier reads of the slot past the copy
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 4u : 0u) : "memory");
#else
  *dst = ok ? *src : 0.f;
#endif
}
// A 16-byte one, zeros where !ok (the tensor-core backward's m-tile rows; the host build copies at once).
__device__ __forceinline__ void copy16_async(float* dst, const float* src, bool ok) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16u : 0u) : "memory");
#else
  for (int i = 0; i < 4; ++i) dst[i] = ok ? src[i] : 0.f;
#endif
}
// A line of global memory into L2 ahead of its use (nothing on the host build).
__device__ __forceinline__ void prefetch_l2(const float* src) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(src));
#endif
}
__device__ __forceinline__ void copies_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void copies_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// One thread's pixel p of a tile, C x T values of `src` (row-major (C, T, S) from `base`), into its
// column of `dst` ([C T][kThreads]); zeros past the end (p >= S).
template <int C, int T>
__device__ __forceinline__ void prefetch_column(float* dst, const float* src, int p, int S) {
  const int tid = threadIdx.x;
  const bool ok = p < S;
  const float* at = src + (ok ? p : 0);  // a valid address where nothing is read
#pragma unroll
  for (int e = 0; e < C * T; ++e, at += S) copy4_async(dst + e * kThreads + tid, at, ok);
}

// f(k, W[c, k]) for k ascending, W's row c read as float4 broadcasts from shared memory: the
// product W x (mix_row) and the backward's scatter W^T gd both walk a row this way.
template <int C, typename F>
__device__ __forceinline__ void for_row_of_w(const float4* sw, int c, F&& f) {
#pragma unroll
  for (int kq = 0; kq < C / 4; ++kq) {
    const float4 wq = sw[c * (C / 4) + kq];
    const float wk[4] = {wq.x, wq.y, wq.z, wq.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) f(4 * kq + i, wk[i]);
  }
}

// d_c = W[c, :] x (T components), k ascending.
template <int C, int T>
__device__ __forceinline__ void mix_row(const float4* sw, int c, const float (&x)[C][T], float (&d)[T]) {
#pragma unroll
  for (int t = 0; t < T; ++t) d[t] = 0.f;
  for_row_of_w<C>(sw, c, [&](int k, float w) {
#pragma unroll
    for (int t = 0; t < T; ++t) d[t] = fmaf(w, x[k][t], d[t]);
  });
}

// n, 1 / (n + eps), u and s of one channel.
template <int T>
__device__ __forceinline__ void local_unit(const float (&d)[T], const float* xc, float eps, float& n, float& inv,
                                           float (&u)[T], float& s) {
  float nsq = 0.f;
#pragma unroll
  for (int t = 0; t < T; ++t) nsq = fmaf(d[t], d[t], nsq);
  n = nsq > 0.f ? sqrtf(nsq) : 0.f;
  inv = fast_div(1.f, n + eps);
  s = 0.f;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    u[t] = d[t] * inv;
    s = fmaf(xc[t], u[t], s);
  }
}

// The backward's terms of one (pixel, channel) from its d = W x, x and gy (T components each):
// gd, and gx's local part gy + gs u (W^T gd is the caller's). Both backward kernels run it.
template <int T, int kAct>
__device__ __forceinline__ void local_backward(const float (&d)[T], const float (&x)[T], const float (&gy)[T], float eps,
                                               float (&gd)[T], float (&gx_local)[T]) {
  float u[T], n, inv, s, h, dh;
  local_unit<T>(d, x, eps, n, inv, u, s);
  local_gain<true, kAct>(s, eps, h, dh);
  float gyu = 0.f;
#pragma unroll
  for (int t = 0; t < T; ++t) gyu = fmaf(gy[t], u[t], gyu);
  const float gs = gyu * dh;
  const float inv_n = n > 0.f ? fast_div(1.f, n) : 0.f;  // d|d|/dd = d / |d|, 0 at d = 0
  float gu[T], gud = 0.f;
#pragma unroll
  for (int t = 0; t < T; ++t) {
    gu[t] = h * gy[t] + gs * x[t];
    gud = fmaf(gu[t], d[t], gud);
  }
  const float coef = gud * (inv * inv * inv_n);
#pragma unroll
  for (int t = 0; t < T; ++t) {
    gd[t] = gu[t] * inv - coef * d[t];
    gx_local[t] = gy[t] + gs * u[t];
  }
}

template <int C>
__device__ __forceinline__ void load_weight(float4* sw, const float* w) {
  for (int e = threadIdx.x; e < C * C / 4; e += blockDim.x) sw[e] = reinterpret_cast<const float4*>(w)[e];
}

template <int T>
constexpr int kAffineRow = T * T + 2 * T;  // m (T x T), v, shift: one channel's coefficients

template <int C, int T>
__device__ __forceinline__ void load_affine(float* s_aff, const float* aff) {
  for (int e = threadIdx.x; e < C * kAffineRow<T>; e += blockDim.x) s_aff[e] = aff[e];
}

// x <- m (x - shift) + v for one channel's T components, a = its coefficients (read as broadcasts).
template <int T>
__device__ __forceinline__ void affine_map(const float* a, float (&x)[T]) {
  float xs[T];
#pragma unroll
  for (int j = 0; j < T; ++j) xs[j] = x[j] - a[T * T + T + j];
#pragma unroll
  for (int i = 0; i < T; ++i) {
    float r = a[T * T + i];
#pragma unroll
    for (int j = 0; j < T; ++j) r = fmaf(a[i * T + j], xs[j], r);
    x[i] = r;
  }
}

template <int C, int T, bool kAffine, int kAct>
__global__ void __launch_bounds__(kThreads) forward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                           const float* __restrict__ aff, float* __restrict__ y, int S,
                                                           float eps) {
  __shared__ float4 sw[C * C / 4];
  __shared__ float s_aff[C * kAffineRow<T>];
  const size_t b = blockIdx.y;
  load_weight<C>(sw, w + b * C * C);
  if constexpr (kAffine) load_affine<C, T>(s_aff, aff + b * C * kAffineRow<T>);
  const int p = blockIdx.x * kThreads + threadIdx.x;
  const bool ok = p < S;
  const float* xb = x + b * C * T * (size_t)S + p;
  float xv[C][T];
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int t = 0; t < T; ++t) xv[c][t] = ok ? xb[(size_t)(c * T + t) * S] : 0.f;
  __syncthreads();
  if (!ok) return;
  if constexpr (kAffine) {
#pragma unroll
    for (int c = 0; c < C; ++c) affine_map<T>(s_aff + c * kAffineRow<T>, xv[c]);
  }
  float* yb = y + b * C * T * (size_t)S + p;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    float d[T], u[T], n, inv, s, h, dh;
    mix_row<C, T>(sw, c, xv, d);
    local_unit<T>(d, xv[c], eps, n, inv, u, s);
    local_gain<false, kAct>(s, eps, h, dh);
#pragma unroll
    for (int t = 0; t < T; ++t) yb[(size_t)(c * T + t) * S] = xv[c][t] + h * u[t];
  }
}

template <int C, int T>
struct Bwd {
  static constexpr int kPitch = T * C + 4;          // floats per staged pixel row (== 4 mod 8)
  static constexpr int kSlots = C * C / 8;          // 2 x 4 blocks of gW
  static constexpr int kSplits = kThreads / kSlots;  // threads per block, each every kSplits-th row
  static constexpr int kBlocksPerRow = C / 4;
  // 32 channels and up: the channel loop rolled (four channels an iteration). Fully unrolled, the
  // (32, 2) backward's code outgrew the instruction cache: ncu's top stall was no_instruction
  // with one 4-warp CTA an SM to cover it (bench/NOTES.md, "Session 37").
  static constexpr bool kWide = C >= 32;
  // Whether the next tile's x is copied into shared memory a tile ahead. A wide block loads its x
  // from global memory at the tile's start instead (with an L2 prefetch a tile ahead): the copy's
  // 32 KB would take the (32, 2) kernel to 137 KB, one CTA (4 warps) an SM with nothing to cover
  // the loop's latencies; without it 105 KB, two CTAs an SM, one loading while the other computes.
  static constexpr bool kCopyX = !kWide;
  static_assert(C % 8 == 0 && kThreads % kSlots == 0 && kPitch % 8 == 4, "unsupported size");
  static constexpr size_t smem_bytes() {  // W, the gW staging of x and gd, the next tile's (x and) gy, the affine map
    return sizeof(float) * (C * C + 2 * (size_t)kThreads * kPitch + (kCopyX ? 2 : 1) * (size_t)C * T * kThreads +
                            C * kAffineRow<T>);
  }
};

// This thread's pixel row of the gW staging: x as float4s of four channels per component.
template <int C, int T>
__device__ __forceinline__ void stage_row(float* row, const float (&xv)[C][T]) {
#pragma unroll
  for (int t = 0; t < T; ++t)
#pragma unroll
    for (int kq = 0; kq < C / 4; ++kq)
      *reinterpret_cast<float4*>(row + t * C + 4 * kq) =
          make_float4(xv[4 * kq][t], xv[4 * kq + 1][t], xv[4 * kq + 2][t], xv[4 * kq + 3][t]);
}

template <int C, int T, bool kAffine, int kAct>
__global__ void __launch_bounds__(kThreads, 2) backward_kernel(const float* __restrict__ x, const float* __restrict__ w,
                                                            const float* __restrict__ aff, const float* __restrict__ gy,
                                                            float* __restrict__ gx, float* __restrict__ part, int S,
                                                            int groups, float eps) {
  using K = Bwd<C, T>;
  extern __shared__ float4 smem4[];
  float4* sw = smem4;                                   // C * C floats
  float* xs = reinterpret_cast<float*>(smem4 + C * C / 4);  // kThreads * kPitch
  float* gds = xs + kThreads * K::kPitch;                // kThreads * kPitch
  float* next_x = gds + kThreads * K::kPitch;            // [C T][kThreads]: the tile's x, copied a tile ahead (kCopyX)
  float* next_gy = next_x + (K::kCopyX ? C * T * kThreads : 0);  // [C T][kThreads]: its gy
  float* s_aff = next_gy + C * T * kThreads;             // [C][affine_row]
  const size_t b = blockIdx.y;
  const int grp = blockIdx.x, tid = threadIdx.x;
  load_weight<C>(sw, w + b * C * C);
  if constexpr (kAffine) load_affine<C, T>(s_aff, aff + b * C * kAffineRow<T>);
  const size_t base = b * C * T * (size_t)S;
  const int slot = tid % K::kSlots, split = tid / K::kSlots;
  const int c0 = 2 * (slot / K::kBlocksPerRow), k0 = 4 * (slot % K::kBlocksPerRow);
  float gw[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  float* xrow = xs + tid * K::kPitch;
  float* gdrow = gds + tid * K::kPitch;
  const int tiles = (S + kThreads - 1) / kThreads;
  if (grp < tiles) {
    if constexpr (K::kCopyX) prefetch_column<C, T>(next_x, x + base, grp * kThreads + tid, S);
    prefetch_column<C, T>(next_gy, gy + base, grp * kThreads + tid, S);
    copies_commit();
  }
  __syncthreads();
  for (int tile = grp; tile < tiles; tile += groups) {
    const int p = tile * kThreads + tid;
    const bool ok = p < S;
    const bool more = tile + groups < tiles;
    // past the end: x = gy = 0 (zeros in the copies), so d = 0, h = gs = 0, gu = gd = 0: nothing
    // reaches gW
    copies_wait_all();  // this thread's copies of the tile's (x and) gy
    // x' in place in this thread's column (the coefficients landed before the first barrier), one
    // channel at a time: mapped in registers beside x and acc, (16, 4) spilled
    if constexpr (kAffine && K::kCopyX) {
      for (int c = 0; c < C; ++c) {
        float xc[T];
#pragma unroll
        for (int t = 0; t < T; ++t) xc[t] = next_x[(c * T + t) * kThreads + tid];
        affine_map<T>(s_aff + c * kAffineRow<T>, xc);
#pragma unroll
        for (int t = 0; t < T; ++t) next_x[(c * T + t) * kThreads + tid] = xc[t];
      }
    }
    float xv[C][T], acc[C][T];
    if constexpr (K::kCopyX) {
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int t = 0; t < T; ++t) xv[c][t] = next_x[(c * T + t) * kThreads + tid];
      if (more) {  // the next tile's x into the column just read
        prefetch_column<C, T>(next_x, x + base, p + groups * kThreads, S);
        copies_commit();
      }
    } else {
      // x from global memory (in L2 where the previous tile's prefetch reached it), mapped in registers
      const float* xb = x + base + (ok ? p : 0);
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int t = 0; t < T; ++t) xv[c][t] = ok ? xb[(size_t)(c * T + t) * S] : 0.f;
      if constexpr (kAffine) {
#pragma unroll
        for (int c = 0; c < C; ++c) affine_map<T>(s_aff + c * kAffineRow<T>, xv[c]);
      }
      if (more) {  // the next tile's x into L2: lane l of a warp takes rows l, l + 32, ... of its 32 pixels
        const int q = p - (tid & 31) + groups * kThreads;  // the warp's first pixel in the next tile
        if (q < S)
          for (int e = tid & 31; e < C * T; e += 32) prefetch_l2(x + base + (size_t)e * S + q);
      }
    }
    if constexpr (K::kWide) stage_row<C, T>(xrow, xv);  // x_c is read back from it in the channel loop
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int t = 0; t < T; ++t) acc[c][t] = 0.f;
    // Channels four at a time; a wide block's outer loop stays rolled (K::kWide, above), so that
    // it reads x_c from its staged row and leaves gx's local part in gy's column, not in
    // dynamically indexed registers.
#pragma unroll(K::kWide ? 1 : C / 4)
    for (int cq = 0; cq < C / 4; ++cq) {
      float gdq[4][T];  // gd of the four channels, stored as float4s
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = 4 * cq + i;
        float d[T], g[T], gxl[T], xc[T];
        mix_row<C, T>(sw, c, xv, d);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          g[t] = next_gy[(c * T + t) * kThreads + tid];
          xc[t] = K::kWide ? xrow[t * C + c] : xv[c][t];
        }
        local_backward<T, kAct>(d, xc, g, eps, gdq[i], gxl);
#pragma unroll
        for (int t = 0; t < T; ++t) {
          if constexpr (K::kWide) next_gy[(c * T + t) * kThreads + tid] = gxl[t];  // this thread's own slot
          else acc[c][t] += gxl[t];
        }
        // W^T gd: channel c's gd reaches every k through W[c, k] (the row d_c read)
        for_row_of_w<C>(sw, c, [&](int k, float w) {
#pragma unroll
          for (int t = 0; t < T; ++t) acc[k][t] = fmaf(w, gdq[i][t], acc[k][t]);
        });
      }
#pragma unroll
      for (int t = 0; t < T; ++t)
        *reinterpret_cast<float4*>(gdrow + t * C + 4 * cq) = make_float4(gdq[0][t], gdq[1][t], gdq[2][t], gdq[3][t]);
    }
    // the next tile's gy, behind this one's stores and gW; a wide block's gx reads its local part
    // from gy's column first
    const auto prefetch_gy = [&] {
      if (more) {
        prefetch_column<C, T>(next_gy, gy + base, p + groups * kThreads, S);
        copies_commit();
      }
    };
    if constexpr (!K::kWide) prefetch_gy();
    if (ok) {
      float* gxb = gx + base + p;
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int t = 0; t < T; ++t)
          gxb[(size_t)(c * T + t) * S] = K::kWide ? acc[c][t] + next_gy[(c * T + t) * kThreads + tid] : acc[c][t];
    }
    if constexpr (K::kWide) prefetch_gy();
    if constexpr (!K::kWide) stage_row<C, T>(xrow, xv);
    __syncthreads();
    // this thread's split takes every kSplits-th pixel of the tile, each with all T components
    // (pointers walked by the pitch: no division by T, 4x unrolled)
    const float* g_at = gds + split * K::kPitch + c0;
    const float* x_at = xs + split * K::kPitch + k0;
#pragma unroll 4
    for (int r = split; r < kThreads; r += K::kSplits, g_at += K::kSplits * K::kPitch, x_at += K::kSplits * K::kPitch) {
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const float2 g2 = *reinterpret_cast<const float2*>(g_at + t * C);
        const float4 x4 = *reinterpret_cast<const float4*>(x_at + t * C);
        const float gv[2] = {g2.x, g2.y}, xk[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) gw[i][q] = fmaf(gv[i], xk[q], gw[i][q]);
      }
    }
    __syncthreads();
  }
  // the splits' blocks meet in shared memory (xs, free now) and are added in split order
  float* red = xs;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int q = 0; q < 4; ++q) red[split * C * C + (c0 + i) * C + k0 + q] = gw[i][q];
  __syncthreads();
  float* pb = part + (b * groups + grp) * (size_t)(C * C);
  for (int e = tid; e < C * C; e += kThreads) {
    float sum = red[e];
    for (int sp = 1; sp < K::kSplits; ++sp) sum += red[sp * C * C + e];
    pb[e] = sum;
  }
}

// The backward of C = 16 on the tensor cores (the FFMA kernel above keeps C = 8 and pixel counts
// that are not a multiple of 4).
#include "vector_neuron_mma.cuh"

// ---- host side: launches and the FFI handlers
template <int C, int T>
cudaError_t launch_forward(const float* x, const float* w, const float* aff, float* y, int S, int batch, float eps,
                           int act, int affine, cudaStream_t stream) {
  const dim3 grid((S + kThreads - 1) / kThreads, batch);
  auto kernel = affine ? (act == kGelu ? forward_kernel<C, T, true, kGelu> : forward_kernel<C, T, true, kRelu>)
                       : (act == kGelu ? forward_kernel<C, T, false, kGelu> : forward_kernel<C, T, false, kRelu>);
  kernel<<<grid, kThreads, 0, stream>>>(x, w, aff, y, S, eps);
  return cudaGetLastError();
}

template <int T>
cudaError_t launch_backward_mma(const float* x, const float* w, const float* aff, const float* gy, float* gx,
                                float* part, int S, int groups, int batch, float eps, int act, int affine,
                                cudaStream_t stream) {
  const size_t smem = MmaBwd<T>::smem_bytes();
  auto kernel = affine ? (act == kGelu ? backward_mma_kernel<T, true, kGelu> : backward_mma_kernel<T, true, kRelu>)
                       : (act == kGelu ? backward_mma_kernel<T, false, kGelu> : backward_mma_kernel<T, false, kRelu>);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(groups, batch), kMmaWarps * 32, smem, stream>>>(x, w, aff, gy, gx, part, S, groups, eps);
  return cudaGetLastError();
}

template <int C, int T>
cudaError_t launch_backward(const float* x, const float* w, const float* aff, const float* gy, float* gx, float* part,
                            int S, int groups, int batch, float eps, int act, int affine, bool mma,
                            cudaStream_t stream) {
  if constexpr (C == 16) {  // the tensor-core kernel (Backward checked its 16-byte rows: S % 4 == 0)
    if (mma) return launch_backward_mma<T>(x, w, aff, gy, gx, part, S, groups, batch, eps, act, affine, stream);
  }
  const size_t smem = Bwd<C, T>::smem_bytes();
  auto kernel = affine ? (act == kGelu ? backward_kernel<C, T, true, kGelu> : backward_kernel<C, T, true, kRelu>)
                       : (act == kGelu ? backward_kernel<C, T, false, kGelu> : backward_kernel<C, T, false, kRelu>);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  if constexpr (Bwd<C, T>::kWide) {  // two CTAs of 105 KB an SM need the whole carveout as shared memory
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(groups, batch), kThreads, smem, stream>>>(x, w, aff, gy, gx, part, S, groups, eps);
  return cudaGetLastError();
}

ffi::Error bad(const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda VectorNeuron: " + why); }

ffi::Error failed(cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("ginjax cuda VectorNeuron: ") + cudaGetErrorString(err));
}

// Checks the sizes and attributes common to both calls; sets the batch.
ffi::Error check(int64_t C, int64_t T, int64_t S, int64_t act, float eps, int64_t affine, int64_t x_count,
                 int64_t w_count, int64_t aff_count, int64_t& batch) {
  if (C < 1 || T < 1 || S < 1) return bad("channels, components and pixels must be >= 1");
  if (S > (int64_t)INT32_MAX - kThreads) return bad("pixels must be below 2^31 - 128");
  if (act != kRelu && act != kGelu) return bad("activation must be 0 (relu) or 1 (gelu)");
  if (!(eps > 0.f)) return bad("eps must be > 0");
  const int64_t per = C * T * S;
  batch = x_count / per;
  if (batch < 1 || batch > 65535 || x_count != batch * per) return bad("the block's size is not batch x C x T x S");
  if (w_count != batch * C * C) return bad("the weight's size is not batch x C x C");
  if (affine != 0 && affine != 1) return bad("affine must be 0 or 1");
  if (affine && aff_count != batch * C * (T * T + 2 * T)) return bad("the affine map's size is not batch x C x (T^2 + 2T)");
  return ffi::Error::Success();
}

ffi::Error Forward(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> aff,
                   ffi::ResultBuffer<ffi::F32> y, int64_t C, int64_t T, int64_t S, int64_t act, float eps,
                   int64_t affine) {
  int64_t batch = 0;
  ffi::Error e = check(C, T, S, act, eps, affine, x.element_count(), w.element_count(), aff.element_count(), batch);
  if (e.failure()) return e;
  if (y->element_count() != x.element_count()) return bad("the result's size differs from the block's");
#define GJ_FWD(c, t)                                                                                       \
  if (C == c && T == t)                                                                                    \
    return failed(launch_forward<c, t>(x.typed_data(), w.typed_data(), aff.typed_data(), y->typed_data(), (int)S, \
                                       (int)batch, eps, (int)act, (int)affine, stream));
  GJ_VN_SIZES(GJ_FWD)
#undef GJ_FWD
  return bad("(channels, components) = (" + std::to_string(C) + ", " + std::to_string(T) + ") is not compiled");
}

ffi::Error Backward(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> aff,
                    ffi::Buffer<ffi::F32> gy, ffi::ResultBuffer<ffi::F32> gx, ffi::ResultBuffer<ffi::F32> part, int64_t C,
                    int64_t T, int64_t S, int64_t act, float eps, int64_t affine, int64_t groups,
                    int64_t tensor_cores) {
  int64_t batch = 0;
  ffi::Error e = check(C, T, S, act, eps, affine, x.element_count(), w.element_count(), aff.element_count(), batch);
  if (e.failure()) return e;
  if (gy.element_count() != x.element_count() || gx->element_count() != x.element_count())
    return bad("the cotangent's or the input gradient's size differs from the block's");
  if (groups < 1 || groups > 65535) return bad("groups must be in [1, 65535]");
  if (part->element_count() != batch * groups * C * C) return bad("the partials' size is not batch x groups x C x C");
  if (tensor_cores != 0 && tensor_cores != 1) return bad("tensor_cores must be 0 or 1");
  if (tensor_cores && (C != 16 || S % 4)) return bad("the tensor-core backward takes 16 channels and S % 4 == 0");
#define GJ_BWD(c, t)                                                                                           \
  if (C == c && T == t)                                                                                        \
    return failed(launch_backward<c, t>(x.typed_data(), w.typed_data(), aff.typed_data(), gy.typed_data(),      \
                                        gx->typed_data(), part->typed_data(), (int)S, (int)groups, (int)batch, eps, \
                                        (int)act, (int)affine, tensor_cores == 1, stream));
  GJ_VN_SIZES(GJ_BWD)
#undef GJ_BWD
  return bad("(channels, components) = (" + std::to_string(C) + ", " + std::to_string(T) + ") is not compiled");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaVnForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("components")
                                  .Attr<int64_t>("pixels")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("affine"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaVnBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("channels")
                                  .Attr<int64_t>("components")
                                  .Attr<int64_t>("pixels")
                                  .Attr<int64_t>("activation")
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("affine")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("tensor_cores"));
