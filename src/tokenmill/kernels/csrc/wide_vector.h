// The widest float vector the build targets (GCC/Clang vector extension): 16 floats with AVX-512, else 8
// (AVX2, SSE pairs on baseline x86-64, or two NEON registers). Shared by the decode attention loops and the
// panel GEMM. loadw / storew are overloaded for bf16 (stored as uint16_t): a bf16 load widens to float32
// (exact: bf16 is the top half of a float32), a bf16 store rounds to nearest even like torch's
// `.to(torch.bfloat16)` (NaN -> 0x7fc0), so kernels templated on the element type compute in float32.
#pragma once

#include <cstdint>
#include <cstring>

namespace tokenmill {

#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vw __attribute__((vector_size(kW * 4)));
typedef uint32_t vwu __attribute__((vector_size(kW * 4)));
typedef uint16_t vwh __attribute__((vector_size(kW * 2)));
typedef uint16_t bf16;

inline vw loadw(const float* p) {
  vw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storew(float* p, vw v) { std::memcpy(p, &v, sizeof(v)); }

inline vw loadw(const bf16* p) {
  vwh h;
  std::memcpy(&h, p, sizeof(h));
  const vwu u = __builtin_convertvector(h, vwu) << 16;
  vw v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

inline void storew(bf16* p, vw v) {
  vwu u;
  std::memcpy(&u, &v, sizeof(u));
  u = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  u = v != v ? vwu{} + 0x7fc0u : u;  // NaN stays a (quiet) NaN
  const vwh h = __builtin_convertvector(u, vwh);
  std::memcpy(p, &h, sizeof(h));
}

inline float to_f32(float x) { return x; }

inline float to_f32(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline void store_f32(float* p, float x) { *p = x; }

inline void store_f32(bf16* p, float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  *p = x != x ? bf16{0x7fc0} : static_cast<bf16>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Ask for the n elements at p ahead of use (one prefetch per 64-byte line).
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(p + i);
}

}  // namespace tokenmill
