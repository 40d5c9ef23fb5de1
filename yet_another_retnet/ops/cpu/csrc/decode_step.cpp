// Decoding steps on the CPU, one token per row, inference only.
//
// retention_step: a retention layer's core, from the fused q/k/v/g projection to what goes into
// the output projection, per row b and head h:
//
//   q, k = rotate(proj[b, q | k part of head h])    (the key's factor includes dk^-0.5)
//   S'   = gamma_h S + k^T v                          (dk x dv: the new memory)
//   out  = act(g) * head_norm(q S')                   (groupnorm with its affine, or rmsnorm)
//
// decoder_layer_step: one token per row through a whole pre-norm decoder layer (the weights streamed
// once for up to eight rows; each of the four products dense in the model's dtype, or int8 or int4
// as ops/cpu/quantized.py stores them, decoded by quantized.cpp's rows):
//
//   proj = Wqkvg norm1(x) + b;   (y, S') = the core above;   x1 = s x + Wout y + b
//   x2   = s x1 + W2 act(W1 norm2(x1) + b1) + b2        (GLU: act(first half) * second half)
//
// Why: the layer in PyTorch ops is ~25 calls (four matrix-vector products, the norms, a complex
// multiply, addcmul, bmm, group_norm, the activations, views). Each product streams megabytes of
// weights through the caches, so every small op after it starts cold: measured ~20 us of cache
// misses per op on our CPUs, against ~5 us of work. Here a layer is one call: the products are
// the gemv kernel's rows (gemv.h) and everything between them runs on float32 buffers that stay
// in cache. The memory and all arithmetic are float32; weights and the output are in the model's
// dtype (float32 or bfloat16), the output rounded once. The PyTorch forms beside these
// (ops/decode_step.py, the decoder layer's step) are the references they are tested against and
// the path for every other case.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "gemv.h"
#include "quantized.h"
#include "team.h"
#include "tuning.h"
#include "vec16.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

namespace {

using yaretnet_cpu::gemv_parallel_multi;
using yaretnet_cpu::kLanes;
using yaretnet_cpu::kMaxVectors;
using yaretnet_cpu::load;
using yaretnet_cpu::sigmoid16;
using yaretnet_cpu::splat;
using yaretnet_cpu::store;
using yaretnet_cpu::vec16;

// Activations, numbered as ops/decode_step.py passes them.
enum Act : int64_t { kIdentity = 0, kSilu = 1, kGelu = 2, kRelu = 3 };

float activate(float z, int64_t act) {
  switch (act) {
    case kSilu: return z / (1.0f + std::exp(-z));
    case kGelu: return 0.5f * z * (1.0f + std::erf(z * 0.70710678118654752f));
    case kRelu: return z > 0.0f ? z : 0.0f;
    default: return z;
  }
}

// z = act(z) over n floats, sixteen lanes at a time.
void activate(float* z, int64_t n, int64_t act) {
  if (act == kIdentity) return;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vec16 v = load(z + i);
    const vec16 relu = v > 0.0f ? v : splat(0.0f);
    store(z + i, act == kSilu ? v * sigmoid16(v) : act == kGelu ? yaretnet_cpu::gelu16(v) : relu);
  }
  for (; i < n; ++i) z[i] = activate(z[i], act);
}

// The gemv kernel reads bfloat16 weights as their bits.
inline const float* bits(const float* p) { return p; }
inline const uint16_t* bits(const c10::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

template <typename P>
inline float value(const P* p, int64_t i) {
  return p == nullptr ? 0.0f : static_cast<float>(p[i]);
}

template <typename P>
const P* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<P>() : nullptr;
}

// What a norm over n values subtracts and multiplies by: LayerNorm's mean and 1 / sqrt(var + eps),
// or for RMSNorm 0 and 1 / sqrt(mean(x^2) + eps).
struct Moments {
  float mean, rstd;
};

Moments moments(const float* x, int64_t n, float eps, bool rms) {
  float mean = 0.0f;
  if (!rms) {
    for (int64_t i = 0; i < n; ++i) mean += x[i];
    mean /= static_cast<float>(n);
  }
  float square = 0.0f;
  for (int64_t i = 0; i < n; ++i) square += (x[i] - mean) * (x[i] - mean);
  return {mean, 1.0f / std::sqrt(square / static_cast<float>(n) + eps)};
}

struct Heads {
  int64_t heads, dk, dv;
};

// The core for one (row, head): `row` is the row's projection [q (H dk) | k (H dk) | v (H dv) |
// g (H dv)]; `rot` its (2, dk / 2, 2) rotation factors, query then key, or null (the key is then
// scaled by dk^-0.5 alone); `out` the row's (H dv) output. Norm parameters in the model's dtype P.
template <typename In, typename P, typename Out>
void step_head(const In* row, const float* rot, const float* memory, float* new_memory, float gamma,
               const P* norm_weight, const P* norm_bias, float eps, bool rms_norm, int64_t act, const Heads& d,
               int64_t h, Out* out, bool stream) {
  const int64_t dk = d.dk, dv = d.dv, key_dim = d.heads * dk, value_dim = d.heads * dv;
  std::vector<float> buffer(2 * dk + 3 * dv);
  float* q = buffer.data();
  float* k = q + dk;
  float* v = k + dk;
  float* y = v + dv;
  float* gate = y + dv;
  const In* q_in = row + h * dk;
  const In* k_in = row + key_dim + h * dk;
  if (rot != nullptr) {
    const float* rq = rot;
    const float* rk = rot + dk;
    for (int64_t i = 0; i < dk / 2; ++i) {  // (a, b) -> (a cos - b sin, a sin + b cos)
      const float qa = static_cast<float>(q_in[2 * i]), qb = static_cast<float>(q_in[2 * i + 1]);
      const float ka = static_cast<float>(k_in[2 * i]), kb = static_cast<float>(k_in[2 * i + 1]);
      q[2 * i] = qa * rq[2 * i] - qb * rq[2 * i + 1];
      q[2 * i + 1] = qa * rq[2 * i + 1] + qb * rq[2 * i];
      k[2 * i] = ka * rk[2 * i] - kb * rk[2 * i + 1];
      k[2 * i + 1] = ka * rk[2 * i + 1] + kb * rk[2 * i];
    }
  } else {
    const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
    for (int64_t i = 0; i < dk; ++i) {
      q[i] = static_cast<float>(q_in[i]);
      k[i] = static_cast<float>(k_in[i]) * scale;
    }
  }
  const In* v_in = row + 2 * key_dim + h * dv;
  const In* g_in = row + 2 * key_dim + value_dim + h * dv;
  for (int64_t j = 0; j < dv; ++j) {
    v[j] = static_cast<float>(v_in[j]);
    gate[j] = static_cast<float>(g_in[j]);
    y[j] = 0.0f;
  }
  // S' = gamma S + k v^T and y = q S' in one pass over the memory.
#if defined(__AVX512F__)
  // A memory too large to stay in cache until the next step (a layer of a 1.3B model: 4 MB) may be
  // written with streaming stores (tuning.h: stream_state): a normal store into a new memory first
  // reads each line it fills, a third pass over the memory that the weights' stream competes with.
  // (Fenced in run_core.) Row by row, in memory order, with y's dv sums in L1: walking it in
  // columns of 16 (one register of sums) jumps a row's length every line, and read 1.4x (into a
  // new memory) to 2.3x (in place) slower.
  if (stream && dv % 16 == 0 && reinterpret_cast<uintptr_t>(new_memory) % 64 == 0) {
    const __m512 g = _mm512_set1_ps(gamma);
    for (int64_t i = 0; i < dk; ++i) {
      const __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
      const float* s = memory + i * dv;
      float* n = new_memory + i * dv;
      for (int64_t j = 0; j < dv; j += 16) {
        const __m512 updated = _mm512_fmadd_ps(g, _mm512_loadu_ps(s + j), _mm512_mul_ps(ki, _mm512_loadu_ps(v + j)));
        _mm512_stream_ps(n + j, updated);
        _mm512_storeu_ps(y + j, _mm512_fmadd_ps(qi, updated, _mm512_loadu_ps(y + j)));
      }
    }
  } else
#endif
  for (int64_t i = 0; i < dk; ++i) {
    const float* __restrict__ s = memory + i * dv;
    float* __restrict__ n = new_memory + i * dv;
    float* __restrict__ acc = y;
    const float* __restrict__ vv = v;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      const float updated = gamma * s[j] + ki * vv[j];
      n[j] = updated;
      acc[j] += qi * updated;
    }
  }
  const Moments head = moments(y, dv, eps, rms_norm);  // the head norm over the dv values
  activate(gate, dv, act);
  for (int64_t j = 0; j < dv; ++j) {
    float normed = (y[j] - head.mean) * head.rstd;
    if (norm_weight != nullptr) normed *= static_cast<float>(norm_weight[h * dv + j]);
    normed += value(norm_bias, h * dv + j);
    out[h * dv + j] = static_cast<Out>(gate[j] * normed);
  }
}

// The checks both ops make of the memory and the rotation; returns the head sizes.
Heads check_memory(const char* op, const at::Tensor& memory, const c10::optional<at::Tensor>& rotation) {
  TORCH_CHECK(memory.dim() == 4 && memory.scalar_type() == at::kFloat && memory.is_contiguous(), op,
              ": memory must be contiguous float32 (batch, heads, dk, dv), got ", memory.sizes(), " ",
              memory.scalar_type());
  const Heads d{memory.size(1), memory.size(2), memory.size(3)};
  TORCH_CHECK(d.dk % 2 == 0, op, ": the key head dim must be even, got ", d.dk);
  TORCH_CHECK(!rotation.has_value() || (rotation->scalar_type() == at::kFloat && rotation->is_contiguous() &&
                                        rotation->numel() == memory.size(0) * 2 * d.dk),
              op, ": rotation must be contiguous float32 (batch, 2, dk / 2, 2)");
  return d;
}

void check_vector(const char* op, const char* name, const c10::optional<at::Tensor>& t, int64_t size,
                  at::ScalarType dtype) {
  TORCH_CHECK(!t.has_value() || (t->numel() == size && t->is_contiguous() && t->scalar_type() == dtype), op, ": ",
              name, " must be a contiguous ", dtype, " vector of ", size, " values");
}

// Where the new memory goes: `out_memory` when given (it may be `memory` itself: each value is
// read before it is overwritten, and by the same task; a loop that owns its state steps it in
// place and allocates nothing: at 16 rows of a 1.3B model a fresh memory is 64 MB a layer, which
// glibc maps and faults in anew every step), else a new tensor.
at::Tensor memory_out(const char* op, const at::Tensor& memory, const c10::optional<at::Tensor>& out_memory) {
  if (!out_memory.has_value()) return at::empty_like(memory);
  TORCH_CHECK(out_memory->sizes() == memory.sizes() && out_memory->scalar_type() == at::kFloat &&
                  out_memory->is_contiguous() && out_memory->device().is_cpu(),
              op, ": out_memory must be a contiguous float32 CPU tensor shaped like memory ", memory.sizes(), ", got ",
              out_memory->sizes(), " ", out_memory->scalar_type());
  return *out_memory;
}

// The core for `batch` rows, parallel over rows and heads: over the thread pool, or this team
// member's share of the (row, head) tasks.
template <typename In, typename P, typename Out>
void run_core(const yaretnet_cpu::Member& member, const In* proj, int64_t row_stride, const at::Tensor& memory,
              const c10::optional<at::Tensor>& rotation, const at::Tensor& gamma, const P* norm_weight,
              const P* norm_bias, float eps, bool rms_norm, int64_t act, float* new_memory, Out* out) {
  const Heads d{memory.size(1), memory.size(2), memory.size(3)};
  const int64_t batch = memory.size(0), state = d.dk * d.dv, value_dim = d.heads * d.dv;
  const float* rot = rotation.has_value() ? rotation->data_ptr<float>() : nullptr;
  const float* mem = memory.data_ptr<float>();
  const float* decay = gamma.data_ptr<float>();
  const int64_t tasks = batch * d.heads, bytes = tasks * state * static_cast<int64_t>(sizeof(float));
  // Streaming stores past 2 MB a layer (see step_head); a memory under 128 KB is stepped on one
  // thread (waking the other costs more than its share of the work).
  const bool stream = yaretnet_cpu::stream_state.load(std::memory_order_relaxed) && bytes >= (int64_t{2} << 20);
  const int64_t grain = bytes < (int64_t{128} << 10) ? tasks : 1;
  const auto walk = [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.heads, h = task % d.heads;
      step_head<In, P, Out>(proj + b * row_stride, rot == nullptr ? nullptr : rot + b * 2 * d.dk, mem + task * state,
                            new_memory + task * state, decay[h], norm_weight, norm_bias, eps, rms_norm, act, d, h,
                            out + b * value_dim, stream);
    }
#if defined(__AVX512F__)
    if (stream) _mm_sfence();  // the streamed lines are visible before the memory is read
#endif
  };
  if (member.pool()) {
    at::parallel_for(0, tasks, grain, walk);
  } else {
    const yaretnet_cpu::RowRange mine = member.share(tasks, grain);
    if (mine.lo < mine.hi) walk(mine.lo, mine.hi);
  }
}

std::tuple<at::Tensor, at::Tensor> retention_step_impl(const at::Tensor& proj, const at::Tensor& memory,
                                                  const c10::optional<at::Tensor>& rotation, const at::Tensor& gamma,
                                                  const c10::optional<at::Tensor>& norm_weight,
                                                  const c10::optional<at::Tensor>& norm_bias, double eps,
                                                  bool rms_norm, int64_t gate_act,
                                                  const c10::optional<at::Tensor>& out_memory) {
  const char* op = "yaretnet::retention_step";
  const Heads d = check_memory(op, memory, rotation);
  const int64_t batch = memory.size(0), value_dim = d.heads * d.dv;
  const auto dtype = proj.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": proj must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(proj.dim() == 2 && proj.size(0) == batch && proj.size(1) == 2 * d.heads * (d.dk + d.dv) &&
                  proj.stride(1) == 1,
              op, ": proj must be (batch, 2 heads (dk + dv)) with unit column stride, got ", proj.sizes());
  check_vector(op, "gamma", gamma, d.heads, at::kFloat);
  check_vector(op, "norm_weight", norm_weight, value_dim, dtype);
  check_vector(op, "norm_bias", norm_bias, value_dim, dtype);
  TORCH_CHECK(gate_act >= kIdentity && gate_act <= kRelu, op, ": unknown gate activation ", gate_act);
  at::Tensor new_memory = memory_out(op, memory, out_memory);
  at::Tensor out = at::empty({batch, value_dim}, proj.options());
  auto run = [&](auto* typed) {
    using P = std::remove_const_t<std::remove_pointer_t<decltype(typed)>>;
    run_core<P, P, P>(yaretnet_cpu::Member{}, proj.data_ptr<P>(), proj.stride(0), memory, rotation, gamma,
                      data_or_null<P>(norm_weight),
                      data_or_null<P>(norm_bias), static_cast<float>(eps), rms_norm, gate_act,
                      new_memory.data_ptr<float>(), out.data_ptr<P>());
  };
  if (dtype == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<c10::BFloat16*>(nullptr));
  }
  return {out, new_memory};
}

// A block norm of one row: LayerNorm (with its bias, if any) or RMSNorm, times its weight.
template <typename P>
void block_norm(const float* x, float* out, int64_t n, const P* weight, const P* bias, float eps, bool rms) {
  const Moments m = moments(x, n, eps, rms);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] - m.mean) * m.rstd * static_cast<float>(weight[i]) + value(bias, i);
}

// One of a layer's four products: the model's dtype (dense), or int8 with a scale per row, or int4
// with a scale and a low value per group (ops/cpu/quantized.py's forms). From the op's list of
// tensors: [weight], [q int8, scale], or [packed uint8, scale, low].
struct Product {
  enum class Kind { kDense, kInt8, kInt4 };
  Kind kind = Kind::kDense;
  const void* weight = nullptr;
  const float* scale = nullptr;
  yaretnet_cpu::Int4Weight int4{};
  int64_t rows = 0, cols = 0;
};

Product make_product(const char* op, const char* name, at::TensorList parts, at::ScalarType dtype, int64_t rows,
                     int64_t cols) {
  TORCH_CHECK(!parts.empty() && parts.size() <= 3, op, ": ", name, " must be [weight], [int8 weight, scale] or ",
              "[packed int4 weight, scale, low], got ", parts.size(), " tensors");
  const at::Tensor& w = parts[0];
  Product p;
  p.rows = rows;
  p.cols = cols;
  if (parts.size() == 3) {  // int4: rows at any stride (a plan's interleaved buffer: quantized.h)
    TORCH_CHECK(w.dim() == 2 && w.size(0) == rows, op, ": ", name, " must be a packed int4 matrix of ", rows,
                " rows, got ", w.sizes());
    p.kind = Product::Kind::kInt4;
    p.int4 = yaretnet_cpu::int4_weight(op, w, parts[1], parts[2], rows, cols);
    return p;
  }
  TORCH_CHECK(w.dim() == 2 && w.size(0) == rows && w.is_contiguous() && w.device().is_cpu(), op, ": ", name,
              " must be a contiguous CPU matrix of ", rows, " rows, got ", w.sizes());
  p.weight = w.data_ptr();
  if (parts.size() == 1) {
    TORCH_CHECK(w.scalar_type() == dtype && w.size(1) == cols, op, ": ", name, " must be a ", dtype, " (", rows, ", ",
                cols, ") matrix, got ", w.sizes(), " ", w.scalar_type());
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(1) == cols && parts[1].dim() == 1, op, ": ", name,
                " must be an int8 (", rows, ", ", cols, ") matrix and its (", rows, ") scales, got ", w.sizes(), " ",
                w.scalar_type());
    const at::Tensor& t = parts[1];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() && t.size(0) == rows, op,
                ": ", name, "'s scale must be contiguous CPU float32 with ", rows, " rows, got ", t.sizes(), " ",
                t.scalar_type());
    p.kind = Product::Kind::kInt8;
    p.scale = t.data_ptr<float>();
  }
  return p;
}

// The rows a thread-pool task of product `w` takes at least (P: the model's dtype, a dense
// weight's).
template <typename P>
int64_t grain(const Product& w) {
  switch (w.kind) {
    case Product::Kind::kInt8: return yaretnet_cpu::product_grain(w.cols);
    case Product::Kind::kInt4: return yaretnet_cpu::product_grain(yaretnet_cpu::int4_row_bytes(w.int4));
    default: return yaretnet_cpu::gemv_grain<P>(w.cols);
  }
}

// y = W x + b (+ scale * residual) for each of n rows: x (n, cols) at row stride ldx, y and
// residual (n, rows), the bias in the model's dtype P, the rest float32. The weights stream once
// per group of up to kMaxVectors rows. All of W's rows over the thread pool, or with `only` the
// rows [only->lo, only->hi) on the calling thread.
template <typename P>
void linear(const Product& w, const P* bias, const float* x, int64_t ldx, float* y, int64_t n,
            const yaretnet_cpu::RowRange* only, const float* residual = nullptr, float scale = 1.0f) {
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t lo = only != nullptr ? only->lo : 0, hi = only != nullptr ? only->hi : rows;
  if (lo >= hi) return;
  if (w.kind == Product::Kind::kInt8) {
    yaretnet_cpu::int8_product(x, ldx, n, cols, static_cast<const int8_t*>(w.weight), w.scale, rows, y, rows, only);
  } else if (w.kind == Product::Kind::kInt4) {
    yaretnet_cpu::int4_product(x, ldx, n, cols, w.int4, rows, y, rows, only);
  } else {
    const auto* weight = bits(static_cast<const P*>(w.weight));
    for (int64_t v0 = 0; v0 < n; v0 += kMaxVectors) {
      const int64_t nv = std::min<int64_t>(kMaxVectors, n - v0);
      if (only != nullptr) {
        yaretnet_cpu::gemv_range(weight, x + v0 * ldx, ldx, y + v0 * rows, rows, cols, nv, lo, hi);
      } else {
        gemv_parallel_multi(weight, x + v0 * ldx, ldx, y + v0 * rows, rows, rows, cols, nv);
      }
    }
  }
  if (bias == nullptr && residual == nullptr) return;  // nothing to add (q/k/v/g and fc1 without biases)
  for (int64_t v = 0; v < n; ++v) {
    for (int64_t r = lo; r < hi; ++r) {
      float& out = y[v * rows + r];
      out += value(bias, r);
      if (residual != nullptr) out += scale * residual[v * rows + r];
    }
  }
}

struct LayerWeights {
  const at::Tensor& norm1_weight;
  const c10::optional<at::Tensor>& norm1_bias;
  Product qkvg;
  const c10::optional<at::Tensor>& qkvg_bias;
  const c10::optional<at::Tensor>& head_weight;
  const c10::optional<at::Tensor>& head_bias;
  Product out;
  const c10::optional<at::Tensor>& out_bias;
  const at::Tensor& norm2_weight;
  const c10::optional<at::Tensor>& norm2_bias;
  Product fc1;
  const c10::optional<at::Tensor>& fc1_bias;
  Product fc2;
  const c10::optional<at::Tensor>& fc2_bias;
};

struct LayerOptions {
  float block_eps, head_eps;
  bool block_rms, head_rms;
  int64_t gate_act, ffn_act;
  bool glu;
  float residual_scale;
};

template <typename P>
at::Tensor layer_step(const at::Tensor& x, const at::Tensor& memory, const c10::optional<at::Tensor>& rotation,
                      const at::Tensor& gamma, const LayerWeights& w, const LayerOptions& o, at::Tensor& new_memory) {
  using yaretnet_cpu::Member;
  using yaretnet_cpu::RowRange;
  const int64_t n = x.size(0), dim = x.size(1), proj_rows = w.qkvg.rows, value_dim = w.out.cols;
  const int64_t fc1_rows = w.fc1.rows, hidden = w.fc2.cols;
  // One team for the whole layer (team.h) where its largest product is split over the threads
  // anyway; a smaller layer runs on this thread, as each of its products would.
  const int64_t threads = proj_rows > grain<P>(w.qkvg) ? at::get_num_threads() : 1;
  const int64_t members = std::max<int64_t>(1, threads);
  // Per row: the input, the two residual sums, the projection, the core's output and the FFN's
  // hidden units, each block holding all n rows; then each member's own norm of the rows.
  // Left uninitialised: every block is written before it is read (zeroing ~130 KB a layer at 1.3B
  // was serial work the other thread waited through).
  const std::unique_ptr<float[]> buffer(new float[n * (3 * dim + proj_rows + value_dim + fc1_rows + members * dim)]);
  float* xf = buffer.get();
  float* x1 = xf + n * dim;
  float* x2 = x1 + n * dim;
  float* proj = x2 + n * dim;
  float* y = proj + n * proj_rows;
  float* u = y + n * value_dim;
  float* norms = u + n * fc1_rows;
  const P* xp = x.data_ptr<P>();
  for (int64_t i = 0; i < n * dim; ++i) xf[i] = static_cast<float>(xp[i]);
  const P *norm1_w = w.norm1_weight.data_ptr<P>(), *norm1_b = data_or_null<P>(w.norm1_bias);
  const P *norm2_w = w.norm2_weight.data_ptr<P>(), *norm2_b = data_or_null<P>(w.norm2_bias);
  at::Tensor out = at::empty_like(x);
  P* op = out.data_ptr<P>();

  yaretnet_cpu::run_team(threads, [&](Member& m) {
    // The rows of a product this member computes (null alone: all of them, over the pool). Each
    // norm is cheap next to a product: every member computes it for itself rather than wait.
    const auto part = [&](const RowRange& r) { return m.pool() ? nullptr : &r; };
    float* normed = norms + m.first * n * dim;

    for (int64_t v = 0; v < n; ++v)
      block_norm(xf + v * dim, normed + v * dim, dim, norm1_w, norm1_b, o.block_eps, o.block_rms);
    const RowRange qkvg = m.share(proj_rows, grain<P>(w.qkvg));
    linear(w.qkvg, data_or_null<P>(w.qkvg_bias), normed, dim, proj, n, part(qkvg));
    m.sync();  // the core reads every head's projection
    run_core<float, P, float>(m, proj, proj_rows, memory, rotation, gamma, data_or_null<P>(w.head_weight),
                              data_or_null<P>(w.head_bias), o.head_eps, o.head_rms, o.gate_act,
                              new_memory.data_ptr<float>(), y);
    m.sync();  // the output product reads every head's output
    const RowRange outs = m.share(dim, grain<P>(w.out));
    linear(w.out, data_or_null<P>(w.out_bias), y, value_dim, x1, n, part(outs), xf, o.residual_scale);
    m.sync();  // the second norm reads every unit of x1

    for (int64_t v = 0; v < n; ++v)
      block_norm(x1 + v * dim, normed + v * dim, dim, norm2_w, norm2_b, o.block_eps, o.block_rms);
    // The hidden units [lo, hi), and with a GLU their gates' rows [hidden + lo, hidden + hi): a
    // member applies the activation and the gate to its own units without a barrier. Shares start
    // on a multiple of 16, so each unit takes the same (vector or scalar) activation however many
    // threads run.
    const RowRange units = m.share(hidden, grain<P>(w.fc1));
    const auto aligned = [&](int64_t i) { return i >= hidden ? hidden : (i + 15) / 16 * 16; };
    const RowRange mine{aligned(units.lo), aligned(units.hi)}, gates{hidden + mine.lo, hidden + mine.hi};
    if (m.pool()) {
      linear(w.fc1, data_or_null<P>(w.fc1_bias), normed, dim, u, n, nullptr);
    } else {
      linear(w.fc1, data_or_null<P>(w.fc1_bias), normed, dim, u, n, &mine);
      if (o.glu) linear(w.fc1, data_or_null<P>(w.fc1_bias), normed, dim, u, n, &gates);
    }
    for (int64_t v = 0; v < n; ++v) {
      float* uv = u + v * fc1_rows;
      activate(uv + mine.lo, mine.hi - mine.lo, o.ffn_act);
      if (o.glu)
        for (int64_t i = mine.lo; i < mine.hi; ++i) uv[i] *= uv[hidden + i];
    }
    m.sync();  // fc2 reads every hidden unit
    // fc2 reads each row's first `hidden` units (a GLU's row holds 2 hidden).
    const RowRange x2s = m.share(dim, grain<P>(w.fc2));
    linear(w.fc2, data_or_null<P>(w.fc2_bias), u, fc1_rows, x2, n, part(x2s), x1, o.residual_scale);
    for (int64_t v = 0; v < n; ++v)
      for (int64_t i = x2s.lo; i < x2s.hi; ++i) op[v * dim + i] = static_cast<P>(x2[v * dim + i]);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> decoder_layer_step_impl(
    const at::Tensor& x, const at::Tensor& memory, const c10::optional<at::Tensor>& rotation,
    const at::Tensor& norm1_weight, const c10::optional<at::Tensor>& norm1_bias, at::TensorList qkvg_weight,
    const c10::optional<at::Tensor>& qkvg_bias, const at::Tensor& gamma, const c10::optional<at::Tensor>& head_weight,
    const c10::optional<at::Tensor>& head_bias, at::TensorList out_weight, const c10::optional<at::Tensor>& out_bias,
    const at::Tensor& norm2_weight, const c10::optional<at::Tensor>& norm2_bias, at::TensorList fc1_weight,
    const c10::optional<at::Tensor>& fc1_bias, at::TensorList fc2_weight, const c10::optional<at::Tensor>& fc2_bias,
    double block_eps, double head_eps, bool block_rms, bool head_rms, int64_t gate_act, int64_t ffn_act, bool glu,
    double residual_scale, const c10::optional<at::Tensor>& out_memory) {
  const char* op = "yaretnet::decoder_layer_step";
  const Heads d = check_memory(op, memory, rotation);
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, op, ": x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous() && memory.size(0) == x.size(0), op,
              ": x must be contiguous rows (batch, d_model) and memory (batch, heads, dk, dv) of the same batch, got ",
              x.sizes(), " and ", memory.sizes());
  const int64_t dim = x.size(1), key_dim = d.heads * d.dk, value_dim = d.heads * d.dv;
  TORCH_CHECK(!fc1_weight.empty() && fc1_weight[0].dim() == 2 && (!glu || fc1_weight[0].size(0) % 2 == 0), op,
              ": fc1_weight must hold a matrix (with glu: of an even number of rows)");
  const int64_t fc1_rows = fc1_weight[0].size(0), hidden = glu ? fc1_rows / 2 : fc1_rows;
  const Product qkvg = make_product(op, "qkvg_weight", qkvg_weight, dtype, 2 * (key_dim + value_dim), dim);
  const Product out = make_product(op, "out_weight", out_weight, dtype, dim, value_dim);
  const Product fc1 = make_product(op, "fc1_weight", fc1_weight, dtype, fc1_rows, dim);
  const Product fc2 = make_product(op, "fc2_weight", fc2_weight, dtype, dim, hidden);
  check_vector(op, "norm1_weight", norm1_weight, dim, dtype);
  check_vector(op, "norm2_weight", norm2_weight, dim, dtype);
  check_vector(op, "norm1_bias", norm1_bias, dim, dtype);
  check_vector(op, "norm2_bias", norm2_bias, dim, dtype);
  check_vector(op, "qkvg_bias", qkvg_bias, 2 * (key_dim + value_dim), dtype);
  check_vector(op, "head_weight", head_weight, value_dim, dtype);
  check_vector(op, "head_bias", head_bias, value_dim, dtype);
  check_vector(op, "out_bias", out_bias, dim, dtype);
  check_vector(op, "fc1_bias", fc1_bias, fc1_rows, dtype);
  check_vector(op, "fc2_bias", fc2_bias, dim, dtype);
  check_vector(op, "gamma", gamma, d.heads, at::kFloat);
  TORCH_CHECK(gate_act >= kIdentity && gate_act <= kRelu && ffn_act >= kIdentity && ffn_act <= kRelu, op,
              ": unknown activation ", gate_act, " / ", ffn_act);
  const LayerWeights w{norm1_weight, norm1_bias, qkvg, qkvg_bias, head_weight, head_bias, out,
                       out_bias,     norm2_weight, norm2_bias, fc1,  fc1_bias,  fc2,  fc2_bias};
  const LayerOptions o{static_cast<float>(block_eps), static_cast<float>(head_eps), block_rms, head_rms, gate_act,
                       ffn_act, glu, static_cast<float>(residual_scale)};
  at::Tensor new_memory = memory_out(op, memory, out_memory);
  at::Tensor result = dtype == at::kFloat ? layer_step<float>(x, memory, rotation, gamma, w, o, new_memory)
                                          : layer_step<c10::BFloat16>(x, memory, rotation, gamma, w, o, new_memory);
  return {result, new_memory};
}

// The registered ops: a functional form (a new memory) and an in-place one (the memory stepped
// where it is, only the output returned), each with a schema that says which it is.
std::tuple<at::Tensor, at::Tensor> retention_step(const at::Tensor& proj, const at::Tensor& memory,
                                                  const c10::optional<at::Tensor>& rotation, const at::Tensor& gamma,
                                                  const c10::optional<at::Tensor>& norm_weight,
                                                  const c10::optional<at::Tensor>& norm_bias, double eps,
                                                  bool rms_norm, int64_t gate_act) {
  return retention_step_impl(proj, memory, rotation, gamma, norm_weight, norm_bias, eps, rms_norm, gate_act,
                             c10::nullopt);
}

at::Tensor retention_step_inplace(const at::Tensor& proj, at::Tensor& memory, const c10::optional<at::Tensor>& rotation,
                                  const at::Tensor& gamma, const c10::optional<at::Tensor>& norm_weight,
                                  const c10::optional<at::Tensor>& norm_bias, double eps, bool rms_norm,
                                  int64_t gate_act) {
  return std::get<0>(
      retention_step_impl(proj, memory, rotation, gamma, norm_weight, norm_bias, eps, rms_norm, gate_act, memory));
}

// The layer's arguments after (x, memory), shared by both ops' signatures and calls.
#define YARETNET_LAYER_PARAMS                                                                                  \
  const c10::optional<at::Tensor>& rotation, const at::Tensor& norm1_weight,                                  \
      const c10::optional<at::Tensor>& norm1_bias, at::TensorList qkvg_weight,                                \
      const c10::optional<at::Tensor>& qkvg_bias, const at::Tensor& gamma,                                    \
      const c10::optional<at::Tensor>& head_weight, const c10::optional<at::Tensor>& head_bias,               \
      at::TensorList out_weight, const c10::optional<at::Tensor>& out_bias, const at::Tensor& norm2_weight,   \
      const c10::optional<at::Tensor>& norm2_bias, at::TensorList fc1_weight,                                 \
      const c10::optional<at::Tensor>& fc1_bias, at::TensorList fc2_weight,                                   \
      const c10::optional<at::Tensor>& fc2_bias, double block_eps, double head_eps, bool block_rms,           \
      bool head_rms, int64_t gate_act, int64_t ffn_act, bool glu, double residual_scale
#define YARETNET_LAYER_ARGS                                                                                    \
  rotation, norm1_weight, norm1_bias, qkvg_weight, qkvg_bias, gamma, head_weight, head_bias, out_weight,      \
      out_bias, norm2_weight, norm2_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, block_eps, head_eps,    \
      block_rms, head_rms, gate_act, ffn_act, glu, residual_scale

std::tuple<at::Tensor, at::Tensor> decoder_layer_step(const at::Tensor& x, const at::Tensor& memory,
                                                      YARETNET_LAYER_PARAMS) {
  return decoder_layer_step_impl(x, memory, YARETNET_LAYER_ARGS, c10::nullopt);
}

at::Tensor decoder_layer_step_inplace(const at::Tensor& x, at::Tensor& memory, YARETNET_LAYER_PARAMS) {
  return std::get<0>(decoder_layer_step_impl(x, memory, YARETNET_LAYER_ARGS, memory));
}

#undef YARETNET_LAYER_PARAMS
#undef YARETNET_LAYER_ARGS

}  // namespace

#define YARETNET_STEP_ARGS "Tensor? rotation, Tensor gamma, Tensor? norm_weight, Tensor? norm_bias, float eps, " \
                           "bool rms_norm, int gate_act"
#define YARETNET_LAYER_SCHEMA                                                                                      \
  "Tensor? rotation, Tensor norm1_weight, Tensor? norm1_bias, Tensor[] qkvg_weight, Tensor? qkvg_bias, "           \
  "Tensor gamma, Tensor? head_weight, Tensor? head_bias, Tensor[] out_weight, Tensor? out_bias, "                   \
  "Tensor norm2_weight, Tensor? norm2_bias, Tensor[] fc1_weight, Tensor? fc1_bias, Tensor[] fc2_weight, "          \
  "Tensor? fc2_bias, float block_eps, float head_eps, bool block_rms, bool head_rms, int gate_act, int ffn_act, "  \
  "bool glu, float residual_scale"

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("retention_step(Tensor proj, Tensor memory, " YARETNET_STEP_ARGS ") -> (Tensor, Tensor)");
  m.def("retention_step_inplace(Tensor proj, Tensor(a!) memory, " YARETNET_STEP_ARGS ") -> Tensor");
  m.def("decoder_layer_step(Tensor x, Tensor memory, " YARETNET_LAYER_SCHEMA ") -> (Tensor, Tensor)");
  m.def("decoder_layer_step_inplace(Tensor x, Tensor(a!) memory, " YARETNET_LAYER_SCHEMA ") -> Tensor");
}

#undef YARETNET_STEP_ARGS
#undef YARETNET_LAYER_SCHEMA

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("retention_step", &retention_step);
  m.impl("retention_step_inplace", &retention_step_inplace);
  m.impl("decoder_layer_step", &decoder_layer_step);
  m.impl("decoder_layer_step_inplace", &decoder_layer_step_inplace);
}
