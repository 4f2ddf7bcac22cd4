// Host harness for kernels/cuda/vector_neuron.cu's device code (tests/test_vector_neuron_cuda.py):
// the kernels compiled by g++ with CUDA's vocabulary defined here, a CTA run as kThreads OS
// threads that meet at a std::barrier for __syncthreads, CTAs one after another (so a function's
// `__shared__` statics are the CTA's shared memory). This checks the kernels' own indexing, masks,
// shared-memory staging and split reduction on a CPU; not their speed, nor anything of the GPU.
//
// stdin: C T S B groups act eps affine as text on one line, then raw float32 x (B C T S), w (B C C),
// gy (B C T S) and, with affine = 1, aff (B C (T^2 + 2T)). stdout: raw float32 y, gx (B C T S),
// part (B groups C C).
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <iostream>
#include <stdexcept>
#include <thread>
#include <vector>

struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct uint3_ {
  unsigned x = 0, y = 0, z = 0;
};
thread_local uint3_ threadIdx;
uint3_ blockIdx, blockDim;
std::barrier<>* cta_barrier = nullptr;
inline void __syncthreads() { cta_barrier->arrive_and_wait(); }
alignas(16) static float dynamic_smem[1 << 16];
inline uint32_t __float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Warps: 32 of the CTA's threads meet at their own barrier (__syncwarp), and an mma.sync is their
// fragments exchanged there: every lane writes its A and B registers, then computes its own four
// accumulator entries from all lanes' (m16n8k8, operands read truncated to tf32 as the tensor
// cores read them; products summed in double), then they meet again before the arrays are reused.
constexpr int kMaxWarps = 4;
std::barrier<>* warp_barrier[kMaxWarps] = {};
inline void __syncwarp() { warp_barrier[threadIdx.x >> 5]->arrive_and_wait(); }
struct WarpFragments {
  float a[32][4], b[32][2];
};
WarpFragments warp_fragments[kMaxWarps];
inline float tf32_operand(uint32_t bits) { return __uint_as_float(bits & 0xffffe000u); }
inline void host_mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tid = lane & 3;
  WarpFragments& f = warp_fragments[w];
  for (int r = 0; r < 4; ++r) f.a[lane][r] = tf32_operand(a[r]);
  f.b[lane][0] = tf32_operand(b0), f.b[lane][1] = tf32_operand(b1);
  __syncwarp();
  for (int k = 0; k < 4; ++k) {  // D[row][col], row g + 8 (k >> 1), col 2 tid + (k & 1)
    const int row = g + 8 * (k >> 1), col = 2 * tid + (k & 1);
    double acc = d[k];
    for (int kk = 0; kk < 8; ++kk)  // A[row][kk]: lane 4 (row % 8) + kk % 4, register (row >= 8) + 2 (kk >= 4);
                                    // B[kk][col]: lane 4 col + kk % 4, register kk >= 4
      acc += (double)f.a[4 * (row % 8) + kk % 4][(row >= 8) + 2 * (kk >= 4)] * f.b[4 * col + kk % 4][kk >= 4];
    d[k] = (float)acc;
  }
  __syncwarp();
}

#define GJ_HOST_HARNESS 1  // the device code's host branches that need this harness (host_mma_tf32)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static

namespace {
#include GJ_DEVICE_CODE
}  // namespace

template <typename F>
void run_cta(unsigned bx, unsigned by, F body) {
  blockIdx.x = bx, blockIdx.y = by, blockDim.x = kThreads;
  std::barrier<> bar(kThreads);
  cta_barrier = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (int w = 0; w < kThreads / 32; ++w) warp_barrier[w] = warps.emplace_back(std::make_unique<std::barrier<>>(32)).get();
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < kThreads; ++t)
    threads.emplace_back([t, &body] {
      threadIdx.x = t;
      body();
    });
  for (auto& th : threads) th.join();
}

template <int C, int T>
void run(int S, int B, int groups, int act, float eps, int affine, const float* x, const float* w, const float* aff,
         const float* gy, float* y, float* gx, float* part) {
  std::memset(dynamic_smem, 0xff, sizeof(dynamic_smem));  // NaN: an unwritten staged value shows
  for (int b = 0; b < B; ++b)
    for (int bx = 0; bx < (S + kThreads - 1) / kThreads; ++bx)
      run_cta(bx, b, [&] {
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
          run_cta(g, b, [&] {
            auto kernel = affine ? (act ? backward_mma_kernel<T, true, kGelu> : backward_mma_kernel<T, true, kRelu>)
                                 : (act ? backward_mma_kernel<T, false, kGelu> : backward_mma_kernel<T, false, kRelu>);
            kernel(x, w, aff, gy, gx, part, S, groups, eps);
          });
      return;
    }
  }
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < groups; ++g)
      run_cta(g, b, [&] {
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
