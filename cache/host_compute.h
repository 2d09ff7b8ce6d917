// When an expert that is in the host tier but not on the GPU runs on the CPU instead of being
// copied over (the split Fiddler, kTransformers and HybriMoE make): whichever is estimated to
// finish sooner, from rates measured at start-up.
#pragma once

#include <cstdint>

#include "absl/status/statusor.h"
#include "cache/store_reader.h"
#include "kernels/backend.h"

namespace moed::cache {

struct HostComputeOptions {
  bool enabled = false;
  // The host computes an expert bitwise as the device does: exact requests may run there too.
  // Otherwise only experts whose every token's request accepts inexact results do (a CPU's
  // sums are not a GPU's, and exact mode promises all-resident logits).
  bool bitwise_equal = false;
  // Copies from the host tier to the device, in bytes per second.
  double copy_bytes_per_second = 0;
  // An expert's FFN on the CPU: a fixed part, plus a part per token routed to it.
  double host_seconds_per_expert = 0;
  double host_seconds_per_token = 0;
};

// Fails unless the rates of an enabled policy are positive and finite.
absl::Status ValidateHostCompute(const HostComputeOptions& options);

struct HostComputeEstimate {
  // The copy waits for the bytes queued on the copy stream ahead of it, then moves its own.
  double copy_seconds = 0;
  double host_seconds = 0;
  bool host_is_faster() const { return host_seconds < copy_seconds; }
};
HostComputeEstimate EstimateHostCompute(const HostComputeOptions& options, uint64_t expert_bytes,
                                        uint64_t queued_copy_bytes, int tokens);

// Measures the rates on this machine: copies of one expert's `precision` slot from pinned
// memory to `device`'s memory on its copy stream, and the expert FFN over 1 and 8 tokens on
// `host` (a backend whose device memory is host memory). `enabled` and `bitwise_equal` are
// left false.
absl::StatusOr<HostComputeOptions> MeasureHostCompute(kernels::Backend& device,
                                                      kernels::Backend& host, const Store& store,
                                                      Precision precision);

}  // namespace moed::cache
