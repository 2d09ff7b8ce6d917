#include "model/safetensors.h"

#include <catch2/catch.hpp>
#include <cstring>

namespace moed::model {
namespace {

std::string ErrorOf(const std::string& header, uint64_t data_size) {
  auto parsed = ParseSafetensorsHeader(header, data_size, "m.safetensors");
  REQUIRE_FALSE(parsed.ok());
  return std::string(parsed.status().message());
}

TEST_CASE("a valid header lists its tensors") {
  auto parsed = ParseSafetensorsHeader(
      R"({"__metadata__": {"format": "pt"},
          "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
          "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}})",
      24, "m.safetensors");
  REQUIRE(parsed.ok());
  REQUIRE(parsed->size() == 2);
  for (const TensorInfo& t : *parsed) {
    if (t.name == "w") {
      CHECK(t.dtype == kernels::DType::kBF16);
      CHECK(t.shape == std::vector<int64_t>{2, 3});
      CHECK(t.NumElements() == 6);
    } else {
      CHECK(t.begin == 12);
    }
  }
}

TEST_CASE("bad headers are refused naming the file, the tensor and the problem") {
  CHECK(ErrorOf("{", 0) == "m.safetensors: safetensors header is not valid JSON");
  CHECK(ErrorOf("[]", 0) == "m.safetensors: safetensors header is not a JSON object");
  CHECK(ErrorOf(R"({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}})", 8) ==
        "m.safetensors: tensor w: dtype I64 is not supported (weights must be F32, F16 or BF16)");
  CHECK(ErrorOf(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8) ==
        "m.safetensors: tensor w: holds 8 bytes but its shape and dtype need 12");
  CHECK(ErrorOf(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 10)
            .find("fall outside the data section of 10 bytes (truncated file?)") !=
        std::string::npos);
  CHECK(ErrorOf(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4)
            .find("not a size") != std::string::npos);
  CHECK(ErrorOf(R"({"w": {"dtype": "F32", "shape": [1]}})", 4).find("data_offsets") !=
        std::string::npos);
  CHECK(ErrorOf(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                12) == "m.safetensors: tensors a and b overlap");
  CHECK(
      ErrorOf(
          R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296, 2], "data_offsets": [0, 4]}})",
          4)
          .find("larger than any file") != std::string::npos);
}

TEST_CASE("whole-file parsing checks the length prefix") {
  uint8_t tiny[4] = {};
  CHECK(ParseSafetensorsBytes(tiny, 4, "t").status().code() == absl::StatusCode::kDataLoss);
  std::string header = R"({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  std::string file(8, '\0');
  uint64_t length = header.size();
  std::memcpy(file.data(), &length, 8);
  file += header + std::string(8, '\0');
  auto ok = ParseSafetensorsBytes(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t");
  REQUIRE(ok.ok());
  CHECK(ok->data_offset == 8 + header.size());
  // Cut short: the tensor no longer fits, and that is data loss.
  auto cut =
      ParseSafetensorsBytes(reinterpret_cast<const uint8_t*>(file.data()), file.size() - 3, "t");
  CHECK(cut.status().code() == absl::StatusCode::kDataLoss);
  length = 1 << 30;
  std::memcpy(file.data(), &length, 8);
  auto huge =
      ParseSafetensorsBytes(reinterpret_cast<const uint8_t*>(file.data()), file.size(), "t");
  CHECK(huge.status().message().find("header length 1073741824 exceeds the file") !=
        std::string::npos);
}

}  // namespace
}  // namespace moed::model
