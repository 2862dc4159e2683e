// Small per-layer steps of a decode, each one native call instead of several PyTorch ops. A decode step of a
// small model is a few hundred such steps on one or a few token rows; in PyTorch each op costs ~1.5-3 us of
// dispatch for well under a microsecond of arithmetic, so a layer spent more time in dispatch than in its
// matrix products.
//
// qk_norm_rope_f32: in place on the q and k heads of a fused projection output x [T, ldx] (heads of d floats,
// hq query heads then hk key heads, side by side from column 0): optionally RMSNorm each head (wq for query
// heads, wk for key heads, weights already holding any offset; none for Llama / Qwen2), then rotate it with
// RoPE in the rotate-half (GPT-NeoX) layout:
//   out[i] = x[i] * cos[i] + x[(i + d/2) % d] * ssin[i],  ssin = [-sin[:d/2], sin[d/2:]]
// with cos / ssin [T, ldcs] per row (layers/rotary.py's cos_sin). Oracle: RMSNorm then RotaryEmbedding in
// PyTorch (tests/model/test_decode_ops.py).
//
// add_rms_norm_f32: Gemma's sandwich-norm residual, out[r] = x[r] + rms_norm(y[r]; w), and with w_next also
// normed[r] = rms_norm(out[r]; w_next) (the next sublayer's input norm), in one pass over the rows instead of
// two norms and an add (oracle: RMSNorm and + in PyTorch; the same float32 roundings, so the same values).
//
// write_kv_*: store this step's K and V rows [T, Hkv * D] (row strides ldk, ldv) at flat cache slots
// (block_id * block_size + offset) of [N, block_size, Hkv, D] caches, converting float32 <-> bf16 as
// torch's .to() does (reference: kernels/reference.py write_kv); -1 and nothing written when a slot is out of range.

#include <cstdint>
#include <vector>

#include "decode_ops.h"

extern "C" {

void qk_norm_rope_f32(float* x, int64_t T, int64_t ldx, int64_t hq, int64_t hk, int64_t d, const float* wq,
                      const float* wk, float eps, const float* cos, const float* ssin, int64_t ldcs, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (T * (hq + hk) * d > 65536)
  {
    std::vector<float> tmp(static_cast<size_t>(d));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < hq + hk; ++h) {
        float* head = x + t * ldx + h * d;
        const float* w = h < hq ? wq : wk;
        if (w != nullptr) rms_norm_row(head, w, d, eps, 0, head);
        rope_head(head, cos + t * ldcs, ssin + t * ldcs, d, tmp.data());
      }
  }
}

void add_rms_norm_f32(const float* x, const float* y, int64_t rows, int64_t n, const float* w, const float* w_next,
                      float eps, float* out, float* normed, int num_threads) {
#pragma omp parallel num_threads(num_threads) if (rows * n > 65536)
  {
    std::vector<float> z(static_cast<size_t>(n));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      rms_norm_row(y + r * n, w, n, eps, 0, z.data());
      for (int64_t i = 0; i < n; ++i) out[r * n + i] = x[r * n + i] + z[i];
      if (w_next != nullptr) rms_norm_row(out + r * n, w_next, n, eps, 0, normed + r * n);
    }
  }
}

int write_kv_f32(const float* k, const float* v, int64_t T, int64_t ldk, int64_t ldv, int64_t width,
                 const int64_t* slots, int64_t num_slots, float* k_cache, float* v_cache) {
  return write_kv_rows(k, v, T, ldk, ldv, width, slots, num_slots, k_cache, v_cache);
}

int write_kv_f32_to_bf16(const float* k, const float* v, int64_t T, int64_t ldk, int64_t ldv, int64_t width,
                         const int64_t* slots, int64_t num_slots, bf16* k_cache, bf16* v_cache) {
  return write_kv_rows(k, v, T, ldk, ldv, width, slots, num_slots, k_cache, v_cache);
}

int write_kv_bf16(const bf16* k, const bf16* v, int64_t T, int64_t ldk, int64_t ldv, int64_t width,
                  const int64_t* slots, int64_t num_slots, bf16* k_cache, bf16* v_cache) {
  return write_kv_rows(k, v, T, ldk, ldv, width, slots, num_slots, k_cache, v_cache);
}

}  // extern "C"
