#include "scheduler/sampling_params.h"

#include <cmath>

#include "absl/strings/str_cat.h"

namespace moed::scheduler {
namespace {

absl::Status Bad(const char* field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat("sampling.", field, " ", why));
}

}  // namespace

absl::Status ValidateSamplingParams(const SamplingParams& params, uint32_t vocab_size) {
  if (!std::isfinite(params.temperature) || params.temperature < 0) {
    return Bad("temperature", absl::StrCat("must be >= 0, not ", params.temperature));
  }
  if (!std::isfinite(params.top_p) || params.top_p <= 0 || params.top_p > 1) {
    return Bad("top_p", absl::StrCat("must be in (0, 1], not ", params.top_p));
  }
  if (!std::isfinite(params.min_p) || params.min_p < 0 || params.min_p > 1) {
    return Bad("min_p", absl::StrCat("must be in [0, 1], not ", params.min_p));
  }
  for (auto [name, value] : {std::pair{"presence_penalty", params.presence_penalty},
                             std::pair{"frequency_penalty", params.frequency_penalty}}) {
    if (!std::isfinite(value) || value < -2 || value > 2) {
      return Bad(name, absl::StrCat("must be in [-2, 2], not ", value));
    }
  }
  if (!std::isfinite(params.repetition_penalty) || params.repetition_penalty <= 0) {
    return Bad("repetition_penalty", absl::StrCat("must be > 0, not ", params.repetition_penalty));
  }
  if (params.top_logprobs > kMaxTopLogprobs) {
    return Bad("top_logprobs", absl::StrCat("must be at most ", kMaxTopLogprobs));
  }
  if (params.stop.size() > kMaxStopStrings) {
    return Bad("stop", absl::StrCat("has more than ", kMaxStopStrings, " strings"));
  }
  for (const std::string& stop : params.stop) {
    if (stop.empty()) return Bad("stop", "contains an empty string");
    if (stop.size() > kMaxStopStringBytes) {
      return Bad("stop",
                 absl::StrCat("contains a string longer than ", kMaxStopStringBytes, " bytes"));
    }
  }
  for (uint32_t id : params.stop_token_ids) {
    if (id >= vocab_size) {
      return Bad("stop_token_ids",
                 absl::StrCat("contains ", id, ", outside the vocabulary of ", vocab_size));
    }
  }
  return absl::OkStatus();
}

}  // namespace moed::scheduler
