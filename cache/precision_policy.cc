#include "cache/precision_policy.h"

#include "absl/strings/str_cat.h"

namespace moed::cache {

absl::StatusOr<PrecisionPolicyKind> ParsePrecisionPolicyKind(absl::string_view name) {
  if (name == "exact") return PrecisionPolicyKind::kExact;
  if (name == "threshold") return PrecisionPolicyKind::kThreshold;
  if (name == "always") return PrecisionPolicyKind::kAlways;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision policy \"", name, "\" (exact, threshold or always)"));
}

absl::string_view PrecisionPolicyName(PrecisionPolicyKind kind) {
  switch (kind) {
    case PrecisionPolicyKind::kExact:
      return "exact";
    case PrecisionPolicyKind::kThreshold:
      return "threshold";
    case PrecisionPolicyKind::kAlways:
      return "always";
  }
  return "exact";
}

absl::Status ValidatePrecisionPolicy(const PrecisionPolicyOptions& options) {
  if (options.fallback == model::Precision::kSource) {
    return absl::InvalidArgumentError("the fallback precision must be int8 or int4");
  }
  if (!(options.threshold >= 0 && options.threshold <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("fallback threshold ", options.threshold, " is outside [0, 1]"));
  }
  if (options.min_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("fallback minimum rank ", options.min_rank, " is negative"));
  }
  if (options.low_bit_floor && options.kind == PrecisionPolicyKind::kExact) {
    return absl::InvalidArgumentError(
        "a low-bit floor needs a precision policy that falls back (threshold or always)");
  }
  return absl::OkStatus();
}

bool PrecisionPolicy::TokenMayFallBack(const TokenUse& token) const {
  if (model::PrecisionLooseness(token.loosest) < model::PrecisionLooseness(options_.fallback)) {
    return false;  // the request does not accept a copy that coarse
  }
  switch (options_.kind) {
    case PrecisionPolicyKind::kExact:
      return false;
    case PrecisionPolicyKind::kThreshold:
      return token.gate_weight < options_.threshold || token.rank >= options_.min_rank;
    case PrecisionPolicyKind::kAlways:
      return true;
  }
  return false;
}

bool PrecisionPolicy::MayFallBack(absl::Span<const TokenUse> tokens) const {
  if (!falls_back() || tokens.empty()) return false;
  for (const TokenUse& token : tokens) {
    if (!TokenMayFallBack(token)) return false;
  }
  return true;
}

}  // namespace moed::cache
