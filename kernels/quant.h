// The int8/int4 packing formats of the store and moed-pack, and exact widening of stored
// values. Data transformations done on the host at pack or load time: not a compute backend.
#pragma once

#include <cstdint>

#include "kernels/weights.h"

namespace moed::kernels {

// Widens `count` values of `dtype` to fp32 (exact).
void WidenToF32(DType dtype, const void* data, int64_t count, float* out);

// Quantizes rows of fp32 weights: int8 with one scale per row (max |w| / 127), int4 with one
// scale per group of `group_size` columns (max |w| / 7), rounding to nearest. `group_size`
// must be even and divide `cols`.
void QuantizeInt8(const float* w, int64_t rows, int64_t cols, int8_t* q, float* scales);
void QuantizeInt4(const float* w, int64_t rows, int64_t cols, int64_t group_size, uint8_t* packed,
                  float* scales);

// The value a matrix in host memory stores at (row, col), whatever its format.
float DequantizedValue(const WeightMatrix& w, int64_t row, int64_t col);

}  // namespace moed::kernels
