// Re-encodes a checkpoint's tensors to another dtype and/or splits it into shards with a
// model.safetensors.index.json, as Hugging Face writes large checkpoints.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "kernels/dtype.h"

namespace moed::tools {

struct ReencodeOptions {
  kernels::DType dtype = kernels::DType::kBF16;
  int shards = 1;  // 1: a single model.safetensors
};

// Writes `out_dir` (which must not exist) from the checkpoint in `model_dir`: every tensor in
// `options.dtype` (rounded to nearest even when narrowing), spread over `options.shards`
// files, plus the directory's other files (config.json with torch_dtype updated).
absl::Status Reencode(const std::string& model_dir, const std::string& out_dir,
                      const ReencodeOptions& options);

}  // namespace moed::tools
