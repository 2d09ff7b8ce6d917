// The prefetch predictors on the real Mixtral-8x7B routing of ../shared/traces: the affinity
// predictor, calibrated on two sequences and evaluated on the third (pooled over the three
// choices), against a count table computed here from the raw JSON; and combined at least as
// good as its best source.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "cache/replay.h"
#include "nlohmann/json.hpp"

namespace moed::cache {
namespace {

std::string TracePath() {
  const char* shared = std::getenv("MOED_SHARED_DIR");
  REQUIRE(shared != nullptr);
  return std::string(shared) + "/traces/mixtral-8x7b/traces.jsonl";
}

// tokens[t][l]: the experts, empty where null.
using RawSequence = std::vector<std::vector<std::vector<int>>>;

std::vector<RawSequence> ReadRaw(const std::string& path) {
  std::vector<RawSequence> sequences;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line);
    RawSequence sequence;
    for (const auto& token : j["tokens"]) {
      std::vector<std::vector<int>> layers;
      for (const auto& entry : token)
        layers.push_back(entry.is_null() ? std::vector<int>{} : entry.get<std::vector<int>>());
      sequence.push_back(layers);
    }
    sequences.push_back(sequence);
  }
  return sequences;
}

struct Tally {
  uint64_t hits = 0, chosen = 0;
};

// Leave-one-out affinity recall, counted directly: counts[l][e][f] over the other sequences,
// proposals the c highest sums (ties to the lower id).
Tally AffinityByHand(const std::vector<RawSequence>& sequences, int depth, int candidates) {
  constexpr int kLayers = 32, kExperts = 8;
  Tally tally;
  for (size_t held_out = 0; held_out < sequences.size(); ++held_out) {
    std::vector<std::vector<std::vector<uint64_t>>> counts(
        kLayers, std::vector<std::vector<uint64_t>>(kExperts, std::vector<uint64_t>(kExperts)));
    for (size_t s = 0; s < sequences.size(); ++s) {
      if (s == held_out) continue;
      for (const auto& token : sequences[s]) {
        for (int l = 0; l + depth < kLayers; ++l) {
          for (int e : token[l]) {
            for (int f : token[l + depth]) ++counts[l][e][f];
          }
        }
      }
    }
    for (const auto& token : sequences[held_out]) {
      for (int l = 0; l + depth < kLayers; ++l) {
        if (token[l].empty() || token[l + depth].empty()) continue;
        std::vector<std::pair<uint64_t, int>> ranked;
        for (int f = 0; f < kExperts; ++f) {
          uint64_t sum = 0;
          for (int e : token[l]) sum += counts[l][e][f];
          ranked.push_back({sum, f});
        }
        std::stable_sort(ranked.begin(), ranked.end(),
                         [](const auto& a, const auto& b) { return a.first > b.first; });
        for (int f : token[l + depth]) {
          for (int i = 0; i < candidates; ++i) tally.hits += ranked[i].second == f ? 1 : 0;
        }
        tally.chosen += token[l + depth].size();
      }
    }
  }
  return tally;
}

TEST_CASE("affinity on the shared Mixtral traces, leave-one-out, equals counting by hand") {
  auto traces = ReadRoutingTraces(TracePath());
  REQUIRE(traces.ok());
  REQUIRE(traces->size() == 3);
  const std::vector<RawSequence> raw = ReadRaw(TracePath());
  auto results = EvaluatePrefetch(PredictorKind::kAffinity, *traces, nullptr, {1, 2, 3}, {1, 2, 4});
  REQUIRE(results.ok());
  REQUIRE(results->size() == 9);
  for (const PrefetchEvalResult& r : *results) {
    INFO("depth " << r.depth << ", " << r.candidates << " candidates");
    const Tally expected = AffinityByHand(raw, r.depth, r.candidates);
    CHECK(r.hits == expected.hits);
    CHECK(r.chosen == expected.chosen);
    if (r.depth == 1 && r.candidates == 2) CHECK(r.recall() == Approx(0.33).margin(0.01));
    if (r.depth == 1 && r.candidates == 4) CHECK(r.recall() == Approx(0.58).margin(0.01));
  }
}

TEST_CASE("combined is at least as good as its best source on the shared Mixtral traces") {
  auto traces = ReadRoutingTraces(TracePath());
  REQUIRE(traces.ok());
  std::map<PredictorKind, std::vector<PrefetchEvalResult>> by_kind;
  for (PredictorKind kind :
       {PredictorKind::kAffinity, PredictorKind::kHistory, PredictorKind::kCombined}) {
    auto results = EvaluatePrefetch(kind, *traces, nullptr, {1, 2, 3}, {1, 2, 4});
    REQUIRE(results.ok());
    by_kind[kind] = *std::move(results);
  }
  for (size_t i = 0; i < by_kind[PredictorKind::kCombined].size(); ++i) {
    const PrefetchEvalResult& combined = by_kind[PredictorKind::kCombined][i];
    INFO("depth " << combined.depth << ", " << combined.candidates << " candidates");
    const double best = std::max(by_kind[PredictorKind::kAffinity][i].recall(),
                                 by_kind[PredictorKind::kHistory][i].recall());
    CHECK(combined.recall() >= best);
    // Both are better than guessing (c of 8 experts).
    CHECK(by_kind[PredictorKind::kAffinity][i].recall() > combined.candidates / 8.0);
  }
}

}  // namespace
}  // namespace moed::cache
