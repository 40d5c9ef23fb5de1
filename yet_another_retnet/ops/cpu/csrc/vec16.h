// Sixteen floats as one GCC/Clang vector: one AVX-512 register where the build has it (two AVX2
// registers elsewhere). Loads and stores through memcpy, so any alignment is fine. With it the
// lane-wise math the kernels share: exp, sigmoid, erf and GELU. Used by the kernels that
// vectorise by hand (chunk_kernels.cpp, norm_gate.cpp, decode_step.cpp).
#pragma once

#include <cstdint>
#include <cstring>

namespace yaretnet_cpu {

typedef float vec16 __attribute__((vector_size(64)));

inline vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

typedef int32_t ivec16 __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline vec16 splat(float x) { return vec16{} + x; }

inline float sum(vec16 v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) {
    s += v[i];
  }
  return s;
}

// exp(x) lane by lane: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
// (relative error ~1e-7, float rounding), times 2^n built in the exponent bits. Inputs are
// clamped to [-87, 88] (exp stays a normal float); sigmoid only needs exp to saturate there.
inline vec16 exp16(vec16 x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vec16 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vec16 n = (x * 1.44269504088896341f + magic) - magic;
  const vec16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  vec16 p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec16 bits = (__builtin_convertvector(n, ivec16) + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline vec16 sigmoid16(vec16 z) { return 1.0f / (1.0f + exp16(-z)); }

// 1 - erf(a) for a >= 0 (Abramowitz & Stegun 7.1.26: absolute error below 1.5e-7, about float32's
// rounding near 1): (a1 t + ... + a5 t^5) exp(-a^2), t = 1 / (1 + p a); exp(-a^2) also out in gauss.
inline vec16 erfc_nonneg16(vec16 a, vec16& gauss) {
  const vec16 t = 1.0f / (1.0f + 0.3275911f * a);
  vec16 poly = splat(1.061405429f);
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  gauss = exp16(-a * a);
  return poly * t * gauss;
}

// erf(x) lane by lane, odd in x.
inline vec16 erf16(vec16 x) {
  const vec16 ax = x < 0.0f ? -x : x;
  vec16 gauss;
  const vec16 e = 1.0f - erfc_nonneg16(ax, gauss);
  return x < 0.0f ? -e : e;
}

// The exact (erf) GELU, x Phi(x), as F.gelu computes it by default.
inline vec16 gelu16(vec16 x) { return 0.5f * x * (1.0f + erf16(x * 0.70710678118654752f)); }

// The GELU and its slope together, for one exp: Phi(x) = (1 + erf(x / sqrt 2)) / 2 as in erf16,
// whose exp(-x^2 / 2) is also the normal density's, phi(x) = exp(-x^2 / 2) / sqrt(2 pi); then
// y = x Phi(x) and slope = Phi(x) + x phi(x).
inline void gelu_slope16(vec16 x, vec16& y, vec16& slope) {
  const vec16 u = x * 0.70710678118654752f;
  vec16 gauss;
  const vec16 tail = 0.5f * erfc_nonneg16(u < 0.0f ? -u : u, gauss);  // (1 - erf(|u|)) / 2
  const vec16 cdf = u < 0.0f ? tail : 1.0f - tail;
  y = x * cdf;
  slope = cdf + x * gauss * 0.39894228040143268f;
}

}  // namespace yaretnet_cpu
