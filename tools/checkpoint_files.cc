#include "tools/checkpoint_files.h"

#include <filesystem>

#include "absl/strings/str_cat.h"

namespace moed::tools {

const std::vector<std::string>& ServingFileNames() {
  static const std::vector<std::string> names = {
      "config.json",           "generation_config.json",  "tokenizer.json",
      "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
      "chat_template.json",    "chat_template.jinja"};
  return names;
}

absl::Status CopyServingFiles(const std::string& from, const std::string& to) {
  namespace fs = std::filesystem;
  if (std::error_code error; !fs::is_directory(from, error)) {
    return absl::NotFoundError(absl::StrCat(from, ": not a directory"));
  }
  for (const std::string& name : ServingFileNames()) {
    const fs::path source = fs::path(from) / name;
    std::error_code error;
    if (!fs::is_regular_file(source, error)) continue;
    fs::copy_file(source, fs::path(to) / name, fs::copy_options::overwrite_existing, error);
    if (error) {
      return absl::UnavailableError(
          absl::StrCat(source.string(), ": cannot copy: ", error.message()));
    }
  }
  return absl::OkStatus();
}

}  // namespace moed::tools
