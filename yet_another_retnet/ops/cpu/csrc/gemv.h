// The rows of a matrix-vector product y = W x for decoding (see gemv.cpp for why it looks like
// this), shared by the gemv op and the fused decoding step (decode_step.cpp).
#pragma once

#include <ATen/Parallel.h>

#include "team.h"
#include "tuning.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace yaretnet_cpu {

// bfloat16 holds the top 16 bits of a float32: widening is a shift.
inline float bf16_to_float(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

template <typename W>
inline float load_weight(const W* p);
template <>
inline float load_weight<float>(const float* p) { return *p; }
template <>
inline float load_weight<uint16_t>(const uint16_t* p) { return bf16_to_float(*p); }
template <>
inline float load_weight<int8_t>(const int8_t* p) { return static_cast<float>(*p); }  // int8 weights (quantized.cpp)

#if defined(__AVX512F__)
// 16 consecutive weights as float32 (masked for a tail of fewer than 16).
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

// Rows [begin, end) of Y = X W^T for N (1 to kMaxVectors) vectors at once: W row-major (rows x
// cols), float32, bfloat16 bits or int8 (unscaled: quantized.cpp applies the scales); x holds the N float32 vectors of `cols` at stride ldx, y their
// outputs at stride ldy. Each weight is read once for all N, so a small batch costs about what one
// vector does (decoding is bound by the weights' bytes).
constexpr int kMaxVectors = 8;

// How many rows a kernel walks at once, a (rows / S)-th of its range apart, for N vectors. Each
// row is its own stream through memory; a few streams keep more cache-line fills in flight than
// one, but more than four lose again: on the 2-core AMD EPYC VMs, 8 streams read 1 GB matrices
// slower than 4 in every kernel here (float32, bfloat16, int8 and int4 alike, the quantized ones
// by a fifth: docs/performance.md). `accumulators` caps S * N so the sums stay in
// registers (the float kernels keep one per stream and vector, the int4 one two), and at least
// `least` streams remain for N vectors (one stream at 8 vectors ran 1.3x slower than two).
template <int N>
constexpr int decode_streams(int accumulators = 16, int least = 2) {
  return std::min(4, std::max(least, accumulators / N));
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// bfloat16 weights where the CPU has AVX512-BF16: the vectors rounded to bfloat16 once (what a
// bfloat16 model's own forward feeds its products), then VDPBF16PS multiplies 32 weights by 32
// values and adds the pairs into float32 sums in one instruction. Widening the weights to float32
// instead (load16 below) costs three instructions per 16 weights, enough to fall behind the memory.
template <int S, int N>
inline void bf16_dot_rows(const uint16_t* w, int64_t r, int64_t stride, const __m512bh* xb, int64_t blocks,
                          int64_t cols, float* y, int64_t ldy) {
  const uint16_t* rows[S];
  for (int i = 0; i < S; ++i) rows[i] = w + (r + i * stride) * cols;
  __m512 acc[S][N];
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) acc[i][v] = _mm512_setzero_ps();
  const int64_t full = cols / 32, ahead = float_prefetch_ahead.load(std::memory_order_relaxed);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t c = b * 32;
    for (int i = 0; i < S; ++i) {
      const __m512i raw = b < full ? _mm512_loadu_si512(rows[i] + c)
                                   : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1ull << (cols - c)) - 1ull),
                                                              rows[i] + c);
      for (int v = 0; v < N; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)raw, xb[v * blocks + b]);
      if (ahead != 0) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c) + ahead, _MM_HINT_T0);
    }
  }
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) y[v * ldy + r + i * stride] = _mm512_reduce_add_ps(acc[i][v]);
}

template <int N>
void gemv_rows_bf16_dot(const uint16_t* w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols,
                        int64_t begin, int64_t end) {
  const int64_t blocks = (cols + 31) / 32;
  std::vector<__m512bh> xb(N * blocks);  // the vectors in bfloat16, zero-padded to whole blocks
  for (int v = 0; v < N; ++v) {
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c = b * 32;
      const auto mask = [&](int64_t from) {
        const int64_t k = std::max<int64_t>(0, std::min<int64_t>(16, cols - from));
        return static_cast<__mmask16>((1u << k) - 1u);
      };
      const __m512 lo = _mm512_maskz_loadu_ps(mask(c), x + v * ldx + c);
      const __m512 hi = _mm512_maskz_loadu_ps(mask(c + 16), x + v * ldx + c + 16);
      xb[v * blocks + b] = _mm512_cvtne2ps_pbh(hi, lo);
    }
  }
  constexpr int S = decode_streams<N>();
  const int64_t q = (end - begin) / S;
  for (int64_t r = begin; r < begin + q; ++r) bf16_dot_rows<S, N>(w, r, q, xb.data(), blocks, cols, y, ldy);
  for (int64_t r = begin + S * q; r < end; ++r) bf16_dot_rows<1, N>(w, r, 0, xb.data(), blocks, cols, y, ldy);
}
#endif

#if defined(__AVX512F__)
// S rows (r, r + stride, ...) of Y = X W^T for N vectors, each row's sums in the same order
// whatever S: a row gives the same bits whichever share of the rows, and so whichever thread,
// computes it.
template <typename W, int S, int N>
inline void float_dot_rows(const W* w, int64_t r, int64_t stride, const float* x, int64_t ldx, int64_t cols, float* y,
                           int64_t ldy) {
  const int64_t full = cols - cols % 16, ahead = float_prefetch_ahead.load(std::memory_order_relaxed);
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols % 16)) - 1u);
  const W* rows[S];
  for (int i = 0; i < S; ++i) rows[i] = w + (r + i * stride) * cols;
  __m512 acc[S][N];
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < full; c += 16) {
    __m512 xv[N];
    for (int v = 0; v < N; ++v) xv[v] = _mm512_loadu_ps(x + v * ldx + c);
    for (int i = 0; i < S; ++i) {
      const __m512 wv = load16(rows[i] + c);
      for (int v = 0; v < N; ++v) acc[i][v] = _mm512_fmadd_ps(wv, xv[v], acc[i][v]);
    }
    // Software prefetch `ahead` bytes ahead in every stream, once per cache line (prefetches never
    // fault, so running past a row's end is harmless).
    if (ahead != 0 && (c * sizeof(W)) % 64 == 0)
      for (int i = 0; i < S; ++i) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + c) + ahead, _MM_HINT_T0);
  }
  if (tail) {
    for (int i = 0; i < S; ++i) {
      const __m512 wv = load16(rows[i] + full, tail);
      for (int v = 0; v < N; ++v) acc[i][v] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + v * ldx + full), acc[i][v]);
    }
  }
  for (int i = 0; i < S; ++i)
    for (int v = 0; v < N; ++v) y[v * ldy + r + i * stride] = _mm512_reduce_add_ps(acc[i][v]);
}
#endif

template <typename W, int N>
void gemv_rows_multi(const W* w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols, int64_t begin,
                     int64_t end) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<W, uint16_t>) {
    gemv_rows_bf16_dot<N>(w, x, ldx, y, ldy, cols, begin, end);
    return;
  }
#endif
#if defined(__AVX512F__)
  // S rows an S-th of the range apart (decode_streams: why so many), then the rest one by one.
  constexpr int S = decode_streams<N>();
  const int64_t q = (end - begin) / S;
  for (int64_t r = begin; r < begin + q; ++r) float_dot_rows<W, S, N>(w, r, q, x, ldx, cols, y, ldy);
  for (int64_t r = begin + S * q; r < end; ++r) float_dot_rows<W, 1, N>(w, r, 0, x, ldx, cols, y, ldy);
#else
  for (int64_t r = begin; r < end; ++r) {  // without AVX-512
    const W* row = w + r * cols;
    for (int v = 0; v < N; ++v) {
      const float* xv = x + v * ldx;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8)
        for (int j = 0; j < 8; ++j) acc[j] += load_weight(row + c + j) * xv[c + j];
      float sum = 0;
      for (; c < cols; ++c) sum += load_weight(row + c) * xv[c];
      for (float a : acc) sum += a;
      y[v * ldy + r] = sum;
    }
  }
#endif
}

// Rows [begin, end) of y = W x for one vector.
template <typename W>
void gemv_rows(const W* w, const float* x, float* y, int64_t cols, int64_t begin, int64_t end) {
  gemv_rows_multi<W, 1>(w, x, 0, y, 0, cols, begin, end);
}

// Rows [b, e) of Y = X W^T for n vectors (1 <= n <= kMaxVectors; x at stride ldx, y at stride
// ldy) on the calling thread, one weight stream for all of them.
template <typename W>
void gemv_range(const W* w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols, int64_t n, int64_t b,
                int64_t e) {
  switch (n) {
    case 1: gemv_rows(w, x, y, cols, b, e); break;
    case 2: gemv_rows_multi<W, 2>(w, x, ldx, y, ldy, cols, b, e); break;
    case 3: gemv_rows_multi<W, 3>(w, x, ldx, y, ldy, cols, b, e); break;
    case 4: gemv_rows_multi<W, 4>(w, x, ldx, y, ldy, cols, b, e); break;
    case 5: gemv_rows_multi<W, 5>(w, x, ldx, y, ldy, cols, b, e); break;
    case 6: gemv_rows_multi<W, 6>(w, x, ldx, y, ldy, cols, b, e); break;
    case 7: gemv_rows_multi<W, 7>(w, x, ldx, y, ldy, cols, b, e); break;
    default: gemv_rows_multi<W, 8>(w, x, ldx, y, ldy, cols, b, e); break;
  }
}

// The rows a thread-pool task of a gemv takes at least.
template <typename W>
int64_t gemv_grain(int64_t cols) {
  return row_grain(cols * static_cast<int64_t>(sizeof(W)), 8);
}

// The same for all rows over PyTorch's thread pool.
template <typename W>
void gemv_parallel_multi(const W* w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rows, int64_t cols,
                         int64_t n) {
  at::parallel_for(0, rows, gemv_grain<W>(cols),
                   [&](int64_t b, int64_t e) { gemv_range(w, x, ldx, y, ldy, cols, n, b, e); });
}

// y = W x for one vector over the thread pool.
template <typename W>
void gemv_parallel(const W* w, const float* x, float* y, int64_t rows, int64_t cols) {
  gemv_parallel_multi(w, x, 0, y, 0, rows, cols, 1);
}

}  // namespace yaretnet_cpu
