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
    (void)config->NumMoeLayers();
  }
  return 0;
}
