// Weight gradient of the CUDA ConvContract (conv_contract.cu's layer) for Hopper (sm_90a), behind
// an XLA FFI custom call:
//
//   dW_t[o, c, f] = sum over pixels p, and the forward's tiles T = (group (b, j), t, f):
//                   Z_T[p, c] * gY_(b,j)[p, o]
//
// with Z_T the forward's Z tiles of the inputs (forward_kernel.cuh's header) and gY the outputs'
// cotangents. Plan and tables: kernels/cuda/_dw_plan.py, weight_gradient_d3.inc and
// weight_gradient_d2.inc (generated). Compiled per layer kind in a translation unit of its own, on
// that kind's walk: weight_gradient.cu (D = 3), weight_gradient_d2.cu (D = 2; see "D = 2" below).
//
// Work split. As the forward: a CTA owns (batch, z, strip of y rows) and slides along y with the
// ring of three y slices in shared memory; here also one *channel group* (16 channels of each
// input block: the ring holds only those, so its size does not grow with the channels), and the
// default strip is 64 rows (few, long CTAs: their partials are the only scratch). Warps:
// (x segment of 16 pixels) x (warp half: chunk 0 / 1 of the group's 8-channel chunks).
// Per output row a warp walks its chunk's Z tiles in *passes* (one per input component of a
// phase: 3 x 13 vector tiles, 1 x 13 scalar, _dw_plan.passes) straight into the registers of
// the mma B fragment, then mma's them into per-weight accumulators:
//
//   D[o (16), c (8)] += gY^T[o, p (8)] * Z[p (8), c (8)]      (m16n8k8 tf32, K = pixels)
//
// Lane (g, tid) owns channel g of the chunk (B's column) and pixels 2 tid, 2 tid + 1 (k-step 0:
// B rows tid, tid + 4) and 8 + 2 tid, 9 + 2 tid (k-step 1): the forward's lane mapping
// transposed. One input row read (x = 2 tid - 1 .. 2 tid + 2 and the same 8 pixels on: 8 shared
// loads) serves the three dx taps of both pixels of both k-steps, so the forward's generated walk
// (ROW / ZC / XC / NZ, common.cuh) runs as it is, its channel pair now the k-step pair, on a row
// layout of its own (_dw_plan.row_layout: 8 channels x 4 pixel pairs per read wavefront are
// conflict-free, the forward's layout would be 2-way). A (t, f) shared by the vector output
// components accumulates their tiles, each with its own gY_j (A fragment), into one accumulator:
// 18 weights x 4 floats a lane, live for the whole strip. gY rows are staged by 16-byte cp.async
// one row ahead (two buffers); each warp reads its A fragments of the row once, at the row's
// start (one float a load, so that each lands in its mma quad's register: load_a; 2-way bank
// conflicts at pitch 8 mod 32, where float2 reads were conflict-free per half warp), as tf32
// operands (truncated, as Z is: common.cuh's tf32_bits): 32 registers live through the row.
//
// Why passes (the forward keeps the vector phase's 27 tiles live): 72 accumulator registers live
// across rows and 32 of A fragments through a row; with 27 tiles (108 registers) the walk would
// spill. A pass keeps 13 tiles (52) live;
// a tile of several passes is mma'd once per pass (Z is linear): 39 + 13 tile-mma's a chunk, each
// 2 k-steps: 104 mma.sync per warp and row (the forward: 80). No input row is read twice.
//
// The y ring and the copies. Per row three CTA barriers: row start (wait for gY row y and the
// vector slice y + 1, issued a row ago; then gY row y + 1 into the other buffer), MID in the last
// vector pass after its dy = -1 rows (slice y + 2 of the vector block into slice y - 1's slot) and
// MID in the scalar pass (wait for the scalar slice y + 1; then the scalar block's slice y + 2).
// A vector copy has ~45 % of a row to land, the scalar copy (a third of the bytes) ~20 % plus the
// next row's vector passes.
//
// Cross-CTA reduction without atomics: at the end the segments' accumulators meet in shared memory
// (the ring), summed in segment order, and the CTA writes its partial dW (fragment order, 2 x 18 x
// 128 floats) to the scratch result; XLA sums the CTAs (_dw_plan.unpack, in fixed order).
// Scratch: 18,688 bytes a CTA (256 of them the sums), 256 CTAs on d3_n64_b4_c16 at strip 64: 4.8 MB
// (1.8 % of its I/O).
//
// Arithmetic per warp and output row (d3_n64_b4_c16, 131,072 warp-rows as the forward): the walk
// is the forward's 948 FP32 (_walk.walk_cost: the same rows, none read twice) and 288 row loads;
// on top 104 mma (forward 80), 208 tf32 adds of Z (160), the A fragments (32 LDS.32 and 32 tf32
// adds a row; the forward's B fragments were 40 LDS.128), the gY copy (4 cp.async.16 a thread) and
// a third barrier. ptxas: 199-219 registers, no spills (the forward 237-244), so the same 8 warps
// an SM. Counted in PTX (nvcc -ptx, the row loop's body, copy loops once): 2,481 instructions
// against the forward's 2,324, whose row measured 2,182 SASS instructions under ncu (286 M /
// 131,072): ~2,330 SASS a warp-row, ~305 M in all. At the forward's measured 0.50 instructions a
// cycle per scheduler (latency-bound at 2 warps a scheduler, which this kernel shares): 0.70 ms x
// 2,330 / 2,182 ~ 0.75 ms, + ~0.01 ms for XLA's sum of the partials; triton's weight-gradient
// kernels take 2.47 ms on this layer (bench/NOTES.md, "CUDA weight gradient").
//
// Operands (unbatched shapes; any leading batch dims, the same on all): x0 (c, nz, ny, nx),
// x1 (c, nz, ny, nx, 3), gy0 (O, nz, ny, nx), gy1 (O, nz, ny, nx, 3) of which the launch reads
// output channels o_base .. o_base + o - 1 (an output group's rows, with no slice copied out;
// O = o for a whole layer); the vector blocks components minor or component-planar in memory
// (conv_contract.cu's header). Result: the partials (channel groups x nz x strips, 2 x weights x
// 128 + 64), each CTA's partial dW and then its share of the cotangents' spatial sums (the bias
// gradient: GySum, from the staged gY rows, so that no other pass reads gY for it). Attribute `geom`: nz, ny, nx, c, o, strip, pitch0, pitch1, skew0, skew1 (packed 4 bits a
// channel), weights, O, o_base, planar (0 or 1), dilation, x window (conv_contract.cu's header: a
// CTA covers NX of a row's nx pixels; its gY rows are staged from the window), precision (0: tf32,
// 1: fp32 by 3xTF32).
//
// Dilation (template D; forward_kernel.cuh's header): the CTA's rows are one y phase's, its slices
// hold the z rows z - D, z, z + D, rows carry D wrap pixels a side (their own conflict-free layout
// per (D, nx)), and a lane's pixel pair per k-step is x, x + D (B rows tid, tid + 4; x =
// lane_pixel<D>(tid), k-step 1 at x + 8, or + 4 at D = 8), so the walk's four reads x - D .. x + 2D
// serve both; the A fragments read gY at the same two pixels (one float a load where D > 1).
//
// D = 2 (weight_gradient_d2.cu): the same kernel on the 2D walk (GJ_DW_ROWS 1: a y slice holds one
// row a channel, every tap at dz = 0; GJ_DW_COMPS 2; the z grid 1). A 2D pass keeps 7 Z tiles live
// (3D: 13) and the layer has 12 weights (3D: 18), so a launch takes 32 output channels as two m16
// tiles of A (NT = 4): each Z tile's B fragments serve both, the input rows are walked once for
// all 32 outputs, and the accumulators (12 x 2 x 4) and A fragments (3 groups x 2 k-steps x 2 x 4)
// hold 144 registers. The segments' partials (4 x 6,144 floats at x 64) then outgrow the ring and
// take the shared memory from float 0 at the end. Compiled for component-planar blocks, TF32.
#pragma once

constexpr int kChunk = 8;      // input channels per warp (mma N)
constexpr int kChannels = 16;  // input channels per block a CTA walks (_dw_plan.CHANNELS)
constexpr int kComps = GJ_DW_COMPS;  // a vector block's components (3; 2 in 2D)
constexpr int kRows = GJ_DW_ROWS;    // rows a y slice holds per channel (the z rows; 1 in 2D)
constexpr int kGroups = 1 + kComps;  // output groups: scalar, vector j = 0 .. kComps - 1 (_walk.phases)
// m16 tiles of output channels a launch of 8 NT channels holds (NT 4: 32 outputs, two tiles)
template <int NT>
constexpr int kMTiles = NT > 2 ? 2 : 1;
// a CTA's partial dW: halves x weights x m-tiles x fragment (_dw_plan.Layout.partial_floats)
template <int NT>
constexpr int kPartial = 2 * GJ_DW_WEIGHTS * kMTiles<NT> * 4 * 32;
// then its cotangent sums (_dw_plan.sum_floats): kSumChannels scalar, then kSumChannels x kComps
// vector (o-major), zero past the launch's o channels and in the CTAs of channel groups past the first
constexpr int kSumChannels = GJ_DW_SUM_CHANNELS;
constexpr int kSumFloats = kGroups * kSumChannels;

struct DwParams {
  const float* x[2];
  const float* gy[2];
  float* dw;
  int nz, ny, c, strip, groups;
  int nx, windows;  // the rows' x extent, and the x windows of NX pixels a row is split into
  int o_total, o_base;  // the cotangents' output channels, and the first one this launch reads
  int slice_floats, region1;
};

// Block KEY's row layout at dilation D (_dw_plan.row_layout): channel c's rows dz = -D, 0, D (one
// row, dz = 0, in 2D) at region + chan(c) + (dz / D + 1) * kPitch, each x = -D .. NX + D - 1, kM
// floats a pixel.
template <int NX, int KEY, int D>
struct DwLayout {
  static constexpr int kM = KEY ? kComps : 1;
  static constexpr int kPitch = KEY ? kDwPitchV[dil_index(D)][NX / kSeg - 1] : kDwPitchS[dil_index(D)][NX / kSeg - 1];
  static constexpr unsigned kSkews = KEY ? kDwSkewV[dil_index(D)][NX / kSeg - 1] : kDwSkewS[dil_index(D)][NX / kSeg - 1];
  __device__ static __forceinline__ int chan(int c) { return kRows * c * kPitch + ((kSkews >> (4 * (c & 7))) & 0xf); }
};

// One staged gY row: scalar [o][x] (pitch kP0), then vector [o][x][kComps] or planar [o][kComps][x]
// (pitch kP1), kSumChannels channels.
template <int NX>
struct GyLayout {
  static constexpr int kP0 = kGyPitch0[NX / kSeg - 1], kP1 = kGyPitch1[NX / kSeg - 1];
  static constexpr int kFloats = kSumChannels * (kP0 + kP1);
};

// One y slice of block KEY, the CTA's 16 channels from channel kg * 16 (kRows z rows zz[..], x = -D
// .. NX + D - 1 wrapped): forward_kernel.cuh's load_slice on this layout (common.cuh's copy_channel_rows).
template <int NX, int KEY, bool kPlanar, int D, bool kWin>
__device__ __forceinline__ void load_slice_dw(const DwParams& p, float* slice, int b, int kg, int yy,
                                              const int (&zz)[3], int x0) {
  using L = DwLayout<NX, KEY, D>;
  copy_slice_channels<NX, L::kM, L::kPitch, kPlanar && KEY == 1, D, kWin, 1, kRows>(
      slice + (KEY ? p.region1 : 0) + D * L::kM, p.x[KEY], (size_t)b * p.c + kg * kChannels, kChannels, p.nz, p.ny,
      p.nx, yy, zz, x0, [](int c) { return L::chan(c); });
}

// gY row (b, z, y) of both blocks, output channels o_base .. o_base + kO - 1, into `dst`, 16-byte
// copies (rows are 64-byte aligned: NX % 16 == 0). The vector row is staged as it lies: [o][x][kComps]
// components minor, [o][kComps][x] planar (kPlanar).
template <int NX, int NT, bool kPlanar, bool kWin>
__device__ __forceinline__ void load_gy(const DwParams& p, float* dst, int b, int z, int y, int x0_) {
  using G = GyLayout<NX>;
  constexpr int kO = 8 * NT, kThreads = 4 * NX, kQ0 = NX / 4, kQ1 = kComps * NX / 4;
  const size_t first = (size_t)b * p.o_total + p.o_base, o_rows = (size_t)p.nz * p.ny;  // (b, o = o_base)
  // the window: NX pixels from x0 of rows of nx (without kWin the whole row: nx = NX, x0 = 0)
  const size_t zy = (size_t)z * p.ny + y, nx = kWin ? p.nx : NX;
  const int x0 = kWin ? x0_ : 0;
#pragma unroll
  for (int f = threadIdx.x; f < kO * kQ0; f += kThreads) {
    const int o = f / kQ0, q = f - o * kQ0;
    cp_async16(dst + o * G::kP0 + 4 * q, p.gy[0] + ((first + o) * o_rows + zy) * nx + x0 + 4 * q);
  }
#pragma unroll
  for (int f = threadIdx.x; f < kO * kQ1; f += kThreads) {
    const int o = f / kQ1, q = f - o * kQ1;  // float4 q of output o's 3 NX floats
    const float* src = kPlanar ? p.gy[1] + ((kComps * (first + o) + q / kQ0) * o_rows + zy) * nx + x0 + 4 * (q % kQ0)
                               : p.gy[1] + ((first + o) * o_rows + zy) * (kComps * nx) + kComps * x0 + 4 * q;
    cp_async16(dst + kSumChannels * G::kP0 + o * G::kP1 + 4 * q, src);
  }
}

// The A fragments of every output group, both k-steps, from the staged gY row: lane (g, tid)
// a[q][s][m] = {gY_q[o][x], gY_q[o + 8][x], gY_q[o][x + D], gY_q[o + 8][x + D]}, o = 16 m + g, x =
// the k-step's pixel of B row tid (2 tid + 8 s at D = 1: _dw_plan.k_pixel, kstep_shift); tf32 by
// truncation; zero past the launch's 8 NT channels.
// kPairs (the fp32 kernels, at D = 1): pixels x and x + 1 by one float2 (below: why not otherwise).
template <int NX, int NT, bool kPlanar, int D, bool kPairs = false>
__device__ __forceinline__ void load_a(uint32_t (&a)[kGroups][2][kMTiles<NT>][4], const float* gyr, int seg, int g,
                                       int tid) {
  using G = GyLayout<NX>;
  constexpr int kShift = D == 8 ? 4 : 8;  // pixels from k-step 0 to k-step 1
#pragma unroll
  for (int s = 0; s < 2; ++s) {
    const int x = seg * kSeg + lane_pixel<D>(tid) + kShift * s;
#pragma unroll
    for (int m = 0; m < kMTiles<NT>; ++m) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int o = 16 * m + g + 8 * r;
        const float* vr = gyr + kSumChannels * G::kP0 + o * G::kP1;
        // One float a load, also at D = 1 where pixels x and x + 1 are adjacent: a float2 would
        // land (a[r], a[2 + r]) in a register pair, and the mma wants a[0..3] in four consecutive
        // registers, so ptxas rebuilt every A quad with moves before each mma (SASS of the row
        // loop at D = 1: 313 moves of 1,438 instructions in 2D, 411 of 2,507 in 3D; at D = 2,
        // which loaded floats, 17 and 12). The fp32 kernels split each quad per use anyway, and
        // one of them spilled 40 bytes with float loads: they keep the float2.
        if (2 * m + r < NT && !(kPairs && D == 1)) {
          a[0][s][m][r] = tf32_bits(gyr[o * G::kP0 + x]), a[0][s][m][2 + r] = tf32_bits(gyr[o * G::kP0 + x + D]);
#pragma unroll
          for (int j = 0; j < kComps; ++j) {  // component j of pixel x: planar at j NX + x, minor at kComps x + j
            const int at = kPlanar ? j * NX + x : kComps * x + j, step = kPlanar ? D : kComps * D;
            a[1 + j][s][m][r] = tf32_bits(vr[at]), a[1 + j][s][m][2 + r] = tf32_bits(vr[at + step]);
          }
        } else if (2 * m + r < NT) {
          const float2 v = *reinterpret_cast<const float2*>(gyr + o * G::kP0 + x);
          a[0][s][m][r] = tf32_bits(v.x), a[0][s][m][2 + r] = tf32_bits(v.y);
          if constexpr (kPlanar) {  // component j's pixels x, x + 1 at j NX + x
#pragma unroll
            for (int j = 0; j < kComps; ++j) {
              const float2 vj = *reinterpret_cast<const float2*>(vr + j * NX + x);
              a[1 + j][s][m][r] = tf32_bits(vj.x), a[1 + j][s][m][2 + r] = tf32_bits(vj.y);
            }
          } else if constexpr (kComps == 3) {  // pixels x, x + 1: six floats from 3 x
            const float2 v01 = *reinterpret_cast<const float2*>(vr + 3 * x);
            const float2 v23 = *reinterpret_cast<const float2*>(vr + 3 * x + 2);
            const float2 v45 = *reinterpret_cast<const float2*>(vr + 3 * x + 4);
            a[1][s][m][r] = tf32_bits(v01.x), a[1][s][m][2 + r] = tf32_bits(v23.y);  // j = 0: pixels x, x + 1
            a[2][s][m][r] = tf32_bits(v01.y), a[2][s][m][2 + r] = tf32_bits(v45.x);  // j = 1
            a[3][s][m][r] = tf32_bits(v23.x), a[3][s][m][2 + r] = tf32_bits(v45.y);  // j = 2
          } else {  // pixels x, x + 1: 2 kComps floats from kComps x
            const float4 v = *reinterpret_cast<const float4*>(vr + kComps * x);
            a[1][s][m][r] = tf32_bits(v.x), a[1][s][m][2 + r] = tf32_bits(v.z);
            a[2][s][m][r] = tf32_bits(v.y), a[2][s][m][2 + r] = tf32_bits(v.w);
          }
        } else {
#pragma unroll
          for (int q = 0; q < kGroups; ++q) a[q][s][m][r] = a[q][s][m][2 + r] = 0u;
        }
      }
    }
  }
}

// A thread's share of the cotangents' spatial sums (the layer's bias gradient, which XLA would
// otherwise take in a pass of its own over gY): kGroups kO sums (kO scalar channels, then kO x
// kComps vector channel components), each over NX / kO threads of kO consecutive pixels of every
// staged gY row: the first (1 + kComps) NX of the 4 NX threads (`kThreads`; all of them in 3D).
template <int NX, int NT, bool kPlanar>
struct GySum {
  static constexpr int kO = 8 * NT, kPer = NX / kO, kThreads = kGroups * NX;
  static_assert(kPer >= 1 && NX % kO == 0, "a launch's outputs must divide its x window's pixels");
  int at, step;  // the thread's first float of a staged row, and the floats between its pixels
  __device__ __forceinline__ GySum(int t) {
    using G = GyLayout<NX>;
    const int s = t / kPer, x = (t - s * kPer) * kO;
    if (s < kO) {
      at = s * G::kP0 + x, step = 1;
    } else {
      const int o = (s - kO) / kComps, j = s - kO - kComps * o;
      at = kSumChannels * G::kP0 + o * G::kP1 + (kPlanar ? j * NX + x : kComps * x + j), step = kPlanar ? 1 : kComps;
    }
  }
  // The row's kO floats (16-byte loads where they are consecutive: every row of the planar layout).
  __device__ __forceinline__ float row(const float* gyr) const {
    float s = 0.f;
    if constexpr (kPlanar) {
#pragma unroll
      for (int i = 0; i < kO; i += 4) {
        const float4 v = *reinterpret_cast<const float4*>(gyr + at + i);
        s += (v.x + v.y) + (v.z + v.w);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kO; ++i) s += gyr[at + i * step];
    }
    return s;
  }
  // Output e's sum (e < kSumFloats: the result's layout) from the threads' partials in `part`, in
  // thread order; 0 for channels past kO.
  __device__ static __forceinline__ float total(const float* part, int e) {
    const int s = e < kSumChannels ? e : kO + (e - kSumChannels);  // scalar o = e; vector (o, j) at kO + kComps o + j
    if ((e < kSumChannels ? e : (e - kSumChannels) / kComps) >= kO) return 0.f;
    float v = 0.f;
#pragma unroll
    for (int q = 0; q < kPer; ++q) v += part[s * kPer + q];
    return v;
  }
};

// MID of a phase's last pass: the CTA is past the phase's dy = -1 rows of slice y - 1, whose slot
// takes slice y + 2 of this block; the scalar MID first waits for its slice y + 1 (the rows after
// the hook read it; the two younger groups, gY y + 1 and the vector slice y + 2, stay in flight).
#define GJ_DW_MID()                                                        \
  {                                                                        \
    if (kKey == 0) cp_async_wait<2>();                                     \
    __syncthreads();                                                       \
    if (more) load_slice_dw<NX, kKey, kPlanar, D, kWin>(p, next, b, kg, y_next, zz, x0); \
    cp_async_commit();                                                     \
  }

// Pass K of one output row: the walk of its tiles (13 in 3D, 7 in 2D) for the warp's chunk, then
// their mma's into the weights' accumulators, B = the tile (k-step s: pixels x, x + D of B rows
// tid, tid + 4; x = 2 tid + 8 s at D = 1), A = its group's gY fragments (a, loaded at the row's
// start), one mma per m-tile of outputs on the same B.
#define GJ_DW_PASS(K)                                                                             \
  {                                                                                               \
    constexpr int kKey = GJ_DW_P##K##_KEY, kTiles = GJ_DW_P##K##_TILES;                           \
    constexpr int kM = DwLayout<NX, kKey, D>::kM, kP = DwLayout<NX, kKey, D>::kPitch;             \
    constexpr int kXs = D * kM, kMid = kRows / 2; /* floats between a row read's x; row dz = 0's */ \
    const int off0 = (kKey ? p.region1 : 0) + DwLayout<NX, kKey, D>::chan(half * kChunk + g) +    \
                     (seg * kSeg + lane_pixel<D>(tid)) * kM;                                      \
    const int off1 = off0 + (D == 8 ? 4 : 8) * kM; /* k-step 1: kShift pixels on */             \
    const float* r0[3] = {sl[0] + off0, sl[1] + off0, sl[2] + off0};                              \
    const float* r1[3] = {sl[0] + off1, sl[1] + off1, sl[2] + off1};                              \
    float zt[kTiles][4];                                                                          \
    _Pragma("unroll") for (int t = 0; t < kTiles; ++t) zt[t][0] = zt[t][1] = zt[t][2] = zt[t][3] = 0.f; \
    float u[3][2][4], zc[3][2][4], xc[3][3][2][2];                                                \
    GJ_DW_P##K##_STENCIL(GJ_ROW, GJ_ZC, GJ_XC, GJ_NZ, GJ_DW_MID)                                  \
    _Pragma("unroll") for (int t = 0; t < kTiles; ++t)                                            \
      _Pragma("unroll") for (int s = 0; s < 2; ++s)                                               \
        _Pragma("unroll") for (int m = 0; m < kMTiles<NT>; ++m) {                                 \
          if constexpr (kSplit) {                                                                 \
            const uint32_t(&ar)[4] = a[kDwP##K##Group[t]][s][m];                                  \
            uint32_t ah[4], al[4], bh[2], bl[2];                                                  \
            _Pragma("unroll") for (int r = 0; r < 4; ++r) split_tf32(__uint_as_float(ar[r]), ah[r], al[r]); \
            split_tf32(zt[t][2 * s], bh[0], bl[0]);                                               \
            split_tf32(zt[t][2 * s + 1], bh[1], bl[1]);                                           \
            float(&d)[4] = acc[kDwP##K##Weight[t]][m];                                            \
            mma_tf32(d, al, bh[0], bh[1]);                                                        \
            mma_tf32(d, ah, bl[0], bl[1]);                                                        \
            mma_tf32(d, ah, bh[0], bh[1]);                                                        \
          } else {                                                                                \
            mma_tf32(acc[kDwP##K##Weight[t]][m], a[kDwP##K##Group[t]][s][m], tf32_bits(zt[t][2 * s]), \
                     tf32_bits(zt[t][2 * s + 1]));                                                \
          }                                                                                       \
        }                                                                                         \
  }

// (_dw_plan.dw_source orders the passes: the vector block's, one per input component, then the
// scalar block's; GJ_DW_WALK lists them.)
static_assert(GJ_DW_PASSES == kComps + 1, "weight_gradient_kernel walks a vector pass per component, then a scalar pass");

// NX: the x extent (16, 32, 48, 64; 4 NX threads), NT: output channels / 8 (A's row halves; 4:
// two m-tiles, the 2D kernels' 32 outputs),
// kPlanar: the vector blocks (x1, gy1) component-planar in global memory, D: the dilation (taps
// at -D, 0, D; the CTA's rows one y phase, as the forward's), kWin: the row in x windows of NX,
// kSplit: fp32 by 3xTF32 (gY and Z each split into a tf32 part and a tf32 remainder at the mma,
// three mma a tile and k-step: remainder x Z, gY x remainder, gY x Z), compiled at D = 1 on
// whole rows only; the A fragments stay the raw gY floats, split per use.
template <int NX, int NT, bool kPlanar, int D, bool kWin, bool kSplit>
__global__ void __launch_bounds__(4 * NX, 1) weight_gradient_kernel(const DwParams p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int kThreads = 4 * NX, kSegs = NX / kSeg;
  float* ring = smem;
  float* gy = ring + 3 * p.slice_floats;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = warp % kSegs, half = warp / kSegs;
  const int g = lane >> 2, tid = lane & 3;
  const int b = blockIdx.z / p.groups, kg = blockIdx.z - b * p.groups, z = blockIdx.y;
  const CtaRows<NX, D, kWin> cta(p.windows, p.strip, p.nz, p.ny, z);  // the forward's rows and x window
  const int x0 = cta.x0, phase = cta.phase, j0 = cta.j0, j1 = cta.j1, y0 = cta.y0;
  const auto& zz = cta.zz;
  auto wrap_y = [&](int yy) { return cta.wrap_y(yy); };

  for (int k = 0; k < 3; ++k) {
    load_slice_dw<NX, 1, kPlanar, D, kWin>(p, ring + k * p.slice_floats, b, kg, wrap_y(y0 + (k - 1) * D), zz, x0);
    load_slice_dw<NX, 0, kPlanar, D, kWin>(p, ring + k * p.slice_floats, b, kg, wrap_y(y0 + (k - 1) * D), zz, x0);
  }
  load_gy<NX, NT, kPlanar, kWin>(p, gy + (j0 & 1) * GyLayout<NX>::kFloats, b, z, y0, x0);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  constexpr int kMT = kMTiles<NT>;  // m-tiles (GJ_DW_PASS's kM: a pixel's floats)
  float acc[GJ_DW_WEIGHTS][kMT][4];
#pragma unroll
  for (int w = 0; w < GJ_DW_WEIGHTS; ++w)
#pragma unroll
    for (int m = 0; m < kMT; ++m) acc[w][m][0] = acc[w][m][1] = acc[w][m][2] = acc[w][m][3] = 0.f;
  // every channel group's CTAs read the same gY rows: the first group's sum them (in 2D the first
  // 3 NX threads: the others' shares would lie past the staged rows)
  const GySum<NX, NT, kPlanar> gsum_at(threadIdx.x);
  const bool sums_rows = kg == 0 && (GySum<NX, NT, kPlanar>::kThreads == kThreads || threadIdx.x < GySum<NX, NT, kPlanar>::kThreads);
  float gsum = 0.f;

  int oldest = 0;  // ring slot of slice y - D
  for (int j = j0; j < j1; ++j) {
    const int y = phase + D * j;
    const int mid = oldest == 2 ? 0 : oldest + 1, newest = mid == 2 ? 0 : mid + 1;
    const float* sl[3] = {ring + oldest * p.slice_floats, ring + mid * p.slice_floats, ring + newest * p.slice_floats};
    float* next = ring + oldest * p.slice_floats;  // slice y + 2D replaces y - D
    const bool more = j + 2 <= j1;
    const int y_next = wrap_y(y + 2 * D);
    if (j > j0) {  // gY row y and the vector slice y + D (the scalar one may stay in flight)
      cp_async_wait<1>();
      __syncthreads();
    }
    if (j + 1 < j1) load_gy<NX, NT, kPlanar, kWin>(p, gy + ((j + 1) & 1) * GyLayout<NX>::kFloats, b, z, y + D, x0);
    cp_async_commit();
    // the A fragments of gY row y, every group, k-step and m-tile, once a row (32 registers live
    // through the 3D walk, 48 in 2D at 32 outputs; loaded per pass they cost 96 more LDS and tf32
    // adds a row and, in ptxas, registers)
    uint32_t a[kGroups][2][kMT][4];
    load_a<NX, NT, kPlanar, D, kSplit>(a, gy + (j & 1) * GyLayout<NX>::kFloats, seg, g, tid);
    if (sums_rows) gsum += gsum_at.row(gy + (j & 1) * GyLayout<NX>::kFloats);
    GJ_DW_WALK
    oldest = mid;
  }
  cp_async_wait<0>();
  __syncthreads();

  // the segments' accumulators meet from float 0 ([seg][half][w][m][k][lane]: over the ring, in 2D
  // at 32 outputs past it); summed in segment order; the threads' cotangent sums after them (the
  // gY buffers in 3D)
  constexpr int kPart = kPartial<NT>;
  float* red = smem + seg * kPart + ((half * GJ_DW_WEIGHTS) * kMT * 4) * 32 + lane;
#pragma unroll
  for (int w = 0; w < GJ_DW_WEIGHTS; ++w)
#pragma unroll
    for (int m = 0; m < kMT; ++m)
#pragma unroll
      for (int k = 0; k < 4; ++k) red[((w * kMT + m) * 4 + k) * 32] = acc[w][m][k];
  float* sums = smem + max(3 * p.slice_floats, kSegs * kPart);
  sums[threadIdx.x] = gsum;
  __syncthreads();
  float* out = p.dw + ((size_t)(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x) * (kPart + kSumFloats);
  for (int e = threadIdx.x; e < kPart; e += kThreads) {
    float sum = smem[e];
#pragma unroll
    for (int s = 1; s < kSegs; ++s) sum += smem[s * kPart + e];
    out[e] = sum;
  }
  // (2D at x 16: 96 floats, 64 threads)
  for (int e = threadIdx.x; e < kSumFloats; e += kThreads) out[kPart + e] = GySum<NX, NT, kPlanar>::total(sums, e);
}

template <int NX, int NT, bool kPlanar, int D, bool kWin, bool kSplit>
cudaError_t launch_dw(const DwParams& p, int batch, cudaStream_t stream) {
  if constexpr (NX % (8 * NT) != 0) {  // GySum's split needs the outputs to divide the window (not compiled;
    return cudaErrorInvalidValue;      // WeightGradient refuses these first: 32 outputs at x 16 or 48)
  } else {
    // the ring and two gY rows, or at the end the segments' partials and the threads' sums (_dw_plan.Layout.smem_bytes)
    const int reduction = std::max(3 * p.slice_floats, (NX / kSeg) * kPartial<NT>);
    const size_t smem = sizeof(float) * std::max(3 * p.slice_floats + 2 * GyLayout<NX>::kFloats, reduction + 4 * NX);
    cudaError_t err = cudaFuncSetAttribute(weight_gradient_kernel<NX, NT, kPlanar, D, kWin, kSplit>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    const dim3 grid(p.windows * D * ((p.ny / D + p.strip - 1) / p.strip), p.nz, batch * p.groups);  // windows x phases x strips
    weight_gradient_kernel<NX, NT, kPlanar, D, kWin, kSplit><<<grid, 4 * NX, smem, stream>>>(p);
    return cudaGetLastError();
  }
}

// The whole row (NX = nx), or x windows of 32 or 64 (kWin; WeightGradient refuses other widths,
// and windows for the split kernels).
template <int NT, bool kPlanar, int D, bool kSplit>
cudaError_t launch_dw_nx(const DwParams& p, int nx, int batch, cudaStream_t stream) {
  if constexpr (!kSplit) {
    if (p.windows > 1) return nx == 32 ? launch_dw<32, NT, kPlanar, D, true, false>(p, batch, stream)
                                       : launch_dw<64, NT, kPlanar, D, true, false>(p, batch, stream);
  }
  switch (nx) {
    case 16: return launch_dw<16, NT, kPlanar, D, false, kSplit>(p, batch, stream);
    case 32: return launch_dw<32, NT, kPlanar, D, false, kSplit>(p, batch, stream);
    case 48: return launch_dw<48, NT, kPlanar, D, false, kSplit>(p, batch, stream);
    default: return launch_dw<64, NT, kPlanar, D, false, kSplit>(p, batch, stream);
  }
}

// The split (fp32) kernels: dilation 1 only (WeightGradient refuses others).
template <int NT, bool kPlanar, bool kSplit>
cudaError_t launch_dw_dil(const DwParams& p, int nx, int dilation, int batch, cudaStream_t stream) {
  if constexpr (!kSplit) {
    switch (dilation) {
      case 2: return launch_dw_nx<NT, kPlanar, 2, false>(p, nx, batch, stream);
      case 4: return launch_dw_nx<NT, kPlanar, 4, false>(p, nx, batch, stream);
      case 8: return launch_dw_nx<NT, kPlanar, 8, false>(p, nx, batch, stream);
      default: break;
    }
  }
  return launch_dw_nx<NT, kPlanar, 1, kSplit>(p, nx, batch, stream);
}

// The launch of a decoded call: the translation unit's instantiations (weight_gradient.cu: 3D, minor
// or planar, 8 or 16 outputs, tf32 or fp32; weight_gradient_d2.cu: 2D, planar, 16 or 32, tf32).
cudaError_t launch_layer(const DwParams& p, int o, int nx, int dilation, bool planar, bool split, int batch,
                         cudaStream_t stream);

// The FFI call: `geom` decoded and checked against the operands and the compiled tables.
ffi::Error WeightGradient(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                          ffi::Buffer<ffi::F32> gy0, ffi::Buffer<ffi::F32> gy1, ffi::ResultBuffer<ffi::F32> dw,
                          ffi::Span<const int64_t> geom) {
  auto bad = [](const std::string& why) {
    return ffi::Error::InvalidArgument(std::string("ginjax cuda ConvContract weight gradient") +
                                       (kRows == 1 ? " (2D): " : ": ") + why);
  };
  if (geom.size() != 17) return bad("`geom` must have 17 entries (has " + std::to_string(geom.size()) + ")");
  DwParams p{};
  const int nx = (int)geom[15], o = (int)geom[4];  // the x window's extent (the kernel's NX); the rows' is geom[2]
  p.nx = (int)geom[2];
  p.nz = (int)geom[0], p.ny = (int)geom[1], p.c = (int)geom[3], p.strip = (int)geom[5];
  const int dilation = (int)geom[14];
  if (const std::string why = CheckRows(nx, p.nx, 15, dilation, 14, p.strip, p.nz, p.ny); !why.empty()) return bad(why);
  p.windows = p.nx / nx;
  if (p.c % kChannels || p.c < kChannels) return bad("input channels must be a positive multiple of 16");
  if (kRows == 3 && o != 8 && o != 16) return bad("output channels must be 8 or 16");
  if (kRows == 1 && o != 16 && o != 32) return bad("output channels must be 16 or 32");
  if (nx % o) return bad("a launch's output channels must divide the x window's pixels (the cotangent sums' split)");
  if (kRows == 1 && p.nz != 1) return bad("`geom`[0] (nz) must be 1 for a 2D layer");
  p.o_total = (int)geom[11], p.o_base = (int)geom[12];
  if (const std::string why = CheckOutputSlice(p.o_base, o, p.o_total, "cotangents"); !why.empty()) return bad(why);
  if (geom[13] != 0 && geom[13] != 1) return bad("`geom`[13] (the vector blocks' layout) must be 0 (minor) or 1 (planar)");
  const bool planar = geom[13] == 1;
  if (kRows == 1 && !planar) return bad("the 2D kernels take component-planar vector blocks only (`geom`[13] must be 1)");
  if (geom[16] != 0 && geom[16] != 1) return bad("`geom`[16] (the precision) must be 0 (tf32) or 1 (fp32)");
  const bool split = geom[16] == 1;
  if (split && kRows == 1) return bad("the 2D kernels compute TF32 only (`geom`[16] must be 0)");
  if (split && (dilation != 1 || p.windows > 1))
    return bad("the fp32 (3xTF32) weight gradient is compiled at dilation 1 on whole rows only");
  if (geom[10] != GJ_DW_WEIGHTS) return bad("the weight count in `geom` is not the compiled one (rebuild the library)");
  const int l = nx / kSeg - 1, di = dil_index(dilation);
  if (geom[6] != kDwPitchS[di][l] || geom[7] != kDwPitchV[di][l] || geom[8] != kDwSkewS[di][l] ||
      geom[9] != kDwSkewV[di][l])
    return bad("the row layout in `geom` is not the compiled one (rebuild the library)");
  p.groups = p.c / kChannels;
  const int64_t pix = (int64_t)p.nz * p.ny * p.nx;
  const int64_t batch = x0.element_count() / (p.c * pix);
  if (batch < 1 || batch * p.groups > 65535) return bad("batch x channel groups must be in [1, 65535]");
  const int64_t ctas = (int64_t)p.groups * p.nz * p.windows * dilation * ((p.ny / dilation + p.strip - 1) / p.strip);
  const int64_t part = o > 16 ? kPartial<4> : kPartial<2>;
  if (x0.element_count() != batch * p.c * pix || x1.element_count() != batch * p.c * pix * kComps ||
      gy0.element_count() != batch * p.o_total * pix || gy1.element_count() != batch * p.o_total * pix * kComps ||
      dw->element_count() != batch * ctas * (part + kSumFloats))
    return bad("operand sizes do not match `geom` and the batch");
  p.x[0] = x0.typed_data(), p.x[1] = x1.typed_data(), p.gy[0] = gy0.typed_data(), p.gy[1] = gy1.typed_data();
  p.dw = dw->typed_data();
  p.region1 = kRows * kChannels * kDwPitchS[di][l];
  p.slice_floats = (p.region1 + kRows * kChannels * kDwPitchV[di][l] + 3) / 4 * 4;
  const cudaError_t err = launch_layer(p, o, nx, dilation, planar, split, (int)batch, stream);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("ginjax cuda ConvContract weight gradient: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// The FFI binding both translation units export (x0, x1, gy0, gy1; the partials; `geom`).
auto WeightGradientBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<ffi::Span<const int64_t>>("geom");
}
