// The state before every chunk of chunkwise retention, as a scan over the chunks.
//
// With R_i what chunk i alone adds to the state and d = gamma^c the decay over one chunk:
//   before_0 = prev (or 0),  before_{i+1} = d * before_i + R_i,  final = before_n.
// ops/retention.py's plain form computes the same as one (n x n) decay-matrix product per head,
// which costs 2 n^2 dk dv FLOPs instead of the scan's 2 n dk dv: at 16k tokens in chunks of 128
// that product ran at ~100 GFLOP/s and took ~45 ms of a d256 training step (forward and
// backward), the scan takes a few. The backward is the same scan run backwards:
//   g_n = dfinal,  dR_i = g_{i+1},  g_i = dbefore_i + d * g_{i+1},  dprev = g_0.
// float32 on the CPU; the decay-matrix form is the reference it is tested against.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

constexpr int64_t kTile = 256;  // state elements per task: long enough to vectorise, many tasks

void check(const at::Tensor& contrib, const at::Tensor& decay) {
  TORCH_CHECK(contrib.dim() == 4, "chunk_scan: contributions must be (batch, heads, chunks, state), got ",
              contrib.sizes());
  TORCH_CHECK(decay.dim() == 1 && decay.size(0) == contrib.size(1), "chunk_scan: decay must be (heads,) = (",
              contrib.size(1), "), got ", decay.sizes());
  TORCH_CHECK(contrib.scalar_type() == at::kFloat && decay.scalar_type() == at::kFloat && contrib.device().is_cpu() &&
                  decay.device().is_cpu(),
              "chunk_scan: float32 CPU tensors only");
}

// Calls body(row, begin, end) for every (batch * heads) row and tile [begin, end) of the state.
template <typename Body>
void over_tiles(int64_t rows, int64_t size, const Body& body) {
  const int64_t tiles = (size + kTile - 1) / kTile;
  at::parallel_for(0, rows * tiles, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const int64_t begin = (t % tiles) * kTile;
      body(t / tiles, begin, std::min(begin + kTile, size));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> chunk_scan(const at::Tensor& contrib_in, const at::Tensor& decay_in,
                                              const std::optional<at::Tensor>& prev_in) {
  check(contrib_in, decay_in);
  const at::Tensor contrib = contrib_in.contiguous(), decay = decay_in.contiguous();
  const int64_t heads = contrib.size(1), n = contrib.size(2), size = contrib.size(3);
  const int64_t rows = contrib.size(0) * heads;
  at::Tensor prev;
  if (prev_in.has_value()) {
    TORCH_CHECK(prev_in->dim() == 3 && prev_in->size(0) == contrib.size(0) && prev_in->size(1) == heads &&
                    prev_in->size(2) == size && prev_in->scalar_type() == at::kFloat,
                "chunk_scan: prev must be float32 (batch, heads, state), got ", prev_in->sizes());
    prev = prev_in->contiguous();
  }
  at::Tensor befores = at::empty(contrib.sizes(), contrib.options());
  at::Tensor final = at::empty({contrib.size(0), heads, size}, contrib.options());
  const float *cp = contrib.data_ptr<float>(), *dp = decay.data_ptr<float>();
  const float* pp = prev.defined() ? prev.data_ptr<float>() : nullptr;
  float *bp = befores.data_ptr<float>(), *fp = final.data_ptr<float>();
  over_tiles(rows, size, [&](int64_t row, int64_t begin, int64_t end) {
    const float d = dp[row % heads];
    float state[kTile];
    const int64_t w = end - begin;
    for (int64_t j = 0; j < w; ++j) {
      state[j] = pp ? pp[row * size + begin + j] : 0.0f;
    }
    for (int64_t i = 0; i < n; ++i) {
      const float* r = cp + (row * n + i) * size + begin;
      float* out = bp + (row * n + i) * size + begin;
      for (int64_t j = 0; j < w; ++j) {
        out[j] = state[j];
        state[j] = d * state[j] + r[j];
      }
    }
    std::copy(state, state + w, fp + row * size + begin);
  });
  return {befores, final};
}

// Returns (d contributions, d prev); d prev is an empty tensor unless has_prev.
std::tuple<at::Tensor, at::Tensor> chunk_scan_backward(const at::Tensor& grad_befores_in,
                                                       const at::Tensor& grad_final_in, const at::Tensor& decay_in,
                                                       bool has_prev) {
  check(grad_befores_in, decay_in);
  const at::Tensor gb = grad_befores_in.contiguous(), gf = grad_final_in.contiguous(), decay = decay_in.contiguous();
  const int64_t batch = gb.size(0), heads = gb.size(1), n = gb.size(2), size = gb.size(3);
  TORCH_CHECK(gf.sizes() == at::IntArrayRef({batch, heads, size}) && gf.scalar_type() == at::kFloat,
              "chunk_scan_backward: grad_final must be float32 (batch, heads, state)");
  at::Tensor grad_contrib = at::empty(gb.sizes(), gb.options());
  at::Tensor grad_prev = has_prev ? at::empty({batch, heads, size}, gb.options()) : at::empty({0}, gb.options());
  const float *gbp = gb.data_ptr<float>(), *gfp = gf.data_ptr<float>(), *dp = decay.data_ptr<float>();
  float* gcp = grad_contrib.data_ptr<float>();
  float* gpp = has_prev ? grad_prev.data_ptr<float>() : nullptr;
  over_tiles(batch * heads, size, [&](int64_t row, int64_t begin, int64_t end) {
    const float d = dp[row % heads];
    float g[kTile];
    const int64_t w = end - begin;
    std::copy(gfp + row * size + begin, gfp + row * size + end, g);
    for (int64_t i = n - 1; i >= 0; --i) {
      const float* gbi = gbp + (row * n + i) * size + begin;
      float* out = gcp + (row * n + i) * size + begin;
      for (int64_t j = 0; j < w; ++j) {
        out[j] = g[j];
        g[j] = gbi[j] + d * g[j];
      }
    }
    if (gpp) {
      std::copy(g, g + w, gpp + row * size + begin);
    }
  });
  return {grad_contrib, grad_prev};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("chunk_scan(Tensor contributions, Tensor decay, Tensor? prev) -> (Tensor, Tensor)");
  m.def("chunk_scan_backward(Tensor grad_befores, Tensor grad_final, Tensor decay, bool has_prev) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("chunk_scan", &chunk_scan);
  m.impl("chunk_scan_backward", &chunk_scan_backward);
}
