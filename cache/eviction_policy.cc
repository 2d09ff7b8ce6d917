#include "cache/eviction_policy.h"

#include <algorithm>
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

// What the engine knows: it sweeps the layers in order every step, so an expert of the layer
// just computed is next needed a whole sweep later, one of the next layer almost at once. A
// candidate's expected wait for its next use, in layers, is the distance to its layer's next
// turn plus a whole sweep for every turn it is expected to sit out, d + L (1 - p) / p, where p
// is the prefetcher's prediction for that turn when there is one, else a recency prior (1/2 when
// it was used at its layer's last turn, halving for every turn since). The longest wait is
// evicted; ties go to the least recently used.
class SweepPolicy final : public EvictionPolicy {
 public:
  explicit SweepPolicy(int num_layers) : num_layers_(num_layers) {}
  absl::string_view name() const override { return "sweep"; }
  void AtLayer(int layer) override {
    if (layer < current_) ++sweep_;
    current_ = layer;
    seen_layers_ = std::max(seen_layers_, layer + 1);
  }
  void Touch(const ExpertKey& key, uint64_t tick) override {
    Entry& e = entries_[key];
    e.last = tick;
    e.used_turn = TurnOf(key.layer, /*next=*/false);
    e.predicted_turn = -1;  // a prediction is consumed by the use it predicted
  }
  void Remove(const ExpertKey& /*key*/) override {}
  void Predict(const ExpertKey& key, double probability) override {
    Entry& e = entries_[key];
    e.prediction = probability;
    e.predicted_turn = TurnOf(key.layer, /*next=*/true);
  }
  ExpertKey Victim(const std::vector<ExpertKey>& candidates) override {
    const ExpertKey* best = &candidates.front();
    double best_wait = -1;
    uint64_t best_last = 0;
    for (const ExpertKey& key : candidates) {
      const double wait = ExpectedWait(key);
      const uint64_t last = entries_[key].last;
      if (wait > best_wait || (wait == best_wait && last < best_last)) {
        best = &key;
        best_wait = wait;
        best_last = last;
      }
    }
    return *best;
  }

 private:
  struct Entry {
    uint64_t last = 0;
    int64_t used_turn = -1000;  // the sweep whose turn of its layer last used it
    int64_t predicted_turn = -1;
    double prediction = 0;
  };
  int Layers() const { return std::max(1, num_layers_ > 0 ? num_layers_ : seen_layers_); }
  // The sweep of `layer`'s current turn (the engine is at it or past it in this sweep), or of
  // its next one.
  int64_t TurnOf(int layer, bool next) const {
    if (!next) return layer <= current_ ? sweep_ : sweep_ - 1;
    return layer > current_ ? sweep_ : sweep_ + 1;
  }
  double ExpectedWait(const ExpertKey& key) {
    const Entry& e = entries_[key];
    const int layers = Layers();
    const int distance =
        key.layer > current_ ? key.layer - current_ : key.layer - current_ + layers;
    const int64_t turn = TurnOf(key.layer, /*next=*/true);
    double p;
    if (e.predicted_turn == turn) {
      p = e.prediction;
    } else {
      const int64_t missed = std::max<int64_t>(0, turn - e.used_turn - 1);
      p = 0.5 * std::pow(0.5, static_cast<double>(std::min<int64_t>(missed, 60)));
    }
    p = std::clamp(p, 1e-6, 1.0);
    return distance + layers * (1 - p) / p;
  }
  int num_layers_;
  int seen_layers_ = 0;
  int current_ = -1;
  int64_t sweep_ = 0;
  absl::flat_hash_map<ExpertKey, Entry> entries_;
};

}  // namespace

absl::StatusOr<PolicyKind> ParsePolicyKind(absl::string_view name) {
  if (name == "lru") return PolicyKind::kLru;
  if (name == "lfu") return PolicyKind::kLfu;
  if (name == "scored") return PolicyKind::kScored;
  if (name == "sweep") return PolicyKind::kSweep;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown eviction policy '", name, "' (expected lru, lfu, scored or sweep)"));
}

absl::string_view PolicyName(PolicyKind kind) {
  switch (kind) {
    case PolicyKind::kLru:
      return "lru";
    case PolicyKind::kLfu:
      return "lfu";
    case PolicyKind::kScored:
      return "scored";
    case PolicyKind::kSweep:
      return "sweep";
  }
  return "?";
}

absl::StatusOr<EvictionScope> ParseEvictionScope(absl::string_view name) {
  if (name == "layer") return EvictionScope::kLayer;
  if (name == "global") return EvictionScope::kGlobal;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown eviction scope '", name, "' (expected layer or global)"));
}

std::unique_ptr<EvictionPolicy> MakePolicy(PolicyKind kind, int num_layers) {
  switch (kind) {
    case PolicyKind::kLru:
      return std::make_unique<LruPolicy>();
    case PolicyKind::kLfu:
      return std::make_unique<LfuPolicy>();
    case PolicyKind::kScored:
      return std::make_unique<ScoredPolicy>();
    case PolicyKind::kSweep:
      return std::make_unique<SweepPolicy>(num_layers);
  }
  return nullptr;
}

}  // namespace moed::cache
