// libFuzzer target: a whole safetensors file (length prefix, JSON header, data section).
#include <cstddef>
#include <cstdint>

#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = moed::model::ParseSafetensorsBytes(data, size, "fuzz.safetensors");
  if (parsed.ok()) {
    // Every accepted tensor must lie inside the input, with bytes matching its shape.
    for (const auto& tensor : parsed->tensors) {
      if (parsed->data_offset + tensor.end > size || tensor.begin > tensor.end) __builtin_trap();
      uint64_t expected =
          static_cast<uint64_t>(tensor.NumElements()) * moed::kernels::DTypeSize(tensor.dtype);
      if (tensor.end - tensor.begin != expected) __builtin_trap();
    }
  }
  return 0;
}
