// Files of a checkpoint directory that are not weights (config, tokenizer, generation config).
#pragma once

#include <string>

#include "absl/status/status.h"

namespace moed::tools {

// Copies every regular file of `from` except *.safetensors and the safetensors index into
// `to`, which must exist.
absl::Status CopyNonWeightFiles(const std::string& from, const std::string& to);

}  // namespace moed::tools
