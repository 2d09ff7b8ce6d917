// How a step's sequences are chosen when more are admitted than fit in one step. Pure, so the
// scheduler and the trace-driven batching replay (moed-replay --batching) run the same rule.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moed::scheduler {

struct StepCandidate {
  // Left out of max_skipped_steps steps in a row already: goes first, whatever its residency.
  bool overdue = false;
  // Fraction of the experts of its previous step that are resident now (0.5 when unknown).
  double residency = 0.5;
  uint64_t last_stepped = 0;  // step number it last ran in
  uint64_t arrival = 0;       // admission order
};

// Indices into `candidates` of the sequences to step, at most `max_batch` of them: overdue
// ones first, then by residency (when `expert_aware`), then least recently stepped, then
// first come.
std::vector<size_t> ChooseForStep(const std::vector<StepCandidate>& candidates, size_t max_batch,
                                  bool expert_aware);

}  // namespace moed::scheduler
