#include "cache/host_compute.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <vector>

#include "absl/strings/str_cat.h"
#include "util/status_macros.h"

namespace moed::cache {

absl::Status ValidateHostCompute(const HostComputeOptions& options) {
  if (!options.enabled) return absl::OkStatus();
  const double rate = options.copy_bytes_per_second;
  if (!(rate > 0) || !std::isfinite(rate)) {
    return absl::InvalidArgumentError(
        absl::StrCat("host compute needs a positive copy rate, not ", rate, " bytes/s"));
  }
  for (double seconds : {options.host_seconds_per_expert, options.host_seconds_per_token}) {
    if (!(seconds >= 0) || !std::isfinite(seconds)) {
      return absl::InvalidArgumentError(
          absl::StrCat("host compute needs non-negative CPU times, not ", seconds, " s"));
    }
  }
  return absl::OkStatus();
}

HostComputeEstimate EstimateHostCompute(const HostComputeOptions& options, uint64_t expert_bytes,
                                        uint64_t queued_copy_bytes, int tokens) {
  HostComputeEstimate estimate;
  estimate.copy_seconds = static_cast<double>(queued_copy_bytes + expert_bytes) /
                          std::max(options.copy_bytes_per_second, 1e-30);
  estimate.host_seconds =
      options.host_seconds_per_expert + options.host_seconds_per_token * std::max(tokens, 1);
  return estimate;
}

namespace {

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

absl::StatusOr<HostComputeOptions> MeasureHostCompute(kernels::Backend& device,
                                                      kernels::Backend& host, const Store& store,
                                                      Precision precision) {
  if (!host.device().host_memory_is_device_memory()) {
    return absl::InvalidArgumentError("the host backend must compute on host memory");
  }
  const Manifest& manifest = store.manifest();
  auto layout = manifest.layouts.find(precision);
  const BlobEntry* blob = nullptr;
  for (const BlobEntry& entry : manifest.blobs) {
    if (entry.precision == precision) {
      blob = &entry;
      break;
    }
  }
  if (layout == manifest.layouts.end() || blob == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("the store has no ", PrecisionName(precision), " experts to measure"));
  }
  const uint64_t bytes = layout->second.padded_size;
  MOED_ASSIGN_OR_RETURN(kernels::DeviceBuffer pinned, device.device().AllocateHost(bytes));
  MOED_ASSIGN_OR_RETURN(kernels::DeviceBuffer on_device, device.device().Allocate(bytes));
  MOED_RETURN_IF_ERROR(store.ReadBlob(*blob, pinned.as<uint8_t>()));

  HostComputeOptions rates;
  kernels::Stream& copy = device.copy();
  MOED_RETURN_IF_ERROR(copy.CopyToDevice(on_device, 0, pinned.data(), bytes));  // warm-up
  MOED_RETURN_IF_ERROR(copy.Synchronize());
  constexpr int kCopies = 5;
  const auto copies_started = std::chrono::steady_clock::now();
  for (int i = 0; i < kCopies; ++i) {
    MOED_RETURN_IF_ERROR(copy.CopyToDevice(on_device, 0, pinned.data(), bytes));
  }
  MOED_RETURN_IF_ERROR(copy.Synchronize());
  rates.copy_bytes_per_second =
      static_cast<double>(kCopies * bytes) / std::max(SecondsSince(copies_started), 1e-9);

  // The expert FFN on the host over 1 and 8 tokens: the fastest of three runs each.
  const model::ExpertWeights weights = ExpertWeightsInBlob(layout->second, pinned.as<uint8_t>());
  const int64_t width = weights.gate.cols, intermediate = weights.gate.rows;
  constexpr int64_t kTokens = 8;
  std::vector<float> x(static_cast<size_t>(kTokens * width)), out(x.size());
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 37 % 101) - 50) / 50.0f;
  std::vector<int32_t> rows(kTokens);
  for (int32_t i = 0; i < kTokens; ++i) rows[static_cast<size_t>(i)] = i;
  std::vector<float> scratch(
      static_cast<size_t>(kernels::ExpertFfnScratchFloats(kTokens, width, intermediate)));
  kernels::Stream& cpu = host.compute();
  auto time_ffn = [&](int64_t m) -> absl::StatusOr<double> {
    double best = 1e30;
    for (int run = 0; run < 3; ++run) {
      const auto start = std::chrono::steady_clock::now();
      MOED_RETURN_IF_ERROR(cpu.ExpertFfn(weights, x.data(), rows.data(), m, out.data(), rows.data(),
                                         scratch.data()));
      MOED_RETURN_IF_ERROR(cpu.Synchronize());
      best = std::min(best, SecondsSince(start));
    }
    return best;
  };
  MOED_ASSIGN_OR_RETURN(double one, time_ffn(1));
  MOED_ASSIGN_OR_RETURN(double many, time_ffn(kTokens));
  rates.host_seconds_per_token = std::max(0.0, (many - one) / (kTokens - 1));
  rates.host_seconds_per_expert = std::max(0.0, one - rates.host_seconds_per_token);
  return rates;
}

}  // namespace moed::cache
