// panel_gemm_f32: C[M, N] = A[M, K] @ W[N, K]^T for wide, read-once weights (the LM head: N = vocabulary).
//
// W is repacked once, at load, into column panels of PW floats: P[N/PW][K][PW] (the last panel zero-padded),
// so one k step of a panel is one aligned vector load. Each call packs A into row tiles of MR rows laid out
// [K][MR] (a broadcast per row per k reads one contiguous line; A rows whose stride is a multiple of 4 KiB
// would otherwise fight over the same L1 sets), then walks groups of NR panels: every row tile runs a
// register-blocked MR x (NR*PW) outer-product microkernel over the full K with the group's panels hot in L2,
// while software prefetch pulls the next group from memory. Threads split the groups, so each weight byte is
// read from DRAM once per call. The result is identical in math (each output one k-ordered FMA chain) to a
// naive loop, so `x @ W.T` with float32 accumulation is the oracle (tests/model/test_cpu_kernels.py).
//
// Why not oneDNN/MKL: on the 640 x 262,144 Gemma 3 head (2 threads, AVX-512) oneDNN's prepacked linear
// reaches 68-170 GFLOP/s at 8-128 rows, this kernel 86-231, MKL column-major 40-139 (benchmarks/lm_head_gemm.py).
//
// panel_gemm_bf16w: the same with the panels stored in bf16 (half the bytes streamed per call), widened to
// float32 as they are loaded; A and C stay float32, so the products accumulate in float32 and the result is
// float32: a bf16 LM head with float32 logits, and bf16 linears on CPUs without native bf16 arithmetic.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "panel_kernel.h"

namespace {

using tokenmill::bf16;
using namespace tokenmill::panel;

// P [ceil(N/PW)][K][PW] <- W [N, K] (row stride ldw), zero-padding the columns past N.
template <typename TW>
void pack_panels(const TW* w, int64_t n, int64_t k, int64_t ldw, TW* p, int num_threads) {
  const int64_t panels = (n + PW - 1) / PW;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t q = 0; q < panels; ++q) {
    TW* dst = p + q * k * PW;
    for (int j = 0; j < PW; ++j) {
      const int64_t col = q * PW + j;
      for (int64_t kk = 0; kk < k; ++kk) dst[kk * PW + j] = col < n ? w[col * ldw + kk] : TW{};
    }
  }
}

// C [M, N] (row stride ldc) = A [M, K] (row stride lda) @ W^T, W given as pack_panels output.
template <typename TW>
void panel_gemm(const float* a, int64_t m, int64_t k, int64_t lda, const TW* p, int64_t n, float* c, int64_t ldc,
                int num_threads) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, sizeof(float) * n);
    return;
  }
  const int64_t tiles = (m + MR - 1) / MR, panels = (n + PW - 1) / PW, groups = (panels + NR - 1) / NR;
  float* ap = static_cast<float*>(std::malloc(sizeof(float) * tiles * k * MR));
  if (ap == nullptr) return;
#pragma omp parallel num_threads(num_threads)
  {
    pack_a_tiles(a, m, k, lda, ap);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t q0 = g * NR, np = std::min<int64_t>(NR, panels - q0), c0 = q0 * PW;
      const int64_t cols = std::min<int64_t>(np * PW, n - c0);
      const TW* pg = p + q0 * k * PW;
      const TW* next = pg + np * k * PW;
      const int64_t next_lines = g + 1 < groups ? std::min<int64_t>(NR, panels - q0 - NR) * k * PW / kLineElems<TW> : 0;
      const int64_t per_tile = (next_lines + tiles - 1) / tiles;
      for (int64_t t = 0; t < tiles; ++t) {
        const int r = static_cast<int>(std::min<int64_t>(MR, m - t * MR));
        const TW* pf = next + t * per_tile * kLineElems<TW>;
        const int64_t npf = std::max<int64_t>(0, std::min(per_tile, next_lines - t * per_tile));
        const float* at = ap + t * k * MR;
        float* ct = c + t * MR * ldc + c0;
        if (np == NR)
          tile<NR>(r, at, pg, k, ct, ldc, cols, pf, npf);
        else if (np == kMid)
          tile<kMid>(r, at, pg, k, ct, ldc, cols, pf, npf);
        else
          tile<1>(r, at, pg, k, ct, ldc, cols, pf, npf);
      }
    }
  }
  std::free(ap);
}

}  // namespace

extern "C" {

int panel_gemm_width() { return PW; }

void pack_panels_f32(const float* w, int64_t n, int64_t k, int64_t ldw, float* p, int num_threads) {
  pack_panels(w, n, k, ldw, p, num_threads);
}

void pack_panels_bf16(const bf16* w, int64_t n, int64_t k, int64_t ldw, bf16* p, int num_threads) {
  pack_panels(w, n, k, ldw, p, num_threads);
}

void panel_gemm_f32(const float* a, int64_t m, int64_t k, int64_t lda, const float* p, int64_t n, float* c,
                    int64_t ldc, int num_threads) {
  panel_gemm(a, m, k, lda, p, n, c, ldc, num_threads);
}

void panel_gemm_bf16w(const float* a, int64_t m, int64_t k, int64_t lda, const bf16* p, int64_t n, float* c,
                      int64_t ldc, int num_threads) {
  panel_gemm(a, m, k, lda, p, n, c, ldc, num_threads);
}

}  // extern "C"
