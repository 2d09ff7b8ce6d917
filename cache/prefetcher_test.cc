// The prefetch predictors against hand-worked cases, the recall/precision definitions against
// hand counts, and the Prefetcher's hints and per-layer scoring.
#include "cache/prefetcher.h"

#include <catch2/catch.hpp>
#include <set>

#include "cache/replay.h"

namespace moed::cache {
namespace {

using Layers = std::vector<std::optional<std::vector<int>>>;

RoutingTrace MakeTrace(int layers, int experts, std::vector<Layers> tokens) {
  RoutingTrace trace;
  trace.num_layers = layers;
  trace.num_experts = experts;
  trace.top_k = 2;
  trace.tokens = std::move(tokens);
  return trace;
}

std::vector<double> ScoresOf(Predictor& predictor, const TokenAtLayer& token, int depth,
                             int experts) {
  std::vector<double> scores(static_cast<size_t>(experts));
  predictor.Score(token, depth, absl::MakeSpan(scores));
  return scores;
}

TEST_CASE("affinity counts each pair of a token's experts at layer l and at l + d") {
  // 3 layers, 4 experts. Token 0: {0,1} {2,3} {0,2}; token 1: {0,1} {2,0} null.
  auto trace = MakeTrace(3, 4,
                         {{std::vector{0, 1}, std::vector{2, 3}, std::vector{0, 2}},
                          {std::vector{0, 1}, std::vector{2, 0}, std::nullopt}});
  auto table = AffinityTable::FromTraces({trace}, 2);
  REQUIRE(table.ok());
  // depth 1, layer 0: token 0 gives 0→2, 0→3, 1→2, 1→3; token 1 gives 0→2, 0→0, 1→2, 1→0.
  CHECK(table->count(1, 0, 0, 2) == 2);
  CHECK(table->count(1, 0, 0, 3) == 1);
  CHECK(table->count(1, 0, 1, 0) == 1);
  CHECK(table->count(1, 0, 0, 1) == 0);
  // depth 1, layer 1: only token 0 (token 1's layer 2 is null).
  CHECK(table->count(1, 1, 2, 0) == 1);
  CHECK(table->count(1, 1, 3, 2) == 1);
  CHECK(table->count(1, 1, 0, 0) == 0);
  // depth 2, layer 0: only token 0: {0,1} → {0,2}.
  CHECK(table->count(2, 0, 1, 2) == 1);
  CHECK(table->count(2, 0, 0, 0) == 1);

  auto predictor = MakePredictor(PredictorKind::kAffinity, 3, 4,
                                 std::make_shared<const AffinityTable>(*std::move(table)));
  REQUIRE(predictor.ok());
  const std::vector<int> chosen = {0, 1};
  TokenAtLayer at{{1, 5}, 0, chosen, {}};
  // Scores for layer 1 from {0,1}: e0: 0→0 + 1→0 = 2, e1: 0, e2: 2+2, e3: 1+1; e0 and e3 tie
  // and the lower id goes first.
  CHECK(ScoresOf(**predictor, at, 1, 4) == std::vector<double>{2, 0, 4, 2});
  CHECK(TopExperts(ScoresOf(**predictor, at, 1, 4), 2) == std::vector<int>{2, 0});
  // Past the last layer: nothing known.
  at.layer = 2;
  CHECK(ScoresOf(**predictor, at, 1, 4) == std::vector<double>{0, 0, 0, 0});
}

TEST_CASE("affinity needs a calibration of the model's shape") {
  CHECK_FALSE(MakePredictor(PredictorKind::kAffinity, 3, 4, nullptr).ok());
  auto table = std::make_shared<const AffinityTable>(3, 8, 1);
  CHECK_FALSE(MakePredictor(PredictorKind::kAffinity, 3, 4, table).ok());
  CHECK_FALSE(AffinityTable::FromTraces({}, 1).ok());
  CHECK_FALSE(ParsePredictorKind("oracle").ok());
  CHECK(*ParsePredictorKind("combined") == PredictorKind::kCombined);
}

TEST_CASE("TopExperts breaks ties toward the lower id") {
  CHECK(TopExperts(std::vector<double>{1, 3, 3, 0, 3}, 2) == std::vector<int>{1, 2});
  CHECK(TopExperts(std::vector<double>{0, 0, 0}, 2) == std::vector<int>{0, 1});
  CHECK(TopExperts(std::vector<double>{5, 1}, 4) == std::vector<int>{0, 1});
}

TEST_CASE("history ranks the sequence's last choice first and forgets a reused sequence key") {
  auto predictor = MakePredictor(PredictorKind::kHistory, 2, 4, nullptr);
  REQUIRE(predictor.ok());
  Predictor& history = **predictor;
  const std::vector<int> a = {0, 1}, b = {2, 3}, c = {1, 2};
  // Sequence 7, position 0: layer 1 chooses {2, 3}.
  history.Observe({{7, 0}, 0, a, {}});
  history.Observe({{7, 0}, 1, b, {}});
  // Position 1, from layer 0: the sequence's last choice at layer 1 leads.
  auto scores = ScoresOf(history, {{7, 1}, 0, a, {}}, 1, 4);
  CHECK(TopExperts(scores, 2) == std::vector<int>{2, 3});
  CHECK(scores[0] == 0);
  // Another sequence chose {1, 2} at layer 1 since: sequence 7 still ranks its own first.
  history.Observe({{9, 0}, 1, c, {}});
  CHECK(TopExperts(ScoresOf(history, {{7, 1}, 0, a, {}}, 1, 4), 1) == std::vector<int>{2});
  // A new sequence under key 7 (position 0 again): only the global counts remain, in which
  // expert 2 was chosen twice.
  scores = ScoresOf(history, {{7, 0}, 0, a, {}}, 1, 4);
  CHECK(TopExperts(scores, 1) == std::vector<int>{2});
  CHECK(scores[2] < 1.0);  // no "last choice" term
  // Nothing observed at layer 0: nothing to say about it (depth 0 is never asked; past the
  // end neither).
  CHECK(ScoresOf(history, {{7, 1}, 1, b, {}}, 1, 4) == std::vector<double>{0, 0, 0, 0});
}

TEST_CASE("gate proposes the later router's most probable experts") {
  auto predictor = MakePredictor(PredictorKind::kGate, 4, 4, nullptr);
  REQUIRE(predictor.ok());
  const std::vector<int> chosen = {0, 1};
  const std::vector<float> next = {0.1f, 0.6f, 0.05f, 0.25f}, after = {0.7f, 0.1f, 0.1f, 0.1f};
  TokenAtLayer at{{1, 0}, 0, chosen, {next, after}};
  CHECK(TopExperts(ScoresOf(**predictor, at, 1, 4), 2) == std::vector<int>{1, 3});
  CHECK(TopExperts(ScoresOf(**predictor, at, 2, 4), 1) == std::vector<int>{0});
  // Depth 3 was not computed: nothing known.
  CHECK(ScoresOf(**predictor, at, 3, 4) == std::vector<double>{0, 0, 0, 0});
}

TEST_CASE("recall and precision pool hits over every (token, layer) with both entries recorded") {
  // 2 layers, 4 experts. Layer 1 repeats: {2,3}, {2,3}, {0,1}; layer 0 of token 2 is null.
  auto trace = MakeTrace(2, 4,
                         {{std::vector{0, 1}, std::vector{2, 3}},
                          {std::vector{0, 1}, std::vector{2, 3}},
                          {std::nullopt, std::vector{0, 1}}});
  auto predictor = MakePredictor(PredictorKind::kHistory, 2, 4, nullptr);
  REQUIRE(predictor.ok());
  auto results = EvaluateOnTraces(**predictor, {trace}, {1}, {1, 2});
  REQUIRE(results.size() == 2);
  // Evaluated: token 0 (history empty: proposes 0 and 1, the lowest ids; no hit) and token 1
  // (proposes 2 and 3: 1 hit at c=1, 2 at c=2). Token 2 has no layer 0.
  CHECK(results[0].candidates == 1);
  CHECK(results[0].hits == 1);
  CHECK(results[0].chosen == 4);
  CHECK(results[0].proposed == 2);
  CHECK(results[1].hits == 2);
  CHECK(results[1].recall() == Approx(0.5));
  CHECK(results[1].precision() == Approx(0.5));
}

TEST_CASE("combined follows the source that has been right") {
  // Layer 1 always chooses {2, 3}; the calibration says layer 1 follows {0,1} with {0, 1}.
  const Layers token = {std::vector{0, 1}, std::vector{2, 3}};
  auto misleading = MakeTrace(2, 4, {{std::vector{0, 1}, std::vector{0, 1}}});
  auto table = AffinityTable::FromTraces({misleading}, 1);
  REQUIRE(table.ok());
  auto counts = std::make_shared<const AffinityTable>(*std::move(table));
  auto evaluate = [&](PredictorKind kind) {
    auto predictor = MakePredictor(kind, 2, 4, counts);
    REQUIRE(predictor.ok());
    return EvaluateOnTraces(**predictor, {MakeTrace(2, 4, std::vector<Layers>(50, token))}, {1},
                            {2})[0];
  };
  const PrefetchEvalResult affinity = evaluate(PredictorKind::kAffinity);
  const PrefetchEvalResult history = evaluate(PredictorKind::kHistory);
  const PrefetchEvalResult combined = evaluate(PredictorKind::kCombined);
  CHECK(affinity.hits == 0);
  CHECK(history.hits == 49 * 2);  // all but the first token
  CHECK(combined.recall() >= 0.9 * history.recall());
  CHECK(combined.recall() > affinity.recall());
}

TEST_CASE("the prefetcher hints the next layers by probability and scores its hints") {
  PrefetcherOptions options;
  options.kind = PredictorKind::kHistory;
  options.depth = 2;
  auto prefetcher = Prefetcher::Create(options, 3, 4, nullptr);
  REQUIRE(prefetcher.ok());
  CHECK((*prefetcher)->lookahead_layers() == 0);  // history needs no later routers
  auto route = [&](int layer, int64_t position, std::vector<std::vector<int>> chosen) {
    std::vector<model::TokenRef> tokens(chosen.size(), {1, position});
    model::LayerRouting routing;
    routing.layer = layer;
    routing.num_experts = 4;
    routing.top_k = 2;
    routing.chosen = &chosen;
    routing.tokens = tokens.data();
    return (*prefetcher)->Plan(routing);
  };
  // Step 0: nothing known yet, nothing hinted.
  CHECK(route(0, 0, {{0, 1}}).empty());
  route(1, 0, {{2, 3}});
  route(2, 0, {{1, 3}});
  // Step 1, layer 0: hints for layers 1 and 2, each the sequence's last choice there.
  std::vector<PrefetchHint> hints = route(0, 1, {{0, 1}});
  REQUIRE(hints.size() == 4);
  for (size_t i = 1; i < hints.size(); ++i) CHECK(hints[i - 1].probability >= hints[i].probability);
  std::set<std::pair<int, int>> hinted;
  for (const PrefetchHint& h : hints) hinted.emplace(h.layer, h.expert);
  CHECK(hinted == std::set<std::pair<int, int>>{{1, 2}, {1, 3}, {2, 1}, {2, 3}});
  // Layer 1 then chooses {2, 0}: of the 2 hinted, 1 was needed. Step 0 counts too: layer 1
  // was predicted (from layer 0) with nothing to go on, so its 2 experts were needed unhinted.
  route(1, 1, {{2, 0}});
  const LayerPrefetchStats layer1 = (*prefetcher)->layer_stats()[1];
  CHECK(layer1.hinted == 2);
  CHECK(layer1.needed == 4);
  CHECK(layer1.correct == 1);
  CHECK(layer1.recall() == Approx(0.25));
  CHECK(layer1.precision() == Approx(0.5));
  CHECK((*prefetcher)->layer_stats()[0].needed == 0);  // never predicted: not scored
}

TEST_CASE("gate and combined ask the engine for as many later routers as the depth") {
  PrefetcherOptions options;
  options.depth = 3;
  for (auto [kind, lookahead] :
       {std::pair{PredictorKind::kGate, 3}, std::pair{PredictorKind::kCombined, 3},
        std::pair{PredictorKind::kHistory, 0}}) {
    options.kind = kind;
    auto prefetcher = Prefetcher::Create(options, 4, 8, nullptr);
    REQUIRE(prefetcher.ok());
    CHECK((*prefetcher)->lookahead_layers() == lookahead);
  }
  options.kind = PredictorKind::kOff;
  CHECK_FALSE(Prefetcher::Create(options, 4, 8, nullptr).ok());
  options.kind = PredictorKind::kGate;
  options.depth = 9;
  CHECK_FALSE(Prefetcher::Create(options, 4, 8, nullptr).ok());
}

TEST_CASE("routing trace text: ids that do not fit an int and oversized tables are refused") {
  auto huge_id = ParseRoutingTraces(
      R"({"num_layers":1,"num_experts":2,"top_k":1,"tokens":[[[4294967297]]]})", "t.jsonl");
  REQUIRE_FALSE(huge_id.ok());
  CHECK(huge_id.status().message() == "t.jsonl:1: expert id out of range");
  auto huge_shape = ParseRoutingTraces(
      R"({"num_layers":4294967298,"num_experts":2,"top_k":1,"tokens":[]})", "t.jsonl");
  CHECK_FALSE(huge_shape.ok());
  auto parsed = ParseRoutingTraces(
      "{\"num_layers\":2,\"num_experts\":4096,\"top_k\":1,\"tokens\":[[[1],[2]]]}\r\n\n",
      "t.jsonl");
  REQUIRE(parsed.ok());
  REQUIRE(parsed->size() == 1);
  // 8 depths x 2 layers x 4096^2 counts: over the bound, refused before allocating.
  auto table = AffinityTable::FromTraces(*parsed, 8);
  REQUIRE_FALSE(table.ok());
  CHECK(table.status().message().find("over the 2^26 allowed") != std::string::npos);
}

}  // namespace
}  // namespace moed::cache
