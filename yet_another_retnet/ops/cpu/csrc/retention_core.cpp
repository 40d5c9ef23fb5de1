// The middle of a retention layer in one op: from its fused projection to what enters its output
// projection. Per (batch, head), chunk after chunk:
//
//   q, k, v, z = the head's columns of proj (b, L, [q | k | v | gate]), q and k rotated (rows l)
//   O_m        = ((Q K^T) * M) V + (Q * qd) B_m,   B_{m+1} = d B_m + (K * kd)^T V,   B_0 = prev
//   y          = silu(z) * (GroupNorm_head(O) * weight + bias)            -> y (b, L, h dv)
//
// and the backward in reverse chunk order: dO from dy through the norm and gate (dz written
// straight into the projection's gradient), then the chunk's backward (chunk_tiles.h), its dq and
// dk rotated back and written, with dv, into the projection's gradient too.
//
// Why: the three ops this replaces (split_heads.cpp, chunk_kernels.cpp's chunk_retention,
// norm_gate.cpp) each streamed their inputs through memory and wrote their results back: forward,
// a copy of the projection in head layout, the retained values, then the gated output; backward,
// the same in reverse plus the gradients' assembly into one projection gradient. Here each chunk's
// rows are packed (rotated) into cache once, and the norm and gate run on the chunk's outputs
// while they are there. What remains in memory: the output y, and for a backward the retained
// values O and the states B_m (keep), which the norm's and the chunk's backwards read.
//
// The loop order matters as much as the fusion. A thread takes its (batch, head) walks chunk by
// chunk, all its heads of a batch row together: a chunk's rows are one contiguous block of the
// projection, of y and of their gradients, read and written front to back. One head at a time
// through all its chunks (the order of chunk_retention) read 256 bytes from each 4-12 KiB row, a
// new page per row without prefetch; that version ran no faster than the three ops in a training
// step (1.012 at 2 x 1,024 tokens), this one 4% faster (docs/performance.md).
//
// float32 on the CPU; c, dk, dv multiples of 32 and the length a whole number of chunks
// (ops/retention_core.py checks, and composes the three plain forms as the reference).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "chunk_tiles.h"
#include "head_norm.h"
#include "projection.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace yaretnet_cpu::chunk;  // NOLINT(google-build-using-namespace)
using yaretnet_cpu::norm_gate_row;
using yaretnet_cpu::norm_gate_row_backward;
using yaretnet_cpu::proj_dims;
using yaretnet_cpu::ProjDims;
using yaretnet_cpu::Rotation;
using yaretnet_cpu::rotate;
using yaretnet_cpu::unrotate;

// Everything both directions check and read: the projection, its rotation, the decay tables, the
// norm's affine.
struct Core {
  ProjDims p;
  Dims d;  // the chunk view: groups = batch * heads * chunks
  at::Tensor proj, weight, bias;
  Rotation rot;
  Tables tabs;
  int64_t hk, hv;  // the widths of the q (or k) and of the v (or gate) columns

  Core(const char* op, const at::Tensor& proj_in, const std::optional<at::Tensor>& cos,
       const std::optional<at::Tensor>& sin, const at::Tensor& mask, const at::Tensor& qd, const at::Tensor& kd,
       const at::Tensor& decay, const at::Tensor& weight_in, const at::Tensor& bias_in, int64_t heads, int64_t key_dim,
       int64_t chunk)
      : p(checked_proj(op, proj_in, heads, key_dim)),
        d(chunk_dims(op, p, chunk)),
        proj(proj_in.is_contiguous() ? proj_in : proj_in.contiguous()),
        weight(affine(op, "norm_weight", weight_in, p)),
        bias(affine(op, "norm_bias", bias_in, p)),
        rot(op, cos, sin, p.batch, p.length, p.dk),
        tabs(op, mask, qd, kd, decay, d),
        hk(p.heads * p.dk),
        hv(p.heads * p.dv) {}

  static ProjDims checked_proj(const char* op, const at::Tensor& proj, int64_t heads, int64_t key_dim) {
    TORCH_CHECK(proj.scalar_type() == at::kFloat && proj.device().is_cpu() && proj.dim() == 3, op,
                ": proj must be a float32 CPU (batch, length, width) tensor, got ", proj.sizes());
    return proj_dims(op, proj.size(0), proj.size(1), proj.size(2), heads, key_dim);
  }

  static Dims chunk_dims(const char* op, const ProjDims& p, int64_t chunk) {
    TORCH_CHECK(chunk > 0 && p.length > 0 && p.length % chunk == 0, op,
                ": the length must be a positive multiple of chunk, got ", p.length, " and ", chunk);
    TORCH_CHECK(chunk % 32 == 0 && p.dk % 32 == 0 && p.dv % 32 == 0, op,
                ": chunk, key_dim and head_dim must be multiples of 32, got ", chunk, ", ", p.dk, ", ", p.dv);
    const int64_t n = p.length / chunk;
    return {p.batch * p.heads * n, p.heads, n, static_cast<int>(chunk), static_cast<int>(p.dk),
            static_cast<int>(p.dv)};
  }

  static at::Tensor affine(const char* op, const char* name, const at::Tensor& t, const ProjDims& p) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu() && t.dim() == 1 && t.size(0) == p.heads * p.dv,
                op, ": ", name, " must be float32 CPU (heads * head_dim,) = (", p.heads * p.dv, ",), got ", t.sizes());
    return t.contiguous();
  }

  // Row (b, l) of the projection.
  const float* row(int64_t b, int64_t l) const { return proj.data_ptr<float>() + (b * p.length + l) * p.width; }

  // Chunk i of heads [h0, h1) in batch b packed into q, k ((h1 - h0) x c x dk, rotated) and v
  // ((h1 - h0) x c x dv), row by row: the chunk's rows are one contiguous block of the projection,
  // read front to back.
  void pack(int64_t b, int64_t h0, int64_t h1, int64_t i, float* q, float* k, float* v) const {
    const int c = d.c;
    for (int r = 0; r < c; ++r) {
      const int64_t l = i * c + r;
      const float* src = row(b, l);
      const float* cs = rot.any() ? rot.cos_at(b, l, p.dk) : nullptr;
      const float* sn = rot.any() ? rot.sin_at(b, l, p.dk) : nullptr;
      for (int64_t h = h0; h < h1; ++h) {
        float* qd = q + ((h - h0) * c + r) * p.dk;
        if (rot.any()) {
          rotate(src + h * p.dk, cs, sn, p.dk, qd);
        } else {
          std::memcpy(qd, src + h * p.dk, sizeof(float) * p.dk);
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        float* kd = k + ((h - h0) * c + r) * p.dk;
        if (rot.any()) {
          rotate(src + hk + h * p.dk, cs, sn, p.dk, kd);
        } else {
          std::memcpy(kd, src + hk + h * p.dk, sizeof(float) * p.dk);
        }
      }
      for (int64_t h = h0; h < h1; ++h) {
        std::memcpy(v + ((h - h0) * c + r) * p.dv, src + 2 * hk + h * p.dv, sizeof(float) * p.dv);
      }
    }
  }

  int64_t state() const { return p.dk * p.dv; }
};

// Calls f(b, h0, h1) for each batch row's run of heads [h0, h1) in a thread's range [begin, end) of
// the batch * heads walks (bh = b * heads + h).
template <typename F>
void for_each_run(int64_t begin, int64_t end, int64_t heads, F&& f) {
  for (int64_t bh = begin; bh < end;) {
    const int64_t b = bh / heads, h0 = bh % heads, h1 = std::min(heads, h0 + (end - bh));
    f(b, h0, h1);
    bh += h1 - h0;
  }
}

// Returns (y, final, retained, befores); retained (b, h, L, dv) and befores (b, h, n, dk, dv) are
// filled for a backward when keep, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retention_core(
    const at::Tensor& proj_in, const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
    const at::Tensor& mask, const at::Tensor& query_decay, const at::Tensor& key_decay, const at::Tensor& chunk_decay,
    const std::optional<at::Tensor>& prev_in, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    int64_t heads, int64_t key_dim, int64_t chunk, bool keep) {
  const char* op = "retention_core";
  const Core core(op, proj_in, cos, sin, mask, query_decay, key_decay, chunk_decay, norm_weight, norm_bias, heads,
                  key_dim, chunk);
  const ProjDims& p = core.p;
  const at::Tensor prev = checked_state(op, "prev", prev_in, p.batch, core.d);
  const at::TensorOptions o = core.proj.options();
  at::Tensor y = at::empty({p.batch, p.length, core.hv}, o);
  at::Tensor final = at::empty({p.batch, p.heads, p.dk, p.dv}, o);
  at::Tensor retained = keep ? at::empty({p.batch, p.heads, p.length, p.dv}, o) : at::empty({0}, o);
  at::Tensor befores = keep ? at::empty({p.batch, p.heads, core.d.chunks, p.dk, p.dv}, o) : at::empty({0}, o);
  const float* pp = prev.defined() ? prev.data_ptr<float>() : nullptr;
  float *yp = y.data_ptr<float>(), *fp = final.data_ptr<float>();
  float* rp = keep ? retained.data_ptr<float>() : nullptr;
  float* bp = keep ? befores.data_ptr<float>() : nullptr;
  const float *wp = core.weight.data_ptr<float>(), *biasp = core.bias.data_ptr<float>();
  const int c = core.d.c, dk = core.d.dk, dv = core.d.dv;
  const int64_t n = core.d.chunks, state = core.state();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkForward fwd(c, dk, dv);
    const size_t walks = static_cast<size_t>(end - begin), ck = static_cast<size_t>(c) * dk;
    const size_t cv = static_cast<size_t>(c) * dv;
    std::vector<float> qbuf(walks * ck), kbuf(walks * ck), vbuf(walks * cv), obuf(keep ? 0 : walks * cv);
    std::vector<StateWalk> states;
    states.reserve(walks);
    for (int64_t bh = begin; bh < end; ++bh) {
      states.emplace_back(bp != nullptr ? bp + bh * n * state : nullptr, state,
                          pp != nullptr ? pp + bh * state : nullptr);
    }
    // Chunk by chunk, this thread's heads of a batch row together (the loop order: see the top).
    for (int64_t i = 0; i < n; ++i) {
      for_each_run(begin, end, p.heads, [&](int64_t b, int64_t h0, int64_t h1) {
        const int64_t first = b * p.heads + h0 - begin;  // this run's walks in the thread's buffers
        float *q = qbuf.data() + first * ck, *k = kbuf.data() + first * ck, *v = vbuf.data() + first * cv;
        core.pack(b, h0, h1, i, q, k, v);
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * p.heads + h, at = bh - begin - first;
          StateWalk& walk = states[static_cast<size_t>(bh - begin)];
          float* after = i + 1 < n ? walk.at(i + 1) : fp + bh * state;
          float* out = keep ? rp + (bh * p.length + i * c) * dv : obuf.data() + (bh - begin) * cv;
          fwd.run(q + at * ck, k + at * ck, dk, v + at * cv, core.tabs.mask_of(h, c), core.tabs.qd_of(h, c),
                  core.tabs.kd_of(h, c), core.tabs.decay_of(h), walk.before(i), after, out, dv);
        }
        for (int r = 0; r < c; ++r) {  // the norm and gate while the chunk's outputs are in cache
          const int64_t l = i * c + r;
          const float* z = core.row(b, l) + 2 * core.hk + core.hv;
          float* yrow = yp + (b * p.length + l) * core.hv;
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t bh = b * p.heads + h, col = h * dv;
            const float* out = keep ? rp + (bh * p.length + l) * dv : obuf.data() + (bh - begin) * cv + r * dv;
            norm_gate_row(out, z + col, wp + col, biasp + col, dv, e, yrow + col);
          }
        }
      });
    }
  });
  return {y, final, retained, befores};
}

// Returns (dproj, dprev, dweight, dbias); dprev is empty unless has_prev. grad_final may be
// absent (no gradient reaches the final state).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> retention_core_backward(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& grad_final_in, const at::Tensor& proj_in,
    const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin, const at::Tensor& retained_in,
    const at::Tensor& befores_in, const at::Tensor& mask, const at::Tensor& query_decay, const at::Tensor& key_decay,
    const at::Tensor& chunk_decay, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    int64_t heads, int64_t key_dim, int64_t chunk, bool has_prev) {
  const char* op = "retention_core_backward";
  const Core core(op, proj_in, cos, sin, mask, query_decay, key_decay, chunk_decay, norm_weight, norm_bias, heads,
                  key_dim, chunk);
  const ProjDims& p = core.p;
  const int c = core.d.c, dk = core.d.dk, dv = core.d.dv;
  const int64_t n = core.d.chunks, state = core.state();
  check_float(op, {&grad_in, &retained_in, &befores_in});
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({p.batch, p.length, core.hv}), op,
              ": grad must be (batch, length, heads * head_dim), got ", grad_in.sizes());
  TORCH_CHECK(retained_in.sizes() == at::IntArrayRef({p.batch, p.heads, p.length, p.dv}), op,
              ": retained must be (batch, heads, length, head_dim), got ", retained_in.sizes());
  TORCH_CHECK(befores_in.sizes() == at::IntArrayRef({p.batch, p.heads, n, p.dk, p.dv}), op,
              ": befores must be (batch, heads, chunks, key_dim, head_dim), got ", befores_in.sizes());
  const at::Tensor grad = grad_in.contiguous(), retained = retained_in.contiguous(), befores = befores_in.contiguous();
  const at::Tensor grad_final = checked_state(op, "grad_final", grad_final_in, p.batch, core.d);
  const at::TensorOptions o = core.proj.options();
  at::Tensor dproj = at::empty({p.batch, p.length, p.width}, o);
  at::Tensor dprev = has_prev ? at::empty({p.batch, p.heads, p.dk, p.dv}, o) : at::empty({0}, o);
  // The norm's weight and bias gradients: one partial sum per (batch, head), added up at the end in
  // a fixed order (runs repeat exactly).
  std::vector<float> partial(static_cast<size_t>(p.batch * p.heads) * 2 * dv, 0.0f);
  const float *gp = grad.data_ptr<float>(), *rp = retained.data_ptr<float>(), *bp = befores.data_ptr<float>();
  const float* gfp = grad_final.defined() ? grad_final.data_ptr<float>() : nullptr;
  const float *wp = core.weight.data_ptr<float>(), *biasp = core.bias.data_ptr<float>();
  float *dpp = dproj.data_ptr<float>(), *dprevp = has_prev ? dprev.data_ptr<float>() : nullptr;
  const float e = static_cast<float>(eps);
  at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
    ChunkBackward bwd(c, dk, dv);
    const size_t walks = static_cast<size_t>(end - begin), ck = static_cast<size_t>(c) * dk;
    const size_t cv = static_cast<size_t>(c) * dv;
    std::vector<float> qbuf(walks * ck), kbuf(walks * ck), vbuf(walks * cv), dobuf(walks * cv);
    std::vector<float> dq(walks * ck), dkb(walks * ck), dvb(walks * cv), dyw(dv);
    // Per walk: G, the gradient reaching the state after the chunk, and whether it is nonzero.
    std::vector<float> runnings(walks * state);
    std::vector<char> lives(walks, gfp != nullptr);
    if (gfp != nullptr) {
      std::memcpy(runnings.data(), gfp + begin * state, sizeof(float) * state * walks);
    }
    for (int64_t i = n - 1; i >= 0; --i) {  // chunk by chunk, a batch row's heads together (see the top)
      for_each_run(begin, end, p.heads, [&](int64_t b, int64_t h0, int64_t h1) {
        const int64_t first = b * p.heads + h0 - begin;
        float *q = qbuf.data() + first * ck, *k = kbuf.data() + first * ck, *v = vbuf.data() + first * cv;
        core.pack(b, h0, h1, i, q, k, v);
        for (int r = 0; r < c; ++r) {  // dO through the norm and gate; dz into the projection's gradient
          const int64_t l = i * c + r, row = b * p.length + l;
          const float* z = core.row(b, l) + 2 * core.hk + core.hv;
          float* dz = dpp + row * p.width + 2 * core.hk + core.hv;
          for (int64_t h = h0; h < h1; ++h) {
            const int64_t bh = b * p.heads + h, col = h * dv;
            float* dw = partial.data() + bh * 2 * dv;
            norm_gate_row_backward(rp + (bh * p.length + l) * dv, z + col, gp + row * core.hv + col, wp + col,
                                   biasp + col, dv, e, dz + col, dw, dw + dv,
                                   dobuf.data() + (bh - begin) * cv + r * dv, dyw.data());
          }
        }
        for (int64_t h = h0; h < h1; ++h) {
          const int64_t bh = b * p.heads + h, w = bh - begin, at = w - first;
          const float* before = has_prev || i > 0 ? bp + (bh * n + i) * state : nullptr;
          char& live = lives[static_cast<size_t>(w)];
          bwd.run(q + at * ck, k + at * ck, v + at * cv, dobuf.data() + w * cv, core.tabs.mask_of(h, c),
                  core.tabs.qd_of(h, c), core.tabs.kd_of(h, c), core.tabs.decay_of(h), before,
                  runnings.data() + w * state, live != 0, dq.data() + w * ck, dkb.data() + w * ck,
                  dvb.data() + w * cv);
          live = before != nullptr;
        }
        for (int r = 0; r < c; ++r) {  // dq, dk rotated back, and dv, into the projection's gradient, row by row
          const int64_t l = i * c + r;
          float* dst = dpp + (b * p.length + l) * p.width;
          const float* cs = core.rot.any() ? core.rot.cos_at(b, l, dk) : nullptr;
          const float* sn = core.rot.any() ? core.rot.sin_at(b, l, dk) : nullptr;
          for (int64_t h = h0; h < h1; ++h) {
            const float* src = dq.data() + (b * p.heads + h - begin) * ck + r * dk;
            if (cs != nullptr) {
              unrotate(src, cs, sn, dk, dst + h * dk);
            } else {
              std::memcpy(dst + h * dk, src, sizeof(float) * dk);
            }
          }
          for (int64_t h = h0; h < h1; ++h) {
            const float* src = dkb.data() + (b * p.heads + h - begin) * ck + r * dk;
            if (cs != nullptr) {
              unrotate(src, cs, sn, dk, dst + core.hk + h * dk);
            } else {
              std::memcpy(dst + core.hk + h * dk, src, sizeof(float) * dk);
            }
          }
          for (int64_t h = h0; h < h1; ++h) {
            std::memcpy(dst + 2 * core.hk + h * dv, dvb.data() + (b * p.heads + h - begin) * cv + r * dv,
                        sizeof(float) * dv);
          }
        }
      });
    }
    if (dprevp != nullptr) {  // dprev: the gradient reaching B_0
      std::memcpy(dprevp + begin * state, runnings.data(), sizeof(float) * state * walks);
    }
  });
  at::Tensor dweight = at::zeros({core.hv}, o), dbias = at::zeros({core.hv}, o);
  float *dwp = dweight.data_ptr<float>(), *dbp = dbias.data_ptr<float>();
  for (int64_t bh = 0; bh < p.batch * p.heads; ++bh) {
    const float* part = partial.data() + bh * 2 * dv;
    const int64_t col = (bh % p.heads) * dv;
    for (int j = 0; j < dv; ++j) {
      dwp[col + j] += part[j];
      dbp[col + j] += part[dv + j];
    }
  }
  return {dproj, dprev, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def(
      "retention_core(Tensor proj, Tensor? cos, Tensor? sin, Tensor mask, Tensor query_decay, Tensor key_decay, "
      "Tensor chunk_decay, Tensor? prev, Tensor norm_weight, Tensor norm_bias, float eps, int heads, int key_dim, "
      "int chunk, bool keep) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "retention_core_backward(Tensor grad, Tensor? grad_final, Tensor proj, Tensor? cos, Tensor? sin, "
      "Tensor retained, Tensor befores, Tensor mask, Tensor query_decay, Tensor key_decay, Tensor chunk_decay, "
      "Tensor norm_weight, Tensor norm_bias, float eps, int heads, int key_dim, int chunk, bool has_prev) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("retention_core", &retention_core);
  m.impl("retention_core_backward", &retention_core_backward);
}
