// Forward ConvContract in CUDA C++ for Hopper (sm_90a), behind an XLA FFI custom call: the D=3
// {scalar, vector} torus layer with 3x3x3 invariant filters in the factorised form
//
//   Z_T[p, c]        = sum over tile T's basis nonzeros (tap, i, coef): coef * X_a[c, p + tap, i]
//   out_(b,j)[p, o] += sum over the tiles T of group (b, j), c:  Z_T[p, c] * w_t[o, c, f]
//
// (tiles, groups and phases: kernels/cuda/_plan.py; the basis walk: stencil_d3.inc, generated).
//
// Work split. A CTA owns one (batch, z) and a strip of y rows, all x, and slides along y: a ring
// of three y slices (3 z rows x every input channel of both blocks, or of one channel group:
// below) lives in shared memory, so each input row is fetched from L2 once per CTA plus three z
// neighbours (not 9x as one row per CTA did). Warps: (x segment of 16 pixels) x (warp half:
// even / odd channel chunks of 8).
// Per output row and chunk a warp computes Z tiles straight in the registers of the mma A
// fragment: lane (g, tid) owns pixels x = 2g, 2g + 1 of its segment (mma rows g, g + 8) and
// channels tid, tid + 4 (A columns), so one input row read (x = 2g - 1 .. 2g + 2, both
// channels: 8 shared loads) serves the three dx taps of both pixels, and every Z tile of the
// phase (27 reading the vector block, then 13 reading the scalar one) is live at once, so each
// of the phase's input rows is read once per chunk. The walk uses the filters' reflection
// symmetry (_plan.row_groups): the three z rows of a (dy, component) are loaded together and
// each tile's symmetric pair of taps (dz = +-1, dx = +-1) is one FMA on a shared sum or
// difference: 948 FP32 instructions per warp and row instead of 1,368.
//
// Why the stencil on FMA and the channel GEMM on mma.sync.m16n8k8 TF32: the stencil is sparse
// (342 nonzeros over 40 tiles, 108 distinct shifted reads) and belongs on the FP32 pipe, where
// its result is already in the A fragment's registers; the GEMM (10,240 MACs a pixel) on FMA
// would double the FP32 work, while on the tensor cores it is ~15 % of the stencil's issue
// slots. wgmma would need Z in shared memory (tf32 A comes only from shared memory), i.e. one
// store and one barrier per Z element: mma.sync takes A from registers. tf32: the weights are
// rounded once on the host (pack_weights, with truncation's mean bias taken out) and copied as
// they are; Z goes to the mma as it is, truncated (common.cuh's tf32_bits: no instruction, NaN-safe).
//
// The y ring: slices y-1, y, y+1; slice y+2 overwrites y-1's slot once every warp is past the
// dy = -1 rows of the phase (MID in the generated walk), so the copy overlaps the rest of the
// row. The two MID barriers are a row's only CTA-wide barriers (the vector one after a wait
// for every copy in flight). Slice layout [block][channel][dz][x] with compile-time row pitches per x extent (the
// kernel is instantiated per nx): every stencil read is a per-lane base plus an immediate.
// Copies are 4-byte cp.async: the per-channel skews (_plan.row_layout) that make every stencil
// read one bank wavefront are what 16-byte-aligned rows cannot have; a warp copies a channel's
// rows with immediate offsets from one base per row, the x wrap as one extra float per lane
// for lanes < 2 comps. The warp halves' partial outputs meet in shared memory and are staged
// in the outputs' layout, so the global stores are 16-byte and whole 32-byte sectors.
//
// The layer's bias is the epilogue's: per batch element an offset per output channel (scalar)
// and per output channel and component (vector), added to every pixel as the staged rows go out
// (the offsets read from shared memory, where the CTA copied them at its start). For the "mean"
// bias the offsets come from the inputs' means (kernels._bias), so no pass over the output.
//
// Channel groups. The ring holds every channel of a group and shared memory one group's packed
// weights; where the layer's full ring does not fit (32 + 32 input channels at x 64 need 410 KB
// against 227 KB), the CTA passes over its strip once per group of c0 / G scalar and c1 / G
// vector channels (each a multiple of 16; _plan.groups picks the smallest G that fits): per pass
// it copies the group's weights (its chunks are a contiguous range of each phase's packed
// weights), refills the ring with the group's channels and slides the strip as above. The first
// pass stores its sums with the bias offsets; a later one reads the float4 it stored in the
// previous pass (the same thread and address, so program order makes it visible), adds, and
// stores: deterministic, no atomics. A group past the first costs one more read and write of the
// outputs and a ring refill (the inputs are still read once: each group its own channels).
// G = 1 is its own instantiation (kGroups false), compiled without the group loop or the reads.
//
// Operands (unbatched shapes; any leading batch dims, the same on all): x0 (c0, nz, ny, nx),
// x1 (c1, nz, ny, nx, 3), w packed by _plan.pack_weights (per batch element), off (4 o: o scalar
// offsets, then (o, 3) vector ones), results y0 (O, nz, ny, nx), y1 (O, nz, ny, nx, 3) of which a
// launch writes output channels o_base .. o_base + o - 1 (O = o for a whole layer). The vector
// blocks x1 and y1 lie components minor (as shaped) or component-planar, (c1, 3, nz, ny, nx) and
// (O, 3, nz, ny, nx) in memory (kernels/_layout.py: the layout of the VectorNeuron kernels beside
// them, so XLA inserts no transposes); only the copies into the ring and the output stores differ.
// Attribute `geom`: nz, ny, nx, c0, c1, o, strip, pitch0, pitch1, skew0[4], skew1[4], weight
// floats (an example's, every group), channel groups G, O, o_base, planar (0 or 1), dilation, x
// window, precision (0: tf32, 1: fp32 by 3xTF32, the weights packed unrounded).
//
// X windows (rows longer than 64 pixels): a CTA covers a window of NX of the row's nx pixels from x0 (grid x: windows x y phases x
// strips), its slices holding x0 - d .. x0 + NX + d - 1 (the wrap runs from the neighbouring
// windows, or around the row at its ends: XWindow); it stores its window of each output row.
//
// Dilation (DilResNet's rhs_dilation d = 2, 4, 8 on every axis; template D, 1 the undilated
// kernel). The taps sit at -d, 0, d, so the walk is unchanged if every "neighbour" is d away: z
// rows z - d, z, z + d in a slice; a CTA's strip holds rows y = r + d j of one y phase r (grid x:
// d phases x strips of ny / d rows), so consecutive rows still share two of their three slices
// and the ring slides as before (slice y + 2d replaces y - d); a lane's two pixels are x and
// x + d (mma rows g and g + 8; _plan.lane_pixel lays the segment's 16 pixels out as 2d-blocks),
// so its four reads x - d .. x + 2d at stride d kM floats (kXs, still immediates) serve both
// pixels' three x taps, as x - 1 .. x + 2 do at d = 1. A row holds x = -d .. nx + d - 1 (the
// wrap: d pixels each side), with its own bank-conflict-free pitch and skews per (d, nx). Only the
// single channel group is compiled dilated (G = 1).
//
// Staging at d = 8 (stage_in_weights, _plan.PACKED_DILATIONS). A row of 64 pixels with 8 wrap
// pixels a side took 253 KB with the layout above (the rows' skews inside their pitch, a staging
// area of its own) against the 227 KB a CTA may have, so it ran in x windows of 32 at 1.21 ms, 1.7x
// the whole-row kernels' time. Two changes fit it in 228.6 KB: the rows are packed (pitch = the
// row's floats) and each channel's three rows are followed by an 8-float gap instead (stride 3
// pitch + 8: channels tid 0..3 then start 8 banks apart, the reads conflict-free; 6 KB less), and
// the outputs are staged over the vector phase's packed weights (18 KB less). Those weights are
// read only by the vector phase's mma, and every warp has left that phase once it passes the scalar
// MID's barrier, which comes before any staging store. After a row's stores a barrier lets every
// segment finish reading its staging, then the CTA copies the vector weights in again (27 KB from
// L2) as a cp.async group of its own, which the next row's vector MID waits for, as it does for
// the ring's copies, before that row's first mma reads them. Cost: a third CTA barrier a row and
// the copy; the last row of a strip skips both.
//
// Output groups. A layer with O = k o outputs per key (o = 8 or 16 covered) runs as k launches,
// each on the weights' rows of its o channels, writing its channel slice of the full outputs:
// the first launch's results are fresh buffers (the other slices are written by the launches after
// it), each later one takes the previous results as operands aliased to its own
// (GinjaxCudaForwardInto), so the slices land in one buffer with no concatenation and no extra
// temporary memory.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"
#include "stencil_d3.inc"

constexpr int kSeg = 16;   // pixels per warp (mma M)
constexpr int kChunk = 8;  // channels per mma k-step
constexpr int kStage0 = kSeg + 4, kStage1 = 3 * kSeg + 4;  // _plan.STAGE_PITCH

struct Params {
  const float* x[2];
  const float* w;
  const float* off;
  float* y[2];
  int nz, ny, c[2], o, strip;
  int nx, windows;  // the rows' x extent, and the x windows of NX pixels a row is split into
  int o_total, o_base;  // the results' output channels, and the first one this launch writes
  int groups, cg[2];  // channel groups, and one group's channels per block (what the ring holds)
  int w_floats, w_group, slice_floats, region1, w_base[2];  // weights: an example's, one group's
};

// Block KEY's row layout for x extent NX and dilation D (generated tables, _plan.row_layout): a
// channel c's rows dz = -D, 0, D at region + chan(c) + (dz / D + 1) * kPitch, each x = -D ..
// NX + D - 1, kM floats a pixel.
template <int NX, int KEY, int D>
struct RowLayout {
  static constexpr int kM = KEY ? 3 : 1;
  static constexpr int kPitch = KEY ? kPitch3[dil_index(D)][NX / kSeg - 1] : kPitch1[dil_index(D)][NX / kSeg - 1];
  static constexpr int kSkews = KEY ? kSkew3[dil_index(D)][NX / kSeg - 1] : kSkew1[dil_index(D)][NX / kSeg - 1];
  static constexpr int kStride = KEY ? kStride3[dil_index(D)][NX / kSeg - 1] : kStride1[dil_index(D)][NX / kSeg - 1];
  __device__ static __forceinline__ int chan(int c) { return c * kStride + ((kSkews >> (8 * (c & 3))) & 0xff); }
};

// Dilations whose kernels stage their outputs in the vector phase's weights (_plan.PACKED_DILATIONS;
// the header's "Staging").
__host__ __device__ constexpr bool stage_in_weights(int d) { return d == 8; }


// A lane's B fragments of one tile, every n-tile: one 8- or 16-byte shared load.
template <int NT>
__device__ __forceinline__ void load_b(float (&bw)[2 * NT], const float* src) {
  if constexpr (NT == 2) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    bw[0] = v.x, bw[1] = v.y, bw[2] = v.z, bw[3] = v.w;
  } else {
    const float2 v = *reinterpret_cast<const float2*>(src);
    bw[0] = v.x, bw[1] = v.y;
  }
}

__device__ __forceinline__ void pair_barrier(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(64) : "memory");
}

// One y slice of input block KEY (3 z rows zz[0..2] around z, every channel of channel group
// grp, x = -D .. NX + D - 1 wrapped) into `slice`: a warp per channel (common.cuh's
// copy_channel_rows, in the block's global layout: kPlanar, the vector block component-planar).
template <int NX, int KEY, bool kPlanar, int D, bool kWin>
__device__ __forceinline__ void load_slice(const Params& p, float* slice, int b, int grp, int yy, const int (&zz)[3],
                                           int x0) {
  using L = RowLayout<NX, KEY, D>;
  const int C = p.cg[KEY];
  // the group's channels from its first in the batch's channel axis, interior x = 0 of row 0
  copy_slice_channels<NX, L::kM, L::kPitch, kPlanar && KEY == 1, D, kWin>(
      slice + (KEY ? p.region1 : 0) + D * L::kM, p.x[KEY], (size_t)b * p.c[KEY] + grp * C, C, p.nz, p.ny, p.nx, yy,
      zz, x0, [](int c) { return L::chan(c); });
}

// MID frees the oldest y slice of this phase's block once the whole CTA is past its dy = -1 rows.
#define GJ_MID()                                                              \
  if (last) {                                                                 \
    if (kKey == GJ_V_KEY) cp_async_wait<0>();                                 \
    __syncthreads();                                                          \
    if (more) load_slice<NX, kKey, kPlanar, D, kWin>(p, next, b, grp, y_next, zz, x0); \
    cp_async_commit();                                                        \
  }

// One phase of one output row: the warp half's chunks of the phase's block, each a stencil walk
// into the Z tiles and their mma into the groups' accumulators. Lane bases r0 / r1 per y slice;
// every row offset of the walk is an immediate.
#define GJ_PHASE(NAME)                                                                          \
  {                                                                                             \
    constexpr int kKey = GJ_##NAME##_KEY, kTiles = GJ_##NAME##_TILES;                           \
    constexpr int kM = RowLayout<NX, kKey, D>::kM, kP = RowLayout<NX, kKey, D>::kPitch;         \
    constexpr int kXs = D * kM; /* floats between a row read's four x */                        \
    const int n_chunks = p.cg[kKey] / kChunk;                                                   \
    /* more than one chunk round: the first reads slice y + 1 before the vector MID's wait */   \
    if (kKey == GJ_V_KEY && n_chunks > 2) {                                                     \
      cp_async_wait<0>();                                                                       \
      __syncthreads();                                                                          \
    }                                                                                           \
    for (int h = half; h < n_chunks; h += 2) {                                                  \
      const bool last = h + 2 >= n_chunks;                                                      \
      const int c0 = h * kChunk + tid, c1 = c0 + 4;                                             \
      const int px = (seg * kSeg + lane_pixel<D>(g)) * kM + (kKey ? p.region1 : 0);             \
      const int off0 = px + RowLayout<NX, kKey, D>::chan(c0);                                   \
      const int off1 = px + RowLayout<NX, kKey, D>::chan(c1);                                   \
      const float* r0[3] = {sl[0] + off0, sl[1] + off0, sl[2] + off0};                          \
      const float* r1[3] = {sl[0] + off1, sl[1] + off1, sl[2] + off1};                          \
      float zt[kTiles][4];                                                                      \
      _Pragma("unroll") for (int t = 0; t < kTiles; ++t) zt[t][0] = zt[t][1] = zt[t][2] = zt[t][3] = 0.f; \
      float u[3][2][4], zc[3][2][4], xc[3][3][2][2];                                            \
      GJ_##NAME##_STENCIL(GJ_ROW, GJ_ZC, GJ_XC, GJ_NZ, GJ_MID)                                  \
      const float* wt = s_w + p.w_base[kKey] + h * kTiles * NT * 64 + 2 * NT * lane;            \
      _Pragma("unroll") for (int t = 0; t < kTiles; ++t) {                                      \
        float bw[2 * NT];                                                                       \
        load_b<NT>(bw, wt + t * NT * 64);                                                       \
        if constexpr (kSplit) {                                                                 \
          uint32_t a[4], a_lo[4], b[2 * NT], b_lo[2 * NT];                                      \
          _Pragma("unroll") for (int r = 0; r < 4; ++r) split_tf32(zt[t][r], a[r], a_lo[r]);    \
          _Pragma("unroll") for (int r = 0; r < 2 * NT; ++r) split_tf32(bw[r], b[r], b_lo[r]);  \
          _Pragma("unroll") for (int n = 0; n < NT; ++n) {                                      \
            float(&d)[4] = acc[k##NAME##TileGroup[t]][n];                                       \
            mma_tf32(d, a_lo, b[2 * n], b[2 * n + 1]);                                          \
            mma_tf32(d, a, b_lo[2 * n], b_lo[2 * n + 1]);                                       \
            mma_tf32(d, a, b[2 * n], b[2 * n + 1]);                                             \
          }                                                                                     \
        } else {                                                                                \
          const uint32_t a[4] = {tf32_bits(zt[t][0]), tf32_bits(zt[t][1]), tf32_bits(zt[t][2]), \
                                 tf32_bits(zt[t][3])};                                          \
          _Pragma("unroll") for (int n = 0; n < NT; ++n)                                        \
            mma_tf32(acc[k##NAME##TileGroup[t]][n], a, __float_as_uint(bw[2 * n]), __float_as_uint(bw[2 * n + 1])); \
        }                                                                                       \
      }                                                                                         \
    }                                                                                           \
  }

// NX: the x extent (16, 32, 48, 64; 4 NX threads), NT: output channels / 8 (the mma n-tiles),
// kGroups: more than one channel group (false: the single pass, compiled without the group loop
// or the read-add epilogue), kPlanar: the vector blocks (x1, y1) component-planar in global memory,
// D: the dilation (1, 2, 4, 8: taps at -D, 0, D on every axis), kWin: the row in x windows of NX
// (false: the whole row is the window, its offsets compile-time), kSplit: fp32 by 3xTF32 (each Z
// and weight split into a tf32 part and a tf32 remainder, three mma a tile: remainder x weight,
// Z x remainder, Z x weight; the packed weights then hold plain fp32), compiled at D = 1 on whole
// rows only.
template <int NX, int NT, bool kGroups, bool kPlanar, int D, bool kWin, bool kSplit>
__global__ void __launch_bounds__(4 * NX, 1) forward_kernel(const Params p) {
  extern __shared__ __align__(16) float smem[];
  constexpr int kO = 8 * NT, kThreads = 4 * NX, kSegs = NX / kSeg;
  constexpr bool kStageInWeights = stage_in_weights(D);
  float* ring = smem;
  float* s_w = ring + 3 * p.slice_floats;
  float* s_stage = kStageInWeights ? s_w : s_w + p.w_group;  // over the vector phase's weights, or after them
  float* s_off = kStageInWeights ? s_w + p.w_group : s_stage + kSegs * kO * (kStage0 + kStage1);  // [o] scalar, then [o][3] vector offsets
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = warp % kSegs, half = warp / kSegs;
  const int g = lane >> 2, tid = lane & 3;
  const int b = blockIdx.z, z = blockIdx.y;
  const CtaRows<NX, D, kWin> cta(p.windows, p.strip, p.nz, p.ny, z);  // its rows y = phase + D j and x window
  const int x0 = cta.x0, phase = cta.phase, j0 = cta.j0, j1 = cta.j1, y0 = cta.y0;
  const auto& zz = cta.zz;
  auto wrap_y = [&](int yy) { return cta.wrap_y(yy); };

  if (threadIdx.x < 4 * kO) s_off[threadIdx.x] = p.off[(size_t)b * 4 * kO + threadIdx.x];  // seen after the barrier below
  float acc[GJ_GROUPS][NT][4];
#pragma unroll
  for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[q][n][0] = acc[q][n][1] = acc[q][n][2] = acc[q][n][3] = 0.f;

  // One pass over the strip per channel group (one pass where the whole ring fits): the ring and
  // the weights hold one group's channels; the epilogue of a pass past the first adds to what the
  // previous pass stored.
  const int n_groups = kGroups ? p.groups : 1;
  for (int grp = 0; grp < n_groups; ++grp) {
    if (grp > 0) {  // every warp past the last pass's reads of the ring, weights and staging
      cp_async_wait<0>();
      __syncthreads();
    }
    // The group's packed weights (tf32 already, _plan.pack_weights): its chunks of the vector
    // phase, then of the scalar one, each a contiguous range of the example's weights.
    const float* wx = p.w + (size_t)b * p.w_floats;
    const int wv_n = p.w_base[0], ws_n = p.w_group - wv_n;       // one group's floats per phase
    const float* wv = wx + grp * wv_n;                           // + e, e < wv_n: vector float e
    const float* ws = wx + p.groups * wv_n + grp * ws_n - wv_n;  // + e, e >= wv_n: scalar float e - wv_n
    for (int e = 4 * threadIdx.x; e < p.w_group; e += 4 * kThreads) cp_async16(s_w + e, (e < wv_n ? wv : ws) + e);
    for (int k = 0; k < 3; ++k)
      load_slice<NX, 1, kPlanar, D, kWin>(p, ring + k * p.slice_floats, b, grp, wrap_y(y0 + (k - 1) * D), zz, x0);
    cp_async_commit();
    for (int k = 0; k < 3; ++k)
      load_slice<NX, 0, kPlanar, D, kWin>(p, ring + k * p.slice_floats, b, grp, wrap_y(y0 + (k - 1) * D), zz, x0);
    cp_async_commit();
    cp_async_wait<1>();  // the weights and vector slices; the scalar ones at the first vector MID
    __syncthreads();

    int oldest = 0;  // ring slot of slice y - D
    for (int j = j0; j < j1; ++j) {
      const int y = phase + D * j;
      const int mid = oldest == 2 ? 0 : oldest + 1, newest = mid == 2 ? 0 : mid + 1;
      const float* sl[3] = {ring + oldest * p.slice_floats, ring + mid * p.slice_floats, ring + newest * p.slice_floats};
      float* next = ring + oldest * p.slice_floats;  // slice y + 2D replaces y - D
      const bool more = j + 2 <= j1;  // row y + D is in the strip and needs slice y + 2D
      const int y_next = wrap_y(y + 2 * D);
      // The MID hooks are the row's only CTA barriers. Before the vector phase's, every copy in
      // flight is waited for: the vector slice y + 1 (issued a row ago), which the phase reads
      // after its MID, and the scalar slice y + 1, which the scalar phase reads after its own.
      // Before them a phase reads only slice y - 1, long complete. So a vector copy has a whole
      // row to land and a scalar one two thirds of a phase and the row's tail.
      GJ_PHASE(V)
      GJ_PHASE(S)
      oldest = mid;

      // The warp halves' sums meet in the segment's staging area: half 1's partials in fragment
      // order (conflict-free), half 0 adds them and, once its whole warp has read them, writes the
      // sums in the outputs' layout (scalar [o][16 x]; vector [o][16 x][3], planar [o][3][16 x];
      // two wavefronts a store); then the segment's 64 threads store it as 16-byte rows (float4
      // f of the row: scalar f < 4 kO, vector f < 12 kO, float4 r = f - 12 o of output o's 48
      // staged floats; thread t's f = t + 64 i), the first pass with the bias offsets, a later
      // one adding what the previous pass stored there: the same thread's store to the same
      // address, so program order makes it visible. A later pass loads those float4s before the
      // halves meet, all at once, so their latency overlaps the staging.
      const int t = half * 32 + lane;
      const size_t first = (size_t)b * p.o_total + p.o_base;  // (b, o = o_base)
      const size_t o_rows = (size_t)p.nz * p.ny, zy = (size_t)z * p.ny + y;
      const size_t nx = kWin ? p.nx : NX;  // the rows' extent (NX: the window's)
      float* y0_row = p.y[0] + (first * o_rows + zy) * nx + x0 + seg * kSeg;  // float4 (o, x4) at + o o_rows nx + 4 x4
      // minor: float4 r of output o at + o o_rows 3 nx + 4 r; planar: component r / 4, x4 = r % 4 at
      // + (3 o + r / 4) o_rows nx + 4 x4
      float* y1_row = kPlanar ? p.y[1] + (3 * first * o_rows + zy) * nx + x0 + seg * kSeg
                              : p.y[1] + (first * o_rows + zy) * (3 * nx) + 3 * (x0 + seg * kSeg);
      auto y0_at = [&](int f) { return reinterpret_cast<float4*>(y0_row + (f >> 2) * o_rows * nx + 4 * (f & 3)); };
      auto y1_at = [&](int f) {
        const int o = f / 12, r = f - 12 * o;
        return reinterpret_cast<float4*>(kPlanar ? y1_row + (3 * o + (r >> 2)) * o_rows * nx + 4 * (r & 3)
                                                 : y1_row + o * o_rows * (3 * nx) + 4 * r);
      };
      constexpr int kF0 = (kO * 4 + 63) / 64, kF1 = (kO * 12 + 63) / 64;  // float4s per thread, at most
      float4 prev[kF0 + kF1];
      if (kGroups && grp > 0) {
#pragma unroll
        for (int i = 0; i < kF0; ++i)
          if (t + 64 * i < kO * 4) prev[i] = *y0_at(t + 64 * i);
#pragma unroll
        for (int i = 0; i < kF1; ++i)
          if (t + 64 * i < kO * 12) prev[kF0 + i] = *y1_at(t + 64 * i);
      }
      float* st = s_stage + seg * kO * (kStage0 + kStage1);
      auto at = [&](int q, int n, int k) {
        const int o = n * 8 + 2 * tid + (k & 1), x = lane_pixel<D>(g) + D * (k >> 1);
        if (kGroupBlock[q] == 0) return o * kStage0 + x;
        return kO * kStage0 + o * kStage1 + (kPlanar ? kSeg * kGroupComp[q] + x : 3 * x + kGroupComp[q]);
      };
      if (half == 1) {
#pragma unroll
        for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int k = 0; k < 4; ++k) st[((q * NT + n) * 4 + k) * 32 + lane] = acc[q][n][k], acc[q][n][k] = 0.f;
      }
      pair_barrier(1 + seg);
      if (half == 0) {
#pragma unroll
        for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int k = 0; k < 4; ++k) acc[q][n][k] += st[((q * NT + n) * 4 + k) * 32 + lane];
        __syncwarp();
#pragma unroll
        for (int q = 0; q < GJ_GROUPS; ++q)
#pragma unroll
          for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int k = 0; k < 4; ++k) st[at(q, n, k)] = acc[q][n][k], acc[q][n][k] = 0.f;
      }
      pair_barrier(1 + seg);
      if (grp == 0) {
#pragma unroll
        for (int f = t; f < kO * 4; f += 64) {
          const int o = f >> 2, x4 = f & 3;
          float4 v = *reinterpret_cast<const float4*>(st + o * kStage0 + 4 * x4);
          const float a = s_off[o];
          v.x += a, v.y += a, v.z += a, v.w += a;
          *y0_at(f) = v;
        }
#pragma unroll
        for (int f = t; f < kO * 12; f += 64) {
          const int o = f / 12, x4 = f - 12 * o;
          float4 v = *reinterpret_cast<const float4*>(st + kO * kStage0 + o * kStage1 + 4 * x4);
          const float* a = s_off + kO + 3 * o;
          if constexpr (kPlanar) {  // 4 pixels of component x4 / 4
            const float a0 = a[x4 >> 2];
            v.x += a0, v.y += a0, v.z += a0, v.w += a0;
          } else {  // floats 4 x4 .. 4 x4 + 3 of the row's 16 pixels x 3 components: components j, j + 1, j + 2, j
            const int j = x4 % 3;
            const float a0 = a[j], a1 = a[j == 2 ? 0 : j + 1], a2 = a[j == 0 ? 2 : j - 1];
            v.x += a0, v.y += a1, v.z += a2, v.w += a0;
          }
          *y1_at(f) = v;
        }
      } else {
        auto add = [](float4 v, const float4& u) { return make_float4(v.x + u.x, v.y + u.y, v.z + u.z, v.w + u.w); };
#pragma unroll
        for (int i = 0; i < kF0; ++i) {
          const int f = t + 64 * i, o = f >> 2, x4 = f & 3;
          if (f < kO * 4) *y0_at(f) = add(*reinterpret_cast<const float4*>(st + o * kStage0 + 4 * x4), prev[i]);
        }
#pragma unroll
        for (int i = 0; i < kF1; ++i) {
          const int f = t + 64 * i, o = f / 12, x4 = f - 12 * o;
          if (f < kO * 12)
            *y1_at(f) = add(*reinterpret_cast<const float4*>(st + kO * kStage0 + o * kStage1 + 4 * x4), prev[kF0 + i]);
        }
      }
      if constexpr (kStageInWeights) {
        if (j + 1 < j1) {  // the vector phase's weights back over the staging, for the next row
          __syncthreads();  // every segment's stores have read its staging
          for (int e = 4 * threadIdx.x; e < wv_n; e += 4 * kThreads) cp_async16(s_w + e, wv + e);
          cp_async_commit();  // waited for at the next row's vector MID, before its first mma
        }
      }
    }
  }
  cp_async_wait<0>();
}

template <int NX, int NT, bool kGroups, bool kPlanar, int D, bool kWin, bool kSplit>
cudaError_t launch(const Params& p, int batch, cudaStream_t stream) {
  const size_t stage = stage_in_weights(D) ? 0 : (NX / kSeg) * 8 * NT * (kStage0 + kStage1);
  const size_t smem = sizeof(float) * (3 * (size_t)p.slice_floats + p.w_group + stage + 32 * NT);
  cudaError_t err = cudaFuncSetAttribute(forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, kSplit>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.windows * D * ((p.ny / D + p.strip - 1) / p.strip), p.nz, batch);  // windows x phases x strips
  forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, kSplit><<<grid, 4 * NX, smem, stream>>>(p);
  return cudaGetLastError();
}

// The whole row (one window: NX = nx, 16 .. 64), or x windows of 32 or 64 (kWin, the rows longer
// than their window; Forward refuses other window widths).
template <int NT, bool kGroups, bool kPlanar, int D, bool kSplit>
cudaError_t launch_nx(const Params& p, int nx, int batch, cudaStream_t stream) {
  if constexpr (!kSplit) {  // the split (fp32) kernels take whole rows only (Forward refuses windows)
    if (p.windows > 1) return nx == 32 ? launch<32, NT, kGroups, kPlanar, D, true, false>(p, batch, stream)
                                       : launch<64, NT, kGroups, kPlanar, D, true, false>(p, batch, stream);
  }
  switch (nx) {
    case 16: return launch<16, NT, kGroups, kPlanar, D, false, kSplit>(p, batch, stream);
    case 32: return launch<32, NT, kGroups, kPlanar, D, false, kSplit>(p, batch, stream);
    case 48: return launch<48, NT, kGroups, kPlanar, D, false, kSplit>(p, batch, stream);
    default: return launch<64, NT, kGroups, kPlanar, D, false, kSplit>(p, batch, stream);
  }
}

// Channel-group passes are compiled at dilation 1 only (Forward refuses groups with a dilation).
// The split (fp32) kernels: dilation 1 only (Forward refuses others).
template <int NT, bool kPlanar, bool kSplit>
cudaError_t launch_groups(const Params& p, int nx, int dilation, int batch, cudaStream_t stream) {
  if constexpr (!kSplit) {
    switch (dilation) {
      case 2: return launch_nx<NT, false, kPlanar, 2, false>(p, nx, batch, stream);
      case 4: return launch_nx<NT, false, kPlanar, 4, false>(p, nx, batch, stream);
      case 8: return launch_nx<NT, false, kPlanar, 8, false>(p, nx, batch, stream);
      default: break;
    }
  }
  return p.groups > 1 ? launch_nx<NT, true, kPlanar, 1, kSplit>(p, nx, batch, stream)
                      : launch_nx<NT, false, kPlanar, 1, kSplit>(p, nx, batch, stream);
}

template <bool kPlanar, bool kSplit>
cudaError_t launch_nt(const Params& p, int nx, int dilation, int batch, cudaStream_t stream) {
  return p.o == 8 ? launch_groups<1, kPlanar, kSplit>(p, nx, dilation, batch, stream)
                  : launch_groups<2, kPlanar, kSplit>(p, nx, dilation, batch, stream);
}

ffi::Error Forward(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                   ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                   ffi::Span<const int64_t> geom) {
  auto bad = [](const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda ConvContract: " + why); };
  if (geom.size() != 25) return bad("`geom` must have 25 entries (has " + std::to_string(geom.size()) + ")");
  Params p{};
  const int nx = (int)geom[23];  // the x window's extent (the kernel's NX); the rows' is geom[2]
  p.nx = (int)geom[2];
  if (nx < 1 || p.nx < nx || p.nx % nx) return bad("the x window (`geom`[23]) must divide the x extent");
  p.windows = p.nx / nx;
  if (p.windows > 1 && nx != 32 && nx != 64) return bad("x windows must be 32 or 64 pixels wide");
  p.nz = (int)geom[0], p.ny = (int)geom[1];
  p.c[0] = (int)geom[3], p.c[1] = (int)geom[4], p.o = (int)geom[5], p.strip = (int)geom[6];
  p.w_floats = (int)geom[17], p.groups = (int)geom[18], p.o_total = (int)geom[19], p.o_base = (int)geom[20];
  if (geom[21] != 0 && geom[21] != 1) return bad("`geom`[21] (the vector blocks' layout) must be 0 (minor) or 1 (planar)");
  const bool planar = geom[21] == 1;
  const int dilation = (int)geom[22];
  if (dilation != 1 && dilation != 2 && dilation != 4 && dilation != 8)
    return bad("the dilation (`geom`[22] = " + std::to_string(geom[22]) + ") must be 1, 2, 4 or 8");
  if (nx % kSeg || nx < kSeg || nx > 4 * kSeg) return bad("the x window must be 16, 32, 48 or 64");
  if (p.groups < 1 || p.c[0] % p.groups || p.c[1] % p.groups)
    return bad("the channel groups (`geom`[18] = " + std::to_string(p.groups) + ") must divide the input channels (" +
               std::to_string(p.c[0]) + ", " + std::to_string(p.c[1]) + ")");
  p.cg[0] = p.c[0] / p.groups, p.cg[1] = p.c[1] / p.groups;
  if (p.cg[0] % (2 * kChunk) || p.cg[1] % (2 * kChunk))
    return bad("a channel group's input channels (" + std::to_string(p.cg[0]) + ", " + std::to_string(p.cg[1]) +
               ") must be multiples of 16");
  if (p.o != 8 && p.o != 16) return bad("output channels must be 8 or 16");
  if (p.o_base < 0 || p.o_base % p.o || p.o_base + p.o > p.o_total)
    return bad("the launch's output channels (" + std::to_string(p.o_base) + " + " + std::to_string(p.o) +
               ") must be a whole group within the results' " + std::to_string(p.o_total));
  if (p.strip < 1 || p.nz < 1 || p.ny < 1) return bad("strip, nz and ny must be >= 1");
  if (p.ny % dilation) return bad("ny must be a multiple of the dilation (a CTA's rows are one y phase)");
  if (dilation > 1 && p.groups > 1) return bad("channel groups are compiled at dilation 1 only");
  if (geom[24] != 0 && geom[24] != 1) return bad("`geom`[24] (the precision) must be 0 (tf32) or 1 (fp32, 3xTF32)");
  const bool split = geom[24] == 1;
  if (split && (dilation > 1 || p.windows > 1)) return bad("the fp32 (3xTF32) kernels take dilation 1 and whole rows only");
  // the row layouts are compiled in (stencil_d3.inc); geom carries the plan's, which must agree
  const int l = nx / kSeg - 1, di = dil_index(dilation);
  for (int k = 0; k < 4; ++k)
    if (geom[9 + k] != ((kSkew1[di][l] >> (8 * k)) & 0xff) || geom[13 + k] != ((kSkew3[di][l] >> (8 * k)) & 0xff))
      return bad("the row skews in `geom` are not the compiled ones (rebuild the library)");
  if (geom[7] != kPitch1[di][l] || geom[8] != kPitch3[di][l])
    return bad("the row pitches in `geom` are not the compiled ones (rebuild the library)");
  const int64_t pix = (int64_t)p.nz * p.ny * p.nx;
  const int64_t batch = x0.element_count() / (p.c[0] * pix);
  if (batch < 1 || batch > 65535) return bad("batch must be in [1, 65535]");
  if (x0.element_count() != batch * p.c[0] * pix || x1.element_count() != batch * p.c[1] * pix * 3 ||
      w.element_count() != batch * p.w_floats || off.element_count() != batch * 4 * p.o ||
      y0->element_count() != batch * p.o_total * pix ||
      y1->element_count() != batch * p.o_total * pix * 3)
    return bad("operand sizes do not match `geom` and the batch");
  p.x[0] = x0.typed_data(), p.x[1] = x1.typed_data(), p.w = w.typed_data(), p.off = off.typed_data();
  p.y[0] = y0->typed_data(), p.y[1] = y1->typed_data();
  p.region1 = p.cg[0] * kStride1[di][l];
  p.slice_floats = (p.region1 + p.cg[1] * kStride3[di][l] + 3) / 4 * 4;
  const int nt = p.o / 8;
  p.w_base[1] = 0, p.w_base[0] = (p.cg[1] / kChunk) * GJ_V_TILES * nt * 64;
  p.w_group = p.w_base[0] + (p.cg[0] / kChunk) * GJ_S_TILES * nt * 64;
  if ((int64_t)p.groups * p.w_group != p.w_floats)
    return bad("the packed weights' size (`geom`[17] = " + std::to_string(p.w_floats) + ") is not the layer's");
  if (dilation == 8 && (nx / kSeg) * p.o * (kStage0 + kStage1) > p.w_base[0])
    return bad("the output staging does not fit the vector phase's weights it shares at dilation 8");
  const cudaError_t err = split ? (planar ? launch_nt<true, true>(p, nx, dilation, (int)batch, stream)
                                          : launch_nt<false, true>(p, nx, dilation, (int)batch, stream))
                                 : (planar ? launch_nt<true, false>(p, nx, dilation, (int)batch, stream)
                                           : launch_nt<false, false>(p, nx, dilation, (int)batch, stream));
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ginjax cuda ConvContract: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// A later output group's launch: prev0 and prev1 are the previous launch's results, aliased to y0
// and y1 (XLA hands over the same buffers, or copies them in where a previous result is still read
// elsewhere), so the channels already written stay and this launch adds its slice.
ffi::Error ForwardInto(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> prev0,
                       ffi::Buffer<ffi::F32> prev1, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                       ffi::Span<const int64_t> geom) {
  if (prev0.typed_data() != y0->typed_data() || prev1.typed_data() != y1->typed_data())
    return ffi::Error::InvalidArgument("ginjax cuda ConvContract: the previous output group's results are not aliased to the results");
  return Forward(stream, x0, x1, w, off, y0, y1, geom);
}

}  // namespace

// The operands both targets share: the stream, x0, x1, w and off.
static auto ForwardOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForward, Forward,
                              ForwardOperands()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geom"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForwardInto, ForwardInto,
                              ForwardOperands()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("geom"));
