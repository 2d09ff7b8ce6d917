#include "server/daemon.h"

#include <catch2/catch.hpp>

namespace moed::server {
namespace {

TEST_CASE("ModelInfo describes the model from its config") {
  model::ModelConfig config;
  config.architecture = model::Architecture::kQwen2Moe;
  config.torch_dtype = "bfloat16";
  config.vocab_size = 512;
  config.hidden_size = 64;
  config.num_layers = 4;
  config.num_attention_heads = 4;
  config.num_key_value_heads = 2;
  config.head_dim = 16;
  config.num_experts = 8;
  config.experts_per_token = 2;
  config.expert_intermediate_size = 32;
  config.shared_expert_intermediate_size = 64;
  config.max_position_embeddings = 256;
  config.decoder_sparse_step = 2;  // layers 1 and 3 are MoE layers
  config.eos_token_ids = {2, 7};
  DaemonConfig daemon;
  daemon.model = "/models/tiny-qwen/";

  v1::ModelInfoResponse info = DescribeModel(config, daemon);
  CHECK(info.model_name() == "tiny-qwen");
  CHECK(info.architecture() == "Qwen2MoeForCausalLM");
  CHECK(info.source_path() == "/models/tiny-qwen/");
  CHECK(info.expert_bytes() == 3 * 64 * 32 * 2);
  CHECK(info.total_expert_bytes() == 3 * 64 * 32 * 2 * 8 * 2);
  CHECK(info.max_context_tokens() == 256);
  CHECK(info.eos_token_ids_size() == 2);
  CHECK_FALSE(info.has_tokenizer());

  daemon.served_model_name = "public-name";
  config.torch_dtype = "float32";
  info = DescribeModel(config, daemon);
  CHECK(info.model_name() == "public-name");
  CHECK(info.expert_bytes() == 3 * 64 * 32 * 4);
}

}  // namespace
}  // namespace moed::server
