#include "tools/replay/batching_replay.h"

#include <algorithm>
#include <deque>
#include <memory>

#include "absl/container/flat_hash_set.h"
#include "scheduler/step_selection.h"

namespace moed::tools {
namespace {

using cache::ExpertKey;

// One request: a window of one trace's decode tokens.
struct Request {
  const cache::RoutingTrace* trace = nullptr;
  size_t begin = 0, end = 0, next = 0;
  uint64_t arrival = 0;
  uint64_t last_stepped = 0;
  int skipped = 0;
  bool stepped = false;  // has a previous token whose experts say what it needs next
};

// The expert tier: per-layer shares or one pool, evicting by `policy` among the resident
// experts the current layer does not use.
class SimulatedTier {
 public:
  SimulatedTier(const cache::ReplayBudget& budget, cache::PolicyKind policy, int layers)
      : budget_(budget), policy_(cache::MakePolicy(policy)), per_layer_(layers, 0) {}

  scheduler::ResidentSet Snapshot(int experts) const {
    scheduler::ResidentSet set(per_layer_.size(), std::vector<bool>(static_cast<size_t>(experts)));
    for (const ExpertKey& k : resident_)
      set[static_cast<size_t>(k.layer)][static_cast<size_t>(k.expert)] = true;
    return set;
  }

  // Serves one layer of a step; returns how many experts had to be staged.
  uint64_t Serve(int layer, const std::vector<int>& experts) {
    uint64_t staged = 0;
    for (int e : experts) {
      ExpertKey key{layer, e};
      ++tick_;
      if (resident_.contains(key)) {
        policy_->Touch(key, tick_);
        continue;
      }
      ++staged;
      bool full = budget_.per_layer > 0
                      ? per_layer_[static_cast<size_t>(layer)] >= budget_.per_layer
                      : static_cast<int>(resident_.size()) >= budget_.shared;
      if (full) {
        std::vector<ExpertKey> candidates;
        for (const ExpertKey& k : resident_) {
          if ((budget_.per_layer == 0 || k.layer == layer) &&
              !(k.layer == layer &&
                std::find(experts.begin(), experts.end(), k.expert) != experts.end()))
            candidates.push_back(k);
        }
        if (candidates.empty()) continue;  // streamed through without staying
        std::sort(candidates.begin(), candidates.end(), [](const ExpertKey& a, const ExpertKey& b) {
          return a.layer != b.layer ? a.layer < b.layer : a.expert < b.expert;
        });
        ExpertKey victim = policy_->Victim(candidates);
        policy_->Remove(victim);
        resident_.erase(victim);
        --per_layer_[static_cast<size_t>(victim.layer)];
      }
      resident_.insert(key);
      ++per_layer_[static_cast<size_t>(layer)];
      policy_->Touch(key, tick_);
    }
    return staged;
  }

 private:
  cache::ReplayBudget budget_;
  std::unique_ptr<cache::EvictionPolicy> policy_;
  absl::flat_hash_set<ExpertKey> resident_;
  std::vector<int> per_layer_;
  uint64_t tick_ = 0;
};

}  // namespace

BatchingReplayResult ReplayBatching(const std::vector<cache::RoutingTrace>& traces,
                                    const BatchingReplayOptions& options) {
  BatchingReplayResult result;
  if (traces.empty()) return result;
  const int layers = traces.front().num_layers;
  // Windows in the order k-th window of every trace, then the (k+1)-th: requests running
  // together come from different texts and positions.
  std::deque<Request> waiting;
  const auto window = static_cast<size_t>(std::max(1, options.window));
  for (size_t k = 0;; ++k) {
    bool any = false;
    for (const cache::RoutingTrace& trace : traces) {
      if (k * window >= trace.tokens.size()) continue;
      any = true;
      Request r;
      r.trace = &trace;
      r.begin = r.next = k * window;
      r.end = std::min(trace.tokens.size(), (k + 1) * window);
      r.arrival = waiting.size();
      waiting.push_back(r);
    }
    if (!any) break;
  }
  result.requests = waiting.size();

  SimulatedTier tier(options.budget, options.policy, layers);
  std::vector<Request> running;
  uint64_t step = 0;
  while (!waiting.empty() || !running.empty()) {
    while (running.size() < static_cast<size_t>(options.max_running) && !waiting.empty()) {
      running.push_back(waiting.front());
      waiting.pop_front();
    }
    ++step;
    std::vector<size_t> chosen;
    if (running.size() <= static_cast<size_t>(options.max_batch)) {
      for (size_t i = 0; i < running.size(); ++i) chosen.push_back(i);
    } else {
      const int overdue_after = scheduler::OverdueAfter(
          running.size(), static_cast<size_t>(options.max_batch), options.max_delay_steps);
      std::vector<scheduler::StepCandidate> candidates;
      for (const Request& r : running) {
        scheduler::StepCandidate c;
        c.overdue = r.skipped >= overdue_after;
        if (options.expert_aware && (r.stepped || options.oracle)) {
          const auto& previous = r.trace->tokens[options.oracle ? r.next : r.next - 1];
          c.predicted.resize(static_cast<size_t>(layers));
          for (size_t l = 0; l < previous.size(); ++l) {
            if (previous[l].has_value()) c.predicted[l] = *previous[l];
          }
        }
        c.last_stepped = r.last_stepped;
        c.arrival = r.arrival;
        candidates.push_back(std::move(c));
      }
      scheduler::ResidentSet resident;
      if (options.expert_aware) resident = tier.Snapshot(traces.front().num_experts);
      chosen = scheduler::ChooseForStep(candidates, static_cast<size_t>(options.max_batch),
                                        options.expert_aware ? &resident : nullptr);
    }
    for (Request& r : running) ++r.skipped;
    for (int l = 0; l < layers; ++l) {
      std::vector<int> experts;  // sorted, so that runs repeat exactly
      for (size_t i : chosen) {
        const auto& token = running[i].trace->tokens[running[i].next];
        if (token[static_cast<size_t>(l)].has_value())
          experts.insert(experts.end(), token[static_cast<size_t>(l)]->begin(),
                         token[static_cast<size_t>(l)]->end());
      }
      std::sort(experts.begin(), experts.end());
      experts.erase(std::unique(experts.begin(), experts.end()), experts.end());
      result.expert_uses += experts.size();
      result.staged += tier.Serve(l, experts);
    }
    for (size_t i : chosen) {
      Request& r = running[i];
      r.skipped = 0;
      r.last_stepped = step;
      r.stepped = true;
      ++r.next;
      ++result.tokens;
    }
    running.erase(std::remove_if(running.begin(), running.end(),
                                 [](const Request& r) { return r.next >= r.end; }),
                  running.end());
  }
  result.steps = step;
  return result;
}

}  // namespace moed::tools
