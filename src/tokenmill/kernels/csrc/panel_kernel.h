// The register-blocked outer-product microkernel of the panel GEMM (panel_gemm.cpp), shared with the quantized
// GEMM (quant_gemm.cpp), which dequantizes weight panels on the fly and runs the same microkernel over them.
// A is packed into row tiles [K][MR] (pack_a_tiles); a panel is [K][PW] weights (float32 or bf16).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "wide_vector.h"

namespace tokenmill {
namespace panel {

constexpr int PW = tokenmill::kW;  // panel width: one vector
#if defined(__AVX512F__)
constexpr int MR = 8, NR = 3;  // 24 accumulators + 3 weight vectors + 1 broadcast of 32 registers
#else
constexpr int MR = 6, NR = 2;  // 12 + 2 + 1 of 16 (AVX2 / NEON)
#endif
constexpr int kMid = NR > 2 ? 2 : 1;  // the width of a last group of two panels when NR is 3
template <typename TW>
constexpr int64_t kLineElems = 64 / static_cast<int64_t>(sizeof(TW));  // weights per 64-byte cache line

// R rows (of a packed A tile [K][MR]) x NP panels; stores the first `cols` columns of each row of C.
// Meanwhile prefetches `npf` lines starting at pf (the next group's weights), spread over the k loop.
template <int R, int NP, typename TW>
inline void microkernel(const float* a, const TW* p, int64_t K, float* c, int64_t ldc, int64_t cols,
                        const TW* pf, int64_t npf) {
  vw acc[R][NP];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < NP; ++j) acc[i][j] = vw{};
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t l = k; l < npf; l += K) __builtin_prefetch(pf + l * kLineElems<TW>, 0, 2);  // at most NR*PW/16 lines
    vw w[NP];
    for (int j = 0; j < NP; ++j) w[j] = loadw(p + (j * K + k) * PW);
    for (int i = 0; i < R; ++i) {
      const vw ai = a[k * MR + i] - vw{};
      for (int j = 0; j < NP; ++j) acc[i][j] += ai * w[j];
    }
  }
  if (cols == NP * PW) {
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < NP; ++j) storew(c + i * ldc + j * PW, acc[i][j]);
    return;
  }
  for (int i = 0; i < R; ++i) {
    float row[NP * PW];
    for (int j = 0; j < NP; ++j) storew(row + j * PW, acc[i][j]);
    std::memcpy(c + i * ldc, row, sizeof(float) * cols);
  }
}

// Dispatch on the number of valid rows r (1..MR) of the last, partial row tile.
template <int NP, typename TW, int R = MR>
inline void tile(int r, const float* a, const TW* p, int64_t K, float* c, int64_t ldc, int64_t cols,
                 const TW* pf, int64_t npf) {
  if constexpr (R >= 1) {
    if (r == R)
      microkernel<R, NP>(a, p, K, c, ldc, cols, pf, npf);
    else
      tile<NP, TW, R - 1>(r, a, p, K, c, ldc, cols, pf, npf);
  }
}

// A [M, K] (row stride lda) -> tiles [ceil(M/MR)][K][MR], rows past M zero (one omp-for: call inside a
// parallel region).
inline void pack_a_tiles(const float* a, int64_t m, int64_t k, int64_t lda, float* ap) {
  const int64_t tiles = (m + MR - 1) / MR;
#pragma omp for schedule(static)
  for (int64_t t = 0; t < tiles; ++t) {
    float* dst = ap + t * k * MR;
    const int64_t rows = std::min<int64_t>(MR, m - t * MR);
    for (int64_t kk = 0; kk < k; ++kk)
      for (int i = 0; i < MR; ++i) dst[kk * MR + i] = i < rows ? a[(t * MR + i) * lda + kk] : 0.f;
  }
}

}  // namespace panel
}  // namespace tokenmill
