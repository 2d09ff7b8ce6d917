// Routing traces: per token, per layer, the experts chosen (top-1 first). One JSON object per
// line and sequence, in the format of ../shared/traces (which real Mixtral traces use too):
//   {"model", "num_layers", "num_experts", "top_k", "num_prefill_tokens", "num_decode_tokens",
//    "tokens": [[[e, e], ... per layer], ... per token]}   (null where a record is missing)
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace moed::cache {

struct RoutingTrace {
  std::string model;
  std::string task;
  int num_layers = 0;
  int num_experts = 0;
  int top_k = 0;
  int num_prefill_tokens = 0;
  // tokens[t][l]: experts of token t at layer l; nullopt where not recorded (or a dense layer).
  std::vector<std::vector<std::optional<std::vector<int>>>> tokens;
};

// Reads every line of a .jsonl trace file; errors name the file and the line.
absl::StatusOr<std::vector<RoutingTrace>> ReadRoutingTraces(const std::string& path);
// Appends one line.
absl::Status AppendRoutingTrace(const std::string& path, const RoutingTrace& trace);
// From the model's routing (routing[layer][token]) of one sequence.
RoutingTrace TraceFromRouting(const std::vector<std::vector<std::vector<int>>>& routing,
                              int num_experts, int top_k, int num_prefill_tokens,
                              const std::string& model);

}  // namespace moed::cache
