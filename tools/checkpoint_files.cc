#include "tools/checkpoint_files.h"

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace moed::tools {

absl::Status CopyNonWeightFiles(const std::string& from, const std::string& to) {
  namespace fs = std::filesystem;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(from, error)) {
    std::string name = entry.path().filename().string();
    if (!entry.is_regular_file() || entry.path().extension() == ".safetensors" ||
        name == "model.safetensors.index.json") {
      continue;
    }
    fs::copy_file(entry.path(), fs::path(to) / name, fs::copy_options::overwrite_existing, error);
    if (error)
      return absl::UnavailableError(
          absl::StrCat(entry.path().string(), ": cannot copy: ", error.message()));
  }
  if (error) return absl::NotFoundError(absl::StrCat(from, ": cannot list: ", error.message()));
  return absl::OkStatus();
}

}  // namespace moed::tools
