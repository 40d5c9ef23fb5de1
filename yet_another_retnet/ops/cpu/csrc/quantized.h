// The int8 and int4 products (quantized.cpp) at the level of raw rows, for the ops there and for
// the one-call decoder layer (decode_step.cpp).
#pragma once

#include <ATen/ATen.h>

#include "team.h"

#include <cstdint>

namespace yaretnet_cpu {

// y (n x rows, row stride ldy) = x (n x cols, row stride ldx) W^T, W int8 (rows x cols, row-major)
// times scale (rows) per row: float32, no bias. Each weight byte is read once per call. All rows
// over PyTorch's thread pool, or with `only` the rows [only->lo, only->hi) on the calling thread.
void int8_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const int8_t* w, const float* scale,
                  int64_t rows, float* y, int64_t ldy, const RowRange* only = nullptr);

// The rows a thread-pool task of these products takes at least, for rows of `row_bytes`.
inline int64_t product_grain(int64_t row_bytes) { return row_grain(row_bytes, 16); }

// An int4 weight in the form of ops/cpu/quantized.py: codes (rows x padded / 2 bytes), scale and
// low (rows x padded / group floats), each row at its own stride (in elements). Separate
// contiguous tensors have strides padded / 2, groups, groups; the decoding plans interleave a
// row's scales, lows and codes in one buffer (interleave_int4), so that each row is one stream
// through memory rather than three.
struct Int4Weight {
  const uint8_t* codes;
  const float* scale;
  const float* low;
  int64_t code_stride, scale_stride, low_stride;
  int64_t padded, group;
  int64_t groups() const { return padded / group; }
  const uint8_t* codes_row(int64_t r) const { return codes + r * code_stride; }
  const float* scale_row(int64_t r) const { return scale + r * scale_stride; }
  const float* low_row(int64_t r) const { return low + r * low_stride; }
  // Whether the scales and lows sit in the codes' own rows (then the codes' prefetch fetches them).
  bool interleaved() const {
    return scale_stride * 4 == code_stride && low_stride * 4 == code_stride;
  }
};

// Bytes an int4 row streams: codes, scales and lows.
inline int64_t int4_row_bytes(const Int4Weight& w) {
  return w.interleaved() ? w.code_stride : w.padded / 2 + 8 * w.groups();
}

// The same for the int4 form; cols <= padded.
void int4_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const Int4Weight& w, int64_t rows, float* y,
                  int64_t ldy, const RowRange* only = nullptr);

// Whether a 2-D tensor's rows are each contiguous (any row stride, rows not overlapping): the
// layout the int4 kernels read in place.
bool rows_in_place(const at::Tensor& t);

// The Int4Weight of packed (rows, padded / 2) uint8 and scale, low (rows, groups) float32 tensors
// whose rows are contiguous (any row stride): checked against x's columns.
Int4Weight int4_weight(const char* op, const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& low,
                       int64_t rows, int64_t cols);

}  // namespace yaretnet_cpu
