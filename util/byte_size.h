// Byte counts written by people: "1073741824", "64K", "512M", "2G" (powers of 1024).
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace moed::util {

inline absl::StatusOr<uint64_t> ParseByteSize(absl::string_view text) {
  std::string s = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(text));
  uint64_t multiplier = 1;
  if (!s.empty()) {
    switch (s.back()) {
      case 'K':
        multiplier = 1ull << 10;
        break;
      case 'M':
        multiplier = 1ull << 20;
        break;
      case 'G':
        multiplier = 1ull << 30;
        break;
      case 'T':
        multiplier = 1ull << 40;
        break;
      default:
        break;
    }
    if (multiplier != 1) s.pop_back();
  }
  uint64_t value = 0;
  if (s.empty() || !absl::SimpleAtoi(s, &value) || value > UINT64_MAX / multiplier) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "' is not a byte count (plain bytes or with K, M, G, T)"));
  }
  return value * multiplier;
}

}  // namespace moed::util
