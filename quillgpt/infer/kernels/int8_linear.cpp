// A linear layer with int8 weights and a scale per output row, for the few rows of a decode step.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] + bias[n]
//
// x is (M, K) float32; w is (N, K) int8 (contiguous); scale (N,) and bias (N,) are float32 or
// bfloat16, bias optional; y is (M, N) float32. Weights are widened to float32 eight at a time and
// multiplied into float32 sums with AVX2: no rounding of x or y to bfloat16 on the way, and one call
// where PyTorch's weight-only int8 kernel (`aten::_weight_int8pack_mm`) takes bfloat16 inputs and
// needs the conversions and the bias around it. Decoding one row reads each weight once, so each
// weight row is widened once and used for up to four rows of x at a time; output rows run in
// parallel on PyTorch's threads. At 1 row the model's matmuls take about half the time of that
// path (docs/results.md); past a few rows, FBGEMM or oneDNN on a packed copy is faster
// (`Int8Linear`).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace {

inline float as_float(float x) { return x; }

inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

inline __m256 widen8(const int8_t* w) {  // eight int8 weights as eight floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

inline float sum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Output columns [n0, n1) of M rows (M <= 4). Each row of x keeps four sums for 32 weights at a time
// (a single chain of multiply-adds would wait on its own latency at one row).
template <int M, typename scale_t>
void multiply(const float* x, int64_t K, const int8_t* w, const scale_t* scale, const float* bias, float* y,
              int64_t N, int64_t n0, int64_t n1) {
  constexpr int U = M == 1 ? 4 : M == 2 ? 2 : 1;  // sums per row: at most 8 vector registers of them
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    __m256 acc[M][U];
    for (int m = 0; m < M; ++m) {
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
      __m256 wk[U];
      for (int u = 0; u < U; ++u) wk[u] = widen8(wn + k + 8 * u);
      for (int m = 0; m < M; ++m) {
        for (int u = 0; u < U; ++u) {
          acc[m][u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * u), wk[u], acc[m][u]);
        }
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 wk = widen8(wn + k);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wk, acc[m][0]);
    }
    for (int m = 0; m < M; ++m) {
      __m256 total = acc[m][0];
      for (int u = 1; u < U; ++u) total = _mm256_add_ps(total, acc[m][u]);
      float s = sum8(total);
      for (int64_t t = k; t < K; ++t) s += x[m * K + t] * static_cast<float>(wn[t]);
      y[m * N + n] = s * as_float(scale[n]) + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

template <typename scale_t>
void multiply_rows(const at::Tensor& x, const at::Tensor& w, const scale_t* scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m += 4) {  // four rows of x at a time
      const float* xm = xp + m * K;
      float* ym = yp + m * N;
      switch (std::min<int64_t>(M - m, 4)) {
        case 1: multiply<1>(xm, K, wp, scale, bp, ym, N, n0, n1); break;
        case 2: multiply<2>(xm, K, wp, scale, bp, ym, N, n0, n1); break;
        case 3: multiply<3>(xm, K, wp, scale, bp, ym, N, n0, n1); break;
        default: multiply<4>(xm, K, wp, scale, bp, ym, N, n0, n1); break;
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_linear: x must be (M, K) float32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_linear: w must be a contiguous (N, K) int8 matrix");
  TORCH_CHECK(w.size(1) == x.size(1), "int8_linear: x has ", x.size(1), " columns, w ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "int8_linear: scale must be (N,)");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "int8_linear: bias must be (N,)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16,
              "int8_linear: scale must be float32 or bfloat16");
  const at::Tensor xs = x.contiguous(), s = scale.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (s.scalar_type() == at::kFloat) {
    multiply_rows(xs, w, s.data_ptr<float>(), b, y);
  } else {
    multiply_rows(xs, w, s.data_ptr<c10::BFloat16>(), b, y);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(quill, m) { m.def("int8_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(quill, CPU, m) { m.impl("int8_linear", int8_linear); }
