// Host harness for kernels/cuda/parity_conv.cu's device code (tests/test_parity_forward_cuda.py):
// the kernel compiled by g++ with CUDA's vocabulary from tests/cuda_host.h, a CTA run as 128 OS
// threads, every CTA of the grid in turn. mma_tf32 is the harness's warp exchange; the cp.async
// copies are plain copies (the kernel waits for them and passes a barrier before reading, so the
// order they complete in does not matter there either).
//
// stdin: batch and the 18 `geom` entries as text on one line, then raw float32 x (B, cin, nz, ny,
// nx + 2h padded to a multiple of 4), w (B, w_total) (parity_forward.stage_weights) and raw int32 tab (tab_size). stdout: raw
// float32 y (B, cout, nz, ny, nx), NaN where the kernel wrote nothing.
#include "cuda_host.h"

#include <algorithm>
using std::max;  // CUDA's integer min and max
using std::min;

inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) { host_mma_tf32(d, a, b0, b1); }
inline void cp_async16_zfill(float* dst, const float* src, int bytes) {
  std::memset(dst, 0, 16);
  std::memcpy(dst, src, bytes);
}
inline void cp_async16(float* dst, const float* src) { std::memcpy(dst, src, 16); }
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}

namespace {
#include GJ_DEVICE_CODE
}  // namespace

int main() {
  long long B, g[18];
  if (scanf("%lld", &B) != 1) return 2;
  for (auto& v : g)
    if (scanf("%lld", &v) != 1) return 2;
  getchar();  // the newline
  ParityParams p{};
  int* f[] = {&p.nz, &p.ny, &p.nx, &p.h, &p.dz, &p.dy, &p.dx, &p.wrap_z, &p.wrap_y, &p.cin, &p.cout,
              &p.chunks, &p.dots, &p.n_out, &p.w_total, &p.xp, &p.w_stage};
  for (int i = 0; i < 17; ++i) *f[i] = (int)g[i];
  const size_t nx_ = (size_t)B * p.cin * p.nz * p.ny * ((p.nx + 2 * p.h + 3) & ~3), nw = (size_t)B * p.w_total;
  const size_t nt = (size_t)g[17], ny_ = (size_t)B * p.cout * p.nz * p.ny * p.nx;
  std::vector<float> x(nx_), w(nw), y(ny_, NAN);
  std::vector<int> tab(nt);
  if (fread(x.data(), 4, nx_, stdin) != nx_ || fread(w.data(), 4, nw, stdin) != nw || fread(tab.data(), 4, nt, stdin) != nt)
    return 3;
  if ((size_t)16 * 9 * p.xp + p.w_stage > sizeof(dynamic_smem) / 4) return 4;
  p.x = x.data(), p.w = w.data(), p.tab = tab.data(), p.y = y.data();
  std::memset(dynamic_smem, 0xff, sizeof(dynamic_smem));  // NaN: an unwritten staged value shows
  for (unsigned bz = 0; bz < B; ++bz)
    for (unsigned by = 0; by < (unsigned)((p.nx + kTile - 1) / kTile); ++by)
      for (unsigned bx = 0; bx < (unsigned)(p.nz * p.ny); ++bx) run_cta(bx, by, bz, 128, [&] { parity_forward<4>(p); });
  fwrite(y.data(), 4, ny_, stdout);
  return 0;
}
