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
  for (Architecture arch :
       {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe,
        Architecture::kOlmoe, Architecture::kDeepseekV2, Architecture::kDeepseekV3}) {
    CHECK(*ParseArchitectureShortName(ArchitectureShortName(arch)) == arch);
  }
  CHECK_FALSE(ParseArchitectureShortName("gpt2").ok());
}

// The DeepSeek-V3 Hub config's fields, at a small size.
nlohmann::json DeepseekV3Json() {
  return nlohmann::json::parse(R"({
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 5, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "rope_theta": 10000, "first_k_dense_replace": 3, "moe_layer_freq": 1,
    "intermediate_size": 256, "moe_intermediate_size": 32, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
    "routed_scaling_factor": 2.5, "q_lora_rank": 48, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "num_nextn_predict_layers": 1, "hidden_act": "silu",
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"}})");
}

TEST_CASE("a DeepSeek-V3 config parses into MLA, grouped sigmoid routing and YaRN") {
  absl::StatusOr<ModelConfig> config = ParseModelConfig(DeepseekV3Json().dump(), "config.json");
  REQUIRE(config.ok());
  CHECK(config->architecture == Architecture::kDeepseekV3);
  CHECK(config->uses_mla());
  CHECK(config->mla.q_lora_rank == 48);
  CHECK(config->head_dim == 24);
  CHECK(config->num_experts == 256);
  CHECK(config->shared_expert_intermediate_size == 32);
  CHECK(config->dense_intermediate_size == 256);
  CHECK(config->scoring == RouterScoringFunction::kSigmoid);
  CHECK(config->topk_method == TopKMethod::kNoAuxTc);
  CHECK(config->n_group == 8);
  CHECK(config->topk_group == 4);
  CHECK(config->routed_scaling_factor == 2.5);
  REQUIRE(config->yarn.has_value());
  CHECK(config->yarn->factor == 40);
  CHECK(config->yarn->original_max_position_embeddings == 4096);
  CHECK(config->yarn->mscale_all_dim == 1.0);
  // Layers 0..2 dense, 3 and 4 MoE.
  CHECK_FALSE(config->IsMoeLayer(2));
  CHECK(config->IsMoeLayer(3));
  CHECK(config->NumMoeLayers() == 2);
  CHECK(config->KvFloatsPerTokenLayer() == 32 + 8);
}

TEST_CASE("DeepSeek configs with impossible routing or rope are refused, naming the field") {
  nlohmann::json config = DeepseekV3Json();
  config["n_group"] = 7;
  CHECK(ErrorOf(config) == "dir/config.json: \"n_group\" (7) must divide the 256 routed experts");
  config = DeepseekV3Json();
  config["topk_group"] = 9;
  CHECK(ErrorOf(config) == "dir/config.json: \"topk_group\" (9) exceeds n_group (8)");
  config = DeepseekV3Json();
  config["topk_group"] = 1;
  config["num_experts_per_tok"] = 33;
  CHECK(ErrorOf(config) ==
        "dir/config.json: \"num_experts_per_tok\" (33) exceeds the 32 "
        "experts of the topk_group best groups");
  config = DeepseekV3Json();
  config["topk_method"] = "random";
  CHECK(ErrorOf(config).find("\"topk_method\" 'random' is not supported") != std::string::npos);
  config = DeepseekV3Json();
  config["scoring_func"] = "relu";
  CHECK(ErrorOf(config).find("\"scoring_func\" 'relu' is not supported") != std::string::npos);
  config = DeepseekV3Json();
  config["qk_rope_head_dim"] = 7;
  CHECK(ErrorOf(config) == "dir/config.json: \"qk_rope_head_dim\" must be even for RoPE");
  config = DeepseekV3Json();
  config.erase("kv_lora_rank");
  CHECK(ErrorOf(config) == "dir/config.json: \"kv_lora_rank\" is missing");
  config = DeepseekV3Json();
  config["rope_scaling"]["type"] = "linear";
  CHECK(ErrorOf(config) ==
        "dir/config.json: \"rope_scaling\" of type 'linear' is not supported (only yarn or null)");
  config = DeepseekV3Json();
  config["rope_scaling"].erase("factor");
  CHECK(ErrorOf(config) == "dir/config.json: rope_scaling: \"factor\" is missing");
  config = DeepseekV3Json();
  config["n_shared_experts"] = -1;
  CHECK(ErrorOf(config) == "dir/config.json: \"n_shared_experts\" must not be negative, not -1");
}

TEST_CASE("a quantized checkpoint's config (DeepSeek-V3's FP8 release) is refused, naming it") {
  nlohmann::json config = DeepseekV3Json();
  config["quantization_config"] = {{"activation_scheme", "dynamic"},
                                   {"fmt", "e4m3"},
                                   {"quant_method", "fp8"},
                                   {"weight_block_size", {128, 128}}};
  CHECK(ErrorOf(config) ==
        "dir/config.json: \"quantization_config\" names quant_method 'fp8': moed reads bf16, "
        "fp16 or fp32 checkpoints (convert the weights to bf16 first; moed-pack then makes int8 "
        "and int4 expert copies)");
  config["quantization_config"] = nullptr;  // as transformers writes an absent one
  CHECK(ParseModelConfig(config.dump(), "config.json").ok());
}

TEST_CASE("DeepSeek-V2's remote-code defaults: softmax, greedy (spelt gready), no shared expert") {
  nlohmann::json config = DeepseekV3Json();
  config["architectures"] = {"DeepseekV2ForCausalLM"};
  for (const char* key : {"scoring_func", "topk_method", "rope_scaling", "q_lora_rank",
                          "n_shared_experts", "norm_topk_prob", "routed_scaling_factor"}) {
    config.erase(key);
  }
  absl::StatusOr<ModelConfig> parsed = ParseModelConfig(config.dump(), "config.json");
  REQUIRE(parsed.ok());
  CHECK(parsed->scoring == RouterScoringFunction::kSoftmax);
  CHECK(parsed->topk_method == TopKMethod::kGreedy);
  CHECK(parsed->n_group == 1);  // greedy ignores the groups
  CHECK(parsed->mla.q_lora_rank == 0);
  CHECK(parsed->shared_expert_intermediate_size == 0);
  CHECK_FALSE(parsed->norm_topk_prob);
  CHECK(parsed->routed_scaling_factor == 1.0);
  CHECK_FALSE(parsed->yarn.has_value());
  config["topk_method"] = "gready";
  parsed = ParseModelConfig(config.dump(), "config.json");
  REQUIRE(parsed.ok());
  CHECK(parsed->topk_method == TopKMethod::kGreedy);
}

}  // namespace
}  // namespace moed::model
