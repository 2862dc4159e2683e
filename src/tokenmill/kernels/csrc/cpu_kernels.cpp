// CPU kernels for tokenmill, loaded with ctypes (no torch headers: builds in about a second).
//
// decode_attention_f32 (decode_attention.h; vector helpers in vec_math.h): attention of a few query tokens
// per sequence (one for a plain decode, 1 + k when speculative decoding verifies k drafts) over its paged K/V
// cache, reading each visible key and value exactly once straight from the cache blocks for all the
// sequence's queries (the PyTorch path first gathers the blocks into a padded copy, then attends over it:
// three passes over memory instead of one).
// Oracle: tokenmill/kernels/reference.py (tests/model/test_cpu_kernels.py compares the two).
//
// Layouts (C-contiguous; q and out float32, the caches float32 or bf16: decode_attention_f32 / _bf16):
//   q        [T, Hq, D]           out [T, Hq, D]   (T query rows, sequence by sequence)
//   k_cache  [N, bs, Hkv, D]      v_cache the same
//   blocks   [B, nb] int64        block ids; blocks[b][j] holds positions first_pos[b] + j*bs .. + bs-1
//   first_pos [B] int64
//   q_start  [B + 1] int64        sequence b owns rows q_start[b] .. q_start[b+1]-1; nullptr: row b alone (T = B)
//   lo, ctx  [T] int64            row r sees keys at positions lo[r] <= p < ctx[r] (its own position + 1)
// Work is split over (sequence, kv head) pairs with OpenMP; the query heads of one GQA group and the queries
// of one sequence share each key/value load. Softmax is two-pass (scores over the union of the rows' ranges,
// then max / exp / sum over each row's own range), in float32 like SDPA on CPU; bf16 cache rows are widened
// to float32 as they are loaded (half the bytes read, the same float32 math).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_attention.h"
#include "vec_math.h"
#include "wide_vector.h"

namespace {

using tokenmill::store_f32;
using tokenmill::to_f32;

// rms_norm_rows: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows of n elements (row strides ldx, ldo);
// the row arithmetic is vec_math.h's rms_norm_row (shared with decode_ops.cpp's q/k norms).
template <typename T>
void rms_norm_rows(const T* x, const float* w, int64_t rows, int64_t n, int64_t ldx, int64_t ldo, float eps,
                   int round_first, T* out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(x + r * ldx, w, n, eps, round_first, out + r * ldo);
}

// gelu_and_mul_rows: x [rows, 2n] = [gate | up] (row stride ldx) -> out [rows, n] = gelu_tanh(gate) * up
// (vec_math.h's gelu_and_mul_row per row).
template <typename T>
void gelu_and_mul_rows(const T* x, int64_t rows, int64_t n, int64_t ldx, T* out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) gelu_and_mul_row(x + r * ldx, x + r * ldx + n, n, out + r * n);
}

// sample_rows: out[r] = a token drawn from softmax(x[r]) with the uniform u[r] in [0, 1): the first index whose
// cumulative sum of e_i = exp(x_i - max) exceeds u[r] * sum(e) (inverse CDF, as layers/sampler.py does with torch's
// exp / cumsum / searchsorted, which cost ~3.5 ms for 8 rows of a 262k vocabulary on 2 cores). -inf entries weigh
// exactly 0, so they are never drawn; a row of only -inf gives cols - 1 (the caller substitutes its fallback).
// The sum is kept per chunk of kSampleChunk entries; the draw walks the chunk sums, then one chunk entry by entry,
// so no second full pass of exponentials is needed.
constexpr int64_t kSampleChunk = 512;

inline v8f sample_weights8(const float* x, float m) {
  const v8f v = load8(x);
  const v8f e = exp8(v - splat(m));
  return v == splat(-INFINITY) ? splat(0.f) : e;  // (exp8 clamps: -inf would weigh exp(-87))
}

void sample_rows(const float* x, int64_t rows, int64_t cols, int64_t ld, const float* u, int64_t* out,
                 int num_threads) {
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> sums(static_cast<size_t>((cols + kSampleChunk - 1) / kSampleChunk));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = x + r * ld;
      float m = row[0];
#pragma omp simd reduction(max : m)
      for (int64_t i = 1; i < cols; ++i) m = row[i] > m ? row[i] : m;
      out[r] = cols - 1;
      if (!(m > -INFINITY)) continue;  // every entry -inf (or NaN): the caller's fallback
      auto weight = [&](int64_t i) { return row[i] == -INFINITY ? 0.f : std::exp(row[i] - m); };
      float total = 0.f;
      for (int64_t c = 0; c * kSampleChunk < cols; ++c) {
        const int64_t lo = c * kSampleChunk, hi = lo + kSampleChunk < cols ? lo + kSampleChunk : cols;
        v8f acc = splat(0.f);
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) acc += sample_weights8(row + i, m);
        float s = hsum8(acc);
        for (; i < hi; ++i) s += weight(i);
        sums[c] = s;
        total += s;
      }
      const float target = u[r] * total;
      float run = 0.f;
      int64_t last = -1;  // the last index of positive weight seen: the draw when rounding leaves target unreached
      for (int64_t c = 0; c * kSampleChunk < cols; ++c) {
        if (sums[c] <= 0.f) continue;
        const int64_t lo = c * kSampleChunk, hi = lo + kSampleChunk < cols ? lo + kSampleChunk : cols;
        if (run + sums[c] <= target) {
          run += sums[c];
          for (int64_t i = hi - 1; i >= lo; --i)
            if (row[i] != -INFINITY) {
              last = i;
              break;
            }
          continue;
        }
        for (int64_t i = lo; i < hi; ++i) {
          const float w = weight(i);
          if (w <= 0.f) continue;
          last = i;
          run += w;
          if (run > target) break;
        }
        break;
      }
      if (last >= 0) out[r] = last;
    }
  }
}

}  // namespace

extern "C" {

int tokenmill_kernels_abi_version() { return 8; }

void decode_attention_f32(const float* q, const float* k_cache, const float* v_cache,
                          const int64_t* blocks, int64_t nb, const int64_t* first_pos, const int64_t* q_start,
                          const int64_t* lo, const int64_t* ctx, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                          int64_t bs, float scale, float* out, int num_threads) {
  decode_attention(q, k_cache, v_cache, blocks, nb, first_pos, q_start, lo, ctx, B, Hq, Hkv, D, bs, scale, out,
                   num_threads);
}

void decode_attention_bf16(const float* q, const bf16* k_cache, const bf16* v_cache,
                           const int64_t* blocks, int64_t nb, const int64_t* first_pos, const int64_t* q_start,
                           const int64_t* lo, const int64_t* ctx, int64_t B, int64_t Hq, int64_t Hkv, int64_t D,
                           int64_t bs, float scale, float* out, int num_threads) {
  decode_attention(q, k_cache, v_cache, blocks, nb, first_pos, q_start, lo, ctx, B, Hq, Hkv, D, bs, scale, out,
                   num_threads);
}

// argmax_rows_f32: out[r] = index of the first maximum of row r of x [rows, cols] (row stride ld), like
// torch.argmax (a NaN counts as the maximum). torch's CPU argmax keeps an index per element and runs several
// times slower than a max reduction on wide rows (262k-entry vocabularies). Here: one vectorised pass of
// per-chunk maxima (remembering the first chunk holding the row maximum), then a scan of that chunk only.
// sample_rows_f32: see sample_rows above.
void sample_rows_f32(const float* x, int64_t rows, int64_t cols, int64_t ld, const float* u, int64_t* out,
                     int num_threads) {
  sample_rows(x, rows, cols, ld, u, out, num_threads);
}

void argmax_rows_f32(const float* x, int64_t rows, int64_t cols, int64_t ld, int64_t* out, int num_threads) {
  const int64_t chunk = 512;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    float best = row[0];
    int64_t best_lo = 0;
    int nans = 0;
    for (int64_t lo = 0; lo < cols; lo += chunk) {
      const int64_t hi = lo + chunk < cols ? lo + chunk : cols;
      float m = row[lo];
#pragma omp simd reduction(max : m) reduction(+ : nans)
      for (int64_t i = lo; i < hi; ++i) {
        m = row[i] > m ? row[i] : m;
        nans += row[i] != row[i];
      }
      if (m > best) {
        best = m;
        best_lo = lo;
      }
    }
    int64_t found = -1;
    if (nans) {
      for (int64_t i = 0; i < cols && found < 0; ++i) found = std::isnan(row[i]) ? i : -1;
    } else {
      const int64_t hi = best_lo + chunk < cols ? best_lo + chunk : cols;
      for (int64_t i = best_lo; i < hi && found < 0; ++i) found = row[i] == best ? i : -1;
    }
    out[r] = found < 0 ? 0 : found;
  }
}

void rms_norm_f32(const float* x, const float* w, int64_t rows, int64_t n, int64_t ldx, int64_t ldo, float eps,
                  float* out, int num_threads) {
  rms_norm_rows(x, w, rows, n, ldx, ldo, eps, 0, out, num_threads);
}

void rms_norm_bf16(const bf16* x, const float* w, int64_t rows, int64_t n, int64_t ldx, int64_t ldo, float eps,
                   int round_first, bf16* out, int num_threads) {
  rms_norm_rows(x, w, rows, n, ldx, ldo, eps, round_first, out, num_threads);
}

// bf16_from_f32: out[i] = x[i] rounded to bf16 (nearest even; NaN stays NaN), as torch's .to(torch.bfloat16).
void bf16_from_f32(const float* x, int64_t n, bf16* out, int num_threads) {
  const int64_t chunks = (n + 4095) / 4096;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (n > 65536)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t hi = c * 4096 + 4096 < n ? c * 4096 + 4096 : n;
    int64_t i = c * 4096;
    for (; i + kW <= hi; i += kW) storew(out + i, loadw(x + i));
    for (; i < hi; ++i) store_f32(out + i, x[i]);
  }
}

void gelu_tanh_and_mul_f32(const float* x, int64_t rows, int64_t n, int64_t ldx, float* out, int num_threads) {
  gelu_and_mul_rows(x, rows, n, ldx, out, num_threads);
}

void gelu_tanh_and_mul_bf16(const bf16* x, int64_t rows, int64_t n, int64_t ldx, bf16* out, int num_threads) {
  gelu_and_mul_rows(x, rows, n, ldx, out, num_threads);
}

}  // extern "C"
