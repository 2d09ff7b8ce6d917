// Trace-driven replay of batch formation: many requests made of windows of real routing
// traces run through the scheduler's step-selection rule and a simulated expert tier, counting
// the experts staged per generated token with round-robin (FIFO) and with expert-aware
// formation. It measures formation on real routing locality, which synthetic checkpoints
// (random weights) do not have.
#pragma once

#include <cstdint>
#include <vector>

#include "cache/eviction_policy.h"
#include "cache/replay.h"
#include "cache/routing_trace.h"

namespace moed::tools {

struct BatchingReplayOptions {
  int window = 24;          // decode tokens per request, cut from the traces in order
  int max_running = 16;     // requests admitted at once
  int max_batch = 4;        // sequences per step
  int max_delay_steps = 4;  // the scheduler's bound on delay beyond round-robin
  bool expert_aware = true;
  // Expert-aware with the experts each sequence's next token really uses instead of the
  // previous token's: the bound no prediction can beat.
  bool oracle = false;
  cache::ReplayBudget budget;  // per_layer > 0: each layer's share, else one shared pool
  cache::PolicyKind policy = cache::PolicyKind::kLru;
};

struct BatchingReplayResult {
  uint64_t requests = 0;
  uint64_t tokens = 0;
  uint64_t steps = 0;
  uint64_t expert_uses = 0;  // (step, layer, expert) needed by a step
  uint64_t staged = 0;       // of those, not resident: read into the tier
  double staged_per_token() const {
    return tokens == 0 ? 0 : static_cast<double>(staged) / static_cast<double>(tokens);
  }
  double hit_rate() const {
    return expert_uses == 0 ? 0
                            : 1.0 - static_cast<double>(staged) / static_cast<double>(expert_uses);
  }
};

BatchingReplayResult ReplayBatching(const std::vector<cache::RoutingTrace>& traces,
                                    const BatchingReplayOptions& options);

}  // namespace moed::tools
