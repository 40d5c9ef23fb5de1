// Weight-only int8 products for decoding: Y = (X W^T) * scale (+ bias) (+ add), W int8 with one
// float32 scale per output channel (row).
//
// Decoding is bound by the bytes of weights each token reads; int8 weights are a quarter of
// float32's. The rows are the gemv kernel's (gemv.h: several streams through memory, the int8
// widened to float32 in registers, float32 sums); the scale multiplies each row's sum once, after
// the loop. Up to eight vectors share one pass over the weights. For more (up to a few dozen rows
// of a batch), each task walks its rows in blocks small enough to stay in the L2 cache and runs
// every group of eight vectors over a block before moving on: each weight byte comes from memory
// once per step, whatever the batch.
//
// The reference is the float form: dequantize (weight * scale[:, None]) then F.linear
// (ops/quantized.py falls back to it, and the tests compare against it). Built with -march=native
// like the rest of the extension: AVX-512 where the building CPU has it, the portable loop
// otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv.h"

#include <algorithm>
#include <cstdint>

namespace {

using yaretnet_cpu::gemv_rows_multi;
using yaretnet_cpu::kMaxVectors;

// Rows [b, e) for n (1 to kMaxVectors) vectors: the unscaled int8 sums.
void rows_for(const int8_t* w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t cols, int64_t b,
              int64_t e, int64_t n) {
  switch (n) {
    case 1: gemv_rows_multi<int8_t, 1>(w, x, ldx, y, ldy, cols, b, e); break;
    case 2: gemv_rows_multi<int8_t, 2>(w, x, ldx, y, ldy, cols, b, e); break;
    case 3: gemv_rows_multi<int8_t, 3>(w, x, ldx, y, ldy, cols, b, e); break;
    case 4: gemv_rows_multi<int8_t, 4>(w, x, ldx, y, ldy, cols, b, e); break;
    case 5: gemv_rows_multi<int8_t, 5>(w, x, ldx, y, ldy, cols, b, e); break;
    case 6: gemv_rows_multi<int8_t, 6>(w, x, ldx, y, ldy, cols, b, e); break;
    case 7: gemv_rows_multi<int8_t, 7>(w, x, ldx, y, ldy, cols, b, e); break;
    default: gemv_rows_multi<int8_t, 8>(w, x, ldx, y, ldy, cols, b, e); break;
  }
}

// x (n, cols) float32/bfloat16, weight (rows, cols) int8, scale (rows,) float32, bias (rows,) and
// add (n, rows) optional -> (n, rows) in x's dtype; float32 sums, rounded once at the end.
at::Tensor qlinear_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add) {
  constexpr const char* op = "yaretnet::qlinear_int8";
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, op, ": x and weight must be 2-D, got ", x.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == at::kChar, op, ": weight must be int8, got ", weight.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu() && scale.device().is_cpu(), op, ": CPU tensors only");
  const int64_t n = x.size(0), cols = x.size(1), rows = weight.size(0);
  TORCH_CHECK(weight.size(1) == cols, op, ": weight has ", weight.size(1), " columns but x has ", cols);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == rows, op, ": scale must have shape (", rows, "), got ",
              scale.sizes());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows && bias->device().is_cpu(), op,
                ": bias must be a CPU tensor of shape (", rows, "), got ", bias->sizes());
  if (add.has_value())
    TORCH_CHECK(add->dim() == 2 && add->size(0) == n && add->size(1) == rows && add->device().is_cpu(), op,
                ": add must be a CPU tensor of shape (", n, ", ", rows, "), got ", add->sizes());

  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n, rows}, x.options().dtype(at::kFloat));
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (n > 0 && rows > 0) {
    // ~64 KB of weights per task amortises the scheduling; ~32 KB blocks stay in L2 while every
    // group of eight vectors passes over them.
    const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, cols));
    const int64_t block = n <= kMaxVectors ? rows : std::max<int64_t>(16, 32768 / std::max<int64_t>(1, cols));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r0 = b; r0 < e; r0 += block) {
        const int64_t r1 = std::min(e, r0 + block);
        for (int64_t v0 = 0; v0 < n; v0 += kMaxVectors)
          rows_for(wp, xp + v0 * cols, cols, yp + v0 * rows, rows, cols, r0, r1,
                   std::min<int64_t>(kMaxVectors, n - v0));
      }
    });
  }
  // The scales, bias and residual: one pass over the small output.
  y.mul_(s);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  if (add.has_value()) y.add_(add->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("qlinear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("qlinear_int8", &qlinear_int8);
}
