// moed-pack: a Hugging Face checkpoint -> an expert store (see cache/store.h).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "cache/store.h"

namespace moed::tools {

struct PackOptions {
  std::vector<cache::Precision> precisions = {cache::Precision::kSource, cache::Precision::kInt8,
                                              cache::Precision::kInt4};
  int64_t int4_group_size = 64;  // lowered to the largest power of two dividing both widths
};

// Writes the store into `out_dir` (which must not exist) through a temporary directory beside
// it that is renamed at the end, so an interrupted pack never leaves a store that looks
// complete. The same checkpoint and options always give the same bytes.
absl::Status Pack(const std::string& model_dir, const std::string& out_dir,
                  const PackOptions& options);

}  // namespace moed::tools
