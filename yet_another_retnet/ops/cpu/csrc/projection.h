// A retention layer's fused projection on the CPU: its [q | k | v | gate] layout, and the rotary
// positions of its queries and keys: one row rotated pair by pair, the transpose of that for the
// backward, and the (1 or batch, length, dk) cos/sin tables they read, as ops/position.py builds
// them (each angle repeated for its (even, odd) pair). Shared by the head split (split_heads.cpp)
// and the fused layer core (retention_core.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>

namespace yaretnet_cpu {

// The sizes of a (batch, length, width) fused projection [q | k | v | gate]: width = 2 heads dk + 2 heads dv.
struct ProjDims {
  int64_t batch, length, heads, dk, dv, width;
};

inline ProjDims proj_dims(const char* op, int64_t batch, int64_t length, int64_t width, int64_t heads, int64_t dk) {
  TORCH_CHECK(heads > 0 && dk > 0 && dk % 2 == 0, op, ": heads must be positive and key_dim even, got ", heads, ", ",
              dk);
  const int64_t rest = width - 2 * heads * dk;
  TORCH_CHECK(rest > 0 && rest % (2 * heads) == 0, op, ": the projection's last dim must be 2 heads key_dim + 2 ",
              "heads head_dim, got ", width, " with heads ", heads, ", key_dim ", dk);
  return {batch, length, heads, dk, rest / (2 * heads), width};
}

// The rotation's (1 or batch, length, dk) cos and sin tables, checked and contiguous, or none.
struct Rotation {
  at::Tensor cos, sin;
  const float *cp = nullptr, *sp = nullptr;
  int64_t cos_batch = 0, sin_batch = 0;  // batch strides: 0 when the batch shares one table

  Rotation(const char* op, const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
           int64_t batch, int64_t length, int64_t dk) {
    TORCH_CHECK(cos_in.has_value() == sin_in.has_value(), op, ": cos and sin must be given together");
    if (!cos_in.has_value()) {
      return;
    }
    for (const auto& [name, t] : {std::pair{"cos", &*cos_in}, std::pair{"sin", &*sin_in}}) {
      TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": ", name,
                  " must be float32 on the CPU");
      TORCH_CHECK(t->dim() == 3 && (t->size(0) == 1 || t->size(0) == batch) && t->size(1) == length &&
                      t->size(2) == dk,
                  op, ": ", name, " must be (1 or batch, length, key_dim) = (1 or ", batch, ", ", length, ", ", dk,
                  "), got ", t->sizes());
    }
    cos = cos_in->contiguous();
    sin = sin_in->contiguous();
    cp = cos.data_ptr<float>();
    sp = sin.data_ptr<float>();
    cos_batch = cos.size(0) == 1 ? 0 : length * dk;
    sin_batch = sin.size(0) == 1 ? 0 : length * dk;
  }

  bool any() const { return cp != nullptr; }
  // Row (b, l)'s cos and sin (dk values each).
  const float* cos_at(int64_t b, int64_t l, int64_t dk) const { return cp + b * cos_batch + l * dk; }
  const float* sin_at(int64_t b, int64_t l, int64_t dk) const { return sp + b * sin_batch + l * dk; }
};

// out[j] = x[j] c[j] + r[j] s[j], r = (-x_1, x_0, -x_3, x_2, ...): the forward rotation of one row.
inline void rotate(const float* x, const float* c, const float* s, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 2) {
    const float a = x[i], b = x[i + 1];
    out[i] = a * c[i] - b * s[i];
    out[i + 1] = b * c[i + 1] + a * s[i + 1];
  }
}

// Its transpose: what the forward's output gradient g gives the input.
inline void unrotate(const float* g, const float* c, const float* s, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 2) {
    const float a = g[i], b = g[i + 1];
    out[i] = a * c[i] + b * s[i + 1];
    out[i + 1] = b * c[i + 1] - a * s[i];
  }
}

}  // namespace yaretnet_cpu
