#include "cache/eviction_policy.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace moed::cache {
namespace {

// Least recently used.
class LruPolicy final : public EvictionPolicy {
 public:
  absl::string_view name() const override { return "lru"; }
  void Touch(const ExpertKey& key, uint64_t tick) override { last_[key] = tick; }
  void Remove(const ExpertKey& key) override { last_.erase(key); }
  ExpertKey Victim(const std::vector<ExpertKey>& candidates) override {
    const ExpertKey* best = &candidates.front();
    for (const ExpertKey& key : candidates) {
      if (last_[key] < last_[*best]) best = &key;
    }
    return *best;
  }

 private:
  absl::flat_hash_map<ExpertKey, uint64_t> last_;
};

// Least frequently used; the count survives eviction (an expert that was popular comes back
// with its history), ties go to the least recently used.
class LfuPolicy final : public EvictionPolicy {
 public:
  absl::string_view name() const override { return "lfu"; }
  void Touch(const ExpertKey& key, uint64_t tick) override {
    ++count_[key];
    last_[key] = tick;
  }
  void Remove(const ExpertKey& /*key*/) override {}
  ExpertKey Victim(const std::vector<ExpertKey>& candidates) override {
    const ExpertKey* best = &candidates.front();
    for (const ExpertKey& key : candidates) {
      if (count_[key] < count_[*best] ||
          (count_[key] == count_[*best] && last_[key] < last_[*best]))
        best = &key;
    }
    return *best;
  }

 private:
  absl::flat_hash_map<ExpertKey, uint64_t> count_;
  absl::flat_hash_map<ExpertKey, uint64_t> last_;
};

// A score mixing recency (exponential decay over ticks), frequency (a decayed count) and the
// prefetcher's prediction; the lowest score is evicted.
class ScoredPolicy final : public EvictionPolicy {
 public:
  absl::string_view name() const override { return "scored"; }
  void Touch(const ExpertKey& key, uint64_t tick) override {
    Entry& e = entries_[key];
    e.frequency =
        e.frequency * std::exp(-kFrequencyDecay * static_cast<double>(tick - e.last)) + 1.0;
    e.last = tick;
    now_ = std::max(now_, tick);
    e.prediction = 0;  // a prediction is consumed by the use it predicted
  }
  void Remove(const ExpertKey& /*key*/) override {}
  void Predict(const ExpertKey& key, double probability) override {
    entries_[key].prediction = probability;
  }
  ExpertKey Victim(const std::vector<ExpertKey>& candidates) override {
    const ExpertKey* best = &candidates.front();
    double best_score = Score(*best);
    for (const ExpertKey& key : candidates) {
      double score = Score(key);
      if (score < best_score) {
        best = &key;
        best_score = score;
      }
    }
    return *best;
  }

 private:
  static constexpr double kFrequencyDecay = 0.002;  // per tick
  static constexpr double kRecencyScale = 64.0;     // ticks
  struct Entry {
    double frequency = 0;
    uint64_t last = 0;
    double prediction = 0;
  };
  double Score(const ExpertKey& key) {
    const Entry& e = entries_[key];
    double age = static_cast<double>(now_ - e.last);
    return std::exp(-age / kRecencyScale) + 0.5 * std::log1p(e.frequency) + 2.0 * e.prediction;
  }
  absl::flat_hash_map<ExpertKey, Entry> entries_;
  uint64_t now_ = 0;
};

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(absl::string_view name) {
  if (name == "lru") return PolicyKind::kLru;
  if (name == "lfu") return PolicyKind::kLfu;
  if (name == "scored") return PolicyKind::kScored;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown eviction policy '", name, "' (expected lru, lfu or scored)"));
}

absl::StatusOr<EvictionScope> ParseEvictionScope(absl::string_view name) {
  if (name == "layer") return EvictionScope::kLayer;
  if (name == "global") return EvictionScope::kGlobal;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown eviction scope '", name, "' (expected layer or global)"));
}

std::unique_ptr<EvictionPolicy> MakePolicy(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kLru:
      return std::make_unique<LruPolicy>();
    case PolicyKind::kLfu:
      return std::make_unique<LfuPolicy>();
    case PolicyKind::kScored:
      return std::make_unique<ScoredPolicy>();
  }
  return nullptr;
}

}  // namespace moed::cache
