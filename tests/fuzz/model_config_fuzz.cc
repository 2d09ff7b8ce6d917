// libFuzzer target: config.json of a checkpoint, as read from an untrusted directory.
#include <cstddef>
#include <cstdint>

#include "model/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<moed::model::ModelConfig> config =
      moed::model::ParseModelConfig(text, "fuzz.json");
  if (config.ok()) {
    // Whatever parses must describe a usable shape.
    if (config->head_dim <= 0 || config->num_experts < config->experts_per_token ||
        config->num_attention_heads % config->num_key_value_heads != 0) {
      __builtin_trap();
    }
    // DeepSeek: the routing the router kernels assume, and a rope slice they can pair.
    const int64_t group_size = config->num_experts / config->n_group;
    if (config->n_group <= 0 || config->num_experts % config->n_group != 0 ||
        config->topk_group > config->n_group ||
        config->experts_per_token > config->topk_group * group_size ||
        config->moe_layer_freq <= 0 || config->KvFloatsPerTokenLayer() <= 0) {
      __builtin_trap();
    }
    if (config->uses_mla() && (config->mla.rope_dim % 2 != 0 || config->mla.value_dim <= 0 ||
                               config->head_dim != config->mla.q_head_dim())) {
      __builtin_trap();
    }
    if (config->yarn.has_value() && !(config->yarn->factor > 0)) __builtin_trap();
    (void)config->NumMoeLayers();
  }
  return 0;
}
