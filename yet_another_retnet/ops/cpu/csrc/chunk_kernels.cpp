// The per-chunk products of chunkwise retention on the CPU, one chunk at a time.
//
// Per chunk (c tokens, key width dk, value width dv; M the head's c x c decay mask with the key
// scale folded in, zero above the diagonal; kd and qd the head's per-row decay factors; B the
// state before the chunk, from the scan in chunk_scan.cpp):
//   contributions   R = (K * kd)^T V                            what the chunk adds to the state
//   output          O = ((Q K^T) * M) V + (Q * qd) B             inside the chunk plus the past
// and their backwards:
//   contributions   dK = (V dR^T) * kd;  dV = (K dR) * kd
//   output          P = (Q K^T) * M;  dS = (dO V^T) * M;  dV = P^T dO;  dK = dS^T Q;
//                   dQ = dS K + (dO * qd) B^T;  dB = (Q * qd)^T dO
//
// Why: as batched PyTorch products every chunk computes its full c x c scores, half of which the
// mask then zeroes, writes them out for the mask, the second product and the backward, and the
// state products and decay factors are further passes over q, k and v. Those small products ran
// at ~50% of the machine's matmul speed (docs/performance.md). Here, one chunk at a
// time, the scores stay in a per-thread buffer in cache, the tiles above the diagonal are skipped
// (~half the work), the decay factors ride along, and the backward recomputes the scores instead
// of keeping them. Inputs may have any strides with a contiguous last dim (rows that are not
// contiguous are copied per chunk); outputs and gradients are contiguous.
//
// The tile routine every product is made of, and one chunk's forward and backward: chunk_tiles.h.
// c, dk and dv must be multiples of 32 (ops/chunk_kernels.py checks); the plain PyTorch form in
// ops/retention.py covers every other case and is the reference this is tested against.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "chunk_tiles.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using namespace yaretnet_cpu::chunk;  // NOLINT(google-build-using-namespace)

at::Tensor chunk_contributions(const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& key_decay_in) {
  const char* op = "chunk_contributions";
  check_float(op, {&k_in, &v_in, &key_decay_in});
  const Dims d = dims(op, k_in, v_in);
  const at::Tensor k = rows_ok(k_in), v = rows_ok(v_in), kd = table(op, "key_decay", key_decay_in, d, 1);
  at::Tensor out = at::empty({k.size(0), k.size(1), k.size(2), d.dk, d.dv}, k.options());
  const Rows kr(k), vr(v);
  const float* kdp = kd.data_ptr<float>();
  float* op_ = out.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> ktd(static_cast<size_t>(dk) * c), vbuf(static_cast<size_t>(c) * dv);
    for (int64_t g = begin; g < end; ++g) {
      transpose(kr.at(g), kr.row, c, dk, ktd.data(), kdp + (g / d.chunks % d.heads) * c);  // (K * kd)^T
      const float* vg = vr.packed(g, c, dv, vbuf);
      float* r_out = op_ + g * dk * dv;
      for (int p0 = 0; p0 < dk; p0 += kRows) {
        for (int e0 = 0; e0 < dv; e0 += kCols) {
          Tile t;
          t.add(ktd.data() + p0 * c, c, 1, vg + e0, dv, 0, c);
          t.put(r_out + p0 * dv + e0, dv);
        }
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> chunk_contributions_backward(const at::Tensor& grad_in, const at::Tensor& k_in,
                                                                const at::Tensor& v_in,
                                                                const at::Tensor& key_decay_in) {
  const char* op = "chunk_contributions_backward";
  check_float(op, {&grad_in, &k_in, &v_in, &key_decay_in});
  const Dims d = dims(op, k_in, v_in);
  const at::Tensor k = rows_ok(k_in), v = rows_ok(v_in), kd = table(op, "key_decay", key_decay_in, d, 1);
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(grad.sizes() == at::IntArrayRef({k.size(0), k.size(1), k.size(2), d.dk, d.dv}), op,
              ": grad must be (batch, heads, chunks, dk, dv), got ", grad.sizes());
  at::Tensor dk_t = at::empty(k.sizes(), k.options()), dv_t = at::empty(v.sizes(), v.options());
  const Rows kr(k), vr(v);
  const float *kdp = kd.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float *dkp = dk_t.data_ptr<float>(), *dvp = dv_t.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gt(static_cast<size_t>(dv) * dk);
    std::vector<float> kbuf(static_cast<size_t>(c) * dk), vbuf(static_cast<size_t>(c) * dv);
    for (int64_t g = begin; g < end; ++g) {
      const float* scale = kdp + (g / d.chunks % d.heads) * c;
      const float* dr = gp + g * dk * dv;
      const float *kg = kr.packed(g, c, dk, kbuf), *vg = vr.packed(g, c, dv, vbuf);
      transpose(dr, dv, dk, dv, gt.data());  // dR^T (dv x dk)
      for (int i0 = 0; i0 < c; i0 += kRows) {
        for (int p0 = 0; p0 < dk; p0 += kCols) {  // dK = (V dR^T) * kd
          Tile t;
          t.add(vg + i0 * dv, dv, 1, gt.data() + p0, dk, 0, dv);
          t.put(dkp + g * c * dk + i0 * dk + p0, dk, scale + i0);
        }
        for (int e0 = 0; e0 < dv; e0 += kCols) {  // dV = (K dR) * kd
          Tile t;
          t.add(kg + i0 * dk, dk, 1, dr + e0, dv, 0, dk);
          t.put(dvp + g * c * dv + i0 * dv + e0, dv, scale + i0);
        }
      }
    }
  });
  return {dk_t, dv_t};
}

at::Tensor chunk_output(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                        const at::Tensor& mask_in, const at::Tensor& query_decay_in,
                        const std::optional<at::Tensor>& befores_in) {
  const char* op = "chunk_output";
  check_float(op, {&q_in, &k_in, &v_in, &mask_in, &query_decay_in});
  const Dims d = dims(op, k_in, v_in);
  TORCH_CHECK(q_in.sizes() == k_in.sizes(), op, ": q must have the shape of k, got ", q_in.sizes(), " and ",
              k_in.sizes());
  const at::Tensor q = rows_ok(q_in), k = rows_ok(k_in), v = rows_ok(v_in);
  const at::Tensor mask = table(op, "mask", mask_in, d, d.c), qd = table(op, "query_decay", query_decay_in, d, 1);
  const at::Tensor befores = checked_befores(op, befores_in, k, d);
  at::Tensor out = at::empty(v.sizes(), v.options());
  const Rows qr(q), kr(k), vr(v);
  const float *mp = mask.data_ptr<float>(), *qdp = qd.data_ptr<float>();
  const float* bp = befores.defined() ? befores.data_ptr<float>() : nullptr;
  float* op_ = out.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    ChunkForward fwd(c, dk, dv);
    std::vector<float> qbuf(static_cast<size_t>(c) * dk), vbuf(static_cast<size_t>(c) * dv);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t head = g / d.chunks % d.heads;
      fwd.run(qr.packed(g, c, dk, qbuf), kr.at(g), kr.row, vr.packed(g, c, dv, vbuf), mp + head * c * c,
              qdp + head * c, nullptr, 0.0f, bp != nullptr ? bp + g * dk * dv : nullptr, nullptr, op_ + g * c * dv, dv);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_output_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& mask_in, const at::Tensor& query_decay_in, const std::optional<at::Tensor>& befores_in) {
  const char* op = "chunk_output_backward";
  check_float(op, {&grad_in, &q_in, &k_in, &v_in, &mask_in, &query_decay_in});
  const Dims d = dims(op, k_in, v_in);
  TORCH_CHECK(q_in.sizes() == k_in.sizes() && grad_in.sizes() == v_in.sizes(), op,
              ": q must have the shape of k and grad that of v, got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              grad_in.sizes(), ", ", v_in.sizes());
  const at::Tensor q = rows_ok(q_in), k = rows_ok(k_in), v = rows_ok(v_in), grad = rows_ok(grad_in);
  const at::Tensor mask = table(op, "mask", mask_in, d, d.c), qd = table(op, "query_decay", query_decay_in, d, 1);
  const at::Tensor befores = checked_befores(op, befores_in, k, d);
  const at::Tensor dbefores = befores.defined() ? at::empty_like(befores) : at::empty({0}, q.options());
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk_t = at::empty(k.sizes(), k.options());
  at::Tensor dv_t = at::empty(v.sizes(), v.options());
  const Rows qr(q), kr(k), vr(v), gr(grad);
  const float *mp = mask.data_ptr<float>(), *qdp = qd.data_ptr<float>();
  const float* bp = befores.defined() ? befores.data_ptr<float>() : nullptr;
  float* dbp = bp != nullptr ? dbefores.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk_t.data_ptr<float>(), *dvp = dv_t.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  const int64_t state = static_cast<int64_t>(dk) * dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    ChunkBackward bwd(c, dk, dv);
    const size_t cd = static_cast<size_t>(c) * std::max(dk, dv);
    std::vector<float> qbuf(cd), kbuf(cd), vbuf(cd), gbuf(cd);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t head = g / d.chunks % d.heads;
      // No state after the chunk to take a gradient from (not live): dB = (Q * qd)^T dO alone.
      bwd.run(qr.packed(g, c, dk, qbuf), kr.packed(g, c, dk, kbuf), vr.packed(g, c, dv, vbuf),
              gr.packed(g, c, dv, gbuf), mp + head * c * c, qdp + head * c, nullptr, 0.0f,
              bp != nullptr ? bp + g * state : nullptr, dbp != nullptr ? dbp + g * state : nullptr, false,
              dqp + g * c * dk, dkp + g * c * dk, dvp + g * c * dv);
    }
  });
  return {dq, dk_t, dv_t, dbefores};
}

// ---------------------------------------------------------------------------------------------
// The whole chunkwise core of one layer in one op: per (batch, head), the chunks in order, each
// chunk's output from the state before it, then the state carried on (the scan of chunk_scan.cpp
// folded in):
//   O_m = ((Q K^T) * M) V + (Q * qd) B_m,   B_{m+1} = d B_m + (K * kd)^T V,   B_0 = prev, final = B_n
// and the backward in reverse chunk order, with G the gradient reaching B_{m+1} (dfinal for the
// last chunk): the output's backward above, plus the contribution's  dK += (V * kd) G^T,
// dV += (K * kd) G,  then  G <- d G + (Q * qd)^T dO  for the chunk before; dprev is the last G.
//
// Why: the three ops above (contributions, scan, output) each stream q, k, v and the states
// through memory, and their backwards add two k- and v-sized gradients after them. Here a chunk's
// rows are read once, forward and backward, while they are in cache, and the gradients are
// summed in registers. The price is parallelism: only over batch * heads, so the Python side
// (ops/chunk_kernels.py) takes this op when that spreads evenly over the threads, and the three
// ops otherwise.
// ---------------------------------------------------------------------------------------------

// Returns (out, final, befores): befores (batch, heads, chunks, dk, dv) holds B_m for the
// backward when keep_befores, else it is empty and each thread keeps the running state itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_retention(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& mask_in,
    const at::Tensor& query_decay_in, const at::Tensor& key_decay_in, const at::Tensor& chunk_decay_in,
    const std::optional<at::Tensor>& prev_in, bool keep_befores) {
  const char* op = "chunk_retention";
  check_float(op, {&q_in, &k_in, &v_in});
  const Dims d = dims(op, k_in, v_in);
  TORCH_CHECK(q_in.sizes() == k_in.sizes(), op, ": q must have the shape of k, got ", q_in.sizes(), " and ",
              k_in.sizes());
  TORCH_CHECK(d.chunks > 0, op, ": inputs must hold at least one chunk, got ", k_in.sizes());
  const at::Tensor q = rows_ok(q_in), k = rows_ok(k_in), v = rows_ok(v_in);
  const Tables tabs(op, mask_in, query_decay_in, key_decay_in, chunk_decay_in, d);
  const at::Tensor prev = checked_state(op, "prev", prev_in, k.size(0), d);
  at::Tensor out = at::empty(v.sizes(), v.options());
  at::Tensor final = at::empty({k.size(0), k.size(1), d.dk, d.dv}, k.options());
  at::Tensor befores = keep_befores ? at::empty({k.size(0), k.size(1), k.size(2), d.dk, d.dv}, k.options())
                                    : at::empty({0}, k.options());
  const Rows qr(q), kr(k), vr(v);
  const float* pp = prev.defined() ? prev.data_ptr<float>() : nullptr;
  float *op_ = out.data_ptr<float>(), *fp = final.data_ptr<float>();
  float* bp = keep_befores ? befores.data_ptr<float>() : nullptr;
  const int c = d.c, dk = d.dk, dv = d.dv;
  const int64_t n = d.chunks, state = static_cast<int64_t>(dk) * dv;
  at::parallel_for(0, d.groups / n, 1, [&](int64_t begin, int64_t end) {
    ChunkForward fwd(c, dk, dv);
    std::vector<float> qbuf(static_cast<size_t>(c) * dk), vbuf(static_cast<size_t>(c) * dv);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t head = bh % d.heads;
      StateWalk states(bp != nullptr ? bp + bh * n * state : nullptr, state, pp ? pp + bh * state : nullptr);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g = bh * n + i;
        float* after = i + 1 < n ? states.at(i + 1) : fp + bh * state;
        fwd.run(qr.packed(g, c, dk, qbuf), kr.at(g), kr.row, vr.packed(g, c, dv, vbuf), tabs.mask_of(head, c),
                tabs.qd_of(head, c), tabs.kd_of(head, c), tabs.decay_of(head), states.before(i), after,
                op_ + g * c * dv, dv);
      }
    }
  });
  return {out, final, befores};
}

// Returns (dq, dk, dv, dprev); dprev is empty unless has_prev. grad_final may be undefined (no
// gradient reaches the final state).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> chunk_retention_backward(
    const at::Tensor& grad_in, const std::optional<at::Tensor>& grad_final_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& befores_in, const at::Tensor& mask_in,
    const at::Tensor& query_decay_in, const at::Tensor& key_decay_in, const at::Tensor& chunk_decay_in,
    bool has_prev) {
  const char* op = "chunk_retention_backward";
  check_float(op, {&grad_in, &q_in, &k_in, &v_in, &befores_in});
  const Dims d = dims(op, k_in, v_in);
  TORCH_CHECK(q_in.sizes() == k_in.sizes() && grad_in.sizes() == v_in.sizes(), op,
              ": q must have the shape of k and grad that of v, got ", q_in.sizes(), ", ", k_in.sizes(), ", ",
              grad_in.sizes(), ", ", v_in.sizes());
  TORCH_CHECK(d.chunks > 0, op, ": inputs must hold at least one chunk, got ", k_in.sizes());
  const at::Tensor q = rows_ok(q_in), k = rows_ok(k_in), v = rows_ok(v_in), grad = rows_ok(grad_in);
  const Tables tabs(op, mask_in, query_decay_in, key_decay_in, chunk_decay_in, d);
  const at::Tensor befores = checked_befores(op, befores_in, k, d);
  const at::Tensor grad_final = checked_state(op, "grad_final", grad_final_in, k.size(0), d);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk_t = at::empty(k.sizes(), k.options());
  at::Tensor dv_t = at::empty(v.sizes(), v.options());
  at::Tensor dprev = has_prev ? at::empty({k.size(0), k.size(1), d.dk, d.dv}, k.options()) : at::empty({0}, k.options());
  const Rows qr(q), kr(k), vr(v), gr(grad);
  const float* bp = befores.data_ptr<float>();
  const float* gfp = grad_final.defined() ? grad_final.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk_t.data_ptr<float>(), *dvp = dv_t.data_ptr<float>();
  float* dpp = has_prev ? dprev.data_ptr<float>() : nullptr;
  const int c = d.c, dk = d.dk, dv = d.dv;
  const int64_t n = d.chunks, state = static_cast<int64_t>(dk) * dv;
  at::parallel_for(0, d.groups / n, 1, [&](int64_t begin, int64_t end) {
    ChunkBackward bwd(c, dk, dv);
    const size_t cd = static_cast<size_t>(c) * std::max(dk, dv);
    std::vector<float> qbuf(cd), kbuf(cd), vbuf(cd), gbuf(cd), running(static_cast<size_t>(state));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t head = bh % d.heads;
      bool live = gfp != nullptr;  // whether G (running) is nonzero
      if (live) {
        std::memcpy(running.data(), gfp + bh * state, sizeof(float) * state);
      }
      for (int64_t i = n - 1; i >= 0; --i) {
        const int64_t g = bh * n + i;
        const float* before = has_prev || i > 0 ? bp + g * state : nullptr;
        bwd.run(qr.packed(g, c, dk, qbuf), kr.packed(g, c, dk, kbuf), vr.packed(g, c, dv, vbuf),
                gr.packed(g, c, dv, gbuf), tabs.mask_of(head, c), tabs.qd_of(head, c), tabs.kd_of(head, c),
                tabs.decay_of(head), before, running.data(), live, dqp + g * c * dk, dkp + g * c * dk,
                dvp + g * c * dv);
        live = before != nullptr;
      }
      if (dpp != nullptr) {  // dprev: the gradient reaching B_0 (has_prev: never the zero state)
        std::memcpy(dpp + bh * state, running.data(), sizeof(float) * state);
      }
    }
  });
  return {dq, dk_t, dv_t, dprev};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("chunk_contributions(Tensor k, Tensor v, Tensor key_decay) -> Tensor");
  m.def("chunk_contributions_backward(Tensor grad, Tensor k, Tensor v, Tensor key_decay) -> (Tensor, Tensor)");
  m.def("chunk_output(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor query_decay, Tensor? befores) -> Tensor");
  m.def(
      "chunk_output_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor mask, Tensor query_decay, "
      "Tensor? befores) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "chunk_retention(Tensor q, Tensor k, Tensor v, Tensor mask, Tensor query_decay, Tensor key_decay, "
      "Tensor chunk_decay, Tensor? prev, bool keep_befores) -> (Tensor, Tensor, Tensor)");
  m.def(
      "chunk_retention_backward(Tensor grad, Tensor? grad_final, Tensor q, Tensor k, Tensor v, Tensor befores, "
      "Tensor mask, Tensor query_decay, Tensor key_decay, Tensor chunk_decay, bool has_prev) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("chunk_contributions", &chunk_contributions);
  m.impl("chunk_contributions_backward", &chunk_contributions_backward);
  m.impl("chunk_output", &chunk_output);
  m.impl("chunk_output_backward", &chunk_output_backward);
  m.impl("chunk_retention", &chunk_retention);
  m.impl("chunk_retention_backward", &chunk_retention_backward);
}
