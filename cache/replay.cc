#include "cache/replay.h"

#include <algorithm>
#include <limits>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"

namespace moed::cache {
namespace {

struct Request {
  ExpertKey key;
  uint64_t group;  // requests of one (token, layer) share a group: they are pinned together
};

ReplayResult ReplaySequence(const RoutingTrace& trace, const ReplayBudget& budget,
                            std::optional<PolicyKind> kind) {
  std::vector<Request> requests;
  uint64_t group = 0;
  for (const auto& token : trace.tokens) {
    for (int layer = 0; layer < trace.num_layers; ++layer) {
      if (!token[layer].has_value()) continue;
      for (int e : *token[layer]) requests.push_back({{layer, e}, group});
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

  std::unique_ptr<EvictionPolicy> policy = kind.has_value() ? MakePolicy(*kind) : nullptr;
  absl::flat_hash_map<ExpertKey, uint64_t> resident;  // key -> its next use (for Belady)
  std::vector<int> per_layer_count(static_cast<size_t>(trace.num_layers));
  ReplayResult result;
  for (size_t i = 0; i < requests.size(); ++i) {
    const ExpertKey key = requests[i].key;
    ++result.requests;
    auto it = resident.find(key);
    if (it != resident.end()) {
      ++result.hits;
      it->second = next_use[i];
      if (policy) policy->Touch(key, i);
      continue;
    }
    bool full = budget.per_layer > 0 ? per_layer_count[key.layer] >= budget.per_layer
                                     : static_cast<int>(resident.size()) >= budget.shared;
    if (full) {
      // Candidates: resident, in scope, not pinned by the current (token, layer).
      absl::flat_hash_set<ExpertKey> pinned;
      for (size_t j = i; j-- > 0 && requests[j].group == requests[i].group;)
        pinned.insert(requests[j].key);
      std::vector<ExpertKey> candidates;
      for (const auto& [k, next] : resident) {
        if ((budget.per_layer == 0 || k.layer == key.layer) && !pinned.contains(k))
          candidates.push_back(k);
      }
      if (candidates.empty()) continue;  // cannot cache it: a miss that stays a miss
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
    }
    resident[key] = next_use[i];
    ++per_layer_count[key.layer];
    if (policy) policy->Touch(key, i);
  }
  return result;
}

}  // namespace

ReplayResult Replay(const std::vector<RoutingTrace>& traces, const ReplayBudget& budget,
                    std::optional<PolicyKind> policy) {
  ReplayResult total;
  for (const RoutingTrace& trace : traces) {
    ReplayResult one = ReplaySequence(trace, budget, policy);
    total.requests += one.requests;
    total.hits += one.hits;
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
