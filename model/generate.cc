#include "model/generate.h"

#include "absl/strings/str_cat.h"

namespace moed::model {

int32_t Argmax(const float* values, int64_t count) {
  int64_t best = 0;
  for (int64_t i = 1; i < count; ++i) {
    if (values[i] > values[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

namespace {

uint64_t CountFallbacks(const ForwardOutput& out) {
  uint64_t n = 0;
  for (const ExpertUse& use : out.expert_uses) n += use.served.fallback ? 1 : 0;
  return n;
}

}  // namespace

absl::StatusOr<ScoredTokens> ScoreTokens(Model& model, const std::vector<int32_t>& tokens,
                                         Precision loosest) {
  const ModelConfig& config = model.config();
  if (tokens.empty()) return absl::InvalidArgumentError("no tokens to score");
  if (static_cast<int64_t>(tokens.size()) > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat(tokens.size(), " tokens exceed the context of ",
                                                   config.max_position_embeddings));
  }
  std::unique_ptr<KvCache> cache = model.NewKvCache(static_cast<int64_t>(tokens.size()));
  SequenceInput input{cache.get(), tokens, /*all_logits=*/true, loosest};
  absl::StatusOr<ForwardOutput> out = model.Forward(absl::MakeSpan(&input, 1));
  if (!out.ok()) return out.status();
  ScoredTokens scored;
  const int64_t vocab = config.vocab_size;
  for (int64_t r = 0; r < out->rows; ++r) {
    scored.logits.emplace_back(out->logits.begin() + r * vocab,
                               out->logits.begin() + (r + 1) * vocab);
  }
  scored.fallbacks = CountFallbacks(*out);
  return scored;
}

absl::StatusOr<GreedyResult> ScoreAndGreedy(Model& model, const std::vector<int32_t>& prompt,
                                            int steps, Precision loosest) {
  const ModelConfig& config = model.config();
  if (prompt.empty()) return absl::InvalidArgumentError("the prompt has no tokens");
  if (steps < 0) return absl::InvalidArgumentError("greedy steps must be >= 0");
  int64_t needed = static_cast<int64_t>(prompt.size()) + steps;
  if (needed > config.max_position_embeddings) {
    return absl::InvalidArgumentError(absl::StrCat("prompt (", prompt.size(), " tokens) plus ",
                                                   steps, " steps exceeds the context of ",
                                                   config.max_position_embeddings));
  }
  std::unique_ptr<KvCache> owned_cache = model.NewKvCache(needed);
  KvCache& cache = *owned_cache;
  GreedyResult result;
  result.routing.assign(static_cast<size_t>(config.num_layers), {});
  auto keep_routing = [&](Routing& step) {
    for (size_t layer = 0; layer < step.size(); ++layer) {
      for (auto& token : step[layer]) result.routing[layer].push_back(std::move(token));
    }
  };

  SequenceInput input{&cache, prompt, /*all_logits=*/true, loosest};
  absl::StatusOr<ForwardOutput> out = model.Forward(absl::MakeSpan(&input, 1));
  if (!out.ok()) return out.status();
  const int64_t vocab = config.vocab_size;
  for (int64_t r = 0; r < out->rows; ++r) {
    result.prompt_logits.emplace_back(out->logits.begin() + r * vocab,
                                      out->logits.begin() + (r + 1) * vocab);
  }
  keep_routing(out->routing);
  result.fallbacks += CountFallbacks(*out);
  int32_t next = Argmax(result.prompt_logits.back().data(), vocab);
  for (int s = 0; s < steps; ++s) {
    result.greedy.push_back(next);
    SequenceInput step{&cache, {next}, false, loosest};
    out = model.Forward(absl::MakeSpan(&step, 1));
    if (!out.ok()) return out.status();
    result.greedy_logits.emplace_back(out->logits.begin(), out->logits.begin() + vocab);
    keep_routing(out->routing);
    result.fallbacks += CountFallbacks(*out);
    next = Argmax(out->logits.data(), vocab);
  }
  return result;
}

}  // namespace moed::model
