// The VectorNeuron backward of 16-channel blocks on the tensor cores (vector_neuron.cu's device
// code includes this; its math, operands and the FFMA kernel it replaces for C = 16 are there).
//
// Why. The FFMA backward (one thread a pixel, W broadcast from shared memory) issues ~4,700
// instructions per warp and tile of 32 pixels, 2,304 of them the channel mixing's FMAs (d = W x,
// W^T gd and gW, 768 each): it is instruction-bound, 3-5x above the 0.13 ms its bytes need on the
// standard block (bench/NOTES.md, "Session 27"). Here the three products are mma.sync.m16n8k8 in
// 3xTF32 (each operand split into a rounded tf32 part and its remainder, three mma a product,
// meant for fp32's accuracy as the FFMA kernel's; on the H200 the gradients came out 10x further
// from float64, so the kernel is opt-in: `mma_x3`), 108 mma per warp and 16 pixels, and the FP32
// pipe keeps only the per-(pixel, channel) elementwise terms.
//
// Work split. A warp owns m-tiles of 16 pixels (the mma's M) and walks its own share (CTA grp,
// warp w: pixels 64 (grp + groups i) + 16 w): no CTA barrier between the first and the last. Its
// registers hold an m-tile in the mma's accumulator layout: lane (g, tid) has pixels g, g + 8 and
// channels 2 tid, 2 tid + 1 of each 8-channel n-tile, every component t (x, gy, d: 4 T floats a
// n-tile), so a (pixel, channel)'s T components, all its elementwise terms need, are one lane's.
//   - d = X W^T (M pixels, N output channels, K input channels) and G = GD W (K output channels):
//     an accumulator's channels are an A fragment's columns once the K index is permuted per
//     8-chunk (A column tid <-> channel 2 tid, tid + 4 <-> 2 tid + 1; W's B fragments read with
//     the same permutation), so x and gd go from the accumulator layout to the mma as they are.
//     G's accumulator starts at gy + gs u: the mma adds W^T gd onto it, and the sum is gx.
//   - gW = sum over pixels of GD^T X has K = pixels, which the lanes hold as rows: GD and X are
//     staged per warp in shared memory ([pixel][t C + c], pitch == 8 mod 32: the 8-byte stores and
//     the fragment loads are conflict-free) and read back in the fragments' layout. Each m-tile's
//     gW starts from zero in the tensor cores and is added to the running sum by FADD (the tensor
//     cores' fp32 accumulation truncates: summed there over a warp's ~1,000 pixels it would drift
//     past fp32's tolerance, as the weight gradient's long strips did; bench/NOTES.md "Session 25").
// Loads. The m-tile's x and gy rows ((c, t): 16 pixels, 64 contiguous bytes in the planar block)
// come by 16-byte cp.async into the warp's buffers [t][c][20 floats] (2 x 20 x tid mod 32 are
// distinct multiples of 8: the accumulator-layout reads are conflict-free); once the lanes have
// them in registers the next m-tile's copies are issued into the same buffers. Pixels past S read
// as zeros (cp.async's source size 0), so d = 0 and nothing reaches gW; S must be a multiple of 4
// (16-byte rows), which vector_neuron.cu's Backward checks before it picks this kernel.
//
// The host build (tests/vn_cuda_host.cpp) runs this code with one OS thread a lane: the mma and
// __syncwarp come from the harness there (host_mma_tf32: the fragments exchanged at a warp
// barrier, operands truncated to tf32 as the tensor cores read them).

constexpr int kMmaWarps = 4;                 // warps a CTA (128 threads, as the FFMA kernel)
constexpr int kMmaRows = 16;                 // pixels of a warp's m-tile: the mma's M
constexpr int kMmaStep = kMmaWarps * kMmaRows;  // pixels a CTA's warps take per step
constexpr int kMmaInPitch = 20;              // floats per (t, c) row of a staged m-tile

__device__ __forceinline__ void mma_tf32x1(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__)
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#elif defined(GJ_HOST_HARNESS)  // tests/vn_cuda_host.cpp (nvcc's own host pass never calls this)
  host_mma_tf32(d, a, b0, b1);
#endif
}

// 3xTF32's split x = hi + lo: hi is x rounded to tf32 on its bits (add half an ulp of tf32, clear
// the 13 low bits), lo = x - hi (exact, |lo| <= 2^-11 |x|) rounded the same way: the products
// lose ~2^-23 of x, with no bias. Seven integer / FP32 instructions a split, where cvt.rna takes
// ~9 (at 96 splits an m-tile, a large part of the loop). Both roundings matter because truncation
// errs one way, so its errors add up along a dot product instead of cancelling: hi truncated
// missed fp32's tolerance on the host build (1.2e-5 on gx), lo read truncated by the mma left the
// standard gelu block's gW at 3.1e-5 from float64 on the H200 (the XLA path's fp32: 8.7e-6; the
// FFMA kernel's: 2.8e-6). NaN: the GPU's canonical NaN 0x7fffffff rounds into the sign bit (-0), as
// in session 25's tf32 bug, so lo takes x itself there and carries the NaN; an inf stays inf in hi
// (and makes lo NaN): a non-finite input keeps its outputs non-finite.
__device__ __forceinline__ void split_x3(float x, uint32_t& hi, uint32_t& lo) {
  hi = (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
  lo = (__float_as_uint(x - __uint_as_float(hi)) + 0x1000u) & 0xffffe000u;
  if (x != x) lo = __float_as_uint(x);  // NaN: the rounding carried 0x7fffffff into the sign (-0)
}

// B's two registers split: hi (b0, b1), then lo (b0, b1).
struct SplitB {
  uint32_t h0, h1, l0, l1;
  __device__ __forceinline__ SplitB() = default;
  __device__ __forceinline__ SplitB(float b0, float b1) {
    split_x3(b0, h0, l0);
    split_x3(b1, h1, l1);
  }
};

// d += A B in 3xTF32 from split fragments, the two remainder products (lo x hi, hi x lo) into
// `rest` and hi x hi into d: the tensor cores truncate each mma's sum toward zero relative to its
// largest addend, so three mma a k-step into one accumulator gave d three biased truncations a
// k-step (gradients 10x the FFMA kernel's error on the H200, session 28); with the remainders
// apart, d takes one, and the caller adds `rest` (started at zero, small) by FADD.
__device__ __forceinline__ void mma_x3(float (&d)[4], float (&rest)[4], const uint32_t (&ah)[4],
                                       const uint32_t (&al)[4], const SplitB& b) {
  mma_tf32x1(rest, al, b.h0, b.h1);
  mma_tf32x1(rest, ah, b.l0, b.l1);
  mma_tf32x1(d, ah, b.h0, b.h1);
}

// acc += rest, element by element (round to nearest).
__device__ __forceinline__ void add_rest(float (&acc)[4], const float (&rest)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] += rest[k];
}

// An A fragment (rows g, g + 8; columns tid, tid + 4) from four floats in the accumulator layout
// (rows g, g + 8; columns 2 tid, 2 tid + 1), the permutation of K above: split into hi and lo.
__device__ __forceinline__ void a_from_acc(const float (&v)[4], uint32_t (&hi)[4], uint32_t (&lo)[4]) {
  split_x3(v[0], hi[0], lo[0]);  // (g, 2 tid)
  split_x3(v[2], hi[1], lo[1]);  // (g + 8, 2 tid)
  split_x3(v[1], hi[2], lo[2]);  // (g, 2 tid + 1)
  split_x3(v[3], hi[3], lo[3]);  // (g + 8, 2 tid + 1)
}

// acc[t][nt] += A_t B over the 16 channels (K), per component t: A_t in the accumulator layout
// (`a_from_acc`), B the split W fragments [kc][nt].
template <int T>
__device__ __forceinline__ void mix_channels(float (&acc)[T][2][4], const float (&a)[T][2][4], const SplitB (&w)[2][2]) {
#pragma unroll
  for (int t = 0; t < T; ++t) {
    float rest[2][4] = {};
#pragma unroll
    for (int kc = 0; kc < 2; ++kc) {
      uint32_t ah[4], al[4];
      a_from_acc(a[t][kc], ah, al);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) mma_x3(acc[t][nt], rest[nt], ah, al, w[kc][nt]);
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) add_rest(acc[t][nt], rest[nt]);
  }
}

// An m-tile in the accumulator layout into a warp's staging [pixel][t C + c] (pitch P): one
// 8-byte store per (t, n-tile, row half).
template <int T, int P>
__device__ __forceinline__ void stage_acc(float* st, const float (&v)[T][2][4], int g, int tid) {
#pragma unroll
  for (int t = 0; t < T; ++t)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        *reinterpret_cast<float2*>(st + (g + 8 * h) * P + t * 16 + 8 * nt + 2 * tid) =
            make_float2(v[t][nt][2 * h], v[t][nt][2 * h + 1]);
}

template <int T>
struct MmaBwd {
  static constexpr int C = 16, NT = 2;  // channels, 8-channel n-tiles
  static constexpr int kIn = T * C * kMmaInPitch;              // one operand's staged m-tile
  static constexpr int kStPitch = (T * C + 23) / 32 * 32 + 8;  // >= T C, == 8 mod 32
  static constexpr int kSt = kMmaRows * kStPitch;              // GD or X of an m-tile, [pixel][t C + c]
  static constexpr int kWarp = 2 * kIn + 2 * kSt;              // a warp's floats (gW's reduction reuses them)
  static_assert(kWarp >= C * C && kMmaInPitch % 4 == 0, "unsupported size");
  static constexpr size_t smem_bytes() { return sizeof(float) * ((size_t)kMmaWarps * kWarp + C * kAffineRow<T>); }
};

// The warp's 16-byte copies of one m-tile of `src` (the example's planar (C, T, S) block) from
// pixel p0 into `buf` ([t][c][kMmaInPitch]): T C rows of 4 float4, 2 T a lane, zeros past S.
template <int T>
__device__ __forceinline__ void mma_tile_copy(float* buf, const float* src, int p0, int S, int lane) {
#pragma unroll
  for (int i = 0; i < 2 * T; ++i) {
    const int e = lane + 32 * i, r = e >> 2, q = e & 3;  // global row r = c T + t, float4 q
    const int c = r / T, t = r - c * T;
    const int p = p0 + 4 * q;
    copy16_async(buf + (t * 16 + c) * kMmaInPitch + 4 * q, src + (p < S ? (size_t)r * S + p : 0), p < S);
  }
}

// Residency: 3 CTAs an SM for T <= 3 (68.5 KB of shared memory at T = 3), 2 at T = 4 (79.4 KB);
// vector_neuron.py's COVERED holds the same, checked against ptxas by the slow test.
template <int T, bool kAffine, int kAct>
__global__ void __launch_bounds__(kMmaWarps * 32, T <= 3 ? 3 : 2)
    backward_mma_kernel(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ aff,
                        const float* __restrict__ gy, float* __restrict__ gx, float* __restrict__ part, int S,
                        int groups, float eps) {
  using K = MmaBwd<T>;
  constexpr int C = K::C, NT = K::NT;
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  float* s_aff = smem + kMmaWarps * K::kWarp;
  const size_t b = blockIdx.y;
  const int grp = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tid = lane & 3;
  float* bx = smem + warp * K::kWarp;  // the warp's x m-tile, then gy's, then the GD and X staging
  float* bg = bx + K::kIn;
  float* st_gd = bg + K::kIn;
  float* st_x = st_gd + K::kSt;
  if constexpr (kAffine) {
    load_affine<C, T>(s_aff, aff + b * C * kAffineRow<T>);
  }
  // W's B fragments, split once: d = X W^T takes B[k][n] = W[8 nt + n][8 kc + perm(k)], G = GD W
  // takes B[k][n] = W[8 kc + perm(k)][8 nt + n]; perm(tid) = 2 tid, perm(tid + 4) = 2 tid + 1
  const float* wb = w + b * C * C;
  SplitB wd[NT][NT], wg[NT][NT];  // [kc][nt]
#pragma unroll
  for (int kc = 0; kc < NT; ++kc)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      wd[kc][nt] = SplitB(wb[(8 * nt + g) * C + 8 * kc + 2 * tid], wb[(8 * nt + g) * C + 8 * kc + 2 * tid + 1]);
      wg[kc][nt] = SplitB(wb[(8 * kc + 2 * tid) * C + 8 * nt + g], wb[(8 * kc + 2 * tid + 1) * C + 8 * nt + g]);
    }
  const size_t base = b * (size_t)C * T * S;
  const int steps = (S + kMmaStep - 1) / kMmaStep;
  if (grp < steps) mma_tile_copy<T>(bx, x + base, grp * kMmaStep + kMmaRows * warp, S, lane);
  if (grp < steps) mma_tile_copy<T>(bg, gy + base, grp * kMmaStep + kMmaRows * warp, S, lane);
  copies_commit();
  __syncthreads();  // the affine coefficients
  float gw[NT][4] = {};  // gW[o = g (+8)][c = 8 nt + 2 tid (+1)], this warp's pixels so far
  for (int step = grp; step < steps; step += groups) {
    const int p0 = step * kMmaStep + kMmaRows * warp;
    copies_wait_all();
    __syncwarp();  // every lane's copies landed; every lane is past the last m-tile's staging reads
    // the m-tile in the accumulator layout: v[t][nt][k], pixel g + 8 (k >> 1), channel 8 nt + 2 tid + (k & 1)
    float xv[T][NT][4], gv[T][NT][4];
#pragma unroll
    for (int t = 0; t < T; ++t)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int at = (t * C + 8 * nt + 2 * tid + (k & 1)) * kMmaInPitch + g + 8 * (k >> 1);
          xv[t][nt][k] = bx[at];
          gv[t][nt][k] = bg[at];
        }
    __syncwarp();  // every lane has read the buffers: the next m-tile's copies may land there
    if (step + groups < steps) {
      mma_tile_copy<T>(bx, x + base, p0 + groups * kMmaStep, S, lane);
      mma_tile_copy<T>(bg, gy + base, p0 + groups * kMmaStep, S, lane);
    }
    copies_commit();
    if constexpr (kAffine) {  // x' = m (x - shift) + v per (pixel, channel), in registers
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          float xc[T];
#pragma unroll
          for (int t = 0; t < T; ++t) xc[t] = xv[t][nt][k];
          affine_map<T>(s_aff + (8 * nt + 2 * tid + (k & 1)) * kAffineRow<T>, xc);
#pragma unroll
          for (int t = 0; t < T; ++t) xv[t][nt][k] = xc[t];
        }
    }
    stage_acc<T, K::kStPitch>(st_x, xv, g, tid);  // X, the nonlinearity's input, for gW
    float dv[T][NT][4] = {};
    mix_channels<T>(dv, xv, wd);  // d = X W^T per component
    // per (pixel, channel): the elementwise terms; gd into dv (d's last use), gy + gs u into gv
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float d[T], xc[T], gyc[T], gd[T], gxl[T];
#pragma unroll
        for (int t = 0; t < T; ++t) d[t] = dv[t][nt][k], xc[t] = xv[t][nt][k], gyc[t] = gv[t][nt][k];
        local_backward<T, kAct>(d, xc, gyc, eps, gd, gxl);
#pragma unroll
        for (int t = 0; t < T; ++t) dv[t][nt][k] = gd[t], gv[t][nt][k] = gxl[t];
      }
    // GD staged for gW; gx = (gy + gs u) + GD W, the mma accumulating onto the local part
    stage_acc<T, K::kStPitch>(st_gd, dv, g, tid);
    mix_channels<T>(gv, dv, wg);
    {
      float* gxb = gx + base;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int p = p0 + g + 8 * h;
        if (p < S) {
#pragma unroll
          for (int t = 0; t < T; ++t)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int j = 0; j < 2; ++j) gxb[(size_t)((8 * nt + 2 * tid + j) * T + t) * S + p] = gv[t][nt][2 * h + j];
        }
      }
    }
    __syncwarp();  // the staging's stores are every lane's to read
    // gW[o][c] += sum over the m-tile's pixels p and t of GD[p][o] X[p][c]: M = o, N = c, K = p
    float gwt[NT][4] = {}, gwt_rest[NT][4] = {};
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int t = 0; t < T; ++t) {
        const float* gd_k = st_gd + (8 * ks + tid) * K::kStPitch + t * C + g;
        const float* x_k = st_x + (8 * ks + tid) * K::kStPitch + t * C + g;
        const float av[4] = {gd_k[0], gd_k[8], gd_k[4 * K::kStPitch], gd_k[4 * K::kStPitch + 8]};
        uint32_t ah[4], al[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) split_x3(av[r], ah[r], al[r]);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          mma_x3(gwt[nt], gwt_rest[nt], ah, al, SplitB(x_k[8 * nt], x_k[4 * K::kStPitch + 8 * nt]));
      }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      add_rest(gwt[nt], gwt_rest[nt]);
      add_rest(gw[nt], gwt[nt]);
    }
  }
  // the warps' gW meet in shared memory (their buffers, free now) and are added in warp order
  copies_wait_all();
  __syncthreads();
  float* red = smem + warp * C * C;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int k = 0; k < 4; ++k) red[(g + 8 * (k >> 1)) * C + 8 * nt + 2 * tid + (k & 1)] = gw[nt][k];
  __syncthreads();
  float* pb = part + (b * groups + grp) * (size_t)(C * C);
  for (int e = threadIdx.x; e < C * C; e += kMmaWarps * 32) {
    float sum = smem[e];
#pragma unroll
    for (int v = 1; v < kMmaWarps; ++v) sum += smem[v * C * C + e];
    pb[e] = sum;
  }
}
