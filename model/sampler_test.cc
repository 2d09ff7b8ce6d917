#include "model/sampler.h"

#include <catch2/catch.hpp>
#include <cmath>

namespace moed::model {
namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, 2.0f, 3.0f, -1.0f};  // 1 and 3 tie at the top

TEST_CASE("greedy takes the argmax, ties to the lower id") {
  SamplingParams p;
  p.temperature = 0;
  Sampler sampler(p, {}, 0);
  CHECK(sampler.Next(kLogits).token == 1);
  SamplingParams k1;
  k1.top_k = 1;
  CHECK(Sampler(k1, {}, 0).Next(kLogits).token == 1);
}

TEST_CASE("the same seed gives the same tokens, another seed other tokens") {
  SamplingParams p;
  p.seed = 42;
  std::vector<float> flat(50, 0.0f);
  auto draw = [&](SamplingParams params) {
    Sampler sampler(params, {}, 7);
    std::vector<int32_t> tokens;
    for (int i = 0; i < 20; ++i) tokens.push_back(sampler.Next(flat).token);
    return tokens;
  };
  CHECK(draw(p) == draw(p));
  SamplingParams other = p;
  other.seed = 43;
  CHECK(draw(p) != draw(other));
}

TEST_CASE("sampled frequencies follow softmax(logits / temperature)") {
  SamplingParams p;
  p.seed = 1;
  p.temperature = 0.5f;
  std::vector<float> logits = {0.0f, 0.5f, 1.0f};
  Sampler sampler(p, {}, 0);
  std::vector<int> counts(3);
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) ++counts[sampler.Next(logits).token];
  double z = std::exp(0.0) + std::exp(1.0) + std::exp(2.0);
  CHECK(counts[2] / double(draws) == Approx(std::exp(2.0) / z).margin(0.02));
  CHECK(counts[0] / double(draws) == Approx(1.0 / z).margin(0.02));
}

TEST_CASE("top-k, top-p and min-p remove the unlikely tail") {
  std::vector<float> logits = {5.0f, 4.0f, 0.0f, -5.0f};
  for (int variant = 0; variant < 3; ++variant) {
    SamplingParams p;
    p.seed = 3;
    if (variant == 0) p.top_k = 2;
    if (variant == 1) p.top_p = 0.9f;  // p ≈ {0.727, 0.268, 0.005, ...}: the first two reach 0.9
    if (variant == 2) p.min_p = 0.2f;  // floor 0.145: only the first two
    Sampler sampler(p, {}, 0);
    for (int i = 0; i < 2000; ++i) {
      int32_t t = sampler.Next(logits).token;
      REQUIRE((t == 0 || t == 1));
    }
  }
  SamplingParams tiny_p;
  tiny_p.top_p = 0.01f;
  CHECK(Sampler(tiny_p, {}, 0).Next(logits).token == 0);
}

TEST_CASE("penalties: presence and frequency subtract, repetition divides or multiplies") {
  SamplingParams p;
  p.temperature = 0;
  p.frequency_penalty = 1.5f;
  std::vector<float> logits = {2.0f, 1.0f};
  Sampler sampler(p, {}, 0);
  CHECK(sampler.Next(logits).token == 0);  // 0 has been produced once: 2 - 1.5 < 1
  CHECK(sampler.Next(logits).token == 1);

  SamplingParams presence;
  presence.temperature = 0;
  presence.presence_penalty = 0.5f;
  Sampler s2(presence, {}, 0);
  CHECK(s2.Next({2.0f, 1.6f}).token == 0);
  CHECK(s2.Next({2.0f, 1.6f}).token == 1);  // 2 - 0.5 < 1.6

  SamplingParams repetition;
  repetition.temperature = 0;
  repetition.repetition_penalty = 2.0f;
  // The prompt holds token 0 (positive logit, halved) and token 2 (negative, doubled).
  Sampler s3(repetition, {0, 2}, 0);
  CHECK(s3.Next({3.0f, 2.0f, -0.5f}).token == 1);  // 1.5 < 2
}

TEST_CASE("logprobs come from the penalised distribution") {
  SamplingParams p;
  p.temperature = 0;
  p.logprobs = true;
  p.top_logprobs = 2;
  std::vector<float> logits = {0.0f, std::log(3.0f)};
  TokenChoice c = Sampler(p, {}, 0).Next(logits);
  CHECK(c.token == 1);
  CHECK(c.logprob == Approx(std::log(0.75)));
  REQUIRE(c.top_logprobs.size() == 2);
  CHECK(c.top_logprobs[1].first == 0);
  CHECK(c.top_logprobs[1].second == Approx(std::log(0.25)));
}

TEST_CASE("stop strings end the text before them, across deltas") {
  StopMatcher matcher({"\n\n", "END"});
  auto r = matcher.Add("Hello E");
  CHECK(r.emit == "Hello ");  // "E" might start "END"
  CHECK_FALSE(r.matched);
  r = matcher.Add("Nx");
  CHECK(r.emit == "ENx");
  r = matcher.Add("done\n");
  CHECK(r.emit == "done");
  r = matcher.Add("\nmore");
  CHECK(r.matched == "\n\n");
  CHECK(r.emit == "");
  StopMatcher tail({"STOP"});
  CHECK(tail.Add("ST").emit.empty());
  CHECK(tail.Flush() == "ST");
}

}  // namespace
}  // namespace moed::model
