#include "model/quality_eval.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "model/generate.h"

namespace moed::model {
namespace {

// log softmax of `logits`, in double.
std::vector<double> LogSoftmax(const std::vector<float>& logits) {
  const double top = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - top);
  const double log_sum = top + std::log(sum);
  std::vector<double> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = static_cast<double>(logits[i]) - log_sum;
  return out;
}

}  // namespace

double KlDivergence(const std::vector<float>& p_logits, const std::vector<float>& q_logits) {
  const std::vector<double> log_p = LogSoftmax(p_logits), log_q = LogSoftmax(q_logits);
  double kl = 0;
  for (size_t i = 0; i < log_p.size(); ++i) kl += std::exp(log_p[i]) * (log_p[i] - log_q[i]);
  return std::max(0.0, kl);  // rounding can leave a tiny negative for equal rows
}

absl::StatusOr<QualityResult> EvaluateQuality(Model& model,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              int max_tokens, Precision loosest) {
  if (prompts.empty()) return absl::InvalidArgumentError("no prompts to evaluate");
  if (max_tokens < 0) return absl::InvalidArgumentError("max_tokens must be >= 0");
  const int64_t context = model.config().max_position_embeddings;
  QualityResult result;
  double kl_sum = 0, greedy_sum = 0;
  uint64_t agreeing = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& prompt = prompts[i];
    if (prompt.empty()) return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " is empty"));
    if (static_cast<int64_t>(prompt.size()) > context) {
      return absl::InvalidArgumentError(absl::StrCat("prompt ", i, " has ", prompt.size(),
                                                     " tokens, over the context of ", context));
    }
    const int steps = static_cast<int>(
        std::min<int64_t>(max_tokens, context - static_cast<int64_t>(prompt.size())));
    absl::StatusOr<GreedyResult> exact = ScoreAndGreedy(model, prompt, steps);
    if (!exact.ok()) return exact.status();
    std::vector<int32_t> forced = prompt;
    forced.insert(forced.end(), exact->greedy.begin(), exact->greedy.end());
    absl::StatusOr<ScoredTokens> reference = ScoreTokens(model, forced);
    if (!reference.ok()) return reference.status();
    absl::StatusOr<ScoredTokens> policy = ScoreTokens(model, forced, loosest);
    if (!policy.ok()) return policy.status();
    const int64_t vocab = model.config().vocab_size;
    for (size_t r = 0; r < reference->logits.size(); ++r) {
      kl_sum += KlDivergence(reference->logits[r], policy->logits[r]);
      agreeing +=
          Argmax(reference->logits[r].data(), vocab) == Argmax(policy->logits[r].data(), vocab) ? 1
                                                                                                : 0;
      ++result.positions;
    }
    absl::StatusOr<GreedyResult> free_run = ScoreAndGreedy(model, prompt, steps, loosest);
    if (!free_run.ok()) return free_run.status();
    size_t same = 0;
    while (same < exact->greedy.size() && exact->greedy[same] == free_run->greedy[same]) ++same;
    greedy_sum += static_cast<double>(same);
    result.fallbacks += policy->fallbacks + free_run->fallbacks;
    ++result.prompts;
  }
  result.kl_mean = kl_sum / static_cast<double>(result.positions);
  result.top1_agreement = static_cast<double>(agreeing) / static_cast<double>(result.positions);
  result.greedy_agreement_tokens = greedy_sum / static_cast<double>(result.prompts);
  return result;
}

}  // namespace moed::model
