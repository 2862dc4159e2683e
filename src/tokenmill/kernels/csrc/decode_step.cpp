// decode_step_*: every decoder layer of a decode step in one call and one parallel region, for models whose
// linear layers all hold GGUF blocks (the int8 product of quant_int8.h). The same step through the Python layers
// is ~10 native calls per layer (norm, q/k/v, RoPE, K/V write, attention, o, residual, gate/up, activation,
// down): on a small model each call's dispatch, checks and thread start cost about as much as its arithmetic.
// Here the threads stay in one region and meet at a barrier between the stages of each layer.
//
// Per layer, on T rows x [T, n] (T <= 32, layers/quantized.py INT8_MAX_ROWS: one query per sequence, or 1 + k
// when k drafts are verified), in place:
//   h = rms_norm(x; w_in)                                   (quantized to 8 bits once for q/k/v)
//   qkv = h @ Wqkv.T; q, k normed per head (w_q / w_k, optional), RoPE with the layer's cos / ssin table
//   K/V written at the layer group's slots; attention over the group's blocks (decode_attention.h)
//   o = attn @ Wo.T
//   x += rms_norm(o; w_attn_out) (Gemma's sandwich norm), or x += o (w_attn_out null: Llama)
//   h = rms_norm(x; w_ffn_in); a = act(h @ Wgate.T) * (h @ Wup.T)  (act: gelu_tanh or silu)
//   d = a @ Wdown.T; x += rms_norm(d; w_ffn_out), or x += d
// Every stage calls the row functions the per-layer native calls use (rms_norm_row, quantize_row_q8, int8_part,
// rope_head, write_kv_rows, attend_item, gelu_and_mul_row) in the same order per row, so the result equals the
// layer-by-layer path bit for bit (tests/model/test_decode_step.py); silu, which the layer path computes with
// torch, agrees within float32 rounding.

#include <cstdint>
#include <vector>

#include "decode_attention.h"
#include "decode_ops.h"
#include "quant_int8.h"
#include "vec_math.h"

namespace {

struct StepLinear {  // a LinearPlan's C arrays (kernels/quant_kernels.py)
  int64_t nparts;
  const int* types;
  const int64_t* weights;
  const int64_t* rows;
  const int64_t* row_bytes;
  const int64_t* cols;
  int64_t k, width;
};

struct StepLayer {
  StepLinear qkv, o, gate_up, down;
  const float *w_in, *w_attn_out, *w_ffn_in, *w_ffn_out, *w_q, *w_k;
  void *k_cache, *v_cache;
  int64_t group, rope;
  float scale;
};

struct StepGroup {  // one KV cache group's decode metadata (kernels/metadata.py FastPlan)
  const int64_t *slots, *blocks;
  int64_t nb;
  const int64_t *first_pos, *q_start, *lo, *ctx;  // q_start [B + 1] or null (one row per sequence)
  int64_t B, num_slots;
};

struct StepShape {
  int64_t T, n, hq, hkv, d, inter, bs, act;  // act: 0 gelu_tanh, 1 silu
  float eps;
  const float* cos[2];  // [T, d] per RoPE table
  const float* ssin[2];
  // scratch: h [T, n], qkv [T, (hq + 2 hkv) d], attn [T, hq d], o [T, n], gu [T, 2 inter], a [T, inter],
  // q8 [T, kmax], qd / qs [T, kmax / 32]
  float *h, *qkv, *attn, *o, *gu, *a;
  int8_t* q8;
  float *qd, *qs;
};

// This thread's share of c = acts @ W.T for every part of the linear (callers put a barrier after it).
void linear_share(const StepLinear& L, const Acts& acts, int64_t m, float* c) {
  for (int64_t i = 0; i < L.nparts; ++i) {
    int64_t n0, n1;
    thread_share(L.rows[i], n0, n1, L.types[i]);
    dispatch<PartOp>(L.types[i], acts, m, reinterpret_cast<const uint8_t*>(L.weights[i]), L.row_bytes[i], n0, n1,
                     c + L.cols[i], L.width);
  }
}

bool check_linear(const StepLinear& L) {
  for (int64_t i = 0; i < L.nparts; ++i)
    if (dispatch<NoOp>(L.types[i]) != 0) return false;
  return true;
}

// The residual add of one sublayer's output y on a row of x: x += rms_norm(y; w) (Gemma's norm of the output, into
// z), or x += y when w is null.
inline void add_sublayer(float* x, const float* y, const float* w, int64_t n, float eps, float* z) {
  if (w != nullptr) {
    rms_norm_row(y, w, n, eps, 0, z);
    y = z;
  }
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + y[i];
}

inline void quantize_row(const StepShape& s, int64_t r, const float* x, int64_t k) {
  quantize_row_q8(x, k, s.q8 + r * k, s.qd + r * (k / 32), s.qs + r * (k / 32));
}

template <typename C>
int run_step(const StepShape& s, const StepLayer* layers, int64_t nlayers, const StepGroup* groups, float* x,
             int num_threads) {
  for (int64_t l = 0; l < nlayers; ++l) {
    const StepLayer& L = layers[l];
    if (!check_linear(L.qkv) || !check_linear(L.o) || !check_linear(L.gate_up) || !check_linear(L.down)) return -1;
    const StepGroup& g = groups[L.group];
    for (int64_t t = 0; t < s.T; ++t)
      if (g.slots[t] < 0 || g.slots[t] >= g.num_slots) return -2;
  }
  const int64_t T = s.T, n = s.n, D = s.d, hq = s.hq, hkv = s.hkv, qkv_w = (hq + 2 * hkv) * D;
#pragma omp parallel num_threads(num_threads)
  {
    AttendScratch sc;
    std::vector<float> z(static_cast<size_t>(n > D ? n : D));
    for (int64_t l = 0; l < nlayers; ++l) {
      const StepLayer& L = layers[l];
      const StepGroup& g = groups[L.group];
      // input norm, quantized once for q/k/v
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) {
        rms_norm_row(x + r * n, L.w_in, n, s.eps, 0, s.h + r * n);
        quantize_row(s, r, s.h + r * n, n);
      }
      linear_share(L.qkv, Acts{s.q8, s.qd, s.qs, n}, T, s.qkv);
#pragma omp barrier
      // q / k norm + RoPE in place, then this row's K and V into the cache
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) {
        float* row = s.qkv + r * qkv_w;
        for (int64_t h = 0; h < hq + hkv; ++h) {
          const float* w = h < hq ? L.w_q : L.w_k;
          if (w != nullptr) rms_norm_row(row + h * D, w, D, s.eps, 0, row + h * D);
          rope_head(row + h * D, s.cos[L.rope] + r * D, s.ssin[L.rope] + r * D, D, z.data());
        }
        write_kv_rows(row + hq * D, row + (hq + hkv) * D, 1, qkv_w, qkv_w, hkv * D, g.slots + r, g.num_slots,
                      static_cast<C*>(L.k_cache), static_cast<C*>(L.v_cache));
      }
      const int64_t split = head_split(g.B, hkv, hq / hkv, num_threads);
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < g.B * hkv * split; ++item)
        attend_split_item(item, split, s.qkv, static_cast<const C*>(L.k_cache), static_cast<const C*>(L.v_cache),
                          g.blocks, g.nb, g.first_pos, g.q_start, g.lo, g.ctx, hq, hkv, D, s.bs, L.scale, s.attn, sc,
                          qkv_w);
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) quantize_row(s, r, s.attn + r * hq * D, hq * D);
      linear_share(L.o, Acts{s.q8, s.qd, s.qs, hq * D}, T, s.o);
#pragma omp barrier
      // residual, then the MLP's input norm, quantized once for gate / up
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) {
        float* xr = x + r * n;
        add_sublayer(xr, s.o + r * n, L.w_attn_out, n, s.eps, z.data());
        rms_norm_row(xr, L.w_ffn_in, n, s.eps, 0, s.h + r * n);
        quantize_row(s, r, s.h + r * n, n);
      }
      linear_share(L.gate_up, Acts{s.q8, s.qd, s.qs, n}, T, s.gu);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) {
        const float* gu = s.gu + r * 2 * s.inter;
        float* a = s.a + r * s.inter;
        if (s.act == 0)
          gelu_and_mul_row(gu, gu + s.inter, s.inter, a);
        else
          silu_and_mul_row(gu, gu + s.inter, s.inter, a);
        quantize_row(s, r, a, s.inter);
      }
      linear_share(L.down, Acts{s.q8, s.qd, s.qs, s.inter}, T, s.o);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t r = 0; r < T; ++r) add_sublayer(x + r * n, s.o + r * n, L.w_ffn_out, n, s.eps, z.data());
    }
  }
  return 0;
}

}  // namespace

extern "C" {

// Returns 0; -1 for a block type without a kernel, -2 for a slot outside its cache (nothing run in either case).
int decode_step_f32(const StepShape* s, const StepLayer* layers, int64_t nlayers, const StepGroup* groups, float* x,
                    int num_threads) {
  return run_step<float>(*s, layers, nlayers, groups, x, num_threads);
}

int decode_step_f32_bf16kv(const StepShape* s, const StepLayer* layers, int64_t nlayers, const StepGroup* groups,
                           float* x, int num_threads) {
  return run_step<bf16>(*s, layers, nlayers, groups, x, num_threads);
}

}  // extern "C"
