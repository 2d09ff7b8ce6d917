// The architecture-level description of a checkpoint, read from its Hugging Face config.json.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::model {

enum class Architecture { kMixtral, kQwen2Moe, kQwen3Moe, kOlmoe, kDeepseekV2, kDeepseekV3 };

// The Hugging Face class name ("MixtralForCausalLM").
absl::string_view ArchitectureName(Architecture arch);
// The short name used on the command line ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
// "deepseek_v2", "deepseek_v3").
absl::string_view ArchitectureShortName(Architecture arch);
absl::StatusOr<Architecture> ParseArchitectureShortName(absl::string_view name);

// How a router turns its logits into expert scores.
enum class RouterScoringFunction { kSoftmax, kSigmoid };
// How a router picks its experts: among all of them, or within the best groups (DeepSeek's
// "group_limited_greedy" ranks groups by their best score, "noaux_tc" by the sum of their two
// best scores with the correction bias added).
enum class TopKMethod { kGreedy, kGroupLimitedGreedy, kNoAuxTc };

// YaRN context extension as DeepSeek's configs give it ("rope_scaling": {"type": "yarn", ...}).
struct YarnScaling {
  double factor = 1;
  int64_t original_max_position_embeddings = 0;
  double beta_fast = 32;
  double beta_slow = 1;
  double mscale = 1;
  double mscale_all_dim = 0;
};

// Multi-head Latent Attention (DeepSeek-V2/V3): queries and keys of nope_dim + rope_dim per
// head, values of value_dim, keys and values rebuilt from a latent of kv_lora_rank shared by
// all heads plus one rope key of rope_dim.
struct MlaConfig {
  int64_t q_lora_rank = 0;  // 0: q_proj straight from the hidden state
  int64_t kv_lora_rank = 0;
  int64_t nope_dim = 0;   // qk_nope_head_dim
  int64_t rope_dim = 0;   // qk_rope_head_dim
  int64_t value_dim = 0;  // v_head_dim
  int64_t q_head_dim() const { return nope_dim + rope_dim; }
};

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
  std::optional<YarnScaling> yarn;  // DeepSeek only
  // Set for DeepSeek (mla.kv_lora_rank > 0): the attention is MLA, not grouped-query.
  MlaConfig mla;

  int64_t num_experts = 0;
  int64_t experts_per_token = 0;
  int64_t expert_intermediate_size = 0;
  bool norm_topk_prob = true;
  int64_t shared_expert_intermediate_size = 0;  // 0: no shared expert
  bool shared_expert_gated = false;             // Qwen2-MoE's sigmoid gate on the shared expert
  RouterScoringFunction scoring = RouterScoringFunction::kSoftmax;
  TopKMethod topk_method = TopKMethod::kGreedy;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1;   // multiplies the routed experts' weights (DeepSeek)
  int64_t first_k_dense_replace = 0;  // DeepSeek: layers before this one are dense
  int64_t moe_layer_freq = 1;         // DeepSeek: every moe_layer_freq-th layer after is MoE
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  int64_t dense_intermediate_size = 0;  // width of the dense MLP of non-MoE layers

  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;

  // True when layer `layer` has a sparse MoE block (Qwen2-MoE can mix in dense MLP layers).
  bool IsMoeLayer(int64_t layer) const;
  int64_t NumMoeLayers() const;
  bool uses_mla() const { return mla.kv_lora_rank > 0; }
  // Whether the router divides the top-k weights by their sum, and what it multiplies them by
  // after (DeepSeek's remote code renormalises only with more than one expert; V2 then skips
  // routed_scaling_factor, V3 applies it).
  bool RenormalizesTopK() const;
  double RoutedWeightScale() const;
  // Floats one token leaves in one layer's KV cache: full keys and values, or MLA's latent and
  // rope key.
  int64_t KvFloatsPerTokenLayer() const {
    return uses_mla() ? mla.kv_lora_rank + mla.rope_dim : 2 * num_key_value_heads * head_dim;
  }
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

// DeepseekV2ForCausalLM or DeepseekV3ForCausalLM.
bool IsDeepseek(Architecture arch);

// How the router picks and weighs experts, in words ("softmax, top-2, renormalized").
std::string RoutingDescription(const ModelConfig& config);

// Parses config.json text. `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);
// Reads and parses DIR/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);

}  // namespace moed::model
