// Shared by the CUDA ConvContract kernels (conv_contract.cu, weight_gradient.cu): the tf32 mma,
// cp.async, and the generated stencil walk's hooks. Included inside each file's anonymous
// namespace.
#pragma once

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// tf32 of a finite float, to nearest with ties away (cvt.rna's result) in one integer add: the mma
// ignores the low 13 bits of a tf32 operand, so adding half of their range rounds the magnitude.
__device__ __forceinline__ uint32_t tf32_bits(float x) { return __float_as_uint(x) + 0x1000u; }

__device__ __forceinline__ void cp_async4(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(s), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async16(float* dst, const float* src) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// The generated walk's hooks (stencil_d3.inc, weight_gradient_d3.inc): ROW loads u[dz + 1] from
// the lane's row bases r0 / r1 per y slice (the channel pair in the forward, the k-step pair in
// the weight gradient), ZC / XC form the symmetric classes, NZ accumulates a Z tile.
#define GJ_ROW(dz, dy, i)                                                        \
  _Pragma("unroll") for (int s = 0; s < 4; ++s) {                                \
    u[(dz) + 1][0][s] = r0[(dy) + 1][((dz) + 1) * kP + (i) + s * kM];            \
    u[(dz) + 1][1][s] = r1[(dy) + 1][((dz) + 1) * kP + (i) + s * kM];            \
  }
#define GJ_Z(zk, ch, s) ((zk) == 0 ? u[1][ch][s] : zc[zk][ch][s])
#define GJ_ZC(zk)                                                                             \
  _Pragma("unroll") for (int ch = 0; ch < 2; ++ch) _Pragma("unroll") for (int s = 0; s < 4; ++s) \
    zc[zk][ch][s] = (zk) == 1 ? u[0][ch][s] + u[2][ch][s] : u[2][ch][s] - u[0][ch][s];
#define GJ_XC(zk, xk)                                                                           \
  _Pragma("unroll") for (int ch = 0; ch < 2; ++ch) _Pragma("unroll") for (int q = 0; q < 2; ++q) \
    xc[zk][xk][ch][q] = (xk) == 1 ? GJ_Z(zk, ch, q) + GJ_Z(zk, ch, q + 2) : GJ_Z(zk, ch, q + 2) - GJ_Z(zk, ch, q);
#define GJ_VAL(zk, xk, ch, q) ((xk) == 0 ? GJ_Z(zk, ch, (q) + 1) : xc[zk][xk][ch][q])
#define GJ_NZ(T, zk, xk, coef)                                  \
  zt[T][0] = fmaf(coef, GJ_VAL(zk, xk, 0, 0), zt[T][0]);        \
  zt[T][1] = fmaf(coef, GJ_VAL(zk, xk, 0, 1), zt[T][1]);        \
  zt[T][2] = fmaf(coef, GJ_VAL(zk, xk, 1, 0), zt[T][2]);        \
  zt[T][3] = fmaf(coef, GJ_VAL(zk, xk, 1, 1), zt[T][3]);
