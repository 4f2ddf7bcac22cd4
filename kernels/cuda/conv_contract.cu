// The forward ConvContract's XLA FFI targets for Hopper (sm_90a): the operand checks and the
// launches of forward_kernel.cuh's kernel, whose header holds the design (the factorised form,
// the work split, the ring, the layouts, windows, dilations and twin rings).
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
// window, precision (0: tf32, 1: fp32 by 3xTF32, the weights packed unrounded), twin rings (0 or 1).
// Residuals (GinjaxCudaForwardAdd, GinjaxCudaForwardIntoAdd): two more operands r0, r1 shaped and
// laid out as y0, y1, read (not aliased: a residual is usually read again elsewhere) and added by
// the first pass as it stores (kRes kernels, dilation 1 and TF32: a ResNet block's input added to
// its last convolution's output without a pass of its own); attribute `residual` says which are
// real (bit 0: r0, bit 1: r1; an operand whose bit is clear is a placeholder, never read).
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
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#include "common.cuh"
#include "stencil_d3.inc"
#include "forward_kernel.cuh"
#include "forward_ffi.cuh"

// `res`: the residuals (two pointers, nullptr where none), read by the kRes kernels only. kTwin:
// two rings a CTA (forward_kernel.cuh's "Twin rings"), a CTA per z pair z, z + nz / 2.
template <int NX, int NT, bool kGroups, bool kPlanar, int D, bool kWin, bool kSplit, bool kRes, bool kTwin = false>
cudaError_t launch(const Params& p, const float* const* res, int batch, cudaStream_t stream) {
  constexpr int kRings = kTwin ? 2 : 1;
  const size_t stage = Staging<D>::kInWeights ? 0 : (NX / kSeg) * 8 * NT * (kStage0 + kStage1);
  const size_t smem = sizeof(float) * (3 * kRings * (size_t)p.slice_floats + p.w_group + kRings * stage + 32 * NT);
  const dim3 grid(p.windows * D * ((p.ny / D + p.strip - 1) / p.strip), p.nz / kRings, batch);  // windows x phases x strips
  if constexpr (kRes) {
    auto* kernel = forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, kSplit, true, kTwin, const float*, const float*>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, 4 * NX * kRings, smem, stream>>>(p, res[0], res[1]);
  } else {
    auto* kernel = forward_kernel<NX, NT, kGroups, kPlanar, D, kWin, kSplit, false, kTwin>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return err;
    kernel<<<grid, 4 * NX * kRings, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

// The whole row (one window: NX = nx, 16 .. 64), or x windows of 32 or 64 (kWin, the rows longer
// than their window; Forward refuses other window widths); `twin`: whole rows of 32 at dilation 1
// in TF32 on twin rings (Forward refuses it elsewhere).
template <int NT, bool kGroups, bool kPlanar, int D, bool kSplit, bool kRes = false>
cudaError_t launch_nx(const Params& p, const float* const* res, int nx, bool twin, int batch, cudaStream_t stream) {
  if constexpr (!kSplit) {  // the split (fp32) kernels take whole rows only (Forward refuses windows)
    if (p.windows > 1) return nx == 32 ? launch<32, NT, kGroups, kPlanar, D, true, false, kRes>(p, res, batch, stream)
                                       : launch<64, NT, kGroups, kPlanar, D, true, false, kRes>(p, res, batch, stream);
  }
  if constexpr (D == 1 && !kSplit) {
    if (twin) return launch<32, NT, kGroups, kPlanar, 1, false, false, kRes, true>(p, res, batch, stream);
  }
  switch (nx) {
    case 16: return launch<16, NT, kGroups, kPlanar, D, false, kSplit, kRes>(p, res, batch, stream);
    case 32: return launch<32, NT, kGroups, kPlanar, D, false, kSplit, kRes>(p, res, batch, stream);
    case 48: return launch<48, NT, kGroups, kPlanar, D, false, kSplit, kRes>(p, res, batch, stream);
    default: return launch<64, NT, kGroups, kPlanar, D, false, kSplit, kRes>(p, res, batch, stream);
  }
}

// Channel-group passes are compiled at dilation 1 only (Forward refuses groups with a dilation).
// The split (fp32) kernels: dilation 1 only (Forward refuses others).
template <int NT, bool kPlanar, bool kSplit>
cudaError_t launch_groups(const Params& p, const float* const* res, int nx, bool twin, int dilation, int batch,
                          cudaStream_t stream) {
  if constexpr (!kSplit) {
    switch (dilation) {
      case 2: return launch_nx<NT, false, kPlanar, 2, false>(p, res, nx, twin, batch, stream);
      case 4: return launch_nx<NT, false, kPlanar, 4, false>(p, res, nx, twin, batch, stream);
      case 8: return launch_nx<NT, false, kPlanar, 8, false>(p, res, nx, twin, batch, stream);
      default: break;
    }
    if (res[0] != nullptr || res[1] != nullptr)  // residuals: dilation 1, TF32 (Run refuses the others)
      return p.groups > 1 ? launch_nx<NT, true, kPlanar, 1, false, true>(p, res, nx, twin, batch, stream)
                          : launch_nx<NT, false, kPlanar, 1, false, true>(p, res, nx, twin, batch, stream);
  }
  return p.groups > 1 ? launch_nx<NT, true, kPlanar, 1, kSplit>(p, res, nx, twin, batch, stream)
                      : launch_nx<NT, false, kPlanar, 1, kSplit>(p, res, nx, twin, batch, stream);
}

template <bool kPlanar, bool kSplit>
cudaError_t launch_nt(const Params& p, const float* const* res, int nx, bool twin, int dilation, int batch,
                      cudaStream_t stream) {
  return p.o == 8 ? launch_groups<1, kPlanar, kSplit>(p, res, nx, twin, dilation, batch, stream)
                  : launch_groups<2, kPlanar, kSplit>(p, res, nx, twin, dilation, batch, stream);
}

// A launch of the layer; r0 / r1: the residuals added to y0 / y1, or null.
ffi::Error Run(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> w,
               ffi::Buffer<ffi::F32> off, const ffi::Buffer<ffi::F32>* r0, const ffi::Buffer<ffi::F32>* r1,
               ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1, ffi::Span<const int64_t> geom) {
  auto bad = [](const std::string& why) { return ffi::Error::InvalidArgument("ginjax cuda ConvContract: " + why); };
  Params p{};
  Launch l{};
  if (const std::string why = DecodeForward(x0, x1, w, off, y0, y1, geom, 8, 16, p, l); !why.empty()) return bad(why);
  const int nx = l.nx, dilation = l.dilation;
  const bool planar = l.planar, split = l.split, twin = l.twin;
  if (dilation > 1 && p.groups > 1) return bad("channel groups are compiled at dilation 1 only");
  if (split && (dilation > 1 || p.windows > 1)) return bad("the fp32 (3xTF32) kernels take dilation 1 and whole rows only");
  if (twin && (nx != 32 || p.windows > 1 || dilation != 1 || split || p.nz % 2))
    return bad("twin rings take whole rows of 32 at dilation 1 in TF32, nz even");
  if (r0 || r1) {
    if (dilation != 1 || split) return bad("residuals are compiled at dilation 1 in TF32 only");
    if ((r0 && r0->element_count() != y0->element_count()) || (r1 && r1->element_count() != y1->element_count()))
      return bad("a residual's size is not its result's");
  }
  const float* res[2] = {r0 ? r0->typed_data() : nullptr, r1 ? r1->typed_data() : nullptr};
  if (kStageInWeights[dil_index(dilation)] && (nx / kSeg) * p.o * (kStage0 + kStage1) > p.w_base[0])
    return bad("the output staging does not fit the vector phase's weights it shares at this dilation");
  const int batch = (int)l.batch;
  const cudaError_t err = split ? (planar ? launch_nt<true, true>(p, res, nx, twin, dilation, batch, stream)
                                          : launch_nt<false, true>(p, res, nx, twin, dilation, batch, stream))
                                 : (planar ? launch_nt<true, false>(p, res, nx, twin, dilation, batch, stream)
                                           : launch_nt<false, false>(p, res, nx, twin, dilation, batch, stream));
  if (err != cudaSuccess) return ffi::Error::Internal(std::string("ginjax cuda ConvContract: ") + cudaGetErrorString(err));
  return ffi::Error::Success();
}

ffi::Error Forward(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                   ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::ResultBuffer<ffi::F32> y0,
                   ffi::ResultBuffer<ffi::F32> y1, ffi::Span<const int64_t> geom) {
  return Run(stream, x0, x1, w, off, nullptr, nullptr, y0, y1, geom);
}

ffi::Error ForwardInto(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                       ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> prev0,
                       ffi::Buffer<ffi::F32> prev1, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                       ffi::Span<const int64_t> geom) {
  if (ffi::Error err = CheckInto(prev0, prev1, y0, y1); err.failure()) return err;
  return Run(stream, x0, x1, w, off, nullptr, nullptr, y0, y1, geom);
}

// The residuals r0, r1 where `residual`'s bits 0, 1 say so (the header's "Residuals").
ffi::Error RunAdd(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1, ffi::Buffer<ffi::F32> w,
                  ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> r0, ffi::Buffer<ffi::F32> r1,
                  ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1, ffi::Span<const int64_t> geom,
                  int64_t residual) {
  if (residual < 1 || residual > 3)
    return ffi::Error::InvalidArgument("ginjax cuda ConvContract: `residual` must be 1, 2 or 3 (got " +
                                       std::to_string(residual) + ")");
  return Run(stream, x0, x1, w, off, (residual & 1) ? &r0 : nullptr, (residual & 2) ? &r1 : nullptr, y0, y1, geom);
}

ffi::Error ForwardAdd(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                      ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> r0,
                      ffi::Buffer<ffi::F32> r1, ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                      ffi::Span<const int64_t> geom, int64_t residual) {
  return RunAdd(stream, x0, x1, w, off, r0, r1, y0, y1, geom, residual);
}

ffi::Error ForwardIntoAdd(cudaStream_t stream, ffi::Buffer<ffi::F32> x0, ffi::Buffer<ffi::F32> x1,
                          ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> off, ffi::Buffer<ffi::F32> prev0,
                          ffi::Buffer<ffi::F32> prev1, ffi::Buffer<ffi::F32> r0, ffi::Buffer<ffi::F32> r1,
                          ffi::ResultBuffer<ffi::F32> y0, ffi::ResultBuffer<ffi::F32> y1,
                          ffi::Span<const int64_t> geom, int64_t residual) {
  if (ffi::Error err = CheckInto(prev0, prev1, y0, y1); err.failure()) return err;
  return RunAdd(stream, x0, x1, w, off, r0, r1, y0, y1, geom, residual);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForward, Forward, Results(ForwardOperands()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForwardInto, ForwardInto, Results(TwoMore(ForwardOperands())));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForwardAdd, ForwardAdd,
                              Results(TwoMore(ForwardOperands())).Attr<int64_t>("residual"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GinjaxCudaForwardIntoAdd, ForwardIntoAdd,
                              Results(TwoMore(TwoMore(ForwardOperands()))).Attr<int64_t>("residual"));
