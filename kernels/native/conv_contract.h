// The factorised ConvContract on the CPU: forward and weight gradient of one layer, every key pair
// in one call, on the blocks' native layout (batch, c, *spatial, *tensor).
//
// Per tile of output pixels (T rows along axis D-2 by the whole last axis), for each pair (a, b):
//   Z[(c, f), j, px] = sum_{y, i} B[f, y, i, j] X_a[c, px + y * r - pad, i]   sparse stencil
//   out_b[o, j, px] += sum_{(c, f)} w[o, c, f] Z[(c, f), j, px]              channel GEMM
// The tile of X (with its halo) is gathered once into a planar, zero-padded buffer: padding and
// torus wrap are per-axis index tables built by Python (`tables`), so no padded copy exists.
// Z stays in cache; the GEMM's and the stencil's inner loops run over a fixed number of
// contiguous pixels, which the compiler vectorises. The weight gradient recomputes Z and
// reduces dw[o, (c, f)] += sum_px G[o, j, px] Z[(c, f), j, px] in fixed-size chunks of tiles,
// summed in a fixed order: bit-identical results whatever the thread count.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace ginjax_native {

// Runs fn(0..n-1), possibly on several threads; returns when all calls have finished.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& fn)>;

struct Key {
  int64_t channels;
  int64_t comps;  // D^k
};

struct PairPlan {
  int64_t in_key, out_key, filters;
  int64_t row_start;  // first (f, j) row of this pair in row_ptr
};

// Everything static about a layer, decoded from the FFI attributes.
struct Plan {
  int D = 0;
  int64_t tile_rows = 1;  // output rows along axis D-2 per tile
  int64_t n_in[3] = {1, 1, 1}, n_out[3] = {1, 1, 1}, taps[3] = {1, 1, 1}, dil[3] = {1, 1, 1};
  // per axis, indexed by out_pixel + tap * dil: the input index to read, or -1 for a zero
  std::vector<int64_t> table[3];
  std::vector<Key> in_keys, out_keys;
  std::vector<PairPlan> pairs;
  std::vector<int64_t> row_ptr;     // per (pair, f, j) row: its entries [row_ptr[r], row_ptr[r+1])
  std::vector<int64_t> entry_tap;   // flattened tap, row-major over the D axes
  std::vector<int64_t> entry_comp;  // input tensor component i
  std::vector<double> entry_val;    // basis value B[f, y, i, j]

  // Returns "" or what is wrong with the attributes.
  std::string decode(const int64_t* geom, int64_t n_geom, const int64_t* tables, int64_t n_tables,
                     const int64_t* keys, int64_t n_keys, const int64_t* pairs_attr, int64_t n_pairs_attr,
                     const int64_t* rows, int64_t n_rows, const int64_t* entries, int64_t n_entries,
                     const double* values, int64_t n_values);
};

template <typename T>
void forward(const Plan& plan, int64_t batch, const std::vector<const T*>& xs, const std::vector<const T*>& ws,
             const std::vector<T*>& outs, const ParallelFor& parallel_for);

template <typename T>
void weight_grad(const Plan& plan, int64_t batch, const std::vector<const T*>& xs,
                 const std::vector<const T*>& gs, const std::vector<T*>& dws, const ParallelFor& parallel_for);

}  // namespace ginjax_native
