// The factorised ConvContract kernels (see conv_contract.h for the algorithm).
#include "conv_contract.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace ginjax_native {
namespace {

// Pixels per inner vector loop: the stencil's and the GEMMs' accumulators are this many
// contiguous values (two AVX2 registers of float32), so -O3 vectorises them.
constexpr int64_t kLanes = 16;
constexpr int64_t kOBlock = 4;  // output channels per GEMM register block
constexpr int64_t kKBlock = 4;  // (c, f) rows per weight-gradient register block

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// 32-byte vectors through the compiler's vector extension (GCC and Clang): the accumulators of
// the inner loops stay in registers, which plain arrays did not (the compiler spilled them).
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int64_t kWidth = 32 / sizeof(T);
  static constexpr int64_t kPerLanes = kLanes / kWidth;  // vectors per kLanes pixels
  static V load(const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V splat(T x) { return V{} + x; }
};

// Sizes shared by every tile of one call.
struct Geometry {
  bool d3;
  int64_t rows, lx, lp, lq, halo_rows, outer_taps;
  int64_t outer_out, tiles_per_row;  // per batch element: outer_out * tiles_per_row tiles
  int64_t in_pixels, out_pixels;
  std::vector<int64_t> entry_offset;  // per entry, its offset in a channel's input buffer
  // the longest run of the last axis' table that reads consecutive cells: [run_lo, run_hi)
  // reads from run_src onwards (the interior, copied without table look-ups)
  int64_t run_lo = 0, run_hi = 0, run_src = 0;

  explicit Geometry(const Plan& p) {
    const int D = p.D, a1 = D - 2, aL = D - 1;
    d3 = D == 3;
    rows = p.tile_rows;
    lx = p.n_out[aL];
    lp = round_up(lx, kLanes);
    lq = lp + (p.taps[aL] - 1) * p.dil[aL];
    halo_rows = rows + (p.taps[a1] - 1) * p.dil[a1];
    outer_taps = d3 ? p.taps[0] : 1;
    outer_out = d3 ? p.n_out[0] : 1;
    tiles_per_row = (p.n_out[a1] + rows - 1) / rows;
    in_pixels = out_pixels = 1;
    for (int ax = 0; ax < D; ++ax) {
      in_pixels *= p.n_in[ax];
      out_pixels *= p.n_out[ax];
    }
    const std::vector<int64_t>& tab = p.table[aL];
    for (int64_t lo = 0, hi; lo < static_cast<int64_t>(tab.size()); lo = hi) {
      hi = lo + 1;
      if (tab[lo] < 0) continue;
      while (hi < static_cast<int64_t>(tab.size()) && tab[hi] == tab[hi - 1] + 1) ++hi;
      if (hi - lo > run_hi - run_lo) {
        run_lo = lo;
        run_hi = hi;
        run_src = tab[lo];
      }
    }
    run_hi = std::min(run_hi, lq);
    run_lo = std::min(run_lo, run_hi);
    entry_offset.resize(p.entry_tap.size());
    for (size_t e = 0; e < p.entry_tap.size(); ++e) {
      int64_t tap = p.entry_tap[e];
      const int64_t yl = tap % p.taps[aL];
      tap /= p.taps[aL];
      const int64_t y1 = tap % p.taps[a1];
      const int64_t yo = d3 ? tap / p.taps[a1] : 0;
      entry_offset[e] = ((p.entry_comp[e] * outer_taps + yo) * halo_rows + y1 * p.dil[a1]) * lq + yl * p.dil[aL];
    }
  }

  int64_t tiles() const { return outer_out * tiles_per_row; }
  int64_t cols(int64_t comps) const { return comps * rows * lp; }
  int64_t channel_buffer(const Key& k) const { return k.comps * outer_taps * halo_rows * lq; }
};

template <typename T>
struct Scratch {
  std::vector<T> x, z, acc;
  std::vector<int64_t> x_offset;  // per input key, its buffer's start in x
};

template <typename T>
Scratch<T>& scratch() {
  thread_local Scratch<T> s;
  return s;
}

// One tile: batch element `n`, outer output index `xo` (D=3), first output row `x1`.
struct Tile {
  int64_t n, xo, x1, rows_here;
};

Tile tile_at(const Plan& p, const Geometry& g, int64_t n, int64_t t) {
  Tile tile;
  tile.n = n;
  tile.xo = t / g.tiles_per_row;
  tile.x1 = (t % g.tiles_per_row) * g.rows;
  tile.rows_here = std::min(g.rows, p.n_out[p.D - 2] - tile.x1);
  return tile;
}

// dst[i * comp_stride + q] = src[q * comps + i]: the interior of a row, de-interleaved.
template <typename T, int64_t I>
void copy_run_fixed(const T* src, T* dst, int64_t comp_stride, int64_t n) {
  for (int64_t i = 0; i < I; ++i)
    for (int64_t q = 0; q < n; ++q) dst[i * comp_stride + q] = src[q * I + i];
}

template <typename T>
void copy_run(const T* src, T* dst, int64_t comp_stride, int64_t n, int64_t comps) {
  switch (comps) {
    case 1: return copy_run_fixed<T, 1>(src, dst, comp_stride, n);
    case 2: return copy_run_fixed<T, 2>(src, dst, comp_stride, n);
    case 3: return copy_run_fixed<T, 3>(src, dst, comp_stride, n);
    case 4: return copy_run_fixed<T, 4>(src, dst, comp_stride, n);
    case 9: return copy_run_fixed<T, 9>(src, dst, comp_stride, n);
    default:
      for (int64_t i = 0; i < comps; ++i)
        for (int64_t q = 0; q < n; ++q) dst[i * comp_stride + q] = src[q * comps + i];
  }
}

// Gathers every input key's halo tile into planar buffers [c][i][yo][row][q], zeros where the
// index tables say the cell is padding.
template <typename T>
void gather_inputs(const Plan& p, const Geometry& g, const Tile& tile, const std::vector<const T*>& xs,
                   Scratch<T>& s) {
  const int D = p.D, a1 = D - 2, aL = D - 1;
  const std::vector<int64_t>& tab1 = p.table[a1];
  const std::vector<int64_t>& tabL = p.table[aL];
  const int64_t len1 = static_cast<int64_t>(tab1.size()), lenL = static_cast<int64_t>(tabL.size());
  s.x_offset.assign(p.in_keys.size(), 0);
  int64_t total = 0;
  for (size_t a = 0; a < p.in_keys.size(); ++a) {
    s.x_offset[a] = total;
    total += p.in_keys[a].channels * g.channel_buffer(p.in_keys[a]);
  }
  if (static_cast<int64_t>(s.x.size()) < total) s.x.resize(total);
  for (size_t a = 0; a < p.in_keys.size(); ++a) {
    const Key& key = p.in_keys[a];
    const int64_t I = key.comps;
    const int64_t stride_l = I, stride_1 = p.n_in[aL] * I;
    const int64_t stride_o = g.d3 ? p.n_in[a1] * p.n_in[aL] * I : 0;
    const T* x = xs[a] + tile.n * key.channels * g.in_pixels * I;
    T* buf = s.x.data() + s.x_offset[a];
    for (int64_t c = 0; c < key.channels; ++c) {
      const T* xc = x + c * g.in_pixels * I;
      for (int64_t yo = 0; yo < g.outer_taps; ++yo) {
        const int64_t so = g.d3 ? p.table[0][tile.xo + yo * p.dil[0]] : 0;
        for (int64_t q1 = 0; q1 < g.halo_rows; ++q1) {
          const int64_t i1 = tile.x1 + q1;
          const int64_t s1 = (so >= 0 && i1 < len1) ? tab1[i1] : -1;
          T* dst = buf + (((c * I) * g.outer_taps + yo) * g.halo_rows + q1) * g.lq;
          const int64_t comp_stride = g.outer_taps * g.halo_rows * g.lq;
          if (s1 < 0) {
            for (int64_t i = 0; i < I; ++i) std::fill(dst + i * comp_stride, dst + i * comp_stride + g.lq, T(0));
            continue;
          }
          const T* src = xc + so * stride_o + s1 * stride_1;
          const int64_t qmax = std::min(g.lq, lenL);
          for (int64_t i = 0; i < I; ++i) {
            T* d = dst + i * comp_stride;
            for (int64_t q = 0; q < g.run_lo; ++q) d[q] = tabL[q] >= 0 ? src[tabL[q] * stride_l + i] : T(0);
            for (int64_t q = g.run_hi; q < qmax; ++q) d[q] = tabL[q] >= 0 ? src[tabL[q] * stride_l + i] : T(0);
            std::fill(d + std::max(qmax, g.run_hi), d + g.lq, T(0));
          }
          copy_run(src + g.run_src * I, dst + g.run_lo, comp_stride, g.run_hi - g.run_lo, I);
        }
      }
    }
  }
}

// Z[(c, f)][j][row][px] of one pair, with its (c, f) rows padded with zeros to a multiple of kKBlock.
template <typename T>
void stencil(const Plan& p, const Geometry& g, size_t t, const Scratch<T>& s, T* z) {
  const PairPlan& pair = p.pairs[t];
  const Key& in = p.in_keys[pair.in_key];
  const int64_t J = p.out_keys[pair.out_key].comps, F = pair.filters;
  const int64_t cols = g.cols(J), per_channel = g.channel_buffer(in);
  const T* buf = s.x.data() + s.x_offset[pair.in_key];
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t NV = S::kPerLanes;
  // runs of kLanes pixels: (row, first pixel) in the input buffer and in Z, taken two at a time
  // so that each basis entry feeds 2 * NV vector FMAs
  const int64_t runs = g.rows * (g.lp / kLanes);
  for (int64_t c = 0; c < in.channels; ++c) {
    const T* xc = buf + c * per_channel;
    for (int64_t f = 0; f < F; ++f) {
      for (int64_t j = 0; j < J; ++j) {
        const int64_t row = pair.row_start + f * J + j;
        const int64_t e0 = p.row_ptr[row], e1 = p.row_ptr[row + 1];
        T* zr = z + (c * F + f) * cols + j * g.rows * g.lp;
        for (int64_t run = 0; run < runs; run += 2) {
          const int64_t r0 = run / (g.lp / kLanes), x0 = run % (g.lp / kLanes) * kLanes;
          const int64_t r1 = (run + 1) / (g.lp / kLanes), x1 = (run + 1) % (g.lp / kLanes) * kLanes;
          const bool two = run + 1 < runs;
          const T* s0 = xc + r0 * g.lq + x0;
          const T* s1 = xc + (two ? r1 * g.lq + x1 : r0 * g.lq + x0);
          V a0[NV] = {}, a1[NV] = {};
          for (int64_t e = e0; e < e1; ++e) {
            const V v = S::splat(static_cast<T>(p.entry_val[e]));
            const int64_t off = g.entry_offset[e];
#pragma GCC unroll 8
            for (int64_t u = 0; u < NV; ++u) {
              a0[u] += v * S::load(s0 + off + u * S::kWidth);
              a1[u] += v * S::load(s1 + off + u * S::kWidth);
            }
          }
#pragma GCC unroll 8
          for (int64_t u = 0; u < NV; ++u) S::store(zr + r0 * g.lp + x0 + u * S::kWidth, a0[u]);
          if (two) {
#pragma GCC unroll 8
            for (int64_t u = 0; u < NV; ++u) S::store(zr + r1 * g.lp + x1 + u * S::kWidth, a1[u]);
          }
        }
      }
    }
  }
  const int64_t K = in.channels * F;
  std::fill(z + K * cols, z + round_up(K, kKBlock) * cols, T(0));
}

// Zeros the columns of Z beyond the tile's rows and the last axis' pixels: they hold halo values
// (finite or not) that the weight gradient must not see, even multiplied by a zero cotangent.
template <typename T>
void mask_columns(const Geometry& g, const Tile& tile, int64_t z_rows, T* z) {
  if (tile.rows_here == g.rows && g.lx == g.lp) return;
  for (int64_t row = 0; row < z_rows; ++row) {
    T* zr = z + row * g.rows * g.lp;
    for (int64_t r = 0; r < g.rows; ++r) {
      const int64_t from = r < tile.rows_here ? g.lx : 0;
      std::fill(zr + r * g.lp + from, zr + (r + 1) * g.lp, T(0));
    }
  }
}

int64_t z_capacity(const Plan& p, const Geometry& g) {
  int64_t most = 0;
  for (const PairPlan& pair : p.pairs) {
    const int64_t K = round_up(p.in_keys[pair.in_key].channels * pair.filters, kKBlock);
    most = std::max(most, K * g.cols(p.out_keys[pair.out_key].comps));
  }
  return most;
}

// Per pair and batch element: w[o, (c, f)] copied into [o_pad][k_pad] with zero padding.
template <typename T>
struct PackedWeights {
  std::vector<T> data;
  std::vector<int64_t> offset;  // per pair, of batch element 0
  std::vector<int64_t> o_pad, k_pad;
  int64_t per_batch = 0;

  PackedWeights(const Plan& p, int64_t batch, const std::vector<const T*>* ws) {
    for (const PairPlan& pair : p.pairs) {
      o_pad.push_back(round_up(p.out_keys[pair.out_key].channels, kOBlock));
      k_pad.push_back(round_up(p.in_keys[pair.in_key].channels * pair.filters, kKBlock));
      offset.push_back(per_batch);
      per_batch += o_pad.back() * k_pad.back();
    }
    data.assign(per_batch * batch, T(0));
    if (ws == nullptr) return;
    for (int64_t n = 0; n < batch; ++n) {
      for (size_t t = 0; t < p.pairs.size(); ++t) {
        const int64_t O = p.out_keys[p.pairs[t].out_key].channels;
        const int64_t K = p.in_keys[p.pairs[t].in_key].channels * p.pairs[t].filters;
        const T* w = (*ws)[t] + n * O * K;
        T* dst = data.data() + n * per_batch + offset[t];
        for (int64_t o = 0; o < O; ++o) std::copy(w + o * K, w + (o + 1) * K, dst + o * k_pad[t]);
      }
    }
  }

  T* at(int64_t n, size_t t) { return data.data() + n * per_batch + offset[t]; }
  const T* at(int64_t n, size_t t) const { return data.data() + n * per_batch + offset[t]; }
};

// acc[o_pad][cols] += w[o_pad][k_pad] . z[k_pad][cols]
template <typename T>
void gemm_accumulate(const T* w, const T* z, T* acc, int64_t o_pad, int64_t k_pad, int64_t cols) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t NV = S::kPerLanes;
  for (int64_t o0 = 0; o0 < o_pad; o0 += kOBlock) {
    for (int64_t n0 = 0; n0 < cols; n0 += kLanes) {
      V sum[kOBlock][NV];
#pragma GCC unroll 8
      for (int64_t q = 0; q < kOBlock; ++q)
#pragma GCC unroll 8
        for (int64_t u = 0; u < NV; ++u) sum[q][u] = S::load(acc + (o0 + q) * cols + n0 + u * S::kWidth);
      for (int64_t k = 0; k < k_pad; ++k) {
        const T* zr = z + k * cols + n0;
        V zv[NV];
#pragma GCC unroll 8
        for (int64_t u = 0; u < NV; ++u) zv[u] = S::load(zr + u * S::kWidth);
#pragma GCC unroll 8
        for (int64_t q = 0; q < kOBlock; ++q) {
          const V wq = S::splat(w[(o0 + q) * k_pad + k]);
#pragma GCC unroll 8
          for (int64_t u = 0; u < NV; ++u) sum[q][u] += wq * zv[u];
        }
      }
#pragma GCC unroll 8
      for (int64_t q = 0; q < kOBlock; ++q)
#pragma GCC unroll 8
        for (int64_t u = 0; u < NV; ++u) S::store(acc + (o0 + q) * cols + n0 + u * S::kWidth, sum[q][u]);
    }
  }
}

// dw[o_pad][k_pad] += g[o_pad][cols] . z[k_pad][cols]^T, in a fixed summation order.
template <typename T>
void gemm_reduce(const T* gt, const T* z, T* dw, int64_t o_pad, int64_t k_pad, int64_t cols) {
  using S = Simd<T>;
  using V = typename S::V;
  constexpr int64_t kO = 2;
  for (int64_t o0 = 0; o0 < o_pad; o0 += kO) {
    for (int64_t k0 = 0; k0 < k_pad; k0 += kKBlock) {
      V sum[kO][kKBlock] = {};
      for (int64_t n = 0; n < cols; n += S::kWidth) {
        V gv[kO], zv[kKBlock];
#pragma GCC unroll 8
        for (int64_t q = 0; q < kO; ++q) gv[q] = S::load(gt + (o0 + q) * cols + n);
#pragma GCC unroll 8
        for (int64_t m = 0; m < kKBlock; ++m) zv[m] = S::load(z + (k0 + m) * cols + n);
#pragma GCC unroll 8
        for (int64_t q = 0; q < kO; ++q)
#pragma GCC unroll 8
          for (int64_t m = 0; m < kKBlock; ++m) sum[q][m] += gv[q] * zv[m];
      }
      for (int64_t q = 0; q < kO; ++q)
        for (int64_t m = 0; m < kKBlock; ++m) {
          T total = 0;
          for (int64_t u = 0; u < S::kWidth; ++u) total += sum[q][m][u];
          dw[(o0 + q) * k_pad + k0 + m] += total;
        }
    }
  }
}

// Output (or cotangent) strides of key b in the native layout.
struct OutStrides {
  int64_t channel, outer, row, col;
};

OutStrides out_strides(const Plan& p, const Geometry& g, const Key& key) {
  const int D = p.D;
  OutStrides s;
  s.col = key.comps;
  s.row = p.n_out[D - 1] * key.comps;
  s.outer = g.d3 ? p.n_out[D - 2] * s.row : 0;
  s.channel = g.out_pixels * key.comps;
  return s;
}

// The per-tile buffer of the output keys (the forward's accumulators, the weight gradient's
// cotangent tile): per key, [o_pad][j][row][px] with o_pad a multiple of the GEMMs' register
// block; `start` is each key's offset in it and `size` its length.
struct KeyTiles {
  std::vector<int64_t> start;
  int64_t size = 0;

  KeyTiles(const Plan& p, const Geometry& g) {
    for (const Key& k : p.out_keys) {
      start.push_back(size);
      size += round_up(k.channels, kOBlock) * g.cols(k.comps);
    }
  }
};

// Copies one output key's pixels of `tile` between its block in the native layout (batch
// element tile.n) and its planar part of the per-tile buffer: into the buffer (kToPlanar, the
// cotangent) or out of it (the forward's result).
template <bool kToPlanar, typename T>
void copy_key_tile(const Plan& p, const Geometry& g, const Tile& tile, const Key& key,
                   std::conditional_t<kToPlanar, const T*, T*> native, std::conditional_t<kToPlanar, T*, const T*> planar) {
  const OutStrides st = out_strides(p, g, key);
  const int64_t J = key.comps, cols = g.cols(J);
  native += tile.n * key.channels * st.channel + tile.xo * st.outer;
  for (int64_t o = 0; o < key.channels; ++o)
    for (int64_t r = 0; r < tile.rows_here; ++r) {
      const auto row = native + o * st.channel + (tile.x1 + r) * st.row;
      for (int64_t j = 0; j < J; ++j) {
        const auto buf = planar + o * cols + (j * g.rows + r) * g.lp;
        for (int64_t x = 0; x < g.lx; ++x) {
          if constexpr (kToPlanar)
            buf[x] = row[x * J + j];
          else
            row[x * J + j] = buf[x];
        }
      }
    }
}

}  // namespace

std::string Plan::decode(const int64_t* geom, int64_t n_geom, const int64_t* tables, int64_t n_tables,
                         const int64_t* keys, int64_t n_keys, const int64_t* pairs_attr, int64_t n_pairs_attr,
                         const int64_t* rows, int64_t n_rows, const int64_t* entries, int64_t n_entries,
                         const double* values, int64_t n_values) {
  if (n_geom < 2) return "`geom` is too short";
  D = static_cast<int>(geom[0]);
  if (D != 2 && D != 3) return "`geom`: D must be 2 or 3";
  if (n_geom != 2 + 4 * D) return "`geom` must hold D, tile rows and 4 values per axis";
  tile_rows = geom[1];
  if (tile_rows < 1) return "`geom`: tile rows must be >= 1";
  int64_t used = 0;
  for (int ax = 0; ax < D; ++ax) {
    n_in[ax] = geom[2 + ax];
    n_out[ax] = geom[2 + D + ax];
    taps[ax] = geom[2 + 2 * D + ax];
    dil[ax] = geom[2 + 3 * D + ax];
    if (n_in[ax] < 1 || n_out[ax] < 1 || taps[ax] < 1 || dil[ax] < 1) return "`geom`: sizes must be >= 1";
    const int64_t len = n_out[ax] + (taps[ax] - 1) * dil[ax];
    if (used + len > n_tables) return "`tables` is too short";
    table[ax].assign(tables + used, tables + used + len);
    for (int64_t v : table[ax])
      if (v < -1 || v >= n_in[ax]) return "`tables` has an index out of range";
    used += len;
  }
  if (used != n_tables) return "`tables` has extra values";
  if (n_keys < 2) return "`keys` is too short";
  const int64_t ni = keys[0], no = keys[1];
  if (n_keys != 2 + 2 * (ni + no)) return "`keys` must hold the key counts and (channels, comps) per key";
  in_keys.clear();
  out_keys.clear();
  for (int64_t a = 0; a < ni; ++a) in_keys.push_back({keys[2 + 2 * a], keys[3 + 2 * a]});
  for (int64_t b = 0; b < no; ++b) out_keys.push_back({keys[2 + 2 * (ni + b)], keys[3 + 2 * (ni + b)]});
  if (n_pairs_attr % 4 != 0) return "`pairs` must hold 4 values per pair";
  pairs.clear();
  row_ptr.assign(rows, rows + n_rows);
  for (int64_t t = 0; t < n_pairs_attr / 4; ++t) {
    PairPlan pp{pairs_attr[4 * t], pairs_attr[4 * t + 1], pairs_attr[4 * t + 2], pairs_attr[4 * t + 3]};
    if (pp.in_key < 0 || pp.in_key >= ni || pp.out_key < 0 || pp.out_key >= no || pp.filters < 1)
      return "`pairs` has a key index out of range";
    if (pp.row_start < 0 || pp.row_start + pp.filters * out_keys[pp.out_key].comps >= n_rows)
      return "`pairs` has a row range out of `rows`";
    pairs.push_back(pp);
  }
  if (n_entries != 2 * n_values) return "`entries` must hold (tap, comp) per value";
  entry_tap.resize(n_values);
  entry_comp.resize(n_values);
  entry_val.assign(values, values + n_values);
  int64_t all_taps = 1;
  for (int ax = 0; ax < D; ++ax) all_taps *= taps[ax];
  for (int64_t e = 0; e < n_values; ++e) {
    entry_tap[e] = entries[2 * e];
    entry_comp[e] = entries[2 * e + 1];
    if (entry_tap[e] < 0 || entry_tap[e] >= all_taps) return "`entries` has a tap out of range";
  }
  for (int64_t r = 0; r + 1 < n_rows; ++r)
    if (row_ptr[r] < 0 || row_ptr[r] > row_ptr[r + 1] || row_ptr[r + 1] > n_values) return "`rows` is not monotone";
  for (const PairPlan& pp : pairs) {
    const int64_t I = in_keys[pp.in_key].comps;
    for (int64_t r = pp.row_start; r < pp.row_start + pp.filters * out_keys[pp.out_key].comps; ++r)
      for (int64_t e = row_ptr[r]; e < row_ptr[r + 1]; ++e)
        if (entry_comp[e] < 0 || entry_comp[e] >= I) return "`entries` has a component out of range";
  }
  return "";
}

template <typename T>
void forward(const Plan& p, int64_t batch, const std::vector<const T*>& xs, const std::vector<const T*>& ws,
             const std::vector<T*>& outs, const ParallelFor& parallel_for) {
  const Geometry g(p);
  const PackedWeights<T> packed(p, batch, &ws);
  const int64_t tiles = g.tiles();
  const int64_t z_size = z_capacity(p, g);
  const KeyTiles acc_tiles(p, g);
  parallel_for(batch * tiles, [&](int64_t item) {
    const Tile tile = tile_at(p, g, item / tiles, item % tiles);
    Scratch<T>& s = scratch<T>();
    gather_inputs(p, g, tile, xs, s);
    if (static_cast<int64_t>(s.z.size()) < z_size) s.z.resize(z_size);
    s.acc.assign(acc_tiles.size, T(0));
    for (size_t t = 0; t < p.pairs.size(); ++t) {
      const PairPlan& pair = p.pairs[t];
      stencil(p, g, t, s, s.z.data());
      gemm_accumulate(packed.at(tile.n, t), s.z.data(), s.acc.data() + acc_tiles.start[pair.out_key], packed.o_pad[t],
                      packed.k_pad[t], g.cols(p.out_keys[pair.out_key].comps));
    }
    for (size_t b = 0; b < p.out_keys.size(); ++b)
      copy_key_tile<false, T>(p, g, tile, p.out_keys[b], outs[b], s.acc.data() + acc_tiles.start[b]);
  });
}

template <typename T>
void weight_grad(const Plan& p, int64_t batch, const std::vector<const T*>& xs, const std::vector<const T*>& gs,
                 const std::vector<T*>& dws, const ParallelFor& parallel_for) {
  const Geometry g(p);
  PackedWeights<T> layout(p, 1, nullptr);  // only its padded sizes
  const int64_t tiles = g.tiles();
  // A fixed split of each batch element's tiles into chunks (not one per thread): each chunk
  // sums its tiles in order, and the chunks are added in order, whatever ran where.
  const int64_t chunks = std::min<int64_t>(tiles, 16);
  const int64_t part = layout.per_batch;
  std::vector<T> partial(batch * chunks * part, T(0));
  const int64_t z_size = z_capacity(p, g);
  const KeyTiles g_tiles(p, g);
  parallel_for(batch * chunks, [&](int64_t item) {
    const int64_t n = item / chunks, chunk = item % chunks;
    T* dw = partial.data() + item * part;
    Scratch<T>& s = scratch<T>();
    if (static_cast<int64_t>(s.z.size()) < z_size) s.z.resize(z_size);
    for (int64_t t_index = chunk * tiles / chunks; t_index < (chunk + 1) * tiles / chunks; ++t_index) {
      const Tile tile = tile_at(p, g, n, t_index);
      gather_inputs(p, g, tile, xs, s);
      // the cotangent tile, planar, zero beyond the layer's pixels
      s.acc.assign(g_tiles.size, T(0));
      for (size_t b = 0; b < p.out_keys.size(); ++b)
        copy_key_tile<true, T>(p, g, tile, p.out_keys[b], gs[b], s.acc.data() + g_tiles.start[b]);
      for (size_t t = 0; t < p.pairs.size(); ++t) {
        const PairPlan& pair = p.pairs[t];
        stencil(p, g, t, s, s.z.data());
        mask_columns(g, tile, p.in_keys[pair.in_key].channels * pair.filters * p.out_keys[pair.out_key].comps,
                     s.z.data());
        gemm_reduce(s.acc.data() + g_tiles.start[pair.out_key], s.z.data(), dw + layout.offset[t], layout.o_pad[t],
                    layout.k_pad[t], g.cols(p.out_keys[pair.out_key].comps));
      }
    }
  });
  for (int64_t n = 0; n < batch; ++n) {
    for (size_t t = 0; t < p.pairs.size(); ++t) {
      const int64_t O = p.out_keys[p.pairs[t].out_key].channels;
      const int64_t K = p.in_keys[p.pairs[t].in_key].channels * p.pairs[t].filters;
      T* dst = dws[t] + n * O * K;
      for (int64_t o = 0; o < O; ++o)
        for (int64_t k = 0; k < K; ++k) {
          T total = 0;
          for (int64_t c = 0; c < chunks; ++c)
            total += partial[(n * chunks + c) * part + layout.offset[t] + o * layout.k_pad[t] + k];
          dst[o * K + k] = total;
        }
    }
  }
}

template void forward<float>(const Plan&, int64_t, const std::vector<const float*>&, const std::vector<const float*>&,
                             const std::vector<float*>&, const ParallelFor&);
template void forward<double>(const Plan&, int64_t, const std::vector<const double*>&,
                              const std::vector<const double*>&, const std::vector<double*>&, const ParallelFor&);
template void weight_grad<float>(const Plan&, int64_t, const std::vector<const float*>&,
                                 const std::vector<const float*>&, const std::vector<float*>&, const ParallelFor&);
template void weight_grad<double>(const Plan&, int64_t, const std::vector<const double*>&,
                                  const std::vector<const double*>&, const std::vector<double*>&, const ParallelFor&);

}  // namespace ginjax_native
