#include "scheduler/step_selection.h"

#include <algorithm>
#include <numeric>

namespace moed::scheduler {

std::vector<size_t> ChooseForStep(const std::vector<StepCandidate>& candidates, size_t max_batch,
                                  bool expert_aware) {
  std::vector<size_t> order(candidates.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t i, size_t j) {
    const StepCandidate& a = candidates[i];
    const StepCandidate& b = candidates[j];
    if (a.overdue != b.overdue) return a.overdue;
    if (expert_aware && a.residency != b.residency) return a.residency > b.residency;
    if (a.last_stepped != b.last_stepped) return a.last_stepped < b.last_stepped;
    return a.arrival < b.arrival;
  });
  if (order.size() > max_batch) order.resize(max_batch);
  return order;
}

}  // namespace moed::scheduler
