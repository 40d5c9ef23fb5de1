// The pieces of chunkwise retention on the CPU that work on one chunk at a time: the register
// tile every product is made of, the transposes that pack its operands, and one chunk's forward
// and backward (ChunkForward, ChunkBackward), with the checks and decay tables around them. Shared
// by the chunk ops (chunk_kernels.cpp) and the fused layer core (retention_core.cpp); the math is
// written out at the top of chunk_kernels.cpp.
//
// Every product is one tile routine over 8 rows x 32 columns accumulating in registers:
// C(i, :) += sum_p A(i, p) B(p, :), A read at any strides (a transposed operand costs nothing),
// B row-major. Causality bounds the p range (or the column tiles) of each row tile. GCC/Clang
// vector types: 512-bit registers where the build has AVX-512, two 256-bit ones with AVX2.
#pragma once

#include <ATen/ATen.h>

#include "vec16.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace yaretnet_cpu::chunk {

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
inline void masked_scores(const float* a, int64_t lda, const float* bt, const float* mask, int c, int k, float* out) {
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
inline void transpose_scalar(const float* x, int64_t ld, int rows, int cols, float* out, const float* scale, int r0,
                             int c0, int r1, int c1) {
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
inline void transpose(const float* x, int64_t ld, int rows, int cols, float* out, const float* scale = nullptr) {
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
inline void scale_rows(const float* x, int64_t ld, int rows, int cols, const float* scale, float* out) {
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

inline void check_float(const char* op, std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), op, ": float32 CPU tensors only");
  }
}

// Checks (batch, heads, chunks, c, dk) keys and (..., dv) values (the tables: table() below);
// returns the sizes.
inline Dims dims(const char* op, const at::Tensor& k, const at::Tensor& v) {
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
inline at::Tensor table(const char* op, const char* name, const at::Tensor& t, const Dims& d, int64_t n) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == d.heads && t.size(1) == 1 && t.size(2) == d.c && t.size(3) == n, op, ": ",
              name, " must be (heads, 1, chunk, ", n, ") = (", d.heads, ", 1, ", d.c, ", ", n, "), got ", t.sizes());
  return t.contiguous();
}

// Last dim contiguous (what Rows needs); other strides as they come.
inline at::Tensor rows_ok(const at::Tensor& t) { return t.stride(4) == 1 ? t : t.contiguous(); }

// befores_in (if given) checked and made contiguous.
inline at::Tensor checked_befores(const char* op, const std::optional<at::Tensor>& befores_in, const at::Tensor& k,
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

// The (heads,) chunk decay d = gamma^c, checked and contiguous.
inline at::Tensor chunk_decay_table(const char* op, const at::Tensor& t, const Dims& d) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d.heads, op, ": chunk_decay must be (heads,) = (", d.heads, "), got ",
              t.sizes());
  return t.contiguous();
}

// A (batch, heads, dk, dv) state (prev, or a final state's gradient), if given: float32, contiguous.
inline at::Tensor checked_state(const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t batch,
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

}  // namespace yaretnet_cpu::chunk
