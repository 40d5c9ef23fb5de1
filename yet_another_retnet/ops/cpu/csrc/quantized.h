// The int8 and int4 products (quantized.cpp) at the level of raw rows, for the ops there and for
// the one-call decoder layer (decode_step.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace yaretnet_cpu {

// y (n x rows, row stride ldy) = x (n x cols, row stride ldx) W^T, W int8 (rows x cols, row-major)
// times scale (rows) per row: float32, no bias. Each weight byte is read once per call.
void int8_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const int8_t* w, const float* scale,
                  int64_t rows, float* y, int64_t ldy);

// The same for the int4 form of ops/cpu/quantized.py: packed (rows x padded / 2), scale and low
// (rows x padded / group); cols <= padded.
void int4_product(const float* x, int64_t ldx, int64_t n, int64_t cols, const uint8_t* packed, const float* scale,
                  const float* low, int64_t rows, int64_t padded, int64_t group, float* y, int64_t ldy);

// Checks scale and low (rows, groups) against a packed width and x's columns; returns the group size.
int64_t int4_group(const char* op, const at::Tensor& scale, const at::Tensor& low, int64_t rows, int64_t padded,
                   int64_t cols);

}  // namespace yaretnet_cpu
