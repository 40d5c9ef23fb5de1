// Weight-only int8 and int4 products for decoding: Y = (X W^T) * scale (+ bias) (+ add), W int8 with one
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
// int4 (qlinear_int4): two 4-bit codes a byte, W = code * scale + low with one scale and low per
// group of input columns (ops/quantized.py packs them: in each block of 32 columns, byte k holds
// column k in its low nibble and column k + 16 in its high one). A row's sum is
//   sum_g scale_g * (sum_{c in g} code_c x_c) + sum_g low_g * (sum_{c in g} x_c),
// the second term from per-vector group sums computed once per call. The codes widen in registers
// (AVX-512: one 16-byte load gives 32 columns); the same L2 blocking reads each byte once per step.
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

// ---------------------------------------------------------------------------------------------
// int4, per group
// ---------------------------------------------------------------------------------------------

// Rows [b, e) of Y = X W^T for N vectors, W int4 (packed: rows x padded / 2 bytes). x holds the N
// float32 vectors (zero-padded to `padded` columns) at stride ldx, xsum their group sums (N x
// groups, stride groups), y the outputs at stride ldy.
template <int N>
void int4_rows(const uint8_t* w, const float* scale, const float* low, const float* x, int64_t ldx,
               const float* xsum, float* y, int64_t ldy, int64_t padded, int64_t group, int64_t b, int64_t e) {
  const int64_t groups = padded / group;
  for (int64_t r = b; r < e; ++r) {
    const uint8_t* wr = w + r * (padded / 2);
    const float* sr = scale + r * groups;
    const float* lr = low + r * groups;
    float out[N];
#if defined(__AVX512F__)
    __m512 total[N];
    for (int v = 0; v < N; ++v) total[v] = _mm512_setzero_ps();
    const __m512i nibble = _mm512_set1_epi32(15);
    for (int64_t g = 0; g < groups; ++g) {
      __m512 acc[N];
      for (int v = 0; v < N; ++v) acc[v] = _mm512_setzero_ps();
      for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
        const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + c / 2)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(wide, nibble));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(wide, 4));
        for (int v = 0; v < N; ++v) {
          acc[v] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x + v * ldx + c), acc[v]);
          acc[v] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + v * ldx + c + 16), acc[v]);
        }
      }
      const __m512 s = _mm512_set1_ps(sr[g]);
      for (int v = 0; v < N; ++v) total[v] = _mm512_fmadd_ps(acc[v], s, total[v]);
    }
    for (int v = 0; v < N; ++v) out[v] = _mm512_reduce_add_ps(total[v]);
#else
    // Portable: 16 lanes of sums per vector that a compiler can keep in vector registers.
    for (int v = 0; v < N; ++v) out[v] = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      for (int v = 0; v < N; ++v) {
        const float* xv = x + v * ldx;
        float acc[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
          const uint8_t* bytes = wr + c / 2;
          for (int k = 0; k < 16; ++k) {
            acc[k] += static_cast<float>(bytes[k] & 15) * xv[c + k];
            acc[k] += static_cast<float>(bytes[k] >> 4) * xv[c + 16 + k];
          }
        }
        float sum = 0.0f;
        for (float a : acc) sum += a;
        out[v] += sum * sr[g];
      }
    }
#endif
    for (int v = 0; v < N; ++v) {
      float offset = 0.0f;
      for (int64_t g = 0; g < groups; ++g) offset += lr[g] * xsum[v * groups + g];
      y[v * ldy + r] = out[v] + offset;
    }
  }
}

void int4_rows_for(const uint8_t* w, const float* scale, const float* low, const float* x, int64_t ldx,
                   const float* xsum, float* y, int64_t ldy, int64_t padded, int64_t group, int64_t b, int64_t e,
                   int64_t n) {
  switch (n) {
    case 1: int4_rows<1>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 2: int4_rows<2>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 3: int4_rows<3>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 4: int4_rows<4>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 5: int4_rows<5>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 6: int4_rows<6>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    case 7: int4_rows<7>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
    default: int4_rows<8>(w, scale, low, x, ldx, xsum, y, ldy, padded, group, b, e); break;
  }
}

// x (n, cols) float32/bfloat16, packed (rows, padded / 2) uint8, scale and low (rows, groups),
// bias (rows,) and add (n, rows) optional -> (n, rows) in x's dtype; float32 sums.
at::Tensor qlinear_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                        const at::Tensor& low, const c10::optional<at::Tensor>& bias,
                        const c10::optional<at::Tensor>& add) {
  constexpr const char* op = "yaretnet::qlinear_int4";
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2, op, ": x and packed must be 2-D, got ", x.sizes(), " and ",
              packed.sizes());
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": packed must be uint8, got ", packed.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scale.device().is_cpu() && low.device().is_cpu(),
              op, ": CPU tensors only");
  const int64_t n = x.size(0), cols = x.size(1), rows = packed.size(0), padded = packed.size(1) * 2;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) > 0 && low.sizes() == scale.sizes(), op,
              ": scale and low must both have shape (", rows, ", groups), got ", scale.sizes(), " and ", low.sizes());
  const int64_t groups = scale.size(1);
  TORCH_CHECK(padded % groups == 0 && (padded / groups) % 32 == 0, op, ": ", padded,
              " packed columns do not split into ", groups, " groups of a multiple of 32");
  const int64_t group = padded / groups;
  TORCH_CHECK(cols <= padded && cols > padded - group, op, ": x has ", cols, " columns but the weight holds ",
              padded, " in groups of ", group);
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows && bias->device().is_cpu(), op,
                ": bias must be a CPU tensor of shape (", rows, "), got ", bias->sizes());
  if (add.has_value())
    TORCH_CHECK(add->dim() == 2 && add->size(0) == n && add->size(1) == rows && add->device().is_cpu(), op,
                ": add must be a CPU tensor of shape (", n, ", ", rows, "), got ", add->sizes());

  at::Tensor xf = x.to(at::kFloat).contiguous();
  if (cols != padded) xf = at::constant_pad_nd(xf, {0, padded - cols}, 0.0).contiguous();
  const at::Tensor xsum = xf.view({n, groups, group}).sum(-1).contiguous();
  const at::Tensor w = packed.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  const at::Tensor l = low.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n, rows}, x.options().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  const float* lp = l.data_ptr<float>();
  const float* xp = xf.data_ptr<float>();
  const float* xs = xsum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (n > 0 && rows > 0) {
    // As for int8: ~64 KB of packed weights per task, ~32 KB blocks that stay in L2 while every
    // group of eight vectors passes over them.
    const int64_t bytes = std::max<int64_t>(1, padded / 2);
    const int64_t grain = std::max<int64_t>(16, 65536 / bytes);
    const int64_t block = n <= kMaxVectors ? rows : std::max<int64_t>(16, 32768 / bytes);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t r0 = b; r0 < e; r0 += block) {
        const int64_t r1 = std::min(e, r0 + block);
        for (int64_t v0 = 0; v0 < n; v0 += kMaxVectors)
          int4_rows_for(wp, sp, lp, xp + v0 * padded, padded, xs + v0 * groups, yp + v0 * rows, rows, padded, group,
                        r0, r1, std::min<int64_t>(kMaxVectors, n - v0));
      }
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  if (add.has_value()) y.add_(add->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("qlinear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, Tensor? add=None) -> Tensor");
  m.def("qlinear_int4(Tensor x, Tensor packed, Tensor scale, Tensor low, Tensor? bias=None, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("qlinear_int8", &qlinear_int8);
  m.impl("qlinear_int4", &qlinear_int4);
}
