#include "cache/replay.h"

#include <catch2/catch.hpp>

namespace moed::cache {
namespace {

RoutingTrace OneLayer(const std::vector<int>& experts) {
  RoutingTrace t;
  t.num_layers = 1;
  t.num_experts = 8;
  t.top_k = 1;
  for (int e : experts) t.tokens.push_back({std::vector<int>{e}});
  return t;
}

TEST_CASE("replay counts hits like a hand simulation") {
  // 2 slots; sequence a b c a b c: LRU always evicts what comes next (0 hits); Belady keeps
  // one of the pair it will see soonest: misses a b c, hit a, miss b (evict a), hit c... = 2 hits.
  RoutingTrace t = OneLayer({0, 1, 2, 0, 1, 2});
  ReplayBudget two{2, 0};
  CHECK(Replay({t}, two, PolicyKind::kLru)->hits == 0);
  ReplayResult belady = *Replay({t}, two, std::nullopt);
  CHECK(belady.requests == 6);
  CHECK(belady.hits == 2);
  // Enough room: only the three cold misses.
  CHECK(Replay({t}, ReplayBudget{0, 3}, PolicyKind::kLfu)->hits == 3);
}

TEST_CASE("Belady is never beaten, and null records are skipped") {
  RoutingTrace t = OneLayer({0, 3, 0, 5, 3, 0, 7, 5, 0, 3, 3, 1, 0});
  t.tokens[4][0] = std::nullopt;
  for (int slots : {1, 2, 3}) {
    uint64_t best = Replay({t}, ReplayBudget{slots, 0}, std::nullopt)->hits;
    for (PolicyKind p :
         {PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kScored, PolicyKind::kSweep}) {
      ReplayResult r = *Replay({t}, ReplayBudget{slots, 0}, p);
      CHECK(r.requests == 12);
      CHECK(r.hits <= best);
    }
  }
}

// Two layers, one expert per token each, a shared budget of 2 slots. Layer 0 always uses
// expert 0; layer 1 alternates 1, 2, 1, 2 ...
RoutingTrace TwoLayers(int tokens) {
  RoutingTrace t;
  t.num_layers = 2;
  t.num_experts = 4;
  t.top_k = 1;
  for (int i = 0; i < tokens; ++i)
    t.tokens.push_back({std::vector<int>{0}, std::vector<int>{1 + i % 2}});
  return t;
}

TEST_CASE("the sweep policy keeps the expert the next layer needs soonest") {
  // Requests: (0,0) (1,1) (0,0) (1,2) (0,0) (1,1) ... With 2 shared slots, LRU evicts (0,0)
  // when (1,2) arrives after (1,1)? No: LRU evicts the least recent, (1,1), keeping (0,0) and
  // hitting it every token; the alternating layer-1 experts always miss. The sweep policy
  // does the same from what it knows: (0,0), used at every turn of its layer, is expected
  // back next, while the layer-1 expert just used (p = 1/2) waits a sweep or more.
  const RoutingTrace t = TwoLayers(20);
  const ReplayBudget shared{0, 2};
  const ReplayResult sweep = *Replay({t}, shared, PolicyKind::kSweep);
  CHECK(sweep.requests == 40);
  CHECK(sweep.hits == 19);  // (0,0) from the second token on
  CHECK(sweep.hits <= Replay({t}, shared, std::nullopt)->hits);
}

TEST_CASE("prefetch in a replay turns predicted misses into hits") {
  // With one slot per layer and layer 1 alternating 1, 2, 1, 2: every layer-1 request misses
  // without prefetch. The history predictor proposes the last two choices at layer 1; with 1
  // candidate it proposes the last choice (a miss every time), and the replay counts what the
  // prefetch brought in only when it is used.
  const RoutingTrace t = TwoLayers(20);
  const ReplayBudget per_layer{1, 0};
  CHECK(Replay({t}, per_layer, PolicyKind::kLru)->hits == 19);
  // A perfect hint source for layer 1: affinity calibrated on the trace itself cannot tell 1
  // from 2 (both follow expert 0 equally often), so it proposes the lower id, 1: half the
  // layer-1 requests now hit.
  ReplayPrefetch prefetch;
  prefetch.kind = PredictorKind::kAffinity;
  prefetch.candidates = 1;
  const std::vector<RoutingTrace> calibration = {t};
  prefetch.calibration = &calibration;
  const ReplayResult with = *Replay({t}, per_layer, PolicyKind::kLru, &prefetch);
  CHECK(with.requests == 40);
  CHECK(with.hits == 19 + 10);
  // Off is the same as no prefetch.
  prefetch.kind = PredictorKind::kOff;
  CHECK(Replay({t}, per_layer, PolicyKind::kLru, &prefetch)->hits == 19);
}

}  // namespace
}  // namespace moed::cache
