// moed-synth: writes a tiny (or benchmark-sized) MoE checkpoint in Hugging Face layout.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <optional>

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
      {"--q-lora-rank", &moed::tools::SynthSpec::q_lora_rank,
       "low-rank query width, 0 for q_proj (deepseek)"},
      {"--kv-lora-rank", &moed::tools::SynthSpec::kv_lora_rank, "MLA latent width (deepseek)"},
      {"--shared-experts", &moed::tools::SynthSpec::n_shared_experts,
       "always-on shared experts (deepseek)"},
      {"--dense-layers", &moed::tools::SynthSpec::first_k_dense_replace,
       "leading dense layers (deepseek)"},
      {"--groups", &moed::tools::SynthSpec::n_group, "expert groups (deepseek)"},
      {"--top-groups", &moed::tools::SynthSpec::topk_group,
       "groups a token's experts come from (deepseek)"},
  };
  std::string topk_method;
  double yarn_factor = 1;
  std::optional<bool> norm_topk_prob;
  std::map<std::string, int64_t> given;

  CLI::App app{
      "moed-synth: write a synthetic MoE checkpoint (config.json, model.safetensors, "
      "tokenizer.json) with random weights, deterministic for a seed"};
  app.add_option("--out", out, "directory to create (must not exist unless --force)")->required();
  CLI::Option* arch_option =
      app.add_option("--arch", arch_name,
                     "mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 or deepseek_v3 "
                     "(deepseek_v2 for the deepseek-v2-lite preset)")
          ->capture_default_str();
  app.add_option("--preset", preset,
                 "tiny, demo, bench-1g, bench-6g, bench-32l or deepseek-v2-lite")
      ->capture_default_str();
  app.add_option("--topk-method", topk_method,
                 "greedy, group_limited_greedy or noaux_tc (deepseek; default: V2 greedy, V3 "
                 "noaux_tc)")
      ->check(CLI::IsMember({"greedy", "group_limited_greedy", "noaux_tc"}));
  app.add_option("--norm-topk-prob", norm_topk_prob,
                 "renormalise the top-k weights (qwen, olmoe, deepseek; default: the preset's)");
  app.add_option("--yarn-factor", yarn_factor,
                 "YaRN context extension factor, 1 for none (deepseek)")
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

  if (preset == "deepseek-v2-lite" && arch_option->count() == 0) arch_name = "deepseek_v2";
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
  if (!topk_method.empty()) spec->topk_method = topk_method;
  spec->yarn_factor = yarn_factor;
  if (norm_topk_prob.has_value()) spec->norm_topk_prob = *norm_topk_prob;
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
