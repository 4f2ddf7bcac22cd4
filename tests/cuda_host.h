// The CUDA vocabulary for host builds of kernels/cuda's device code (tests/vn_cuda_host.cpp,
// tests/parity_cuda_host.cpp): a CTA run as OS threads that meet at a std::barrier for
// __syncthreads, CTAs one after another (so a function's `__shared__` statics are the CTA's shared
// memory, and `dynamic_smem` its dynamic shared memory), a warp's mma.sync its lanes' fragments
// exchanged at the warp's own barrier. This checks the kernels' indexing, masks and staging on a
// CPU; not their speed, nor anything of the GPU.
#pragma once
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

struct int2 {
  int x, y;
};
inline int2 make_int2(int x, int y) { return int2{x, y}; }
template <typename T>
inline T __ldg(const T* p) { return *p; }

#define GJ_HOST_HARNESS 1  // the device code's host branches that need this harness (host_mma_tf32)
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __shared__ static


// One CTA of `threads` threads (blockIdx (bx, by, bz)) running `body` each.
template <typename F>
void run_cta(unsigned bx, unsigned by, unsigned bz, int threads, F body) {
  blockIdx.x = bx, blockIdx.y = by, blockIdx.z = bz, blockDim.x = threads;
  std::barrier<> bar(threads);
  cta_barrier = &bar;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  for (int w = 0; w < threads / 32; ++w) warp_barrier[w] = warps.emplace_back(std::make_unique<std::barrier<>>(32)).get();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([t, &body] {
      threadIdx.x = t;
      body();
    });
  for (auto& th : pool) th.join();
}
