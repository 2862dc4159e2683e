// CPU kernels for tokenmill, loaded with ctypes (no torch headers: builds in about a second).
//
// decode_attention_f32: attention of a few query tokens per sequence (one for a plain decode, 1 + k when
// speculative decoding verifies k drafts) over its paged K/V cache, reading each visible key and value exactly
// once straight from the cache blocks for all the sequence's queries (the PyTorch path first gathers the
// blocks into a padded copy, then attends over it: three passes over memory instead of one).
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

#include "wide_vector.h"

namespace {

// 8 floats in one vector (GCC/Clang vector extension: AVX on x86, two NEON registers on ARM).
typedef float v8f __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

typedef float v4f __attribute__((vector_size(16)));

inline float hsum8(v8f v) {  // a log tree: 8 lane-by-lane extracts and adds cost several times more
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  const v4f h = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const v4f q = h + __builtin_shufflevector(h, h, 2, 3, 0, 1);
  return q[0] + q[1];
#else
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
#endif
}

using tokenmill::bf16;
using tokenmill::kW;
using tokenmill::loadw;
using tokenmill::storew;
using tokenmill::vw;

inline float hsumw(vw v) {
#if defined(__AVX512F__) && defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
  return hsum8(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  float s = 0.f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
#endif
}

typedef int32_t v8i __attribute__((vector_size(32)));

inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }

// exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; about 1 ulp on [-87, 88]).
inline v8f exp8(v8f x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;
  x = x > splat(88.3f) ? splat(88.3f) : x;
  const v8f fx = x * splat(1.44269504088896341f) + splat(0.5f);
  v8i n = __builtin_convertvector(fx, v8i);  // truncates toward zero ...
  n += (__builtin_convertvector(n, v8f) > fx);  // ... so step down where that rounded up: floor
  const v8f nf = __builtin_convertvector(n, v8f);
  const v8f r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
  v8f y = splat(1.9875691500e-4f);
  y = y * r + splat(1.3981999507e-3f);
  y = y * r + splat(8.3334519073e-3f);
  y = y * r + splat(4.1665795894e-2f);
  y = y * r + splat(1.6666665459e-1f);
  y = y * r + splat(5.0000001201e-1f);
  y = y * r * r + r + splat(1.f);
  const v8i bits = (n + 127) << 23;  // 2^n
  return y * (v8f)bits;
}

// gelu with the tanh approximation, 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), written as
// x / (1 + exp(-2u)) (the same function): no cancellation in the negative tail, where 1 + tanh(u) lost all
// its digits (relative errors up to 100% below x = -4, enough to flip bf16 roundings); torch's own GELU(tanh)
// CPU kernel runs several times slower than this.
inline v8f gelu_tanh8(v8f x) {
  const v8f t = splat(-2.f * 0.7978845608028654f) * (x + splat(0.044715f) * x * x * x);  // -2u
  const v8f y = x / (splat(1.f) + exp8(t));
  return t > splat(88.f) ? splat(0.f) * x : y;  // past exp8's clamp the true value is below any float
}

inline float gelu_tanh1(float x) {
  const float t = -2.f * 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return x / (1.f + std::exp(t));  // exp overflows to inf for t > 88: x / inf = (-)0, as in the vector form
}

// x[0:n] = softmax(x[0:n]), the exponentials 8 lanes at a time.
inline void softmax_inplace(float* x, int64_t n) {
  float m = x[0];
  for (int64_t i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
  v8f vsum = {0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f e = exp8(load8(x + i) - splat(m));
    store8(x + i, e);
    vsum += e;
  }
  float sum = hsum8(vsum);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - m);
    sum += x[i];
  }
  const float inv = 1.f / sum;
  for (i = 0; i < n; ++i) x[i] *= inv;
}

// K/V slots of one sequence sit in scattered blocks, which the hardware prefetcher does not follow across
// block boundaries: the loops below prefetch (tokenmill::prefetch) the next slot or run themselves.
using tokenmill::prefetch;
using tokenmill::store_f32;
using tokenmill::to_f32;

// Calls f(i, row) for positions p0 <= p < p1 of one sequence (i = p - p0), where row points at the D
// floats of head offset `head` in the slot holding position p; walks block by block (no per-slot division)
// and prefetches the slot `ahead` positions later.
template <typename T, typename F>
inline void for_each_slot(const T* cache, const int64_t* table, int64_t first_pos, int64_t p0, int64_t p1,
                          int64_t bs, int64_t block_stride, int64_t token_stride, int64_t head, int64_t D, F f) {
  const int64_t ahead = 2;
  int64_t p = p0;
  while (p < p1) {
    const int64_t rel = p - first_pos, j = rel / bs;
    const T* block = cache + table[j] * block_stride + head;
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

// Calls f(i, rows, n, next) for the runs of consecutive positions p0 <= p < p1 that share a block: rows points
// at head offset `head` of the first slot of the run (later slots follow every token_stride floats), i is the
// run's first index (p - p0) and next the first slot of the following run (nullptr after the last), which f
// prefetches while it works: runs sit in scattered blocks that the hardware prefetcher does not follow.
template <typename T, typename F>
inline void for_each_run(const T* cache, const int64_t* table, int64_t first_pos, int64_t p0, int64_t p1,
                         int64_t bs, int64_t block_stride, int64_t token_stride, int64_t head, F f) {
  int64_t p = p0;
  while (p < p1) {
    const int64_t rel = p - first_pos, j = rel / bs, t = rel - j * bs;
    const int64_t n = bs - t < p1 - p ? bs - t : p1 - p;
    const T* next = p + n < p1 ? cache + table[j + 1] * block_stride + head : nullptr;
    f(p - p0, cache + table[j] * block_stride + t * token_stride + head, n, next);
    p += n;
  }
}

// acc[g][:] += sum_t w[g][i0 + t] * rows[t][:] for GN heads (g stride D in acc, L in w): column tiles of two
// vectors, the 2 * GN accumulators of a tile stay in registers across the run.
template <int GN, typename T>
inline void accumulate_run(float* acc, const float* w, int64_t L, int64_t i0, const T* rows,
                           int64_t stride, int64_t n, int64_t D, const T* next) {
  int64_t d = 0;
  for (; d + 2 * kW <= D; d += 2 * kW) {
    if (next != nullptr) {  // the same lines of the next run's rows (as many rows as this run: a guess)
      for (int64_t t = 0; t < n; ++t) prefetch(next + t * stride + d, 2 * kW);
    }
    vw a[GN], b[GN];
    for (int g = 0; g < GN; ++g) {
      a[g] = loadw(acc + g * D + d);
      b[g] = loadw(acc + g * D + d + kW);
    }
    for (int64_t t = 0; t < n; ++t) {
      const vw v0 = loadw(rows + t * stride + d), v1 = loadw(rows + t * stride + d + kW);
      for (int g = 0; g < GN; ++g) {
        const vw wv = w[g * L + i0 + t] - vw{};  // a broadcast (x + 0 is not x for -0: a real add)
        a[g] += wv * v0;
        b[g] += wv * v1;
      }
    }
    for (int g = 0; g < GN; ++g) {
      storew(acc + g * D + d, a[g]);
      storew(acc + g * D + d + kW, b[g]);
    }
  }
  for (; d < D; ++d) {
    for (int64_t t = 0; t < n; ++t) {
      for (int g = 0; g < GN; ++g) acc[g * D + d] += w[g * L + i0 + t] * to_f32(rows[t * stride + d]);
    }
  }
}

// s[g * L + i] = scale * dot(q[g], k) for GN query heads sharing one key row: each key vector is loaded once
// for all of them, two accumulators per head.
template <int GN, typename T>
inline void score_heads(float* s, int64_t L, int64_t i, const float* q, const T* k, int64_t D, float scale) {
  vw a[GN], b[GN];
  for (int g = 0; g < GN; ++g) a[g] = b[g] = vw{};
  int64_t d = 0;
  for (; d + 2 * kW <= D; d += 2 * kW) {
    const vw k0 = loadw(k + d), k1 = loadw(k + d + kW);
    for (int g = 0; g < GN; ++g) {
      a[g] += loadw(q + g * D + d) * k0;
      b[g] += loadw(q + g * D + d + kW) * k1;
    }
  }
  for (int g = 0; g < GN; ++g) {
    float r = hsumw(a[g] + b[g]);
    for (int64_t e = d; e < D; ++e) r += q[g * D + e] * to_f32(k[e]);
    s[g * L + i] = r * scale;
  }
}

template <typename T>
inline void score_all_heads(float* s, int64_t L, int64_t G, int64_t i, const float* q, const T* k, int64_t D,
                            float scale) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) score_heads<4>(s + g * L, L, i, q + g * D, k, D, scale);
  switch (G - g) {
    case 3: score_heads<3>(s + g * L, L, i, q + g * D, k, D, scale); break;
    case 2: score_heads<2>(s + g * L, L, i, q + g * D, k, D, scale); break;
    case 1: score_heads<1>(s + g * L, L, i, q + g * D, k, D, scale); break;
    default: break;
  }
}

template <typename T>
inline void accumulate_heads(float* acc, const float* w, int64_t L, int64_t G, int64_t i0, const T* rows,
                             int64_t stride, int64_t n, int64_t D, const T* next) {
  int64_t g = 0;
  for (; g + 4 <= G; g += 4, next = nullptr)  // prefetch once, with the first group of heads
    accumulate_run<4>(acc + g * D, w + g * L, L, i0, rows, stride, n, D, next);
  switch (G - g) {
    case 3: accumulate_run<3>(acc + g * D, w + g * L, L, i0, rows, stride, n, D, next); break;
    case 2: accumulate_run<2>(acc + g * D, w + g * L, L, i0, rows, stride, n, D, next); break;
    case 1: accumulate_run<1>(acc + g * D, w + g * L, L, i0, rows, stride, n, D, next); break;
    default: break;
  }
}

// s[r * L + i0 + c] = scale * dot(q[r], k[c]) for QN query vectors (D apart) and KN key rows (stride apart):
// QN * KN accumulators, each key and query vector loaded once per tile (4 x 3: 12 accumulators, 7 loads per
// 12 FMAs; one query against one key at a time would load twice per FMA).
template <int QN, int KN, typename T>
inline void score_tile(float* s, int64_t L, int64_t i0, const float* q, const T* k, int64_t stride, int64_t D,
                       float scale) {
  vw a[QN][KN];
  for (int r = 0; r < QN; ++r)
    for (int c = 0; c < KN; ++c) a[r][c] = vw{};
  int64_t d = 0;
  for (; d + kW <= D; d += kW) {
    vw kv[KN];
    for (int c = 0; c < KN; ++c) kv[c] = loadw(k + c * stride + d);
    for (int r = 0; r < QN; ++r) {
      const vw qv = loadw(q + r * D + d);
      for (int c = 0; c < KN; ++c) a[r][c] += qv * kv[c];
    }
  }
  for (int r = 0; r < QN; ++r) {
    for (int c = 0; c < KN; ++c) {
      float x = hsumw(a[r][c]);
      for (int64_t e = d; e < D; ++e) x += q[r * D + e] * to_f32(k[c * stride + e]);
      s[r * L + i0 + c] = x * scale;
    }
  }
}

// Scores of R query vectors against the n keys of one run (rows stride apart, i0 the run's first index):
// key triples in the outer loop, so three rows stay in L1 while every query passes over them; the same rows
// of the next run are prefetched meanwhile.
template <int KN, typename T>
inline void score_keys(float* s, int64_t L, int64_t R, int64_t i0, const float* q, const T* k, int64_t stride,
                       int64_t D, float scale) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) score_tile<4, KN>(s + r * L, L, i0, q + r * D, k, stride, D, scale);
  for (; r < R; ++r) score_tile<1, KN>(s + r * L, L, i0, q + r * D, k, stride, D, scale);
}

template <typename T>
inline void score_run(float* s, int64_t L, int64_t R, int64_t i0, const float* q, const T* rows, int64_t stride,
                      int64_t n, int64_t D, float scale, const T* next) {
  int64_t t = 0;
  for (; t + 3 <= n; t += 3) {
    if (next != nullptr) {
      for (int64_t c = t; c < t + 3; ++c) prefetch(next + c * stride, D);
    }
    score_keys<3>(s, L, R, i0 + t, q, rows + t * stride, stride, D, scale);
  }
  for (; t < n; ++t) {
    if (next != nullptr) prefetch(next + t * stride, D);
    score_keys<1>(s, L, R, i0 + t, q, rows + t * stride, stride, D, scale);
  }
}

// Zero row[0:a) and row[e:L) and softmax row[a:e) in place: one query's weights over the sequence's key range
// (a query sees only part of it: causal among the step's new tokens, and its own sliding window).
inline void softmax_span(float* row, int64_t L, int64_t a, int64_t e) {
  a = a < 0 ? 0 : a;
  e = e > L ? L : e;
  if (e <= a) {
    for (int64_t i = 0; i < L; ++i) row[i] = 0.f;
    return;
  }
  for (int64_t i = 0; i < a; ++i) row[i] = 0.f;
  softmax_inplace(row + a, e - a);
  for (int64_t i = e; i < L; ++i) row[i] = 0.f;
}

template <typename T>
void decode_attention(const float* q, const T* k_cache, const T* v_cache, const int64_t* blocks,
                      int64_t nb, const int64_t* first_pos, const int64_t* q_start, const int64_t* lo,
                      const int64_t* ctx, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale,
                      float* out, int num_threads) {
  const int64_t G = Hq / Hkv;
  const int64_t token_stride = Hkv * D;  // floats between consecutive slots of one block
  const int64_t block_stride = bs * token_stride;
#pragma omp parallel num_threads(num_threads)
  {
    std::vector<float> scores, qbuf;
    std::vector<float> acc(G * D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * Hkv; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv;
      const int64_t r0 = q_start != nullptr ? q_start[b] : b;
      const int64_t n = q_start != nullptr ? q_start[b + 1] - r0 : 1;
      if (n <= 0) continue;
      // The key range of all n queries: each K/V row is read from memory once for every query of the sequence.
      int64_t p0 = lo[r0], p1 = ctx[r0];
      for (int64_t j = 1; j < n; ++j) {
        p0 = lo[r0 + j] < p0 ? lo[r0 + j] : p0;
        p1 = ctx[r0 + j] > p1 ? ctx[r0 + j] : p1;
      }
      const int64_t L = p1 - p0, R = n * G;  // R query vectors: row j * G + g is query j, head h * G + g
      if (L <= 0) {
        for (int64_t j = 0; j < n; ++j)
          for (int64_t i = 0; i < G * D; ++i) out[((r0 + j) * Hq + h * G) * D + i] = 0.f;
        continue;
      }
      const float* qb = q + (r0 * Hq + h * G) * D;
      if (n > 1) {  // gather the group's heads of every query into one [R, D] block
        qbuf.resize(R * D);
        for (int64_t j = 0; j < n; ++j)
          std::memcpy(qbuf.data() + j * G * D, q + ((r0 + j) * Hq + h * G) * D, G * D * sizeof(float));
        qb = qbuf.data();
        acc.resize(R * D);
      }
      scores.resize(R * L);
      const int64_t* table = blocks + b * nb;
      if (n == 1) {
        for_each_slot(k_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D, D,
                      [&](int64_t i, const T* k) { score_all_heads(scores.data(), L, G, i, qb, k, D, scale); });
        for (int64_t g = 0; g < G; ++g) softmax_inplace(scores.data() + g * L, L);
      } else {
        for_each_run(k_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D,
                     [&](int64_t i, const T* rows, int64_t cnt, const T* next) {
                       score_run(scores.data(), L, R, i, qb, rows, token_stride, cnt, D, scale, next);
                     });
        for (int64_t j = 0; j < n; ++j)
          for (int64_t g = 0; g < G; ++g)
            softmax_span(scores.data() + (j * G + g) * L, L, lo[r0 + j] - p0, ctx[r0 + j] - p0);
      }
      for (int64_t i = 0; i < R * D; ++i) acc[i] = 0.f;
      for_each_run(v_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D,
                   [&](int64_t i, const T* rows, int64_t cnt, const T* next) {
                     accumulate_heads(acc.data(), scores.data(), L, R, i, rows, token_stride, cnt, D, next);
                   });
      for (int64_t j = 0; j < n; ++j)
        std::memcpy(out + ((r0 + j) * Hq + h * G) * D, acc.data() + j * G * D, G * D * sizeof(float));
    }
  }
}

// rms_norm_rows: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for rows of n elements (row strides ldx, ldo),
// in float32 whatever T is. w already includes any offset (Gemma stores weight - 1). round_first (bf16 Llama
// style, `w * x_normed.to(bf16)`) rounds the normalised value to T before the weight multiplies it; Gemma
// multiplies in float32 first. One read of x, one write of out, per row.
template <typename T>
void rms_norm_rows(const T* x, const float* w, int64_t rows, int64_t n, int64_t ldx, int64_t ldo, float eps,
                   int round_first, T* out, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * ldx;
    T* orow = out + r * ldo;
    vw s0 = {}, s1 = {};
    int64_t i = 0;
    for (; i + 2 * kW <= n; i += 2 * kW) {
      const vw a = loadw(xr + i), b = loadw(xr + i + kW);
      s0 += a * a;
      s1 += b * b;
    }
    for (; i + kW <= n; i += kW) {
      const vw a = loadw(xr + i);
      s0 += a * a;
    }
    float ss = hsumw(s0 + s1);
    for (; i < n; ++i) ss += to_f32(xr[i]) * to_f32(xr[i]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (i = 0; i + kW <= n; i += kW) {
      vw v = loadw(xr + i) * inv;
      if (round_first) {
        storew(orow + i, v);
        v = loadw(orow + i);
      }
      storew(orow + i, v * loadw(w + i));
    }
    for (; i < n; ++i) {
      float v = to_f32(xr[i]) * inv;
      if (round_first) {
        store_f32(orow + i, v);
        v = to_f32(orow[i]);
      }
      store_f32(orow + i, v * w[i]);
    }
  }
}

// gelu_and_mul_rows: x [rows, 2n] = [gate | up] (row stride ldx) -> out [rows, n] = gelu_tanh(gate) * up,
// in float32; for bf16 the gelu is rounded to bf16 before the product, as torch's two bf16 ops do.
template <typename T>
void gelu_and_mul_rows(const T* x, int64_t rows, int64_t n, int64_t ldx, T* out, int num_threads) {
  constexpr int kParts = kW / 8;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows * n > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = x + r * ldx;
    const T* u = g + n;
    T* o = out + r * n;
    int64_t i = 0;
    for (; i + kW <= n; i += kW) {
      const vw gv = loadw(g + i);
      v8f parts[kParts];
      std::memcpy(parts, &gv, sizeof(gv));
      for (int j = 0; j < kParts; ++j) parts[j] = gelu_tanh8(parts[j]);
      vw act;
      std::memcpy(&act, parts, sizeof(act));
      storew(o + i, act);  // rounds to T (a no-op for float32) ...
      storew(o + i, loadw(o + i) * loadw(u + i));  // ... before the product, like torch
    }
    for (; i < n; ++i) {
      store_f32(o + i, gelu_tanh1(to_f32(g[i])));
      store_f32(o + i, to_f32(o[i]) * to_f32(u[i]));
    }
  }
}

}  // namespace

extern "C" {

int tokenmill_kernels_abi_version() { return 5; }

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
