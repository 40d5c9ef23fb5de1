// A float32 matrix transposed into a new contiguous one, for the weight gradients of ops/matmul.py.
//
// Why: oneDNN's product reads its left operand row-major, and a weight gradient dY^T X has both
// operands transposed, so one of them is copied first. ATen's copy of a transposed view moved
// ~5 GB/s here (2,048 x 256: 0.8 ms; ~7 ms of a 105 ms training step at 2 x 1,024 tokens). This
// walks 64-row bands over the threads, each as 16 x 16 register blocks (chunk_tiles.h).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "chunk_tiles.h"

#include <algorithm>
#include <cstdint>

namespace {

// out[j, i] = x[i, j] for i in [r0, r1), j in [c0, c1); x rows at stride ld, out rows at stride ldo.
void transpose_part(const float* x, int64_t ld, float* out, int64_t ldo, int64_t r0, int64_t r1, int64_t c0,
                    int64_t c1) {
  for (int64_t i = r0; i < r1; ++i) {
    for (int64_t j = c0; j < c1; ++j) {
      out[j * ldo + i] = x[i * ld + j];
    }
  }
}

at::Tensor transpose_copy(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu() && x_in.dim() == 2,
              "transpose_copy: x must be a 2-D float32 CPU tensor, got ", x_in.dim(), "-D ", x_in.scalar_type(),
              " on ", x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  // The row stride as it is: 0 for a row broadcast by expand() (every row reads the same
  // floats), which rounding it up to 1 would have read as packed rows, past the storage's end.
  const int64_t rows = x.size(0), cols = x.size(1), ld = x.stride(0);
  at::Tensor out = at::empty({cols, rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  constexpr int64_t kBand = 64;
  at::parallel_for(0, (rows + kBand - 1) / kBand, 1, [&](int64_t begin, int64_t end) {
    for (int64_t band = begin; band < end; ++band) {
      const int64_t r0 = band * kBand, r1 = std::min(rows, r0 + kBand);
#if defined(__AVX512F__)
      const int64_t r16 = r0 + (r1 - r0) / 16 * 16, c16 = cols / 16 * 16;
      for (int64_t j = 0; j < c16; j += 16) {
        for (int64_t i = r0; i < r16; i += 16) {
          yaretnet_cpu::chunk::transpose16(xp + i * ld + j, ld, op + j * rows + i, rows, nullptr);
        }
      }
      transpose_part(xp, ld, op, rows, r0, r1, c16, cols);
      transpose_part(xp, ld, op, rows, r16, r1, 0, c16);
#else
      transpose_part(xp, ld, op, rows, r0, r1, 0, cols);
#endif
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) { m.def("transpose_copy(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) { m.impl("transpose_copy", &transpose_copy); }
