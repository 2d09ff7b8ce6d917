#include "server/serving_core.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "util/status_macros.h"

namespace moed::server {

ServingCore::ServingCore(ServingParts parts) : parts_(std::move(parts)) {
  if (parts_.tokenizer == nullptr || parts_.max_context_tokens == 0) return;
  // A token's vocabulary string is at least as long as the text it covers (byte-level and
  // Metaspace symbols take 2-3 bytes for 1, byte-fallback "<0x41>" 6), and normalization
  // shrinks text at most 3x (NFC composition, at worst three Hangul jamo into one syllable).
  // So a prompt longer than 3 x longest token x context has more tokens than the context.
  for (int32_t id = 0; id < parts_.tokenizer->vocab_size(); ++id) {
    if (std::optional<std::string> text = parts_.tokenizer->TokenText(id); text.has_value()) {
      longest_token_bytes_ = std::max(longest_token_bytes_, text->size());
    }
  }
  const size_t fits = 3 * std::max<size_t>(longest_token_bytes_, 1) * parts_.max_context_tokens;
  max_prompt_bytes_ = std::min(kMaxPromptBytes, fits);
}

std::string ServingCore::NewRequestId(absl::string_view prefix) {
  return absl::StrCat(prefix, next_id_.fetch_add(1));
}

absl::StatusOr<std::vector<int32_t>> ServingCore::Tokenize(const std::string& text,
                                                           bool add_special) const {
  if (parts_.tokenizer == nullptr) {
    return absl::FailedPreconditionError("this model has no tokenizer.json");
  }
  if (text.size() > kMaxPromptBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("text is longer than ", kMaxPromptBytes >> 20, " MiB"));
  }
  return parts_.tokenizer->Encode(text, add_special);
}

absl::StatusOr<std::string> ServingCore::RenderChat(const model::ChatTemplateInput& input) const {
  if (parts_.chat_template == nullptr) {
    return absl::FailedPreconditionError(
        "this model has no chat template (give the daemon --chat-template FILE)");
  }
  return parts_.chat_template->Render(input, model::LocalNow());
}

absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> ServingCore::Submit(GenerateInput input) {
  absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> handle = SubmitToScheduler(input);
  if (!handle.ok()) RecordRefusal(handle.status().code());
  return handle;
}

absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> ServingCore::SubmitToScheduler(
    GenerateInput& input) {
  scheduler::GenerationRequest out;
  if (input.request_id.size() > kMaxRequestIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("request_id is ", input.request_id.size(),
                                                   " bytes, more than the limit of ",
                                                   kMaxRequestIdBytes));
  }
  const bool has_text = input.prompt_text.has_value() && !input.prompt_text->empty();
  const bool has_ids = !input.prompt_ids.empty();
  if (has_text == has_ids) {
    return absl::InvalidArgumentError("give exactly one of prompt and prompt_token_ids");
  }
  if (has_text) {
    if (parts_.tokenizer == nullptr) {
      return absl::InvalidArgumentError(
          "this model has no tokenizer: send prompt_token_ids instead of prompt");
    }
    if (input.prompt_text->size() > max_prompt_bytes_) {
      if (max_prompt_bytes_ == kMaxPromptBytes) {
        return absl::InvalidArgumentError(
            absl::StrCat("prompt is longer than ", kMaxPromptBytes >> 20, " MiB"));
      }
      return absl::InvalidArgumentError(absl::StrCat(
          "the prompt's ", input.prompt_text->size(), " bytes are more tokens than the context of ",
          parts_.max_context_tokens, " (no token covers more than ", longest_token_bytes_,
          " bytes); refused before tokenizing"));
    }
    MOED_ASSIGN_OR_RETURN(out.prompt,
                          parts_.tokenizer->Encode(*input.prompt_text, input.add_special_tokens));
  } else {
    out.prompt = std::move(input.prompt_ids);
  }
  if (input.loosest_precision.has_value() &&
      model::PrecisionLooseness(parts_.served_precision) >
          model::PrecisionLooseness(*input.loosest_precision)) {
    return absl::FailedPreconditionError(
        absl::StrCat("the request refuses the ", cache::PrecisionName(parts_.served_precision),
                     " expert copies this daemon runs (--expert-precision ",
                     cache::PrecisionName(parts_.served_precision), ")"));
  }
  // What the request does not bound, the daemon's policy decides.
  out.loosest_precision =
      input.loosest_precision.value_or(parts_.fallback_precision.value_or(parts_.served_precision));
  out.sampling = std::move(input.sampling);
  out.skip_special_tokens = input.skip_special_tokens;
  out.priority = input.priority;
  out.deadline = input.deadline;
  out.id = input.request_id.empty() ? NewRequestId("req-") : std::move(input.request_id);
  out.default_seed =
      input.default_seed != 0
          ? input.default_seed
          : std::hash<std::string>()(out.id) ^
                static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return parts_.scheduler->Submit(std::move(out));
}

}  // namespace moed::server
