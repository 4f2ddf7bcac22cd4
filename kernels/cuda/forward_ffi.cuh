// The forward's XLA FFI plumbing shared by conv_contract.cu (D = 3) and conv_contract_d2.cu (D = 2):
// the decode of `geom` and the operands, the output groups' aliasing check and the targets'
// bindings. Included inside each file's anonymous namespace, after its stencil.
#pragma once

// What a launch's `geom` (conv_contract.cu's header lists its 26 entries) says beyond Params.
struct Launch {
  int nx;        // the x window's extent (the kernel's NX); the rows' is Params::nx
  int dilation;  // 1, 2, 4 or 8
  int64_t batch;
  bool planar, split, twin;  // geom[21], [24] (fp32 by 3xTF32) and [25]
};

// The checks and the Params every forward target shares, for either D (kComps and the row tables
// are the including file's stencil): `geom` against the compiled row layouts, the channels, groups
// and output slice, the operand sizes against `geom` and the batch. o_small / o_large: the output
// channels a launch may take (the file's two n-tile counts). An empty string, or why the call is
// refused; what only one D compiles (twin rings, fp32, residuals; the 2D file's single group and
// layout) each file checks after it.
std::string DecodeForward(ffi::Buffer<ffi::F32>& x0, ffi::Buffer<ffi::F32>& x1, ffi::Buffer<ffi::F32>& w,
                          ffi::Buffer<ffi::F32>& off, ffi::ResultBuffer<ffi::F32>& y0, ffi::ResultBuffer<ffi::F32>& y1,
                          ffi::Span<const int64_t> geom, int o_small, int o_large, Params& p, Launch& l) {
  auto str = [](int64_t v) { return std::to_string(v); };
  if (geom.size() != 26) return "`geom` must have 26 entries (has " + str(geom.size()) + ")";
  l.nx = (int)geom[23];
  p.nx = (int)geom[2];
  p.nz = (int)geom[0], p.ny = (int)geom[1];
  p.c[0] = (int)geom[3], p.c[1] = (int)geom[4], p.o = (int)geom[5], p.strip = (int)geom[6];
  p.w_floats = (int)geom[17], p.groups = (int)geom[18], p.o_total = (int)geom[19], p.o_base = (int)geom[20];
  if (geom[21] != 0 && geom[21] != 1) return "`geom`[21] (the vector blocks' layout) must be 0 (minor) or 1 (planar)";
  l.planar = geom[21] == 1;
  l.dilation = (int)geom[22];
  if (const std::string why = CheckRows(l.nx, p.nx, 23, l.dilation, 22, p.strip, p.nz, p.ny); !why.empty()) return why;
  p.windows = p.nx / l.nx;
  if (geom[24] != 0 && geom[24] != 1) return "`geom`[24] (the precision) must be 0 (tf32) or 1 (fp32, 3xTF32)";
  l.split = geom[24] == 1;
  if (geom[25] != 0 && geom[25] != 1) return "`geom`[25] (twin rings) must be 0 or 1";
  l.twin = geom[25] == 1;
  if (p.c[0] < 1 || p.c[1] < 1 || p.groups < 1 || p.c[0] % p.groups || p.c[1] % p.groups)
    return "the channel groups (`geom`[18] = " + str(p.groups) + ") must divide the input channels (" + str(p.c[0]) +
           ", " + str(p.c[1]) + "), both positive";
  p.cg[0] = p.c[0] / p.groups, p.cg[1] = p.c[1] / p.groups;
  if (p.cg[0] % (2 * kChunk) || p.cg[1] % (2 * kChunk))
    return "a channel group's input channels (" + str(p.cg[0]) + ", " + str(p.cg[1]) + ") must be multiples of 16";
  if (p.o != o_small && p.o != o_large)
    return "output channels (" + str(p.o) + ") must be " + str(o_small) + " or " + str(o_large);
  if (const std::string why = CheckOutputSlice(p.o_base, p.o, p.o_total, "results"); !why.empty()) return why;
  // the row layouts are compiled in (stencil_d*.inc); geom carries the plan's, which must agree
  const int lw = l.nx / kSeg - 1, di = dil_index(l.dilation);
  for (int k = 0; k < 4; ++k)
    if (geom[9 + k] != ((kSkewS[di][lw] >> (8 * k)) & 0xff) || geom[13 + k] != ((kSkewV[di][lw] >> (8 * k)) & 0xff))
      return "the row skews in `geom` are not the compiled ones (rebuild the library)";
  if (geom[7] != kPitchS[di][lw] || geom[8] != kPitchV[di][lw])
    return "the row pitches in `geom` are not the compiled ones (rebuild the library)";
  const int64_t pix = (int64_t)p.nz * p.ny * p.nx;
  l.batch = x0.element_count() / (p.c[0] * pix);
  if (l.batch < 1 || l.batch > 65535) return "batch must be in [1, 65535]";
  const int64_t b = l.batch;
  if (x0.element_count() != b * p.c[0] * pix || x1.element_count() != b * p.c[1] * pix * kComps ||
      w.element_count() != b * p.w_floats || off.element_count() != b * (1 + kComps) * p.o ||
      y0->element_count() != b * p.o_total * pix || y1->element_count() != b * p.o_total * pix * kComps)
    return "operand sizes do not match `geom` and the batch";
  p.x[0] = x0.typed_data(), p.x[1] = x1.typed_data(), p.w = w.typed_data(), p.off = off.typed_data();
  p.y[0] = y0->typed_data(), p.y[1] = y1->typed_data();
  p.region1 = p.cg[0] * kStrideS[di][lw];
  p.slice_floats = (p.region1 + p.cg[1] * kStrideV[di][lw] + 3) / 4 * 4;
  const int nt = p.o / 8;
  p.w_base[1] = 0, p.w_base[0] = (p.cg[1] / kChunk) * GJ_V_TILES * nt * 64;
  p.w_group = p.w_base[0] + (p.cg[0] / kChunk) * GJ_S_TILES * nt * 64;
  if ((int64_t)p.groups * p.w_group != p.w_floats)
    return "the packed weights' size (`geom`[17] = " + str(p.w_floats) + ") is not the layer's";
  return "";
}

// A later output group's launch: prev0 and prev1 are the previous launch's results, aliased to y0
// and y1 (XLA hands over the same buffers, or copies them in where a previous result is still read
// elsewhere), so the channels already written stay and this launch adds its slice.
ffi::Error CheckInto(ffi::Buffer<ffi::F32> prev0, ffi::Buffer<ffi::F32> prev1, ffi::ResultBuffer<ffi::F32> y0,
                     ffi::ResultBuffer<ffi::F32> y1) {
  if (prev0.typed_data() != y0->typed_data() || prev1.typed_data() != y1->typed_data())
    return ffi::Error::InvalidArgument("ginjax cuda ConvContract: the previous output group's results are not aliased to the results");
  return ffi::Error::Success();
}

// The operands every target starts with: the stream, x0, x1, w and off.
auto ForwardOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

// Two more buffer operands: the previous results (Into), or the residuals (Add).
template <typename Binding>
auto TwoMore(Binding b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::F32>>().template Arg<ffi::Buffer<ffi::F32>>();
}

// The results y0, y1 and the attribute `geom` every target ends with.
template <typename Binding>
auto Results(Binding b) {
  return std::move(b).template Ret<ffi::Buffer<ffi::F32>>().template Ret<ffi::Buffer<ffi::F32>>().template Attr<
      ffi::Span<const int64_t>>("geom");
}
