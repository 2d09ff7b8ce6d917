// moed-reencode: rewrite a checkpoint in another dtype and/or as shards.
#include <iostream>

#include "CLI/CLI.hpp"
#include "tools/reencode/reencode.h"

int main(int argc, char** argv) {
  std::string model, out, dtype = "bf16";
  int shards = 1;
  CLI::App app{"moed-reencode: rewrite a safetensors checkpoint in another dtype and/or as shards"};
  app.add_option("--model", model, "source checkpoint directory")->required();
  app.add_option("--out", out, "directory to create")->required();
  app.add_option("--dtype", dtype, "bf16, f16 or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "f16", "f32"}));
  app.add_option("--shards", shards, "number of files (>1 writes model.safetensors.index.json)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  moed::tools::ReencodeOptions options;
  options.dtype = dtype == "f32"   ? moed::kernels::DType::kF32
                  : dtype == "f16" ? moed::kernels::DType::kF16
                                   : moed::kernels::DType::kBF16;
  options.shards = shards;
  if (absl::Status s = moed::tools::Reencode(model, out, options); !s.ok()) {
    std::cerr << "moed-reencode: " << s.message() << "\n";
    return 1;
  }
  return 0;
}
