// Host harness for kernels/cuda/vector_neuron.cu's device code (tests/test_vector_neuron_cuda.py):
// the kernels compiled by g++ with CUDA's vocabulary from tests/cuda_host.h, a CTA run as kThreads
// OS threads. This checks the kernels' own indexing, masks, shared-memory staging and split
// reduction on a CPU; not their speed, nor anything of the GPU.
//
// stdin: C T S B groups act eps affine as text on one line, then raw float32 x (B C T S), w (B C C),
// gy (B C T S) and, with affine = 1, aff (B C (T^2 + 2T)). stdout: raw float32 y, gx (B C T S),
// part (B groups C C).
#include "cuda_host.h"

namespace {
#include GJ_DEVICE_CODE
}  // namespace

template <int C, int T>
void run(int S, int B, int groups, int act, float eps, int affine, const float* x, const float* w, const float* aff,
         const float* gy, float* y, float* gx, float* part) {
  std::memset(dynamic_smem, 0xff, sizeof(dynamic_smem));  // NaN: an unwritten staged value shows
  for (int b = 0; b < B; ++b)
    for (int bx = 0; bx < (S + kThreads - 1) / kThreads; ++bx)
      run_cta(bx, b, 0, kThreads, [&] {
        auto kernel = affine ? (act ? forward_kernel<C, T, true, kGelu> : forward_kernel<C, T, true, kRelu>)
                             : (act ? forward_kernel<C, T, false, kGelu> : forward_kernel<C, T, false, kRelu>);
        kernel(x, w, aff, y, S, eps);
      });
  if (Bwd<C, T>::smem_bytes() > sizeof(dynamic_smem)) throw std::runtime_error("harness shared memory too small");
  if constexpr (C == 16) {  // vector_neuron.cu's launch_backward: the tensor-core kernel where S % 4 == 0
    if (S % 4 == 0) {
      if (MmaBwd<T>::smem_bytes() > sizeof(dynamic_smem)) throw std::runtime_error("harness shared memory too small");
      for (int b = 0; b < B; ++b)
        for (int g = 0; g < groups; ++g)
          run_cta(g, b, 0, kThreads, [&] {
            auto kernel = affine ? (act ? backward_mma_kernel<T, true, kGelu> : backward_mma_kernel<T, true, kRelu>)
                                 : (act ? backward_mma_kernel<T, false, kGelu> : backward_mma_kernel<T, false, kRelu>);
            kernel(x, w, aff, gy, gx, part, S, groups, eps);
          });
      return;
    }
  }
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < groups; ++g)
      run_cta(g, b, 0, kThreads, [&] {
        auto kernel = affine ? (act ? backward_kernel<C, T, true, kGelu> : backward_kernel<C, T, true, kRelu>)
                             : (act ? backward_kernel<C, T, false, kGelu> : backward_kernel<C, T, false, kRelu>);
        kernel(x, w, aff, gy, gx, part, S, groups, eps);
      });
}

int main() {
  int C, T, S, B, groups, act, affine;
  float eps;
  if (scanf("%d %d %d %d %d %d %f %d", &C, &T, &S, &B, &groups, &act, &eps, &affine) != 8) return 2;
  getchar();  // the newline
  const size_t n = (size_t)B * C * T * S, nw = (size_t)B * C * C, np = (size_t)B * groups * C * C;
  const size_t na = affine ? (size_t)B * C * (T * T + 2 * T) : 1;
  std::vector<float> x(n), w(nw), gy(n), aff(na, NAN), y(n, NAN), gx(n, NAN), part(np, NAN);
  if (fread(x.data(), 4, n, stdin) != n || fread(w.data(), 4, nw, stdin) != nw || fread(gy.data(), 4, n, stdin) != n)
    return 3;
  if (affine && fread(aff.data(), 4, na, stdin) != na) return 3;
  const float* a[4] = {x.data(), w.data(), gy.data(), aff.data()};
  float* r[3] = {y.data(), gx.data(), part.data()};
#define GJ_RUN(c, t) \
  if (C == c && T == t) run<c, t>(S, B, groups, act, eps, affine, a[0], a[1], a[3], a[2], r[0], r[1], r[2]);
  GJ_VN_SIZES(GJ_RUN)
  fwrite(y.data(), 4, n, stdout);
  fwrite(gx.data(), 4, n, stdout);
  fwrite(part.data(), 4, np, stdout);
  return 0;
}
