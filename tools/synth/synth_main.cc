// moed-synth: writes a tiny (or benchmark-sized) MoE checkpoint in Hugging Face layout.
#include <chrono>
#include <filesystem>
#include <iostream>

#include "CLI/CLI.hpp"
#include "tools/synth/synthesizer.h"

int main(int argc, char** argv) {
  std::string arch_name = "mixtral";
  std::string preset = "demo";
  std::string out;
  std::string dtype = "bf16";
  uint64_t seed = 0;
  bool force = false;
  moed::tools::SynthSpec overrides;
  struct Override {
    const char* flag;
    int64_t moed::tools::SynthSpec::*field;
    const char* help;
  };
  const Override int_overrides[] = {
      {"--vocab-size", &moed::tools::SynthSpec::vocab_size, "vocabulary size of the model"},
      {"--hidden-size", &moed::tools::SynthSpec::hidden_size, "hidden size"},
      {"--layers", &moed::tools::SynthSpec::num_layers, "decoder layers"},
      {"--heads", &moed::tools::SynthSpec::num_attention_heads, "attention heads"},
      {"--kv-heads", &moed::tools::SynthSpec::num_key_value_heads, "key/value heads (GQA)"},
      {"--head-dim", &moed::tools::SynthSpec::head_dim, "dimension of one head"},
      {"--experts", &moed::tools::SynthSpec::num_experts, "routed experts per layer"},
      {"--top-k", &moed::tools::SynthSpec::experts_per_token, "experts per token"},
      {"--intermediate-size", &moed::tools::SynthSpec::expert_intermediate_size,
       "expert FFN width"},
      {"--shared-intermediate-size", &moed::tools::SynthSpec::shared_expert_intermediate_size,
       "shared expert FFN width (qwen2_moe)"},
      {"--max-position", &moed::tools::SynthSpec::max_position_embeddings, "context length"},
  };
  std::map<std::string, int64_t> given;

  CLI::App app{
      "moed-synth: write a synthetic MoE checkpoint (config.json, model.safetensors, "
      "tokenizer.json) with random weights, deterministic for a seed"};
  app.add_option("--out", out, "directory to create (must not exist unless --force)")->required();
  app.add_option("--arch", arch_name, "mixtral, qwen2_moe, qwen3_moe or olmoe")
      ->capture_default_str();
  app.add_option("--preset", preset, "tiny, demo, bench-1g, bench-6g or bench-32l")
      ->capture_default_str();
  app.add_option("--seed", seed, "random seed")->capture_default_str();
  app.add_option("--dtype", dtype, "weight dtype: bf16 or f32")
      ->capture_default_str()
      ->check(CLI::IsMember({"bf16", "f32"}));
  app.add_flag("--force", force, "replace --out if it exists");
  for (const Override& o : int_overrides) {
    app.add_option_function<int64_t>(
        o.flag, [&given, &o](int64_t v) { given[o.flag] = v; }, o.help);
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  auto arch = moed::model::ParseArchitectureShortName(arch_name);
  if (!arch.ok()) {
    std::cerr << "moed-synth: " << arch.status().message() << "\n";
    return 2;
  }
  auto spec = moed::tools::PresetSpec(preset, *arch);
  if (!spec.ok()) {
    std::cerr << "moed-synth: " << spec.status().message() << "\n";
    return 2;
  }
  for (const Override& o : int_overrides) {
    if (auto it = given.find(o.flag); it != given.end()) (*spec).*(o.field) = it->second;
  }
  spec->seed = seed;
  spec->dtype = dtype == "f32" ? moed::tools::DType::kF32 : moed::tools::DType::kBF16;
  if (force) std::filesystem::remove_all(out);

  auto start = std::chrono::steady_clock::now();
  if (absl::Status s = moed::tools::WriteCheckpoint(*spec, out); !s.ok()) {
    std::cerr << "moed-synth: " << s.message() << "\n";
    return 1;
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << "wrote " << out << " (" << arch_name << ", preset " << preset << ", "
            << std::filesystem::file_size(std::filesystem::path(out) / "model.safetensors") /
                   (1 << 20)
            << " MiB of weights) in " << seconds << " s\n";
  return 0;
}
