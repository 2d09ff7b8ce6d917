#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moed::model {

Sampler::Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt,
                 uint64_t default_seed)
    : params_(params), rng_(params.seed.value_or(default_seed)) {
  for (int32_t token : prompt) seen_[token] = true;
}

TokenChoice Sampler::Next(absl::Span<const float> raw) {
  const int64_t vocab = static_cast<int64_t>(raw.size());
  std::vector<float> logits(raw.begin(), raw.end());
  // Repetition penalty (multiplicative, over prompt and output), then the OpenAI penalties
  // (additive, over the output).
  if (params_.repetition_penalty != 1.0f) {
    for (const auto& [token, unused] : seen_) {
      float& l = logits[token];
      l = l > 0 ? l / params_.repetition_penalty : l * params_.repetition_penalty;
    }
  }
  for (const auto& [token, count] : output_counts_) {
    logits[token] -=
        params_.presence_penalty + params_.frequency_penalty * static_cast<float>(count);
  }

  // Log-probabilities of the penalised distribution, for logprobs.
  float max_logit = *std::max_element(logits.begin(), logits.end());
  double total = 0;
  for (float l : logits) total += std::exp(static_cast<double>(l - max_logit));
  const double log_total = std::log(total) + max_logit;
  auto logprob_of = [&](int32_t token) { return static_cast<float>(logits[token] - log_total); };

  // Candidates most likely first; ties to the lower id, so the order is deterministic.
  std::vector<int32_t> order(static_cast<size_t>(vocab));
  std::iota(order.begin(), order.end(), 0);
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };

  TokenChoice choice;
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    choice.token = *std::min_element(order.begin(), order.end(), by_logit);
  } else {
    size_t keep = order.size();
    if (params_.top_k > 0) keep = std::min<size_t>(keep, params_.top_k);
    std::partial_sort(order.begin(), order.begin() + static_cast<int64_t>(keep), order.end(),
                      by_logit);
    order.resize(keep);
    // Probabilities at this temperature over the kept candidates.
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
    choice.token = order[cut - 1];
    double cumulative = 0;
    for (size_t i = 0; i < cut; ++i) {
      cumulative += p[i];
      if (u < cumulative) {
        choice.token = order[i];
        break;
      }
    }
  }
  choice.logprob = logprob_of(choice.token);
  if (params_.logprobs && params_.top_logprobs > 0) {
    std::vector<int32_t> top(static_cast<size_t>(vocab));
    std::iota(top.begin(), top.end(), 0);
    size_t n = std::min<size_t>(top.size(), params_.top_logprobs);
    std::partial_sort(top.begin(), top.begin() + static_cast<int64_t>(n), top.end(), by_logit);
    for (size_t i = 0; i < n; ++i) choice.top_logprobs.emplace_back(top[i], logprob_of(top[i]));
  }
  ++output_counts_[choice.token];
  seen_[choice.token] = true;
  return choice;
}

StopMatcher::Result StopMatcher::Add(const std::string& delta) {
  pending_ += delta;
  Result result;
  // The earliest complete stop string wins; the text before it is emitted.
  size_t best = std::string::npos;
  for (const std::string& stop : stops_) {
    size_t at = pending_.find(stop);
    if (at != std::string::npos && (best == std::string::npos || at < best)) {
      best = at;
      result.matched = stop;
    }
  }
  if (result.matched.has_value()) {
    result.emit = pending_.substr(0, best);
    pending_.clear();
    return result;
  }
  // Hold back the longest tail that could still grow into a stop string.
  size_t hold = 0;
  for (const std::string& stop : stops_) {
    for (size_t len = std::min(stop.size() - 1, pending_.size()); len > hold; --len) {
      if (pending_.compare(pending_.size() - len, len, stop, 0, len) == 0) {
        hold = len;
        break;
      }
    }
  }
  result.emit = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return result;
}

std::string StopMatcher::Flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

}  // namespace moed::model
