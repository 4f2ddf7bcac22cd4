// The forward ConvContract of the D=2 {scalar, vector} torus layer (3x3 invariant filters): XLA FFI
// targets that launch forward_kernel.cuh's kernel compiled on the 2D walk (stencil_d2.inc). The
// kernel is conv_contract.cu's with a 2D layer's shapes: a grid of nz = 1, one row a channel in each
// y slice (kRows = 1: the walk's rows are all dz = 0), vector blocks of 2 components. Compiled here,
// in a translation unit of its own, for the vector blocks component-planar (kernels/_layout.py's GPU
// layout), whole rows of 16 .. 64 pixels and x windows of 32 or 64, 16 or 32 output channels (two
// or four mma n-tiles: a 2D phase holds at most 12 Z tiles, so four n-tiles of accumulators fit the
// registers), dilations 1, 2, 4 and 8, TF32; channel-group passes (kGroups) at dilation 1, as the 3D file compiles them
// (the ring of 64 + 64 input channels at x 64 does not fit one CTA's shared memory).
//
// Operands (unbatched shapes; any leading batch dims, the same on all): x0 (c0, ny, nx), x1 (c1, ny,
// nx, 2) component-planar ((c1, 2, ny, nx) in memory), w packed by _plan.pack_weights, off (3 o: o
// scalar offsets, then (o, 2) vector ones), results y0 (O, ny, nx), y1 (O, ny, nx, 2) planar, of
// which a launch writes output channels o_base .. o_base + o - 1. Attribute `geom`: conv_contract.cu's
// 26 entries, with nz = 1, planar 1, precision 0, twin rings 0, one channel group at dilations 2, 4 and 8.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"
#include "stencil_d2.inc"
#include "forward_kernel.cuh"
#include "forward_ffi.cuh"

static_assert(kComps == 2 && kRows == 1, "conv_contract_d2.cu compiles the 2D walk");

template <int NX, int NT, bool kGroups, int D, bool kWin>
cudaError_t launch(const Params& p, int batch, cudaStream_t stream) {
  const size_t stage = (NX / kSeg) * 8 * NT * (kStage0 + kStage1);
  const size_t smem = sizeof(float) * (3 * (size_t)p.slice_floats + p.w_group + stage + (1 + kComps) * 8 * NT);
  const dim3 grid(p.windows * D * ((p.ny / D + p.strip - 1) / p.strip), 1, batch);  // windows x phases x strips
  auto* kernel = forward_kernel<NX, NT, kGroups, true, D, kWin, false, false, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, 4 * NX, smem, stream>>>(p);
  return cudaGetLastError();
}

template <int NT, bool kGroups, int D>
cudaError_t launch_nx(const Params& p, int nx, int batch, cudaStream_t stream) {
  if (p.windows > 1)
    return nx == 32 ? launch<32, NT, kGroups, D, true>(p, batch, stream) : launch<64, NT, kGroups, D, true>(p, batch, stream);
  switch (nx) {
    case 16: return launch<16, NT, kGroups, D, false>(p, batch, stream);
    case 32: return launch<32, NT, kGroups, D, false>(p, batch, stream);
    case 48: return launch<48, NT, kGroups, D, false>(p, batch, stream);
    default: return launch<64, NT, kGroups, D, false>(p, batch, stream);
  }
}

template <int NT>
cudaError_t launch_dilation(const Params& p, int nx, int dilation, int batch, cudaStream_t stream) {
  switch (dilation) {
    case 2: return launch_nx<NT, false, 2>(p, nx, batch, stream);
    case 4: return launch_nx<NT, false, 4>(p, nx, batch, stream);
    case 8: return launch_nx<NT, false, 8>(p, nx, batch, stream);
    default:
      return p.groups > 1 ? launch_nx<NT, true, 1>(p, nx, batch, stream) : launch_nx<NT, false, 1>(p, nx, batch, stream);
  }
}

ffi::Error Run(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> w,
               ffi::Buffer<ffi::F32> off, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
               ffi::Span<const int64_t> geom) {
  auto bad = [](const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda ConvContract (2D): " + why); };
  Params p{};
  Launch l{};
  if (const std::string why = DecodeForward(x0, x1, w, off, y0, y1, geom, 16, 32, p, l); !why.empty()) return bad(why);
  if (p.nz != 1) return bad("`geom`[0] (nz) must be 1 for a 2D layer");
  if (!l.planar) return bad("the 2D kernels take component-planar vector blocks only (`geom`[21] must be 1)");
  if (p.groups != 1 && l.dilation != 1)
    return bad("the 2D kernels pass over channel groups at dilation 1 only (`geom`[18] must be 1 at dilation " +
               std::to_string(l.dilation) + ")");
  if (l.split) return bad("the 2D kernels compute TF32 only (`geom`[24] must be 0)");
  if (l.twin) return bad("the 2D kernels have no twin rings (`geom`[25] must be 0)");
  const int nx = l.nx, dilation = l.dilation, batch = (int)l.batch;
  const cudaError_t err = p.o == 16 ? launch_dilation<2>(p, nx, dilation, batch, stream)
                                    : launch_dilation<4>(p, nx, dilation, batch, stream);
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ginjax cuda ConvContract (2D): ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// A later output group's launch into the previous results (forward_ffi.cuh's CheckInto).
ffi::Error RunInto(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> w,
                   ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> prev0, ffi::Buffer<ffi::F32> prev1,
                   ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1, ffi::Span<const int64_t> geom) {
  if (ffi::Error err = CheckInto(prev0, prev1, y0, y1); err.failure()) return err;
  return Run(stream, x0, x1, w, off, y0, y1, geom);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForward2d, Run, Results(ForwardOperands()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForward2dInto, RunInto, Results(TwoMore(ForwardOperands())));
