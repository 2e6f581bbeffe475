// A linear layer with int8 weights and a scale per output row, for any number of rows: the few
// rows of a decode step, a batch's, a prompt's.
//
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k] + bias[n]
//
// x is (M, K) float32 or bfloat16; w is (N, K) int8 (contiguous); scale (N,) and bias (N,) are
// float32 or bfloat16, bias optional; y is (M, N) float32, sums in float32. Output rows run in
// parallel on PyTorch's threads. Three paths, by x's dtype and rows:
// - float32 x, up to STREAM_ROWS rows (decoding): the weights streamed from memory, widened to
//   float32 eight at a time, each weight row used for up to four rows of x, AVX2 multiply-adds: no
//   rounding of x or y on the way, and one call where PyTorch's weight-only int8 kernel
//   (`aten::_weight_int8pack_mm`) takes bfloat16 inputs and needs conversions and the bias around it.
// - float32 x, more rows: tiles of weights widened to float32 once and multiplied by every row
//   (`Float32Tile`), AVX2.
// - bfloat16 x (rows a caller has rounded, as a bfloat16 copy of the weights would take them): tiles
//   widened to bfloat16 once and multiplied by every row with AVX512-BF16 dot products (namespace
//   bf16), reading the next tile's weights from memory while multiplying; without AVX512-BF16 the
//   float32 tiles. With it, each weight is read once per call instead of a packed bfloat16 copy's
//   two bytes: `Int8Linear` then holds no copy.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Up to how many rows of x stream the weights straight from memory, each weight widened once per four
// rows; past it, the tiled path.
constexpr int64_t STREAM_ROWS = 4;

inline float as_float(float x) { return x; }

inline float as_float(c10::BFloat16 x) { return static_cast<float>(x); }

inline uint16_t bfloat16_bits(float x) { return c10::BFloat16(x).x; }  // rounded to nearest, ties to even

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

// Many rows (prompts, batches): the weights in tiles of TILE_N rows by up to TILE_K columns, each
// tile widened once into a buffer the caches hold and multiplied by every row of x (in blocks of
// BLOCK_M rows), so each weight is read from memory and widened once per block of rows, not once
// per four rows. Partial sums over column tiles are added into y; the last applies scale and bias.
// Two ways to multiply a tile (`Float32Tile`, `Bfloat16Tile`), the same loops around them.
constexpr int64_t MR = 4;         // rows of x per register block
constexpr int64_t TILE_N = 48;    // weight rows per tile (a multiple of each way's NR)
constexpr int64_t TILE_K = 2048;  // columns per tile at most
constexpr int64_t BLOCK_M = 128;  // rows of x per pass over the weights

inline __m256 load_x(const float* x, int64_t count) {  // count in [1, 8) values; the rest read as 0
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_maskload_ps(x, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lanes));
}

// float32 x, the tile widened to float32, AVX2 multiply-adds: 4 rows of x by 3 tile rows keep 12
// sums of 8 lanes and read 7 vectors per 12 multiply-adds. x is read as 0 past its K columns.
struct Float32Tile {
  using elem = float;
  static constexpr int64_t NR = 3;

  static void widen(const int8_t* w, int64_t kc, float* t, int64_t kp) {
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) _mm256_storeu_ps(t + k, widen8(w + k));
    for (; k < kc; ++k) t[k] = static_cast<float>(w[k]);
    std::fill(t + kc, t + kp, 0.0f);
  }

  template <int R>
  static void sums(const float* x, int64_t xs, int64_t kc, const float* t, int64_t kp, float out[MR][NR]) {
    __m256 acc[R][NR];
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      __m256 wk[NR];
      for (int j = 0; j < NR; ++j) wk[j] = _mm256_loadu_ps(t + j * kp + k);
      for (int r = 0; r < R; ++r) {
        const __m256 xk = _mm256_loadu_ps(x + r * xs + k);
        for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_fmadd_ps(xk, wk[j], acc[r][j]);
      }
    }
    if (k < kc) {  // the last few columns: the tile is 0 past them
      for (int r = 0; r < R; ++r) {
        const __m256 xk = load_x(x + r * xs + k, kc - k);
        for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_fmadd_ps(xk, _mm256_loadu_ps(t + j * kp + k), acc[r][j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < NR; ++j) out[r][j] = sum8(acc[r][j]);
    }
  }
};

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// bfloat16 x, AVX512-BF16 dot products of pairs into float32 sums: twice the multiply-adds per
// instruction of float32 on the CPUs that have it. A tile of 48 weight rows is widened to bfloat16
// (exact: int8 values fit its 8 bits) and laid out in pairs of columns, t[k/2][n][k%2], so that one
// 32-bit broadcast of a pair of x's values meets 16 weight rows' pairs in each vector: up to 8 rows of
// x by the tile's 48 rows keep 24 vectors of sums, each lane a whole output (no sums across lanes).
namespace bf16 {

constexpr int64_t TILE = 48, VECTORS = TILE / 16, ROWS = 8;
static_assert(TILE == TILE_N, "the float32 and bfloat16 paths split the output rows alike");

// Sixteen vectors of 16 32-bit values, transposed in place: v[i][j] <- v[j][i].
BF16_TARGET inline void transpose16(__m512i v[16]) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_castsi512_ps(v[i]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
  for (int i = 0; i < 16; ++i) v[i] = _mm512_castps_si512(r[i]);
}

// Tile rows [0, rows) of w (row stride K), columns [0, kc), into t[k/2][n][k%2] for kp pairs; zero
// past the rows and columns.
BF16_TARGET void widen(const int8_t* w, int64_t K, int64_t rows, int64_t kc, uint16_t* t, int64_t kp) {
  for (int64_t k = 0; k < 2 * kp; k += 32) {     // 16 pairs of columns at a time,
    for (int64_t v = 0; v < VECTORS; ++v) {      // of 16 weight rows at a time
      const int64_t cols = std::max<int64_t>(0, std::min<int64_t>(32, kc - k));
      const __mmask32 load = cols == 32 ? ~__mmask32{0} : (__mmask32{1} << cols) - 1;
      __m512i block[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t n = 16 * v + i;
        if (n >= rows || cols == 0) {
          block[i] = _mm512_setzero_si512();
          continue;
        }
        const int8_t* wn = w + n * K + k;
        const __m256i bytes = _mm256_maskz_loadu_epi8(load, wn);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
        block[i] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));  // 16 pairs of row n
      }
      transpose16(block);  // block[p]: pair p of the 16 rows
      const int64_t pairs = std::min<int64_t>(16, kp - k / 2);
      for (int64_t p = 0; p < pairs; ++p) _mm512_storeu_si512(t + ((k / 2 + p) * TILE + 16 * v) * 2, block[p]);
    }
  }
}

// R rows of x (pairs of bfloat16, row stride xs in pairs) times the tile's kp pairs, for the tile's
// first `rows` outputs of each: added to y (rows N apart) unless `first`; scaled and biased if `last`.
// `ahead`: the next block of int8 weights (ahead_rows rows of ahead_cols, rows K apart), asked into
// the caches two lines per pair meanwhile, so that reading it from memory overlaps this arithmetic
// (widening it waits on memory otherwise: more row streams than the hardware prefetcher follows).
template <int R>
BF16_TARGET void multiply(const uint32_t* x, int64_t xs, const uint16_t* t, int64_t kp, float* y, int64_t N,
                          int64_t rows, const float* sc, const float* bi, bool first, bool last, const int8_t* ahead,
                          int64_t ahead_rows, int64_t ahead_cols, int64_t K) {
  const int64_t row_lines = (ahead_cols + 63) / 64, lines = ahead == nullptr ? 0 : ahead_rows * row_lines;
  int64_t line = 0;
  __m512 acc[R][VECTORS];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kp; ++p) {
    for (int i = 0; i < 2 && line < lines; ++i, ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + (line / row_lines) * K + (line % row_lines) * 64), _MM_HINT_T1);
    }
    __m512bh wk[VECTORS];
    for (int v = 0; v < VECTORS; ++v) wk[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(t + (p * TILE + 16 * v) * 2));
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(x[r * xs + p])));
      for (int v = 0; v < VECTORS; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xr, wk[v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < VECTORS; ++v) {
      const int64_t left = rows - 16 * v;
      if (left <= 0) break;
      const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
      float* out = y + r * N + 16 * v;
      __m512 total = acc[r][v];
      if (!first) total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(keep, out));
      if (last) total = _mm512_fmadd_ps(total, _mm512_load_ps(sc + 16 * v), _mm512_load_ps(bi + 16 * v));
      _mm512_mask_storeu_ps(out, keep, total);
    }
  }
}

// Output columns [n0, n1) of all M rows of x (bfloat16 pairs, xs pairs per row, 0 past K).
template <typename scale_t>
BF16_TARGET void multiply_tiled(const uint32_t* x, int64_t xs, int64_t M, int64_t K, const int8_t* w,
                                const scale_t* scale, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  const int64_t k_tiles = (K + TILE_K - 1) / TILE_K;
  const int64_t k_step = ((K + k_tiles - 1) / k_tiles + 31) / 32 * 32;  // tiles of equal width, in 32s
  const int64_t tile_pairs = std::min(k_step, (K + 1) / 2 * 2) / 2;
  std::vector<uint16_t> buffer(tile_pairs * TILE * 2);
  uint16_t* t = buffer.data();
  alignas(64) float sc[TILE], bi[TILE];
  for (int64_t m0 = 0; m0 < M; m0 += BLOCK_M) {
    const int64_t m1 = std::min(M, m0 + BLOCK_M);
    for (int64_t nt = n0; nt < n1; nt += TILE) {
      const int64_t rows = std::min(n1 - nt, TILE);
      for (int64_t j = 0; j < TILE; ++j) {
        sc[j] = j < rows ? as_float(scale[nt + j]) : 0.0f;
        bi[j] = j < rows && bias != nullptr ? bias[nt + j] : 0.0f;
      }
      for (int64_t k0 = 0; k0 < K; k0 += k_step) {
        const int64_t kc = std::min(K - k0, k_step), kp = (kc + 1) / 2;
        const bool first = k0 == 0, last = k0 + kc == K;
        widen(w + nt * K + k0, K, rows, kc, t, kp);
        // the block after this one: the next columns of these rows, else the next tile's first
        const int8_t* ahead = nullptr;
        int64_t ahead_rows = 0, ahead_cols = 0;
        if (!last) {
          ahead = w + nt * K + k0 + kc, ahead_rows = rows, ahead_cols = std::min(K - k0 - kc, k_step);
        } else if (nt + TILE < n1) {
          ahead = w + (nt + TILE) * K, ahead_rows = std::min(n1 - nt - TILE, TILE), ahead_cols = std::min(K, k_step);
        }
        for (int64_t m = m0; m < m1; m += ROWS, ahead = nullptr) {  // asked for once, in the first rows
          const uint32_t* xm = x + m * xs + k0 / 2;
          float* ym = y + m * N + nt;
          switch (std::min(m1 - m, ROWS)) {
            case 1: multiply<1>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 2: multiply<2>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 3: multiply<3>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 4: multiply<4>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 5: multiply<5>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 6: multiply<6>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            case 7: multiply<7>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
            default: multiply<8>(xm, xs, t, kp, ym, N, rows, sc, bi, first, last, ahead, ahead_rows, ahead_cols, K); break;
          }
        }
      }
    }
  }
}

}  // namespace bf16

// Output columns [n0, n1) of all M rows, x's rows xs apart.
template <typename Tile, typename scale_t>
void multiply_tiled(const typename Tile::elem* x, int64_t xs, int64_t M, int64_t K, const int8_t* w,
                    const scale_t* scale, const float* bias, float* y, int64_t N, int64_t n0, int64_t n1) {
  constexpr int64_t NR = Tile::NR;
  const int64_t k_tiles = (K + TILE_K - 1) / TILE_K;
  const int64_t k_step = ((K + k_tiles - 1) / k_tiles + 31) / 32 * 32;  // tiles of equal width, in 32s
  const int64_t kp = std::min(k_step, (K + 31) / 32 * 32);             // a tile row's stride in the buffer
  std::vector<typename Tile::elem> buffer(TILE_N * kp);
  typename Tile::elem* t = buffer.data();
  for (int64_t m0 = 0; m0 < M; m0 += BLOCK_M) {
    const int64_t m1 = std::min(M, m0 + BLOCK_M);
    for (int64_t nt = n0; nt < n1; nt += TILE_N) {
      const int64_t rows = std::min(n1 - nt, TILE_N);
      const int64_t padded = (rows + NR - 1) / NR * NR;  // rows past the tile's are 0
      for (int64_t k0 = 0; k0 < K; k0 += k_step) {
        const int64_t kc = std::min(K - k0, k_step);
        const bool last = k0 + kc == K;
        for (int64_t j = 0; j < padded; ++j) Tile::widen(w + (nt + j) * K + k0, j < rows ? kc : 0, t + j * kp, kp);
        for (int64_t m = m0; m < m1; m += MR) {
          const int64_t r = std::min(m1 - m, MR);
          const typename Tile::elem* xm = x + m * xs + k0;
          for (int64_t j = 0; j < padded; j += NR) {
            float sums[MR][NR];
            switch (r) {
              case 1: Tile::template sums<1>(xm, xs, kc, t + j * kp, kp, sums); break;
              case 2: Tile::template sums<2>(xm, xs, kc, t + j * kp, kp, sums); break;
              case 3: Tile::template sums<3>(xm, xs, kc, t + j * kp, kp, sums); break;
              default: Tile::template sums<4>(xm, xs, kc, t + j * kp, kp, sums); break;
            }
            for (int64_t i = 0; i < r; ++i) {
              for (int64_t c = 0; c < NR && j + c < rows; ++c) {
                const int64_t n = nt + j + c;
                float& out = y[(m + i) * N + n];
                const float total = (k0 == 0 ? 0.0f : out) + sums[i][c];
                out = last ? total * as_float(scale[n]) + (bias != nullptr ? bias[n] : 0.0f) : total;
              }
            }
          }
        }
      }
    }
  }
}

bool has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return has;
}

template <typename scale_t>
void multiply_rows(const at::Tensor& x, const at::Tensor& w, const scale_t* scale, const at::Tensor& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t tiles = (N + TILE_N - 1) / TILE_N;  // tiled paths: output rows split between threads in whole tiles
  if (x.scalar_type() == at::kBFloat16) {
    const int64_t xs = (K + 1) / 2 * 2;  // rows padded with 0 to whole pairs
    at::Tensor padded = xs == K ? x : at::zeros({M, xs}, x.options());
    if (xs != K) padded.narrow(1, 0, K).copy_(x);
    const uint32_t* xp = reinterpret_cast<const uint32_t*>(padded.data_ptr<c10::BFloat16>());
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      bf16::multiply_tiled(xp, xs / 2, M, K, wp, scale, bp, yp, N, t0 * TILE_N, std::min(N, t1 * TILE_N));
    });
    return;
  }
  const float* xp = x.data_ptr<float>();
  if (M > STREAM_ROWS) {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      multiply_tiled<Float32Tile>(xp, K, M, K, wp, scale, bp, yp, N, t0 * TILE_N, std::min(N, t1 * TILE_N));
    });
    return;
  }
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
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_linear: x must be (M, K) float32 or bfloat16");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_linear: w must be a contiguous (N, K) int8 matrix");
  TORCH_CHECK(w.size(1) == x.size(1), "int8_linear: x has ", x.size(1), " columns, w ", w.size(1));
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == N, "int8_linear: scale must be (N,)");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == N), "int8_linear: bias must be (N,)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16,
              "int8_linear: scale must be float32 or bfloat16");
  // bfloat16 x without AVX512-BF16: its values exactly in float32, multiplied as float32 x is
  const at::Tensor xs = x.scalar_type() == at::kBFloat16 && !has_avx512_bf16() ? x.to(at::kFloat).contiguous()
                                                                                : x.contiguous();
  const at::Tensor s = scale.contiguous();
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
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
