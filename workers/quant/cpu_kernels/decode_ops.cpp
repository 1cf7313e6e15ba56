// Fused float32 CPU ops for small (decode-size) steps, where eager PyTorch pays ~5-20 us of
// dispatch per tiny op and a layer runs ~30 of them. Each op reads its inputs once and writes
// its outputs once; all compute in float32, as the torch reference does (layers.py, torch_ref.py).
//   rms_norm:        (x [+ residual]) -> (normed * weight, x + residual)
//   rotary_kv:       rotate-half rope on q and k in place (cos/sin from positions * inv_freq), then
//                    k and v stored into the paged cache at slot_mapping
//   paged_attention: causal attention of each query over its request's cached context through the
//                    block table (query j of request i sits at position seq_len - query_len + j)
//   silu_mul:        [T, 2d] (gate, up) -> silu(gate) * up [T, d]
// Loops are plain C++ left to the compiler's vectoriser (-O3, baseline SSE2), except attention's
// per-query loop, which has an AVX2 + FMA variant picked at run time (attn_avx2: a verify step runs it
// for each of its 1 + k rows, ~1.2 ms a row on SmolLM2 in the plain loop). Work is split over threads with
// at::parallel_for (rows, or (request, head) pairs), so torch.set_num_threads applies.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// sum of a[i] * b[i], i < n, in 8 interleaved partial sums: the vectoriser can then use SIMD lanes
// (a single running sum is a strict float reduction it must leave scalar without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void check_f32(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.device().is_cpu(), name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dim");
}

std::vector<torch::Tensor> rms_norm(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                                    const torch::Tensor& weight, double eps) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "x [T, H] and weight [H]");
  const int64_t t_n = x.size(0), h = x.size(1);
  const bool add = residual.has_value() && residual->defined();
  if (add) {
    check_f32(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape");
  }
  auto out = torch::empty({t_n, h}, torch::kFloat32);
  torch::Tensor stream = add ? torch::empty({t_n, h}, torch::kFloat32) : torch::Tensor();
  const float* w = weight.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, t_n, std::max<int64_t>(1, 16384 / h), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* xr = x.data_ptr<float>() + t * x.stride(0);
      float* o = out.data_ptr<float>() + t * h;
      const float* src = xr;
      if (add) {
        const float* rr = residual->data_ptr<float>() + t * residual->stride(0);
        float* s = stream.data_ptr<float>() + t * h;
        for (int64_t i = 0; i < h; ++i) s[i] = xr[i] + rr[i];
        src = s;
      }
      const float ss = dot(src, src, h);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + e);
      for (int64_t i = 0; i < h; ++i) o[i] = w[i] * (src[i] * inv);
    }
  });
  return {out, stream};
}

// x [T, heads, D] (any token / head strides, unit last stride), rotated in place for token t.
void rotate_heads(float* x, int64_t heads, int64_t head_stride, int64_t half, const float* cs, const float* sn) {
  for (int64_t hh = 0; hh < heads; ++hh) {
    float* p = x + hh * head_stride;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = p[i], x2 = p[i + half];
      p[i] = x1 * cs[i] - x2 * sn[i];
      p[i + half] = x2 * cs[i] + x1 * sn[i];
    }
  }
}

void rotary_kv(torch::Tensor q, torch::Tensor k, const torch::Tensor& v, const torch::Tensor& positions,
               const torch::Tensor& inv_freq, const torch::Tensor& kv_cache, const torch::Tensor& slot_mapping) {
  check_f32(q, "q");
  check_f32(k, "k");
  check_f32(v, "v");
  check_f32(inv_freq, "inv_freq");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [T, H, D], k and v [T, Hkv, D]");
  const int64_t t_n = q.size(0), d = q.size(2), half = d / 2, hk = k.size(1);
  TORCH_CHECK(d % 2 == 0 && k.size(2) == d && inv_freq.numel() == half, "head_dim must be even, inv_freq [D/2]");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.numel() == t_n, "positions int64 [T]");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kInt64 && slot_mapping.numel() == t_n, "slot_mapping int64 [T]");
  check_f32(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.is_contiguous() && kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.size(3) == hk &&
              kv_cache.size(4) == d, "kv_cache must be contiguous [2, blocks, block_size, kv_heads, head_dim]");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2), row = hk * d;
  float* kc = kv_cache.data_ptr<float>();
  float* vc = kc + num_slots * row;
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* inv = inv_freq.data_ptr<float>();
  at::parallel_for(0, t_n, 16, [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(half), sn(half);
    for (int64_t t = t0; t < t1; ++t) {
      const float p = static_cast<float>(pos[t]);
      for (int64_t i = 0; i < half; ++i) {
        const float f = p * inv[i];
        cs[i] = std::cos(f);
        sn[i] = std::sin(f);
      }
      rotate_heads(q.data_ptr<float>() + t * q.stride(0), q.size(1), q.stride(1), half, cs.data(), sn.data());
      float* kt = k.data_ptr<float>() + t * k.stride(0);
      rotate_heads(kt, hk, k.stride(1), half, cs.data(), sn.data());
      const int64_t slot = slots[t];
      if (slot < 0) continue;  // a padding token: nothing to store
      TORCH_CHECK(slot < num_slots, "slot ", slot, " is outside the cache (", num_slots, " slots)");
      const float* vt = v.data_ptr<float>() + t * v.stride(0);
      for (int64_t hh = 0; hh < hk; ++hh) {
        std::copy_n(kt + hh * k.stride(1), d, kc + slot * row + hh * d);
        std::copy_n(vt + hh * v.stride(1), d, vc + slot * row + hh * d);
      }
    }
  });
}

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace attn_avx2 {
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 (a score minus the row's max): Cephes' expf (range reduction by ln 2 in two
// parts, degree-5 polynomial), ~1 ulp; x below -87.3 is clamped there (the result is ~1e-38, not 0).
inline __m256 exp_nonpositive(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// One query over its first n keys (d % 8 == 0): scores, softmax, weighted sum of values into dst.
// The same instructions for every query whatever the step's other rows (a verify row equals its
// batch-1 step bit for bit). scores has room for n floats.
void attend(const float* qv, const float* kc, const float* vc, const int32_t* bt, int64_t bs, int64_t row,
            int64_t off, int64_t d, int64_t n, float sc, float* scores, float* dst) {
  float mx = -INFINITY;
  for (int64_t s = 0, in_block = 0, base = bt[0] * bs; s < n; ++s, ++in_block) {
    if (in_block == bs) { in_block = 0; base = static_cast<int64_t>(bt[s / bs]) * bs; }  // slots without a divide per key
    const float* kv = kc + (base + in_block) * row + off;
    __m256 a = _mm256_setzero_ps();
    for (int64_t i = 0; i < d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_loadu_ps(kv + i), a);
    scores[s] = hsum8(a) * sc;
    mx = std::max(mx, scores[s]);
  }
  const __m256 mxv = _mm256_set1_ps(mx);
  __m256 sumv = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), mxv));
    _mm256_storeu_ps(scores + s, p);
    sumv = _mm256_add_ps(sumv, p);
  }
  float sum = hsum8(sumv);
  for (; s < n; ++s) {
    scores[s] = std::exp(scores[s] - mx);
    sum += scores[s];
  }
  const __m256 inv = _mm256_set1_ps(1.f / sum);
  for (int64_t i = 0; i < d; i += 32) {  // 4 accumulators of 8 dims; a d % 32 tail takes fewer
    const int64_t w = std::min<int64_t>(4, (d - i) / 8);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t t = 0, in_block = 0, base = bt[0] * bs; t < n; ++t, ++in_block) {
      if (in_block == bs) { in_block = 0; base = static_cast<int64_t>(bt[t / bs]) * bs; }
      const float* vv = vc + (base + in_block) * row + off + i;
      const __m256 p = _mm256_set1_ps(scores[t]);
      for (int j = 0; j < w; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vv + 8 * j), acc[j]);
    }
    for (int j = 0; j < w; ++j) _mm256_storeu_ps(dst + i + 8 * j, _mm256_mul_ps(acc[j], inv));
  }
}
}  // namespace attn_avx2
#pragma GCC pop_options

bool has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

torch::Tensor paged_attention(const torch::Tensor& q, const torch::Tensor& kv_cache, const torch::Tensor& block_tables,
                              const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc, double scale) {
  check_f32(q, "q");
  check_f32(kv_cache, "kv_cache");
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.is_contiguous(), "q [T, H, D], kv_cache 5-d contiguous");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.is_contiguous() &&
              seq_lens.scalar_type() == torch::kInt32 && query_start_loc.scalar_type() == torch::kInt32,
              "block_tables, seq_lens and query_start_loc must be int32");
  const int64_t hq = q.size(1), d = q.size(2), bs = kv_cache.size(2), hk = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == d && hq % hk == 0, "q heads must be a multiple of kv heads, same head_dim");
  const int64_t r_n = seq_lens.numel(), group = hq / hk, row = hk * d, max_blocks = block_tables.size(1);
  const int64_t num_slots = kv_cache.size(1) * bs;
  const float* kc = kv_cache.data_ptr<float>();
  const float* vc = kc + num_slots * row;
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const int32_t* sl = seq_lens.data_ptr<int32_t>();
  const int32_t* qs = query_start_loc.data_ptr<int32_t>();
  auto out = torch::zeros({q.size(0), hq, d}, torch::kFloat32);  // tokens no request owns stay 0
  float* o = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  static const bool avx2 = has_avx2_fma();
  const bool wide = avx2 && d % 8 == 0;
  at::parallel_for(0, r_n * hq, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores, acc(d);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t r = w / hq, h = w % hq, kvh = h / group;
      const int64_t seq = sl[r], q0 = qs[r], q_len = qs[r + 1] - q0;
      TORCH_CHECK((seq + bs - 1) / bs <= max_blocks, "seq_len ", seq, " exceeds the block table");
      scores.resize(seq);
      for (int64_t j = 0; j < q_len; ++j) {
        const int64_t n = seq - q_len + j + 1;  // keys this query sees
        const float* qv = q.data_ptr<float>() + (q0 + j) * q.stride(0) + h * q.stride(1);
        if (wide) {
          attn_avx2::attend(qv, kc, vc, bt + r * max_blocks, bs, row, kvh * d, d, n, sc, scores.data(),
                            o + ((q0 + j) * hq + h) * d);
          continue;
        }
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; ++s) {
          const int64_t slot = static_cast<int64_t>(bt[r * max_blocks + s / bs]) * bs + s % bs;
          const float* kv = kc + slot * row + kvh * d;
          scores[s] = dot(qv, kv, d) * sc;
          mx = std::max(mx, scores[s]);
        }
        float sum = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < n; ++s) {
          const float p = std::exp(scores[s] - mx);
          sum += p;
          const int64_t slot = static_cast<int64_t>(bt[r * max_blocks + s / bs]) * bs + s % bs;
          const float* vv = vc + slot * row + kvh * d;
          for (int64_t i = 0; i < d; ++i) acc[i] += p * vv[i];
        }
        float* dst = o + ((q0 + j) * hq + h) * d;
        const float inv = 1.f / sum;
        for (int64_t i = 0; i < d; ++i) dst[i] = acc[i] * inv;
      }
    }
  });
  return out;
}

torch::Tensor silu_mul(const torch::Tensor& x) {
  check_f32(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [T, 2 * d]");
  const int64_t t_n = x.size(0), dd = x.size(1) / 2;
  auto out = torch::empty({t_n, dd}, torch::kFloat32);
  at::parallel_for(0, t_n, std::max<int64_t>(1, 16384 / dd), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* g = x.data_ptr<float>() + t * x.stride(0);
      const float* u = g + dd;
      float* o = out.data_ptr<float>() + t * dd;
      for (int64_t i = 0; i < dd; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

}  // namespace

#ifndef QCPU_NO_MODULE  // decode_stack.cpp includes this file for its functions, with its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "(rmsnorm(x [+ residual]) * weight, x + residual or undefined)");
  m.def("rotary_kv", &rotary_kv, "rope on q and k in place, then k and v stored at slot_mapping");
  m.def("paged_attention", &paged_attention, "causal attention over the paged KV cache");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of x [T, 2d] = (gate, up)");
}
#endif
