// The config.json of the tiny Mixtral preset, whose packed store and routing seed the fuzz
// targets that check what they parse against a model.
#pragma once

namespace moed::fuzz {

inline constexpr char kTinyMixtralConfig[] = R"({
  "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 512,
  "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
  "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256,
  "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "torch_dtype": "bfloat16"})";

}  // namespace moed::fuzz
