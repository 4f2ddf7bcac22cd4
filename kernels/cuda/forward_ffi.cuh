// The forward's XLA FFI plumbing shared by conv_contract.cu (D = 3) and conv_contract_d2.cu (D = 2):
// the output groups' aliasing check and the targets' bindings. Included inside each file's
// anonymous namespace.
#pragma once

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
