// Scoring a prompt and continuing it greedily: what `moectl logits` prints and what the
// golden conformance test checks.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace moed::model {

struct GreedyResult {
  std::vector<std::vector<float>> prompt_logits;  // one row per prompt position
  std::vector<int32_t> greedy;                    // greedy continuation
  std::vector<std::vector<float>> greedy_logits;  // logits after feeding greedy[s]
  Routing routing;                                // per layer, per token (prompt then greedy)
};

// Index of the largest value; ties go to the lowest index.
int32_t Argmax(const float* values, int64_t count);

// Prefills `prompt` in one batch (logits for every position), then decodes `steps` tokens one
// at a time, feeding each argmax back.
absl::StatusOr<GreedyResult> ScoreAndGreedy(Model& model, const std::vector<int32_t>& prompt,
                                            int steps);

}  // namespace moed::model
