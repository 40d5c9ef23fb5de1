// The head norm and swish gate that end a retention layer, one head's row at a time (the math and
// why: norm_gate.cpp). Shared by the norm-gate op (norm_gate.cpp) and the fused layer core
// (retention_core.cpp). dv a multiple of 16.
#pragma once

#include "vec16.h"

#include <cmath>
#include <cstdint>

namespace yaretnet_cpu {

// One head's row of retained values: its dv values, mean and 1 / std.
struct NormRow {
  const float* x;
  float mean, rstd;

  NormRow(const float* x_, int64_t dv, float eps) : x(x_) {
    vec16 acc{};
    for (int64_t j = 0; j < dv; j += kLanes) {
      acc += load(x + j);
    }
    mean = sum(acc) / static_cast<float>(dv);
    vec16 sq{};
    for (int64_t j = 0; j < dv; j += kLanes) {
      const vec16 c = load(x + j) - mean;
      sq += c * c;
    }
    rstd = 1.0f / std::sqrt(sum(sq) / static_cast<float>(dv) + eps);
  }

  vec16 xhat(int64_t j) const { return (load(x + j) - mean) * rstd; }
};

// out[j] = silu(z[j]) * (xhat[j] * w[j] + b[j]) for one head's row x (dv values); z, w, b, out
// point at the head's dv columns.
inline void norm_gate_row(const float* x, const float* z, const float* w, const float* b, int64_t dv, float eps,
                          float* out) {
  const NormRow row(x, dv, eps);
  for (int64_t j = 0; j < dv; j += kLanes) {
    const vec16 zj = load(z + j);
    store(out + j, zj * sigmoid16(zj) * (row.xhat(j) * load(w + j) + load(b + j)));
  }
}

// The backward of norm_gate_row for the output gradient g: dz and dx written, the weight and bias
// gradients added to dw and db; dyw is dv floats of scratch.
inline void norm_gate_row_backward(const float* x, const float* z, const float* g, const float* w, const float* b,
                                   int64_t dv, float eps, float* dz, float* dw, float* db, float* dx, float* dyw) {
  const NormRow row(x, dv, eps);
  vec16 s1{}, s2{};
  for (int64_t j = 0; j < dv; j += kLanes) {
    const vec16 zj = load(z + j), gr = load(g + j), wj = load(w + j), xhat = row.xhat(j);
    const vec16 sig = sigmoid16(zj), y = xhat * wj + load(b + j);
    store(dz + j, gr * y * sig * (1.0f + zj * (1.0f - sig)));
    const vec16 dy = gr * zj * sig;
    store(dw + j, load(dw + j) + dy * xhat);
    store(db + j, load(db + j) + dy);
    const vec16 t = dy * wj;
    store(dyw + j, t);
    s1 += t;
    s2 += t * xhat;
  }
  const float inv_dv = 1.0f / static_cast<float>(dv), m1 = sum(s1) * inv_dv, m2 = sum(s2) * inv_dv;
  for (int64_t j = 0; j < dv; j += kLanes) {
    store(dx + j, (load(dyw + j) - m1 - row.xhat(j) * m2) * row.rstd);
  }
}

}  // namespace yaretnet_cpu
