#include "kernels/quant.h"

#include <algorithm>
#include <cmath>

namespace moed::kernels {
const char* WeightFormatName(WeightFormat format) {
  switch (format) {
    case WeightFormat::kF32:
      return "f32";
    case WeightFormat::kF16:
      return "f16";
    case WeightFormat::kBF16:
      return "bf16";
    case WeightFormat::kInt8PerRow:
      return "int8";
    case WeightFormat::kInt4Grouped:
      return "int4";
  }
  return "?";
}

int64_t WeightMatrix::DataBytes() const {
  switch (quantization) {
    case Quantization::kNone:
      return rows * cols * static_cast<int64_t>(DTypeSize(dtype));
    case Quantization::kInt8PerRow:
      return rows * cols;
    case Quantization::kInt4Grouped:
      return rows * cols / 2;
  }
  return 0;
}

int64_t WeightMatrix::ScaleBytes() const {
  switch (quantization) {
    case Quantization::kNone:
      return 0;
    case Quantization::kInt8PerRow:
      return rows * static_cast<int64_t>(sizeof(float));
    case Quantization::kInt4Grouped:
      return rows * (cols / group_size) * static_cast<int64_t>(sizeof(float));
  }
  return 0;
}

WeightFormat WeightMatrix::format() const {
  switch (quantization) {
    case Quantization::kInt8PerRow:
      return WeightFormat::kInt8PerRow;
    case Quantization::kInt4Grouped:
      return WeightFormat::kInt4Grouped;
    case Quantization::kNone:
      break;
  }
  switch (dtype) {
    case DType::kF16:
      return WeightFormat::kF16;
    case DType::kBF16:
      return WeightFormat::kBF16;
    case DType::kF32:
      break;
  }
  return WeightFormat::kF32;
}

void WidenToF32(DType dtype, const void* data, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = LoadAsF32(dtype, data, i);
}

void QuantizeInt8(const float* w, int64_t rows, int64_t cols, int8_t* q, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = w + r * cols;
    float max_abs = 0;
    for (int64_t c = 0; c < cols; ++c) max_abs = std::max(max_abs, std::abs(row[c]));
    float scale = max_abs > 0 ? max_abs / 127.0f : 1.0f;
    scales[r] = scale;
    for (int64_t c = 0; c < cols; ++c) {
      q[r * cols + c] =
          static_cast<int8_t>(std::clamp(std::nearbyint(row[c] / scale), -127.0f, 127.0f));
    }
  }
}

void QuantizeInt4(const float* w, int64_t rows, int64_t cols, int64_t group_size, uint8_t* packed,
                  float* scales) {
  const int64_t groups = cols / group_size, half = group_size / 2;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float* group = w + r * cols + gi * group_size;
      float max_abs = 0;
      for (int64_t c = 0; c < group_size; ++c) max_abs = std::max(max_abs, std::abs(group[c]));
      float scale = max_abs > 0 ? max_abs / 7.0f : 1.0f;
      scales[r * groups + gi] = scale;
      auto code = [&](float v) {
        return static_cast<uint8_t>(std::clamp(std::nearbyint(v / scale), -7.0f, 7.0f) + 8.0f);
      };
      uint8_t* out = packed + r * (cols / 2) + gi * half;
      for (int64_t j = 0; j < half; ++j)
        out[j] = static_cast<uint8_t>(code(group[j]) | (code(group[j + half]) << 4));
    }
  }
}

float DequantizedValue(const WeightMatrix& w, int64_t row, int64_t col) {
  switch (w.quantization) {
    case Quantization::kNone:
      return LoadAsF32(w.dtype,
                       static_cast<const char*>(w.data) + row * w.cols * DTypeSize(w.dtype), col);
    case Quantization::kInt8PerRow:
      return static_cast<float>(static_cast<const int8_t*>(w.data)[row * w.cols + col]) *
             w.scales[row];
    case Quantization::kInt4Grouped: {
      const int64_t g = w.group_size, gi = col / g, within = col % g, half = g / 2;
      uint8_t byte =
          static_cast<const uint8_t*>(w.data)[row * (w.cols / 2) + gi * half + within % half];
      int q = within < half ? (byte & 0xF) : (byte >> 4);
      return static_cast<float>(q - 8) * w.scales[row * (w.cols / g) + gi];
    }
  }
  return 0;
}

}  // namespace moed::kernels
