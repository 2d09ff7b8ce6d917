// Admission checks on sampling parameters, before a request is queued.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "model/sampler.h"

namespace moed::scheduler {

using SamplingParams = model::SamplingParams;

inline constexpr uint32_t kMaxTopLogprobs = 20;
inline constexpr size_t kMaxStopStrings = 16;
inline constexpr size_t kMaxStopStringBytes = 256;

// INVALID_ARGUMENT naming the first bad field, for a request against a vocabulary of
// `vocab_size` tokens.
absl::Status ValidateSamplingParams(const SamplingParams& params, uint32_t vocab_size);

}  // namespace moed::scheduler
