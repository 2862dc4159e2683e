// The int8 product's arithmetic per weight block (quant_gemm.cpp's quant_linear_int8, the only user): activation
// rows quantized to 8 bits per 32 (Acts), one block of weights against them, accumulated into float lanes.
// int8_block is the 1-4 row path (quants unpacked into registers); block_dot runs the same arithmetic over a
// weight row unpacked into a buffer (more than 4 rows), so a row's result does not depend on the path.
#pragma once

#include <cstdint>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "quant_blocks.h"

namespace {

// ---- per 32 weights and activation row: integer dot product, scaled into a float accumulator -----------------

// Activation rows handed to a weight row: quants, block scales, block sums (only read for types with minimums).
struct Acts {
  const int8_t* q;
  const float* d;
  const float* sum;
  int64_t k;
};

#if defined(__AVX2__)
struct Lanes {  // 8 float partial sums per row; two sets alternate between blocks (two FMA chains in flight)
  __m256 v[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  __m256 m = _mm256_setzero_ps();
};

inline float hsum(__m256 v) {
  const __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}

// 8 int32 lanes of sum w*x over 4 consecutive bytes each (lanes 0-3: weights 0-15). `uw` is |w| for signed
// weights (their sign moved onto x) or w itself for unsigned ones.
inline __m256i dot32(__m256i uw, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), uw, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(uw, x), _mm256_set1_epi16(1));  // |w| <= 128, |x| <= 127: no saturation
#endif
}

// The same lanes for quants stored with an offset, u = q + off (0 <= u < 2 off): sum u x - off sum x, where
// the offset's share (off_dot) is made once per activation chunk for every weight row against it. Exact: the
// 16-bit pairs of maddubs stay within 2 * 63 * 127, so the lanes equal those of dot32 on the signed quants.
template <int off>
inline __m256i off_dot(__m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(off), x);
#else
  return _mm256_maddubs_epi16(_mm256_set1_epi8(off), x);
#endif
}

inline __m256i dot32_u(__m256i u, __m256i x, __m256i xo) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_sub_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x), xo);
#else
  return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(u, x), xo), _mm256_set1_epi16(1));
#endif
}

template <int T, int R, int set>
inline void block_dot(const float* s, const float* m, const int8_t* wq, const Acts& a, int64_t blk, Lanes* acc,
                      const float* S = nullptr) {  // S (Q4_K / Q5_K): the products s * d, made ahead per row
  using F = Format<T>;
  const int64_t nb = a.k / 32;
  for (int ch = 0; ch < F::G / 32; ++ch) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * ch));
    const __m256i uw = F::has_min ? w : _mm256_sign_epi8(w, w);
    const __m256 scale = F::halves ? _mm256_setr_m128(_mm_set1_ps(s[2 * ch]), _mm_set1_ps(s[2 * ch + 1]))
                                   : _mm256_set1_ps(s[2 * ch]);
    const int64_t b32 = blk * (F::G / 32) + ch;
    for (int r = 0; r < R; ++r) {
      __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * a.k + 32 * b32));
      if constexpr (!F::has_min) x = _mm256_sign_epi8(x, w);
      const __m256 p = _mm256_cvtepi32_ps(dot32(uw, x));
      const __m256 sd = F::has_min && S != nullptr ? _mm256_broadcast_ss(S + r * nb + b32)
                                                   : _mm256_mul_ps(scale, _mm256_broadcast_ss(a.d + r * nb + b32));
      acc[r].v[set] = _mm256_fmadd_ps(p, sd, acc[r].v[set]);
    }
  }
  if constexpr (F::has_min) {  // minus sum over the 8 chunks of min * (activation scale * sum of its quants)
    const __m256 mins = _mm256_loadu_ps(m);
    for (int r = 0; r < R; ++r)
      acc[r].m = _mm256_fmadd_ps(mins, _mm256_loadu_ps(a.sum + r * nb + blk * 8), acc[r].m);
  }
}

inline float finish(const Lanes& acc) { return hsum(_mm256_sub_ps(_mm256_add_ps(acc.v[0], acc.v[1]), acc.m)); }
#else
struct Lanes {
  float v[2] = {0.f, 0.f};
  float m = 0.f;
};

template <int T, int R, int set>
inline void block_dot(const float* s, const float* m, const int8_t* wq, const Acts& a, int64_t blk, Lanes* acc,
                      const float* = nullptr) {
  using F = Format<T>;
  const int64_t nb = a.k / 32;
  for (int ch = 0; ch < F::G / 32; ++ch) {
    const int8_t* w = wq + 32 * ch;
    const int64_t b32 = blk * (F::G / 32) + ch;
    for (int r = 0; r < R; ++r) {
      const int8_t* x = a.q + r * a.k + 32 * b32;
      int32_t lo = 0, hi = 0;
      for (int i = 0; i < 16; ++i) lo += static_cast<int32_t>(w[i]) * x[i];
      for (int i = 16; i < 32; ++i) hi += static_cast<int32_t>(w[i]) * x[i];
      acc[r].v[set] += a.d[r * nb + b32] * (s[2 * ch] * static_cast<float>(lo) + s[2 * ch + 1] * static_cast<float>(hi));
      if constexpr (F::has_min) acc[r].m += m[ch] * a.sum[r * nb + b32];
    }
  }
}

inline float finish(const Lanes& acc) { return acc.v[0] + acc.v[1] - acc.m; }
#endif

// One weight block against R activation rows, into accumulator set `set`, with the same float operations per
// row as block_dot over a buffered row. AVX2, 32-weight types: NW weight rows (row_bytes apart) at once,
// accumulators acc[j * R + r], each activation chunk loaded once for all of them.
template <int T, int R, int set, int NW = 1>
inline void int8_block(Group& g, const uint8_t* b, int64_t row_bytes, const Acts& a, int64_t blk, Lanes* acc) {
#if defined(__AVX2__)
  if constexpr (Format<T>::G == 32) {  // one 32-weight block: its quants stay in a register
    constexpr int off = kOff32<T>;
    __m256i w[NW];
    __m256 scale[NW];
    for (int j = 0; j < NW; ++j) {
      w[j] = load_u32<T>(b + j * row_bytes);
      scale[j] = _mm256_set1_ps(f16_to_f32(b + j * row_bytes));
    }
    const int64_t nb = a.k / 32;
    for (int r = 0; r < R; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * a.k + 32 * blk));
      const __m256 dx = _mm256_broadcast_ss(a.d + r * nb + blk);
      __m256i xo = _mm256_setzero_si256();
      if constexpr (off != 0) xo = off_dot<off>(x);
      for (int j = 0; j < NW; ++j) {  // Q8_0 (no offset): the sign of w moved onto x
        const __m256i p = off != 0 ? dot32_u(w[j], x, xo) : dot32(_mm256_sign_epi8(w[j], w[j]), _mm256_sign_epi8(x, w[j]));
        Lanes& l = acc[j * R + r];
        l.v[set] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(scale[j], dx), l.v[set]);
      }
    }
    return;
  }
  if constexpr (Format<T>::G == 256) {  // a K-quant block (NW = 1): each 32-weight chunk unpacked into a register
    static_assert(NW == 1, "K-quant blocks run one weight row at a time");
    const int64_t nb = a.k / 32, b32 = blk * 8;
    __m256 s, s_hi, m;              // scales (Q6_K: 0-7, and 8-15 in s_hi); Q4_K / Q5_K: minimums
    alignas(32) float S[R][8];      // Q4_K / Q5_K: scale x activation scale per chunk, 8 products at once
    if constexpr (T == kQ6_K) {
      q6k_scales(b, s, s_hi);
    } else {
      k_scales8(b, s, m);
      for (int r = 0; r < R; ++r) _mm256_store_ps(S[r], _mm256_mul_ps(s, _mm256_loadu_ps(a.d + r * nb + b32)));
    }
#pragma GCC unroll 8
    for (int ch = 0; ch < 8; ++ch) {  // (unrolled: each chunk's shifts and lane picks become constants)
      const __m256i w = k_chunk<T>(b, ch);
      const int i = 2 * (ch % 4);
      __m256 scale;  // Q6_K: scales 2 ch, 2 ch + 1 in lanes 0-3, 4-7 (as block_dot's)
      if constexpr (T == kQ6_K)
        scale = _mm256_permutevar8x32_ps(ch < 4 ? s : s_hi, _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1));
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + r * a.k + 32 * (b32 + ch)));
        if constexpr (T == kQ6_K) {  // quants 0..63: offset 32
          const __m256 p = _mm256_cvtepi32_ps(dot32_u(w, x, off_dot<32>(x)));
          const __m256 sd = _mm256_mul_ps(scale, _mm256_broadcast_ss(a.d + r * nb + b32 + ch));
          acc[r].v[set] = _mm256_fmadd_ps(p, sd, acc[r].v[set]);
        } else {
          acc[r].v[set] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32(w, x)), _mm256_broadcast_ss(S[r] + ch), acc[r].v[set]);
        }
      }
    }
    if constexpr (Format<T>::has_min)
      for (int r = 0; r < R; ++r) acc[r].m = _mm256_fmadd_ps(m, _mm256_loadu_ps(a.sum + r * nb + b32), acc[r].m);
    return;
  }
#endif
  const int8_t* wq = g.q;
  if constexpr (T == kQ8_0) {  // already one int8 per weight: read in place
    g.s[0] = g.s[1] = f16_to_f32(b);
    wq = reinterpret_cast<const int8_t*>(b + 2);
  } else {
    unpack<T>(b, g);
  }
  block_dot<T, R, set>(g.s, g.m, wq, a, blk, acc);
}

}  // namespace
