// The end of a retention layer before its output projection, in one pass over the rows:
//
//   out[b, l, h dv + j] = silu(gate[b, l, h dv + j]) * (xhat[b, h, l, j] * weight[h dv + j] + bias[h dv + j])
//   xhat[b, h, l, :]    = (x - mean(x)) / sqrt(var(x) + eps),  x = retained[b, h, l, :]  (the paper's GroupNorm)
//
// and its backward (g the output's gradient, s = silu(gate), y = xhat * w + bias):
//
//   dgate = g * y * silu'(gate),  silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
//   dy = g * s;  dbias = sum_rows dy;  dweight = sum_rows dy * xhat
//   dx = rstd * (dy w - mean(dy w) - xhat * mean(dy w * xhat))
//
// Why: compiled, these were a dozen element-wise passes that inductor fused into two kernels with
// poorly parallel column reductions for the weight and bias gradients (~1.3 ms per layer
// backward at 2 x 1,024 tokens, ~4x the minimum memory traffic). Here every row is read once,
// normalised in registers, and the weight/bias gradients are per-thread partial sums. The
// statistics are recomputed in the backward (a row of dv values) rather than saved.
// float32 on the CPU, dv a multiple of 16 (ops/norm_gate.py checks); the PyTorch form there is the
// reference these are tested against and the path everywhere else.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "head_norm.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using yaretnet_cpu::kLanes;
using yaretnet_cpu::norm_gate_row;
using yaretnet_cpu::norm_gate_row_backward;

struct Dims {
  int64_t batch, heads, length, dv;
};

// Checks the inputs; returns retained made row-contiguous (last dim) and the sizes.
Dims checked(const char* op, const at::Tensor& x, const at::Tensor& gate, const at::Tensor& weight,
             const at::Tensor& bias) {
  for (const at::Tensor* t : {&x, &gate, &weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": float32 CPU tensors only");
  }
  TORCH_CHECK(x.dim() == 4, op, ": retained must be (batch, heads, length, head_dim), got ", x.sizes());
  const Dims d{x.size(0), x.size(1), x.size(2), x.size(3)};
  TORCH_CHECK(d.dv % kLanes == 0, op, ": head_dim must be a multiple of ", kLanes, ", got ", d.dv);
  const int64_t width = d.heads * d.dv;
  TORCH_CHECK(gate.dim() == 3 && gate.size(0) == d.batch && gate.size(1) == d.length && gate.size(2) == width, op,
              ": gate must be (batch, length, heads * head_dim) = (", d.batch, ", ", d.length, ", ", width, "), got ",
              gate.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == width && bias.dim() == 1 && bias.size(0) == width, op,
              ": weight and bias must be (", width, ",), got ", weight.sizes(), " and ", bias.sizes());
  return d;
}

at::Tensor last_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor norm_gate(const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& weight_in,
                     const at::Tensor& bias_in, double eps) {
  const char* op = "norm_gate";
  const Dims d = checked(op, x_in, gate_in, weight_in, bias_in);
  const at::Tensor x = last_contiguous(x_in), gate = last_contiguous(gate_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t width = d.heads * d.dv;
  at::Tensor out = at::empty({d.batch, d.length, width}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = gate.data_ptr<float>();
  const float *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xl = x.stride(2), gb = gate.stride(0), gl = gate.stride(1);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, d.batch * d.length, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / d.length, l = r % d.length;
      const float* g = gp + b * gb + l * gl;
      float* o = op_ + r * width;
      for (int64_t h = 0; h < d.heads; ++h) {
        const int64_t c = h * d.dv;
        norm_gate_row(xp + b * xb + h * xh + l * xl, g + c, wp + c, bp + c, d.dv, e, o + c);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_gate_backward(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& gate_in, const at::Tensor& weight_in,
    const at::Tensor& bias_in, double eps) {
  const char* op = "norm_gate_backward";
  const Dims d = checked(op, x_in, gate_in, weight_in, bias_in);
  const int64_t width = d.heads * d.dv;
  TORCH_CHECK(grad_in.scalar_type() == at::kFloat && grad_in.device().is_cpu() &&
                  grad_in.sizes() == at::IntArrayRef({d.batch, d.length, width}),
              op, ": grad must be float32 CPU (batch, length, heads * head_dim), got ", grad_in.sizes());
  const at::Tensor x = last_contiguous(x_in), gate = last_contiguous(gate_in), grad = last_contiguous(grad_in);
  const at::Tensor weight = weight_in.contiguous(), bias = bias_in.contiguous();
  at::Tensor dx = at::empty({d.batch, d.heads, d.length, d.dv}, x.options());
  at::Tensor dgate = at::empty({d.batch, d.length, width}, x.options());
  const float *xp = x.data_ptr<float>(), *gp = gate.data_ptr<float>(), *op_ = grad.data_ptr<float>();
  const float *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *dgp = dgate.data_ptr<float>();
  const int64_t xb = x.stride(0), xh = x.stride(1), xl = x.stride(2), gb = gate.stride(0), gl = gate.stride(1);
  const int64_t ob = grad.stride(0), ol = grad.stride(1);
  const float e = static_cast<float>(eps);
  // The weight and bias gradients: one partial sum per task, added up at the end in task order
  // (a fixed order for a given thread count, so runs repeat exactly).
  const int64_t rows = d.batch * d.length, grain = 256;
  const int64_t tasks = (rows + grain - 1) / grain;
  std::vector<float> partial(static_cast<size_t>(tasks) * 2 * width, 0.0f);
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    std::vector<float> dyw(d.dv);
    for (int64_t task = task_begin; task < task_end; ++task) {
      float* dw = partial.data() + task * 2 * width;
      float* db = dw + width;
      for (int64_t r = task * grain; r < std::min(rows, (task + 1) * grain); ++r) {
        const int64_t b = r / d.length, l = r % d.length;
        const float *g = gp + b * gb + l * gl, *go = op_ + b * ob + l * ol;
        float* dg = dgp + r * width;
        for (int64_t h = 0; h < d.heads; ++h) {
          const int64_t c = h * d.dv;
          norm_gate_row_backward(xp + b * xb + h * xh + l * xl, g + c, go + c, wp + c, bp + c, d.dv, e, dg + c,
                                 dw + c, db + c, dxp + ((b * d.heads + h) * d.length + l) * d.dv, dyw.data());
        }
      }
    }
  });
  at::Tensor dweight = at::zeros({width}, x.options()), dbias = at::zeros({width}, x.options());
  float *dwp = dweight.data_ptr<float>(), *dbp = dbias.data_ptr<float>();
  for (int64_t task = 0; task < tasks; ++task) {
    const float* p = partial.data() + task * 2 * width;
    for (int64_t c = 0; c < width; ++c) {
      dwp[c] += p[c];
      dbp[c] += p[width + c];
    }
  }
  return {dx, dgate, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("norm_gate(Tensor retained, Tensor gate, Tensor weight, Tensor bias, float eps) -> Tensor");
  m.def(
      "norm_gate_backward(Tensor grad, Tensor retained, Tensor gate, Tensor weight, Tensor bias, float eps) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("norm_gate", &norm_gate);
  m.impl("norm_gate_backward", &norm_gate_backward);
}
