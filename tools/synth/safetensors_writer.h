// Writes a .safetensors file tensor by tensor, without holding the whole model in memory.
#pragma once

#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace moed::tools {

using kernels::DType;

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  DType dtype = DType::kBF16;

  int64_t NumElements() const;
  uint64_t NumBytes() const {
    return static_cast<uint64_t>(NumElements()) * kernels::DTypeSize(dtype);
  }
};

// Fills `out` (NumBytes of the tensor) with the bytes of elements [begin, end) of the tensor.
using TensorFiller =
    std::function<void(const TensorSpec& spec, int64_t begin, int64_t end, uint8_t* out)>;

// Writes `tensors` to `path` in the order given, asking `fill` for their bytes in chunks.
// The header lists the tensors in the same order with `metadata` under "__metadata__".
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                              const std::vector<std::pair<std::string, std::string>>& metadata,
                              const TensorFiller& fill);

}  // namespace moed::tools
