// The architecture-level description of a checkpoint, read from its Hugging Face config.json.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::model {

enum class Architecture { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe };

// The Hugging Face class name ("MixtralForCausalLM").
absl::string_view ArchitectureName(Architecture arch);
// The short name used on the command line ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe").
absl::string_view ArchitectureShortName(Architecture arch);
absl::StatusOr<Architecture> ParseArchitectureShortName(absl::string_view name);

struct ModelConfig {
  Architecture architecture = Architecture::kMixtral;
  std::string model_type;   // config.json "model_type"
  std::string torch_dtype;  // "bfloat16", "float16", "float32" (informational)

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t num_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;  // from the config, or hidden_size / num_attention_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 0;
  double rope_theta = 0;
  bool tie_word_embeddings = false;

  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t expert_intermediate_size = 0;
  bool norm_topk_prob = true;
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  int64_t dense_intermediate_size = 0;  // width of the dense MLP of non-MoE layers

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  // True when layer `layer` has a sparse MoE block (Qwen2-MoE can mix in dense MLP layers).
  bool IsMoeLayer(int64_t layer) const;
  int64_t NumMoeLayers() const;
  // Parameters of one routed expert (gate, up and down projections).
  int64_t ExpertParameters() const { return 3 * hidden_size * expert_intermediate_size; }
};

// Prefix of layer `layer`'s MoE block: "model.layers.N.block_sparse_moe." (Mixtral) or
// "model.layers.N.mlp." (the others).
std::string MoeBlockPrefix(Architecture arch, int64_t layer);

// The usual Hub names of one routed expert's matrices (Mixtral calls them w1, w3, w2).
struct ExpertTensorNames {
  std::string gate, up, down;
};
ExpertTensorNames RoutedExpertTensorNames(Architecture arch, int64_t layer, int64_t expert);

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);
// Reads and parses DIR/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace moed::model
