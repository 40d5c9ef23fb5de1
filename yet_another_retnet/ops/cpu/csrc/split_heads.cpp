// The fused projection of a retention layer split into per-head tensors, queries and keys rotated:
//
//   proj (b, L, 2 h dk + 2 V), columns [q | k | v | gate], V = h dv
//   q, k (b, h, L, dk)  rotated by position: (x_2i, x_2i+1) -> (x_2i c - x_2i+1 s, x_2i+1 c + x_2i s)
//   v    (b, h, L, dv)
//   gate (b, L, V)
//
// all four contiguous, and the backward: the gradients written back into one (b, L, 2 h dk + 2 V)
// tensor, the rotation transposed (x_2i <- g_2i c + g_2i+1 s, x_2i+1 <- g_2i+1 c - g_2i s).
// Why: in eager PyTorch this is a complex multiply, three layout copies and, backward, a conjugate
// multiply and a concatenation of four gradients: six passes over the projection each way, ~8% of
// an eager training step at 2 x 1,024 tokens. Here it is one read and one write each way.
// cos/sin: (1 or b, L, dk), each angle repeated for its pair (ops/position.py's tables), or absent
// (no rotation). float32 on the CPU; ops/split_heads.py has the PyTorch form it is tested against.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "projection.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>

namespace {

using yaretnet_cpu::proj_dims;
using yaretnet_cpu::ProjDims;
using yaretnet_cpu::Rotation;
using yaretnet_cpu::rotate;
using yaretnet_cpu::unrotate;

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> split_heads(const at::Tensor& proj_in,
                                                                       const std::optional<at::Tensor>& cos_in,
                                                                       const std::optional<at::Tensor>& sin_in,
                                                                       int64_t heads, int64_t key_dim) {
  const char* op = "split_heads";
  TORCH_CHECK(proj_in.scalar_type() == at::kFloat && proj_in.device().is_cpu() && proj_in.dim() == 3, op,
              ": proj must be a float32 CPU (batch, length, width) tensor, got ", proj_in.sizes());
  const ProjDims d = proj_dims(op, proj_in.size(0), proj_in.size(1), proj_in.size(2), heads, key_dim);
  const at::Tensor proj = proj_in.stride(2) == 1 ? proj_in : proj_in.contiguous();
  const Rotation rot(op, cos_in, sin_in, d.batch, d.length, d.dk);
  const at::TensorOptions o = proj.options();
  at::Tensor q = at::empty({d.batch, d.heads, d.length, d.dk}, o), k = at::empty({d.batch, d.heads, d.length, d.dk}, o);
  at::Tensor v = at::empty({d.batch, d.heads, d.length, d.dv}, o);
  at::Tensor gate = at::empty({d.batch, d.length, d.heads * d.dv}, o);
  const float* pp = proj.data_ptr<float>();
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(), *gp = gate.data_ptr<float>();
  const int64_t pb = proj.stride(0), pl = proj.stride(1), hk = d.heads * d.dk, hv = d.heads * d.dv;
  at::parallel_for(0, d.batch * d.length, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.length, l = r % d.length;
      const float* row = pp + b * pb + l * pl;
      const float* c = rot.any() ? rot.cos_at(b, l, d.dk) : nullptr;
      const float* s = rot.any() ? rot.sin_at(b, l, d.dk) : nullptr;
      for (int64_t h = 0; h < d.heads; ++h) {
        const int64_t head_row = (b * d.heads + h) * d.length + l;  // row of (b, h, L, .)
        const int64_t at_k = head_row * d.dk, at_v = head_row * d.dv;
        if (rot.any()) {
          rotate(row + h * d.dk, c, s, d.dk, qp + at_k);
          rotate(row + hk + h * d.dk, c, s, d.dk, kp + at_k);
        } else {
          std::memcpy(qp + at_k, row + h * d.dk, sizeof(float) * d.dk);
          std::memcpy(kp + at_k, row + hk + h * d.dk, sizeof(float) * d.dk);
        }
        std::memcpy(vp + at_v, row + 2 * hk + h * d.dv, sizeof(float) * d.dv);
      }
      std::memcpy(gp + r * hv, row + 2 * hk + hv, sizeof(float) * hv);
    }
  });
  return {q, k, v, gate};
}

at::Tensor split_heads_backward(const std::optional<at::Tensor>& dq_in, const std::optional<at::Tensor>& dk_in,
                                const std::optional<at::Tensor>& dv_in, const std::optional<at::Tensor>& dgate_in,
                                const std::optional<at::Tensor>& cos_in, const std::optional<at::Tensor>& sin_in,
                                int64_t batch, int64_t length, int64_t width, int64_t heads, int64_t key_dim) {
  const char* op = "split_heads_backward";
  const ProjDims d = proj_dims(op, batch, length, width, heads, key_dim);
  const Rotation rot(op, cos_in, sin_in, d.batch, d.length, d.dk);
  // A gradient that is absent (that output unused) contributes zeros.
  auto grad = [&](const std::optional<at::Tensor>& t, int64_t w, const char* name) -> at::Tensor {
    if (!t.has_value() || !t->defined()) {
      return at::Tensor();
    }
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu() && t->numel() == d.batch * d.length * w, op,
                ": ", name, " must be float32 on the CPU with ", d.batch * d.length * w, " elements, got ", t->sizes());
    return t->contiguous();
  };
  const at::Tensor dq = grad(dq_in, d.heads * d.dk, "dq"), dk = grad(dk_in, d.heads * d.dk, "dk");
  const at::Tensor dv = grad(dv_in, d.heads * d.dv, "dv"), dgate = grad(dgate_in, d.heads * d.dv, "dgate");
  at::Tensor out = at::empty({d.batch, d.length, d.width}, at::TensorOptions().dtype(at::kFloat));
  const float *dqp = data_or_null(dq), *dkp = data_or_null(dk), *dvp = data_or_null(dv), *dgp = data_or_null(dgate);
  float* op_ = out.data_ptr<float>();
  const int64_t hk = d.heads * d.dk, hv = d.heads * d.dv;
  at::parallel_for(0, d.batch * d.length, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.length, l = r % d.length;
      float* row = op_ + r * d.width;
      const float* c = rot.any() ? rot.cos_at(b, l, d.dk) : nullptr;
      const float* s = rot.any() ? rot.sin_at(b, l, d.dk) : nullptr;
      for (int64_t h = 0; h < d.heads; ++h) {
        const int64_t head_row = (b * d.heads + h) * d.length + l;  // row of (b, h, L, .)
        const int64_t at_k = head_row * d.dk, at_v = head_row * d.dv;
        for (const auto& [src, dst] : {std::pair{dqp, row + h * d.dk}, std::pair{dkp, row + hk + h * d.dk}}) {
          if (src == nullptr) {
            std::memset(dst, 0, sizeof(float) * d.dk);
          } else if (rot.any()) {
            unrotate(src + at_k, c, s, d.dk, dst);
          } else {
            std::memcpy(dst, src + at_k, sizeof(float) * d.dk);
          }
        }
        float* vdst = row + 2 * hk + h * d.dv;
        if (dvp == nullptr) {
          std::memset(vdst, 0, sizeof(float) * d.dv);
        } else {
          std::memcpy(vdst, dvp + at_v, sizeof(float) * d.dv);
        }
      }
      if (dgp == nullptr) {
        std::memset(row + 2 * hk + hv, 0, sizeof(float) * hv);
      } else {
        std::memcpy(row + 2 * hk + hv, dgp + r * hv, sizeof(float) * hv);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def(
      "split_heads(Tensor proj, Tensor? cos, Tensor? sin, int heads, int key_dim) -> (Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "split_heads_backward(Tensor? dq, Tensor? dk, Tensor? dv, Tensor? dgate, Tensor? cos, Tensor? sin, int batch, "
      "int length, int width, int heads, int key_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("split_heads", &split_heads);
  m.impl("split_heads_backward", &split_heads_backward);
}
