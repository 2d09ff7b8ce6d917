#include "model/model_config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "util/read_file.h"
#include "util/status_macros.h"

namespace moed::model {
namespace {

using nlohmann::json;

struct ArchitectureNames {
  Architecture arch;
  absl::string_view hf_class;
  absl::string_view short_name;
};
constexpr ArchitectureNames kArchitectures[] = {
    {Architecture::kMixtral, "MixtralForCausalLM", "mixtral"},
    {Architecture::kQwen2Moe, "Qwen2MoeForCausalLM", "qwen2_moe"},
    {Architecture::kQwen3Moe, "Qwen3MoeForCausalLM", "qwen3_moe"},
    {Architecture::kOlmoe, "OlmoeForCausalLM", "olmoe"},
    {Architecture::kDeepseekV2, "DeepseekV2ForCausalLM", "deepseek_v2"},
    {Architecture::kDeepseekV3, "DeepseekV3ForCausalLM", "deepseek_v3"},
};

// Reads typed fields out of a parsed config, turning every problem into an error that names
// the file and the key.
class FieldReader {
 public:
  FieldReader(const json& root, absl::string_view source) : root_(root), source_(source) {}

  absl::Status Error(absl::string_view key, absl::string_view problem) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": \"", key, "\" ", problem));
  }

  absl::string_view source() const { return source_; }

  const json* Find(absl::string_view key) const {
    auto it = root_.find(std::string(key));
    if (it == root_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  // A positive integer, required unless `fallback` is given.
  absl::Status PositiveInt(absl::string_view key, int64_t* out,
                           std::optional<int64_t> fallback = std::nullopt) const {
    const json* value = Find(key);
    if (value == nullptr) {
      if (fallback.has_value()) {
        *out = *fallback;
        return absl::OkStatus();
      }
      return Error(key, "is missing");
    }
    if (!value->is_number_integer()) return Error(key, "must be an integer");
    int64_t v = value->get<int64_t>();
    if (v <= 0) return Error(key, absl::StrCat("must be positive, not ", v));
    if (v > (int64_t{1} << 40)) return Error(key, absl::StrCat("is implausibly large: ", v));
    *out = v;
    return absl::OkStatus();
  }

  absl::Status PositiveNumber(absl::string_view key, double* out,
                              std::optional<double> fallback = std::nullopt) const {
    const json* value = Find(key);
    if (value == nullptr) {
      if (fallback.has_value()) {
        *out = *fallback;
        return absl::OkStatus();
      }
      return Error(key, "is missing");
    }
    if (!value->is_number()) return Error(key, "must be a number");
    double v = value->get<double>();
    if (!(v > 0)) return Error(key, "must be positive");
    *out = v;
    return absl::OkStatus();
  }

  // A non-negative integer; missing or null reads as `fallback`.
  absl::Status NonNegativeInt(absl::string_view key, int64_t* out, int64_t fallback) const {
    const json* value = Find(key);
    if (value == nullptr) {
      *out = fallback;
      return absl::OkStatus();
    }
    if (!value->is_number_integer()) return Error(key, "must be an integer");
    int64_t v = value->get<int64_t>();
    if (v < 0) return Error(key, absl::StrCat("must not be negative, not ", v));
    if (v > (int64_t{1} << 40)) return Error(key, absl::StrCat("is implausibly large: ", v));
    *out = v;
    return absl::OkStatus();
  }

  absl::Status Bool(absl::string_view key, bool* out, bool fallback) const {
    const json* value = Find(key);
    if (value == nullptr) {
      *out = fallback;
      return absl::OkStatus();
    }
    if (!value->is_boolean()) return Error(key, "must be true or false");
    *out = value->get<bool>();
    return absl::OkStatus();
  }

  absl::Status String(absl::string_view key, std::string* out) const {
    const json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    if (!value->is_string()) return Error(key, "must be a string");
    *out = value->get<std::string>();
    return absl::OkStatus();
  }

  // A token id or a list of them (eos_token_id is either in real configs).
  absl::Status TokenIds(absl::string_view key, std::vector<int64_t>* out) const {
    const json* value = Find(key);
    if (value == nullptr) return absl::OkStatus();
    auto take = [&](const json& item) -> absl::Status {
      if (!item.is_number_integer() || item.get<int64_t>() < 0) {
        return Error(key, "must hold non-negative integer token ids");
      }
      out->push_back(item.get<int64_t>());
      return absl::OkStatus();
    };
    if (value->is_array()) {
      for (const json& item : *value) {
        if (absl::Status s = take(item); !s.ok()) return s;
      }
      return absl::OkStatus();
    }
    return take(*value);
  }

 private:
  const json& root_;
  absl::string_view source_;
};

// "rope_scaling" of DeepSeek's configs: YaRN, with the remote code's defaults.
absl::StatusOr<YarnScaling> ParseYarn(const json& scaling, const FieldReader& fields) {
  if (!scaling.is_object()) return fields.Error("rope_scaling", "must be an object or null");
  std::string type;
  for (const char* key : {"type", "rope_type"}) {
    auto it = scaling.find(key);
    if (it != scaling.end() && it->is_string()) type = it->get<std::string>();
  }
  if (type != "yarn") {
    return fields.Error("rope_scaling",
                        absl::StrCat("of type '", type, "' is not supported (only yarn or null)"));
  }
  const std::string source = absl::StrCat(fields.source(), ": rope_scaling");
  FieldReader yarn_fields(scaling, source);
  YarnScaling yarn;
  MOED_RETURN_IF_ERROR(yarn_fields.PositiveNumber("factor", &yarn.factor));
  MOED_RETURN_IF_ERROR(yarn_fields.PositiveInt("original_max_position_embeddings",
                                               &yarn.original_max_position_embeddings));
  MOED_RETURN_IF_ERROR(yarn_fields.PositiveNumber("beta_fast", &yarn.beta_fast, 32.0));
  MOED_RETURN_IF_ERROR(yarn_fields.PositiveNumber("beta_slow", &yarn.beta_slow, 1.0));
  MOED_RETURN_IF_ERROR(yarn_fields.PositiveNumber("mscale", &yarn.mscale, 1.0));
  if (const json* all = yarn_fields.Find("mscale_all_dim"); all != nullptr) {
    if (!all->is_number() || all->get<double>() < 0) {
      return yarn_fields.Error("mscale_all_dim", "must be a non-negative number");
    }
    yarn.mscale_all_dim = all->get<double>();
  }
  return yarn;
}

// The MoE fields of DeepseekV2/V3 configs (the remote code's names and defaults).
absl::Status ParseDeepseekMoe(const FieldReader& fields, ModelConfig* config) {
  const bool v3 = config->architecture == Architecture::kDeepseekV3;
  MOED_RETURN_IF_ERROR(fields.PositiveInt("n_routed_experts", &config->num_experts));
  MOED_RETURN_IF_ERROR(
      fields.PositiveInt("moe_intermediate_size", &config->expert_intermediate_size));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("intermediate_size", &config->dense_intermediate_size));
  int64_t shared = 0;
  MOED_RETURN_IF_ERROR(fields.NonNegativeInt("n_shared_experts", &shared, 0));
  config->shared_expert_intermediate_size = shared * config->expert_intermediate_size;
  MOED_RETURN_IF_ERROR(
      fields.NonNegativeInt("first_k_dense_replace", &config->first_k_dense_replace, 0));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("moe_layer_freq", &config->moe_layer_freq, 1));
  MOED_RETURN_IF_ERROR(fields.Bool("norm_topk_prob", &config->norm_topk_prob, false));
  MOED_RETURN_IF_ERROR(
      fields.PositiveNumber("routed_scaling_factor", &config->routed_scaling_factor, 1.0));
  std::string scoring = v3 ? "sigmoid" : "softmax";
  MOED_RETURN_IF_ERROR(fields.String("scoring_func", &scoring));
  if (scoring == "softmax") {
    config->scoring = RouterScoringFunction::kSoftmax;
  } else if (scoring == "sigmoid") {
    config->scoring = RouterScoringFunction::kSigmoid;
  } else {
    return fields.Error("scoring_func",
                        absl::StrCat("'", scoring, "' is not supported (softmax or sigmoid)"));
  }
  std::string method = v3 ? "noaux_tc" : "greedy";
  MOED_RETURN_IF_ERROR(fields.String("topk_method", &method));
  if (method == "greedy" || method == "gready") {  // "gready": the remote code's default, spelt so
    config->topk_method = TopKMethod::kGreedy;
  } else if (method == "group_limited_greedy") {
    config->topk_method = TopKMethod::kGroupLimitedGreedy;
  } else if (method == "noaux_tc") {
    config->topk_method = TopKMethod::kNoAuxTc;
  } else {
    return fields.Error("topk_method",
                        absl::StrCat("'", method,
                                     "' is not supported (greedy, group_limited_greedy or "
                                     "noaux_tc)"));
  }
  MOED_RETURN_IF_ERROR(fields.PositiveInt("n_group", &config->n_group, 1));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("topk_group", &config->topk_group, 1));
  if (config->topk_method == TopKMethod::kGreedy) {
    config->n_group = 1;  // greedy ignores the groups
    config->topk_group = 1;
  }
  if (config->num_experts % config->n_group != 0) {
    return fields.Error("n_group", absl::StrCat("(", config->n_group, ") must divide the ",
                                                config->num_experts, " routed experts"));
  }
  if (config->topk_group > config->n_group) {
    return fields.Error("topk_group", absl::StrCat("(", config->topk_group, ") exceeds n_group (",
                                                   config->n_group, ")"));
  }
  const int64_t group_size = config->num_experts / config->n_group;
  if (config->topk_method == TopKMethod::kNoAuxTc && group_size < 2) {
    return fields.Error("n_group",
                        "leaves fewer than 2 experts per group, which noaux_tc ranks by");
  }
  int64_t top_k = 0;
  MOED_RETURN_IF_ERROR(fields.PositiveInt("num_experts_per_tok", &top_k));
  if (top_k > config->topk_group * group_size) {
    return fields.Error("num_experts_per_tok",
                        absl::StrCat("(", top_k, ") exceeds the ", config->topk_group * group_size,
                                     " experts of the topk_group best groups"));
  }
  return absl::OkStatus();
}

}  // namespace

bool IsDeepseek(Architecture arch) {
  return arch == Architecture::kDeepseekV2 || arch == Architecture::kDeepseekV3;
}

bool ModelConfig::RenormalizesTopK() const {
  return norm_topk_prob && (!IsDeepseek(architecture) || experts_per_token > 1);
}

double ModelConfig::RoutedWeightScale() const {
  if (!IsDeepseek(architecture)) return 1.0;
  if (architecture == Architecture::kDeepseekV2 && RenormalizesTopK()) return 1.0;
  return routed_scaling_factor;
}

absl::string_view ArchitectureName(Architecture arch) {
  for (const auto& names : kArchitectures) {
    if (names.arch == arch) return names.hf_class;
  }
  return "?";
}

absl::string_view ArchitectureShortName(Architecture arch) {
  for (const auto& names : kArchitectures) {
    if (names.arch == arch) return names.short_name;
  }
  return "?";
}

absl::StatusOr<Architecture> ParseArchitectureShortName(absl::string_view name) {
  for (const auto& names : kArchitectures) {
    if (names.short_name == name) return names.arch;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown architecture '", name,
      "' (expected mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 or deepseek_v3)"));
}

std::string MoeBlockPrefix(Architecture arch, int64_t layer) {
  return absl::StrCat("model.layers.", layer,
                      arch == Architecture::kMixtral ? ".block_sparse_moe." : ".mlp.");
}

ExpertTensorNames RoutedExpertTensorNames(Architecture arch, int64_t layer, int64_t expert) {
  std::string p = absl::StrCat(MoeBlockPrefix(arch, layer), "experts.", expert, ".");
  if (arch == Architecture::kMixtral) return {p + "w1.weight", p + "w3.weight", p + "w2.weight"};
  return {p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"};
}

bool ModelConfig::IsMoeLayer(int64_t layer) const {
  if (IsDeepseek(architecture)) {
    return layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) {
    return false;
  }
  return (layer + 1) % decoder_sparse_step == 0;
}

int64_t ModelConfig::NumMoeLayers() const {
  int64_t n = 0;
  for (int64_t layer = 0; layer < num_layers; ++layer) n += IsMoeLayer(layer) ? 1 : 0;
  return n;
}

std::string RoutingDescription(const ModelConfig& config) {
  std::string out = config.scoring == RouterScoringFunction::kSigmoid ? "sigmoid" : "softmax";
  if (config.topk_method == TopKMethod::kNoAuxTc) absl::StrAppend(&out, " + correction bias");
  absl::StrAppend(&out, ", top-", config.experts_per_token);
  if (config.topk_method != TopKMethod::kGreedy) {
    absl::StrAppend(&out, " of the best ", config.topk_group, " of ", config.n_group, " groups");
  }
  if (config.RenormalizesTopK()) absl::StrAppend(&out, ", renormalized");
  if (config.RoutedWeightScale() != 1.0) absl::StrAppend(&out, ", x", config.RoutedWeightScale());
  return out;
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": must be a JSON object"));
  }
  FieldReader fields(root, source);
  ModelConfig config;

  const json* architectures = fields.Find("architectures");
  if (architectures == nullptr || !architectures->is_array() || architectures->empty() ||
      !(*architectures)[0].is_string()) {
    return fields.Error("architectures", "must be a list naming the model class");
  }
  std::string hf_class = (*architectures)[0].get<std::string>();
  bool known = false;
  for (const auto& names : kArchitectures) {
    if (names.hf_class == hf_class) {
      config.architecture = names.arch;
      known = true;
    }
  }
  if (!known) {
    return fields.Error("architectures", absl::StrCat("names ", hf_class,
                                                      ", which moed does not support (supported: "
                                                      "MixtralForCausalLM, Qwen2MoeForCausalLM, "
                                                      "Qwen3MoeForCausalLM, OlmoeForCausalLM, "
                                                      "DeepseekV2ForCausalLM, "
                                                      "DeepseekV3ForCausalLM)"));
  }
  MOED_RETURN_IF_ERROR(fields.String("model_type", &config.model_type));
  MOED_RETURN_IF_ERROR(fields.String("torch_dtype", &config.torch_dtype));

  MOED_RETURN_IF_ERROR(fields.PositiveInt("vocab_size", &config.vocab_size));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("hidden_size", &config.hidden_size));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("num_hidden_layers", &config.num_layers));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("num_attention_heads", &config.num_attention_heads));
  MOED_RETURN_IF_ERROR(fields.PositiveInt("num_key_value_heads", &config.num_key_value_heads,
                                          config.num_attention_heads));
  if (config.num_attention_heads % config.num_key_value_heads != 0) {
    return fields.Error("num_key_value_heads", absl::StrCat("(", config.num_key_value_heads,
                                                            ") must divide num_attention_heads (",
                                                            config.num_attention_heads, ")"));
  }
  const bool deepseek = IsDeepseek(config.architecture);
  if (deepseek) {
    // MLA has no grouped-query heads: every head reads the one shared latent.
    config.num_key_value_heads = config.num_attention_heads;
  } else if (fields.Find("head_dim") == nullptr &&
             config.hidden_size % config.num_attention_heads != 0) {
    return fields.Error("head_dim", "is missing and hidden_size is not a multiple of the heads");
  }
  if (deepseek) {
    MlaConfig& mla = config.mla;
    MOED_RETURN_IF_ERROR(fields.PositiveInt("kv_lora_rank", &mla.kv_lora_rank));
    MOED_RETURN_IF_ERROR(fields.NonNegativeInt("q_lora_rank", &mla.q_lora_rank, 0));
    MOED_RETURN_IF_ERROR(fields.PositiveInt("qk_nope_head_dim", &mla.nope_dim));
    MOED_RETURN_IF_ERROR(fields.PositiveInt("qk_rope_head_dim", &mla.rope_dim));
    MOED_RETURN_IF_ERROR(fields.PositiveInt("v_head_dim", &mla.value_dim));
    if (mla.rope_dim % 2 != 0) return fields.Error("qk_rope_head_dim", "must be even for RoPE");
    config.head_dim = mla.q_head_dim();
  } else {
    MOED_RETURN_IF_ERROR(fields.PositiveInt("head_dim", &config.head_dim,
                                            config.hidden_size / config.num_attention_heads));
    if (config.head_dim % 2 != 0) return fields.Error("head_dim", "must be even for RoPE");
  }
  MOED_RETURN_IF_ERROR(
      fields.PositiveInt("max_position_embeddings", &config.max_position_embeddings));
  MOED_RETURN_IF_ERROR(fields.PositiveNumber("rms_norm_eps", &config.rms_norm_eps));
  MOED_RETURN_IF_ERROR(fields.PositiveNumber("rope_theta", &config.rope_theta, 10000.0));
  MOED_RETURN_IF_ERROR(fields.Bool("tie_word_embeddings", &config.tie_word_embeddings, false));

  if (const json* scaling = fields.Find("rope_scaling"); scaling != nullptr && deepseek) {
    MOED_ASSIGN_OR_RETURN(config.yarn, ParseYarn(*scaling, fields));
  } else if (scaling != nullptr) {
    std::string type = "unknown";
    if (scaling->is_object()) {
      for (const char* key : {"rope_type", "type"}) {
        auto it = scaling->find(key);
        if (it != scaling->end() && it->is_string()) {
          type = it->get<std::string>();
          break;
        }
      }
    }
    return fields.Error("rope_scaling",
                        absl::StrCat("of type '", type, "' is not supported (only null)"));
  }
  if (const json* quantization = fields.Find("quantization_config"); quantization != nullptr) {
    // FP8 (DeepSeek-V3/R1's release), GPTQ, AWQ...: weights moed cannot read as they are.
    std::string method = "unknown";
    if (quantization->is_object()) {
      auto it = quantization->find("quant_method");
      if (it != quantization->end() && it->is_string()) method = it->get<std::string>();
    }
    return fields.Error("quantization_config",
                        absl::StrCat("names quant_method '", method,
                                     "': moed reads bf16, fp16 or fp32 checkpoints (convert the "
                                     "weights to bf16 first; moed-pack then makes int8 and int4 "
                                     "expert copies)"));
  }
  if (const json* hidden_act = fields.Find("hidden_act"); hidden_act != nullptr) {
    if (!hidden_act->is_string() || hidden_act->get<std::string>() != "silu") {
      return fields.Error("hidden_act", "must be \"silu\" (SwiGLU experts)");
    }
  }

  switch (config.architecture) {
    case Architecture::kMixtral:
      MOED_RETURN_IF_ERROR(fields.PositiveInt("num_local_experts", &config.num_experts));
      MOED_RETURN_IF_ERROR(
          fields.PositiveInt("intermediate_size", &config.expert_intermediate_size));
      config.norm_topk_prob = true;  // Mixtral always renormalises its top-k weights.
      break;
    case Architecture::kQwen2Moe:
    case Architecture::kQwen3Moe:
      MOED_RETURN_IF_ERROR(fields.PositiveInt("num_experts", &config.num_experts));
      MOED_RETURN_IF_ERROR(
          fields.PositiveInt("moe_intermediate_size", &config.expert_intermediate_size));
      MOED_RETURN_IF_ERROR(fields.Bool("norm_topk_prob", &config.norm_topk_prob,
                                       config.architecture == Architecture::kQwen3Moe));
      MOED_RETURN_IF_ERROR(
          fields.PositiveInt("decoder_sparse_step", &config.decoder_sparse_step, 1));
      MOED_RETURN_IF_ERROR(fields.TokenIds("mlp_only_layers", &config.mlp_only_layers));
      for (int64_t layer : config.mlp_only_layers) {
        if (layer >= config.num_layers) {
          return fields.Error("mlp_only_layers",
                              absl::StrCat("names layer ", layer, " of ", config.num_layers));
        }
      }
      if (fields.Find("intermediate_size") != nullptr) {
        MOED_RETURN_IF_ERROR(
            fields.PositiveInt("intermediate_size", &config.dense_intermediate_size));
      }
      if (config.architecture == Architecture::kQwen2Moe &&
          fields.Find("shared_expert_intermediate_size") != nullptr) {
        MOED_RETURN_IF_ERROR(fields.PositiveInt("shared_expert_intermediate_size",
                                                &config.shared_expert_intermediate_size));
        config.shared_expert_gated = true;
      }
      if (config.NumMoeLayers() < config.num_layers && config.dense_intermediate_size == 0) {
        return fields.Error("intermediate_size", "is needed for the dense MLP layers");
      }
      break;
    case Architecture::kDeepseekV2:
    case Architecture::kDeepseekV3:
      MOED_RETURN_IF_ERROR(ParseDeepseekMoe(fields, &config));
      break;
    case Architecture::kOlmoe:
      MOED_RETURN_IF_ERROR(fields.PositiveInt("num_experts", &config.num_experts));
      MOED_RETURN_IF_ERROR(
          fields.PositiveInt("intermediate_size", &config.expert_intermediate_size));
      MOED_RETURN_IF_ERROR(fields.Bool("norm_topk_prob", &config.norm_topk_prob, false));
      if (const json* clip = fields.Find("clip_qkv"); clip != nullptr) {
        return fields.Error("clip_qkv", "is not supported (only null)");
      }
      break;
  }
  MOED_RETURN_IF_ERROR(fields.PositiveInt("num_experts_per_tok", &config.experts_per_token));
  if (config.experts_per_token > config.num_experts) {
    return fields.Error("num_experts_per_tok",
                        absl::StrCat("(", config.experts_per_token, ") exceeds the ",
                                     config.num_experts, " experts"));
  }

  std::vector<int64_t> bos;
  MOED_RETURN_IF_ERROR(fields.TokenIds("bos_token_id", &bos));
  if (!bos.empty()) config.bos_token_id = bos.front();
  MOED_RETURN_IF_ERROR(fields.TokenIds("eos_token_id", &config.eos_token_ids));
  for (int64_t id : config.eos_token_ids) {
    if (id >= config.vocab_size) {
      return fields.Error("eos_token_id", absl::StrCat(id, " is outside the vocabulary"));
    }
  }
  return config;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  std::string path = model_dir + "/config.json";
  MOED_ASSIGN_OR_RETURN(std::string text, util::ReadFile(path));
  return ParseModelConfig(text, path);
}

}  // namespace moed::model
