#include "kernels/dtype.h"

#include <catch2/catch.hpp>
#include <cmath>

namespace moed::kernels {
namespace {

double ReferenceF16(uint16_t bits) {
  int sign = bits >> 15, exponent = (bits >> 10) & 0x1F, mantissa = bits & 0x3FF;
  double magnitude = exponent == 0 ? std::ldexp(mantissa, -24)
                                   : std::ldexp(1.0 + mantissa / 1024.0, exponent - 15);
  return sign ? -magnitude : magnitude;
}

TEST_CASE("every finite fp16 value widens exactly and narrows back to itself") {
  for (uint32_t bits = 0; bits < 65536; ++bits) {
    uint16_t h = static_cast<uint16_t>(bits);
    if (((h >> 10) & 0x1F) == 0x1F) continue;  // inf / NaN below
    float f = F16ToF32(h);
    REQUIRE(static_cast<double>(f) == ReferenceF16(h));
    REQUIRE(F32ToF16(f) == h);
  }
  CHECK(std::isinf(F16ToF32(0x7C00)));
  CHECK(std::isnan(F16ToF32(0x7E00)));
}

TEST_CASE("fp16 narrowing rounds to nearest even") {
  // Midpoints between consecutive positive finite halves round to the even one.
  for (uint16_t h = 0; h < 0x7BFF; ++h) {
    double mid = (ReferenceF16(h) + ReferenceF16(h + 1)) / 2;
    uint16_t expected = (h & 1) ? h + 1 : h;
    REQUIRE(F32ToF16(static_cast<float>(mid)) == expected);
  }
  CHECK(F32ToF16(65504.0f) == 0x7BFF);
  CHECK(F32ToF16(65520.0f) == 0x7C00);  // the midpoint to 65536 rounds to infinity
  CHECK(F32ToF16(-1e-9f) == 0x8000);
}

TEST_CASE("bf16 narrowing rounds to nearest even and keeps NaN") {
  CHECK(F32ToBf16(1.0f) == 0x3F80);
  float just_above_half = std::nextafter(1.0f + 1.0f / 256, 2.0f);  // above the midpoint
  CHECK(F32ToBf16(just_above_half) == 0x3F81);
  CHECK(F32ToBf16(1.0f + 1.0f / 256) == 0x3F80);  // exact midpoint: to even
  CHECK(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
  CHECK(Bf16ToF32(0xC000) == -2.0f);
}

TEST_CASE("safetensors dtype names") {
  CHECK(*ParseSafetensorsDType("BF16") == DType::kBF16);
  CHECK(DTypeName(DType::kF16) == "F16");
  CHECK(ParseSafetensorsDType("I64").status().message() ==
        "dtype I64 is not supported (weights must be F32, F16 or BF16)");
}

}  // namespace
}  // namespace moed::kernels
