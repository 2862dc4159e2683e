// Vector helpers shared by the native kernels of cpu_kernels.cpp and decode_ops.cpp: 8-float vectors, horizontal
// sums, exp, gelu(tanh), softmax and one row of RMSNorm (float32 arithmetic in every variant).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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

// rms_norm_row: out = x / sqrt(mean(x^2) + eps) * w over n elements, in float32 whatever T is (out may be x).
// w already includes any offset (Gemma stores weight - 1). round_first (bf16 Llama style,
// `w * x_normed.to(bf16)`) rounds the normalised value to T before the weight multiplies it; Gemma multiplies
// in float32 first. One read of x, one write of out.
template <typename T>
inline void rms_norm_row(const T* xr, const float* w, int64_t n, float eps, int round_first, T* orow) {
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
  for (; i < n; ++i) ss += tokenmill::to_f32(xr[i]) * tokenmill::to_f32(xr[i]);
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
    float v = tokenmill::to_f32(xr[i]) * inv;
    if (round_first) {
      tokenmill::store_f32(orow + i, v);
      v = tokenmill::to_f32(orow[i]);
    }
    tokenmill::store_f32(orow + i, v * w[i]);
  }
}

// gelu_and_mul_row: o[i] = gelu_tanh(g[i]) * u[i] over n elements, in float32; for bf16 the gelu is rounded to
// bf16 before the product, as torch's two bf16 ops do.
template <typename T>
inline void gelu_and_mul_row(const T* g, const T* u, int64_t n, T* o) {
  constexpr int kParts = kW / 8;
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
    tokenmill::store_f32(o + i, gelu_tanh1(tokenmill::to_f32(g[i])));
    tokenmill::store_f32(o + i, tokenmill::to_f32(o[i]) * tokenmill::to_f32(u[i]));
  }
}

// silu_and_mul_row (float32): o[i] = g[i] / (1 + exp(-g[i])) * u[i] (exp8: within about an ulp of torch's silu,
// not bit-identical to it).
inline void silu_and_mul_row(const float* g, const float* u, int64_t n, float* o) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const v8f x = load8(g + i);
    store8(o + i, x / (splat(1.f) + exp8(-x)) * load8(u + i));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

}  // namespace
