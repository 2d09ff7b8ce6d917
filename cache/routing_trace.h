// Routing traces: per token, per layer, the experts chosen (top-1 first). One JSON object per
// line and sequence, in the format of ../shared/traces (which real Mixtral traces use too):
//   {"model", "num_layers", "num_experts", "top_k", "num_prefill_tokens", "num_decode_tokens",
//    "tokens": [[[e, e], ... per layer], ... per token]}   (null where a record is missing)
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "model/model.h"

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
  // weights[t][l]: the gate weights of tokens[t][l], same order; empty when the file has none.
  std::vector<std::vector<std::vector<float>>> weights;
};

// Reads every line of a .jsonl trace file; errors name the file and the line. Fields other
// than the shape, "tokens" and "weights" (num_prefill_tokens, alignment, notes, ...) are
// optional and read leniently.
absl::StatusOr<std::vector<RoutingTrace>> ReadRoutingTraces(const std::string& path);
// The same from the file's text; `source` names it in errors.
absl::StatusOr<std::vector<RoutingTrace>> ParseRoutingTraces(absl::string_view text,
                                                             absl::string_view source);
// Appends one line.
absl::Status AppendRoutingTrace(const std::string& path, const RoutingTrace& trace);
// From the model's routing (routing[layer][token]) of one sequence.
RoutingTrace TraceFromRouting(const std::vector<std::vector<std::vector<int>>>& routing,
                              int num_experts, int top_k, int num_prefill_tokens,
                              const std::string& model);

// Trace-driven routing: each sequence the model runs takes the next of `traces` in turn
// (position 0 starts a sequence), and its token at position p routes as the trace's token
// p mod its length did, with the trace's gate weights (1/top_k each when it has none). Where
// the trace has no record, the router decides.
class TraceRouting final : public model::RoutingOverride {
 public:
  // The traces must match the model: its layers, experts and experts per token.
  static absl::StatusOr<std::shared_ptr<TraceRouting>> Create(std::vector<RoutingTrace> traces,
                                                              const model::ModelConfig& config);
  static absl::StatusOr<std::shared_ptr<TraceRouting>> FromFile(const std::string& path,
                                                                const model::ModelConfig& config);
  bool Route(const model::TokenRef& token, int layer, absl::Span<int32_t> experts,
             absl::Span<float> weights) override;

 private:
  TraceRouting(std::vector<RoutingTrace> traces, int first_moe_layer)
      : traces_(std::move(traces)), first_moe_layer_(first_moe_layer) {}
  std::vector<RoutingTrace> traces_;
  int first_moe_layer_;  // where a sequence's first token is first routed
  absl::flat_hash_map<uint64_t, size_t> trace_of_;  // sequence → index into traces_
  size_t next_ = 0;
};

}  // namespace moed::cache
