// Batch-1-first CPU matmuls for weights kept quantized. Two activation modes:
//   float (default): each 32-block's quantized values are widened to float in registers and FMA'd
//     with x; scale (and min, through x's sum per block) applied once per group;
//   int8 (the llama.cpp approach): x quantized once per call to int8 per 32-block (scale d, and
//     s = d * sum(q) for the mins), then integer dot products (AVX2 maddubs on 256-bit vectors, or
//     AVX512-VNNI dpbusd on 512-bit vectors: wide512.inc, two blocks an instruction) scaled in float. Output rows are split over threads with
// at::parallel_for, so torch.set_num_threads applies.
//
// Layouts (packed by __init__.py; K % 32 == 0, group_size % 32 == 0, K % group_size == 0):
//   q4: qs uint8 [N, K/2]: per 32-block, byte j = q[j] | q[j+16] << 4 (GGUF Q4_1's nibble order);
//       dm fp16 [N, G, 2] = (scale, min) per group: w = q * scale + min.
//   q8: qs int8 [N, K]; d fp32 [N, G]; mins fp32 [N, G] or empty: w = q * d (+ min).
// The instruction set is picked at run time (__builtin_cpu_supports) unless forced by name;
// nothing here assumes AVX512 at build time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Act {  // x quantized per 32-block: q [M, K] int8, d and s [M, K/32]
  const int8_t* q;
  const float* d;
  const float* s;
};

struct Q4Args {
  const uint8_t* qs; const uint16_t* dm; const float* bias; float* y; Act act;
  const float* x; const float* xsum;  // float activations [M, K] and their sums per 32-block [M, K/32]
  int64_t m, n, k, group_size;
};

struct Q8Args {
  const int8_t* qs; const float* d; const float* mins; const float* bias; float* y; Act act;
  const float* x; const float* xsum;
  int64_t m, n, k, group_size;
};

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define QCPU_VNNI 0
#include "body.inc"
#undef QCPU_VNNI
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
namespace vnni {
#define QCPU_VNNI 1
#include "body.inc"
#undef QCPU_VNNI
}  // namespace vnni
namespace wide {  // int8 activations on 512-bit VNNI, tiles of up to 8 rows (the avx512vnni int8 path)
#include "wide512.inc"
}  // namespace wide
#pragma GCC pop_options

// Portable reference (no SIMD): used where AVX2 is missing, and forced in tests.
namespace scalar {
float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; } else {  // subnormal
      int e = -1; uint32_t mm = man;
      do { ++e; mm <<= 1; } while (!(mm & 0x400));
      bits = sign | ((127 - 15 - e) << 23) | ((mm & 0x3FF) << 13);
    }
  } else if (exp == 31) { bits = sign | 0x7F800000u | (man << 13); }
  else { bits = sign | ((exp + 112) << 23) | (man << 13); }
  float f; std::memcpy(&f, &bits, 4); return f;
}

void q4_rows(const Q4Args& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.k / 32, bpg = a.group_size / 32, groups = a.k / a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = a.qs + n * (a.k / 2);
    const uint16_t* dm = a.dm + n * groups * 2;
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = b / bpg;
        int32_t isum = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = qs[b * 16 + j];
          isum += (byte & 0x0F) * a.act.q[m * a.k + b * 32 + j] + (byte >> 4) * a.act.q[m * a.k + b * 32 + j + 16];
        }
        acc += half_to_float(dm[2 * g]) * a.act.d[m * nb + b] * isum + half_to_float(dm[2 * g + 1]) * a.act.s[m * nb + b];
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

void q8_rows(const Q8Args& a, int64_t n0, int64_t n1) {
  const int64_t nb = a.k / 32, bpg = a.group_size / 32, groups = a.k / a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t g = b / bpg;
        int32_t isum = 0;
        for (int j = 0; j < 32; ++j) isum += a.qs[n * a.k + b * 32 + j] * a.act.q[m * a.k + b * 32 + j];
        acc += a.d[n * groups + g] * a.act.d[m * nb + b] * isum;
        if (a.mins) acc += a.mins[n * groups + g] * a.act.s[m * nb + b];
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}
void q4_rows_f32(const Q4Args& a, int64_t n0, int64_t n1) {
  const int64_t bpg = a.group_size / 32, groups = a.k / a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = a.qs + n * (a.k / 2);
    const uint16_t* dm = a.dm + n * groups * 2;
    for (int64_t m = 0; m < a.m; ++m) {
      const float* x = a.x + m * a.k;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.f, xsum = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          for (int j = 0; j < 16; ++j) {
            const uint8_t byte = qs[b * 16 + j];
            t += (byte & 0x0F) * x[b * 32 + j] + (byte >> 4) * x[b * 32 + j + 16];
          }
          xsum += a.xsum[m * (a.k / 32) + b];
        }
        acc += half_to_float(dm[2 * g]) * t + half_to_float(dm[2 * g + 1]) * xsum;
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

void q8_rows_f32(const Q8Args& a, int64_t n0, int64_t n1) {
  const int64_t groups = a.k / a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.f, xsum = 0.f;
        for (int64_t j = g * a.group_size; j < (g + 1) * a.group_size; ++j) {
          t += a.qs[n * a.k + j] * a.x[m * a.k + j];
          xsum += a.x[m * a.k + j];
        }
        acc += a.d[n * groups + g] * t + (a.mins ? a.mins[n * groups + g] * xsum : 0.f);
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}
}  // namespace scalar

enum class Isa { kScalar, kAvx2, kVnni };

Isa detect() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return Isa::kVnni;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;  // f16c comes with both
  return Isa::kScalar;
}

Isa g_isa = detect();

const char* isa_name(Isa isa) {
  return isa == Isa::kVnni ? "avx512vnni" : isa == Isa::kAvx2 ? "avx2" : "scalar";
}

// Quantize each row of x [M, K] to int8 per 32-block (round to nearest, scale = max|x| / 127).
void quantize_act(const float* x, int64_t m_rows, int64_t k, int8_t* q, float* d, float* s) {
  const int64_t nb = k / 32;
  for (int64_t i = 0; i < m_rows * nb; ++i) {
    const float* xb = x + i * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int j = 0; j < 32; ++j) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[j] * inv));
      q[i * 32 + j] = static_cast<int8_t>(v);
      sum += v;
    }
    d[i] = scale;
    s[i] = scale * static_cast<float>(sum);
  }
}

void check_x(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous float32 CPU matrix [M, K]");
  TORCH_CHECK(x.size(1) == k, "x has ", x.size(1), " input features, the weight has ", k);
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t n) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == n,
              "bias must be a contiguous float32 vector of ", n, " elements");
  return bias->data_ptr<float>();
}

// int8_act: x quantized per 32-block (q, d, s); otherwise only x's sums per 32-block (for the mins).
struct ActBuffers {
  torch::Tensor q, d, s;
  ActBuffers(const torch::Tensor& x, int64_t k, bool int8_act) {
    const int64_t m = x.size(0);
    s = torch::empty({m, k / 32}, torch::kFloat32);
    if (int8_act) {
      q = torch::empty({m, k}, torch::kInt8);
      d = torch::empty({m, k / 32}, torch::kFloat32);
      quantize_act(x.data_ptr<float>(), m, k, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>());
    } else {
      const float* xp = x.data_ptr<float>();
      float* sp = s.data_ptr<float>();
      for (int64_t i = 0; i < m * (k / 32); ++i) {
        float sum = 0.f;
        for (int j = 0; j < 32; ++j) sum += xp[i * 32 + j];
        sp[i] = sum;
      }
    }
  }
  Act view() const {
    return Act{q.defined() ? q.data_ptr<int8_t>() : nullptr, d.defined() ? d.data_ptr<float>() : nullptr,
               s.data_ptr<float>()};
  }
};

// The 512-bit int8 kernels' expanded activations (wide512.inc), allocated here, filled there.
// q8 (corrections): the +128 offset's per-block corrections and per-block mins terms; q4: per-group mins terms.
struct WideBuffers {
  torch::Tensor d8, s8, c8, sg;
  wide::Expanded view{nullptr, nullptr, nullptr, 0, nullptr, 0};
  WideBuffers(const Act& act, int64_t m, int64_t k, int64_t group_size, bool wanted, bool q8) {
    if (!wanted) return;
    const int64_t stride = wide::expanded_stride(k), gstride = wide::group_stride(k, group_size);
    d8 = torch::zeros({m, stride}, torch::kFloat32);
    if (q8) {
      s8 = torch::zeros({m, stride}, torch::kFloat32);
      c8 = torch::zeros({m, stride}, torch::kInt32);
    } else {
      sg = torch::zeros({m, gstride}, torch::kFloat32);
    }
    view = wide::Expanded{d8.data_ptr<float>(), q8 ? s8.data_ptr<float>() : nullptr,
                          q8 ? c8.data_ptr<int32_t>() : nullptr, stride, q8 ? nullptr : sg.data_ptr<float>(), gstride};
    wide::expand(act, m, k, group_size, view);
  }
};

Isa pick(const std::string& forced) {
  if (forced.empty()) return g_isa;
  Isa want = forced == "avx512vnni" ? Isa::kVnni : forced == "avx2" ? Isa::kAvx2 : Isa::kScalar;
  TORCH_CHECK(forced == "avx512vnni" || forced == "avx2" || forced == "scalar",
              "isa must be avx512vnni, avx2 or scalar, got ", forced);
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(g_isa), "this CPU does not support ", forced);
  return want;
}

// Rows per task: enough work per thread that the fork/join is amortised.
int64_t grain(int64_t k, int64_t m) { return std::max<int64_t>(8, 32768 / std::max<int64_t>(1, k * m)); }

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& dm,
                        int64_t group_size, const c10::optional<torch::Tensor>& bias, const std::string& isa,
                        bool int8_act) {
  const int64_t n = qs.size(0), k = qs.size(1) * 2;
  check_x(x, k);
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.is_contiguous(), "qs must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(k % 32 == 0 && group_size % 32 == 0 && k % group_size == 0, "bad q4 geometry");
  TORCH_CHECK(dm.scalar_type() == torch::kFloat16 && dm.is_contiguous() && dm.numel() == n * (k / group_size) * 2,
              "dm must be contiguous float16 [N, G, 2]");
  auto y = torch::empty({x.size(0), n}, torch::kFloat32);
  ActBuffers act(x, k, int8_act);
  Q4Args a{qs.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>()), bias_ptr(bias, n),
           y.data_ptr<float>(), act.view(), x.data_ptr<float>(), act.s.data_ptr<float>(), x.size(0), n, k, group_size};
  const Isa use = pick(isa);
  WideBuffers wide_act(a.act, x.size(0), k, group_size, int8_act && use == Isa::kVnni, false);
  at::parallel_for(0, n, grain(k, x.size(0)), [&](int64_t n0, int64_t n1) {
    if (!int8_act) {
      if (use == Isa::kScalar) scalar::q4_rows_f32(a, n0, n1);
      else avx2::q4_rows_f32(a, n0, n1);
    } else if (use == Isa::kVnni) wide::q4_rows(a, wide_act.view, n0, n1);
    else if (use == Isa::kAvx2) avx2::q4_rows(a, n0, n1);
    else scalar::q4_rows(a, n0, n1);
  });
  return y;
}

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                        const c10::optional<torch::Tensor>& mins, int64_t group_size,
                        const c10::optional<torch::Tensor>& bias, const std::string& isa, bool int8_act) {
  const int64_t n = qs.size(0), k = qs.size(1);
  check_x(x, k);
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.is_contiguous(), "qs must be contiguous int8 [N, K]");
  TORCH_CHECK(k % 32 == 0 && group_size % 32 == 0 && k % group_size == 0, "bad q8 geometry");
  const int64_t groups = k / group_size;
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.is_contiguous() && d.numel() == n * groups,
              "d must be contiguous float32 [N, G]");
  const float* mins_p = nullptr;
  if (mins.has_value() && mins->defined()) {
    TORCH_CHECK(mins->scalar_type() == torch::kFloat32 && mins->is_contiguous() && mins->numel() == n * groups,
                "mins must be contiguous float32 [N, G]");
    mins_p = mins->data_ptr<float>();
  }
  auto y = torch::empty({x.size(0), n}, torch::kFloat32);
  ActBuffers act(x, k, int8_act);
  Q8Args a{qs.data_ptr<int8_t>(), d.data_ptr<float>(), mins_p, bias_ptr(bias, n), y.data_ptr<float>(), act.view(),
           x.data_ptr<float>(), act.s.data_ptr<float>(), x.size(0), n, k, group_size};
  const Isa use = pick(isa);
  WideBuffers wide_act(a.act, x.size(0), k, group_size, int8_act && use == Isa::kVnni, true);
  at::parallel_for(0, n, grain(k, x.size(0)), [&](int64_t n0, int64_t n1) {
    if (!int8_act) {
      if (use == Isa::kScalar) scalar::q8_rows_f32(a, n0, n1);
      else avx2::q8_rows_f32(a, n0, n1);
    } else if (use == Isa::kVnni) wide::q8_rows(a, wide_act.view, n0, n1);
    else if (use == Isa::kAvx2) avx2::q8_rows(a, n0, n1);
    else scalar::q8_rows(a, n0, n1);
  });
  return y;
}

// Prefill with float activations: rows [r0, r1) of W dequantized into `out` (float32 [r1 - r0, K], the caller's
// reused scratch), then a dense GEMM. One pass, no temporaries (torch ops made ~4 of W's size a call).
void q4_dequantize(const torch::Tensor& qs, const torch::Tensor& dm, int64_t group_size, torch::Tensor& out,
                   int64_t r0, int64_t r1) {
  const int64_t n = qs.size(0), k = qs.size(1) * 2, groups = k / group_size;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= n, "bad row range");
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.is_contiguous(), "qs must be contiguous uint8 [N, K/2]");
  const bool f32 = dm.scalar_type() == torch::kFloat32;  // GGUF Q4_K's exact scales (kquant.py); else float16
  TORCH_CHECK((f32 || dm.scalar_type() == torch::kFloat16) && dm.is_contiguous() && dm.numel() == n * groups * 2,
              "dm must be contiguous float16 or float32 [N, G, 2]");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() == (r1 - r0) * k, "bad out");
  const uint8_t* q = qs.data_ptr<uint8_t>();
  const uint16_t* d = f32 ? nullptr : reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>());
  const float* df = f32 ? dm.data_ptr<float>() : nullptr;
  float* w = out.data_ptr<float>();  // row r of W at (r - r0) * k
  at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = (r * groups + g) * 2;
        const float sc = f32 ? df[at] : scalar::half_to_float(d[at]), mn = f32 ? df[at + 1] : scalar::half_to_float(d[at + 1]);
        for (int64_t b = g * group_size; b < (g + 1) * group_size; b += 32) {  // 32 inputs = 16 bytes
          const uint8_t* src = q + r * (k / 2) + b / 2;
          float* dst = w + (r - r0) * k + b;
          for (int j = 0; j < 16; ++j) {
            dst[j] = static_cast<float>(src[j] & 0x0F) * sc + mn;
            dst[j + 16] = static_cast<float>(src[j] >> 4) * sc + mn;
          }
        }
      }
    }
  });
}

void q8_dequantize(const torch::Tensor& qs, const torch::Tensor& d, const c10::optional<torch::Tensor>& mins,
                   int64_t group_size, torch::Tensor& out, int64_t r0, int64_t r1) {
  const int64_t n = qs.size(0), k = qs.size(1), groups = k / group_size;
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= n, "bad row range");
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.is_contiguous(), "qs must be contiguous int8 [N, K]");
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.is_contiguous() && d.numel() == n * groups, "bad d");
  const float* mn = nullptr;
  if (mins.has_value() && mins->defined()) {
    TORCH_CHECK(mins->scalar_type() == torch::kFloat32 && mins->is_contiguous() && mins->numel() == n * groups, "bad mins");
    mn = mins->data_ptr<float>();
  }
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() && out.numel() == (r1 - r0) * k, "bad out");
  const int8_t* q = qs.data_ptr<int8_t>();
  const float* dp = d.data_ptr<float>();
  float* w = out.data_ptr<float>();  // row r of W at (r - r0) * k
  at::parallel_for(r0, r1, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t r = n0; r < n1; ++r) {
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = dp[r * groups + g], m0 = mn ? mn[r * groups + g] : 0.0f;
        const int8_t* src = q + r * k + g * group_size;
        float* dst = w + (r - r0) * k + g * group_size;
        for (int64_t j = 0; j < group_size; ++j) dst[j] = static_cast<float>(src[j]) * sc + m0;
      }
    }
  });
}

std::string best_isa() { return isa_name(g_isa); }

}  // namespace

#ifndef QCPU_NO_MODULE  // decode_stack.cpp includes this file for its functions, with its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_linear", &q4_linear, "y [M, N] = x [M, K] @ dequant(q4)^T + bias");
  m.def("q8_linear", &q8_linear, "y [M, N] = x [M, K] @ dequant(q8)^T + bias");
  m.def("best_isa", &best_isa, "the instruction set the kernels use on this CPU");
  m.def("q4_dequantize", &q4_dequantize, "out [r1 - r0, K] float32 = rows r0..r1 of dequant(q4)");
  m.def("q8_dequantize", &q8_dequantize, "out [r1 - r0, K] float32 = rows r0..r1 of dequant(q8)");
}
#endif
