#include "tools/replay/batching_replay.h"

#include <catch2/catch.hpp>

namespace moed::tools {
namespace {

// `requests` sequences of `tokens` tokens over `layers` layers; sequence r always routes to
// expert r % experts (top-1) in every layer.
std::vector<cache::RoutingTrace> FixedExpertTraces(int requests, int tokens, int layers,
                                                   int experts) {
  std::vector<cache::RoutingTrace> traces;
  for (int r = 0; r < requests; ++r) {
    cache::RoutingTrace t;
    t.num_layers = layers;
    t.num_experts = experts;
    t.top_k = 1;
    t.tokens.assign(static_cast<size_t>(tokens),
                    std::vector<std::optional<std::vector<int>>>(static_cast<size_t>(layers),
                                                                 std::vector<int>{r % experts}));
    traces.push_back(std::move(t));
  }
  return traces;
}

BatchingReplayOptions Options(int window, int max_running, int max_batch, int per_layer) {
  BatchingReplayOptions o;
  o.window = window;
  o.max_running = max_running;
  o.max_batch = max_batch;
  o.budget = {per_layer, 0};
  return o;
}

TEST_CASE("every token is generated once, whichever formation") {
  auto traces = FixedExpertTraces(6, 10, 3, 8);
  BatchingReplayOptions o = Options(4, 5, 2, 2);  // 10 tokens: windows of 4, 4 and 2
  for (bool aware : {false, true}) {
    o.expert_aware = aware;
    BatchingReplayResult r = ReplayBatching(traces, o);
    CHECK(r.requests == 18);
    CHECK(r.tokens == 60);
    CHECK(r.steps >= 30);  // at most 2 tokens a step
    CHECK(r.staged <= r.expert_uses);
  }
}

TEST_CASE("when every expert fits, each is staged once") {
  auto traces = FixedExpertTraces(8, 12, 4, 8);
  BatchingReplayResult r = ReplayBatching(traces, Options(12, 8, 2, 8));
  CHECK(r.staged == uint64_t{32});  // 8 experts x 4 layers
}

TEST_CASE("expert-aware formation stages fewer experts than round-robin under locality") {
  // Eight sequences with one expert each, two per step, two slots per layer: round-robin
  // steps (0,1), (2,3), (4,5), (6,7), ... and never finds its experts resident; expert-aware
  // keeps stepping the resident pair until the delay bound makes it take the others.
  auto traces = FixedExpertTraces(8, 20, 4, 8);
  BatchingReplayOptions o = Options(20, 8, 2, 2);
  o.expert_aware = false;
  BatchingReplayResult fifo = ReplayBatching(traces, o);
  o.expert_aware = true;
  BatchingReplayResult aware = ReplayBatching(traces, o);
  CHECK(fifo.tokens == aware.tokens);
  CHECK(fifo.hit_rate() == 0.0);
  CHECK(fifo.staged == fifo.expert_uses);
  CHECK(aware.staged * 4 < fifo.staged * 3);
}

}  // namespace
}  // namespace moed::tools
