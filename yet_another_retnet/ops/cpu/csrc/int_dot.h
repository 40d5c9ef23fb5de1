// Integer dot products for the int8 and int4 decoding products (quantized.cpp), where the CPU has
// AVX512-VNNI (Zen 4 and later, Ice Lake and later Xeons).
//
// Why: widening int8 or int4 weights to float32 costs a conversion per 16 weights on top of the
// multiply-add, and at one token a step those instructions, not the memory, set the pace (int4
// decoding ran at ~2.6x its memory floor that way). Here the activations are rounded once per call
// to 16-bit fixed point (one scale per vector: x ~= xq * xs, xs = max |x| / 32767, so each value
// is off by at most 2^-16 of the vector's largest, finer than bfloat16's 2^-9 of its own), the
// weights are widened to int16 in registers and VPDPWSSD multiplies and adds 32 pairs an
// instruction into exact int32 sums. The float result is sum * xs * (the row's scale).
//
// int32 cannot overflow: a lane adds two products of at most 127 * 32767 per 32 columns, and the
// sums are moved into float every kFlushColumns columns (4096: at most 128 * 2 * 127 * 32767 ~=
// 1.07e9 < 2^31). int4 sums flush at every group's end anyway (codes <= 15).
//
// The reference is the float product of the dequantized weight (ops/cpu/quantized.py); the tests
// bound the difference by the activation rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "gemv.h"  // decode_streams, int_prefetch_ahead
#include "quantized.h"  // Int4Weight

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define YARETNET_INT_DOT 1
#include <immintrin.h>
#endif

namespace yaretnet_cpu {

#if defined(YARETNET_INT_DOT)

constexpr int64_t kFlushColumns = 4096;

// Rounds n float32 vectors of `cols` (stride ldx) to int16 (stride ldq, zero-padded to `padded`, a
// multiple of 16), one scale each into xs. With `int4_order`, each block of 64 columns is stored as
// the int4 kernel consumes it: columns 0-15 and 32-47 (the packed bytes' low nibbles), then 16-31
// and 48-63 (their high ones). Returns false if a vector holds inf or NaN (the caller takes the
// float path, where they propagate as in the reference). Vectorised: it runs on one thread before
// every product, while the other waits.
inline bool quantize_activations(const float* x, int64_t ldx, int64_t n, int64_t cols, int16_t* xq, int64_t ldq,
                                 int64_t padded, float* xs, bool int4_order) {
  const __m512 largest = _mm512_set1_ps(std::numeric_limits<float>::max());
  const auto head = [&](int64_t from) {  // the first min(16, cols - from) lanes (none past the end)
    const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, cols - from));
    return static_cast<__mmask16>((1u << k) - 1u);
  };
  for (int64_t v = 0; v < n; ++v) {
    const float* xv = x + v * ldx;
    __m512 amax = _mm512_setzero_ps();
    __mmask16 finite = 0xFFFF;
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = head(c);
      const __m512 a = _mm512_abs_ps(_mm512_maskz_loadu_ps(m, xv + c));
      // Ordered <=: false for NaN and for inf, so either clears a lane of `finite`.
      finite &= static_cast<__mmask16>(_mm512_mask_cmp_ps_mask(m, a, largest, _CMP_LE_OQ) | ~m);
      amax = _mm512_max_ps(amax, a);
    }
    if (finite != 0xFFFF) return false;
    const float top = _mm512_reduce_max_ps(amax);
    // 32767 / top overflows to inf below ~1e-34 (zeros would become NaN, the rest saturate):
    // such a vector takes the float loop.
    if (top > 0.0f && top < 1e-30f) return false;
    xs[v] = top > 0.0f ? top / 32767.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
    const __m512 lo = _mm512_set1_ps(-32767.0f), hi = _mm512_set1_ps(32767.0f);
    int16_t* qv = xq + v * ldq;
    for (int64_t c = 0; c < padded; c += 16) {
      int64_t src = c;
      if (int4_order) {  // positions 16-31 and 32-47 of a 64-column block swap their sources
        const int64_t k = c % 64;
        src = c + (k == 16 ? 16 : k == 32 ? -16 : 0);
      }
      const __m512 scaled = _mm512_mul_ps(_mm512_maskz_loadu_ps(head(src), xv + src), inv);
      // Clamped, then rounded to nearest even (the default mode, as std::lrint), then narrowed.
      const __m512i rounded = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, scaled)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qv + c), _mm512_cvtsepi32_epi16(rounded));
    }
  }
  return true;
}

// Rows r + i * stride (i < S) of Y = X W^T for N vectors, W int8 (rows x cols): y[v, row] =
// (sum_c w[row, c] * xq[v, c]) * xs[v] * wscale[row]. xq padded to a multiple of 32 with zeros.
template <int S, int N>
inline void int8_dot_rows(const int8_t* w, int64_t r, int64_t stride, const int16_t* xq, int64_t ldq,
                          const float* xs, const float* wscale, float* y, int64_t ldy, int64_t cols) {
  const int8_t* rows[S];
  for (int i = 0; i < S; ++i) rows[i] = w + (r + i * stride) * cols;
  float total[S][N] = {};
  const int64_t full = cols - cols % 32, ahead = int_prefetch_ahead.load(std::memory_order_relaxed);
  for (int64_t c0 = 0; c0 < cols; c0 += kFlushColumns) {
    const int64_t c1 = std::min(cols, c0 + kFlushColumns);
    __m512i acc[S][N];
    for (int i = 0; i < S; ++i)
      for (int v = 0; v < N; ++v) acc[i][v] = _mm512_setzero_si512();
    int64_t c = c0;
    for (; c + 32 <= std::min(c1, full); c += 32) {
      for (int i = 0; i < S; ++i) {
        const __m512i wv =
            _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + c)));
        for (int v = 0; v < N; ++v)
          acc[i][v] = _mm512_dpwssd_epi32(acc[i][v], wv, _mm512_loadu_si512(xq + v * ldq + c));
        // One software prefetch a cache line, `ahead` bytes ahead in every stream (gemv.h).
        if (ahead != 0 && c % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c) + ahead, _MM_HINT_T0);
      }
    }
    if (c < c1) {  // the last, partial block of 32 columns (xq's padding is zero)
      const __mmask32 m = static_cast<__mmask32>((1ull << (c1 - c)) - 1ull);
      for (int i = 0; i < S; ++i) {
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, rows[i] + c));
        for (int v = 0; v < N; ++v)
          acc[i][v] = _mm512_dpwssd_epi32(acc[i][v], wv, _mm512_loadu_si512(xq + v * ldq + c));
      }
    }
    for (int i = 0; i < S; ++i)
      for (int v = 0; v < N; ++v) total[i][v] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[i][v]));
  }
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) y[v * ldy + r + i * stride] = total[i][v] * xs[v] * wscale[r + i * stride];
}

// Rows [b, e) for N vectors: S streams a (e - b) / S apart (more cache-line fills in flight than
// one stream, as in gemv.h), then the remaining rows one at a time.
template <int N>
void int8_dot_range(const int8_t* w, const int16_t* xq, int64_t ldq, const float* xs, const float* wscale, float* y,
                    int64_t ldy, int64_t cols, int64_t b, int64_t e) {
  constexpr int S = decode_streams<N>();
  const int64_t q = (e - b) / S;
  for (int64_t r = b; r < b + q; ++r) int8_dot_rows<S, N>(w, r, q, xq, ldq, xs, wscale, y, ldy, cols);
  for (int64_t r = b + S * q; r < e; ++r) int8_dot_rows<1, N>(w, r, 0, xq, ldq, xs, wscale, y, ldy, cols);
}

// int4: rows r + i * stride (i < S) of w for N vectors. Within each block of 32 columns a row's
// byte k holds column k (low nibble) and k + 16 (high). xq in the int4 order of
// quantize_activations, padded to a multiple of 64. Per group g of `group` columns the exact code
// sum is scaled by scale[row, g]; low[row, g] * xsum[v, g] (xsum: the float vectors' group sums)
// adds the groups' offsets. y[v, row] = xs[v] * sum_g scale_g * codesum_g + sum_g low_g * xsum_g.
// G: the group size when known at compile time (128, the default, or 64), else 0. Known, the unit
// loop unrolls and its loads need no mask: measured in the 1.3B model at ~80 GB/s, int4 decoding
// 16.4-16.9 -> 14.5-15.5 ms a token (docs/performance.md); at ~50 GB/s the same.
template <int S, int N, int G>
inline void int4_dot_rows(const Int4Weight& w, int64_t r, int64_t stride, const int16_t* xq, int64_t ldq,
                          const float* xs, const float* xsum, float* y, int64_t ldy) {
  const int64_t padded = w.padded, group = G > 0 ? G : w.group, groups = padded / group;
  const int64_t ahead = int_prefetch_ahead.load(std::memory_order_relaxed);
  const uint8_t* rows[S];
  const float* scales[S];
  for (int i = 0; i < S; ++i) {
    rows[i] = w.codes_row(r + i * stride);
    scales[i] = w.scale_row(r + i * stride);
    // Stored apart from the codes, the scales and lows are streams of their own, a line or two a
    // row, that the codes' loop would otherwise stall on at each group's end and at the row's
    // end: fetched two rows ahead. (Interleaved, the codes' prefetch has already brought them.)
    if (!w.interleaved()) {
      for (int64_t k = 0; k < groups; k += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(w.scale_row(r + 2 + i * stride) + k), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w.low_row(r + 2 + i * stride) + k), _MM_HINT_T0);
      }
    }
  }
  __m512 total[S][N];
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) total[i][v] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi16(15);
  // A unit: the columns whose sums share their scales. A group of 64 or more columns is one unit;
  // groups of 32 go two to a 64-column unit (int32 lanes 0-7 hold the first, 8-15 the second).
  const int64_t unit = std::max<int64_t>(group, 64);
  for (int64_t u0 = 0; u0 < padded; u0 += unit) {
    const int64_t u1 = G > 0 ? u0 + G : std::min(padded, u0 + unit);
    __m512i acc[S][N];
    for (int i = 0; i < S; ++i)
      for (int v = 0; v < N; ++v) acc[i][v] = _mm512_setzero_si512();
    for (int64_t c = u0; c < u1; c += 64) {
      for (int i = 0; i < S; ++i) {
        // 64 columns are 32 bytes; a last block of 32 columns (group 32, odd count) is 16.
        const __m256i raw = G > 0 || c + 64 <= padded
                                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + c / 2))
                                : _mm256_maskz_loadu_epi8(0x0000FFFFu, rows[i] + c / 2);
        const __m512i wide = _mm512_cvtepu8_epi16(raw);
        const __m512i lo = _mm512_and_si512(wide, nibble);
        const __m512i hi = _mm512_srli_epi16(wide, 4);
        for (int v = 0; v < N; ++v) {
          const int16_t* xv = xq + v * ldq + c;
          acc[i][v] = _mm512_dpwssd_epi32(acc[i][v], lo, _mm512_loadu_si512(xv));
          acc[i][v] = _mm512_dpwssd_epi32(acc[i][v], hi, _mm512_loadu_si512(xv + 32));
        }
        if (ahead != 0 && c % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c / 2) + ahead, _MM_HINT_T0);
      }
    }
    const int64_t g = u0 / group;
    for (int i = 0; i < S; ++i) {
      const float* sr = scales[i];
      const __m512 s = group >= 64 ? _mm512_set1_ps(sr[g])
                                   : _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sr[g]),
                                                          _mm512_set1_ps(g + 1 < groups ? sr[g + 1] : 0.0f));
      for (int v = 0; v < N; ++v) total[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][v]), s, total[i][v]);
    }
  }
  for (int i = 0; i < S; ++i) {
    const float* lr = w.low_row(r + i * stride);
    for (int v = 0; v < N; ++v) {
      const float* sv = xsum + v * groups;
      __m512 offset = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 16 <= groups; g += 16) offset = _mm512_fmadd_ps(_mm512_loadu_ps(lr + g), _mm512_loadu_ps(sv + g), offset);
      if (g < groups) {
        const __mmask16 m = static_cast<__mmask16>((1u << (groups - g)) - 1u);
        offset = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, lr + g), _mm512_maskz_loadu_ps(m, sv + g), offset);
      }
      y[v * ldy + r + i * stride] = _mm512_reduce_add_ps(total[i][v]) * xs[v] + _mm512_reduce_add_ps(offset);
    }
  }
}

template <int N>
void int4_dot_range(const Int4Weight& w, const int16_t* xq, int64_t ldq, const float* xs, const float* xsum, float* y,
                    int64_t ldy, int64_t b, int64_t e) {
  // Fewer streams than int8 for a batch: each holds a float and an int32 accumulator per vector.
  constexpr int S = decode_streams<N>(8, 1);
  const int64_t q = (e - b) / S;
  const auto rows = [&](auto group) {
    constexpr int G = decltype(group)::value;
    for (int64_t r = b; r < b + q; ++r) int4_dot_rows<S, N, G>(w, r, q, xq, ldq, xs, xsum, y, ldy);
    for (int64_t r = b + S * q; r < e; ++r) int4_dot_rows<1, N, G>(w, r, 0, xq, ldq, xs, xsum, y, ldy);
  };
  if (w.group == 128)
    rows(std::integral_constant<int, 128>{});
  else if (w.group == 64)
    rows(std::integral_constant<int, 64>{});
  else
    rows(std::integral_constant<int, 0>{});
}

#endif  // YARETNET_INT_DOT

}  // namespace yaretnet_cpu
