#include "cache/replay.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace moed::cache {
namespace {

struct Request {
  ExpertKey key;
  uint64_t group;  // requests of one (token, layer) share a group: they are pinned together
  size_t token;
};

ReplayResult ReplaySequence(const RoutingTrace& trace, const ReplayBudget& budget,
                            std::optional<PolicyKind> kind, Predictor* predictor,
                            const ReplayPrefetch* prefetch) {
  std::vector<Request> requests;
  uint64_t group = 0;
  for (size_t t = 0; t < trace.tokens.size(); ++t) {
    const auto& token = trace.tokens[t];
    for (int layer = 0; layer < trace.num_layers; ++layer) {
      if (!token[layer].has_value()) continue;
      for (int e : *token[layer]) requests.push_back({{layer, e}, group, t});
      ++group;
    }
  }
  // next_use[i]: index of the next request for the same key (Belady).
  std::vector<uint64_t> next_use(requests.size(), std::numeric_limits<uint64_t>::max());
  absl::flat_hash_map<ExpertKey, uint64_t> seen;
  for (size_t i = requests.size(); i-- > 0;) {
    auto it = seen.find(requests[i].key);
    if (it != seen.end()) next_use[i] = it->second;
    seen[requests[i].key] = i;
  }

  std::unique_ptr<EvictionPolicy> policy =
      kind.has_value() ? MakePolicy(*kind, trace.num_layers) : nullptr;
  absl::flat_hash_map<ExpertKey, uint64_t> resident;  // key -> its next use (for Belady)
  std::vector<int> per_layer_count(static_cast<size_t>(trace.num_layers));
  ReplayResult result;
  // Makes room for `key` if the budget is full: false when nothing may be evicted.
  auto make_room = [&](const ExpertKey& key, const absl::flat_hash_set<ExpertKey>& keep) {
    const bool full = budget.per_layer > 0 ? per_layer_count[key.layer] >= budget.per_layer
                                           : static_cast<int>(resident.size()) >= budget.shared;
    if (!full) return true;
    std::vector<ExpertKey> candidates;
    for (const auto& [k, next] : resident) {
      if ((budget.per_layer == 0 || k.layer == key.layer) && !keep.contains(k))
        candidates.push_back(k);
    }
    if (candidates.empty()) return false;
    std::sort(candidates.begin(), candidates.end(), [](const ExpertKey& a, const ExpertKey& b) {
      return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
    });
    ExpertKey victim;
    if (policy) {
      victim = policy->Victim(candidates);
      policy->Remove(victim);
    } else {
      victim = *std::max_element(
          candidates.begin(), candidates.end(),
          [&](const ExpertKey& a, const ExpertKey& b) { return resident[a] < resident[b]; });
    }
    resident.erase(victim);
    --per_layer_count[victim.layer];
    return true;
  };

  const int candidates_per_token =
      prefetch != nullptr && prefetch->candidates > 0 ? prefetch->candidates : trace.top_k;
  std::vector<double> scores(static_cast<size_t>(trace.num_experts));
  size_t i = 0;
  while (i < requests.size()) {
    const size_t first = i;
    const uint64_t this_group = requests[i].group;
    const int layer = requests[i].key.layer;
    if (policy) policy->AtLayer(layer);
    absl::flat_hash_set<ExpertKey> pinned;
    for (; i < requests.size() && requests[i].group == this_group; ++i) {
      const ExpertKey key = requests[i].key;
      ++result.requests;
      auto it = resident.find(key);
      if (it != resident.end()) {
        ++result.hits;
        it->second = next_use[i];
        if (policy) policy->Touch(key, i);
        pinned.insert(key);
        continue;
      }
      ++result.reads;
      if (!make_room(key, pinned)) {  // cannot cache it: a miss that stays a miss
        pinned.insert(key);
        continue;
      }
      resident[key] = next_use[i];
      ++per_layer_count[key.layer];
      if (policy) policy->Touch(key, i);
      pinned.insert(key);
    }
    if (predictor == nullptr) continue;
    // Prefetch for the next layers of this token, then let the predictor see this layer.
    const size_t t = requests[first].token;
    const auto& chosen = *trace.tokens[t][static_cast<size_t>(layer)];
    TokenAtLayer at{{1, static_cast<int64_t>(t)}, layer, absl::MakeConstSpan(chosen), {}};
    std::vector<PrefetchHint> hints;
    for (int d = 1; d <= prefetch->depth && layer + d < trace.num_layers; ++d) {
      predictor->Score(at, d, absl::MakeSpan(scores));
      const double sum = std::accumulate(scores.begin(), scores.end(), 0.0);
      for (int e : TopExperts(scores, candidates_per_token)) {
        if (scores[static_cast<size_t>(e)] > 0)
          hints.push_back({layer + d, e, scores[static_cast<size_t>(e)] / sum});
      }
    }
    std::stable_sort(hints.begin(), hints.end(), [](const PrefetchHint& a, const PrefetchHint& b) {
      return a.probability > b.probability;
    });
    absl::flat_hash_set<ExpertKey> keep = pinned;
    for (const PrefetchHint& hint : hints) keep.insert({hint.layer, hint.expert});
    for (const PrefetchHint& hint : hints) {
      const ExpertKey key{hint.layer, hint.expert};
      if (policy) policy->Predict(key, hint.probability);
      if (resident.contains(key) || !make_room(key, keep)) continue;
      // Belady's next use of the key: its first request after this group.
      uint64_t next = std::numeric_limits<uint64_t>::max();
      for (size_t j = i; !policy && j < requests.size(); ++j) {
        if (requests[j].key == key) {
          next = j;
          break;
        }
      }
      resident[key] = next;
      ++per_layer_count[key.layer];
      ++result.reads;
      if (policy) {
        policy->Touch(key, i);
        policy->Predict(key, hint.probability);
      }
    }
    predictor->Observe(at);
  }
  return result;
}

}  // namespace

absl::StatusOr<ReplayResult> Replay(const std::vector<RoutingTrace>& traces,
                                    const ReplayBudget& budget, std::optional<PolicyKind> policy,
                                    const ReplayPrefetch* prefetch) {
  ReplayResult total;
  const bool predicts = prefetch != nullptr && prefetch->kind != PredictorKind::kOff;
  const bool needs_counts = predicts && (prefetch->kind == PredictorKind::kAffinity ||
                                         prefetch->kind == PredictorKind::kCombined);
  std::shared_ptr<const AffinityTable> shared_counts;
  if (needs_counts && prefetch->calibration != nullptr) {
    absl::StatusOr<AffinityTable> counts =
        AffinityTable::FromTraces(*prefetch->calibration, prefetch->depth);
    if (!counts.ok()) return counts.status();
    shared_counts = std::make_shared<const AffinityTable>(*std::move(counts));
  }
  for (size_t s = 0; s < traces.size(); ++s) {
    const RoutingTrace& trace = traces[s];
    std::unique_ptr<Predictor> predictor;
    if (predicts) {
      std::shared_ptr<const AffinityTable> counts = shared_counts;
      if (needs_counts && counts == nullptr) {  // leave-one-out
        std::vector<RoutingTrace> others;
        for (size_t o = 0; o < traces.size(); ++o) {
          if (o != s) others.push_back(traces[o]);
        }
        absl::StatusOr<AffinityTable> table = AffinityTable::FromTraces(others, prefetch->depth);
        if (!table.ok()) return table.status();
        counts = std::make_shared<const AffinityTable>(*std::move(table));
      }
      absl::StatusOr<std::unique_ptr<Predictor>> made =
          MakePredictor(prefetch->kind, trace.num_layers, trace.num_experts, std::move(counts));
      if (!made.ok()) return made.status();
      predictor = *std::move(made);
    }
    ReplayResult one = ReplaySequence(trace, budget, policy, predictor.get(), prefetch);
    total.requests += one.requests;
    total.hits += one.hits;
    total.reads += one.reads;
  }
  return total;
}

absl::StatusOr<std::vector<PrefetchEvalResult>> EvaluatePrefetch(
    PredictorKind kind, const std::vector<RoutingTrace>& traces,
    const std::vector<RoutingTrace>* calibration, const std::vector<int>& depths,
    const std::vector<int>& candidates) {
  if (traces.empty()) return absl::InvalidArgumentError("no traces to evaluate on");
  const int max_depth = depths.empty() ? 1 : *std::max_element(depths.begin(), depths.end());
  const bool needs_counts = kind == PredictorKind::kAffinity || kind == PredictorKind::kCombined;
  auto evaluate = [&](const std::vector<RoutingTrace>& on, const std::vector<RoutingTrace>* from)
      -> absl::StatusOr<std::vector<PrefetchEvalResult>> {
    std::shared_ptr<const AffinityTable> table;
    if (needs_counts && from != nullptr) {
      absl::StatusOr<AffinityTable> counts = AffinityTable::FromTraces(*from, max_depth);
      if (!counts.ok()) return counts.status();
      table = std::make_shared<const AffinityTable>(*std::move(counts));
    }
    absl::StatusOr<std::unique_ptr<Predictor>> predictor =
        MakePredictor(kind, on.front().num_layers, on.front().num_experts, std::move(table));
    if (!predictor.ok()) return predictor.status();
    return EvaluateOnTraces(**predictor, on, depths, candidates);
  };
  if (calibration != nullptr || !needs_counts) return evaluate(traces, calibration);
  if (traces.size() < 2) {
    return absl::InvalidArgumentError(
        "leave-one-out calibration needs at least two sequences (or give a calibration file)");
  }
  std::vector<PrefetchEvalResult> pooled;
  for (size_t held_out = 0; held_out < traces.size(); ++held_out) {
    std::vector<RoutingTrace> others;
    for (size_t i = 0; i < traces.size(); ++i) {
      if (i != held_out) others.push_back(traces[i]);
    }
    absl::StatusOr<std::vector<PrefetchEvalResult>> one =
        evaluate(std::vector<RoutingTrace>{traces[held_out]}, &others);
    if (!one.ok()) return one.status();
    if (pooled.empty()) {
      pooled = *std::move(one);
      continue;
    }
    for (size_t r = 0; r < pooled.size(); ++r) {
      pooled[r].hits += (*one)[r].hits;
      pooled[r].chosen += (*one)[r].chosen;
      pooled[r].proposed += (*one)[r].proposed;
    }
  }
  return pooled;
}

}  // namespace moed::cache
