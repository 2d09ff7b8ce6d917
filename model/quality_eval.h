// What running experts from low-precision copies costs in quality, measured against exact
// mode on the same model: what `moectl eval` reports.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "model/model.h"

namespace moed::model {

struct QualityResult {
  int prompts = 0;
  uint64_t positions = 0;  // scored positions, pooled over the prompts
  // Mean over positions of KL(exact ‖ policy) of the next-token distributions, in nats.
  double kl_mean = 0;
  // Share of positions whose argmax is the same.
  double top1_agreement = 0;
  // Mean over prompts of how many greedy tokens the policy's free run shares with exact's
  // before the first difference.
  double greedy_agreement_tokens = 0;
  uint64_t fallbacks = 0;  // expert uses of the policy's runs that ran from a low-precision copy
};

// For each prompt: exact mode's greedy continuation of `max_tokens` tokens (fewer where the
// context ends); then the prompt and that continuation fed in one step, once exact and once
// accepting `loosest` copies (teacher forcing), compared at every position; then the policy's
// own greedy run, compared with exact's. The model's provider applies its precision policy to
// the runs that accept low-precision copies; exact runs stay exact beside them.
absl::StatusOr<QualityResult> EvaluateQuality(Model& model,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              int max_tokens, Precision loosest);

// KL(p ‖ q) of the softmax distributions of two logit rows, in nats.
double KlDivergence(const std::vector<float>& p_logits, const std::vector<float>& q_logits);

}  // namespace moed::model
