// Attention for decoding: one new query per sequence and head, over that row's cached keys and values.
//
//   out[b, h*D:(h+1)*D] = softmax(q[b, h] . k[b, h, :n] / sqrt(D)) @ v[b, h, :n],  n = lengths[b]
//
// q is (B, H, D) float32; k and v are (B, H, T, D) views of the KV cache in float32 or bfloat16
// (any strides, unit stride along D); lengths (B,) int64 says how many keys each row sees (rows of
// a continuous batch sit at different positions), each in [1, T]; out is (B, H*D) float32, the
// layout the output projection reads.
//
// Each (b, h) streams its keys once and its values once, asking for the next keys and values ahead
// of use (the cache is cold: a step's weights pass through the CPU caches between layers). Where D
// is a multiple of 16, AVX2 multiply-adds take 16 values at a time, bfloat16 converted by
// interleaving (`load16`); other head sizes take a plain loop. Sums are in float32; rows and heads
// run in parallel on PyTorch's own threads (at::parallel_for). Built with -ffast-math (see
// __init__.py): sums are reordered into vector lanes and exp is glibc's vector one; a NaN or an
// infinity in the cache still comes out as PyTorch's attention gives it (tests/test_kernels.py).
// PyTorch's CPU flash attention takes 1.5-2.1x as long at the shapes of a decode step (docs/results.md).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float as_float(float x) { return x; }

inline float as_float(uint16_t bfloat16_bits) {  // a bfloat16 is the high half of a float32
  const uint32_t bits = static_cast<uint32_t>(bfloat16_bits) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Sixteen cache values as two vectors of eight floats. For bfloat16, interleaving a zero below each
// value makes it a float32; AVX2 interleaves within 128-bit halves, so the values come out in the
// order 0-3 8-11 | 4-7 12-15 (`slot`). q and the output are kept in the same order.
inline void load16(const float* x, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(x);
  hi = _mm256_loadu_ps(x + 8);
}

inline void load16(const uint16_t* x, __m256& lo, __m256& hi) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i zero = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits));
}

// Where load16 puts value d: its position in the pair of vectors, counted from d's group of 16.
template <typename cache_t>
inline int64_t slot(int64_t d) {
  if (std::is_same<cache_t, float>::value) return d;
  const int64_t r = d & 15;
  return (d & ~int64_t{15}) + ((r >> 2) & 1) * 8 + (r >> 3) * 4 + (r & 3);
}

// The four sums of a, b, c and d's lanes.
inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// Asks for a cache row (D values) to be brought into the caches ahead of its use.
template <typename cache_t>
inline void prefetch_row(const cache_t* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < D * static_cast<int64_t>(sizeof(cache_t)); at += 64) __builtin_prefetch(bytes + at);
}

constexpr int64_t AHEAD = 16;  // how many keys ahead to prefetch

// p[:n] = softmax(p[:n]); returns nothing, p holds probabilities.
inline void softmax(float* p, int64_t n) {
  const float top = *std::max_element(p, p + n);
  float total = 0.0f;
  for (int64_t t = 0; t < n; ++t) total += (p[t] = std::exp(p[t] - top));
  const float inv = 1.0f / total;
  for (int64_t t = 0; t < n; ++t) p[t] *= inv;
}

// One (b, h): o[:D] = softmax(q . k[:n] * scale) @ v[:n]; q and o in `slot` order when `vector`.
// next_k, next_n: the keys the thread reads next, prefetched while this one sums its values.
template <typename cache_t, bool vector>
void attend_one(const float* q, const cache_t* k, const cache_t* v, int64_t kt, int64_t vt, int64_t n, int64_t D,
                float scale, const cache_t* next_k, int64_t next_n, float* p, float* o) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {  // scores, four keys at a time: independent sums keep the units busy
    const cache_t* k0 = k + t * kt;
    const cache_t *k1 = k0 + kt, *k2 = k1 + kt, *k3 = k2 + kt;
    for (int64_t j = t; j < t + 4; ++j) {
      if (j + AHEAD < n) prefetch_row(k + (j + AHEAD) * kt, D);
      prefetch_row(v + j * vt, D);
    }
    if constexpr (vector) {
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __m256 qlo = _mm256_loadu_ps(q + d), qhi = _mm256_loadu_ps(q + d + 8);
        __m256 lo, hi;
        load16(k0 + d, lo, hi), a0 = _mm256_fmadd_ps(lo, qlo, a0), b0 = _mm256_fmadd_ps(hi, qhi, b0);
        load16(k1 + d, lo, hi), a1 = _mm256_fmadd_ps(lo, qlo, a1), b1 = _mm256_fmadd_ps(hi, qhi, b1);
        load16(k2 + d, lo, hi), a2 = _mm256_fmadd_ps(lo, qlo, a2), b2 = _mm256_fmadd_ps(hi, qhi, b2);
        load16(k3 + d, lo, hi), a3 = _mm256_fmadd_ps(lo, qlo, a3), b3 = _mm256_fmadd_ps(hi, qhi, b3);
      }
      const __m128 s = sum4(_mm256_add_ps(a0, b0), _mm256_add_ps(a1, b1), _mm256_add_ps(a2, b2), _mm256_add_ps(a3, b3));
      _mm_storeu_ps(p + t, _mm_mul_ps(s, _mm_set1_ps(scale)));
    } else {
      float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        s0 += q[d] * as_float(k0[d]);
        s1 += q[d] * as_float(k1[d]);
        s2 += q[d] * as_float(k2[d]);
        s3 += q[d] * as_float(k3[d]);
      }
      p[t] = s0 * scale, p[t + 1] = s1 * scale, p[t + 2] = s2 * scale, p[t + 3] = s3 * scale;
    }
  }
  for (; t < n; ++t) {
    const cache_t* key = k + t * kt;
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += q[vector ? slot<cache_t>(d) : d] * as_float(key[d]);
    p[t] = dot * scale;
  }
  softmax(p, n);
  // the weighted sum of values, four at a time: the output row is read and written once per four
  std::fill(o, o + D, 0.0f);
  for (t = 0; t + 4 <= n; t += 4) {
    const cache_t* v0 = v + t * vt;
    const cache_t *v1 = v0 + vt, *v2 = v1 + vt, *v3 = v2 + vt;
    for (int64_t j = t; j < t + 4 && j < next_n; ++j) prefetch_row(next_k + j * kt, D);
    if constexpr (vector) {
      const __m256 w0 = _mm256_set1_ps(p[t]), w1 = _mm256_set1_ps(p[t + 1]);
      const __m256 w2 = _mm256_set1_ps(p[t + 2]), w3 = _mm256_set1_ps(p[t + 3]);
      for (int64_t d = 0; d < D; d += 16) {
        __m256 olo = _mm256_loadu_ps(o + d), ohi = _mm256_loadu_ps(o + d + 8), lo, hi;
        load16(v0 + d, lo, hi), olo = _mm256_fmadd_ps(lo, w0, olo), ohi = _mm256_fmadd_ps(hi, w0, ohi);
        load16(v1 + d, lo, hi), olo = _mm256_fmadd_ps(lo, w1, olo), ohi = _mm256_fmadd_ps(hi, w1, ohi);
        load16(v2 + d, lo, hi), olo = _mm256_fmadd_ps(lo, w2, olo), ohi = _mm256_fmadd_ps(hi, w2, ohi);
        load16(v3 + d, lo, hi), olo = _mm256_fmadd_ps(lo, w3, olo), ohi = _mm256_fmadd_ps(hi, w3, ohi);
        _mm256_storeu_ps(o + d, olo), _mm256_storeu_ps(o + d + 8, ohi);
      }
    } else {
      const float w0 = p[t], w1 = p[t + 1], w2 = p[t + 2], w3 = p[t + 3];
      for (int64_t d = 0; d < D; ++d) {
        o[d] += w0 * as_float(v0[d]) + w1 * as_float(v1[d]) + w2 * as_float(v2[d]) + w3 * as_float(v3[d]);
      }
    }
  }
  for (; t < n; ++t) {
    const cache_t* value = v + t * vt;
    for (int64_t d = 0; d < D; ++d) o[vector ? slot<cache_t>(d) : d] += p[t] * as_float(value[d]);
  }
}

template <typename cache_t>
void attend_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lengths,
                 at::Tensor& out) {
  const int64_t B = k.size(0), H = k.size(1), T = k.size(2), D = k.size(3);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const bool vector = D % 16 == 0;
  const float* qp = q.data_ptr<float>();
  const auto* kp = static_cast<const cache_t*>(k.data_ptr());
  const auto* vp = static_cast<const cache_t*>(v.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t qb = q.stride(0), qh = q.stride(1);
  const int64_t kb = k.stride(0), kh = k.stride(1), kt = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vt = v.stride(2);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(T), qs(D), os(D);  // scores then probabilities; q and o in slot order
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H, n = lengths[b];
      const float* qi = qp + b * qb + h * qh;
      float* o = op + i * D;
      const bool more = i + 1 < end;  // the (b, h) this thread takes next, whose keys to prefetch
      const cache_t* next_k = more ? kp + (i + 1) / H * kb + (i + 1) % H * kh : nullptr;
      const int64_t next_n = more ? lengths[(i + 1) / H] : 0;
      const cache_t* ki = kp + b * kb + h * kh;
      const cache_t* vi = vp + b * vb + h * vh;
      if (vector) {
        for (int64_t d = 0; d < D; ++d) qs[slot<cache_t>(d)] = qi[d];
        attend_one<cache_t, true>(qs.data(), ki, vi, kt, vt, n, D, scale, next_k, next_n, p.data(), os.data());
        for (int64_t d = 0; d < D; ++d) o[d] = os[slot<cache_t>(d)];
      } else {
        attend_one<cache_t, false>(qi, ki, vi, kt, vt, n, D, scale, next_k, next_n, p.data(), o);
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
