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
  CHECK(Replay({t}, two, PolicyKind::kLru).hits == 0);
  ReplayResult belady = Replay({t}, two, std::nullopt);
  CHECK(belady.requests == 6);
  CHECK(belady.hits == 2);
  // Enough room: only the three cold misses.
  CHECK(Replay({t}, ReplayBudget{0, 3}, PolicyKind::kLfu).hits == 3);
}

TEST_CASE("Belady is never beaten, and null records are skipped") {
  RoutingTrace t = OneLayer({0, 3, 0, 5, 3, 0, 7, 5, 0, 3, 3, 1, 0});
  t.tokens[4][0] = std::nullopt;
  for (int slots : {1, 2, 3}) {
    uint64_t best = Replay({t}, ReplayBudget{slots, 0}, std::nullopt).hits;
    for (PolicyKind p : {PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kScored}) {
      ReplayResult r = Replay({t}, ReplayBudget{slots, 0}, p);
      CHECK(r.requests == 12);
      CHECK(r.hits <= best);
    }
  }
}

}  // namespace
}  // namespace moed::cache
