// The precision policy's decisions and the device budget's split, against values worked out
// by hand from the rules in the header.
#include "cache/precision_policy.h"

#include <catch2/catch.hpp>

#include "cache/expert_cache.h"

namespace moed::cache {
namespace {

using model::Precision;

TEST_CASE("precision policy names parse and print") {
  for (const char* name : {"exact", "threshold", "always"}) {
    auto kind = ParsePrecisionPolicyKind(name);
    REQUIRE(kind.ok());
    CHECK(PrecisionPolicyName(*kind) == name);
  }
  auto bad = ParsePrecisionPolicyKind("sometimes");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().message().find("exact, threshold or always") != std::string::npos);
}

TEST_CASE("precision policy options are checked against each other") {
  PrecisionPolicyOptions options;
  CHECK(ValidatePrecisionPolicy(options).ok());
  options.fallback = Precision::kSource;
  CHECK_FALSE(ValidatePrecisionPolicy(options).ok());
  options.fallback = Precision::kInt8;
  options.threshold = 1.5;
  CHECK_FALSE(ValidatePrecisionPolicy(options).ok());
  options.threshold = 0.5;
  options.min_rank = -1;
  CHECK_FALSE(ValidatePrecisionPolicy(options).ok());
  options.min_rank = 1;
  options.low_bit_floor = true;  // with exact: nothing would ever use it
  CHECK_FALSE(ValidatePrecisionPolicy(options).ok());
  options.kind = PrecisionPolicyKind::kAlways;
  CHECK(ValidatePrecisionPolicy(options).ok());
}

TEST_CASE("exact never falls back, whatever the request accepts") {
  PrecisionPolicy policy({});
  CHECK_FALSE(policy.falls_back());
  CHECK_FALSE(policy.MayFallBack({{0.01f, 7, Precision::kInt4}}));
}

TEST_CASE("always falls back on every miss the requests accept") {
  PrecisionPolicyOptions options;
  options.kind = PrecisionPolicyKind::kAlways;
  options.fallback = Precision::kInt4;
  PrecisionPolicy int4(options);
  CHECK(int4.MayFallBack({{0.9f, 0, Precision::kInt4}}));
  // A request that accepts int8 only, or only the full copy, keeps the expert exact for all.
  CHECK_FALSE(int4.MayFallBack({{0.9f, 0, Precision::kInt8}}));
  CHECK_FALSE(int4.MayFallBack({{0.1f, 1, Precision::kInt4}, {0.2f, 1, Precision::kSource}}));
  CHECK_FALSE(int4.MayFallBack({}));  // nobody routed to it
  options.fallback = Precision::kInt8;
  PrecisionPolicy int8(options);
  CHECK(int8.MayFallBack({{0.9f, 0, Precision::kInt8}, {0.5f, 1, Precision::kInt4}}));
  CHECK_FALSE(int8.MayFallBack({{0.9f, 0, Precision::kSource}}));
}

TEST_CASE("threshold falls back when every token is below tau or at rank r or later") {
  PrecisionPolicyOptions options;
  options.kind = PrecisionPolicyKind::kThreshold;
  options.fallback = Precision::kInt4;
  options.threshold = 0.2;
  options.min_rank = 2;
  PrecisionPolicy policy(options);
  CHECK(policy.MayFallBack({{0.19f, 0, Precision::kInt4}}));
  CHECK_FALSE(policy.MayFallBack({{0.2f, 0, Precision::kInt4}}));  // not below τ
  CHECK_FALSE(policy.MayFallBack({{0.5f, 1, Precision::kInt4}}));
  CHECK(policy.MayFallBack({{0.5f, 2, Precision::kInt4}}));  // rank r
  // One token that needs the full copy makes it wait for the full copy.
  CHECK_FALSE(policy.MayFallBack({{0.05f, 1, Precision::kInt4}, {0.6f, 0, Precision::kInt4}}));
  CHECK(policy.MayFallBack({{0.05f, 0, Precision::kInt4}, {0.6f, 3, Precision::kInt4}}));
  // τ = 0 and r past every rank: the same as exact.
  options.threshold = 0;
  options.min_rank = 64;
  PrecisionPolicy never(options);
  CHECK_FALSE(never.MayFallBack({{0.0f, 7, Precision::kInt4}}));
}

TEST_CASE("the device budget splits into full and fallback slots") {
  PrecisionPolicyOptions exact;
  // 100 experts of 40 bytes (full) and 10 bytes (fallback).
  auto split = SplitDeviceBudget(1000, 40, 10, 100, exact);
  REQUIRE(split.ok());
  CHECK(split->full_slots == 25);
  CHECK(split->fallback_slots == 0);

  PrecisionPolicyOptions always;
  always.kind = PrecisionPolicyKind::kAlways;
  // Without the floor: as many fallback slots as full ones (1000 / 50 = 20 each).
  split = SplitDeviceBudget(1000, 40, 10, 100, always);
  REQUIRE(split.ok());
  CHECK(split->full_slots == 20);
  CHECK(split->fallback_slots == 20);
  // Leftover bytes go to full slots: 1030 → 20 + 20, 30 left, not a full slot; 1040 → 21.
  split = SplitDeviceBudget(1040, 40, 10, 100, always);
  REQUIRE(split.ok());
  CHECK(split->full_slots == 21);
  CHECK(split->fallback_slots == 20);

  PrecisionPolicyOptions floor = always;
  floor.low_bit_floor = true;
  // The floor takes what every expert's fallback copy needs (1000 bytes), the rest is full.
  split = SplitDeviceBudget(2000, 40, 10, 100, floor);
  REQUIRE(split.ok());
  CHECK(split->fallback_slots == 100);
  CHECK(split->full_slots == 25);
  // A budget too small for the whole floor keeps two full slots: (500 - 80) / 10 = 42.
  split = SplitDeviceBudget(500, 40, 10, 100, floor);
  REQUIRE(split.ok());
  CHECK(split->fallback_slots == 42);
  CHECK(split->full_slots == 2);

  // Room for every full copy: no fallback pool.
  split = SplitDeviceBudget(4000, 40, 10, 100, floor);
  REQUIRE(split.ok());
  CHECK(split->full_slots == 100);
  CHECK(split->fallback_slots == 0);

  auto small = SplitDeviceBudget(99, 40, 10, 100, always);
  REQUIRE_FALSE(small.ok());
  CHECK(small.status().message().find("minimum of 100 bytes") != std::string::npos);
}

}  // namespace
}  // namespace moed::cache
