// Matrix-vector product for one decoding step on the CPU: y = W x (+ add).
//
// Decoding one token reads every weight once and does two FLOPs per weight, so it is bound by
// how fast the weights stream from memory. PyTorch's gemv (MKL for float32, ATen's own loop for
// bfloat16) walks the rows one after another: one stream through memory per thread, which on
// our CPUs reads float32 at ~29 GB/s and bfloat16 at ~24 GB/s (both cores).
// This kernel reads eight rows at once, far apart, with one accumulator each (measured: ~33 GB/s
// either way, bfloat16 1.4x faster than torch.mv), converts
// bfloat16 to float32 in registers (a 16-bit shift: exact), accumulates in float32 and splits
// the rows over PyTorch's own intra-op thread pool (at::parallel_for), so it never starts a second
// OpenMP runtime. Where the CPU has AVX512-BF16, bfloat16 weights take VDPBF16PS instead, the
// vector rounded to bfloat16 once (gemv.h says why).
//
// The plain reference is torch.mv / torch.addmv (ops/gemv.py falls back to it, and the tests
// compare against it). Built with -march=native by torch.utils.cpp_extension on first use: the
// AVX-512 path is compiled only where the building CPU has AVX-512, the portable loop otherwise.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv.h"

#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

using yaretnet_cpu::bf16_to_float;
using yaretnet_cpu::float_prefetch_ahead;
using yaretnet_cpu::gemv_parallel;
using yaretnet_cpu::int_prefetch_ahead;

// A float32 copy of a float32 or bfloat16 vector (decoding vectors are a few thousand elements).
std::vector<float> to_float(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  std::vector<float> out(static_cast<size_t>(c.numel()));
  if (c.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), c.data_ptr<float>(), out.size() * sizeof(float));
  } else {
    const auto* p = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
    for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(p[i]);
  }
  return out;
}

// y (rows,) = weight (rows, cols) @ x (cols,) [+ add (rows,)], in weight's dtype; float32 sums,
// rounded once at the end.
at::Tensor gemv(const at::Tensor& weight, const at::Tensor& x, const c10::optional<at::Tensor>& add) {
  TORCH_CHECK(weight.dim() == 2 && x.dim() == 1, "yaretnet::gemv: weight must be 2-D and x 1-D, got ",
              weight.sizes(), " and ", x.sizes());
  TORCH_CHECK(weight.size(1) == x.size(0), "yaretnet::gemv: weight has ", weight.size(1),
              " columns but x has ", x.size(0), " elements");
  TORCH_CHECK(weight.device().is_cpu() && x.device().is_cpu(), "yaretnet::gemv: CPU tensors only");
  const auto wtype = weight.scalar_type();
  auto float_or_bf16 = [](at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16; };
  TORCH_CHECK(float_or_bf16(wtype) && float_or_bf16(x.scalar_type()),
              "yaretnet::gemv: weight and x must be float32 or bfloat16, got ", wtype, " and ", x.scalar_type());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  std::vector<float> addf;
  if (add.has_value()) {
    TORCH_CHECK(add->dim() == 1 && add->size(0) == rows && add->device().is_cpu() &&
                float_or_bf16(add->scalar_type()),
                "yaretnet::gemv: add must be a float32 or bfloat16 CPU tensor of shape (", rows, "), got ",
                add->sizes(), " ", add->scalar_type());
    addf = to_float(*add);
  }
  const at::Tensor w = weight.contiguous();
  const std::vector<float> xf = to_float(x);
  at::Tensor y = at::empty({rows}, weight.options());
  std::vector<float> sums(static_cast<size_t>(rows));
  float* yp = sums.data();
  auto run = [&](auto* wp) {
    gemv_parallel(wp, xf.data(), yp, rows, cols);
    if (!addf.empty())
      for (int64_t r = 0; r < rows; ++r) yp[r] += addf[r];
  };
  if (wtype == at::kFloat) {
    run(w.data_ptr<float>());
    std::memcpy(y.data_ptr<float>(), yp, sums.size() * sizeof(float));
  } else {
    run(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
    at::BFloat16* out = y.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < rows; ++r) out[r] = at::BFloat16(yp[r]);  // round to nearest even
  }
  return y;
}

// Whether bfloat16 weights take VDPBF16PS (AVX512-BF16 at compile time: the vector is then
// rounded to bfloat16).
bool gemv_bf16_dot() {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

// The decoding kernels' memory choices (tuning.h), set once at load from ops/cpu/machine.py's
// choice for this CPU; read back as (float32/bfloat16 prefetch bytes, int8/int4 prefetch bytes,
// streaming stores for the state).
void set_decode_tuning(int64_t float_prefetch, int64_t int_prefetch, bool stream) {
  for (const int64_t bytes : {float_prefetch, int_prefetch})
    TORCH_CHECK(bytes >= 0 && bytes <= 8192 && bytes % 64 == 0,
                "yaretnet::set_decode_tuning: a prefetch distance must be a multiple of 64 bytes from 0 to 8192, got ",
                bytes);
  float_prefetch_ahead.store(float_prefetch, std::memory_order_relaxed);
  int_prefetch_ahead.store(int_prefetch, std::memory_order_relaxed);
  yaretnet_cpu::stream_state.store(stream, std::memory_order_relaxed);
}

std::tuple<int64_t, int64_t, bool> decode_tuning() {
  return {float_prefetch_ahead.load(std::memory_order_relaxed), int_prefetch_ahead.load(std::memory_order_relaxed),
          yaretnet_cpu::stream_state.load(std::memory_order_relaxed)};
}

}  // namespace

TORCH_LIBRARY(yaretnet, m) {
  m.def("gemv(Tensor weight, Tensor x, Tensor? add=None) -> Tensor");
  m.def("gemv_bf16_dot() -> bool", &gemv_bf16_dot);  // no tensors: a catch-all kernel
  m.def("set_decode_tuning(int float_prefetch, int int_prefetch, bool stream_state) -> ()", &set_decode_tuning);
  m.def("decode_tuning() -> (int, int, bool)", &decode_tuning);
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("gemv", &gemv);
}
