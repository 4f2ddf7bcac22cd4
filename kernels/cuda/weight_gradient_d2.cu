// The weight gradient of the D = 2 {scalar, vector} torus layer (3x3 invariant filters): XLA FFI
// target "ginjax_cuda_weight_gradient_2d", weight_gradient_kernel.cuh's kernel compiled on the 2D
// walk (weight_gradient_d2.inc: one row a channel in each y slice, vector blocks of 2 components,
// the z grid 1) for component-planar vector blocks (kernels/_layout.py's GPU layout), 16 or 32
// output channels a launch (32: two m-tiles, x windows of 32 or 64), dilations 1, 2, 4, 8, TF32.
//
// Operands (unbatched shapes; any leading batch dims, the same on all): x0 (c, ny, nx), x1 (c, ny,
// nx, 2) planar ((c, 2, ny, nx) in memory), gy0 (O, ny, nx), gy1 (O, ny, nx, 2) planar; result and
// `geom` as weight_gradient_kernel.cuh's header (nz = 1, planar 1, precision 0).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"
#include "weight_gradient_d2.inc"
#include "weight_gradient_kernel.cuh"

static_assert(kComps == 2 && kRows == 1, "weight_gradient_d2.cu compiles the 2D walk");

cudaError_t launch_layer(const DwParams& p, int o, int nx, int dilation, bool planar, bool split, int batch,
                         cudaStream_t stream) {
  if (!planar || split) return cudaErrorInvalidValue;  // WeightGradient refuses both first
  return o == 16 ? launch_dw_dil<2, true, false>(p, nx, dilation, batch, stream)
                 : launch_dw_dil<4, true, false>(p, nx, dilation, batch, stream);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaWeightGradient2d, WeightGradient, WeightGradientBinding());
