#include "model/sampler.h"

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

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
  auto draw = [&](const SamplingParams& params) {
    Sampler sampler(params, {}, 7);
    std::vector<int32_t> tokens;
    tokens.reserve(20);
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

// The sampler as it was written first: a full sort of the vocabulary by logit, then the same
// arithmetic in that order. The sampler must draw exactly the tokens this draws.
class SortingSampler {
 public:
  SortingSampler(const SamplingParams& params, uint64_t seed) : params_(params), rng_(seed) {}
  int32_t Next(const std::vector<float>& raw) {
    std::vector<float> logits = raw;
    for (const auto& [token, count] : counts_) {
      logits[token] -=
          params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
    }
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    auto by_logit = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    int32_t token;
    if (params_.temperature == 0.0f || params_.top_k == 1) {
      token = *std::min_element(order.begin(), order.end(), by_logit);
    } else {
      size_t keep = order.size();
      if (params_.top_k > 0) keep = std::min<size_t>(keep, params_.top_k);
      std::partial_sort(order.begin(), order.begin() + static_cast<int64_t>(keep), order.end(),
                        by_logit);
      order.resize(keep);
      std::vector<double> p(order.size());
      double sum = 0;
      for (size_t i = 0; i < order.size(); ++i) {
        sum += p[i] = std::exp((static_cast<double>(logits[order[i]]) - logits[order[0]]) /
                               params_.temperature);
      }
      for (double& v : p) v /= sum;
      size_t cut = p.size();
      if (params_.min_p > 0) {
        double floor = params_.min_p * p[0];
        cut = static_cast<size_t>(
            std::find_if(p.begin(), p.end(), [&](double v) { return v < floor; }) - p.begin());
      }
      if (params_.top_p < 1.0f) {
        double cumulative = 0;
        for (size_t i = 0; i < cut; ++i) {
          cumulative += p[i];
          if (cumulative >= params_.top_p) {
            cut = i + 1;
            break;
          }
        }
      }
      cut = std::max<size_t>(cut, 1);
      double kept = std::accumulate(p.begin(), p.begin() + static_cast<int64_t>(cut), 0.0);
      double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
      token = order[cut - 1];
      double cumulative = 0;
      for (size_t i = 0; i < cut; ++i) {
        cumulative += p[i];
        if (u < cumulative) {
          token = order[i];
          break;
        }
      }
    }
    ++counts_[token];
    return token;
  }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  std::map<int32_t, int> counts_;
};

TEST_CASE("the sampler draws exactly the tokens a full sort of the vocabulary draws") {
  struct Variant {
    const char* name;
    float temperature, top_p, min_p, presence, frequency;
    uint32_t top_k;
  };
  const Variant variants[] = {
      {"temperature 0.8", 0.8f, 1.0f, 0.0f, 0.0f, 0.0f, 0},
      {"temperature 1", 1.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0},
      {"temperature 0.1", 0.1f, 1.0f, 0.0f, 0.0f, 0.0f, 0},
      {"temperature 2, top-p 0.9", 2.0f, 0.9f, 0.0f, 0.0f, 0.0f, 0},
      {"top-k 40", 0.7f, 1.0f, 0.0f, 0.0f, 0.0f, 40},
      {"top-k 40, top-p 0.95, min-p 0.05", 0.7f, 0.95f, 0.05f, 0.0f, 0.0f, 40},
      {"min-p 0.1", 1.0f, 1.0f, 0.1f, 0.0f, 0.0f, 0},
      {"penalties", 0.9f, 1.0f, 0.0f, 0.5f, 0.3f, 0},
      {"greedy", 0.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0},
  };
  // Flat logits (a random-weight model: nothing is pruned), a trained model's spread (most of
  // the vocabulary far below the top), and coarse values full of ties.
  const float spreads[] = {0.4f, 6.0f, 0.0f};
  for (const Variant& v : variants) {
    for (float spread : spreads) {
      INFO(v.name << ", logit spread " << spread);
      SamplingParams params;
      params.temperature = v.temperature;
      params.top_p = v.top_p;
      params.min_p = v.min_p;
      params.top_k = v.top_k;
      params.presence_penalty = v.presence;
      params.frequency_penalty = v.frequency;
      params.seed = 11;
      Sampler sampler(params, {}, 0);
      // The vocabulary's passes split into 2 or 3 parts, each part on a thread of its own.
      Sampler split(params, {}, 0);
      auto on_threads = [](int parts, absl::FunctionRef<void(int)> body) {
        std::vector<std::thread> threads;
        for (int part = 1; part < parts; ++part) threads.emplace_back([&, part] { body(part); });
        body(0);
        for (std::thread& t : threads) t.join();
      };
      SortingSampler reference(params, 11);
      std::mt19937 rng(5);
      std::normal_distribution<float> normal(0.0f, spread > 0 ? spread : 1.0f);
      std::vector<float> logits(32000);
      int differ = 0, split_differs = 0;
      for (int step = 0; step < 60; ++step) {
        for (float& l : logits) {
          l = spread > 0 ? normal(rng) : std::round(normal(rng) * 2.0f) / 2.0f;
        }
        if (spread == 6.0f)
          logits[static_cast<size_t>(step) * 7] += 25.0f;  // a clear favourite, as trained models
        const int32_t expected = reference.Next(logits);
        differ += sampler.Next(logits).token != expected ? 1 : 0;
        split_differs += split.Next(logits, 2 + step % 2, on_threads).token != expected ? 1 : 0;
      }
      CHECK(differ == 0);
      CHECK(split_differs == 0);
    }
  }
}

TEST_CASE("the fast path draws the exact path's tokens, and hands it every close call") {
  struct Variant {
    const char* name;
    float temperature, top_p, min_p;
  };
  const Variant variants[] = {
      {"temperature 0.8", 0.8f, 1.0f, 0.0f},
      {"temperature 0.01", 0.01f, 1.0f, 0.0f},
      {"temperature 50", 50.0f, 1.0f, 0.0f},
      {"top-p 0.5", 1.0f, 0.5f, 0.0f},
      {"top-p 0.01", 1.0f, 0.01f, 0.0f},
      {"min-p 0.3", 0.7f, 1.0f, 0.3f},
      {"min-p 1", 0.7f, 1.0f,
       1.0f},  // only the top survives: decided at the margin, by the exact path
      {"top-p 0.9, min-p 0.05", 1.3f, 0.9f, 0.05f},
  };
  struct Shape {
    const char* name;
    size_t vocab;
    float spread;
    bool masked;  // a third of the vocabulary at -infinity, as a grammar's mask leaves it
  };
  const Shape shapes[] = {{"flat", 32000, 0.4f, false},  {"trained-like", 32003, 6.0f, false},
                          {"masked", 4097, 2.0f, true},  {"ties", 1001, 0.0f, false},
                          {"one token", 1, 1.0f, false}, {"three tokens", 3, 1.0f, false}};
  for (const Variant& v : variants) {
    for (const Shape& shape : shapes) {
      INFO(v.name << ", " << shape.name);
      SamplingParams params;
      params.temperature = v.temperature;
      params.top_p = v.top_p;
      params.min_p = v.min_p;
      params.seed = 3;
      Sampler fast(params, {}, 0);
      Sampler narrow(params, {}, 0, SamplerOptions{.widest_simd = false});  // SSE2's two lanes
      Sampler exact(params, {}, 0, SamplerOptions{.fast_path = false});
      Sampler unsure(params, {}, 0, SamplerOptions{.margin_scale = 1e30});  // nothing clears it
      SortingSampler reference(params, 3);
      std::mt19937 rng(9);
      std::normal_distribution<float> normal(0.0f, shape.spread > 0 ? shape.spread : 1.0f);
      std::vector<float> logits(shape.vocab);
      const int draws = 40;
      int differ = 0;
      for (int step = 0; step < draws; ++step) {
        for (size_t t = 0; t < logits.size(); ++t) {
          const float l = normal(rng);
          logits[t] = shape.spread > 0 ? l : std::round(l);
          if (shape.masked && t % 3 == 1) logits[t] = -INFINITY;
        }
        if (shape.spread == 6.0f) logits[static_cast<size_t>(step) * 11] += 25.0f;
        const int32_t expected = reference.Next(logits);
        differ += fast.Next(logits).token != expected ? 1 : 0;
        differ += narrow.Next(logits).token != expected ? 1 : 0;
        differ += exact.Next(logits).token != expected ? 1 : 0;
        differ += unsure.Next(logits).token != expected ? 1 : 0;
      }
      CHECK(differ == 0);
      CHECK(exact.counters().fast_draws == 0);
      CHECK(unsure.counters().fast_draws == 0);
      CHECK(unsure.counters().exact_draws == static_cast<uint64_t>(draws));
      // A close call needs a running sum within about 1e-11 of the draw or a cut: with these
      // draws, none but min-p 1's, whose one survivor sits exactly on the cut.
      if (v.min_p == 1.0f) {
        CHECK(fast.counters().exact_draws == static_cast<uint64_t>(draws));
        CHECK(narrow.counters().exact_draws == static_cast<uint64_t>(draws));
      } else {
        CHECK(fast.counters().fast_draws == static_cast<uint64_t>(draws));
        CHECK(narrow.counters().fast_draws == static_cast<uint64_t>(draws));
      }
    }
  }
}

TEST_CASE("the fast path's exp is within 2^-50 of expl over [-80, 0], on every lane width") {
  for (bool widest : {false, true}) {
    INFO((widest ? "the widest lanes this CPU has" : "SSE2's two lanes"));
    long double worst = 0;
    double worst_at = 0;
    auto check = [&](double x) {
      const long double expected = std::exp(static_cast<long double>(x));
      const long double error =
          std::fabs(static_cast<long double>(ApproxExp(x, widest)) - expected) / expected;
      if (error > worst) {
        worst = error;
        worst_at = x;
      }
    };
    for (int i = 0; i <= 2000000; ++i) check(-80.0 * i / 2000000);
    // Where the reduction switches multiples of ln 2, and either side of it.
    for (int n = 0; n <= 115; ++n) {
      const double at = -n * 0.6931471805599453 - 0.34657359027997264;
      for (double x : {std::nextafter(at, 0.0), at, std::nextafter(at, -1.0)}) {
        if (x >= -80.0) check(x);
      }
    }
    check(-0.0);
    check(-1e-300);
    INFO("worst relative error " << static_cast<double>(worst) << " at " << worst_at);
    CHECK(worst <= 0x1p-50L);
  }
}

TEST_CASE("logprobs are reported when asked for, and only then") {
  std::vector<float> logits = {0.5f, 2.0f, -1.0f, 2.0f};
  SamplingParams without;
  without.seed = 1;
  TokenChoice plain = Sampler(without, {}, 0).Next(logits);
  CHECK(plain.logprob == 0.0f);
  CHECK(plain.top_logprobs.empty());
  SamplingParams with = without;
  with.logprobs = true;
  with.top_logprobs = 2;
  TokenChoice rich = Sampler(with, {}, 0).Next(logits);
  CHECK(rich.token == plain.token);  // asking for logprobs changes no draw
  const double z = std::exp(0.5) + 2 * std::exp(2.0) + std::exp(-1.0);
  CHECK(rich.logprob == Approx(logits[rich.token] - std::log(z)).margin(1e-6));
  REQUIRE(rich.top_logprobs.size() == 2);
  CHECK(rich.top_logprobs[0].first == 1);  // the tie at the top, lower id first
  CHECK(rich.top_logprobs[1].first == 3);
}

}  // namespace
}  // namespace moed::model
