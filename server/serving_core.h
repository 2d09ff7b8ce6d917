// The serving core: what every interface (gRPC, the OpenAI HTTP API) does with a request,
// knowing no wire. It validates and tokenizes prompts, renders chat with the model's template,
// checks a request's expert precision against the daemon's, and submits to the scheduler.
// Adapters translate their wire format into GenerateInput and the scheduler's events back.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "cache/expert_cache.h"
#include "model/chat_output_parser.h"
#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "scheduler/scheduler.h"
#include "server/metrics.h"

namespace moed::server {

struct GenerateInput {
  std::string request_id;  // empty: the core names it
  // Exactly one of prompt_text and prompt_ids.
  std::optional<std::string> prompt_text;
  std::vector<int32_t> prompt_ids;
  bool add_special_tokens = true;  // for prompt_text
  model::SamplingParams sampling;
  bool skip_special_tokens = true;
  int32_t priority = 0;
  // The loosest expert copy the request accepts; nullopt takes the daemon's.
  std::optional<cache::Precision> loosest_precision;
  std::optional<std::chrono::steady_clock::time_point> deadline;
  // Used when sampling.seed is unset; 0 lets the core pick one.
  uint64_t default_seed = 0;
};

struct ServingParts {
  std::string model_name;
  uint32_t max_context_tokens = 0;
  std::shared_ptr<scheduler::Scheduler> scheduler;
  std::shared_ptr<const model::Tokenizer> tokenizer;         // may be null
  std::shared_ptr<const model::ChatTemplate> chat_template;  // may be null
  model::ToolCallFormat tool_calls = model::ToolCallFormat::kNone;
  model::ReasoningFormat reasoning = model::ReasoningFormat::kNone;
  cache::Precision served_precision = cache::Precision::kSource;
  // The copy the cache's precision policy falls back to; empty when it never does.
  std::optional<cache::Precision> fallback_precision;
  std::shared_ptr<ServingMetrics> metrics;  // null with --metrics false
};

class ServingCore {
 public:
  static constexpr size_t kMaxPromptBytes = 8u << 20;
  // A request id is echoed in every message of its stream: bounded, so that one request
  // cannot multiply its size into the responses.
  static constexpr size_t kMaxRequestIdBytes = 256;

  explicit ServingCore(ServingParts parts);

  // INVALID_ARGUMENT for a bad prompt (both or neither form, too long, text without a
  // tokenizer) and what the scheduler refuses; FAILED_PRECONDITION for a precision the daemon
  // does not run; RESOURCE_EXHAUSTED when the queue is full; UNAVAILABLE while draining.
  absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> Submit(GenerateInput input);

  // The prompt a chat conversation becomes, through the model's template (real clock).
  // FAILED_PRECONDITION when the model has no template.
  absl::StatusOr<std::string> RenderChat(const model::ChatTemplateInput& input) const;

  absl::StatusOr<std::vector<int32_t>> Tokenize(const std::string& text, bool add_special) const;

  // Counts a generate request an adapter refused before Submit (Submit counts its own).
  void RecordRefusal(absl::StatusCode code) const {
    if (parts_.metrics != nullptr) parts_.metrics->RecordRefusal(code);
  }

  // A name for a request that came without one.
  std::string NewRequestId(absl::string_view prefix);

  const ServingParts& parts() const { return parts_; }
  const std::string& model_name() const { return parts_.model_name; }
  bool has_tokenizer() const { return parts_.tokenizer != nullptr; }

 private:
  absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> SubmitToScheduler(GenerateInput& input);

  ServingParts parts_;
  // The most bytes a prompt text can have and still fit the context (kMaxPromptBytes at most):
  // checked before tokenizing, so an oversized prompt costs nothing.
  size_t max_prompt_bytes_ = kMaxPromptBytes;
  size_t longest_token_bytes_ = 0;
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace moed::server
