// Weight rows interleaved in groups of 8 (kQ8_0x8, kQ5_0x8: the GGML type id + kInterleaved), repacked at load
// by kernels/quant_format.py: the 32-weight blocks of 8 rows side by side, one 32-bit lane per row, so a block's
// products for 8 rows end in the 8 lanes of one vector. The plain layout's int8 product (quant_dot.h) spends a
// convert, a scale product and an FMA per row and block, and a horizontal sum per output; here they come once per
// 8 outputs. Per group and block of 32 columns (8 x the type's block bytes):
//   Q8_0x8 (272 bytes): the 8 rows' f16 scales, then 8 chunks of 32 bytes, chunk i holding weights 4i..4i+3 of
//     row 0, of row 1, ..., of row 7 (a byte each).
//   Q5_0x8 (176 bytes): the 8 rows' f16 scales; 128 bytes of nibbles, byte 32p + 4j + t holding the low 4 bits of
//     row j's weight 8p + t (low nibble: chunk 2p) and 8p + 4 + t (high nibble: chunk 2p + 1); 8 words of 32 bits,
//     word i holding the 5th bits of chunk i (bit 4j + t: row j's weight 4i + t). Quants unsigned, u = q + 16.
// (The scales of a group gathered after its quants, which keeps every chunk within a cache line, measured slower:
// two streams per group.) This file: the int8 product, a row's dequantization, a panel for the panel GEMM.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "panel_kernel.h"
#include "quant_dot.h"

namespace {

constexpr int kInterleaved = 256, kGroupRows = 8;
constexpr int kQ8_0x8 = kQ8_0 + kInterleaved, kQ5_0x8 = kQ5_0 + kInterleaved;
template <> struct Format<kQ8_0x8> : Format<kQ8_0> {};  // (bytes per row and block as the plain type's)
template <> struct Format<kQ5_0x8> : Format<kQ5_0> {};
template <int T> constexpr int kGroupBytes = kGroupRows * Format<T>::bytes;  // one block of a group
constexpr int64_t kX8PrefetchAhead = 4096;

// Row j's quant of weight i (0..31) in a group block, signed (the offset taken off).
template <int T>
inline int x8_quant(const uint8_t* blk, int j, int i) {
  const int t = i % 4, c = i / 4;
  if constexpr (T == kQ8_0x8) {
    return static_cast<int8_t>(blk[16 + 32 * c + 4 * j + t]);
  } else {
    const int nib = (blk[16 + 32 * (c / 2) + 4 * j + t] >> (4 * (c % 2))) & 15;
    uint32_t hb;
    std::memcpy(&hb, blk + 144 + 4 * c, 4);
    return (nib | static_cast<int>(((hb >> (4 * j + t)) & 1) << 4)) - 16;
  }
}

// Weight row n as float32 (out[i * stride]); row_bytes as the plain layout's.
template <int T>
void dequant_row_x8(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out, int64_t stride) {
  const uint8_t* grp = w + (n / kGroupRows) * kGroupRows * row_bytes;
  const int lane = static_cast<int>(n % kGroupRows);
  for (int64_t b = 0; b < k / 32; ++b) {
    const uint8_t* blk = grp + b * kGroupBytes<T>;
    const float s = f16_to_f32(blk + 2 * lane);
    for (int i = 0; i < 32; ++i) out[(32 * b + i) * stride] = s * static_cast<float>(x8_quant<T>(blk, lane, i));
  }
}

#if defined(__AVX2__) && defined(__F16C__)
// The 8 chunks of a group block: Q8_0 signed quants, Q5_0 unsigned (u = q + 16).
template <int T>
inline void x8_chunks(const uint8_t* blk, __m256i* q) {
  if constexpr (T == kQ8_0x8) {
    for (int i = 0; i < 8; ++i) q[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * i));
  } else {
    const __m256i m4 = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
    for (int p = 0; p < 4; ++p) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * p));
      q[2 * p] = _mm256_and_si256(v, m4);
      q[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    }
    for (int i = 0; i < 8; ++i) {
      const __m256i word = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(blk + 144 + 4 * i)));
      q[i] = _mm256_or_si256(q[i], _mm256_and_si256(byte_per_bit(word), sixteen));  // the 5th bits
    }
  }
}

// sum_i q_i x_i per lane (row) over a block, int32, for activation quants x (4 at a time broadcast to the lanes).
template <int T>
inline __m256i x8_dot(const __m256i* q, const int8_t* x) {
  auto xb = [x](int i) {  // (a broadcast straight from memory: a load port's work)
    return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(x + 4 * i)));
  };
  if constexpr (T == kQ8_0x8) {  // |q| against x with q's sign, as dot32
    __m256i sum = _mm256_setzero_si256();
    for (int i = 0; i < 8; ++i)
      sum = _mm256_add_epi32(sum, dot32(_mm256_sign_epi8(q[i], q[i]), _mm256_sign_epi8(xb(i), q[i])));
    return sum;
  } else {  // u <= 31, |x| <= 127: a 16-bit pair <= 7874, four chunks' pairs summed stay below 2^15
    __m256i lo = _mm256_maddubs_epi16(q[0], xb(0)), hi = _mm256_maddubs_epi16(q[4], xb(4));
    for (int i = 1; i < 4; ++i) {
      lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(q[i], xb(i)));
      hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(q[4 + i], xb(4 + i)));
    }
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
  }
}
#endif

// Rows r0 .. r0 + R of the activations against one group: 8 output columns c[r * ldc + 0..7]. Q5_0 sums u x and
// takes the offset off in float: 16 s (dx sum x) per block, from the activation block sums (Acts.sum).
template <int T, int R>
inline void x8_group(const uint8_t* grp, const Acts& a, int64_t r0, float* c, int64_t ldc) {
  const int64_t nb = a.k / 32;
#if defined(__AVX2__) && defined(__F16C__)
  __m256 acc[R], off[R];
  for (int r = 0; r < R; ++r) acc[r] = off[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = grp + b * kGroupBytes<T>;
    for (int at = 0; at < kGroupBytes<T>; at += 64) __builtin_prefetch(blk + kX8PrefetchAhead + at);
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 s16 = _mm256_mul_ps(s, _mm256_set1_ps(16.f));
    __m256i q[8];
    x8_chunks<T>(blk, q);
    for (int r = 0; r < R; ++r) {
      const int64_t at = (r0 + r) * nb + b;
      const __m256i sum = x8_dot<T>(q, a.q + (r0 + r) * a.k + 32 * b);
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(s, _mm256_broadcast_ss(a.d + at)), acc[r]);
      if constexpr (T == kQ5_0x8) off[r] = _mm256_fmadd_ps(s16, _mm256_broadcast_ss(a.sum + at), off[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(c + (r0 + r) * ldc, _mm256_sub_ps(acc[r], off[r]));
#else
  for (int r = 0; r < R; ++r) {
    float acc[kGroupRows] = {}, off[kGroupRows] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = grp + b * kGroupBytes<T>;
      const int8_t* x = a.q + (r0 + r) * a.k + 32 * b;
      const int64_t at = (r0 + r) * nb + b;
      constexpr int bias = T == kQ5_0x8 ? 16 : 0;  // the unsigned quants, as the vector path sums them
      for (int j = 0; j < kGroupRows; ++j) {
        int32_t sum = 0;
        for (int i = 0; i < 32; ++i) sum += (x8_quant<T>(blk, j, i) + bias) * x[i];
        const float s = f16_to_f32(blk + 2 * j);
        acc[j] += static_cast<float>(sum) * (s * a.d[at]);
        if constexpr (T == kQ5_0x8) off[j] += (s * 16.f) * a.sum[at];
      }
    }
    for (int j = 0; j < kGroupRows; ++j) c[(r0 + r) * ldc + j] = acc[j] - off[j];
  }
#endif
}

// Output columns [n0, n1) (whole groups of 8) for m activation rows: a group's blocks (~5 kB for k = 640) are read
// from memory once and stay in L1 for every chunk of up to 8 rows after the first. A row's result depends only on
// its own activations, whatever the row or thread count.
template <int T>
void int8_part_x8(const Acts& a, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c,
                  int64_t ldc) {
  for (int64_t n = n0; n + kGroupRows <= n1; n += kGroupRows) {
    const uint8_t* grp = w + n * row_bytes;  // group n / 8 starts where row n would
    for (int64_t r0 = 0; r0 < m; r0 += 8) {
      switch (std::min<int64_t>(8, m - r0)) {
        case 8: x8_group<T, 8>(grp, a, r0, c + n, ldc); break;
        case 7: x8_group<T, 7>(grp, a, r0, c + n, ldc); break;
        case 6: x8_group<T, 6>(grp, a, r0, c + n, ldc); break;
        case 5: x8_group<T, 5>(grp, a, r0, c + n, ldc); break;
        case 4: x8_group<T, 4>(grp, a, r0, c + n, ldc); break;
        case 3: x8_group<T, 3>(grp, a, r0, c + n, ldc); break;
        case 2: x8_group<T, 2>(grp, a, r0, c + n, ldc); break;
        default: x8_group<T, 1>(grp, a, r0, c + n, ldc); break;
      }
    }
  }
}

// A group of 8 rows as a panel of width 8 [k][8] for the panel GEMM (tokenmill::panel): byte t of each lane of a
// chunk is one k-position for the 8 rows. False where panels are not 8 wide or without AVX2 (the caller then
// dequantizes row by row).
template <int T>
inline bool x8_panel(const uint8_t* grp, int64_t k, float* panel) {
#if defined(__AVX2__) && defined(__F16C__)
  using tokenmill::panel::PW;
  if constexpr (PW == kGroupRows) {
    for (int64_t b = 0; b < k / 32; ++b) {
      const uint8_t* blk = grp + b * kGroupBytes<T>;
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      __m256i q[8];
      x8_chunks<T>(blk, q);
      for (int i = 0; i < 8; ++i) {
        float* row = panel + (32 * b + 4 * i) * PW;
        for (int t = 0; t < 4; ++t) {
          __m256i v;
          if constexpr (T == kQ8_0x8)  // byte t, sign-extended by two shifts
            v = _mm256_srai_epi32(_mm256_slli_epi32(q[i], 24 - 8 * t), 24);
          else
            v = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(q[i], 8 * t), _mm256_set1_epi32(255)),
                                 _mm256_set1_epi32(16));
          _mm256_storeu_ps(row + t * PW, _mm256_mul_ps(s, _mm256_cvtepi32_ps(v)));
        }
      }
    }
    return true;
  }
#endif
  (void)grp, (void)k, (void)panel;
  return false;
}

}  // namespace
