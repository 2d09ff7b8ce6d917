// Writes a complete Hugging Face-layout MoE checkpoint with random weights: config.json,
// model.safetensors, tokenizer.json (a byte-level BPE learned from text in the repo),
// tokenizer_config.json and generation_config.json. The same spec and seed give the same bytes.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "model/model_config.h"
#include "tools/synth/safetensors_writer.h"

namespace moed::tools {

struct SynthSpec {
  model::Architecture architecture = model::Architecture::kMixtral;
  int64_t vocab_size = 512;
  int64_t hidden_size = 64;
  int64_t num_layers = 2;
  int64_t num_attention_heads = 4;
  int64_t num_key_value_heads = 2;
  int64_t head_dim = 16;
  int64_t num_experts = 8;
  int64_t experts_per_token = 2;
  int64_t expert_intermediate_size = 128;
  int64_t shared_expert_intermediate_size = 0;  // Qwen2-MoE only; 0: none
  int64_t max_position_embeddings = 256;
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  bool norm_topk_prob = true;  // Qwen and OLMoE; Mixtral always renormalises
  // DeepSeek (deepseek_v2 / deepseek_v3): MLA, shared experts, leading dense layers, routing.
  int64_t q_lora_rank = 0;  // 0: q_proj straight from the hidden state
  int64_t kv_lora_rank = 32;
  int64_t qk_nope_head_dim = 16;
  int64_t qk_rope_head_dim = 8;
  int64_t v_head_dim = 16;
  int64_t n_shared_experts = 1;
  int64_t first_k_dense_replace = 1;
  int64_t dense_intermediate_size = 128;
  double routed_scaling_factor = 2.5;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  // "greedy", "group_limited_greedy" or "noaux_tc" (empty: greedy for V2, noaux_tc for V3).
  std::string topk_method;
  // YaRN when yarn_factor > 1.
  double yarn_factor = 1;
  int64_t yarn_original_max_position = 64;
  double yarn_mscale = 0.707;
  double yarn_mscale_all_dim = 0.707;
  DType dtype = DType::kBF16;
  uint64_t seed = 0;
  // Cap on the tokenizer's learned merges; the vocabulary never exceeds vocab_size.
  int64_t max_merges = 4096;
};

// Named starting points: "tiny" (the golden checkpoints' shape), "demo" (the quick-start
// model), "bench-1g" and "bench-6g" (the Mixtral-shaped benchmark models), "bench-32l"
// (Mixtral-8x7B's 32 layers x 8 experts, top-2, for trace-driven benchmarks) and
// "deepseek-v2-lite" (DeepSeek-V2-Lite's 27 layers, 64 routed + 2 shared experts, top-6, at a
// quarter of its hidden size; DeepSeek architectures only).
absl::StatusOr<SynthSpec> PresetSpec(const std::string& preset, model::Architecture architecture);

// Checks the spec for shapes the architectures cannot have.
absl::Status ValidateSpec(const SynthSpec& spec);

// Every tensor of the checkpoint, in file order, with the usual Hub names.
std::vector<TensorSpec> CheckpointTensors(const SynthSpec& spec);

// The config.json text for the spec (the layout transformers' save_pretrained writes).
std::string ConfigJson(const SynthSpec& spec, int64_t eos_token_id);

// Writes the checkpoint into `out_dir`, which must not exist yet: everything goes to a
// temporary directory beside it that is renamed at the end.
absl::Status WriteCheckpoint(const SynthSpec& spec, const std::string& out_dir);

// The training text the tokenizer is learned from (tools/synth/corpus.txt, built in).
absl::string_view TokenizerCorpus();

// The chat template written into every synthesized model's tokenizer_config.json.
absl::string_view DemoChatTemplate();

}  // namespace moed::tools
