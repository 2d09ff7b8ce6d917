#include "scheduler/step_selection.h"

#include <algorithm>
#include <limits>
#include <numeric>

namespace moed::scheduler {
namespace {

bool IsResident(const ResidentSet& resident, size_t layer, int expert) {
  return layer < resident.size() && expert >= 0 &&
         static_cast<size_t>(expert) < resident[layer].size() &&
         resident[layer][static_cast<size_t>(expert)];
}

}  // namespace

int OverdueAfter(size_t running, size_t max_batch, int max_delay_steps) {
  const size_t batch = std::max<size_t>(1, max_batch);
  const size_t turns = (running + batch - 1) / batch;
  return static_cast<int>(turns == 0 ? 0 : turns - 1) + max_delay_steps;
}

double ResidentFraction(const StepCandidate& c, const ResidentSet& resident) {
  size_t total = 0, hits = 0;
  for (size_t layer = 0; layer < c.predicted.size(); ++layer) {
    for (int e : c.predicted[layer]) {
      ++total;
      hits += IsResident(resident, layer, e) ? 1 : 0;
    }
  }
  return total == 0 ? 0.0 : static_cast<double>(hits) / static_cast<double>(total);
}

std::vector<size_t> ChooseForStep(const std::vector<StepCandidate>& candidates, size_t max_batch,
                                  const ResidentSet* resident) {
  std::vector<size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), size_t{0});
  auto older = [&](size_t i, size_t j) {
    const StepCandidate& a = candidates[i];
    const StepCandidate& b = candidates[j];
    if (a.overdue != b.overdue) return a.overdue;
    if (a.last_stepped != b.last_stepped) return a.last_stepped < b.last_stepped;
    return a.arrival < b.arrival;
  };
  std::stable_sort(order.begin(), order.end(), older);
  const size_t take = std::min(max_batch, order.size());
  if (resident == nullptr) {
    order.resize(take);
    return order;
  }

  // Expert-aware: the overdue first, then greedily by predicted new experts.
  std::vector<size_t> chosen;
  std::vector<bool> taken(candidates.size(), false);
  ResidentSet covered = *resident;
  auto choose = [&](size_t i) {
    chosen.push_back(i);
    taken[i] = true;
    const auto& predicted = candidates[i].predicted;
    if (covered.size() < predicted.size()) covered.resize(predicted.size());
    for (size_t layer = 0; layer < predicted.size(); ++layer) {
      for (int e : predicted[layer]) {
        if (e < 0) continue;
        if (covered[layer].size() <= static_cast<size_t>(e))
          covered[layer].resize(static_cast<size_t>(e) + 1);
        covered[layer][static_cast<size_t>(e)] = true;
      }
    }
  };
  for (size_t i : order) {
    if (chosen.size() < take && candidates[i].overdue) choose(i);
  }
  while (chosen.size() < take) {
    size_t best_cost = std::numeric_limits<size_t>::max();
    size_t best = 0;
    for (size_t i : order) {  // oldest first, so ties go to the least recently stepped
      if (taken[i]) continue;
      const StepCandidate& c = candidates[i];
      // Not started yet: its prompt stages what it stages whenever it runs, so it costs
      // nothing to run it now, and time to first token stays that of round-robin.
      size_t cost = 0;
      for (size_t layer = 0; layer < c.predicted.size(); ++layer) {
        for (int e : c.predicted[layer]) cost += IsResident(covered, layer, e) ? 0 : 1;
      }
      if (cost < best_cost) {
        best_cost = cost;
        best = i;
      }
    }
    choose(best);
  }
  return chosen;
}

}  // namespace moed::scheduler
