// The files of a checkpoint directory that serving reads besides the weights.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moed::tools {

// config.json, generation_config.json, the tokenizer's files and the chat template's: what the
// daemon reads from a store besides its weights. Nothing else in a checkpoint directory (other
// formats' weights, READMEs, images) is copied.
const std::vector<std::string>& ServingFileNames();

// Copies those of ServingFileNames() that `from` holds into `to`, which must exist.
absl::Status CopyServingFiles(const std::string& from, const std::string& to);

}  // namespace moed::tools
