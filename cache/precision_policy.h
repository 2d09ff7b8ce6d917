// When an expert whose full copy is not resident may run from a low-precision copy instead of
// waiting for the full one. Beside the eviction and prefetch policies; the cache asks it once
// per (layer, expert) use, with every token routed to that expert in the step.
#pragma once

#include <cstdint>
#include <limits>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "model/expert_provider.h"

namespace moed::cache {

enum class PrecisionPolicyKind {
  kExact,      // never: results bitwise equal to all-resident execution
  kThreshold,  // a token whose gate weight is below τ, or whose rank is at least r
  kAlways,     // every miss
};
// "exact", "threshold", "always"
absl::StatusOr<PrecisionPolicyKind> ParsePrecisionPolicyKind(absl::string_view name);
absl::string_view PrecisionPolicyName(PrecisionPolicyKind kind);

struct PrecisionPolicyOptions {
  PrecisionPolicyKind kind = PrecisionPolicyKind::kExact;
  // The low-precision copy a fallback runs from (int8 or int4).
  model::Precision fallback = model::Precision::kInt4;
  // threshold: a token may fall back when its gate weight for the expert is below this ...
  double threshold = 0;
  // ... or when the expert's rank among the token's experts (0: the first) is at least this.
  int min_rank = std::numeric_limits<int>::max();
  // Keep the low-precision copy of every expert resident when the budget allows, so that a
  // miss that may fall back never waits for the disk. (With or without it, an expert that ran
  // from its fallback copy has its full copy read when the disk is idle.)
  bool low_bit_floor = false;
};

// Checks the options against each other: the fallback copy is int8 or int4, τ in [0, 1],
// r ≥ 0, and a floor only with a policy that falls back.
absl::Status ValidatePrecisionPolicy(const PrecisionPolicyOptions& options);

// One token's claim on an expert of a layer.
struct TokenUse {
  float gate_weight = 0;
  int rank = 0;
  // The loosest copy the token's request accepts (kSource: exact).
  model::Precision loosest = model::Precision::kSource;
};

class PrecisionPolicy {
 public:
  explicit PrecisionPolicy(const PrecisionPolicyOptions& options) : options_(options) {}
  const PrecisionPolicyOptions& options() const { return options_; }
  bool falls_back() const { return options_.kind != PrecisionPolicyKind::kExact; }

  // Whether the expert may run from its low-precision copy when its full copy is missing: only
  // when every token routed to it may (one exact token, or one the policy keeps at full
  // precision, makes the expert wait for its full copy, which then serves every token).
  bool MayFallBack(absl::Span<const TokenUse> tokens) const;

 private:
  bool TokenMayFallBack(const TokenUse& token) const;
  PrecisionPolicyOptions options_;
};

}  // namespace moed::cache
