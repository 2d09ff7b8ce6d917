// Offline replay of routing traces through the cache's eviction policies, next to Belady's
// optimal (evict what is needed furthest in the future) for the same trace and budget.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/eviction_policy.h"
#include "cache/prefetcher.h"
#include "cache/routing_trace.h"

namespace moed::cache {

struct ReplayBudget {
  // per_layer > 0: every layer has its own `per_layer` slots. Otherwise `shared` slots serve
  // all layers, as the engine's cache does.
  int per_layer = 0;
  int shared = 0;
};

struct ReplayResult {
  uint64_t requests = 0;
  uint64_t hits = 0;
  // Experts read from the store: every miss, and every expert a prefetch brought in.
  uint64_t reads = 0;
  double reads_per_request() const {
    return requests == 0 ? 0 : static_cast<double>(reads) / static_cast<double>(requests);
  }
  double hit_rate() const {
    return requests == 0 ? 0 : static_cast<double>(hits) / static_cast<double>(requests);
  }
};

// Prefetch during a replay: after each (token, layer) is served, the predictor's top
// `candidates` experts for the next `depth` layers of that token are made resident (never
// evicting what that (token, layer) uses or what a hint names), and their predictions are
// handed to the policy.
struct ReplayPrefetch {
  PredictorKind kind = PredictorKind::kOff;
  int depth = 1;
  int candidates = 0;  // per token and layer; 0: the trace's top_k
  // The affinity counts' source; null: each sequence uses counts from the other sequences.
  const std::vector<RoutingTrace>* calibration = nullptr;
};

// Each sequence starts with an empty cache; the experts of one (token, layer) are pinned
// while it is served, as in the engine. `policy` nullopt means Belady's optimum (without
// prefetch it is the best any policy can do).
absl::StatusOr<ReplayResult> Replay(const std::vector<RoutingTrace>& traces,
                                    const ReplayBudget& budget, std::optional<PolicyKind> policy,
                                    const ReplayPrefetch* prefetch = nullptr);

// Each predictor's recall and precision on `traces` (see EvaluateOnTraces). The affinity
// counts (affinity, combined) come from `calibration` when it is given; otherwise each sequence
// is evaluated with counts from all the others (leave-one-out), and the results are pooled.
// Online state (history, combined's weights) starts afresh for each evaluation.
absl::StatusOr<std::vector<PrefetchEvalResult>> EvaluatePrefetch(
    PredictorKind kind, const std::vector<RoutingTrace>& traces,
    const std::vector<RoutingTrace>* calibration, const std::vector<int>& depths,
    const std::vector<int>& candidates);

}  // namespace moed::cache
