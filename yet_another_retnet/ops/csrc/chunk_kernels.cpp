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
// at ~50% of the machine's matmul speed (profile in docs/speed-training.md). Here, one chunk at a
// time, the scores stay in a per-thread buffer in cache, the tiles above the diagonal are skipped
// (~half the work), the decay factors ride along, and the backward recomputes the scores instead
// of keeping them. Inputs may have any strides with a contiguous last dim (rows that are not
// contiguous are copied per chunk); outputs and gradients are contiguous.
//
// Every product is one tile routine over 8 rows x 32 columns accumulating in registers:
// C(i, :) += sum_p A(i, p) B(p, :), A read at any strides (a transposed operand costs nothing),
// B row-major. Causality bounds the p range (or the column tiles) of each row tile. GCC/Clang
// vector types: 512-bit registers where the build has AVX-512, two 256-bit ones with AVX2.
// c, dk and dv must be multiples of 32 (ops/chunk_kernels.py checks); the plain PyTorch form in
// ops/retention.py covers every other case and is the reference this is tested against.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using yaretnet_cpu::load;
using yaretnet_cpu::store;
using yaretnet_cpu::vec16;
constexpr int kRows = 8;   // rows per tile
constexpr int kCols = 32;  // columns per tile: two vec16

struct Tile {
  vec16 acc[kRows][2];

  Tile() {
    for (auto& row : acc) {
      row[0] = vec16{};
      row[1] = vec16{};
    }
  }

  // acc(r, :) += sum_{p in [p0, p1)} A(r, p) * B(p, 0:32), A(r, p) = a[r * ar + p * ap], B's row p at
  // b + p * ldb.
  void add(const float* a, int64_t ar, int64_t ap, const float* b, int64_t ldb, int p0, int p1) {
    for (int p = p0; p < p1; ++p) {
      const vec16 b0 = load(b + p * ldb);
      const vec16 b1 = load(b + p * ldb + 16);
      const float* col = a + p * ap;
#pragma GCC unroll 8
      for (int r = 0; r < kRows; ++r) {
        const float x = col[r * ar];
        acc[r][0] += x * b0;
        acc[r][1] += x * b1;
      }
    }
  }

  // Row r to out + r * ld, times scale[r] if given.
  void put(float* out, int64_t ld, const float* scale = nullptr) const {
    for (int r = 0; r < kRows; ++r) {
      const float s = scale != nullptr ? scale[r] : 1.0f;
      store(out + r * ld, acc[r][0] * s);
      store(out + r * ld + 16, acc[r][1] * s);
    }
  }
};

// A chunk's rows of a (batch, heads, chunks, c, width) tensor with any strides but the last.
struct Rows {
  const float* base;
  int64_t sb, sh, sn, row;
  int64_t heads, chunks;

  explicit Rows(const at::Tensor& t)
      : base(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)), row(t.stride(3)),
        heads(t.size(1)), chunks(t.size(2)) {}

  const float* at(int64_t g) const {
    return base + (g / (heads * chunks)) * sb + ((g / chunks) % heads) * sh + (g % chunks) * sn;
  }

  // Chunk g's c rows of `width` floats, contiguous: in place when they are, else copied into buf.
  // (The layer's views have rows 1-4 KiB apart: read in place, the tiles' columns of 8 rows hit
  // the same cache set and a new page per row; one copy per chunk costs less.)
  const float* packed(int64_t g, int c, int width, std::vector<float>& buf) const {
    const float* src = at(g);
    if (row == width) {
      return src;
    }
    for (int i = 0; i < c; ++i) {
      std::memcpy(buf.data() + static_cast<int64_t>(i) * width, src + i * row, sizeof(float) * width);
    }
    return buf.data();
  }
};

// out (c x c, row-major) = (A B^T) * M on and below the diagonal tiles, A (c x k) rows at stride
// lda, Bt = B^T (k x c) row-major. Entries right of a row tile's last tile are left unset (the
// products below never read them).
void masked_scores(const float* a, int64_t lda, const float* bt, const float* mask, int c, int k, float* out) {
  for (int i0 = 0; i0 < c; i0 += kRows) {
    for (int j0 = 0; j0 < i0 + kRows; j0 += kCols) {
      Tile t;
      t.add(a + i0 * lda, lda, 1, bt + j0, c, 0, k);
      for (int r = 0; r < kRows; ++r) {
        const int64_t at = static_cast<int64_t>(i0 + r) * c + j0;
        store(out + at, t.acc[r][0] * load(mask + at));
        store(out + at + 16, t.acc[r][1] * load(mask + at + 16));
      }
    }
  }
}

// The part [r0, r1) x [c0, c1) of transpose() below, one element at a time.
void transpose_scalar(const float* x, int64_t ld, int rows, int cols, float* out, const float* scale, int r0, int c0,
                      int r1, int c1) {
  for (int i = r0; i < r1; ++i) {
    const float s = scale != nullptr ? scale[i] : 1.0f;
    for (int j = c0; j < c1; ++j) {
      out[j * rows + i] = x[i * ld + j] * s;
    }
  }
}

#if defined(__AVX512F__)
// One 16 x 16 block: 16 rows of x (stride ld, row i times scale[i] if given) -> 16 rows of out
// (stride ldo). Four shuffle stages: pairs, quads, then 128-bit lanes twice.
inline void transpose16(const float* x, int64_t ld, float* out, int64_t ldo, const float* scale) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_loadu_ps(x + i * ld);
    if (scale != nullptr) {
      r[i] = _mm512_mul_ps(r[i], _mm512_set1_ps(scale[i]));
    }
  }
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // r[4 G + m], lane l: column 4 l + m of rows 4 G .. 4 G + 3
  for (int g = 0; g < 4; ++g) {
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int m = 0; m < 4; ++m) {
    const __m512 w0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), w1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 x0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 x1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    _mm512_storeu_ps(out + (m + 0) * ldo, _mm512_shuffle_f32x4(w0, x0, 0x88));
    _mm512_storeu_ps(out + (m + 8) * ldo, _mm512_shuffle_f32x4(w0, x0, 0xDD));
    _mm512_storeu_ps(out + (m + 4) * ldo, _mm512_shuffle_f32x4(w1, x1, 0x88));
    _mm512_storeu_ps(out + (m + 12) * ldo, _mm512_shuffle_f32x4(w1, x1, 0xDD));
  }
}
#endif

// x (rows x cols, rows at stride ld) -> out (cols x rows) row-major, row i scaled by scale[i] if given.
// Every chunk packs a transposed k (and v in the backward) this way; element by element that was
// 5-12% of each kernel's time at c 128, dk 64 (measured; 16 x 16 register blocks where AVX-512 is).
void transpose(const float* x, int64_t ld, int rows, int cols, float* out, const float* scale = nullptr) {
#if defined(__AVX512F__)
  const int r16 = rows / 16 * 16, c16 = cols / 16 * 16;
  for (int i = 0; i < r16; i += 16) {
    for (int j = 0; j < c16; j += 16) {
      transpose16(x + i * ld + j, ld, out + j * rows + i, rows, scale != nullptr ? scale + i : nullptr);
    }
  }
  transpose_scalar(x, ld, rows, cols, out, scale, 0, c16, rows, cols);
  transpose_scalar(x, ld, rows, cols, out, scale, r16, 0, rows, c16);
#else
  transpose_scalar(x, ld, rows, cols, out, scale, 0, 0, rows, cols);
#endif
}

// out (rows x cols) row-major = x (rows at stride ld) with row i scaled by scale[i].
void scale_rows(const float* x, int64_t ld, int rows, int cols, const float* scale, float* out) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) {
      out[i * cols + j] = x[i * ld + j] * scale[i];
    }
  }
}

struct Dims {
  int64_t groups, heads, chunks;  // groups = batch * heads * chunks
  int c, dk, dv;
};

void check_float(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": float32 CPU tensors only");
  }
}

// Checks (batch, heads, chunks, c, dk) keys and (..., dv) values (the tables: table() below);
// returns the sizes.
Dims dims(const char* op, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 5 && v.dim() == 5, op, ": inputs must be (batch, heads, chunks, chunk, dim), got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(v.sizes().slice(0, 4) == k.sizes().slice(0, 4), op, ": inputs must agree in all but the last dim, got ",
              k.sizes(), " and ", v.sizes());
  const int64_t c = k.size(3);
  TORCH_CHECK(c % kCols == 0 && k.size(4) % kCols == 0 && v.size(4) % kCols == 0, op,
              ": chunk, dk and dv must be multiples of ", kCols, ", got ", c, ", ", k.size(4), ", ", v.size(4));
  return {k.size(0) * k.size(1) * k.size(2), k.size(1), k.size(2), static_cast<int>(c), static_cast<int>(k.size(4)),
          static_cast<int>(v.size(4))};
}

// (heads, 1, c, n) table -> contiguous, checked.
at::Tensor table(const char* op, const char* name, const at::Tensor& t, const Dims& d, int64_t n) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == d.heads && t.size(1) == 1 && t.size(2) == d.c && t.size(3) == n, op, ": ",
              name, " must be (heads, 1, chunk, ", n, ") = (", d.heads, ", 1, ", d.c, ", ", n, "), got ", t.sizes());
  return t.contiguous();
}

// Last dim contiguous (what Rows needs); other strides as they come.
at::Tensor rows_ok(const at::Tensor& t) { return t.stride(4) == 1 ? t : t.contiguous(); }

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

// befores_in (if given) checked and made contiguous.
at::Tensor checked_befores(const char* op, const std::optional<at::Tensor>& befores_in, const at::Tensor& k,
                           const Dims& d) {
  if (!befores_in.has_value()) {
    return at::Tensor();
  }
  check_float(op, {&*befores_in});
  TORCH_CHECK(befores_in->sizes() == at::IntArrayRef({k.size(0), k.size(1), k.size(2), d.dk, d.dv}), op,
              ": befores must be (batch, heads, chunks, dk, dv), got ", befores_in->sizes());
  return befores_in->contiguous();
}

// One thread's buffers for one chunk's forward: see ChunkForward::run.
struct ChunkForward {
  int c, dk, dv;
  std::vector<float> kt, ktd, scores, qs;

  ChunkForward(int c_, int dk_, int dv_)
      : c(c_), dk(dk_), dv(dv_), kt(static_cast<size_t>(dk_) * c_), ktd(static_cast<size_t>(dk_) * c_),
        scores(static_cast<size_t>(c_) * c_), qs(static_cast<size_t>(c_) * dk_) {}

  // O (c x dv, rows at stride ldo) = ((Q K^T) * M) V + (Q * qd) B and after = d B + (K * kd)^T V
  // (after == nullptr: O alone), B = before (dk x dv; nullptr: the zero state). q (c x dk) and v
  // (c x dv) contiguous rows, k rows at stride ldk.
  void run(const float* q, const float* k, int64_t ldk, const float* v, const float* mask, const float* qd,
           const float* kd, float decay, const float* before, float* after, float* o, int64_t ldo) {
    transpose(k, ldk, c, dk, kt.data());
    masked_scores(q, dk, kt.data(), mask, c, dk, scores.data());
    if (before != nullptr) {
      scale_rows(q, dk, c, dk, qd, qs.data());
    }
    for (int i0 = 0; i0 < c; i0 += kRows) {
      for (int e0 = 0; e0 < dv; e0 += kCols) {
        Tile t;
        t.add(scores.data() + i0 * c, c, 1, v + e0, dv, 0, i0 + kRows);
        if (before != nullptr) {
          t.add(qs.data() + i0 * dk, dk, 1, before + e0, dv, 0, dk);
        }
        t.put(o + i0 * ldo + e0, ldo);
      }
    }
    if (after == nullptr) {  // the output alone (chunk_output)
      return;
    }
    transpose(k, ldk, c, dk, ktd.data(), kd);  // (K * kd)^T
    for (int p0 = 0; p0 < dk; p0 += kRows) {
      for (int e0 = 0; e0 < dv; e0 += kCols) {
        Tile t;
        t.add(ktd.data() + p0 * c, c, 1, v + e0, dv, 0, c);
        for (int r = 0; r < kRows; ++r) {
          const int64_t at = static_cast<int64_t>(p0 + r) * dv + e0;
          vec16 lo = t.acc[r][0], hi = t.acc[r][1];
          if (before != nullptr) {
            lo += decay * load(before + at);
            hi += decay * load(before + at + 16);
          }
          store(after + at, lo);
          store(after + at + 16, hi);
        }
      }
    }
  }
};

// One thread's buffers for one chunk's backward: see ChunkBackward::run.
struct ChunkBackward {
  int c, dk, dv;
  std::vector<float> t_buf, scores, dscores, qs, gs, ks, vs, bt, gt;

  ChunkBackward(int c_, int dk_, int dv_)
      : c(c_), dk(dk_), dv(dv_), t_buf(static_cast<size_t>(c_) * std::max(dk_, dv_)),
        scores(static_cast<size_t>(c_) * c_), dscores(static_cast<size_t>(c_) * c_),
        qs(static_cast<size_t>(c_) * dk_), gs(static_cast<size_t>(c_) * dv_), ks(static_cast<size_t>(c_) * dk_),
        vs(static_cast<size_t>(c_) * dv_), bt(static_cast<size_t>(dk_) * dv_), gt(static_cast<size_t>(dk_) * dv_) {}

  // dq, dk (c x dk) and dv (c x dv), contiguous, of one chunk from its rows q, k, v and output
  // gradient og (contiguous), B = before (nullptr: the zero state, whose gradient nobody wants)
  // and G = state_grad (dk x dv), the gradient reaching the state after the chunk (live: nonzero;
  // kd and decay are read only then). When before is given, G becomes the gradient reaching B:
  // d G + (Q * qd)^T dO.
  void run(const float* q, const float* k, const float* v, const float* og, const float* mask, const float* qd,
           const float* kd, float decay, const float* before, float* state_grad, bool live, float* dq, float* dk_out,
           float* dv_out) {
    transpose(k, dk, c, dk, t_buf.data());
    masked_scores(q, dk, t_buf.data(), mask, c, dk, scores.data());  // P = (Q K^T) * M
    transpose(v, dv, c, dv, t_buf.data());
    masked_scores(og, dv, t_buf.data(), mask, c, dv, dscores.data());  // dS = (dO V^T) * M
    if (before != nullptr) {
      scale_rows(og, dv, c, dv, qd, gs.data());  // dO * qd
      transpose(before, dv, dk, dv, bt.data());  // B^T (dv x dk)
      scale_rows(q, dk, c, dk, qd, qs.data());   // Q * qd
    }
    if (live) {
      scale_rows(k, dk, c, dk, kd, ks.data());         // K * kd
      scale_rows(v, dv, c, dv, kd, vs.data());         // V * kd
      transpose(state_grad, dv, dk, dv, gt.data());  // G^T (dv x dk)
    }
    for (int i0 = 0; i0 < c; i0 += kRows) {
      for (int e0 = 0; e0 < dv; e0 += kCols) {  // dV = P^T dO (+ (K * kd) G)
        Tile t;
        t.add(scores.data() + i0, 1, c, og + e0, dv, i0, c);
        if (live) {
          t.add(ks.data() + i0 * dk, dk, 1, state_grad + e0, dv, 0, dk);
        }
        t.put(dv_out + i0 * dv + e0, dv);
      }
      for (int p0 = 0; p0 < dk; p0 += kCols) {
        Tile tq;  // dQ = dS K (+ (dO * qd) B^T)
        tq.add(dscores.data() + i0 * c, c, 1, k + p0, dk, 0, i0 + kRows);
        if (before != nullptr) {
          tq.add(gs.data() + i0 * dv, dv, 1, bt.data() + p0, dk, 0, dv);
        }
        tq.put(dq + i0 * dk + p0, dk);
        Tile tk;  // dK = dS^T Q (+ (V * kd) G^T)
        tk.add(dscores.data() + i0, 1, c, q + p0, dk, i0, c);
        if (live) {
          tk.add(vs.data() + i0 * dv, dv, 1, gt.data() + p0, dk, 0, dv);
        }
        tk.put(dk_out + i0 * dk + p0, dk);
      }
    }
    if (before != nullptr) {  // G <- d G + (Q * qd)^T dO: the gradient reaching B
      for (int p0 = 0; p0 < dk; p0 += kRows) {
        for (int e0 = 0; e0 < dv; e0 += kCols) {
          Tile t;
          t.add(qs.data() + p0, 1, dk, og + e0, dv, 0, c);
          for (int r = 0; r < kRows; ++r) {
            float* at = state_grad + static_cast<int64_t>(p0 + r) * dv + e0;
            vec16 lo = t.acc[r][0], hi = t.acc[r][1];
            if (live) {
              lo += decay * load(at);
              hi += decay * load(at + 16);
            }
            store(at, lo);
            store(at + 16, hi);
          }
        }
      }
    }
  }
};

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

// The (heads,) chunk decay d = gamma^c, checked and contiguous.
at::Tensor chunk_decay_table(const char* op, const at::Tensor& t, const Dims& d) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d.heads, op, ": chunk_decay must be (heads,) = (", d.heads, "), got ",
              t.sizes());
  return t.contiguous();
}

// A (batch, heads, dk, dv) state (prev, or a final state's gradient), if given: float32, contiguous.
at::Tensor checked_state(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t batch,
                         const Dims& d) {
  if (!t.has_value()) {
    return at::Tensor();
  }
  check_float(op, {&*t});
  TORCH_CHECK(t->sizes() == at::IntArrayRef({batch, d.heads, d.dk, d.dv}), op, ": ", name,
              " must be (batch, heads, dk, dv) = (", batch, ", ", d.heads, ", ", d.dk, ", ", d.dv, "), got ",
              t->sizes());
  return t->contiguous();
}

// The decay tables of a (batch, heads) walk over the chunks, checked.
struct Tables {
  at::Tensor mask, qd, kd, decay;

  Tables(const char* op, const at::Tensor& mask_in, const at::Tensor& qd_in, const at::Tensor& kd_in,
         const at::Tensor& decay_in, const Dims& d)
      : mask(table(op, "mask", mask_in, d, d.c)), qd(table(op, "query_decay", qd_in, d, 1)),
        kd(table(op, "key_decay", kd_in, d, 1)), decay(chunk_decay_table(op, decay_in, d)) {
    check_float(op, {&mask_in, &qd_in, &kd_in, &decay_in});
  }

  const float* mask_of(int64_t head, int c) const { return mask.data_ptr<float>() + head * c * c; }
  const float* qd_of(int64_t head, int c) const { return qd.data_ptr<float>() + head * c; }
  const float* kd_of(int64_t head, int c) const { return kd.data_ptr<float>() + head * c; }
  float decay_of(int64_t head) const { return decay.data_ptr<float>()[head]; }
};

// The states B_0 .. B_{n-1} of one (batch, head) walk: in `kept` (n x state floats) when the
// backward needs them, else in two alternating buffers. B_0 = prev (nullptr: zero).
struct StateWalk {
  float* kept;
  std::vector<float> local;
  int64_t size;
  bool has_prev;

  StateWalk(float* kept_, int64_t size_, const float* prev)
      : kept(kept_), local(kept_ != nullptr ? 0 : 2 * size_), size(size_), has_prev(prev != nullptr) {
    if (prev != nullptr) {
      std::memcpy(at(0), prev, sizeof(float) * size);
    } else if (kept != nullptr) {
      std::memset(kept, 0, sizeof(float) * size);  // B_0 for the backward's bookkeeping
    }
  }

  float* at(int64_t i) { return kept != nullptr ? kept + i * size : local.data() + (i % 2) * size; }
  // B_i, or nullptr when it is the zero state.
  const float* before(int64_t i) { return has_prev || i > 0 ? at(i) : nullptr; }
};

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
