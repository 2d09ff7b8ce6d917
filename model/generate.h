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
  uint64_t fallbacks = 0;                         // expert uses that ran from a low-precision copy
};

// Index of the largest value; ties go to the lowest index.
int32_t Argmax(const float* values, int64_t count);

// Prefills `prompt` in one batch (logits for every position), then decodes `steps` tokens one
// at a time, feeding each argmax back.
// `loosest`: the loosest expert copy the run accepts (kSource: exact).
absl::StatusOr<GreedyResult> ScoreAndGreedy(Model& model, const std::vector<int32_t>& prompt,
                                            int steps, Precision loosest = Precision::kSource);

// The logits after every token of `tokens`, fed in one step (teacher forcing).
struct ScoredTokens {
  std::vector<std::vector<float>> logits;  // one row per position
  uint64_t fallbacks = 0;
};
absl::StatusOr<ScoredTokens> ScoreTokens(Model& model, const std::vector<int32_t>& tokens,
                                         Precision loosest = Precision::kSource);

}  // namespace moed::model
