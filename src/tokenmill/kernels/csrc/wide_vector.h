// The widest float vector the build targets (GCC/Clang vector extension): 16 floats with AVX-512, else 8
// (AVX2, or two NEON registers). Shared by the decode attention loops and the panel GEMM.
#pragma once

#include <cstring>

namespace tokenmill {

#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vw __attribute__((vector_size(kW * 4)));

inline vw loadw(const float* p) {
  vw v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void storew(float* p, vw v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace tokenmill
