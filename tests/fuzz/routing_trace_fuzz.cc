// libFuzzer target: a routing trace (.jsonl), as --routing-trace and --prefetch-calibration
// read it. The oracle: a file that parses has every expert id within its trace's experts and
// every weight list matching its experts; one that also fits the tiny Mixtral's shape routes
// every token of every layer without leaving the model's experts, and calibrates the affinity
// predictor.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cache/prefetcher.h"
#include "cache/routing_trace.h"
#include "model/model_config.h"
#include "tests/fuzz/tiny_mixtral_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const moed::model::ModelConfig config =
      *moed::model::ParseModelConfig(moed::fuzz::kTinyMixtralConfig, "fuzz");
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto traces = moed::cache::ParseRoutingTraces(text, "fuzz.jsonl");
  if (!traces.ok()) return 0;
  for (const auto& trace : *traces) {
    if (!trace.weights.empty() && trace.weights.size() != trace.tokens.size()) __builtin_trap();
    for (size_t t = 0; t < trace.tokens.size(); ++t) {
      if (static_cast<int>(trace.tokens[t].size()) != trace.num_layers) __builtin_trap();
      for (size_t l = 0; l < trace.tokens[t].size(); ++l) {
        const auto& experts = trace.tokens[t][l];
        if (!experts.has_value()) continue;
        for (int e : *experts) {
          if (e < 0 || e >= trace.num_experts) __builtin_trap();
        }
        if (!trace.weights.empty() && !trace.weights[t][l].empty() &&
            trace.weights[t][l].size() != experts->size()) {
          __builtin_trap();
        }
      }
    }
  }
  auto routing = moed::cache::TraceRouting::Create(*traces, config);
  if (!routing.ok()) return 0;
  // The model's shape: calibrating on it must succeed.
  if (!moed::cache::AffinityTable::FromTraces(*traces, 2).ok()) __builtin_trap();
  std::vector<int32_t> experts(2);
  std::vector<float> weights(2);
  for (int64_t position = 0; position < 8; ++position) {
    for (int layer = 0; layer < 2; ++layer) {
      if ((*routing)->Route({1, position}, layer, absl::MakeSpan(experts),
                            absl::MakeSpan(weights))) {
        for (int32_t e : experts) {
          if (e < 0 || e >= 8) __builtin_trap();
        }
      }
    }
  }
  return 0;
}
