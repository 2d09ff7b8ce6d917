// Prometheus metrics: what requests did (recorded by the scheduler through RequestObserver, and
// by the serving core for the requests it refuses), what the expert cache did (read from its
// counters at scrape time), and the process. Rendered in the text exposition format 0.0.4.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "cache/expert_cache.h"
#include "scheduler/scheduler.h"
#include "util/histogram.h"

namespace moed::server {

// Writes the text exposition format: a family's # HELP and # TYPE, then its samples, each with
// the labels every series carries first.
class PrometheusText {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  explicit PrometheusText(Labels common) : common_(std::move(common)) {}

  // type: "counter", "gauge" or "histogram".
  void Family(absl::string_view name, absl::string_view type, absl::string_view help);
  void Sample(absl::string_view name, const Labels& labels, double value);
  // name_bucket (cumulative, le="..." up to +Inf), name_sum and name_count.
  void Histogram(absl::string_view name, const Labels& labels,
                 const util::HistogramSnapshot& snapshot);

  const std::string& text() const { return out_; }

 private:
  void Series(absl::string_view name, const Labels& labels, const std::string* le);
  Labels common_;
  std::string out_;
};

// A label value as the format escapes it: backslash, double quote and newline.
std::string EscapeLabelValue(absl::string_view value);
// A sample value: integers without a fraction, +Inf/-Inf/NaN spelled as the format wants.
std::string FormatSampleValue(double value);

// Read from /proc at scrape time.
struct ProcessStats {
  uint64_t resident_bytes = 0;
  uint64_t virtual_bytes = 0;
  uint64_t open_fds = 0;
  uint64_t max_fds = 0;
  double cpu_seconds = 0;
  double start_time_seconds = 0;  // since the Unix epoch
};
ProcessStats ReadProcessStats();

// What does not change while the daemon runs.
struct MetricsInfo {
  std::string model_name;
  std::string version;
  std::string backend;
  std::string architecture;
  std::string expert_precision;  // "source", "int8", "int4"
  uint32_t num_layers = 0;
  uint32_t num_experts = 0;
  uint32_t experts_per_token = 0;
  uint64_t expert_bytes = 0;
};

class ServingMetrics final : public scheduler::RequestObserver {
 public:
  explicit ServingMetrics(MetricsInfo info);

  void OnAdmitted(double queue_seconds) override;
  void OnStepTokens(uint64_t prompt_tokens, uint64_t generation_tokens) override;
  void OnFirstToken(double seconds) override;
  void OnInterToken(double seconds) override;
  void OnFinished(const scheduler::FinishedRequest& request) override;

  // A request refused before it reached the scheduler (bad input, queue full, draining).
  void RecordRefusal(absl::StatusCode code);

  // The exposition. `cache` is null when the daemon serves a checkpoint without a store.
  // `prefetcher` is null when prefetch is off.
  std::string Render(const scheduler::SchedulerStats& scheduler, const cache::ExpertCache* cache,
                     const ProcessStats& process,
                     const cache::Prefetcher* prefetcher = nullptr) const;

  const MetricsInfo& info() const { return info_; }

 private:
  static constexpr size_t kCodes = 17;  // absl::StatusCode 0..16

  MetricsInfo info_;
  std::atomic<uint64_t> prompt_tokens_{0};
  std::atomic<uint64_t> generation_tokens_{0};
  std::array<std::atomic<uint64_t>, 3> finished_{};  // stop, length, abort
  std::array<std::atomic<uint64_t>, kCodes> errors_{};
  util::Histogram time_to_first_token_;
  util::Histogram inter_token_latency_;
  util::Histogram e2e_latency_;
  util::Histogram queue_time_;
  util::Histogram request_prompt_tokens_;
  util::Histogram request_generation_tokens_;
};

// "invalid_argument" for absl::StatusCode::kInvalidArgument: the `code` label's values.
std::string StatusCodeLabel(absl::StatusCode code);

}  // namespace moed::server
