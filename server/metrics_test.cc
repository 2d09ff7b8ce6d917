// The exposition text, checked against lines written out by hand from the format's rules.
#include "server/metrics.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

namespace moed::server {
namespace {

bool HasLine(const std::string& text, const std::string& line) {
  return text.find("\n" + line + "\n") != std::string::npos || text.rfind(line + "\n", 0) == 0;
}

TEST_CASE("metrics: label values escape backslash, quote and newline, values read back") {
  CHECK(EscapeLabelValue("a\\b\"c\nd") == "a\\\\b\\\"c\\nd");
  CHECK(EscapeLabelValue("plain") == "plain");
  CHECK(FormatSampleValue(3) == "3");
  CHECK(FormatSampleValue(0) == "0");
  CHECK(FormatSampleValue(0.1) == "0.1");
  CHECK(FormatSampleValue(0.25) == "0.25");
  CHECK(FormatSampleValue(1.0 / 3) == "0.33333333333333331");
  CHECK(FormatSampleValue(std::numeric_limits<double>::infinity()) == "+Inf");
  CHECK(FormatSampleValue(-std::numeric_limits<double>::infinity()) == "-Inf");
  CHECK(FormatSampleValue(std::nan("")) == "NaN");
}

TEST_CASE("metrics: a family has HELP and TYPE, and every series the common labels first") {
  PrometheusText out(PrometheusText::Labels{{"model_name", "m\"x"}});
  out.Family("moed_x_total", "counter", "Line one\nback\\slash.");
  out.Sample("moed_x_total", {{"kind", "a"}}, 2);
  out.Sample("moed_x_total", {}, 0.5);
  CHECK(out.text() ==
        "# HELP moed_x_total Line one\\nback\\\\slash.\n"
        "# TYPE moed_x_total counter\n"
        "moed_x_total{model_name=\"m\\\"x\",kind=\"a\"} 2\n"
        "moed_x_total{model_name=\"m\\\"x\"} 0.5\n");
}

TEST_CASE("metrics: a histogram's buckets are cumulative, end in +Inf and agree with _count") {
  util::Histogram h({0.1, 1});
  for (double v : {0.05, 0.1, 0.5, 2.0}) h.Observe(v);  // 0.1 is in its own bound's bucket
  PrometheusText out(PrometheusText::Labels{{"model_name", "m"}});
  out.Histogram("h_seconds", {{"source", "ssd"}}, h.Snapshot());
  CHECK(out.text() ==
        "h_seconds_bucket{model_name=\"m\",source=\"ssd\",le=\"0.1\"} 2\n"
        "h_seconds_bucket{model_name=\"m\",source=\"ssd\",le=\"1\"} 3\n"
        "h_seconds_bucket{model_name=\"m\",source=\"ssd\",le=\"+Inf\"} 4\n"
        "h_seconds_sum{model_name=\"m\",source=\"ssd\"} 2.65\n"
        "h_seconds_count{model_name=\"m\",source=\"ssd\"} 4\n");
}

TEST_CASE("metrics: what the scheduler reports becomes vLLM's series") {
  MetricsInfo info;
  info.model_name = "demo";
  info.version = "1.2.3";
  info.backend = "cpu";
  info.architecture = "mixtral";
  info.expert_precision = "int8";
  info.num_layers = 2;
  info.num_experts = 8;
  info.experts_per_token = 2;
  info.expert_bytes = 4096;
  ServingMetrics metrics(info);
  // Two requests of 3 prompt tokens: one stops after 2 tokens, one runs to its length of 1;
  // a third is cancelled after 1 token; a fourth fails; two are refused up front.
  metrics.OnAdmitted(0.002);
  metrics.OnAdmitted(3.0);
  metrics.OnStepTokens(6, 2);
  metrics.OnFirstToken(0.03);
  metrics.OnFirstToken(3.5);
  metrics.OnStepTokens(0, 1);
  metrics.OnInterToken(0.004);
  metrics.OnFinished({scheduler::FinishReason::kStop, absl::StatusCode::kOk, 3, 2, 0.05});
  metrics.OnFinished({scheduler::FinishReason::kLength, absl::StatusCode::kOk, 3, 1, 3.6});
  metrics.OnFinished({scheduler::FinishReason::kCancelled, absl::StatusCode::kOk, 3, 1, 1.0});
  metrics.OnFinished(
      {scheduler::FinishReason::kNone, absl::StatusCode::kDeadlineExceeded, 3, 0, 9.0});
  metrics.RecordRefusal(absl::StatusCode::kInvalidArgument);
  metrics.RecordRefusal(absl::StatusCode::kInvalidArgument);
  metrics.RecordRefusal(absl::StatusCode::kOk);  // not an error: ignored

  scheduler::SchedulerStats stats;
  stats.running = 3;
  stats.waiting = 7;
  stats.kv_cache_bytes = 1024;
  stats.kv_cache_budget_bytes = 4096;
  ProcessStats process;
  process.resident_bytes = 123456;
  process.open_fds = 9;
  const std::string text = metrics.Render(stats, nullptr, process);
  INFO(text);
  const std::string m = "model_name=\"demo\"";
  CHECK(HasLine(text, "moed_num_requests_running{" + m + "} 3"));
  CHECK(HasLine(text, "moed_num_requests_waiting{" + m + "} 7"));
  CHECK(HasLine(text, "moed_kv_cache_usage_perc{" + m + "} 0.25"));
  CHECK(HasLine(text, "moed_num_preemptions_total{" + m + "} 0"));
  CHECK(HasLine(text, "moed_request_success_total{" + m + ",finished_reason=\"stop\"} 1"));
  CHECK(HasLine(text, "moed_request_success_total{" + m + ",finished_reason=\"length\"} 1"));
  CHECK(HasLine(text, "moed_request_success_total{" + m + ",finished_reason=\"abort\"} 1"));
  CHECK(HasLine(text, "moed_request_errors_total{" + m + ",code=\"deadline_exceeded\"} 1"));
  CHECK(HasLine(text, "moed_request_errors_total{" + m + ",code=\"invalid_argument\"} 2"));
  CHECK(text.find("code=\"ok\"") == std::string::npos);
  CHECK(HasLine(text, "moed_prompt_tokens_total{" + m + "} 6"));
  CHECK(HasLine(text, "moed_generation_tokens_total{" + m + "} 3"));
  // TTFT 0.03 is under the 0.04 bound, 3.5 under 5; two in all.
  CHECK(HasLine(text, "moed_time_to_first_token_seconds_bucket{" + m + ",le=\"0.02\"} 0"));
  CHECK(HasLine(text, "moed_time_to_first_token_seconds_bucket{" + m + ",le=\"0.04\"} 1"));
  CHECK(HasLine(text, "moed_time_to_first_token_seconds_bucket{" + m + ",le=\"5\"} 2"));
  CHECK(HasLine(text, "moed_time_to_first_token_seconds_count{" + m + "} 2"));
  CHECK(HasLine(text, "moed_time_to_first_token_seconds_sum{" + m + "} 3.53"));
  CHECK(HasLine(text, "moed_inter_token_latency_seconds_count{" + m + "} 1"));
  CHECK(HasLine(text, "moed_request_queue_time_seconds_count{" + m + "} 2"));
  CHECK(HasLine(text, "moed_e2e_request_latency_seconds_count{" + m + "} 4"));
  CHECK(HasLine(text, "moed_request_generation_tokens_sum{" + m + "} 4"));
  CHECK(HasLine(text, "moed_request_prompt_tokens_bucket{" + m + ",le=\"2\"} 0"));
  CHECK(HasLine(text, "moed_request_prompt_tokens_bucket{" + m + ",le=\"5\"} 4"));
  CHECK(HasLine(text, "moed_build_info{" + m + ",version=\"1.2.3\",backend=\"cpu\"} 1"));
  CHECK(HasLine(text, "moed_model_info{" + m +
                          ",architecture=\"mixtral\",num_layers=\"2\",num_experts=\"8\","
                          "experts_per_token=\"2\",expert_bytes=\"4096\",expert_precision="
                          "\"int8\"} 1"));
  CHECK(HasLine(text, "process_resident_memory_bytes{" + m + "} 123456"));
  CHECK(HasLine(text, "process_open_fds{" + m + "} 9"));
  // Without an expert store there is no expert cache to report.
  CHECK(text.find("moed_expert_cache_") == std::string::npos);
}

TEST_CASE("metrics: the process figures come from /proc and agree with the kernel's view") {
  ProcessStats stats = ReadProcessStats();
  CHECK(stats.resident_bytes > 0);
  CHECK(stats.virtual_bytes >= stats.resident_bytes);
  // stdin, stdout and stderr at least; and no more than the limit.
  CHECK(stats.open_fds >= 3);
  CHECK(stats.open_fds <= stats.max_fds);
  const double now = static_cast<double>(std::time(nullptr));
  CHECK(stats.start_time_seconds > now - 3600);
  CHECK(stats.start_time_seconds <= now + 1);
  // A second descriptor shows up in the count.
  const int fd = dup(1);
  REQUIRE(fd >= 0);
  CHECK(ReadProcessStats().open_fds == stats.open_fds + 1);
  close(fd);
}

}  // namespace
}  // namespace moed::server
