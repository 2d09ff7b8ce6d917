#include "model/sampler.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>

namespace moed::model {

Sampler::Sampler(const SamplingParams& params, const std::vector<int32_t>& prompt,
                 uint64_t default_seed)
    : params_(params), rng_(params.seed.value_or(default_seed)) {
  for (int32_t token : prompt) seen_[token] = true;
}

namespace {

// A token's place in the sampling order as one integer: ascending keys are descending logits,
// ties to the lower id. -0 and +0 key alike, as they compare equal.
uint64_t OrderKey(float logit, int32_t token) {
  uint32_t bits;
  const float value = logit == 0.0f ? 0.0f : logit;
  std::memcpy(&bits, &value, sizeof bits);
  // Floats as unsigned integers that sort as the floats do, then inverted: larger first.
  const uint32_t ascending = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(token);
}

int32_t TokenOf(uint64_t key) { return static_cast<int32_t>(key & 0xFFFFFFFFu); }

// Sorts keys ascending by their upper 32 bits (the logit part), stably: keys that arrive in
// token order leave with ties still in token order, as OrderKey orders them. Three passes of
// 11 bits, least significant first, skipping digits every key shares.
void RadixSortByLogit(std::vector<uint64_t>& keys, std::vector<uint64_t>& scratch) {
  constexpr int kDigitBits = 11;
  constexpr size_t kBuckets = size_t{1} << kDigitBits;
  scratch.resize(keys.size());
  uint64_t all_or = 0, all_and = ~uint64_t{0};
  for (uint64_t k : keys) {
    all_or |= k;
    all_and &= k;
  }
  std::array<uint32_t, kBuckets + 1> count;  // on the stack: a token allocates nothing
  for (int shift = 32; shift < 64; shift += kDigitBits) {
    const uint64_t mask = kBuckets - 1;
    if ((((all_or ^ all_and) >> shift) & mask) == 0) continue;  // one value in this digit
    std::fill(count.begin(), count.end(), 0);
    for (uint64_t k : keys) ++count[((k >> shift) & mask) + 1];
    for (size_t b = 0; b < kBuckets; ++b) count[b + 1] += count[b];
    for (uint64_t k : keys) scratch[count[(k >> shift) & mask]++] = k;
    keys.swap(scratch);
  }
}

// The most likely token, ties to the lower id: the largest value with eight independent
// running maxima (no loop-carried index, so the loop vectorizes), then its first position.
int32_t Argmax(const std::vector<float>& logits) {
  const size_t n = logits.size();
  float lane[8];
  std::fill(lane, lane + 8, logits[0]);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) lane[j] = logits[i + j] > lane[j] ? logits[i + j] : lane[j];
  }
  float top = *std::max_element(lane, lane + 8);
  for (; i < n; ++i) top = logits[i] > top ? logits[i] : top;
  return static_cast<int32_t>(std::find(logits.begin(), logits.end(), top) - logits.begin());
}

}  // namespace

TokenChoice Sampler::Next(absl::Span<const float> raw) {
  return Next(raw, 1, [](int parts, absl::FunctionRef<void(int)> body) {
    for (int part = 0; part < parts; ++part) body(part);
  });
}

TokenChoice Sampler::Next(absl::Span<const float> raw, int parts, PartRunner run) {
  parts = std::max(parts, 1);
  const int64_t vocab = static_cast<int64_t>(raw.size());
  std::vector<float>& logits = logits_;
  logits.assign(raw.begin(), raw.end());
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
  auto by_logit = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const int32_t best = Argmax(logits);

  TokenChoice choice;
  if (params_.temperature == 0.0f || params_.top_k == 1) {
    choice.token = best;
  } else {
    // The candidates in sampling order (descending logit, ties to the lower id). Without
    // top-k, only tokens whose weight exp((l - max) / T) reaches 2^-60: every other weight is
    // below half an ulp of the sums below (which start at exp(0) = 1 and only grow), so it
    // would change no sum and can never be drawn. Sampling then costs a partial pass over the
    // vocabulary, not a sort of it, and gives the tokens a full sort would.
    std::vector<uint64_t>& keys = keys_;
    keys.clear();
    const float max_logit = logits[best];
    const bool pruned = params_.top_k == 0;
    if (pruned) {
      // Each part takes the candidates of its own range of keys, found in token order, and
      // sorts them; the parts' ranges follow each other, so their orders, one after another,
      // are the whole order. The ranges split at quantiles of a sample of the candidates.
      const float floor = max_logit - 42.0f * params_.temperature;  // e^-42 < 2^-60
      std::vector<uint64_t>& pivots = pivots_;
      pivots.clear();
      if (parts > 1) {
        const int64_t stride = std::max<int64_t>(1, vocab / 1024);
        for (int64_t t = 0; t < vocab; t += stride) {
          if (logits[t] >= floor) pivots.push_back(OrderKey(logits[t], static_cast<int32_t>(t)));
        }
        std::sort(pivots.begin(), pivots.end());
        std::vector<uint64_t>& cuts = pivot_cuts_;  // the sample's quantiles
        cuts.clear();
        for (int part = 1; part < parts && !pivots.empty(); ++part) {
          cuts.push_back(
              pivots[pivots.size() * static_cast<size_t>(part) / static_cast<size_t>(parts)]);
        }
        pivots.swap(cuts);
      }
      const int ranges = static_cast<int>(pivots.size()) + 1;
      part_keys_.resize(static_cast<size_t>(ranges));
      part_scratch_.resize(static_cast<size_t>(ranges));
      run(ranges, [&](int part) {
        const uint64_t low = part == 0 ? 0 : pivots[static_cast<size_t>(part - 1)];
        const uint64_t high = part == ranges - 1 ? ~uint64_t{0} : pivots[static_cast<size_t>(part)];
        const bool last = part == ranges - 1;
        std::vector<uint64_t>& own = part_keys_[static_cast<size_t>(part)];
        own.resize(static_cast<size_t>(vocab));
        size_t count = 0;
        for (int32_t t = 0; t < vocab; ++t) {  // without branches: whether a token is in the
          const uint64_t key = OrderKey(logits[t], t);  // range is a coin toss
          own[count] = key;
          count += static_cast<size_t>((logits[t] >= floor) & (key >= low) & ((key < high) | last));
        }
        own.resize(count);
        RadixSortByLogit(own, part_scratch_[static_cast<size_t>(part)]);  // in token order
      });
      if (ranges == 1) {
        keys.swap(part_keys_[0]);
      } else {
        for (const std::vector<uint64_t>& own : part_keys_) {
          keys.insert(keys.end(), own.begin(), own.end());
        }
      }
    } else {
      keys.reserve(static_cast<size_t>(vocab));
      for (int32_t t = 0; t < vocab; ++t) keys.push_back(OrderKey(logits[t], t));
      const size_t keep = std::min<size_t>(keys.size(), params_.top_k);
      std::nth_element(keys.begin(), keys.begin() + static_cast<int64_t>(keep - 1), keys.end());
      keys.resize(keep);
      std::sort(keys.begin(), keys.end());
    }
    // Probabilities at this temperature over the kept candidates: the weights in parts, their
    // sum in order.
    std::vector<double>& p = probabilities_;
    p.resize(keys.size());
    const double top = static_cast<double>(logits[TokenOf(keys[0])]);
    const size_t count = keys.size();
    run(parts, [&](int part) {
      const size_t begin = count * static_cast<size_t>(part) / static_cast<size_t>(parts);
      const size_t end = count * static_cast<size_t>(part + 1) / static_cast<size_t>(parts);
      for (size_t i = begin; i < end; ++i) {
        p[i] =
            std::exp((static_cast<double>(logits[TokenOf(keys[i])]) - top) / params_.temperature);
      }
    });
    double sum = 0;
    for (double v : p) sum += v;
    for (double& v : p) v /= sum;
    size_t cut = p.size();
    if (params_.min_p > 0) {
      double min_p_floor = params_.min_p * p[0];
      cut = static_cast<size_t>(
          std::find_if(p.begin(), p.end(), [&](double v) { return v < min_p_floor; }) - p.begin());
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
    choice.token = TokenOf(keys[cut - 1]);
    if (cut == keys.size() && pruned && keys.size() < static_cast<size_t>(vocab)) {
      // Only when u rounds up to `kept`: the last token of the whole order, as a full sort.
      int32_t last = 0;
      for (int32_t t = 1; t < vocab; ++t) {
        if (!by_logit(t, last)) last = t;
      }
      choice.token = last;
    }
    double cumulative = 0;
    for (size_t i = 0; i < cut; ++i) {
      cumulative += p[i];
      if (u < cumulative) {
        choice.token = TokenOf(keys[i]);
        break;
      }
    }
  }
  if (params_.logprobs) {
    // Log-probabilities of the penalised distribution.
    const float max_logit = logits[best];
    double total = 0;
    for (float l : logits) total += std::exp(static_cast<double>(l - max_logit));
    const double log_total = std::log(total) + max_logit;
    auto logprob_of = [&](int32_t token) { return static_cast<float>(logits[token] - log_total); };
    choice.logprob = logprob_of(choice.token);
    if (params_.top_logprobs > 0) {
      std::vector<int32_t> top(static_cast<size_t>(vocab));
      std::iota(top.begin(), top.end(), 0);
      size_t n = std::min<size_t>(top.size(), params_.top_logprobs);
      std::partial_sort(top.begin(), top.begin() + static_cast<int64_t>(n), top.end(), by_logit);
      for (size_t i = 0; i < n; ++i) choice.top_logprobs.emplace_back(top[i], logprob_of(top[i]));
    }
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
