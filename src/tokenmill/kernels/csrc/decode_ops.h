// Row steps shared by decode_ops.cpp (one call each) and decode_step.cpp (a whole decode step): RoPE of one head
// and the K/V cache write (formulas at the top of decode_ops.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vec_math.h"
#include "wide_vector.h"

namespace {

using tokenmill::store_f32;
using tokenmill::to_f32;

void rope_head(float* h, const float* c, const float* s, int64_t d, float* tmp) {
  std::memcpy(tmp, h, sizeof(float) * d);
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) h[i] = tmp[i] * c[i] + tmp[i + half] * s[i];
  for (int64_t i = half; i < d; ++i) h[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
}

// Returns -1, having written nothing, when a slot is outside [0, num_slots).
template <typename S, typename C>
int write_kv_rows(const S* k, const S* v, int64_t T, int64_t ldk, int64_t ldv, int64_t width, const int64_t* slots,
                  int64_t num_slots, C* k_cache, C* v_cache) {
  for (int64_t t = 0; t < T; ++t)
    if (slots[t] < 0 || slots[t] >= num_slots) return -1;
  for (int64_t t = 0; t < T; ++t) {
    C* kc = k_cache + slots[t] * width;
    C* vc = v_cache + slots[t] * width;
    if constexpr (std::is_same_v<S, C>) {
      std::memcpy(kc, k + t * ldk, sizeof(C) * width);
      std::memcpy(vc, v + t * ldv, sizeof(C) * width);
    } else {
      for (int64_t i = 0; i < width; ++i) {
        store_f32(kc + i, to_f32(k[t * ldk + i]));
        store_f32(vc + i, to_f32(v[t * ldv + i]));
      }
    }
  }
  return 0;
}

}  // namespace
