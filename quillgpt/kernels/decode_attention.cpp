// Attention for decoding: one new query per sequence and head, over that row's cached keys and values.
//
//   out[b, h*D:(h+1)*D] = softmax(q[b, h] . k[b, h, :n] / sqrt(D)) @ v[b, h, :n],  n = lengths[b]
//
// q is (B, H, D) float32; k and v are (B, H, T, D) views of the KV cache in float32 or bfloat16
// (any strides, unit stride along D); lengths (B,) int64 says how many keys each row sees (rows of
// a continuous batch sit at different positions), each in [1, T]; out is (B, H*D) float32, the
// layout the output projection reads.
//
// Each (b, h) streams its keys once and its values once, so a float32 cache is read at about the
// memory's speed; PyTorch's CPU flash attention takes 1.6-1.9x as long at the shapes of a decode
// step (docs/results.md). Sums are in float32; rows and heads run in parallel on PyTorch's own
// threads (at::parallel_for). Built with -ffast-math (see __init__.py): sums are reordered into
// vector lanes and exp is glibc's vector one; inputs are finite keys and values from the model.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float as_float(float x) { return x; }

inline float as_float(uint16_t bfloat16_bits) {  // a bfloat16 is the high half of a float32
  const uint32_t bits = static_cast<uint32_t>(bfloat16_bits) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

template <typename cache_t>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lengths,
                 at::Tensor& out) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();
  const auto* kp = static_cast<const cache_t*>(k.data_ptr());
  const auto* vp = static_cast<const cache_t*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1);
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(T);  // scores, then probabilities
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lengths[b];
      const float* qi = qp + b * qb + h * qh;
      const cache_t* ki = kp + b * kb + h * kh;
      const cache_t* vi = vp + b * vb + h * vh;
      // scores, four keys at a time: four independent sums keep the multiply-add units busy
      int64_t t = 0;
      for (; t + 4 <= n; t += 4) {
        const cache_t* k0 = ki + t * kt;
        const cache_t *k1 = k0 + kt, *k2 = k1 + kt, *k3 = k2 + kt;
        float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        for (int64_t d = 0; d < D; ++d) {
          s0 += qi[d] * as_float(k0[d]);
          s1 += qi[d] * as_float(k1[d]);
          s2 += qi[d] * as_float(k2[d]);
          s3 += qi[d] * as_float(k3[d]);
        }
        p[t] = s0 * scale, p[t + 1] = s1 * scale, p[t + 2] = s2 * scale, p[t + 3] = s3 * scale;
      }
      for (; t < n; ++t) {
        const cache_t* key = ki + t * kt;
        float dot = 0.0f;
        for (int64_t d = 0; d < D; ++d) dot += qi[d] * as_float(key[d]);
        p[t] = dot * scale;
      }
      const float top = *std::max_element(p.begin(), p.begin() + n);
      float total = 0.0f;
      for (t = 0; t < n; ++t) total += (p[t] = std::exp(p[t] - top));
      const float inv = 1.0f / total;
      // the weighted sum of values, four at a time: the output row is read and written once per four
      float* o = op + i * D;
      std::fill(o, o + D, 0.0f);
      for (t = 0; t + 4 <= n; t += 4) {
        const cache_t* v0 = vi + t * vt;
        const cache_t *v1 = v0 + vt, *v2 = v1 + vt, *v3 = v2 + vt;
        const float w0 = p[t] * inv, w1 = p[t + 1] * inv, w2 = p[t + 2] * inv, w3 = p[t + 3] * inv;
        for (int64_t d = 0; d < D; ++d) {
          o[d] += w0 * as_float(v0[d]) + w1 * as_float(v1[d]) + w2 * as_float(v2[d]) + w3 * as_float(v3[d]);
        }
      }
      for (; t < n; ++t) {
        const cache_t* value = vi + t * vt;
        const float w = p[t] * inv;
        for (int64_t d = 0; d < D; ++d) o[d] += w * as_float(value[d]);
      }
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.sizes() == k.sizes(),
              "decode_attention: q must be (B, H, D) and k, v (B, H, T, D)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(2) == k.size(3),
              "decode_attention: q's (B, H, D) must match k and v");
  TORCH_CHECK(q.scalar_type() == at::kFloat, "decode_attention: q must be float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "decode_attention: k and v must both be float32 or both bfloat16");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: the last dimension must be contiguous");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == k.size(0) && lengths.scalar_type() == at::kLong &&
                  lengths.is_contiguous(),
              "decode_attention: lengths must be (B,) int64");
  const int64_t* n = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    TORCH_CHECK(n[b] >= 1 && n[b] <= k.size(2), "decode_attention: lengths must lie in [1, T]");
  }
  auto out = at::empty({q.size(0), q.size(1) * q.size(2)}, q.options());
  if (k.scalar_type() == at::kFloat) {
    attend_rows<float>(q, k, v, n, out);
  } else {
    attend_rows<uint16_t>(q, k, v, n, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(quill, m) { m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths) -> Tensor"); }

TORCH_LIBRARY_IMPL(quill, CPU, m) { m.impl("decode_attention", decode_attention); }
