// decode_attention: a few query tokens per sequence over its paged K/V cache (layouts and method at the
// top of cpu_kernels.cpp, which exports it as decode_attention_f32 / _bf16).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "vec_math.h"
#include "wide_vector.h"

namespace {

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

// Scratch one thread reuses across attend_item calls.
struct AttendScratch {
  std::vector<float> scores, qbuf, acc;
};

// One work item of decode_attention (q rows ldq floats apart, out rows Hq * D): sequence b, the gn query heads
// g0 .. g0 + gn - 1 of kv head h's group (G heads), for all the sequence's queries. Each head's arithmetic is
// the same whichever heads share the item.
template <typename T>
void attend_item(const float* q, const T* k_cache, const T* v_cache, const int64_t* blocks, int64_t nb,
                 const int64_t* first_pos, const int64_t* q_start, const int64_t* lo, const int64_t* ctx, int64_t b,
                 int64_t h, int64_t g0, int64_t gn, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale,
                 float* out, AttendScratch& sc, int64_t ldq) {
  const int64_t token_stride = Hkv * D;  // floats between consecutive slots of one block
  const int64_t block_stride = bs * token_stride;
  const int64_t head0 = h * (Hq / Hkv) + g0;  // first query head of the item
  const int64_t r0 = q_start != nullptr ? q_start[b] : b;
  const int64_t n = q_start != nullptr ? q_start[b + 1] - r0 : 1;
  if (n <= 0) return;
  // The key range of all n queries: each K/V row is read from memory once for every query of the sequence.
  int64_t p0 = lo[r0], p1 = ctx[r0];
  for (int64_t j = 1; j < n; ++j) {
    p0 = lo[r0 + j] < p0 ? lo[r0 + j] : p0;
    p1 = ctx[r0 + j] > p1 ? ctx[r0 + j] : p1;
  }
  const int64_t L = p1 - p0, R = n * gn;  // R query vectors: row j * gn + g is query j, head head0 + g
  if (L <= 0) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t i = 0; i < gn * D; ++i) out[((r0 + j) * Hq + head0) * D + i] = 0.f;
    return;
  }
  const float* qb = q + r0 * ldq + head0 * D;
  if (n > 1) {  // gather the item's heads of every query into one [R, D] block
    sc.qbuf.resize(R * D);
    for (int64_t j = 0; j < n; ++j)
      std::memcpy(sc.qbuf.data() + j * gn * D, q + (r0 + j) * ldq + head0 * D, gn * D * sizeof(float));
    qb = sc.qbuf.data();
  }
  sc.acc.resize(R * D);
  sc.scores.resize(R * L);
  float* scores = sc.scores.data();
  const int64_t* table = blocks + b * nb;
  if (n == 1) {
    for_each_slot(k_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D, D,
                  [&](int64_t i, const T* k) { score_all_heads(scores, L, gn, i, qb, k, D, scale); });
    for (int64_t g = 0; g < gn; ++g) softmax_inplace(scores + g * L, L);
  } else {
    for_each_run(k_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D,
                 [&](int64_t i, const T* rows, int64_t cnt, const T* next) {
                   score_run(scores, L, R, i, qb, rows, token_stride, cnt, D, scale, next);
                 });
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < gn; ++g)
        softmax_span(scores + (j * gn + g) * L, L, lo[r0 + j] - p0, ctx[r0 + j] - p0);
  }
  float* acc = sc.acc.data();
  for (int64_t i = 0; i < R * D; ++i) acc[i] = 0.f;
  for_each_run(v_cache, table, first_pos[b], p0, p1, bs, block_stride, token_stride, h * D,
               [&](int64_t i, const T* rows, int64_t cnt, const T* next) {
                 accumulate_heads(acc, scores, L, R, i, rows, token_stride, cnt, D, next);
               });
  for (int64_t j = 0; j < n; ++j)
    std::memcpy(out + ((r0 + j) * Hq + head0) * D, acc + j * gn * D, gn * D * sizeof(float));
}

// How many parts to split each kv head's group of G query heads into, so that B * Hkv items keep `threads` busy
// (one sequence of a model with one kv head was one item: one thread attended while the others waited).
inline int64_t head_split(int64_t B, int64_t Hkv, int64_t G, int threads) {
  const int64_t items = B * Hkv;
  if (items >= threads) return 1;
  const int64_t want = (threads + items - 1) / items;
  return want < G ? want : G;
}

// Calls attend_item for work item `item` of B * Hkv * split (split from head_split).
template <typename T>
inline void attend_split_item(int64_t item, int64_t split, const float* q, const T* k_cache, const T* v_cache,
                              const int64_t* blocks, int64_t nb, const int64_t* first_pos, const int64_t* q_start,
                              const int64_t* lo, const int64_t* ctx, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs,
                              float scale, float* out, AttendScratch& sc, int64_t ldq) {
  const int64_t G = Hq / Hkv, per = (G + split - 1) / split;
  const int64_t part = item % split, bh = item / split, g0 = part * per;
  const int64_t gn = g0 + per < G ? per : G - g0;
  if (gn > 0)
    attend_item(q, k_cache, v_cache, blocks, nb, first_pos, q_start, lo, ctx, bh / Hkv, bh % Hkv, g0, gn, Hq, Hkv,
                D, bs, scale, out, sc, ldq);
}

template <typename T>
void decode_attention(const float* q, const T* k_cache, const T* v_cache, const int64_t* blocks,
                      int64_t nb, const int64_t* first_pos, const int64_t* q_start, const int64_t* lo,
                      const int64_t* ctx, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale,
                      float* out, int num_threads) {
  const int64_t split = head_split(B, Hkv, Hq / Hkv, num_threads);
#pragma omp parallel num_threads(num_threads)
  {
    AttendScratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < B * Hkv * split; ++item)
      attend_split_item(item, split, q, k_cache, v_cache, blocks, nb, first_pos, q_start, lo, ctx, Hq, Hkv, D, bs,
                        scale, out, sc, Hq * D);
  }
}
}  // namespace
