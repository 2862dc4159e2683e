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
//   at a time, into a thread's float32 panel buffer (a chunk of groups, L2-sized), and the panel GEMM
//   microkernel (panel_kernel.h) multiplies the row tiles against them a block of rows at a time: float32
//   arithmetic, exact activations, no dense copy in memory.
// The block unpackers live in quant_blocks.h. Oracle: tokenmill/kernels/quant_reference.py
// (tests/model/test_quant_kernels.py).

#include "quant_int8.h"  // the int8 product, and with it the intrinsics, OpenMP, the panel kernel and the
                         // block unpackers this file also uses

namespace {

using namespace tokenmill::panel;

// ---- dequantization: rows of blocks -> float32 ---------------------------------------------------------------

template <int T>
void dequant_row(const uint8_t* wrow, int64_t k, float* out, int64_t stride) {
  using F = Format<T>;
  Group g;
  for (int64_t blk = 0; blk < k / F::G; ++blk) {
    unpack<T>(wrow + blk * F::bytes, g);
    float* o = out + blk * F::G * stride;
#if defined(__AVX2__) && defined(__FMA__)
    if (stride == 1) {  // 8 weights per instruction (the scalar loop below ran ~1 ns per weight: a fifth of a
                        // prefill's quantized matmul time went to dequantizing panels)
      for (int h = 0; h < F::G / 16; ++h) {
        const __m256 sv = _mm256_set1_ps(g.s[h]), mv = _mm256_set1_ps(F::has_min ? g.m[h / 2] : 0.f);
        for (int e = 0; e < 16; e += 8) {
          const __m256 qf = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(g.q + 16 * h + e))));
          _mm256_storeu_ps(o + 16 * h + e, F::has_min ? _mm256_fmsub_ps(sv, qf, mv) : _mm256_mul_ps(sv, qf));
        }
      }
      continue;
    }
#endif
    // (One flat loop: the same loop nested per 16-weight half left the output unwritten under GCC 12 -O2/-O3,
    // root cause not found; the oracle tests run every variant.)
    for (int i = 0; i < F::G; ++i)
      o[i * stride] = F::has_min ? g.s[i / 16] * static_cast<float>(g.q[i]) - g.m[i / 32] : g.s[i / 16] * static_cast<float>(g.q[i]);
  }
}

// Row n of a weight as float32 (out[i * stride]), whatever the layout.
template <int T>
void dequant_row_n(const uint8_t* w, int64_t row_bytes, int64_t n, int64_t k, float* out, int64_t stride) {
  if constexpr ((T & kInterleaved) != 0)
    dequant_row_x8<T>(w, row_bytes, n, k, out, stride);
  else
    dequant_row<T>(w + n * row_bytes, k, out, stride);
}

template <int T>
void dequant_rows(const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t count, int64_t k, float* out,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < count; ++r) dequant_row_n<T>(w, row_bytes, rows[r], k, out + r * k, 1);
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

// Every row tile of the packed activations against np dequantized panels. Not inlined: in a caller whose
// dequantizer keeps constants in registers (quant_x8.h) GCC spilled an accumulator in the microkernel's loop
// (2x slower); here the tile loop has the registers to itself, whatever the block type.
__attribute__((noinline)) void panel_tiles(const float* ap, int64_t m, int64_t k, const float* buf, int64_t np,
                                           int64_t cols, float* c, int64_t ldc) {
  for (int64_t t = 0; t < (m + MR - 1) / MR; ++t) {
    const int r = static_cast<int>(std::min<int64_t>(MR, m - t * MR));
    const float* at = ap + t * k * MR;
    float* ct = c + t * MR * ldc;
    if (np == NR)
      tile<NR>(r, at, buf, k, ct, ldc, cols, buf, 0);
    else if (np == kMid)
      tile<kMid>(r, at, buf, k, ct, ldc, cols, buf, 0);
    else
      tile<1>(r, at, buf, k, ct, ldc, cols, buf, 0);
  }
}

// A thread's groups are dequantized a chunk at a time (kChunkBytes of float32 panels, in L2), and the chunk runs
// over the packed rows a block at a time (kBlockBytes), so each block of rows is read once per chunk instead of
// once per group. One pass over all rows per group streamed the whole packed A (16 MB for the down
// projection's 2048 x 2048 prefill input) from memory per 16 columns: 1.7x oneDNN's time on the dequantized
// weight; the blocked loop runs it 1.34-1.4x faster than before, other shapes the same (benchmarks/
// quant_rows.py --panels). Blocks of 256 kB, 2 MB and 6 MB measured alike; a chunk of one group gains nothing
// (the reuse across a chunk's groups is the point). Each output is still one k-ordered FMA chain.
constexpr int64_t kChunkBytes = 512 << 10, kBlockBytes = 2 << 20;

// NR panels of weight rows c0.. into buf [NR][k][PW] (tmp: PW rows [PW][k] on their way into a panel).
template <int T>
void dequant_group(const uint8_t* w, int64_t n, int64_t row_bytes, int64_t k, int64_t c0, int64_t np, float* buf,
                   float* tmp) {
  for (int64_t p = 0; p < np; ++p) {
    if constexpr ((T & kInterleaved) != 0)  // a group is a panel as it stands (quant_x8.h)
      if (x8_panel<T>(w + (c0 + p * PW) * row_bytes, k, buf + p * k * PW)) continue;
    for (int j = 0; j < PW; ++j) {
      const int64_t row = c0 + p * PW + j;
      if (row < n)
        dequant_row_n<T>(w, row_bytes, row, k, tmp + j * k, 1);
      else
        std::memset(tmp + j * k, 0, sizeof(float) * k);
    }
    transpose_to_panel(tmp, k, buf + p * k * PW);
  }
}

template <int T>
void panel_gemm_q(const float* a, int64_t m, int64_t k, int64_t lda, const uint8_t* w, int64_t n, int64_t row_bytes,
                  float* c, int64_t ldc, int num_threads) {
  const int64_t tiles = (m + MR - 1) / MR, panels = (n + PW - 1) / PW, groups = (panels + NR - 1) / NR;
  const int64_t group_floats = NR * k * PW;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / int64_t(sizeof(float) * group_floats));
  const int64_t block = std::max<int64_t>(1, kBlockBytes / int64_t(sizeof(float) * k * MR));  // row tiles
  float* ap = static_cast<float*>(std::malloc(sizeof(float) * tiles * k * MR));
  if (ap == nullptr) return;
#pragma omp parallel num_threads(num_threads)
  {
    pack_a_tiles(a, m, k, lda, ap);
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t g_begin = groups * id / nt, g_end = groups * (id + 1) / nt;  // as schedule(static) would
    const int64_t cap = std::min(chunk, g_end - g_begin);
    float* buf = cap > 0 ? static_cast<float*>(std::malloc(sizeof(float) * (cap * group_floats + k * PW))) : nullptr;
    for (int64_t g0 = g_begin; buf != nullptr && g0 < g_end; g0 += cap) {
      const int64_t gn = std::min(cap, g_end - g0);
      for (int64_t g = 0; g < gn; ++g)
        dequant_group<T>(w, n, row_bytes, k, (g0 + g) * NR * PW, std::min<int64_t>(NR, panels - (g0 + g) * NR),
                         buf + g * group_floats, buf + cap * group_floats);
      for (int64_t t0 = 0; t0 < tiles; t0 += block) {
        const int64_t rows = std::min(block * MR, m - t0 * MR);
        for (int64_t g = 0; g < gn; ++g) {
          const int64_t q0 = (g0 + g) * NR, np = std::min<int64_t>(NR, panels - q0), c0 = q0 * PW;
          panel_tiles(ap + t0 * k * MR, rows, k, buf + g * group_floats, np, std::min<int64_t>(np * PW, n - c0),
                      c + t0 * MR * ldc + c0, ldc);
        }
      }
    }
    std::free(buf);
  }
  std::free(ap);
}

template <int T> struct PanelOp { template <typename... A> static void run(A... a) { panel_gemm_q<T>(a...); } };
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
      thread_share(rows[i], n0, n1, types[i]);
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
