// How a step's sequences are chosen when more are admitted than fit in one step. Pure, so the
// scheduler and the trace-driven batching replay (moed-replay --batching) run the same rule.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace moed::scheduler {

// resident[layer][expert]: whether the expert is in the device tier now.
using ResidentSet = std::vector<std::vector<bool>>;

struct StepCandidate {
  // Passed over OverdueAfter(...) steps in a row already: goes first, whatever it needs.
  bool overdue = false;
  // The experts its previous token used, by layer: the best guess of what its next token
  // needs (consecutive tokens share experts far more often than chance). Empty while it is
  // still prefilling.
  std::vector<std::vector<int>> predicted;
  uint64_t last_stepped = 0;  // step number it last ran in
  uint64_t arrival = 0;       // admission order
};

// Indices into `candidates` of the sequences to step, at most `max_batch`, in the order
// chosen. Overdue ones come first. Without `resident` (round-robin) the rest follow least
// recently stepped, then first come. With it (expert-aware) the rest are added one at a time,
// each the candidate whose predicted experts add the fewest not already resident nor brought
// in by those chosen before it, so the step's expert union stays small. A candidate with no
// prediction (its prompt has not started) costs nothing: its prompt stages what it stages
// whenever it runs, and running it early keeps time to first token at round-robin's. Ties:
// least recently stepped, then first come.
std::vector<size_t> ChooseForStep(const std::vector<StepCandidate>& candidates, size_t max_batch,
                                  const ResidentSet* resident);

// How many steps in a row a sequence may be passed over before it is overdue: its wait under
// round-robin (ceil(running / max_batch) - 1) plus `max_delay_steps`, so the bound means
// "at most this many steps later than its round-robin turn" whatever the ratio.
int OverdueAfter(size_t running, size_t max_batch, int max_delay_steps);

// Predicted experts of `c` that are resident: for reports and tests.
double ResidentFraction(const StepCandidate& c, const ResidentSet& resident);

}  // namespace moed::scheduler
