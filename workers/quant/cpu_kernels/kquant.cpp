// CPU matmuls for GGUF k-quant weights kept packed exactly (cpu_kernels/kquant.py packs them):
//   q4f: qs uint8 [N, K/2] in kernels.cpp's q4 nibble order (per 32-block, byte j = q[j] | q[j+16] << 4),
//        dm fp32 [N, G, 2] = (scale, min) per group: w = q * scale + min (Q4_K: d*sc and -dmin*m need
//        fp32; kernels.cpp's q4 keeps them in fp16);
//   q8g16: qs int8 [N, K], d fp32 [N, K/16]: w = q * d per 16 inputs (Q6_K: q - 32, d*sc).
// Both with float activations (widened weights FMA'd with x) or int8 activations (x quantized per 32
// inputs by kernels.cpp's ActBuffers, integer dot products); AVX2 + FMA, or a scalar reference.
// This file includes kernels.cpp for its helpers (Act, ActBuffers, pick, grain, check_x, bias_ptr) and
// builds its own module, so the q4 / q8 kernels there stay untouched.
#define QCPU_NO_MODULE
#include "kernels.cpp"

namespace {

struct KArgs {
  const uint8_t* qs;  // q4f: uint8 [N, K/2]; q8g16: int8 [N, K] (reinterpreted)
  const float* scales;  // q4f: [N, G, 2]; q8g16: [N, K/16]
  const float* bias; float* y; Act act;
  const float* x; const float* xsum;  // float activations and their sums per 32 inputs
  int64_t m, n, k, group_size;
};

namespace kscalar {
void q4f_rows(const KArgs& a, int64_t n0, int64_t n1, bool int8_act) {
  const int64_t nb = a.k / 32, bpg = a.group_size / 32, groups = a.k / a.group_size;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = a.qs + n * (a.k / 2);
    const float* dm = a.scales + n * groups * 2;
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const float d = dm[2 * (b / bpg)], mn = dm[2 * (b / bpg) + 1];
        if (int8_act) {
          const int8_t* x = a.act.q + m * a.k + b * 32;
          int32_t isum = 0;
          for (int j = 0; j < 16; ++j) isum += (qs[b * 16 + j] & 0x0F) * x[j] + (qs[b * 16 + j] >> 4) * x[j + 16];
          acc += d * a.act.d[m * nb + b] * isum + mn * a.act.s[m * nb + b];
        } else {
          const float* x = a.x + m * a.k + b * 32;
          float t = 0.f;
          for (int j = 0; j < 16; ++j) t += (qs[b * 16 + j] & 0x0F) * x[j] + (qs[b * 16 + j] >> 4) * x[j + 16];
          acc += d * t + mn * a.xsum[m * nb + b];
        }
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

void q8g16_rows(const KArgs& a, int64_t n0, int64_t n1, bool int8_act) {
  const int64_t nb = a.k / 32;
  const int8_t* qall = reinterpret_cast<const int8_t*>(a.qs);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qs = qall + n * a.k;
    const float* d = a.scales + n * (a.k / 16);
    for (int64_t m = 0; m < a.m; ++m) {
      float acc = 0.f;
      for (int64_t h = 0; h < a.k / 16; ++h) {
        if (int8_act) {
          const int8_t* x = a.act.q + m * a.k + h * 16;
          int32_t isum = 0;
          for (int j = 0; j < 16; ++j) isum += qs[h * 16 + j] * x[j];
          acc += d[h] * a.act.d[m * nb + h / 2] * isum;
        } else {
          const float* x = a.x + m * a.k + h * 16;
          float t = 0.f;
          for (int j = 0; j < 16; ++j) t += qs[h * 16 + j] * x[j];
          acc += d[h] * t;
        }
      }
      a.y[m * a.n + n] = acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}
}  // namespace kscalar

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace kavx2 {
using avx2::dot_u8s8;  // kernels.cpp's AVX2 helpers (body.inc): 32 u8 x s8 products in fours; horizontal sum
using avx2::hsum;

inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

void q4f_rows(const KArgs& a, int64_t n0, int64_t n1, bool int8_act) {
  const int64_t nb = a.k / 32, bpg = a.group_size / 32, groups = a.k / a.group_size;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qs = a.qs + n * (a.k / 2);
    const float* dm = a.scales + n * groups * 2;
    for (int64_t m = 0; m < a.m; ++m) {
      __m256 acc = _mm256_setzero_ps();
      float min_acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float d = dm[2 * g], mn = dm[2 * g + 1];
        __m256 t = _mm256_setzero_ps();
        float xsum = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
          const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + b * 16));
          const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
          if (int8_act) {
            const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.act.q + m * a.k + b * 32));
            const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(_mm256_set_m128i(hi, lo), x));
            t = _mm256_fmadd_ps(p, _mm256_set1_ps(a.act.d[m * nb + b]), t);
            xsum += a.act.s[m * nb + b];
          } else {
            const float* xb = a.x + m * a.k + b * 32;
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xb), t);
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                                _mm256_loadu_ps(xb + 8), t);
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xb + 16), t);
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                                _mm256_loadu_ps(xb + 24), t);
            xsum += a.xsum[m * nb + b];
          }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), t, acc);
        min_acc += mn * xsum;
      }
      a.y[m * a.n + n] = hsum(acc) + min_acc + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

void q8g16_rows(const KArgs& a, int64_t n0, int64_t n1, bool int8_act) {
  const int64_t nb = a.k / 32;
  const int8_t* qall = reinterpret_cast<const int8_t*>(a.qs);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* qs = qall + n * a.k;
    const float* d = a.scales + n * (a.k / 16);
    for (int64_t m = 0; m < a.m; ++m) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t b = 0; b < nb; ++b) {
        const float d0 = d[2 * b], d1 = d[2 * b + 1];
        if (int8_act) {  // int32 lanes 0..3 sum inputs 0..15 (scale d0), lanes 4..7 inputs 16..31 (d1)
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * 32));
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.act.q + m * a.k + b * 32));
          const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)));
          const float ad = a.act.d[m * nb + b];
          acc = _mm256_fmadd_ps(p, _mm256_set_m128(_mm_set1_ps(d1 * ad), _mm_set1_ps(d0 * ad)), acc);
        } else {
          const float* xb = a.x + m * a.k + b * 32;
          const int8_t* w = qs + b * 32;
          __m256 p0 = _mm256_mul_ps(widen8(w), _mm256_loadu_ps(xb));
          p0 = _mm256_fmadd_ps(widen8(w + 8), _mm256_loadu_ps(xb + 8), p0);
          __m256 p1 = _mm256_mul_ps(widen8(w + 16), _mm256_loadu_ps(xb + 16));
          p1 = _mm256_fmadd_ps(widen8(w + 24), _mm256_loadu_ps(xb + 24), p1);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(d0), p0, acc);
          acc = _mm256_fmadd_ps(_mm256_set1_ps(d1), p1, acc);
        }
      }
      a.y[m * a.n + n] = hsum(acc) + (a.bias ? a.bias[n] : 0.f);
    }
  }
}
}  // namespace kavx2
#pragma GCC pop_options

using RowsFn = void (*)(const KArgs&, int64_t, int64_t, bool);

torch::Tensor run(const torch::Tensor& x, const KArgs& base, const torch::Tensor& y, const std::string& isa,
                  bool int8_act, RowsFn scalar_fn, RowsFn avx2_fn) {
  ActBuffers act(x, base.k, int8_act);
  KArgs a = base;
  a.act = act.view();
  a.xsum = act.s.data_ptr<float>();
  const RowsFn fn = pick(isa) == Isa::kScalar ? scalar_fn : avx2_fn;  // VNNI CPUs take the AVX2 code
  at::parallel_for(0, a.n, grain(a.k, x.size(0)), [&](int64_t n0, int64_t n1) { fn(a, n0, n1, int8_act); });
  return y;
}

torch::Tensor q4f_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& dm, int64_t group_size,
                         const c10::optional<torch::Tensor>& bias, const std::string& isa, bool int8_act) {
  const int64_t n = qs.size(0), k = qs.size(1) * 2;
  check_x(x, k);
  TORCH_CHECK(qs.scalar_type() == torch::kUInt8 && qs.is_contiguous(), "qs must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(k % 32 == 0 && group_size % 32 == 0 && k % group_size == 0, "bad q4f geometry");
  TORCH_CHECK(dm.scalar_type() == torch::kFloat32 && dm.is_contiguous() && dm.numel() == n * (k / group_size) * 2,
              "dm must be contiguous float32 [N, G, 2]");
  auto y = torch::empty({x.size(0), n}, torch::kFloat32);
  KArgs a{qs.data_ptr<uint8_t>(), dm.data_ptr<float>(), bias_ptr(bias, n), y.data_ptr<float>(), Act{},
          x.data_ptr<float>(), nullptr, x.size(0), n, k, group_size};
  return run(x, a, y, isa, int8_act, kscalar::q4f_rows, kavx2::q4f_rows);
}

torch::Tensor q8g16_linear(const torch::Tensor& x, const torch::Tensor& qs, const torch::Tensor& d,
                           const c10::optional<torch::Tensor>& bias, const std::string& isa, bool int8_act) {
  const int64_t n = qs.size(0), k = qs.size(1);
  check_x(x, k);
  TORCH_CHECK(qs.scalar_type() == torch::kInt8 && qs.is_contiguous() && k % 32 == 0,
              "qs must be contiguous int8 [N, K], K a multiple of 32");
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && d.is_contiguous() && d.numel() == n * (k / 16),
              "d must be contiguous float32 [N, K/16]");
  auto y = torch::empty({x.size(0), n}, torch::kFloat32);
  KArgs a{reinterpret_cast<const uint8_t*>(qs.data_ptr<int8_t>()), d.data_ptr<float>(), bias_ptr(bias, n),
          y.data_ptr<float>(), Act{}, x.data_ptr<float>(), nullptr, x.size(0), n, k, 16};
  return run(x, a, y, isa, int8_act, kscalar::q8g16_rows, kavx2::q8g16_rows);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4f_linear", &q4f_linear, "y [M, N] = x [M, K] @ dequant(q4, fp32 scale/min)^T + bias");
  m.def("q8g16_linear", &q8g16_linear, "y [M, N] = x [M, K] @ dequant(int8, fp32 scale per 16)^T + bias");
}
