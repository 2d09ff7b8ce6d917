// moed-pack: convert a Hugging Face checkpoint into an expert store.
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/str_split.h"
#include "tools/pack/pack.h"

int main(int argc, char** argv) {
  std::string model, out, precisions = "source,int8,int4";
  int64_t group = 64;
  CLI::App app{"moed-pack: convert a Hugging Face MoE checkpoint into an expert store"};
  app.add_option("--model", model, "checkpoint directory (config.json, *.safetensors)")->required();
  app.add_option("--out", out, "store directory to create")->required();
  app.add_option("--precisions", precisions, "comma-separated: source, int8, int4")
      ->capture_default_str();
  app.add_option("--int4-group-size", group, "columns per int4 scale (a power of two)")
      ->capture_default_str()
      ->check(CLI::Range(2, 4096));
  CLI11_PARSE(app, argc, argv);
  moed::tools::PackOptions options;
  options.int4_group_size = group;
  options.precisions.clear();
  for (absl::string_view name : absl::StrSplit(precisions, ',', absl::SkipWhitespace())) {
    auto precision = moed::cache::ParsePrecision(name);
    if (!precision.ok()) {
      std::cerr << "moed-pack: --precisions: " << precision.status().message() << "\n";
      return 2;
    }
    options.precisions.push_back(*precision);
  }
  if (absl::Status s = moed::tools::Pack(model, out, options); !s.ok()) {
    std::cerr << "moed-pack: " << s.message() << "\n";
    return 1;
  }
  std::cout << "wrote " << out << "\n";
  return 0;
}
