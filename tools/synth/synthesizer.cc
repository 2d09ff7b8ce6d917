#include "tools/synth/synthesizer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tools/synth/bpe_trainer.h"
#include "util/status_macros.h"
#include "xxhash.h"

namespace moed::tools {

extern const unsigned char kCorpusBytes[];
extern const size_t kCorpusSize;
extern const unsigned char kChatTemplateBytes[];
extern const size_t kChatTemplateSize;

namespace {

using model::Architecture;
using model::IsDeepseek;

std::string TopKMethod(const SynthSpec& spec) {
  if (!spec.topk_method.empty()) return spec.topk_method;
  return spec.architecture == Architecture::kDeepseekV3 ? "noaux_tc" : "greedy";
}

constexpr int64_t kRngChunk = 1 << 20;  // elements drawn from one RNG stream

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even (no NaN is ever drawn)
  return static_cast<uint16_t>(bits >> 16);
}

// How a tensor's values are drawn: N(mean, std^2).
struct Init {
  double mean = 0;
  double std = 0;
};

Init InitFor(const std::string& name, const TensorSpec& tensor) {
  auto ends_with = [&](absl::string_view suffix) { return absl::EndsWith(name, suffix); };
  if (tensor.shape.size() == 1 && !ends_with("bias")) return {1.0, 0.05};  // norm weights
  if (ends_with("embed_tokens.weight")) return {0, 0.02};
  // Matrices: the scales of the golden checkpoints at fan-in 64, shrunk as 1/sqrt(fan-in) so
  // that wider models keep activations of the same size.
  double fan_in = static_cast<double>(tensor.shape.back());
  double shrink = std::sqrt(64.0 / fan_in);
  double base = 0.05;
  if (ends_with("q_proj.weight") || ends_with("k_proj.weight") || ends_with("q_a_proj.weight") ||
      ends_with("q_b_proj.weight") || ends_with("kv_a_proj_with_mqa.weight") ||
      ends_with("kv_b_proj.weight")) {
    base = 0.125;
  }
  if (ends_with("bias")) return {0, 0.05};
  if (ends_with("gate.weight") && name.find("shared_expert_gate") == std::string::npos) base = 0.2;
  if (name.find("shared_expert_gate") != std::string::npos) base = 0.1;
  return {0, base * shrink};
}

void FillTensor(uint64_t seed, const TensorSpec& tensor, int64_t begin, int64_t end, uint8_t* out) {
  Init init = InitFor(tensor.name, tensor);
  uint64_t key = XXH64(tensor.name.data(), tensor.name.size(), seed);
  int64_t first_chunk = begin / kRngChunk;
  int64_t last_chunk = (end - 1) / kRngChunk;
  auto fill_chunks = [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      uint64_t state = key ^ (static_cast<uint64_t>(chunk) * 0xD1B54A32D192ED03ull);
      int64_t chunk_first = chunk * kRngChunk;
      int64_t lo = std::max(begin, chunk_first);
      int64_t hi = std::min(end, chunk_first + kRngChunk);
      // Draw the whole chunk's stream from its start so values do not depend on `begin`.
      for (int64_t i = chunk_first; i < hi; i += 2) {
        double u1 = (static_cast<double>(SplitMix64(state) >> 11) + 1.0) * 0x1.0p-53;
        double u2 = static_cast<double>(SplitMix64(state) >> 11) * 0x1.0p-53;
        double radius = std::sqrt(-2.0 * std::log(u1));
        double pair[2] = {radius * std::cos(2 * M_PI * u2), radius * std::sin(2 * M_PI * u2)};
        for (int j = 0; j < 2; ++j) {
          int64_t index = i + j;
          if (index < lo || index >= hi) continue;
          float value = static_cast<float>(init.mean + init.std * pair[j]);
          size_t at = static_cast<size_t>(index - begin);
          if (tensor.dtype == DType::kF32) {
            std::memcpy(out + at * 4, &value, 4);
          } else {
            uint16_t bits = FloatToBf16(value);
            std::memcpy(out + at * 2, &bits, 2);
          }
        }
      }
    }
  };
  int64_t chunks = last_chunk - first_chunk + 1;
  int threads = static_cast<int>(
      std::min<int64_t>(chunks, std::max(1u, std::thread::hardware_concurrency())));
  if (threads <= 1) {
    fill_chunks(first_chunk, last_chunk + 1);
    return;
  }
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    int64_t a = first_chunk + chunks * t / threads;
    int64_t b = first_chunk + chunks * (t + 1) / threads;
    workers.emplace_back(fill_chunks, a, b);
  }
  for (auto& worker : workers) worker.join();
}

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::binary);
  file << text;
  file.close();
  if (!file) return absl::DataLossError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

}  // namespace

absl::string_view DemoChatTemplate() {
  return absl::string_view(reinterpret_cast<const char*>(kChatTemplateBytes), kChatTemplateSize);
}

absl::string_view TokenizerCorpus() {
  return absl::string_view(reinterpret_cast<const char*>(kCorpusBytes), kCorpusSize);
}

absl::StatusOr<SynthSpec> PresetSpec(const std::string& preset, Architecture architecture) {
  SynthSpec spec;
  spec.architecture = architecture;
  if (preset == "tiny") {
    // The golden checkpoints' shapes.
    switch (architecture) {
      case Architecture::kMixtral:
        spec.expert_intermediate_size = 128;
        break;
      case Architecture::kQwen3Moe:
        spec.num_layers = 3;
        spec.num_experts = 16;
        spec.experts_per_token = 4;
        spec.expert_intermediate_size = 32;
        spec.rms_norm_eps = 1e-6;
        break;
      case Architecture::kQwen2Moe:
        spec.expert_intermediate_size = 32;
        spec.shared_expert_intermediate_size = 64;
        spec.norm_topk_prob = false;
        spec.rms_norm_eps = 1e-6;
        break;
      case Architecture::kOlmoe:
        spec.num_key_value_heads = 4;
        spec.expert_intermediate_size = 32;
        spec.norm_topk_prob = false;
        spec.rope_theta = 1e4;
        break;
      case Architecture::kDeepseekV2:  // golden-next/deepseek_v2's shape
        spec.num_layers = 3;
        spec.num_key_value_heads = 4;
        spec.head_dim = 24;
        spec.expert_intermediate_size = 32;
        spec.norm_topk_prob = false;
        spec.rope_theta = 1e4;
        spec.rms_norm_eps = 1e-6;
        break;
      case Architecture::kDeepseekV3:  // V3's routing and low-rank query at that size
        spec.num_layers = 3;
        spec.num_key_value_heads = 4;
        spec.head_dim = 24;
        spec.num_experts = 16;
        spec.experts_per_token = 4;
        spec.expert_intermediate_size = 32;
        spec.q_lora_rank = 48;
        spec.n_group = 4;
        spec.topk_group = 2;
        spec.norm_topk_prob = true;
        spec.rope_theta = 1e4;
        spec.rms_norm_eps = 1e-6;
        break;
    }
  } else if (preset == "demo") {
    spec.vocab_size = 1024;
    spec.hidden_size = 256;
    spec.num_layers = 4;
    spec.num_attention_heads = 8;
    spec.num_key_value_heads = 2;
    spec.head_dim = 32;
    spec.num_experts = 8;
    spec.experts_per_token = 2;
    spec.expert_intermediate_size = 512;
    spec.max_position_embeddings = 4096;
    if (architecture == Architecture::kQwen2Moe) spec.shared_expert_intermediate_size = 512;
  } else if (preset == "bench-1g" || preset == "bench-6g") {
    bool large = preset == "bench-6g";
    spec.vocab_size = 32000;
    spec.hidden_size = large ? 2048 : 1024;
    spec.num_layers = large ? 16 : 8;
    spec.num_attention_heads = 16;
    spec.num_key_value_heads = 4;
    spec.head_dim = spec.hidden_size / 16;
    spec.num_experts = 8;
    spec.experts_per_token = 2;
    spec.expert_intermediate_size = large ? 4096 : 2816;
    spec.max_position_embeddings = 4096;
  } else if (preset == "bench-32l") {
    // Mixtral-8x7B's routing shape (32 layers, 8 experts, top-2) at a size that streams: it
    // pairs with the real Mixtral routing traces (--routing-trace) in the offload benchmark.
    spec.vocab_size = 32000;
    spec.hidden_size = 1024;
    spec.num_layers = 32;
    spec.num_attention_heads = 16;
    spec.num_key_value_heads = 4;
    spec.head_dim = 64;
    spec.num_experts = 8;
    spec.experts_per_token = 2;
    spec.expert_intermediate_size = 1024;
    spec.max_position_embeddings = 4096;
  } else if (preset == "deepseek-v2-lite") {
    if (!IsDeepseek(architecture)) {
      return absl::InvalidArgumentError("preset deepseek-v2-lite needs --arch deepseek_v2 or v3");
    }
    // DeepSeek-V2-Lite's structure (27 layers, the first dense; 64 routed experts, top-6, 2
    // shared; q straight from q_proj; 16 heads) with every width a quarter of the real one.
    spec.vocab_size = 32000;
    spec.hidden_size = 512;
    spec.num_layers = 27;
    spec.num_attention_heads = 16;
    spec.num_key_value_heads = 16;
    spec.kv_lora_rank = 128;
    spec.qk_nope_head_dim = 32;
    spec.qk_rope_head_dim = 16;
    spec.v_head_dim = 32;
    spec.head_dim = 48;
    spec.num_experts = 64;
    spec.experts_per_token = 6;
    spec.n_shared_experts = 2;
    spec.expert_intermediate_size = 352;
    spec.dense_intermediate_size = 2736;
    spec.first_k_dense_replace = 1;
    spec.routed_scaling_factor = 1.0;
    spec.norm_topk_prob = false;
    spec.rope_theta = 1e4;
    spec.rms_norm_eps = 1e-6;
    spec.max_position_embeddings = 4096;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preset '", preset,
                     "' (expected tiny, demo, bench-1g, bench-6g, bench-32l or deepseek-v2-lite)"));
  }
  if (IsDeepseek(architecture) && preset != "tiny" && preset != "deepseek-v2-lite") {
    // The other presets' head size split as MLA splits it.
    spec.num_key_value_heads = spec.num_attention_heads;
    spec.qk_rope_head_dim = std::max<int64_t>(2, spec.head_dim / 3 / 2 * 2);
    spec.qk_nope_head_dim = spec.head_dim - spec.qk_rope_head_dim;
    spec.v_head_dim = spec.qk_nope_head_dim;
    spec.kv_lora_rank = 2 * spec.head_dim;
    spec.dense_intermediate_size = 4 * spec.expert_intermediate_size;
  }
  return spec;
}

absl::Status ValidateSpec(const SynthSpec& spec) {
  auto positive = [](const char* what, int64_t v) -> absl::Status {
    if (v <= 0) return absl::InvalidArgumentError(absl::StrCat(what, " must be positive"));
    return absl::OkStatus();
  };
  MOED_RETURN_IF_ERROR(positive("vocab size", spec.vocab_size));
  MOED_RETURN_IF_ERROR(positive("hidden size", spec.hidden_size));
  MOED_RETURN_IF_ERROR(positive("layers", spec.num_layers));
  MOED_RETURN_IF_ERROR(positive("attention heads", spec.num_attention_heads));
  MOED_RETURN_IF_ERROR(positive("KV heads", spec.num_key_value_heads));
  MOED_RETURN_IF_ERROR(positive("head dim", spec.head_dim));
  MOED_RETURN_IF_ERROR(positive("experts", spec.num_experts));
  MOED_RETURN_IF_ERROR(positive("experts per token", spec.experts_per_token));
  MOED_RETURN_IF_ERROR(positive("expert intermediate size", spec.expert_intermediate_size));
  MOED_RETURN_IF_ERROR(positive("max positions", spec.max_position_embeddings));
  if (spec.num_attention_heads % spec.num_key_value_heads != 0) {
    return absl::InvalidArgumentError("KV heads must divide the attention heads");
  }
  if (spec.head_dim % 2 != 0 && !IsDeepseek(spec.architecture)) {
    return absl::InvalidArgumentError("head dim must be even (RoPE)");
  }
  if (spec.experts_per_token > spec.num_experts) {
    return absl::InvalidArgumentError("experts per token exceed the experts");
  }
  if (spec.shared_expert_intermediate_size > 0 && spec.architecture != Architecture::kQwen2Moe) {
    return absl::InvalidArgumentError(
        "only qwen2_moe has a shared expert of its own width (deepseek: n_shared_experts)");
  }
  if (IsDeepseek(spec.architecture)) {
    MOED_RETURN_IF_ERROR(positive("kv_lora_rank", spec.kv_lora_rank));
    MOED_RETURN_IF_ERROR(positive("qk_nope_head_dim", spec.qk_nope_head_dim));
    MOED_RETURN_IF_ERROR(positive("qk_rope_head_dim", spec.qk_rope_head_dim));
    MOED_RETURN_IF_ERROR(positive("v_head_dim", spec.v_head_dim));
    MOED_RETURN_IF_ERROR(positive("dense intermediate size", spec.dense_intermediate_size));
    if (spec.qk_rope_head_dim % 2 != 0) {
      return absl::InvalidArgumentError("qk_rope_head_dim must be even (RoPE)");
    }
    if (spec.head_dim != spec.qk_nope_head_dim + spec.qk_rope_head_dim) {
      return absl::InvalidArgumentError("head dim must be qk_nope_head_dim + qk_rope_head_dim");
    }
    if (spec.num_experts % spec.n_group != 0 || spec.topk_group > spec.n_group ||
        spec.experts_per_token > spec.topk_group * (spec.num_experts / spec.n_group)) {
      return absl::InvalidArgumentError("the expert groups cannot hold top-k experts");
    }
  }
  if (spec.architecture == Architecture::kOlmoe &&
      spec.num_attention_heads * spec.head_dim != spec.hidden_size) {
    return absl::InvalidArgumentError("olmoe needs heads * head_dim == hidden size");
  }
  if (spec.vocab_size < 260) {
    return absl::InvalidArgumentError(
        "vocab size must be at least 260 (256 bytes and special tokens)");
  }
  return absl::OkStatus();
}

namespace {

// DeepseekV2/V3 decoder layers with the Hub's names (see golden-next/README.md).
template <class Add>
void DeepseekLayers(const SynthSpec& spec, Add& add) {
  const int64_t h = spec.hidden_size, heads = spec.num_attention_heads;
  const int64_t qk = spec.qk_nope_head_dim + spec.qk_rope_head_dim;
  const int64_t inter = spec.expert_intermediate_size;
  for (int64_t layer = 0; layer < spec.num_layers; ++layer) {
    std::string p = absl::StrCat("model.layers.", layer, ".");
    add(p + "input_layernorm.weight", {h});
    add(p + "post_attention_layernorm.weight", {h});
    if (spec.q_lora_rank > 0) {
      add(p + "self_attn.q_a_proj.weight", {spec.q_lora_rank, h});
      add(p + "self_attn.q_a_layernorm.weight", {spec.q_lora_rank});
      add(p + "self_attn.q_b_proj.weight", {heads * qk, spec.q_lora_rank});
    } else {
      add(p + "self_attn.q_proj.weight", {heads * qk, h});
    }
    add(p + "self_attn.kv_a_proj_with_mqa.weight", {spec.kv_lora_rank + spec.qk_rope_head_dim, h});
    add(p + "self_attn.kv_a_layernorm.weight", {spec.kv_lora_rank});
    add(p + "self_attn.kv_b_proj.weight",
        {heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank});
    add(p + "self_attn.o_proj.weight", {h, heads * spec.v_head_dim});
    if (layer < spec.first_k_dense_replace) {
      add(p + "mlp.gate_proj.weight", {spec.dense_intermediate_size, h});
      add(p + "mlp.up_proj.weight", {spec.dense_intermediate_size, h});
      add(p + "mlp.down_proj.weight", {h, spec.dense_intermediate_size});
      continue;
    }
    add(p + "mlp.gate.weight", {spec.num_experts, h});
    if (TopKMethod(spec) == "noaux_tc")
      add(p + "mlp.gate.e_score_correction_bias", {spec.num_experts});
    for (int64_t e = 0; e < spec.num_experts; ++e) {
      model::ExpertTensorNames names = model::RoutedExpertTensorNames(spec.architecture, layer, e);
      add(names.gate, {inter, h});
      add(names.up, {inter, h});
      add(names.down, {h, inter});
    }
    if (spec.n_shared_experts > 0) {
      const int64_t shared = inter * spec.n_shared_experts;
      add(p + "mlp.shared_experts.gate_proj.weight", {shared, h});
      add(p + "mlp.shared_experts.up_proj.weight", {shared, h});
      add(p + "mlp.shared_experts.down_proj.weight", {h, shared});
    }
  }
}

}  // namespace

std::vector<TensorSpec> CheckpointTensors(const SynthSpec& spec) {
  const int64_t h = spec.hidden_size;
  const int64_t q_width = spec.num_attention_heads * spec.head_dim;
  const int64_t kv_width = spec.num_key_value_heads * spec.head_dim;
  const int64_t inter = spec.expert_intermediate_size;
  std::vector<TensorSpec> tensors;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    tensors.push_back({std::move(name), std::move(shape), spec.dtype});
  };
  add("model.embed_tokens.weight", {spec.vocab_size, h});
  if (IsDeepseek(spec.architecture)) {
    DeepseekLayers(spec, add);
    add("model.norm.weight", {h});
    add("lm_head.weight", {spec.vocab_size, h});
    return tensors;
  }
  for (int64_t layer = 0; layer < spec.num_layers; ++layer) {
    std::string p = absl::StrCat("model.layers.", layer, ".");
    add(p + "input_layernorm.weight", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "self_attn.q_proj.weight", {q_width, h});
    add(p + "self_attn.k_proj.weight", {kv_width, h});
    add(p + "self_attn.v_proj.weight", {kv_width, h});
    add(p + "self_attn.o_proj.weight", {h, q_width});
    if (spec.architecture == Architecture::kQwen2Moe) {
      add(p + "self_attn.q_proj.bias", {q_width});
      add(p + "self_attn.k_proj.bias", {kv_width});
      add(p + "self_attn.v_proj.bias", {kv_width});
    }
    if (spec.architecture == Architecture::kQwen3Moe) {
      add(p + "self_attn.q_norm.weight", {spec.head_dim});
      add(p + "self_attn.k_norm.weight", {spec.head_dim});
    }
    if (spec.architecture == Architecture::kOlmoe) {
      add(p + "self_attn.q_norm.weight", {q_width});
      add(p + "self_attn.k_norm.weight", {kv_width});
    }
    std::string moe = model::MoeBlockPrefix(spec.architecture, layer);
    add(moe + "gate.weight", {spec.num_experts, h});
    for (int64_t e = 0; e < spec.num_experts; ++e) {
      model::ExpertTensorNames names = model::RoutedExpertTensorNames(spec.architecture, layer, e);
      add(names.gate, {inter, h});
      add(names.up, {inter, h});
      add(names.down, {h, inter});
    }
    if (spec.shared_expert_intermediate_size > 0) {
      int64_t shared = spec.shared_expert_intermediate_size;
      add(moe + "shared_expert.gate_proj.weight", {shared, h});
      add(moe + "shared_expert.up_proj.weight", {shared, h});
      add(moe + "shared_expert.down_proj.weight", {h, shared});
      add(moe + "shared_expert_gate.weight", {1, h});
    }
  }
  add("model.norm.weight", {h});
  add("lm_head.weight", {spec.vocab_size, h});
  return tensors;
}

std::string ConfigJson(const SynthSpec& spec, int64_t eos_token_id) {
  nlohmann::ordered_json config;
  config["architectures"] = {std::string(model::ArchitectureName(spec.architecture))};
  config["attention_dropout"] = 0.0;
  config["bos_token_id"] = eos_token_id;
  config["eos_token_id"] = eos_token_id;
  config["head_dim"] = spec.head_dim;
  config["hidden_act"] = "silu";
  config["hidden_size"] = spec.hidden_size;
  config["initializer_range"] = 0.02;
  switch (spec.architecture) {
    case Architecture::kMixtral:
      config["intermediate_size"] = spec.expert_intermediate_size;
      config["num_local_experts"] = spec.num_experts;
      config["router_jitter_noise"] = 0.0;
      config["sliding_window"] = nullptr;
      break;
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3Moe:
      config["intermediate_size"] = spec.expert_intermediate_size * 4;
      config["moe_intermediate_size"] = spec.expert_intermediate_size;
      config["num_experts"] = spec.num_experts;
      config["norm_topk_prob"] = spec.norm_topk_prob;
      config["decoder_sparse_step"] = 1;
      config["mlp_only_layers"] = nlohmann::ordered_json::array();
      if (spec.architecture == Architecture::kQwen2Moe) {
        config["shared_expert_intermediate_size"] = spec.shared_expert_intermediate_size;
        config["qkv_bias"] = true;
      }
      config["use_sliding_window"] = false;
      break;
    case Architecture::kOlmoe:
      config["intermediate_size"] = spec.expert_intermediate_size;
      config["num_experts"] = spec.num_experts;
      config["norm_topk_prob"] = spec.norm_topk_prob;
      config["clip_qkv"] = nullptr;
      break;
    case Architecture::kDeepseekV2:
    case Architecture::kDeepseekV3:
      config.erase("head_dim");  // the Hub configs give the MLA sizes instead
      config["first_k_dense_replace"] = spec.first_k_dense_replace;
      config["intermediate_size"] = spec.dense_intermediate_size;
      config["kv_lora_rank"] = spec.kv_lora_rank;
      config["moe_intermediate_size"] = spec.expert_intermediate_size;
      config["moe_layer_freq"] = 1;
      config["n_group"] = spec.n_group;
      config["n_routed_experts"] = spec.num_experts;
      config["n_shared_experts"] = spec.n_shared_experts;
      config["norm_topk_prob"] = spec.norm_topk_prob;
      if (spec.q_lora_rank > 0) {
        config["q_lora_rank"] = spec.q_lora_rank;
      } else {
        config["q_lora_rank"] = nullptr;
      }
      config["qk_nope_head_dim"] = spec.qk_nope_head_dim;
      config["qk_rope_head_dim"] = spec.qk_rope_head_dim;
      config["routed_scaling_factor"] = spec.routed_scaling_factor;
      config["scoring_func"] =
          spec.architecture == Architecture::kDeepseekV3 ? "sigmoid" : "softmax";
      config["topk_group"] = spec.topk_group;
      config["topk_method"] = TopKMethod(spec);
      config["v_head_dim"] = spec.v_head_dim;
      break;
  }
  config["max_position_embeddings"] = spec.max_position_embeddings;
  config["model_type"] = std::string(model::ArchitectureShortName(spec.architecture));
  config["num_attention_heads"] = spec.num_attention_heads;
  config["num_experts_per_tok"] = spec.experts_per_token;
  config["num_hidden_layers"] = spec.num_layers;
  config["num_key_value_heads"] = spec.num_key_value_heads;
  config["output_router_logits"] = false;
  config["rms_norm_eps"] = spec.rms_norm_eps;
  if (spec.yarn_factor > 1) {
    config["rope_scaling"] = {{"beta_fast", 32},
                              {"beta_slow", 1},
                              {"factor", spec.yarn_factor},
                              {"mscale", spec.yarn_mscale},
                              {"mscale_all_dim", spec.yarn_mscale_all_dim},
                              {"original_max_position_embeddings", spec.yarn_original_max_position},
                              {"type", "yarn"}};
  } else {
    config["rope_scaling"] = nullptr;
  }
  config["rope_theta"] = spec.rope_theta;
  config["tie_word_embeddings"] = false;
  config["torch_dtype"] = spec.dtype == DType::kF32 ? "float32" : "bfloat16";
  config["transformers_version"] = "4.51.3";
  config["use_cache"] = true;
  config["vocab_size"] = spec.vocab_size;
  return config.dump(2) + "\n";
}

absl::Status WriteCheckpoint(const SynthSpec& spec, const std::string& out_dir) {
  MOED_RETURN_IF_ERROR(ValidateSpec(spec));
  std::filesystem::path out = std::filesystem::path(out_dir).lexically_normal();
  if (!out.has_filename()) out = out.parent_path();
  std::error_code error;
  if (std::filesystem::exists(out, error)) {
    return absl::AlreadyExistsError(absl::StrCat(out.string(), " already exists"));
  }
  std::filesystem::path temp = out;
  temp += absl::StrCat(".tmp-", getpid());
  std::filesystem::remove_all(temp, error);
  if (!std::filesystem::create_directories(temp, error)) {
    return absl::UnavailableError(
        absl::StrCat(temp.string(), ": cannot create: ", error.message()));
  }
  auto fail = [&](absl::Status status) {
    std::filesystem::remove_all(temp, error);
    return status;
  };

  const std::vector<std::string> specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
  int64_t max_learned = spec.vocab_size - static_cast<int64_t>(specials.size());
  int64_t merges = std::min(spec.max_merges, max_learned - 256);
  absl::StatusOr<BpeVocabulary> vocabulary =
      TrainByteLevelBpe(TokenizerCorpus(), static_cast<int>(merges));
  if (!vocabulary.ok()) return fail(vocabulary.status());
  int64_t eos = static_cast<int64_t>(vocabulary->tokens.size());  // first special token

  if (absl::Status s = WriteText(temp / "tokenizer.json", TokenizerJson(*vocabulary, specials));
      !s.ok()) {
    return fail(s);
  }
  nlohmann::ordered_json tokenizer_config = {
      {"add_bos_token", false},
      {"add_eos_token", false},
      {"bos_token", nullptr},
      {"eos_token", "<|endoftext|>"},
      {"pad_token", "<|endoftext|>"},
      {"unk_token", nullptr},
      {"model_max_length", spec.max_position_embeddings},
      {"tokenizer_class", "PreTrainedTokenizerFast"},
      {"chat_template", std::string(DemoChatTemplate())},
  };
  nlohmann::ordered_json generation_config = {
      {"bos_token_id", eos}, {"eos_token_id", eos}, {"transformers_version", "4.51.3"}};
  for (auto [name, text] :
       {std::pair{"config.json", ConfigJson(spec, eos)},
        std::pair{"tokenizer_config.json", tokenizer_config.dump(2) + "\n"},
        std::pair{"generation_config.json", generation_config.dump(2) + "\n"}}) {
    if (absl::Status s = WriteText(temp / name, text); !s.ok()) return fail(s);
  }
  absl::Status written = WriteSafetensors(
      (temp / "model.safetensors").string(), CheckpointTensors(spec), {{"format", "pt"}},
      [&](const TensorSpec& tensor, int64_t begin, int64_t end, uint8_t* out_bytes) {
        FillTensor(spec.seed, tensor, begin, end, out_bytes);
      });
  if (!written.ok()) return fail(written);
  std::filesystem::rename(temp, out, error);
  if (error)
    return fail(
        absl::UnavailableError(absl::StrCat("rename to ", out.string(), ": ", error.message())));
  return absl::OkStatus();
}

}  // namespace moed::tools
