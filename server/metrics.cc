#include "server/metrics.h"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moed::server {

namespace {

// vLLM's buckets, with finer ones below where a CPU-served small model lands.
std::vector<double> LatencyBuckets() {
  return {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,  0.25,  0.5,   0.75,
          1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
}
std::vector<double> InterTokenBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.15, 0.2,  0.3,
          0.4,   0.5,    0.75,  1.0,  2.5,   5.0,  7.5,   10.0, 20.0, 40.0, 80.0};
}
std::vector<double> RequestBuckets() {
  return {0.01, 0.05, 0.1,  0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,   5.0,   10.0,
          15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120., 240.0, 480.0, 960.0, 1920., 7680.};
}
std::vector<double> TokenCountBuckets() {
  return {1,    2,    5,    10,    20,    50,    100,    200,    500,
          1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000};
}

void AppendEscaped(std::string& out, absl::string_view text, bool quote) {
  for (char c : text) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '"' && quote) {
      out += "\\\"";
    } else {
      out += c;
    }
  }
}

}  // namespace

std::string EscapeLabelValue(absl::string_view value) {
  std::string out;
  AppendEscaped(out, value, true);
  return out;
}

std::string FormatSampleValue(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return absl::StrCat(static_cast<int64_t>(value));
  }
  // The shortest of 15 and 17 digits that reads back as the same double.
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%.15g", value);
  if (std::strtod(buffer, nullptr) != value) std::snprintf(buffer, sizeof(buffer), "%.17g", value);
  return buffer;
}

void PrometheusText::Family(absl::string_view name, absl::string_view type,
                            absl::string_view help) {
  absl::StrAppend(&out_, "# HELP ", name, " ");
  AppendEscaped(out_, help, false);
  absl::StrAppend(&out_, "\n# TYPE ", name, " ", type, "\n");
}

void PrometheusText::Series(absl::string_view name, const Labels& labels, const std::string* le) {
  out_.append(name.data(), name.size());
  out_ += '{';
  bool first = true;
  auto add = [&](absl::string_view key, absl::string_view value) {
    if (!first) out_ += ',';
    first = false;
    absl::StrAppend(&out_, key, "=\"");
    AppendEscaped(out_, value, true);
    out_ += '"';
  };
  for (const auto& [key, value] : common_) add(key, value);
  for (const auto& [key, value] : labels) add(key, value);
  if (le != nullptr) add("le", *le);
  out_ += "} ";
}

void PrometheusText::Sample(absl::string_view name, const Labels& labels, double value) {
  Series(name, labels, nullptr);
  absl::StrAppend(&out_, FormatSampleValue(value), "\n");
}

void PrometheusText::Histogram(absl::string_view name, const Labels& labels,
                               const util::HistogramSnapshot& snapshot) {
  const std::string bucket = absl::StrCat(name, "_bucket");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < snapshot.buckets.size(); ++i) {
    cumulative += snapshot.buckets[i];
    const std::string le =
        i < snapshot.bounds.size() ? FormatSampleValue(snapshot.bounds[i]) : "+Inf";
    Series(bucket, labels, &le);
    absl::StrAppend(&out_, cumulative, "\n");
  }
  Sample(absl::StrCat(name, "_sum"), labels, snapshot.sum);
  Sample(absl::StrCat(name, "_count"), labels, static_cast<double>(cumulative));
}

ProcessStats ReadProcessStats() {
  ProcessStats stats;
  const long page = sysconf(_SC_PAGESIZE);
  const long ticks = sysconf(_SC_CLK_TCK);
  {
    std::ifstream statm("/proc/self/statm");
    uint64_t size = 0, resident = 0;
    if (statm >> size >> resident) {
      stats.virtual_bytes = size * static_cast<uint64_t>(page);
      stats.resident_bytes = resident * static_cast<uint64_t>(page);
    }
  }
  if (DIR* dir = opendir("/proc/self/fd"); dir != nullptr) {
    uint64_t entries = 0;
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] != '.') ++entries;
    }
    closedir(dir);
    stats.open_fds = entries > 0 ? entries - 1 : 0;  // less the one reading the directory
  }
  if (rlimit limit{}; getrlimit(RLIMIT_NOFILE, &limit) == 0) stats.max_fds = limit.rlim_cur;
  // /proc/self/stat: the command may hold spaces and parentheses, so fields count from the last
  // ')': utime and stime are fields 14 and 15, starttime field 22 (in clock ticks since boot).
  std::ifstream stat_file("/proc/self/stat");
  std::string stat((std::istreambuf_iterator<char>(stat_file)), std::istreambuf_iterator<char>());
  const size_t close = stat.rfind(')');
  if (close != std::string::npos && ticks > 0) {
    std::vector<absl::string_view> fields =
        absl::StrSplit(absl::string_view(stat).substr(close + 2), ' ', absl::SkipEmpty());
    // fields[0] is field 3 (state).
    uint64_t utime = 0, stime = 0, start = 0;
    if (fields.size() > 19 && absl::SimpleAtoi(fields[11], &utime) &&
        absl::SimpleAtoi(fields[12], &stime) && absl::SimpleAtoi(fields[19], &start)) {
      stats.cpu_seconds = static_cast<double>(utime + stime) / static_cast<double>(ticks);
      std::ifstream proc_stat("/proc/stat");
      std::string line;
      while (std::getline(proc_stat, line)) {
        uint64_t boot = 0;
        if (absl::StartsWith(line, "btime ") && absl::SimpleAtoi(line.substr(6), &boot)) {
          stats.start_time_seconds =
              static_cast<double>(boot) + static_cast<double>(start) / static_cast<double>(ticks);
          break;
        }
      }
    }
  }
  return stats;
}

std::string StatusCodeLabel(absl::StatusCode code) {
  return absl::AsciiStrToLower(absl::StatusCodeToString(code));
}

ServingMetrics::ServingMetrics(MetricsInfo info)
    : info_(std::move(info)),
      time_to_first_token_(LatencyBuckets()),
      inter_token_latency_(InterTokenBuckets()),
      e2e_latency_(RequestBuckets()),
      queue_time_(RequestBuckets()),
      request_prompt_tokens_(TokenCountBuckets()),
      request_generation_tokens_(TokenCountBuckets()) {}

void ServingMetrics::OnAdmitted(double queue_seconds) { queue_time_.Observe(queue_seconds); }

void ServingMetrics::OnStepTokens(uint64_t prompt_tokens, uint64_t generation_tokens) {
  prompt_tokens_.fetch_add(prompt_tokens, std::memory_order_relaxed);
  generation_tokens_.fetch_add(generation_tokens, std::memory_order_relaxed);
}

void ServingMetrics::OnFirstToken(double seconds) { time_to_first_token_.Observe(seconds); }

void ServingMetrics::OnInterToken(double seconds) { inter_token_latency_.Observe(seconds); }

void ServingMetrics::OnFinished(const scheduler::FinishedRequest& request) {
  if (request.error != absl::StatusCode::kOk) {
    errors_[static_cast<size_t>(request.error) % kCodes].fetch_add(1, std::memory_order_relaxed);
  } else {
    size_t reason = 2;  // abort
    if (request.reason == scheduler::FinishReason::kStop) reason = 0;
    if (request.reason == scheduler::FinishReason::kLength) reason = 1;
    finished_[reason].fetch_add(1, std::memory_order_relaxed);
  }
  e2e_latency_.Observe(request.e2e_seconds);
  request_prompt_tokens_.Observe(request.prompt_tokens);
  request_generation_tokens_.Observe(request.generation_tokens);
}

void ServingMetrics::RecordRefusal(absl::StatusCode code) {
  if (code == absl::StatusCode::kOk) return;
  errors_[static_cast<size_t>(code) % kCodes].fetch_add(1, std::memory_order_relaxed);
}

std::string ServingMetrics::Render(const scheduler::SchedulerStats& scheduler,
                                   const cache::ExpertCache* cache, const ProcessStats& process,
                                   const cache::Prefetcher* prefetcher) const {
  PrometheusText out(PrometheusText::Labels{{"model_name", info_.model_name}});
  auto load = [](const std::atomic<uint64_t>& a) {
    return static_cast<double>(a.load(std::memory_order_relaxed));
  };

  out.Family("moed_num_requests_running", "gauge", "Requests in the running batch.");
  out.Sample("moed_num_requests_running", {}, static_cast<double>(scheduler.running));
  out.Family("moed_num_requests_waiting", "gauge", "Requests waiting to be admitted.");
  out.Sample("moed_num_requests_waiting", {}, static_cast<double>(scheduler.waiting));
  out.Family("moed_kv_cache_usage_perc", "gauge",
             "KV-cache usage as a fraction from 0 to 1: bytes held by running sequences over what "
             "--max-running full-context sequences need.");
  out.Sample("moed_kv_cache_usage_perc", {},
             scheduler.kv_cache_budget_bytes == 0
                 ? 0.0
                 : static_cast<double>(scheduler.kv_cache_bytes) /
                       static_cast<double>(scheduler.kv_cache_budget_bytes));
  out.Family("moed_num_preemptions_total", "counter",
             "Running sequences sent back to the queue to free KV memory.");
  out.Sample("moed_num_preemptions_total", {}, static_cast<double>(scheduler.preemptions));
  out.Family("moed_request_success_total", "counter",
             "Requests that finished, by reason: stop (EOS or a stop sequence), length "
             "(max_tokens or the context), abort (cancelled: the client left or the daemon "
             "stopped).");
  const char* reasons[] = {"stop", "length", "abort"};
  for (size_t i = 0; i < 3; ++i)
    out.Sample("moed_request_success_total", {{"finished_reason", reasons[i]}}, load(finished_[i]));
  out.Family("moed_request_errors_total", "counter",
             "Generate requests refused or failed, by status code.");
  for (size_t code = 1; code < kCodes; ++code) {
    const uint64_t n = errors_[code].load(std::memory_order_relaxed);
    if (n == 0) continue;
    out.Sample("moed_request_errors_total",
               {{"code", StatusCodeLabel(static_cast<absl::StatusCode>(code))}},
               static_cast<double>(n));
  }
  out.Family("moed_prompt_tokens_total", "counter", "Prompt tokens computed (prefill).");
  out.Sample("moed_prompt_tokens_total", {}, load(prompt_tokens_));
  out.Family("moed_generation_tokens_total", "counter", "Tokens generated.");
  out.Sample("moed_generation_tokens_total", {}, load(generation_tokens_));
  out.Family("moed_time_to_first_token_seconds", "histogram",
             "Time from a request's arrival to its first generated token.");
  out.Histogram("moed_time_to_first_token_seconds", {}, time_to_first_token_.Snapshot());
  out.Family("moed_inter_token_latency_seconds", "histogram",
             "Time between consecutive tokens of a request.");
  out.Histogram("moed_inter_token_latency_seconds", {}, inter_token_latency_.Snapshot());
  out.Family("moed_e2e_request_latency_seconds", "histogram",
             "Time from a request's arrival to its end.");
  out.Histogram("moed_e2e_request_latency_seconds", {}, e2e_latency_.Snapshot());
  out.Family("moed_request_queue_time_seconds", "histogram",
             "Time a request waited in the queue before it was admitted.");
  out.Histogram("moed_request_queue_time_seconds", {}, queue_time_.Snapshot());
  out.Family("moed_request_prompt_tokens", "histogram", "Prompt tokens of finished requests.");
  out.Histogram("moed_request_prompt_tokens", {}, request_prompt_tokens_.Snapshot());
  out.Family("moed_request_generation_tokens", "histogram",
             "Generated tokens of finished requests.");
  out.Histogram("moed_request_generation_tokens", {}, request_generation_tokens_.Snapshot());

  if (cache != nullptr) {
    const cache::CacheCounters c = cache->counters();
    // Family `name`: one sample per tier, `field` read from that tier's counters.
    auto per_tier = [&](const char* name, auto field) {
      out.Sample(name, {{"tier", "device"}}, static_cast<double>(field(c.device)));
      out.Sample(name, {{"tier", "host"}}, static_cast<double>(field(c.host)));
      // The device pool of fallback copies, with a precision policy that falls back.
      if (c.fallback.slots > 0)
        out.Sample(name, {{"tier", "device_fallback"}}, static_cast<double>(field(c.fallback)));
    };
    using Tier = cache::TierCounters;
    out.Family("moed_expert_cache_lookups_total", "counter",
               "Experts a step asked a tier for (the host tier is asked on device misses).");
    per_tier("moed_expert_cache_lookups_total", [](const Tier& t) { return t.hits + t.misses; });
    out.Family("moed_expert_cache_hits_total", "counter", "Lookups the tier served.");
    per_tier("moed_expert_cache_hits_total", [](const Tier& t) { return t.hits; });
    out.Family("moed_expert_cache_ssd_reads_total", "counter", "Experts read from the store.");
    out.Sample("moed_expert_cache_ssd_reads_total", {}, static_cast<double>(c.ssd_reads));
    out.Family("moed_expert_cache_ssd_bytes_total", "counter", "Bytes read from the store.");
    out.Sample("moed_expert_cache_ssd_bytes_total", {}, static_cast<double>(c.ssd_bytes));
    out.Family("moed_expert_cache_staged_bytes_total", "counter",
               "Bytes copied or read into the tier.");
    per_tier("moed_expert_cache_staged_bytes_total", [](const Tier& t) { return t.bytes_in; });
    out.Family("moed_expert_cache_stage_seconds", "histogram",
               "Time to bring an expert into the device tier, by where it came from.");
    out.Histogram("moed_expert_cache_stage_seconds", {{"source", "ssd"}}, c.stage_from_ssd);
    out.Histogram("moed_expert_cache_stage_seconds", {{"source", "host"}}, c.stage_from_host);
    out.Family("moed_expert_cache_evictions_total", "counter",
               "Experts evicted to make room, by tier.");
    per_tier("moed_expert_cache_evictions_total", [](const Tier& t) { return t.evictions; });
    out.Family("moed_expert_cache_failed_reads_total", "counter",
               "Expert reads that failed: io_error, short_read (the store is truncated) or "
               "checksum (the bytes do not match the manifest).");
    out.Sample("moed_expert_cache_failed_reads_total", {{"kind", "io_error"}},
               static_cast<double>(c.failed_io));
    out.Sample("moed_expert_cache_failed_reads_total", {{"kind", "short_read"}},
               static_cast<double>(c.failed_short_reads));
    out.Sample("moed_expert_cache_failed_reads_total", {{"kind", "checksum"}},
               static_cast<double>(c.failed_checksums));
    out.Family("moed_expert_cache_stall_seconds_total", "counter",
               "Time the engine waited for experts to arrive.");
    out.Sample("moed_expert_cache_stall_seconds_total", {}, c.wait_seconds);
    out.Family("moed_expert_cache_resident", "gauge", "Experts resident in the tier.");
    per_tier("moed_expert_cache_resident", [](const Tier& t) { return t.resident; });
    out.Family("moed_expert_cache_budget_bytes", "gauge",
               "Memory the tier holds for experts (its slots).");
    per_tier("moed_expert_cache_budget_bytes", [](const Tier& t) { return t.budget_bytes; });
    out.Family("moed_expert_cache_fallbacks_total", "counter",
               "Expert uses that ran from a low-precision copy instead of waiting for the full "
               "one (--precision-policy), by the copy's precision.");
    out.Sample("moed_expert_cache_fallbacks_total", {{"precision", "int8"}},
               static_cast<double>(c.fallbacks_int8));
    out.Sample("moed_expert_cache_fallbacks_total", {{"precision", "int4"}},
               static_cast<double>(c.fallbacks_int4));
    out.Family("moed_expert_cache_background_reads_total", "counter",
               "Reads while the disk was idle: floor (the low-bit floor's copies) and upgrade "
               "(full copies of experts that ran from a fallback copy).");
    out.Sample("moed_expert_cache_background_reads_total", {{"kind", "floor"}},
               static_cast<double>(c.floor_reads));
    out.Sample("moed_expert_cache_background_reads_total", {{"kind", "upgrade"}},
               static_cast<double>(c.upgrade_reads));
    out.Family("moed_expert_cache_host_computes_total", "counter",
               "Expert uses computed on the CPU from the host tier instead of copied to the GPU "
               "(--host-compute).");
    out.Sample("moed_expert_cache_host_computes_total", {}, static_cast<double>(c.host_computes));
    out.Family("moed_expert_cache_copy_queued_bytes", "gauge",
               "Bytes of expert copies to the GPU queued and not yet done.");
    out.Sample("moed_expert_cache_copy_queued_bytes", {}, static_cast<double>(c.copy_bytes_queued));
    out.Family("moed_expert_cache_prefetches_issued_total", "counter",
               "Prefetches started (reads ahead of use, or copies from the host tier).");
    out.Sample("moed_expert_cache_prefetches_issued_total", {},
               static_cast<double>(c.prefetch_issued));
    out.Family("moed_expert_cache_prefetches_total", "counter",
               "Prefetches by how they ended: useful (used after arriving), late (a use waited "
               "for it), wasted (evicted unused), failed (the read failed; no request failed).");
    out.Sample("moed_expert_cache_prefetches_total", {{"outcome", "useful"}},
               static_cast<double>(c.prefetch_useful));
    out.Sample("moed_expert_cache_prefetches_total", {{"outcome", "late"}},
               static_cast<double>(c.prefetch_late));
    out.Sample("moed_expert_cache_prefetches_total", {{"outcome", "wasted"}},
               static_cast<double>(c.prefetch_wasted));
    out.Sample("moed_expert_cache_prefetches_total", {{"outcome", "failed"}},
               static_cast<double>(c.prefetch_failures));
    out.Family("moed_expert_cache_prefetches_pending", "gauge",
               "Prefetches on their way or resident and not used yet.");
    out.Sample("moed_expert_cache_prefetches_pending", {}, static_cast<double>(c.prefetch_pending));
    out.Family("moed_expert_cache_prefetches_cancelled_total", "counter",
               "Prefetch hints dropped before any read: superseded, or resident already.");
    out.Sample("moed_expert_cache_prefetches_cancelled_total", {},
               static_cast<double>(c.prefetch_cancelled));
    if (prefetcher != nullptr) {
      uint64_t hinted = 0, needed = 0, correct = 0;
      for (const cache::LayerPrefetchStats& layer : prefetcher->layer_stats()) {
        hinted += layer.hinted;
        needed += layer.needed;
        correct += layer.correct;
      }
      out.Family("moed_expert_cache_prefetch_recall", "gauge",
                 "Of the experts predicted layers chose, the fraction the prefetcher had hinted.");
      out.Sample("moed_expert_cache_prefetch_recall", {},
                 needed == 0 ? 0 : static_cast<double>(correct) / static_cast<double>(needed));
      out.Family("moed_expert_cache_prefetch_precision", "gauge",
                 "Of the experts the prefetcher hinted, the fraction their layers chose.");
      out.Sample("moed_expert_cache_prefetch_precision", {},
                 hinted == 0 ? 0 : static_cast<double>(correct) / static_cast<double>(hinted));
    }
  }

  out.Family("moed_build_info", "gauge", "The daemon's version and compute backend (always 1).");
  out.Sample("moed_build_info", {{"version", info_.version}, {"backend", info_.backend}}, 1);
  out.Family("moed_model_info", "gauge", "The served model's architecture and experts (always 1).");
  out.Sample("moed_model_info",
             {{"architecture", info_.architecture},
              {"num_layers", absl::StrCat(info_.num_layers)},
              {"num_experts", absl::StrCat(info_.num_experts)},
              {"experts_per_token", absl::StrCat(info_.experts_per_token)},
              {"expert_bytes", absl::StrCat(info_.expert_bytes)},
              {"expert_precision", info_.expert_precision}},
             1);
  out.Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
  out.Sample("process_resident_memory_bytes", {}, static_cast<double>(process.resident_bytes));
  out.Family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
  out.Sample("process_virtual_memory_bytes", {}, static_cast<double>(process.virtual_bytes));
  out.Family("process_open_fds", "gauge", "Open file descriptors.");
  out.Sample("process_open_fds", {}, static_cast<double>(process.open_fds));
  out.Family("process_max_fds", "gauge", "The limit on open file descriptors.");
  out.Sample("process_max_fds", {}, static_cast<double>(process.max_fds));
  out.Family("process_cpu_seconds_total", "counter", "User and system CPU time spent.");
  out.Sample("process_cpu_seconds_total", {}, process.cpu_seconds);
  out.Family("process_start_time_seconds", "gauge",
             "Start time of the process since the Unix epoch in seconds.");
  out.Sample("process_start_time_seconds", {}, process.start_time_seconds);
  return out.text();
}

}  // namespace moed::server
