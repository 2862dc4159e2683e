// Matrix products over GGUF weight blocks kept as stored (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K).
//
// Every block type unpacks into one shape, a Group of G weights (G = 32, or 256 for the K-quants):
//   w[i] = s[i / 16] * q[i] - m[i / 32],  q int8 (signed with the type's offset removed; Q4_K / Q5_K: 0..31)
// so one dot product and one dequantizer serve all six types. The block layouts follow ggml's
// (ggml-quants.c, MIT; gguf's numpy quants.py and our model/gguf_dequant.py decode the same bytes).
//
// Two products, picked by the caller by row count (layers/quantized.py):
// - quant_linear_int8 (few rows: decode, speculative verification). Each activation row is quantized once per
//   layer to 8 bits per 32-element block (quantize_act_q8: scale amax/127, round half to even), and every weight
//   block is read and unpacked once for all the rows (up to 4: straight into registers, Q4_0 / Q5_0 two
//   weight rows per activation load; more: a weight row at a time into an L1 buffer that groups of 4 rows run
//   over). Per 32 weights and row: one integer dot product (AVX2 maddubs + madd, or AVX-512 VNNI dpbusd; Q8_0
//   carries the weights' sign over to x, Q4_0 / Q5_0 / Q6_K take their offset off as one product per
//   activation chunk), scales in float32:
//     sum_i w_i x_i = dx * s * sum_i q_i qx_i  [- m * dx * sum_i qx_i for Q4_K / Q5_K, whose quants are unsigned]
//   (Q6_K: a scale per 16-weight half, as lanes 0-3 / 4-7 of the dot product.) Two accumulators alternate
//   between blocks so single-row decode is not bound by one FMA chain's latency. Threads split the output
//   columns (weight rows), so each weight byte is read once per call. The per-block arithmetic is in
//   quant_dot.h; every path does the same float operations per row, so a row's result does not depend on
//   the number of rows or threads.
// - quant_gemm_panels (many rows: prefill, large batches). Weight rows are dequantized on the fly, NR panels
//   at a time, into a thread's float32 panel buffer (L2-sized), and the panel GEMM microkernel (panel_kernel.h)
//   multiplies every row tile against them: float32 arithmetic, exact activations, no dense copy in memory.
// The block unpackers live in quant_blocks.h. Oracle: tokenmill/kernels/quant_reference.py
// (tests/model/test_quant_kernels.py).

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
    if constexpr (NW > 1) {  // set 0's blocks, then set 1's: half the accumulators live at once (GCC spilled them)
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
  constexpr int NW = Format<T>::G == 32 && T != kQ8_0 ? 2 : 1;
#else
  constexpr int NW = 1;
#endif
  const int64_t n_pairs = n0 + (n1 - n0) / NW * NW;
  int8_cols<T, R, NW>(a, w, row_bytes, n0, n_pairs, c, ldc);
  if (n_pairs < n1) int8_cols<T, R, 1>(a, w, row_bytes, n_pairs, n1, c, ldc);
}

// R <= 4 activation rows against the whole part, each weight block unpacked once (into registers or g).
template <int T>
void int8_group(const Acts& a, int64_t R, const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t n1, float* c,
                int64_t ldc) {
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
  if (m <= 4) {
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

// This thread's share [n0, n1) of n output columns.
inline void thread_share(int64_t n, int64_t& n0, int64_t& n1) {
#if defined(_OPENMP)
  const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
#else
  const int nt = 1, tid = 0;
#endif
  const int64_t per = (n + nt - 1) / nt;
  n0 = std::min<int64_t>(n, tid * per);
  n1 = std::min<int64_t>(n, n0 + per);
}

// ---- dequantization: rows of blocks -> float32 ---------------------------------------------------------------

template <int T>
void dequant_row(const uint8_t* wrow, int64_t k, float* out, int64_t stride) {
  using F = Format<T>;
  Group g;
  for (int64_t blk = 0; blk < k / F::G; ++blk) {
    unpack<T>(wrow + blk * F::bytes, g);
    float* o = out + blk * F::G * stride;
    // (One flat loop: the same loop nested per 16-weight half left the output unwritten under GCC 12 -O2/-O3,
    // root cause not found; the oracle tests run every variant.)
    for (int i = 0; i < F::G; ++i)
      o[i * stride] = F::has_min ? g.s[i / 16] * static_cast<float>(g.q[i]) - g.m[i / 32] : g.s[i / 16] * static_cast<float>(g.q[i]);
  }
}

template <int T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t count, int64_t k, float* out,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < count; ++r) dequant_row<T>(w + rows[r] * row_bytes, k, out + r * k, 1);
}

// tmp [PW][k] (rows k apart) -> panel [k][PW]: 8 x 8 register transposes where AVX2 has them.
inline void transpose_to_panel(const float* tmp, int64_t k, float* panel) {
  int64_t kk0 = 0;
#if defined(__AVX2__)
  for (; kk0 + 8 <= k; kk0 += 8)
    for (int jb = 0; jb < PW; jb += 8) {
      __m256 r[8], t[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(tmp + (jb + i) * k + kk0);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(panel + (kk0 + i) * PW + jb, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(panel + (kk0 + i + 4) * PW + jb, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
      }
    }
#endif
  for (int64_t kk = kk0; kk < k; ++kk)
    for (int j = 0; j < PW; ++j) panel[kk * PW + j] = tmp[j * k + kk];
}

template <int T>
void panel_gemm_q(const float* a, int64_t m, int64_t k, int64_t lda, const uint8_t* w, int64_t n, int64_t row_bytes,
                  float* c, int64_t ldc, int num_threads) {
  const int64_t tiles = (m + MR - 1) / MR, panels = (n + PW - 1) / PW, groups = (panels + NR - 1) / NR;
  float* ap = static_cast<float*>(std::malloc(sizeof(float) * tiles * k * MR));
  if (ap == nullptr) return;
#pragma omp parallel num_threads(num_threads)
  {
    pack_a_tiles(a, m, k, lda, ap);
    // This thread's NR panels [NR][k][PW], and PW dequantized rows [PW][k] on their way into a panel.
    float* buf = static_cast<float*>(std::malloc(sizeof(float) * (NR + 1) * k * PW));
    float* tmp = buf + NR * k * PW;
#pragma omp for schedule(static)
    for (int64_t grp = 0; grp < groups; ++grp) {
      if (buf == nullptr) continue;
      const int64_t q0 = grp * NR, np = std::min<int64_t>(NR, panels - q0), c0 = q0 * PW;
      const int64_t cols = std::min<int64_t>(np * PW, n - c0);
      for (int64_t p = 0; p < np; ++p) {
        for (int j = 0; j < PW; ++j) {
          const int64_t row = c0 + p * PW + j;
          if (row < n)
            dequant_row<T>(w + row * row_bytes, k, tmp + j * k, 1);
          else
            std::memset(tmp + j * k, 0, sizeof(float) * k);
        }
        transpose_to_panel(tmp, k, buf + p * k * PW);
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int r = static_cast<int>(std::min<int64_t>(MR, m - t * MR));
        const float* at = ap + t * k * MR;
        float* ct = c + t * MR * ldc + c0;
        if (np == NR)
          tile<NR>(r, at, buf, k, ct, ldc, cols, buf, 0);
        else if (np == kMid)
          tile<kMid>(r, at, buf, k, ct, ldc, cols, buf, 0);
        else
          tile<1>(r, at, buf, k, ct, ldc, cols, buf, 0);
      }
    }
    std::free(buf);
  }
  std::free(ap);
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
    default: return -1;
  }
}

template <int T> struct PanelOp { template <typename... A> static void run(A... a) { panel_gemm_q<T>(a...); } };
template <int T> struct NoOp { static void run() {} };
template <int T> struct DequantOp { template <typename... A> static void run(A... a) { dequant_rows<T>(a...); } };

}  // namespace

extern "C" {

// Each entry returns 0, or -1 for a type without a kernel (the caller checks first; this is a last guard).
int quant_gemm_panels(int type, const float* a, int64_t m, int64_t k, int64_t lda, const uint8_t* w, int64_t n,
                      int64_t row_bytes, float* c, int64_t ldc, int num_threads) {
  if (m <= 0 || n <= 0) return 0;
  return dispatch<PanelOp>(type, a, m, k, lda, w, n, row_bytes, c, ldc, num_threads);
}

int quant_dequant_rows(int type, const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t count, int64_t k,
                       float* out, int num_threads) {
  return dispatch<DequantOp>(type, w, row_bytes, rows, count, k, out, num_threads);
}

// A whole linear layer on few rows, in one call and one parallel region: x [m, k] (row stride ldx) quantized
// into the caller's scratch (q [m, k], d and sums [m, k/32]), then every part i (a block weight of rows[i]
// rows, type types[i], at address weights[i]) into columns cols[i] .. cols[i] + rows[i] of c.
int quant_linear_int8(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* q, float* d, float* sums,
                      int nparts, const int* types, const int64_t* weights, const int64_t* rows,
                      const int64_t* row_bytes, const int64_t* cols, float* c, int64_t ldc, int num_threads) {
  for (int i = 0; i < nparts; ++i)
    if (dispatch<NoOp>(types[i]) != 0) return -1;
#pragma omp parallel num_threads(num_threads)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; ++r) quantize_row_q8(x + r * ldx, k, q + r * k, d + r * (k / 32), sums + r * (k / 32));
    const Acts a{q, d, sums, k};  // (the loop's implicit barrier: every row is quantized before any is read)
    for (int i = 0; i < nparts; ++i) {
      int64_t n0, n1;
      thread_share(rows[i], n0, n1);
      dispatch<PartOp>(types[i], a, m, reinterpret_cast<const uint8_t*>(weights[i]), row_bytes[i], n0, n1,
                       c + cols[i], ldc);
    }
  }
  return 0;
}

// x [m, k] (row stride ldx, k a multiple of 32) -> q [m, k] int8, d and sums [m, k/32] float32.
void quantize_act_q8(const float* x, int64_t m, int64_t k, int64_t ldx, int8_t* q, float* d, float* sums,
                     int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (m > 1)
  for (int64_t r = 0; r < m; ++r) quantize_row_q8(x + r * ldx, k, q + r * k, d + r * (k / 32), sums + r * (k / 32));
}

}  // extern "C"
