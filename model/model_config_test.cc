#include "model/model_config.h"

#include <catch2/catch.hpp>

#include "nlohmann/json.hpp"

namespace moed::model {
namespace {

nlohmann::json MixtralJson() {
  return nlohmann::json::parse(R"({
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "torch_dtype": "bfloat16",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "num_local_experts": 8, "num_experts_per_tok": 2,
    "intermediate_size": 128, "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": null,
    "hidden_act": "silu", "tie_word_embeddings": false})");
}

std::string ErrorOf(const nlohmann::json& config) {
  absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config.dump(), "dir/config.json");
  REQUIRE_FALSE(parsed.ok());
  CHECK(parsed.status().code() == absl::StatusCode::kInvalidArgument);
  return std::string(parsed.status().message());
}

TEST_CASE("a Mixtral config parses into the model's shape") {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(MixtralJson().dump(), "config.json");
  REQUIRE(config.ok());
  CHECK(config->architecture == Architecture::kMixtral);
  CHECK(config->hidden_size == 64);
  CHECK(config->head_dim == 16);  // hidden / heads when the file has no head_dim
  CHECK(config->num_key_value_heads == 2);
  CHECK(config->num_experts == 8);
  CHECK(config->experts_per_token == 2);
  CHECK(config->expert_intermediate_size == 128);
  CHECK(config->norm_topk_prob);
  CHECK(config->rms_norm_eps == Approx(1e-5));
  CHECK(config->rope_theta == 1e6);
  CHECK(config->bos_token_id == 1);
  CHECK(config->eos_token_ids == std::vector<int64_t>{2});
  CHECK(config->NumMoeLayers() == 2);
  CHECK(config->ExpertParameters() == 3 * 64 * 128);
}

TEST_CASE("errors name the file and the field") {
  nlohmann::json config = MixtralJson();
  config.erase("hidden_size");
  CHECK(ErrorOf(config) == "dir/config.json: \"hidden_size\" is missing");

  config = MixtralJson();
  config["num_local_experts"] = "eight";
  CHECK(ErrorOf(config) == "dir/config.json: \"num_local_experts\" must be an integer");

  config = MixtralJson();
  config["num_key_value_heads"] = 3;
  CHECK(ErrorOf(config).find("\"num_key_value_heads\" (3) must divide") != std::string::npos);

  config = MixtralJson();
  config["num_experts_per_tok"] = 9;
  CHECK(ErrorOf(config).find("exceeds the 8 experts") != std::string::npos);

  config = MixtralJson();
  config["vocab_size"] = -4;
  CHECK(ErrorOf(config).find("must be positive") != std::string::npos);

  config = MixtralJson();
  config["eos_token_id"] = 600;
  CHECK(ErrorOf(config).find("outside the vocabulary") != std::string::npos);
}

TEST_CASE("a scaled RoPE is refused with its type") {
  nlohmann::json config = MixtralJson();
  config["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  CHECK(ErrorOf(config).find("rope_scaling\" of type 'yarn' is not supported") !=
        std::string::npos);
}

TEST_CASE("unsupported architectures and malformed files are refused") {
  nlohmann::json config = MixtralJson();
  config["architectures"] = {"LlamaForCausalLM"};
  CHECK(ErrorOf(config).find("names LlamaForCausalLM") != std::string::npos);
  CHECK_FALSE(ParseModelConfig("{\"architectures\": [", "c.json").ok());
  CHECK(ParseModelConfig("[1,2]", "c.json").status().message() == "c.json: must be a JSON object");
  CHECK(LoadModelConfig("/nonexistent-dir").status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("Qwen2-MoE reads its sparse-layer pattern and shared expert") {
  nlohmann::json config = MixtralJson();
  config["architectures"] = {"Qwen2MoeForCausalLM"};
  config.erase("num_local_experts");
  config["num_experts"] = 8;
  config["moe_intermediate_size"] = 32;
  config["shared_expert_intermediate_size"] = 64;
  config["norm_topk_prob"] = false;
  config["num_hidden_layers"] = 4;
  config["decoder_sparse_step"] = 2;
  config["mlp_only_layers"] = {3};
  absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config.dump(), "c.json");
  REQUIRE(parsed.ok());
  CHECK(parsed->expert_intermediate_size == 32);
  CHECK(parsed->shared_expert_intermediate_size == 64);
  CHECK_FALSE(parsed->norm_topk_prob);
  // step 2: layers 1 and 3 are sparse; layer 3 is listed as MLP-only.
  CHECK_FALSE(parsed->IsMoeLayer(0));
  CHECK(parsed->IsMoeLayer(1));
  CHECK_FALSE(parsed->IsMoeLayer(3));
  CHECK(parsed->NumMoeLayers() == 1);

  config["mlp_only_layers"] = {7};
  CHECK(ErrorOf(config).find("names layer 7 of 4") != std::string::npos);
}

TEST_CASE("architecture short names round-trip") {
  for (Architecture arch : {Architecture::kMixtral, Architecture::kQwen2Moe,
                            Architecture::kQwen3Moe, Architecture::kOlmoe}) {
    CHECK(*ParseArchitectureShortName(ArchitectureShortName(arch)) == arch);
  }
  CHECK_FALSE(ParseArchitectureShortName("gpt2").ok());
}

}  // namespace
}  // namespace moed::model
