// CPU kernels for tokenmill, loaded with ctypes (no torch headers: builds in about a second).
//
// decode_attention_f32: attention of one query token per sequence over its paged K/V cache, reading each
// visible key and value exactly once straight from the cache blocks (the PyTorch path first gathers the
// blocks into a padded copy, then attends over it: three passes over memory instead of one).
// Oracle: tokenmill/kernels/reference.py (tests/model/test_cpu_kernels.py compares the two).
//
// Layouts (all float32, C-contiguous):
//   q        [B, Hq, D]           out [B, Hq, D]
//   k_cache  [N, bs, Hkv, D]      v_cache the same
//   blocks   [B, nb] int64        block ids; blocks[b][j] holds positions first_pos[b] + j*bs .. + bs-1
//   first_pos, lo, ctx [B] int64  sequence b sees keys at positions lo[b] <= p < ctx[b]
// Work is split over (sequence, kv head) pairs with OpenMP; the query heads of one GQA group share each
// key/value load. Softmax is two-pass (scores, then max / exp / sum), in float32 like SDPA on CPU.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 8 floats in one vector (GCC/Clang vector extension: AVX on x86, two NEON registers on ARM).
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline float hsum8(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// Four independent accumulators: a single one makes the loop wait on each add's latency.
inline float dot(const float* a, const float* b, int64_t n) {
  v8f s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 += load8(a + i) * load8(b + i);
    s1 += load8(a + i + 8) * load8(b + i + 8);
    s2 += load8(a + i + 16) * load8(b + i + 16);
    s3 += load8(a + i + 24) * load8(b + i + 24);
  }
  for (; i + 8 <= n; i += 8) s0 += load8(a + i) * load8(b + i);
  float s = hsum8((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Ask for the n floats at p ahead of use: K/V slots of one sequence sit in scattered blocks, which the
// hardware prefetcher does not follow across block boundaries.
inline void prefetch(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

// y += w * x
inline void axpy(float* y, float w, const float* x, int64_t n) {
  const v8f wv = {w, w, w, w, w, w, w, w};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, load8(y + i) + wv * load8(x + i));
  for (; i < n; ++i) y[i] += w * x[i];
}

// Calls f(i, row) for positions p0 <= p < p1 of one sequence (i = p - p0), where row points at the D
// floats of head offset `head` in the slot holding position p; walks block by block (no per-slot division)
// and prefetches the slot `ahead` positions later.
template <typename F>
inline void for_each_slot(const float* cache, const int64_t* table, int64_t first_pos, int64_t p0, int64_t p1,
                          int64_t bs, int64_t block_stride, int64_t token_stride, int64_t head, int64_t D, F f) {
  const int64_t ahead = 2;
  int64_t p = p0;
  while (p < p1) {
    const int64_t rel = p - first_pos, j = rel / bs;
    const float* block = cache + table[j] * block_stride + head;
    const int64_t t_end = (p1 - first_pos) - j * bs < bs ? (p1 - first_pos) - j * bs : bs;
    for (int64_t t = rel - j * bs; t < t_end; ++t, ++p) {
      const int64_t t_next = t + ahead;
      if (t_next < bs) {
        prefetch(block + t_next * token_stride, D);
      } else if (p + ahead < p1) {
        prefetch(cache + table[j + 1] * block_stride + head + (t_next - bs) * token_stride, D);
      }
      f(p - p0, block + t * token_stride);
    }
  }
}

}  // namespace

extern "C" {

int tokenmill_kernels_abi_version() { return 1; }

void decode_attention_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* blocks,
                          int64_t nb, const int64_t* first_pos, const int64_t* lo, const int64_t* ctx,
                          int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale, float* out,
                          int num_threads) {
  const int64_t G = Hq / Hkv;
  const int64_t token_stride = Hkv * D;  // floats between consecutive slots of one block
  const int64_t block_stride = bs * token_stride;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scores;
    std::vector<float> acc(G * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * Hkv; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t p0 = lo[b], p1 = ctx[b], L = p1 - p0;
      const float* qb = q + (b * Hq + h * G) * D;
      float* ob = out + (b * Hq + h * G) * D;
      if (L <= 0) {
        for (int64_t i = 0; i < G * D; ++i) ob[i] = 0.f;
        continue;
      }
      scores.resize(G * L);
      const int64_t* table = blocks + b * nb;
      for_each_slot(k_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D, D,
                    [&](int64_t i, const float* k) {
                      for (int64_t g = 0; g < G; ++g) scores[g * L + i] = dot(qb + g * D, k, D) * scale;
                    });
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = sg[0];
        for (int64_t i = 1; i < L; ++i) m = sg[i] > m ? sg[i] : m;
        float sum = 0.f;
        for (int64_t i = 0; i < L; ++i) {
          sg[i] = std::exp(sg[i] - m);
          sum += sg[i];
        }
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < L; ++i) sg[i] *= inv;
      }
      for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
      for_each_slot(v_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D, D,
                    [&](int64_t i, const float* v) {
                      for (int64_t g = 0; g < G; ++g) axpy(acc.data() + g * D, scores[g * L + i], v, D);
                    });
      for (int64_t i = 0; i < G * D; ++i) ob[i] = acc[i];
    }
  }
}

// argmax_rows_f32: out[r] = index of the first maximum of row r of x [rows, cols] (row stride ld), like
// torch.argmax (a NaN counts as the maximum). torch's CPU argmax keeps an index per element and runs several
// times slower than a max reduction on wide rows (262k-entry vocabularies). Here: one vectorised pass of
// per-chunk maxima (remembering the first chunk holding the row maximum), then a scan of that chunk only.
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

}  // extern "C"
