// The parallel form inside every chunk of chunkwise retention, causal blocks only:
//   out = P V  with  P = (Q K^T) * M   per chunk,
// M the head's (c x c) decay mask (key scale folded in), zero above the diagonal.
//
// Why: as batched PyTorch products every chunk computes its full c x c scores, half of which the
// mask then zeroes, and writes them to memory for the mask, the second product and the backward.
// Those small products ran at ~50% of the machine's matmul speed (profile in
// docs/speed-training.md). Here one chunk at a time: a register-tiled product that skips the
// tiles above the diagonal (~half the work), the scores in a per-thread buffer that stays in
// cache, and the backward recomputes them instead of keeping them (no c x c tensor saved).
//
// Per chunk (row-major, c tokens, dk key and dv value width):
//   forward   P = (Q K^T) * M;  O = P V
//   backward  P as above;  dS = (dO V^T) * M;  dV = P^T dO;  dQ = dS K;  dK = dS^T Q
// Every product is one tile routine over 8 rows x 32 columns, accumulating in registers:
// C(i, :) = sum_p A(i, p) B(p, :), A read at any strides (a transposed operand costs nothing),
// B row-major. Causality bounds the p range (or the column tiles) of each row tile.
// GCC/Clang vector types: 512-bit registers where the build has AVX-512, two 256-bit ones with
// AVX2. Needs c, dk and dv to be multiples of 32 (intra_chunk_supports); ops/intra_chunk.py's
// plain PyTorch form covers every other case and is the reference this is tested against.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

typedef float vec16 __attribute__((vector_size(64)));
constexpr int kRows = 8;   // rows per tile
constexpr int kCols = 32;  // columns per tile: two vec16

inline vec16 load(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// acc = sum_{p in [p0, p1)} A(r, p) * B(p, 0:32) for rows r < kRows, A(r, p) = a[r * ar + p * ap],
// B's row p at b + p * ldb.
inline void tile(const float* a, int64_t ar, int64_t ap, const float* b, int64_t ldb, int p0, int p1,
                 vec16 (&acc)[kRows][2]) {
  for (int r = 0; r < kRows; ++r) {
    acc[r][0] = vec16{};
    acc[r][1] = vec16{};
  }
  for (int p = p0; p < p1; ++p) {
    const vec16 b0 = load(b + p * ldb);
    const vec16 b1 = load(b + p * ldb + 16);
    const float* ap_ = a + p * ap;
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float x = ap_[r * ar];
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
}

// out (c x c, row-major) = (A B^T) * M on and below the diagonal tiles, A (c x k) and Bt = B^T
// (k x c) row-major. Entries right of a row tile's last tile are left unset (never read).
void masked_scores(const float* a, const float* bt, const float* mask, int c, int k, float* out) {
  vec16 acc[kRows][2];
  for (int i0 = 0; i0 < c; i0 += kRows) {
    for (int j0 = 0; j0 < i0 + kRows; j0 += kCols) {
      tile(a + i0 * k, k, 1, bt + j0, c, 0, k, acc);
      for (int r = 0; r < kRows; ++r) {
        const int64_t at = static_cast<int64_t>(i0 + r) * c + j0;
        store(out + at, acc[r][0] * load(mask + at));
        store(out + at + 16, acc[r][1] * load(mask + at + 16));
      }
    }
  }
}

// out (c x n) = S B for S (c x c) lower triangular (row-major, as from masked_scores), B (c x n).
void lower_times(const float* s, const float* b, int c, int n, float* out) {
  vec16 acc[kRows][2];
  for (int i0 = 0; i0 < c; i0 += kRows) {
    for (int j0 = 0; j0 < n; j0 += kCols) {
      tile(s + i0 * c, c, 1, b + j0, n, 0, i0 + kRows, acc);
      for (int r = 0; r < kRows; ++r) {
        store(out + (i0 + r) * n + j0, acc[r][0]);
        store(out + (i0 + r) * n + j0 + 16, acc[r][1]);
      }
    }
  }
}

// out (c x n) = S^T B for S (c x c) lower triangular (row-major, as from masked_scores), B (c x n).
void lower_transposed_times(const float* s, const float* b, int c, int n, float* out) {
  vec16 acc[kRows][2];
  for (int i0 = 0; i0 < c; i0 += kRows) {
    for (int j0 = 0; j0 < n; j0 += kCols) {
      tile(s + i0, 1, c, b + j0, n, i0, c, acc);
      for (int r = 0; r < kRows; ++r) {
        store(out + (i0 + r) * n + j0, acc[r][0]);
        store(out + (i0 + r) * n + j0 + 16, acc[r][1]);
      }
    }
  }
}

void transpose(const float* x, int rows, int cols, float* out) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      out[j * rows + i] = x[i * cols + j];
    }
  }
}

struct Dims {
  int64_t groups;  // batch * heads * chunks
  int64_t chunks;  // chunks per (batch, head)
  int64_t heads;
  int c, dk, dv;
};

Dims check(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 5,
              "intra_chunk: q, k, v must be (batch, heads, chunks, chunk, dim), got ", q.sizes(), ", ", k.sizes(),
              ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "intra_chunk: k must have the shape of q, got ", q.sizes(), " and ",
              k.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == q.sizes().slice(0, 4),
              "intra_chunk: v must match q in all but the last dim, got ", q.sizes(), " and ", v.sizes());
  const int64_t heads = q.size(1);
  const int64_t c = q.size(3);
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == heads && mask.size(1) == 1 && mask.size(2) == c &&
                  mask.size(3) == c,
              "intra_chunk: mask must be (heads, 1, chunk, chunk) = (", heads, ", 1, ", c, ", ", c, "), got ",
              mask.sizes());
  TORCH_CHECK(c % kCols == 0 && q.size(4) % kCols == 0 && v.size(4) % kCols == 0,
              "intra_chunk: chunk, dk and dv must be multiples of ", kCols, ", got ", c, ", ", q.size(4), ", ",
              v.size(4));
  for (const at::Tensor* t : {&q, &k, &v, &mask}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "intra_chunk: float32 CPU tensors only");
  }
  return {q.size(0) * heads * q.size(2), q.size(2), heads, static_cast<int>(c), static_cast<int>(q.size(4)),
          static_cast<int>(v.size(4))};
}

at::Tensor intra_chunk(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                       const at::Tensor& mask_in) {
  const Dims d = check(q_in, k_in, v_in, mask_in);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor mask = mask_in.contiguous();
  at::Tensor out = at::empty(v.sizes(), v.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(static_cast<size_t>(dk) * c), scores(static_cast<size_t>(c) * c);
    for (int64_t g = begin; g < end; ++g) {
      const float* m = mp + ((g / d.chunks) % d.heads) * c * c;
      transpose(kp + g * c * dk, c, dk, kt.data());
      masked_scores(qp + g * c * dk, kt.data(), m, c, dk, scores.data());
      lower_times(scores.data(), vp + g * c * dv, c, dv, op + g * c * dv);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> intra_chunk_backward(const at::Tensor& grad_in, const at::Tensor& q_in,
                                                                    const at::Tensor& k_in, const at::Tensor& v_in,
                                                                    const at::Tensor& mask_in) {
  const Dims d = check(q_in, k_in, v_in, mask_in);
  TORCH_CHECK(grad_in.sizes() == v_in.sizes() && grad_in.scalar_type() == at::kFloat,
              "intra_chunk_backward: grad must be float32 with the shape of v, got ", grad_in.sizes());
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor mask = mask_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk_t = at::empty(k.sizes(), k.options());
  at::Tensor dv_t = at::empty(v.sizes(), v.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const float *mp = mask.data_ptr<float>(), *gp = grad.data_ptr<float>();
  float *dqp = dq.data_ptr<float>(), *dkp = dk_t.data_ptr<float>(), *dvp = dv_t.data_ptr<float>();
  const int c = d.c, dk = d.dk, dv = d.dv;
  at::parallel_for(0, d.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> t(static_cast<size_t>(std::max(dk, dv)) * c);
    std::vector<float> scores(static_cast<size_t>(c) * c), dscores(static_cast<size_t>(c) * c);
    for (int64_t g = begin; g < end; ++g) {
      const float* m = mp + ((g / d.chunks) % d.heads) * c * c;
      const float *qg = qp + g * c * dk, *kg = kp + g * c * dk, *vg = vp + g * c * dv, *og = gp + g * c * dv;
      transpose(kg, c, dk, t.data());
      masked_scores(qg, t.data(), m, c, dk, scores.data());           // P = (Q K^T) * M
      transpose(vg, c, dv, t.data());
      masked_scores(og, t.data(), m, c, dv, dscores.data());          // dS = (dO V^T) * M
      lower_transposed_times(scores.data(), og, c, dv, dvp + g * c * dv);   // dV = P^T dO
      lower_times(dscores.data(), kg, c, dk, dqp + g * c * dk);             // dQ = dS K
      lower_transposed_times(dscores.data(), qg, c, dk, dkp + g * c * dk);  // dK = dS^T Q
    }
  });
  return {dq, dk_t, dv_t};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(yaretnet, m) {
  m.def("intra_chunk(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
  m.def("intra_chunk_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(yaretnet, CPU, m) {
  m.impl("intra_chunk", &intra_chunk);
  m.impl("intra_chunk_backward", &intra_chunk_backward);
}
