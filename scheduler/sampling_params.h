// Sampling parameters as the scheduler sees them, independent of any wire format.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace moed::scheduler {

struct SamplingParams {
  uint32_t max_tokens = 0;  // 0: up to the end of the context
  float temperature = 1.0f;
  float top_p = 1.0f;
  uint32_t top_k = 0;
  float min_p = 0.0f;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  std::vector<uint32_t> stop_token_ids;
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  float repetition_penalty = 1.0f;
  bool ignore_eos = false;
  bool logprobs = false;
  uint32_t top_logprobs = 0;
};

inline constexpr uint32_t kMaxTopLogprobs = 20;
inline constexpr size_t kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;

// INVALID_ARGUMENT naming the first bad field, for a request against a vocabulary of
// `vocab_size` tokens.
absl::Status ValidateSamplingParams(const SamplingParams& params, uint32_t vocab_size);

}  // namespace moed::scheduler
