// The daemon's configuration: one struct, each option declared once in DaemonOptions() with
// its default, help text and environment variable. Flags, the JSON config file, environment
// variables, --help and docs/configuration.md all come from that one table.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::server {

struct DaemonConfig {
  std::string model;
  std::string store;
  int64_t device_cache_bytes = 0;
  int64_t host_cache_bytes = 0;
  double gpu_memory_fraction = 0;
  std::string host_compute = "auto";
  int64_t staging_buffers = 4;
  std::string expert_precision = "source";
  std::string eviction_policy = "lru";
  std::string eviction_scope = "layer";
  int64_t io_queue_depth = 16;
  std::string prefetch = "combined";
  int64_t prefetch_depth = 1;
  int64_t prefetch_candidates = 1;
  std::string prefetch_calibration;
  std::string routing_trace;
  std::string precision_policy = "exact";
  std::string fallback_precision = "int4";
  double fallback_threshold = 0.2;
  int64_t fallback_min_rank = 64;
  bool low_bit_floor = false;
  std::string listen = "127.0.0.1:50051";
  std::string http_listen = "127.0.0.1:8000";
  std::string api_key;
  int64_t max_connections = 4096;
  int64_t http_max_body_bytes = 8 << 20;
  int64_t http_idle_seconds = 120;
  bool metrics = true;
  std::string config;
  std::string served_model_name;
  std::string chat_template;
  std::string tool_call_parser = "auto";
  std::string reasoning_parser = "auto";
  std::string backend = "auto";
  int64_t cuda_device = 0;
  int64_t threads = 0;
  int64_t max_batch = 16;
  int64_t max_queue = 256;
  int64_t max_concurrent_streams = 4096;  // gRPC Generate and health Watch streams together
  int64_t max_tokens_per_step = 256;
  int64_t max_running = 0;
  int64_t kv_cache_bytes = 0;
  bool expert_aware_batching = true;
  int64_t max_delay_steps = 4;
  int64_t drain_seconds = 30;
  std::string record_routing;
  std::string log_level = "info";
  std::string log_format = "text";
};

struct OptionSpec {
  using Field = std::variant<std::string DaemonConfig::*, int64_t DaemonConfig::*,
                             bool DaemonConfig::*, double DaemonConfig::*>;
  std::string name;  // long flag without "--"; also the config-file key
  Field field;
  std::string metavar;
  std::string help;
  std::vector<std::string> choices;  // non-empty: the value must be one of these
  int64_t min_value = 0;             // for integers
  int64_t max_value = INT64_MAX;
  bool file_key = true;    // false for --config itself
  bool byte_size = false;  // integers written as byte counts, K/M/G/T suffixes allowed

  // MOED_ followed by the name in upper case with '_' for '-'.
  std::string EnvVar() const;
};

const std::vector<OptionSpec>& DaemonOptions();

// Looks up an environment variable; injected so that tests need no global environment.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
EnvLookup ProcessEnvironment();

enum class Action { kRun, kHelp, kVersion, kHelpMarkdown };

struct CommandLine {
  Action action = Action::kRun;
  DaemonConfig config;
  // What the daemon logs once its logger exists (for example a MOED_* variable that names no
  // option: Kubernetes injects service variables such as MOED_SERVICE_HOST, so these are not
  // errors).
  std::vector<std::string> warnings;
};

// Defaults, then the config file (--config or MOED_CONFIG), then MOED_* variables, then
// flags; then validation. Errors are one line naming the flag, key or variable.
// `variable_names` lists the environment's variables, for the warnings about unknown MOED_*
// names.
absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args,
                                             const EnvLookup& env,
                                             const std::vector<std::string>& variable_names = {});

// The names of the process's environment variables.
std::vector<std::string> ProcessEnvironmentNames();

// Applies a JSON config file's text; keys are the long flag names.
absl::Status ApplyConfigJson(absl::string_view text, absl::string_view source,
                             DaemonConfig* config);

// Checks relations and formats that single options cannot (listen address, a model given).
absl::Status ValidateConfig(const DaemonConfig& config);

std::string HelpText();
// The markdown table in docs/configuration.md.
std::string OptionsMarkdown();

// Splits "host:port" or "[v6]:port"; port 0 means "pick a free one".
absl::Status SplitHostPort(absl::string_view address, std::string* host, int* port);

}  // namespace moed::server
