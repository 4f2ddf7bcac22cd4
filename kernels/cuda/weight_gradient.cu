// The weight gradient of the D = 3 {scalar, vector} torus layer (3x3x3 invariant filters): XLA FFI
// target "ginjax_cuda_weight_gradient", weight_gradient_kernel.cuh's kernel compiled on the 3D walk
// (weight_gradient_d3.inc) for vector blocks components minor or component-planar, 8 or 16 output
// channels a launch, dilations 1, 2, 4, 8, TF32, and fp32 by 3xTF32 (dilation 1, whole rows).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"
#include "weight_gradient_d3.inc"
#include "weight_gradient_kernel.cuh"

static_assert(kComps == 3 && kRows == 3, "weight_gradient.cu compiles the 3D walk");

template <bool kPlanar, bool kSplit>
cudaError_t launch_dw_nt(const DwParams& p, int o, int nx, int dilation, int batch, cudaStream_t stream) {
  return o == 8 ? launch_dw_dil<1, kPlanar, kSplit>(p, nx, dilation, batch, stream)
                : launch_dw_dil<2, kPlanar, kSplit>(p, nx, dilation, batch, stream);
}

cudaError_t launch_layer(const DwParams& p, int o, int nx, int dilation, bool planar, bool split, int batch,
                         cudaStream_t stream) {
  return split ? (planar ? launch_dw_nt<true, true>(p, o, nx, dilation, batch, stream)
                         : launch_dw_nt<false, true>(p, o, nx, dilation, batch, stream))
               : (planar ? launch_dw_nt<true, false>(p, o, nx, dilation, batch, stream)
                         : launch_dw_nt<false, false>(p, o, nx, dilation, batch, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaWeightGradient, WeightGradient, WeightGradientBinding());
