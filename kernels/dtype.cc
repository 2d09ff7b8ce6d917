#include "kernels/dtype.h"

#include "absl/strings/str_cat.h"

namespace moed::kernels {

absl::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

absl::StatusOr<DType> ParseSafetensorsDType(absl::string_view name) {
  if (name == "F32") return DType::kF32;
  if (name == "F16") return DType::kF16;
  if (name == "BF16") return DType::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("dtype ", name, " is not supported (weights must be F32, F16 or BF16)"));
}

uint16_t F32ToF16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t abs = bits & 0x7FFFFFFF;
  if (abs > 0x7F800000) return sign | 0x7E00;   // NaN
  if (abs >= 0x477FF000) return sign | 0x7C00;  // rounds to infinity
  if (abs < 0x33000001) return sign;            // rounds to zero
  int exponent = static_cast<int>(abs >> 23) - 127;
  uint32_t mantissa = (abs & 0x7FFFFF) | 0x800000;
  int shift = exponent >= -14 ? 13 : 13 + (-14 - exponent);  // subnormals lose more bits
  uint32_t half_mantissa = mantissa >> shift;
  uint32_t remainder = mantissa & ((1u << shift) - 1);
  uint32_t halfway = 1u << (shift - 1);
  if (remainder > halfway || (remainder == halfway && (half_mantissa & 1))) ++half_mantissa;
  uint32_t half_exponent = exponent >= -14 ? static_cast<uint32_t>(exponent + 15) : 0;
  // half_mantissa carries the implicit bit for normals; adding lets a carry bump the exponent.
  uint32_t result =
      exponent >= -14 ? ((half_exponent << 10) + (half_mantissa - 0x400)) : half_mantissa;
  return static_cast<uint16_t>(sign | result);
}

}  // namespace moed::kernels
