// Each eviction policy's choice on small histories whose answer follows from the policy's
// definition: LRU the oldest use, LFU the fewest uses (ties to the older), scored the lowest
// mix of recency, decayed frequency and the prefetcher's prediction.
#include "cache/eviction_policy.h"

#include <catch2/catch.hpp>

namespace moed::cache {
namespace {

const ExpertKey A{0, 1}, B{0, 2}, C{1, 1}, D{1, 2};

TEST_CASE("LRU evicts the candidate used longest ago, whatever the order of candidates") {
  auto lru = MakePolicy(PolicyKind::kLru);
  lru->Touch(A, 1);
  lru->Touch(B, 2);
  lru->Touch(C, 3);
  lru->Touch(A, 4);
  CHECK(lru->Victim({A, B, C}) == B);
  CHECK(lru->Victim({C, A, B}) == B);
  CHECK(lru->Victim({A, C}) == C);
  // Evicted and loaded again: its history starts over.
  lru->Remove(B);
  lru->Touch(B, 5);
  CHECK(lru->Victim({A, B, C}) == C);
}

TEST_CASE(
    "LFU evicts the fewest uses, ties to the least recent, and keeps counts across "
    "evictions") {
  auto lfu = MakePolicy(PolicyKind::kLfu);
  for (uint64_t t : {1, 2, 3}) lfu->Touch(A, t);
  lfu->Touch(B, 4);
  lfu->Touch(C, 5);
  lfu->Touch(C, 6);
  CHECK(lfu->Victim({A, B, C}) == B);
  lfu->Touch(D, 10);  // one use each for B (tick 4) and D (tick 10): B is older
  CHECK(lfu->Victim({D, B}) == B);
  lfu->Remove(A);  // A's three uses still count when it comes back
  lfu->Touch(A, 11);
  CHECK(lfu->Victim({A, C}) == C);
}

TEST_CASE("the scored policy weighs recency, frequency and predictions") {
  SECTION("recency alone: the older use goes") {
    auto scored = MakePolicy(PolicyKind::kScored);
    scored->Touch(A, 1);
    scored->Touch(B, 100);
    CHECK(scored->Victim({A, B}) == A);
  }
  SECTION("a frequent expert outlasts a recent one-off") {
    auto scored = MakePolicy(PolicyKind::kScored);
    for (uint64_t t = 1; t <= 50; ++t) scored->Touch(A, t);
    scored->Touch(B, 60);
    // A: exp(-10/64) + 0.5 ln(1 + ~47.6) ~ 2.8; B: 1 + 0.5 ln 2 ~ 1.35.
    CHECK(scored->Victim({A, B}) == B);
  }
  SECTION("a predicted expert is kept over an equal one, until its use consumes the prediction") {
    auto scored = MakePolicy(PolicyKind::kScored);
    scored->Touch(A, 1);
    scored->Touch(B, 1);
    scored->Predict(A, 0.9);
    CHECK(scored->Victim({A, B}) == B);
    CHECK(scored->Victim({B, A}) == B);
    scored->Touch(A, 2);
    scored->Touch(B, 2);
    // Both used again at the same tick, the same number of times: no prediction is left, so
    // the first candidate of equal score is kept as the victim.
    CHECK(scored->Victim({A, B}) == A);
    CHECK(scored->Victim({B, A}) == B);
  }
}

TEST_CASE("sweep evicts the expert whose next use is furthest in the layer order") {
  auto sweep = MakePolicy(PolicyKind::kSweep, 4);
  const ExpertKey l0{0, 1}, l1{1, 1}, l2{2, 1};
  sweep->AtLayer(0);
  sweep->Touch(l0, 1);
  sweep->AtLayer(1);
  sweep->Touch(l1, 2);
  sweep->AtLayer(2);
  sweep->Touch(l2, 3);
  // At layer 2, each used at its layer's last turn (p = 1/2): expected waits d + 4 (1-p)/p are
  // 2 + 4 (layer 0), 3 + 4 (layer 1) and 4 + 4 (layer 2, just computed): layer 2's goes.
  CHECK(sweep->Victim({l0, l1, l2}) == l2);
  // Predicted at 0.9 for its next turn: 4 + 4 (0.1/0.9) = 4.4 < 7, so layer 1's goes.
  sweep->Predict(l2, 0.9);
  CHECK(sweep->Victim({l0, l1, l2}) == l1);
  // A turn of layer 1 passes without it: p = 1/4 for its next turn, a wait of 3 + 12 from
  // layer 2; layer 0's, used in this sweep, waits 2 + 4. The unused one goes.
  sweep->AtLayer(3);
  sweep->AtLayer(0);  // a new sweep
  sweep->Touch(l0, 4);
  sweep->AtLayer(1);  // layer 1 computes without l1
  sweep->AtLayer(2);
  CHECK(sweep->Victim({l0, l1}) == l1);
  CHECK(sweep->name() == "sweep");
  CHECK(*ParsePolicyKind("sweep") == PolicyKind::kSweep);
}

TEST_CASE("policy and scope names parse, and unknown names are refused, naming them") {
  CHECK(*ParsePolicyKind("lru") == PolicyKind::kLru);
  CHECK(*ParsePolicyKind("lfu") == PolicyKind::kLfu);
  CHECK(*ParsePolicyKind("scored") == PolicyKind::kScored);
  CHECK(MakePolicy(PolicyKind::kScored)->name() == "scored");
  absl::StatusOr<PolicyKind> bad = ParsePolicyKind("mru");
  REQUIRE_FALSE(bad.ok());
  CHECK(std::string(bad.status().message()).find("'mru'") != std::string::npos);
  CHECK(*ParseEvictionScope("layer") == EvictionScope::kLayer);
  CHECK(*ParseEvictionScope("global") == EvictionScope::kGlobal);
  CHECK_FALSE(ParseEvictionScope("tier").ok());
}

}  // namespace
}  // namespace moed::cache
