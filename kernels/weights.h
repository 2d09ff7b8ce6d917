// How a weight matrix is stored: data shared by every backend, the store and moed-pack.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace moed::kernels {

// How a weight matrix's values are stored.
enum class Quantization {
  kNone,         // `dtype` values, row-major
  kInt8PerRow,   // int8 row-major; value = q * scales[row]
  kInt4Grouped,  // 4-bit, groups of `group_size` columns; value = (q - 8) * scales[row * groups +
                 // g]
};

// The formats an operator can take its weights in (a capability query's second key).
enum class WeightFormat { kF32, kF16, kBF16, kInt8PerRow, kInt4Grouped };
inline constexpr WeightFormat kAllWeightFormats[] = {WeightFormat::kF32, WeightFormat::kF16,
                                                     WeightFormat::kBF16, WeightFormat::kInt8PerRow,
                                                     WeightFormat::kInt4Grouped};
const char* WeightFormatName(WeightFormat format);

// A row-major [rows, cols] weight matrix in a backend's memory (`data` and `scales` are
// device addresses on a GPU backend).
//
// Int4 layout: each row is cols / 2 bytes; within a group of G columns starting at g0, byte
// g0 / 2 + j holds column g0 + j in its low nibble and column g0 + j + G / 2 in its high
// nibble, so that a run of bytes unpacks into two runs of consecutive columns.
struct WeightMatrix {
  DType dtype = DType::kF32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  Quantization quantization = Quantization::kNone;
  const float* scales = nullptr;
  int64_t group_size = 0;  // int4 only

  // Bytes of `data` (without the scales).
  int64_t DataBytes() const;
  // Bytes of `scales`: one float per row (int8) or per row and group (int4).
  int64_t ScaleBytes() const;
  WeightFormat format() const;
};

}  // namespace moed::kernels
