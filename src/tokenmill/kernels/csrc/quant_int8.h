// The int8 product over GGUF blocks for a few activation rows (the method is described at the top of
// quant_gemm.cpp, which exports it as quant_linear_int8; decode_step.cpp runs it inside its own parallel region):
// activation rows quantized to 8-bit blocks (quantize_row_q8), then each thread's share of a part's output
// columns (thread_share, int8_part), and `dispatch` from a block type to its template instance.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "panel_kernel.h"
#include "quant_blocks.h"
#include "quant_dot.h"
#include "quant_x8.h"

namespace {

using namespace tokenmill::panel;


// ---- activations: float32 rows -> int8 blocks of 32, a scale and a scaled sum per block ---------------------

void quantize_row_q8(const float* x, int64_t k, int8_t* q, float* d_out, float* sum_out) {
  for (int64_t b = 0; b < k / 32; ++b) {
    const float* xb = x + 32 * b;
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < 32; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));  // the default rounding mode: half to even
      q[32 * b + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d_out[b] = d;
    sum_out[b] = d * static_cast<float>(sum);
  }
}

// In a decode step the weights stream from memory (the LM head alone is 180 MB, the layers ~60 MB, past the
// last-level cache), and the hardware prefetcher alone left one thread at ~13 GB/s on the LM head: each row
// loop also asks for the bytes kPrefetchAhead (~3 LM head rows) ahead of a block, a line per 64 bytes. Measured
// (benchmarks/quant_rows.py): LM head 1.2-1.3x, the layers 1.02-1.09x with cold caches, no change with hot ones.
constexpr int64_t kPrefetchAhead = 2048;

template <int T>
inline void prefetch_block(const uint8_t* b) {  // (a hint: it never faults, also past the last row)
  for (int at = 0; at < Format<T>::bytes; at += 64) __builtin_prefetch(b + kPrefetchAhead + at);
}

// Output columns [n0, n1) for R activation rows, NW weight rows at a time. Blocks alternate between the two
// accumulator sets (a compile-time choice, so the accumulators stay in registers).
template <int T, int R, int NW>
void int8_cols(const Acts& a, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c, int64_t ldc) {
  using F = Format<T>;
  const int64_t nblk = a.k / F::G;
  Group g;
  for (int64_t n = n0; n + NW <= n1; n += NW) {
    const uint8_t* wrow = w + n * row_bytes;
    Lanes acc[NW * R];
    if constexpr (NW > 1 || R > 4) {  // set 0's blocks, then set 1's: half the accumulators live at once (GCC
                                       // spilled them); each set sees its blocks in the same order either way
      for (int64_t blk = 0; blk < nblk; blk += 2) {
        for (int j = 0; j < NW; ++j) prefetch_block<T>(wrow + j * row_bytes + blk * F::bytes);
        int8_block<T, R, 0, NW>(g, wrow + blk * F::bytes, row_bytes, a, blk, acc);
      }
      for (int64_t blk = 1; blk < nblk; blk += 2)
        int8_block<T, R, 1, NW>(g, wrow + blk * F::bytes, row_bytes, a, blk, acc);
    } else {
      int64_t blk = 0;
      for (; blk + 2 <= nblk; blk += 2) {
        prefetch_block<T>(wrow + blk * F::bytes);  // (32-weight blocks: one line covers both)
        if constexpr (F::G == 256) prefetch_block<T>(wrow + (blk + 1) * F::bytes);
        int8_block<T, R, 0, NW>(g, wrow + blk * F::bytes, row_bytes, a, blk, acc);
        int8_block<T, R, 1, NW>(g, wrow + (blk + 1) * F::bytes, row_bytes, a, blk + 1, acc);
      }
      if (blk < nblk) int8_block<T, R, 0, NW>(g, wrow + blk * F::bytes, row_bytes, a, blk, acc);
    }
    for (int j = 0; j < NW; ++j)
      for (int r = 0; r < R; ++r) c[r * ldc + n + j] = finish(acc[j * R + r]);
  }
}

// Two weight rows per activation load for Q4_0 / Q5_0 (1-4 rows: 1.07-1.2x), so each activation chunk, its
// scale and its offset product serve both. Not Q8_0, whose LM head streams from memory and measured slower
// over two rows at once, nor the K-quants (no gain measured). A column's arithmetic is the same whichever way
// it runs: results do not depend on the threads' split.
template <int T, int R>
void int8_rows(const Acts& a, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c, int64_t ldc) {
#if defined(__AVX2__)
  constexpr int NW = Format<T>::G == 32 && T != kQ8_0 && R <= 4 ? 2 : 1;
#else
  constexpr int NW = 1;
#endif
  const int64_t n_pairs = n0 + (n1 - n0) / NW * NW;
  int8_cols<T, R, NW>(a, w, row_bytes, n0, n_pairs, c, ldc);
  if (n_pairs < n1) int8_cols<T, R, 1>(a, w, row_bytes, n_pairs, n1, c, ldc);
}

// R <= 4 activation rows against the whole part, each weight block unpacked once (into registers or g); up to 8
// for the 32-weight types and Q6_K, whose blocks keep no minimums: one accumulator set per pass (see int8_cols), the
// same per-row arithmetic. At 8 rows that measured faster than the buffered path below (the LM head of a batch of
// 8 decodes 1.24x, Q6_K 1.06x); Q4_K / Q5_K would sum their minimums in another order, so they stay at 4.
template <int T>
constexpr int kMaxRegisterRows = Format<T>::G == 32 || T == kQ6_K ? 8 : 4;

template <int T>
void int8_group(const Acts& a, int64_t R, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c,
                int64_t ldc) {
  if constexpr (kMaxRegisterRows<T> == 8) {
    switch (R) {
      case 8: int8_rows<T, 8>(a, w, row_bytes, n0, n1, c, ldc); return;
      case 7: int8_rows<T, 7>(a, w, row_bytes, n0, n1, c, ldc); return;
      case 6: int8_rows<T, 6>(a, w, row_bytes, n0, n1, c, ldc); return;
      case 5: int8_rows<T, 5>(a, w, row_bytes, n0, n1, c, ldc); return;
      default: break;
    }
  }
  switch (R) {
    case 4: int8_rows<T, 4>(a, w, row_bytes, n0, n1, c, ldc); break;
    case 3: int8_rows<T, 3>(a, w, row_bytes, n0, n1, c, ldc); break;
    case 2: int8_rows<T, 2>(a, w, row_bytes, n0, n1, c, ldc); break;
    default: int8_rows<T, 1>(a, w, row_bytes, n0, n1, c, ldc); break;
  }
}

// ---- more than 4 activation rows: each weight row unpacked once into an L1 buffer, then 4 rows at a time -----
// A pass over the weights per 4 rows (4 rows' accumulators fill the 16 AVX2 registers) read every weight from
// memory and unpacked it again per 4 rows, so 5 rows (speculative decoding's verification of 4 drafts) cost
// about two 1-row steps. Here each weight row is read and unpacked once, and each group of 4 rows runs the
// same arithmetic as int8_rows over the buffer: a row's result does not depend on how many rows share a call.

// One weight row unpacked for the whole k: quants (as Group.q), scales per 16 weights, minimums per 32;
// for Q4_K / Q5_K also the scales per 32 and a 4-row group's scale products (weight x activation scale: made 8
// at a time here instead of one by one per row and chunk; for the other types that measured slower).
struct RowBuf {
  int8_t* q;
  float* s;
  float* m;
  float* s32;  // [k / 32]
  float* S;    // [4][k / 32]
};

template <int T>
void unpack_row(const uint8_t* wrow, int64_t k, Group& g, const RowBuf& rb) {
  using F = Format<T>;
  for (int64_t blk = 0; blk < k / F::G; ++blk) {
    const uint8_t* b = wrow + blk * F::bytes;
#if defined(__AVX2__)
    if constexpr (F::G == 32) {  // straight into the buffer, no stop in g
      _mm256_store_si256(reinterpret_cast<__m256i*>(rb.q + 32 * blk), load_q32<T>(b));
      rb.s[2 * blk] = rb.s[2 * blk + 1] = f16_to_f32(b);
      continue;
    } else {  // chunks and scales from registers, as the 1-4 row path makes them (k % 256 = 0: fields 32-aligned)
      __m256 s, m, s_hi;
      if constexpr (T == kQ6_K) {
        q6k_scales(b, s, s_hi);
        _mm256_store_ps(rb.s + 16 * blk, s);
        _mm256_store_ps(rb.s + 16 * blk + 8, s_hi);
      } else {
        k_scales8(b, s, m);
        _mm256_store_ps(rb.s32 + 8 * blk, s);
        _mm256_store_ps(rb.m + 8 * blk, m);
        _mm256_store_ps(rb.s + 16 * blk, _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)));
        _mm256_store_ps(rb.s + 16 * blk + 8, _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7)));
      }
#pragma GCC unroll 8
      for (int ch = 0; ch < 8; ++ch) {
        const __m256i q = k_chunk<T>(b, ch);  // (Q6_K: the signed quants Group.q holds)
        _mm256_store_si256(reinterpret_cast<__m256i*>(rb.q + 256 * blk + 32 * ch),
                           T == kQ6_K ? _mm256_sub_epi8(q, _mm256_set1_epi8(32)) : q);
      }
      continue;
    }
#endif
    unpack<T>(b, g);
    std::memcpy(rb.q + blk * F::G, g.q, F::G);
    std::memcpy(rb.s + blk * (F::G / 16), g.s, sizeof(float) * (F::G / 16));
    if constexpr (F::has_min) {
      std::memcpy(rb.m + blk * 8, g.m, sizeof(float) * 8);
      for (int i = 0; i < 8; ++i) rb.s32[blk * 8 + i] = g.s[2 * i];
    }
  }
}

// One output column for R activation rows from an unpacked row: the same arithmetic, block by block and set by
// set, as int8_rows (so a row's result does not depend on how many rows share the call).
template <int T, int R>
void buffered_rows(const RowBuf& rb, const Acts& a, float* c, int64_t ldc) {
  using F = Format<T>;
  const int64_t nblk = a.k / F::G, nb = a.k / 32;
#if defined(__AVX2__)
  if constexpr (F::has_min)
    for (int r = 0; r < R; ++r) {
      int64_t b = 0;
      for (; b + 8 <= nb; b += 8)
        _mm256_storeu_ps(rb.S + r * nb + b, _mm256_mul_ps(_mm256_loadu_ps(rb.s32 + b), _mm256_loadu_ps(a.d + r * nb + b)));
      for (; b < nb; ++b) rb.S[r * nb + b] = rb.s32[b] * a.d[r * nb + b];
    }
#endif
  Lanes acc[R];
  auto block = [&](auto set, int64_t blk) {
    block_dot<T, R, decltype(set)::value>(rb.s + blk * (F::G / 16), rb.m + blk * (F::G / 32), rb.q + blk * F::G, a,
                                          blk, acc, rb.S);
  };
  int64_t blk = 0;
  for (; blk + 2 <= nblk; blk += 2) {
    block(std::integral_constant<int, 0>{}, blk);
    block(std::integral_constant<int, 1>{}, blk + 1);
  }
  if (blk < nblk) block(std::integral_constant<int, 0>{}, blk);
  for (int r = 0; r < R; ++r) c[r * ldc] = finish(acc[r]);
}

// Output columns [n0, n1) of one part for all m activation rows: one pass over the weights for any m.
template <int T>
void int8_part(const Acts& all, int64_t m, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c,
               int64_t ldc) {
  if (m <= kMaxRegisterRows<T>) {
    int8_group<T>(all, m, w, row_bytes, n0, n1, c, ldc);
    return;
  }
  if (n0 >= n1) return;
  const int64_t k = all.k, nb = k / 32;
  // q [k] | s [2 nb] | m [nb] | s32 [nb] | S [4 nb], 64-byte aligned (the unpackers' aligned stores)
  const size_t bytes = (static_cast<size_t>(k) + sizeof(float) * nb * (2 + 1 + 1 + 4) + 63) / 64 * 64;
  int8_t* mem = static_cast<int8_t*>(std::aligned_alloc(64, bytes));
  if (mem == nullptr) {  // (a few kB; should it fail, a pass per 4 rows is as right, only slower)
    for (int64_t r = 0; r < m; r += 4)
      int8_group<T>(Acts{all.q + r * k, all.d + r * nb, all.sum + r * nb, k}, std::min<int64_t>(4, m - r), w,
                    row_bytes, n0, n1, c + r * ldc, ldc);
    return;
  }
  float* f = reinterpret_cast<float*>(mem + k);
  const RowBuf rb{mem, f, f + 2 * nb, f + 3 * nb, f + 4 * nb};
  Group g;
  for (int64_t n = n0; n < n1; ++n) {
    unpack_row<T>(w + n * row_bytes, k, g, rb);
    for (int64_t r = 0; r < m; r += 4) {
      const Acts a{all.q + r * k, all.d + r * nb, all.sum + r * nb, k};
      float* cr = c + r * ldc + n;
      switch (std::min<int64_t>(4, m - r)) {
        case 4: buffered_rows<T, 4>(rb, a, cr, ldc); break;
        case 3: buffered_rows<T, 3>(rb, a, cr, ldc); break;
        case 2: buffered_rows<T, 2>(rb, a, cr, ldc); break;
        default: buffered_rows<T, 1>(rb, a, cr, ldc); break;
      }
    }
  }
  std::free(mem);
}

template <int T> struct PartOp { template <typename... A> static void run(A... a) { int8_part<T>(a...); } };
template <> struct PartOp<kQ8_0x8> { template <typename... A> static void run(A... a) { int8_part_x8<kQ8_0x8>(a...); } };
template <> struct PartOp<kQ5_0x8> { template <typename... A> static void run(A... a) { int8_part_x8<kQ5_0x8>(a...); } };

// This thread's share [n0, n1) of n output columns; for an interleaved type whole groups of 8 rows.
inline void thread_share(int64_t n, int64_t& n0, int64_t& n1, int type = 0) {
#if defined(_OPENMP)
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
  const int nt = 1, tid = 0;
#endif
  const int64_t align = type & kInterleaved ? kGroupRows : 1;
  const int64_t per = ((n + nt - 1) / nt + align - 1) / align * align;
  n0 = std::min<int64_t>(n, tid * per);
  n1 = std::min<int64_t>(n, n0 + per);
}

template <template <int> class Op, typename... Args>
int dispatch(int type, Args... args) {
  switch (type) {
    case kQ8_0: Op<kQ8_0>::run(args...); return 0;
    case kQ4_0: Op<kQ4_0>::run(args...); return 0;
    case kQ5_0: Op<kQ5_0>::run(args...); return 0;
    case kQ4_K: Op<kQ4_K>::run(args...); return 0;
    case kQ5_K: Op<kQ5_K>::run(args...); return 0;
    case kQ6_K: Op<kQ6_K>::run(args...); return 0;
    case kQ8_0x8: Op<kQ8_0x8>::run(args...); return 0;
    case kQ5_0x8: Op<kQ5_0x8>::run(args...); return 0;
    default: return -1;
  }
}

template <int T> struct NoOp { static void run() {} };

}  // namespace
