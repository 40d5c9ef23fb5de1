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
// Where the CPU has AVX512-VNNI both products take int_dot.h's integer dot products instead: the
// activations rounded to 16-bit fixed point once per call, exact int32 sums (why and how: there).
// A vector holding inf or NaN takes the float loop, so it propagates as in the reference.
//
// The reference is the float form: dequantize (weight * scale[:, None]) then F.linear
// (ops/quantized.py falls back to it, and the tests compare against it). Built with -march=native
// like the rest of the extension: AVX-512 where the building CPU has it, the portable loop
// otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv.h"
#include "int_dot.h"
#include "quantized.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using yaretnet_cpu::gemv_rows_multi;
using yaretnet_cpu::kMaxVectors;

// Runs body(r0, r1, v0, nv) over the (rows x n) output, parallel over rows: ~64 KB of weights per
// task amortises the scheduling; for more than kMaxVectors vectors each task walks its rows in
// ~32 KB blocks that stay in L2 while every group of (up to) kMaxVectors vectors passes over them,
// so each weight byte comes from memory once per call, whatever the batch.
// `only`: rows [only->lo, only->hi) alone, on the calling thread (a team member's share).
template <typename Body>
void for_row_blocks(int64_t rows, int64_t row_bytes, int64_t n, const yaretnet_cpu::RowRange* only,
                    const Body& body) {
  if (n <= 0 || rows <= 0) return;
  row_bytes = std::max<int64_t>(1, row_bytes);
  const int64_t block = n <= kMaxVectors ? rows : std::max<int64_t>(16, 32768 / row_bytes);
  const auto range = [&](int64_t b, int64_t e) {
    for (int64_t r0 = b; r0 < e; r0 += block) {
      const int64_t r1 = std::min(e, r0 + block);
      for (int64_t v0 = 0; v0 < n; v0 += kMaxVectors) body(r0, r1, v0, std::min<int64_t>(kMaxVectors, n - v0));
    }
  };
  if (only != nullptr) {
    range(std::max<int64_t>(0, only->lo), std::min(rows, only->hi));
  } else {
    at::parallel_for(0, rows, yaretnet_cpu::product_grain(row_bytes), range);
  }
}

// Calls fn(std::integral_constant<int, N>{}) for N = n (1 to kMaxVectors): the kernels are
// templates on the vector count, so their accumulators stay in registers.
template <typename Fn>
void with_vectors(int64_t n, const Fn& fn) {
  switch (n) {
    case 1: fn(std::integral_constant<int, 1>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    case 3: fn(std::integral_constant<int, 3>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 5: fn(std::integral_constant<int, 5>{}); break;
    case 6: fn(std::integral_constant<int, 6>{}); break;
    case 7: fn(std::integral_constant<int, 7>{}); break;
    default: fn(std::integral_constant<int, 8>{}); break;
  }
}

// ---------------------------------------------------------------------------------------------
// int4, per group: the float loop (without AVX512-VNNI)
// ---------------------------------------------------------------------------------------------

// Rows [b, e) of Y = X W^T for N vectors, W int4 (codes: padded / 2 bytes a row). x holds the N
// float32 vectors (zero-padded to `padded` columns) at stride ldx, xsum their group sums (N x
// groups, stride groups), y the outputs at stride ldy.
template <int N>
void int4_rows(const yaretnet_cpu::Int4Weight& w, const float* x, int64_t ldx, const float* xsum, float* y,
               int64_t ldy, int64_t b, int64_t e) {
  const int64_t padded = w.padded, group = w.group, groups = w.groups();
  for (int64_t r = b; r < e; ++r) {
    const uint8_t* wr = w.codes_row(r);
    const float* sr = w.scale_row(r);
    const float* lr = w.low_row(r);
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

}  // namespace

namespace yaretnet_cpu {

void int8_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const int8_t* w, const float* scale,
                  int64_t rows, float* y, int64_t ldy, const RowRange* only) {
  if (n <= 0 || rows <= 0) return;
#if defined(YARETNET_INT_DOT)
  const int64_t ldq = (cols + 31) / 32 * 32;
  std::vector<int16_t> xq(n * ldq);
  std::vector<float> xs(n);
  if (quantize_activations(x, ldx, n, cols, xq.data(), ldq, ldq, xs.data(), false)) {
    for_row_blocks(rows, cols, n, only, [&](int64_t r0, int64_t r1, int64_t v0, int64_t nv) {
      with_vectors(nv, [&](auto count) {
        int8_dot_range<decltype(count)::value>(w, xq.data() + v0 * ldq, ldq, xs.data() + v0, scale, y + v0 * ldy, ldy,
                                               cols, r0, r1);
      });
    });
    return;
  }
#endif
  for_row_blocks(rows, cols, n, only, [&](int64_t r0, int64_t r1, int64_t v0, int64_t nv) {
    with_vectors(nv, [&](auto count) {
      gemv_rows_multi<int8_t, decltype(count)::value>(w, x + v0 * ldx, ldx, y + v0 * ldy, ldy, cols, r0, r1);
    });
  });
  const int64_t lo = only != nullptr ? std::max<int64_t>(0, only->lo) : 0;
  const int64_t hi = only != nullptr ? std::min(rows, only->hi) : rows;
  for (int64_t v = 0; v < n; ++v)  // the scales: one pass over the small output
    for (int64_t r = lo; r < hi; ++r) y[v * ldy + r] *= scale[r];
}

void int4_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const Int4Weight& w, int64_t rows, float* y,
                  int64_t ldy, const RowRange* only) {
  if (n <= 0 || rows <= 0) return;
  const int64_t padded = w.padded, group = w.group, groups = w.groups();
  // The vectors' group sums (the lows' term), eight partial sums a group so the loop vectorises.
  std::vector<float> xsum(n * groups, 0.0f);
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t g = 0; g < groups; ++g) {
      const float* seg = x + v * ldx + g * group;
      const int64_t len = std::max<int64_t>(0, std::min(group, cols - g * group));
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= len; i += 8)
        for (int j = 0; j < 8; ++j) part[j] += seg[i + j];
      float sum = 0.0f;
      for (; i < len; ++i) sum += seg[i];
      for (float p : part) sum += p;
      xsum[v * groups + g] = sum;
    }
  }
  const float* xs = xsum.data();
  const int64_t row_bytes = int4_row_bytes(w);  // the task grain and L2 blocks of for_row_blocks
#if defined(YARETNET_INT_DOT)
  const int64_t ldq = (padded + 63) / 64 * 64;
  std::vector<int16_t> xq(n * ldq);
  std::vector<float> xscale(n);
  if (quantize_activations(x, ldx, n, cols, xq.data(), ldq, ldq, xscale.data(), true)) {
    for_row_blocks(rows, row_bytes, n, only, [&](int64_t r0, int64_t r1, int64_t v0, int64_t nv) {
      with_vectors(nv, [&](auto count) {
        int4_dot_range<decltype(count)::value>(w, xq.data() + v0 * ldq, ldq, xscale.data() + v0, xs + v0 * groups,
                                               y + v0 * ldy, ldy, r0, r1);
      });
    });
    return;
  }
#endif
  // The float loop reads the vectors zero-padded to the packed width.
  std::vector<float> xpad(n * padded, 0.0f);
  for (int64_t v = 0; v < n; ++v) std::copy(x + v * ldx, x + v * ldx + cols, xpad.begin() + v * padded);
  const float* xp = xpad.data();
  for_row_blocks(rows, row_bytes, n, only, [&](int64_t r0, int64_t r1, int64_t v0, int64_t nv) {
    with_vectors(nv, [&](auto count) {
      int4_rows<decltype(count)::value>(w, xp + v0 * padded, padded, xs + v0 * groups, y + v0 * ldy, ldy, r0, r1);
    });
  });
}

}  // namespace yaretnet_cpu

namespace {

using yaretnet_cpu::int4_product;
using yaretnet_cpu::int8_product;

void check_bias_add(const char* op, const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& add,
                    int64_t n, int64_t rows) {
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == rows && bias->device().is_cpu(), op,
                ": bias must be a CPU tensor of shape (", rows, "), got ", bias->sizes());
  if (add.has_value())
    TORCH_CHECK(add->dim() == 2 && add->size(0) == n && add->size(1) == rows && add->device().is_cpu(), op,
                ": add must be a CPU tensor of shape (", n, ", ", rows, "), got ", add->sizes());
}

// y (n, rows) float32 plus the bias and residual, in x's dtype.
at::Tensor finish(at::Tensor y, const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                  const c10::optional<at::Tensor>& add) {
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  if (add.has_value()) y.add_(add->to(at::kFloat));
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
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
  check_bias_add(op, bias, add, n, rows);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor s = scale.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({n, rows}, x.options().dtype(at::kFloat));
  int8_product(xf.data_ptr<float>(), cols, n, cols, w.data_ptr<int8_t>(), s.data_ptr<float>(), rows,
               y.data_ptr<float>(), rows);
  return finish(y, x, bias, add);
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
  const int64_t n = x.size(0), cols = x.size(1), rows = packed.size(0);
  check_bias_add(op, bias, add, n, rows);
  // Rows at any stride are read where they are (a decoding plan's interleaved buffer); anything
  // else is copied into the form the kernels read.
  const auto rowwise = [](const at::Tensor& t, at::ScalarType dtype) {
    at::Tensor u = t.to(dtype);
    return yaretnet_cpu::rows_in_place(u) ? u : u.contiguous();
  };
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const at::Tensor w = rowwise(packed, at::kByte), s = rowwise(scale, at::kFloat), l = rowwise(low, at::kFloat);
  const yaretnet_cpu::Int4Weight weight = yaretnet_cpu::int4_weight(op, w, s, l, rows, cols);
  at::Tensor y = at::empty({n, rows}, x.options().dtype(at::kFloat));
  int4_product(xf.data_ptr<float>(), cols, n, cols, weight, rows, y.data_ptr<float>(), rows);
  return finish(y, x, bias, add);
}

// Whether this build takes int_dot.h's integer dot products (AVX512-VNNI at compile time).
bool quantized_integer_dot() {
#if defined(YARETNET_INT_DOT)
  return true;
#else
  return false;
#endif
}

}  // namespace

namespace yaretnet_cpu {

bool rows_in_place(const at::Tensor& t) {
  return t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1);
}

Int4Weight int4_weight(const char* op, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low,
                       int64_t rows, int64_t cols) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(0) == rows, op,
              ": packed must be a uint8 (", rows, ", padded / 2) matrix, got ", packed.sizes(), " ",
              packed.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == rows && scale.size(1) > 0 && low.sizes() == scale.sizes(), op,
              ": scale and low must both have shape (", rows, ", groups), got ", scale.sizes(), " and ", low.sizes());
  for (const auto& [name, t] : {std::pair{"packed", &packed}, std::pair{"scale", &scale}, std::pair{"low", &low}}) {
    TORCH_CHECK(t->device().is_cpu() && rows_in_place(*t), op, ": ", name,
                " must be a CPU matrix with contiguous rows, got strides ", t->strides());
    TORCH_CHECK(t == &packed || t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                t->scalar_type());
  }
  const int64_t padded = packed.size(1) * 2, groups = scale.size(1);
  TORCH_CHECK(padded % groups == 0 && (padded / groups) % 32 == 0, op, ": ", padded,
              " packed columns do not split into ", groups, " groups of a multiple of 32");
  const int64_t group = padded / groups;
  TORCH_CHECK(cols <= padded && cols > padded - group, op, ": x has ", cols, " columns but the weight holds ",
              padded, " in groups of ", group);
  return {packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), low.data_ptr<float>(), packed.stride(0),
          scale.stride(0), low.stride(0), padded, group};
}

}  // namespace yaretnet_cpu

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("quantized_integer_dot() -> bool", &quantized_integer_dot);  // no tensors: a catch-all kernel
  m.def("qlinear_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias=None, Tensor? add=None) -> Tensor");
  m.def("qlinear_int4(Tensor x, Tensor packed, Tensor scale, Tensor low, Tensor? bias=None, Tensor? add=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("qlinear_int8", &qlinear_int8);
  m.impl("qlinear_int4", &qlinear_int4);
}
