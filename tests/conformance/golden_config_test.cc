// The golden checkpoints' config.json files, read by the model-config parser, against the
// shapes their README states.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>

#include "model/model_config.h"

namespace moed::model {
namespace {

std::string GoldenDir(const std::string& name, const char* set = "golden") {
  const char* shared = std::getenv("MOED_SHARED_DIR");
  REQUIRE(shared != nullptr);
  std::string dir = std::string(shared) + "/" + set + "/" + name;
  REQUIRE(std::filesystem::exists(dir + "/config.json"));
  return dir;
}

struct Expected {
  const char* name;
  Architecture arch;
  int64_t layers, heads, kv_heads, head_dim, experts, top_k, intermediate, shared;
  bool norm_topk;
  double rope_theta, eps;
};

TEST_CASE("golden configs parse into the shapes of their README") {
  // From shared/golden/README.md's tables.
  const Expected expected[] = {
      {"mixtral", Architecture::kMixtral, 2, 4, 2, 16, 8, 2, 128, 0, true, 1e6, 1e-5},
      {"qwen3_moe", Architecture::kQwen3Moe, 3, 4, 2, 16, 16, 4, 32, 0, true, 1e6, 1e-6},
      {"qwen2_moe", Architecture::kQwen2Moe, 2, 4, 2, 16, 8, 2, 32, 64, false, 1e6, 1e-6},
      {"olmoe", Architecture::kOlmoe, 2, 4, 4, 16, 8, 2, 32, 0, false, 1e4, 1e-5},
  };
  for (const Expected& e : expected) {
    INFO(e.name);
    absl::StatusOr<ModelConfig> config = LoadModelConfig(GoldenDir(e.name));
    REQUIRE(config.ok());
    CHECK(config->architecture == e.arch);
    CHECK(config->vocab_size == 512);
    CHECK(config->hidden_size == 64);
    CHECK(config->num_layers == e.layers);
    CHECK(config->num_attention_heads == e.heads);
    CHECK(config->num_key_value_heads == e.kv_heads);
    CHECK(config->head_dim == e.head_dim);
    CHECK(config->num_experts == e.experts);
    CHECK(config->experts_per_token == e.top_k);
    CHECK(config->expert_intermediate_size == e.intermediate);
    CHECK(config->shared_expert_intermediate_size == e.shared);
    CHECK(config->norm_topk_prob == e.norm_topk);
    CHECK(config->rope_theta == e.rope_theta);
    CHECK(config->rms_norm_eps == Approx(e.eps));
    CHECK(config->max_position_embeddings == 256);
    CHECK_FALSE(config->tie_word_embeddings);
    CHECK(config->NumMoeLayers() == e.layers);
  }
}

TEST_CASE("the golden DeepSeek-V2 config parses into the shapes of its README") {
  // From shared/golden-next/README.md's model table.
  absl::StatusOr<ModelConfig> config = LoadModelConfig(GoldenDir("deepseek_v2", "golden-next"));
  REQUIRE(config.ok());
  CHECK(config->architecture == Architecture::kDeepseekV2);
  CHECK(config->vocab_size == 512);
  CHECK(config->hidden_size == 64);
  CHECK(config->num_layers == 3);
  CHECK(config->num_attention_heads == 4);
  CHECK(config->uses_mla());
  CHECK(config->mla.q_lora_rank == 0);
  CHECK(config->mla.kv_lora_rank == 32);
  CHECK(config->mla.nope_dim == 16);
  CHECK(config->mla.rope_dim == 8);
  CHECK(config->mla.value_dim == 16);
  CHECK(config->head_dim == 24);
  CHECK(config->num_experts == 8);
  CHECK(config->experts_per_token == 2);
  CHECK(config->expert_intermediate_size == 32);
  CHECK(config->shared_expert_intermediate_size == 32);
  CHECK_FALSE(config->shared_expert_gated);
  CHECK(config->dense_intermediate_size == 128);
  CHECK(config->first_k_dense_replace == 1);
  CHECK(config->NumMoeLayers() == 2);
  CHECK_FALSE(config->IsMoeLayer(0));
  CHECK(config->scoring == RouterScoringFunction::kSoftmax);
  CHECK(config->topk_method == TopKMethod::kGreedy);
  CHECK_FALSE(config->norm_topk_prob);
  CHECK(config->routed_scaling_factor == 2.5);
  CHECK(config->rope_theta == 1e4);
  CHECK_FALSE(config->yarn.has_value());
  CHECK(config->rms_norm_eps == Approx(1e-6));
  CHECK(config->max_position_embeddings == 256);
  CHECK_FALSE(config->tie_word_embeddings);
  // MLA caches the latent and the rope key: 40 floats per token and layer, not 2 * 4 * 24.
  CHECK(config->KvFloatsPerTokenLayer() == 40);
}

}  // namespace
}  // namespace moed::model
