// GGUF weight blocks (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K) unpacked into one shape, a Group of G weights:
//   w[i] = s[i / 16] * q[i] - m[i / 32]
// (see quant_gemm.cpp and quant_dot.h, the files that include this one: their products read the Groups made
// here, or on AVX2 the same quants and scales straight from registers: load_u32, k_chunk, k_scales8, q6k_scales).
// The block layouts follow ggml's (ggml-quants.c, MIT); model/gguf_dequant.py decodes the same bytes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "panel_kernel.h"

namespace {

using namespace tokenmill::panel;

enum Type : int { kQ4_0 = 2, kQ5_0 = 6, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// One unpacked block: w[i] = s[i / 16] * q[i] - m[i / 32]. q is signed (the type's offset already subtracted)
// for every type but Q4_K / Q5_K, whose minimums stay a separate term (m; zero for the other types).
struct alignas(64) Group {
  int8_t q[256];
  float s[16];
  float m[8];
};

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal
    return sign ? -v : v;
  }
  const uint32_t bits = exp == 31 ? sign | 0x7f800000u | (mant << 13) : sign | ((exp + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// G weights per block, bytes per block; has_min: unsigned q with a min term (else signed q, no min);
// halves: the two 16-weight halves of a 32-weight chunk have their own scales (Q6_K).
template <int G_, int bytes_, bool has_min_, bool halves_>
struct FormatOf {
  static constexpr int G = G_, bytes = bytes_;
  static constexpr bool has_min = has_min_, halves = halves_;
};
template <int T> struct Format;
template <> struct Format<kQ8_0> : FormatOf<32, 34, false, false> {};
template <> struct Format<kQ4_0> : FormatOf<32, 18, false, false> {};
template <> struct Format<kQ5_0> : FormatOf<32, 22, false, false> {};
template <> struct Format<kQ4_K> : FormatOf<256, 144, true, false> {};
template <> struct Format<kQ5_K> : FormatOf<256, 176, true, false> {};
template <> struct Format<kQ6_K> : FormatOf<256, 210, false, true> {};

inline void fill(float* p, int n, float v) {
  for (int i = 0; i < n; ++i) p[i] = v;
}

inline void k_scale_min(int j, const uint8_t* q, int& sc, int& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

template <int T> void unpack(const uint8_t* b, Group& g);

template <> void unpack<kQ8_0>(const uint8_t* b, Group& g) {
  std::memcpy(g.q, b + 2, 32);
  fill(g.s, 2, f16_to_f32(b));
}

#if defined(__AVX2__)
// The 32 quants of a 32-weight block in a register as stored, u = q + off (Q4_0: 0..15, off 8; Q5_0: 0..31,
// off 16; Q8_0: q itself, off 0), and signed (load_q32). The int8 product takes u and the offset apart: the
// offset's share is one product per activation chunk, shared by every weight row against it.
template <int T> constexpr int kOff32 = T == kQ4_0 ? 8 : T == kQ5_0 ? 16 : 0;
template <int T> __m256i load_u32(const uint8_t* b);

template <> inline __m256i load_u32<kQ8_0>(const uint8_t* b) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 2));
}

template <> inline __m256i load_u32<kQ4_0>(const uint8_t* b) {
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(lo, 4), lo), _mm256_set1_epi8(15));
}

// 0xff in byte j where bit j of a 32-bit word (broadcast to every lane) is set: each byte picks byte j / 8 of the
// word and tests bit j % 8.
inline __m256i byte_per_bit(__m256i word) {
  const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                          0x0303030303030303);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201));
  return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(word, shuf), bit), bit);
}

template <> inline __m256i load_u32<kQ5_0>(const uint8_t* b) {
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const __m256i hb = byte_per_bit(_mm256_set1_epi32(static_cast<int>(qh))), sixteen = _mm256_set1_epi8(16);
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 6));
  const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(lo, 4), lo), _mm256_set1_epi8(15));
  return _mm256_or_si256(nib, _mm256_and_si256(hb, sixteen));
}

template <int T> inline __m256i load_q32(const uint8_t* b) {
  const __m256i u = load_u32<T>(b);
  return kOff32<T> ? _mm256_sub_epi8(u, _mm256_set1_epi8(kOff32<T>)) : u;
}

// ---- K-quant blocks straight into registers (the int8 product, 1-4 rows: no Group stored and reloaded) -------

// The 8 scales and 8 minimums of a Q4_K / Q5_K block as floats, d * sc and dmin * m (the values
// k_group_scales stores), decoded with 32-bit masks instead of k_scale_min's byte loop: bytes 0-3 hold the
// low 6 bits of scales 0-3, bytes 4-7 those of minimums 0-3, bytes 8-11 the low 4 bits of scale / minimum
// 4-7 (low / high nibble), whose top 2 bits sit in the top 2 bits of bytes 0-3 / 4-7.
inline void k_scales8(const uint8_t* b, __m256& s, __m256& m) {
  uint32_t u[3];
  std::memcpy(u, b + 4, 12);
  const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, m_lo = u[1] & 0x3f3f3f3fu;
  const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
  const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
  auto floats = [](uint32_t lo, uint32_t hi) {  // 8 bytes -> 8 floats
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_setr_epi32(static_cast<int>(lo), static_cast<int>(hi), 0, 0)));
  };
  s = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(b)), floats(sc_lo, sc_hi));
  m = _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(b + 2)), floats(m_lo, m_hi));
}

// The 32 quants of 32-weight chunk ch (0-7) of a K-quant block: Q4_K / Q5_K 0..31 (as Group.q), Q6_K 0..63
// (Group.q + 32: the offset is left to the dot product, which takes it off once per activation chunk).
template <int T> __m256i k_chunk(const uint8_t* b, int ch);

template <> inline __m256i k_chunk<kQ4_K>(const uint8_t* b, int ch) {  // chunk 2j: low nibbles of qs[32j..], 2j+1: high
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + 32 * (ch / 2)));
  return _mm256_and_si256(ch % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
}

template <> inline __m256i k_chunk<kQ5_K>(const uint8_t* b, int ch) {  // + bit ch of qh[0..31] as 16
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + 32 * (ch / 2)));
  const __m256i lo = _mm256_and_si256(ch % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
  // (bit ch of each byte to bit 4: the 16-bit shifts carry bits across the byte pair only into bits the mask drops)
  const __m256i hi = ch <= 4 ? _mm256_slli_epi16(h, 4 - ch) : _mm256_srli_epi16(h, ch - 4);
  return _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(16)));
}

template <> inline __m256i k_chunk<kQ6_K>(const uint8_t* b, int ch) {
  // half ch / 4 (128 weights): ql 64 bytes, qh 32; chunk j = ch % 4 takes the low (j < 2) or high nibbles of
  // ql[32 (j % 2)..] and bits 2j, 2j + 1 of qh as bits 4-5.
  const int half = ch / 4, j = ch % 4;
  const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 64 * half + 32 * (j % 2)));
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half));
  const __m256i lo = _mm256_and_si256(j < 2 ? l : _mm256_srli_epi16(l, 4), _mm256_set1_epi8(15));
  const __m256i hi = j < 2 ? _mm256_slli_epi16(h, 4 - 2 * j) : _mm256_srli_epi16(h, 2 * j - 4);
  return _mm256_or_si256(lo, _mm256_and_si256(hi, _mm256_set1_epi8(0x30)));
}

// Q6_K's 16 scales, d * sc, as two vectors of 8 (scales 0-7, 8-15).
inline void q6k_scales(const uint8_t* b, __m256& lo, __m256& hi) {
  const __m256 d = _mm256_set1_ps(f16_to_f32(b + 208));
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
  lo = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc)));
  hi = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc, 8))));
}
#endif

template <> void unpack<kQ4_0>(const uint8_t* b, Group& g) {
#if defined(__AVX2__)
  _mm256_store_si256(reinterpret_cast<__m256i*>(g.q), load_q32<kQ4_0>(b));
#else
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    g.q[j] = static_cast<int8_t>((qs[j] & 15) - 8);
    g.q[j + 16] = static_cast<int8_t>((qs[j] >> 4) - 8);
  }
#endif
  fill(g.s, 2, f16_to_f32(b));
}

template <> void unpack<kQ5_0>(const uint8_t* b, Group& g) {
#if defined(__AVX2__)
  _mm256_store_si256(reinterpret_cast<__m256i*>(g.q), load_q32<kQ5_0>(b));
#else
  uint32_t qh;
  std::memcpy(&qh, b + 2, 4);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    g.q[j] = static_cast<int8_t>(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - 16);
    g.q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
  }
#endif
  fill(g.s, 2, f16_to_f32(b));
}

inline void k_group_scales(const uint8_t* b, Group& g) {
  const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    k_scale_min(j, b + 4, sc, m);
    g.s[2 * j] = g.s[2 * j + 1] = d * static_cast<float>(sc);
    g.m[j] = dmin * static_cast<float>(m);
  }
}

template <> void unpack<kQ4_K>(const uint8_t* b, Group& g) {
  k_group_scales(b, g);
  const uint8_t* qs = b + 16;
#if defined(__AVX2__)
  const __m256i m4 = _mm256_set1_epi8(15);
  for (int j = 0; j < 4; ++j) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
    _mm256_store_si256(reinterpret_cast<__m256i*>(g.q + 64 * j), _mm256_and_si256(v, m4));
    _mm256_store_si256(reinterpret_cast<__m256i*>(g.q + 64 * j + 32), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
  }
#else
  for (int j = 0; j < 4; ++j)
    for (int l = 0; l < 32; ++l) {
      g.q[64 * j + l] = static_cast<int8_t>(qs[32 * j + l] & 15);
      g.q[64 * j + 32 + l] = static_cast<int8_t>(qs[32 * j + l] >> 4);
    }
#endif
}

template <> void unpack<kQ5_K>(const uint8_t* b, Group& g) {
  k_group_scales(b, g);
  const uint8_t* qh = b + 16;
  const uint8_t* qs = b + 48;
#if defined(__AVX2__)
  const __m256i m4 = _mm256_set1_epi8(15), sixteen = _mm256_set1_epi8(16);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
  for (int j = 0; j < 4; ++j) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j));
    const __m256i u1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j))), u2 = _mm256_set1_epi8(static_cast<char>(2 << (2 * j)));
    const __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, u1), u1), sixteen);
    const __m256i h2 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, u2), u2), sixteen);
    _mm256_store_si256(reinterpret_cast<__m256i*>(g.q + 64 * j), _mm256_or_si256(_mm256_and_si256(v, m4), h1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(g.q + 64 * j + 32),
                       _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), h2));
  }
  return;
#endif
  for (int j = 0; j < 4; ++j) {
    const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
    for (int l = 0; l < 32; ++l) {
      g.q[64 * j + l] = static_cast<int8_t>((qs[32 * j + l] & 15) + ((qh[l] & u1) ? 16 : 0));
      g.q[64 * j + 32 + l] = static_cast<int8_t>((qs[32 * j + l] >> 4) + ((qh[l] & u2) ? 16 : 0));
    }
  }
}

template <> void unpack<kQ6_K>(const uint8_t* b, Group& g) {
  const float d = f16_to_f32(b + 208);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b + 64 * half;
    const uint8_t* qh = b + 128 + 32 * half;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * half;
    int8_t* q = g.q + 128 * half;
#if defined(__AVX2__)
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    auto put = [&](int at, __m256i lo4, __m256i hi2) {
      const __m256i v = _mm256_or_si256(lo4, _mm256_and_si256(hi2, m30));
      _mm256_store_si256(reinterpret_cast<__m256i*>(q + at), _mm256_sub_epi8(v, off));
    };
    put(0, _mm256_and_si256(l0, m4), _mm256_slli_epi16(h, 4));
    put(32, _mm256_and_si256(l1, m4), _mm256_slli_epi16(h, 2));
    put(64, _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), h);
    put(96, _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), _mm256_srli_epi16(h, 2));
#else
    for (int l = 0; l < 32; ++l) {
      q[l] = static_cast<int8_t>(((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
      q[l + 32] = static_cast<int8_t>(((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
      q[l + 64] = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      q[l + 96] = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
    }
#endif
    for (int i = 0; i < 8; ++i) g.s[8 * half + i] = d * static_cast<float>(sc[i]);
  }
}

}  // namespace
