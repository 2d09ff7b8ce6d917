#include "server/config.h"

#include <cstdlib>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "nlohmann/json.hpp"
#include "util/byte_size.h"
#include "util/status_macros.h"

namespace moed::server {
namespace {

using nlohmann::json;

template <typename T>
OptionSpec::Field F(T DaemonConfig::*member) {
  return OptionSpec::Field(member);
}

std::string DefaultText(const OptionSpec& spec) {
  DaemonConfig defaults;
  return std::visit(
      [&](auto member) -> std::string {
        const auto& value = defaults.*member;
        using T = std::decay_t<decltype(value)>;
        if constexpr (std::is_same_v<T, std::string>) {
          return value;
        } else if constexpr (std::is_same_v<T, bool>) {
          return value ? "true" : "false";
        } else {
          return absl::StrCat(value);
        }
      },
      spec.field);
}

absl::Status CheckChoice(const OptionSpec& spec, const std::string& value) {
  if (spec.choices.empty()) return absl::OkStatus();
  for (const std::string& choice : spec.choices) {
    if (choice == value) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("'", value, "' is not one of ", absl::StrJoin(spec.choices, ", ")));
}

absl::Status CheckRangeOf(const OptionSpec& spec, int64_t value) {
  if (value < spec.min_value || value > spec.max_value) {
    return absl::InvalidArgumentError(absl::StrCat(
        value, " is out of range [", spec.min_value, ", ",
        spec.max_value == INT64_MAX ? std::string("max") : absl::StrCat(spec.max_value), "]"));
  }
  return absl::OkStatus();
}

absl::Status SetFromText(const OptionSpec& spec, const std::string& text, DaemonConfig* config);

// Sets an option from text (a flag's or an environment variable's value).
absl::Status SetFromText(const OptionSpec& spec, const std::string& text, DaemonConfig* config) {
  return std::visit(
      [&](auto member) -> absl::Status {
        auto& target = config->*member;
        using T = std::decay_t<decltype(target)>;
        if constexpr (std::is_same_v<T, std::string>) {
          MOED_RETURN_IF_ERROR(CheckChoice(spec, text));
          target = text;
        } else if constexpr (std::is_same_v<T, int64_t>) {
          int64_t value = 0;
          if (spec.byte_size) {
            absl::StatusOr<uint64_t> bytes = util::ParseByteSize(text);
            if (!bytes.ok()) return bytes.status();
            if (*bytes > static_cast<uint64_t>(INT64_MAX)) {
              return absl::InvalidArgumentError("is out of range");
            }
            value = static_cast<int64_t>(*bytes);
          } else if (!absl::SimpleAtoi(text, &value)) {
            return absl::InvalidArgumentError(
                absl::StrCat("expected an integer, got '", text, "'"));
          }
          MOED_RETURN_IF_ERROR(CheckRangeOf(spec, value));
          target = value;
        } else if constexpr (std::is_same_v<T, bool>) {
          std::string lower = absl::AsciiStrToLower(text);
          if (lower == "true" || lower == "1" || lower == "yes") {
            target = true;
          } else if (lower == "false" || lower == "0" || lower == "no") {
            target = false;
          } else {
            return absl::InvalidArgumentError(
                absl::StrCat("expected true or false, got '", text, "'"));
          }
        } else {
          double value = 0;
          if (!absl::SimpleAtod(text, &value)) {
            return absl::InvalidArgumentError(absl::StrCat("expected a number, got '", text, "'"));
          }
          target = value;
        }
        return absl::OkStatus();
      },
      spec.field);
}

absl::Status SetFromJson(const OptionSpec& spec, const json& value, DaemonConfig* config) {
  return std::visit(
      [&](auto member) -> absl::Status {
        auto& target = config->*member;
        using T = std::decay_t<decltype(target)>;
        if constexpr (std::is_same_v<T, std::string>) {
          if (!value.is_string()) return absl::InvalidArgumentError("must be a string");
          MOED_RETURN_IF_ERROR(CheckChoice(spec, value.get<std::string>()));
          target = value.get<std::string>();
        } else if constexpr (std::is_same_v<T, int64_t>) {
          if (spec.byte_size && value.is_string())
            return SetFromText(spec, value.get<std::string>(), config);
          if (!value.is_number_integer()) {
            return absl::InvalidArgumentError(
                spec.byte_size ? "must be a byte count (an integer or a string like \"4G\")"
                               : "must be an integer");
          }
          if (value.is_number_unsigned() && value.get<uint64_t>() > INT64_MAX) {
            return absl::InvalidArgumentError("is out of range");
          }
          MOED_RETURN_IF_ERROR(CheckRangeOf(spec, value.get<int64_t>()));
          target = value.get<int64_t>();
        } else if constexpr (std::is_same_v<T, bool>) {
          if (!value.is_boolean()) return absl::InvalidArgumentError("must be true or false");
          target = value.get<bool>();
        } else {
          if (!value.is_number()) return absl::InvalidArgumentError("must be a number");
          target = value.get<double>();
        }
        return absl::OkStatus();
      },
      spec.field);
}

const OptionSpec* FindOption(absl::string_view name) {
  for (const OptionSpec& spec : DaemonOptions()) {
    if (spec.name == name) return &spec;
  }
  return nullptr;
}

bool IsBoolOption(const OptionSpec& spec) {
  return std::holds_alternative<bool DaemonConfig::*>(spec.field);
}

absl::Status WithContext(absl::string_view context, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

absl::Status ApplyConfigFile(const std::string& path, DaemonConfig* config) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("config file ", path, ": cannot open"));
  std::stringstream text;
  text << file.rdbuf();
  return ApplyConfigJson(text.str(), absl::StrCat("config file ", path), config);
}

}  // namespace

std::string OptionSpec::EnvVar() const {
  return "MOED_" + absl::AsciiStrToUpper(absl::StrReplaceAll(name, {{"-", "_"}}));
}

const std::vector<OptionSpec>& DaemonOptions() {
  static const std::vector<OptionSpec> options = [] {
    std::vector<OptionSpec> o;
    o.push_back({.name = "model",
                 .field = F(&DaemonConfig::model),
                 .metavar = "DIR",
                 .help = "Hugging Face checkpoint directory to serve (config.json, "
                         "*.safetensors, tokenizer.json)"});
    o.push_back({.name = "store",
                 .field = F(&DaemonConfig::store),
                 .metavar = "DIR",
                 .help =
                     "expert store to serve (from moed-pack); experts are staged from disk through "
                     "the tiered cache"});
    o.push_back(
        {.name = "device-cache-bytes",
         .field = F(&DaemonConfig::device_cache_bytes),
         .metavar = "BYTES",
         .help =
             "with --store: budget of the device expert tier (on the CPU backend, RAM); 0 holds "
             "every expert",
         .byte_size = true});
    o.push_back(
        {.name = "host-cache-bytes",
         .field = F(&DaemonConfig::host_cache_bytes),
         .metavar = "BYTES",
         .help = "with --store: budget of the host RAM tier between disk and device; 0 means none",
         .byte_size = true});
    o.push_back({.name = "gpu-memory-fraction",
                 .field = F(&DaemonConfig::gpu_memory_fraction),
                 .metavar = "F",
                 .help = "with --store: the device expert tier's budget as this fraction (above 0, "
                         "at most 1) of the device memory free after the dense weights and the KV "
                         "cache, as vLLM's gpu_memory_utilization; exclusive with "
                         "--device-cache-bytes; 0: not used"});
    o.push_back({.name = "host-compute",
                 .field = F(&DaemonConfig::host_compute),
                 .metavar = "MODE",
                 .help = "with --store, a GPU backend and a host tier: auto runs an expert the "
                         "host tier holds on the CPU when that is estimated (from rates measured "
                         "at start-up) to finish sooner than its copy to the GPU, for requests "
                         "that accept inexact results; off always copies",
                 .choices = {"auto", "off"}});
    o.push_back({.name = "staging-buffers",
                 .field = F(&DaemonConfig::staging_buffers),
                 .metavar = "N",
                 .help = "with --store and a GPU backend: pinned buffers of one expert each that "
                         "reads from disk land in when the host tier does not take them",
                 .min_value = 1,
                 .max_value = 256});
    o.push_back({.name = "expert-precision",
                 .field = F(&DaemonConfig::expert_precision),
                 .metavar = "P",
                 .help = "with --store: which copy every expert runs from; source is exact",
                 .choices = {"source", "int8", "int4"}});
    o.push_back({.name = "eviction-policy",
                 .field = F(&DaemonConfig::eviction_policy),
                 .metavar = "POLICY",
                 .help = "with --store: how the cache tiers choose what to evict (sweep: the "
                         "expert whose next use is furthest, from the layer order and the "
                         "prefetcher's predictions)",
                 .choices = {"lru", "lfu", "scored", "sweep"}});
    o.push_back({.name = "eviction-scope",
                 .field = F(&DaemonConfig::eviction_scope),
                 .metavar = "SCOPE",
                 .help = "with --store: layer keeps each layer's share of the slots resident "
                         "across steps; global evicts from one pool (thrashes when a step's "
                         "experts exceed the tier)",
                 .choices = {"layer", "global"}});
    o.push_back({.name = "io-queue-depth",
                 .field = F(&DaemonConfig::io_queue_depth),
                 .metavar = "N",
                 .help = "with --store: expert reads in flight",
                 .min_value = 1,
                 .max_value = 1024});
    o.push_back({.name = "prefetch",
                 .field = F(&DaemonConfig::prefetch),
                 .metavar = "PREDICTOR",
                 .help = "with --store: how the experts of the next layers are predicted and read "
                         "ahead (gate: their routers on the current hidden state; affinity: "
                         "counts from --prefetch-calibration; history: recent choices; "
                         "combined: all of them, weighted by their measured recall). Exact "
                         "results are the same for every value",
                 .choices = {"off", "gate", "affinity", "history", "combined"}});
    o.push_back({.name = "prefetch-depth",
                 .field = F(&DaemonConfig::prefetch_depth),
                 .metavar = "N",
                 .help = "with --store: how many layers ahead the prefetcher predicts",
                 .min_value = 1,
                 .max_value = 8});
    o.push_back({.name = "prefetch-candidates",
                 .field = F(&DaemonConfig::prefetch_candidates),
                 .metavar = "N",
                 .help = "with --store: experts read ahead per token and predicted layer, the "
                         "likeliest first (the rest of the prediction only guards resident "
                         "experts from less likely prefetches)",
                 .min_value = 1,
                 .max_value = 64});
    o.push_back({.name = "prefetch-calibration",
                 .field = F(&DaemonConfig::prefetch_calibration),
                 .metavar = "FILE",
                 .help = "a routing trace (.jsonl, as --record-routing writes) to calibrate the "
                         "affinity predictor on; combined uses it too when given"});
    o.push_back({.name = "routing-trace",
                 .field = F(&DaemonConfig::routing_trace),
                 .metavar = "FILE",
                 .help = "for benchmarks: every layer routes each sequence's tokens to the "
                         "experts (and gate weights) a recorded trace chose, sequences taking the "
                         "trace's sequences in turn; the output is then not the model's"});
    o.push_back({.name = "precision-policy",
                 .field = F(&DaemonConfig::precision_policy),
                 .metavar = "POLICY",
                 .help = "with --store: when an expert whose full copy is not resident runs from "
                         "its --fallback-precision copy instead of waiting (exact: never, results "
                         "bitwise equal to all-resident; threshold: when every token routed to it "
                         "has a gate weight below --fallback-threshold or a rank of at least "
                         "--fallback-min-rank; always: every miss). An expert that ran from its "
                         "fallback copy has its full copy read while the disk is idle. Requests "
                         "that ask for EXPERT_PRECISION_SOURCE stay exact",
                 .choices = {"exact", "threshold", "always"}});
    o.push_back({.name = "fallback-precision",
                 .field = F(&DaemonConfig::fallback_precision),
                 .metavar = "P",
                 .help = "with --store and a precision policy that falls back: the copy a "
                         "fallback runs from (the store must hold it)",
                 .choices = {"int8", "int4"}});
    o.push_back({.name = "fallback-threshold",
                 .field = F(&DaemonConfig::fallback_threshold),
                 .metavar = "TAU",
                 .help = "with --precision-policy threshold: a token whose gate weight for the "
                         "expert is below this (0 to 1) may run it from the fallback copy"});
    o.push_back({.name = "fallback-min-rank",
                 .field = F(&DaemonConfig::fallback_min_rank),
                 .metavar = "R",
                 .help = "with --precision-policy threshold: a token whose rank for the expert "
                         "among its experts (0: the first) is at least this may run it from the "
                         "fallback copy; 64: rank never decides",
                 .min_value = 1,
                 .max_value = 64});
    o.push_back({.name = "low-bit-floor",
                 .field = F(&DaemonConfig::low_bit_floor),
                 .metavar = "BOOL",
                 .help = "with a precision policy that falls back: keep every expert's fallback "
                         "copy resident as far as the budget allows (read while the disk is "
                         "idle), the rest of the budget for full copies"});
    o.push_back({.name = "listen",
                 .field = F(&DaemonConfig::listen),
                 .metavar = "HOST:PORT",
                 .help = "gRPC address; port 0 picks a free port. The first line on stdout is "
                         "'listening on HOST:PORT'"});
    o.push_back({.name = "http-listen",
                 .field = F(&DaemonConfig::http_listen),
                 .metavar = "HOST:PORT",
                 .help = "OpenAI-compatible HTTP API, /health, /ready; port 0 picks a free port, "
                         "\"\" turns it off. The second line on stdout is 'http listening on "
                         "HOST:PORT'"});
    o.push_back({.name = "api-key",
                 .field = F(&DaemonConfig::api_key),
                 .metavar = "KEY",
                 .help = "when set, HTTP /v1/* requests need 'Authorization: Bearer KEY' and gRPC "
                         "calls the same 'authorization' metadata (health and readiness stay "
                         "open)"});
    o.push_back({.name = "max-connections",
                 .field = F(&DaemonConfig::max_connections),
                 .metavar = "N",
                 .help = "open HTTP connections at most; beyond it a new one gets 503",
                 .min_value = 1,
                 .max_value = 1 << 20});
    o.push_back({.name = "http-max-body-bytes",
                 .field = F(&DaemonConfig::http_max_body_bytes),
                 .metavar = "BYTES",
                 .help = "largest HTTP request body; a larger one gets 413",
                 .min_value = 1024,
                 .max_value = 1ll << 30,
                 .byte_size = true});
    o.push_back({.name = "http-idle-seconds",
                 .field = F(&DaemonConfig::http_idle_seconds),
                 .metavar = "S",
                 .help = "an HTTP connection with no request in progress for this long is closed",
                 .min_value = 1,
                 .max_value = 86400});
    o.push_back({.name = "metrics",
                 .field = F(&DaemonConfig::metrics),
                 .metavar = "BOOL",
                 .help = "record Prometheus metrics and serve them at GET /metrics on the HTTP "
                         "port (false: neither, for measuring what recording costs)"});
    o.push_back({.name = "config",
                 .field = F(&DaemonConfig::config),
                 .metavar = "FILE",
                 .help = "JSON file of options, keyed by the long flag names; flags and MOED_* "
                         "variables override it",
                 .file_key = false});
    o.push_back({.name = "served-model-name",
                 .field = F(&DaemonConfig::served_model_name),
                 .metavar = "NAME",
                 .help = "Model name reported to clients (default: the model directory's name)"});
    o.push_back({.name = "chat-template",
                 .field = F(&DaemonConfig::chat_template),
                 .metavar = "FILE",
                 .help = "Jinja chat template to render chat requests with, instead of the "
                         "model's chat_template.jinja or tokenizer_config.json template"});
    o.push_back({.name = "tool-call-parser",
                 .field = F(&DaemonConfig::tool_call_parser),
                 .metavar = "KIND",
                 .help = "how tool calls are read from the model's output: hermes "
                         "(<tool_call>{...}</tool_call>), mistral ([TOOL_CALLS]); auto follows "
                         "the chat template",
                 .choices = {"auto", "none", "hermes", "mistral"}});
    o.push_back({.name = "reasoning-parser",
                 .field = F(&DaemonConfig::reasoning_parser),
                 .metavar = "KIND",
                 .help = "how reasoning is split from the answer: think (<think>...</think>); "
                         "auto follows the chat template",
                 .choices = {"auto", "none", "think"}});
    o.push_back({.name = "backend",
                 .field = F(&DaemonConfig::backend),
                 .metavar = "KIND",
                 .help = "Compute backend: auto uses a CUDA device when there is one, else the CPU",
                 .choices = {"auto", "cpu", "cuda"}});
    o.push_back({.name = "cuda-device",
                 .field = F(&DaemonConfig::cuda_device),
                 .metavar = "N",
                 .help = "CUDA device index for the cuda backend",
                 .min_value = 0,
                 .max_value = 1024});
    o.push_back({.name = "threads",
                 .field = F(&DaemonConfig::threads),
                 .metavar = "N",
                 .help = "CPU compute threads; 0 uses every core",
                 .min_value = 0,
                 .max_value = 4096});
    o.push_back({.name = "max-batch",
                 .field = F(&DaemonConfig::max_batch),
                 .metavar = "N",
                 .help = "most sequences in one engine step",
                 .min_value = 1,
                 .max_value = 4096});
    o.push_back(
        {.name = "max-queue",
         .field = F(&DaemonConfig::max_queue),
         .metavar = "N",
         .help = "most requests waiting beyond the running batch; more get RESOURCE_EXHAUSTED",
         .min_value = 0,
         .max_value = 1000000});
    o.push_back({.name = "max-concurrent-streams",
                 .field = F(&DaemonConfig::max_concurrent_streams),
                 .metavar = "N",
                 .help = "open gRPC streams (Generate and health Watch) at most; more get "
                         "RESOURCE_EXHAUSTED. An open stream holds no thread",
                 .min_value = 1,
                 .max_value = 1000000});
    o.push_back(
        {.name = "max-tokens-per-step",
         .field = F(&DaemonConfig::max_tokens_per_step),
         .metavar = "N",
         .help =
             "decode tokens plus prompt tokens in one step; longer prompts are prefilled in chunks",
         .min_value = 1,
         .max_value = 1 << 20});
    o.push_back({.name = "max-running",
                 .field = F(&DaemonConfig::max_running),
                 .metavar = "N",
                 .help = "sequences admitted at once (each holds its KV cache); when more than "
                         "--max-batch, each step picks --max-batch of them; 0 means --max-batch",
                 .min_value = 0,
                 .max_value = 65536});
    o.push_back(
        {.name = "kv-cache-bytes",
         .field = F(&DaemonConfig::kv_cache_bytes),
         .metavar = "BYTES",
         .help = "KV cache memory of all running sequences, taken in 16-token blocks as they "
                 "grow; when it runs out the newest sequence is preempted (requeued, its prefix "
                 "recomputed later). 0: --max-running full contexts, at most half the compute "
                 "device's free memory",
         .byte_size = true});
    o.push_back({.name = "expert-aware-batching",
                 .field = F(&DaemonConfig::expert_aware_batching),
                 .metavar = "BOOL",
                 .help = "with --store and --max-running above --max-batch: pick each step's "
                         "sequences so that the fewest experts must be staged, predicting each "
                         "one's experts from its previous token (else round-robin)"});
    o.push_back({.name = "max-delay-steps",
                 .field = F(&DaemonConfig::max_delay_steps),
                 .metavar = "N",
                 .help = "expert-aware batching runs a sequence at most N steps later than its "
                         "round-robin turn (a bound on its added latency; larger saves more "
                         "staging)",
                 .min_value = 1,
                 .max_value = 1024});
    o.push_back(
        {.name = "drain-seconds",
         .field = F(&DaemonConfig::drain_seconds),
         .metavar = "S",
         .help = "on SIGTERM, how long requests in flight may run before they are cancelled",
         .min_value = 0,
         .max_value = 86400});
    o.push_back(
        {.name = "record-routing",
         .field = F(&DaemonConfig::record_routing),
         .metavar = "FILE",
         .help = "append each finished request's routing (every token, every layer) to this .jsonl "
                 "trace, for moed-replay"});
    o.push_back({.name = "log-level",
                 .field = F(&DaemonConfig::log_level),
                 .metavar = "LEVEL",
                 .help = "Least severe log level written to stderr",
                 .choices = {"trace", "debug", "info", "warn", "error"}});
    o.push_back({.name = "log-format",
                 .field = F(&DaemonConfig::log_format),
                 .metavar = "FORMAT",
                 .help = "text: one readable line per event; json: one JSON object per line",
                 .choices = {"text", "json"}});
    return o;
  }();
  return options;
}

EnvLookup ProcessEnvironment() {
  return [](const std::string& name) -> std::optional<std::string> {
    const char* value = std::getenv(name.c_str());
    if (value == nullptr) return std::nullopt;
    return std::string(value);
  };
}

std::vector<std::string> ProcessEnvironmentNames() {
  std::vector<std::string> names;
  for (char** entry = environ; entry != nullptr && *entry != nullptr; ++entry) {
    absl::string_view variable(*entry);
    names.emplace_back(variable.substr(0, variable.find('=')));
  }
  return names;
}

absl::Status ApplyConfigJson(absl::string_view text, absl::string_view source,
                             DaemonConfig* config) {
  // A key given twice would silently take its last value: name it instead.
  std::set<std::string> keys;
  std::string repeated;
  json::parser_callback_t note_keys = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !keys.insert(parsed.get<std::string>()).second && repeated.empty()) {
      repeated = parsed.get<std::string>();
    }
    return true;
  };
  json root = json::parse(text.begin(), text.end(), note_keys, /*allow_exceptions=*/false);
  if (root.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": must be a JSON object"));
  }
  if (!repeated.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": key \"", repeated, "\" is given more than once"));
  }
  // Validate everything before changing anything, so a bad file leaves the config as it was.
  DaemonConfig updated = *config;
  for (const auto& [key, value] : root.items()) {
    const OptionSpec* spec = FindOption(key);
    if (spec == nullptr || !spec->file_key) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": unknown key \"", key, "\""));
    }
    MOED_RETURN_IF_ERROR(
        WithContext(absl::StrCat(source, ": \"", key, "\""), SetFromJson(*spec, value, &updated)));
  }
  *config = std::move(updated);
  return absl::OkStatus();
}

absl::Status SplitHostPort(absl::string_view address, std::string* host, int* port) {
  size_t colon = address.rfind(':');
  if (colon == absl::string_view::npos || colon == 0) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' is not HOST:PORT"));
  }
  absl::string_view host_part = address.substr(0, colon);
  if (host_part.front() == '[') {
    if (host_part.back() != ']' || host_part.size() < 3) {
      return absl::InvalidArgumentError(absl::StrCat("'", address, "' has a malformed IPv6 host"));
    }
  } else if (host_part.find(':') != absl::string_view::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", address, "': write IPv6 hosts in brackets, as [::1]:PORT"));
  }
  int value = 0;
  if (!absl::SimpleAtoi(address.substr(colon + 1), &value) || value < 0 || value > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("'", address, "' has no valid port (0-65535)"));
  }
  *host = std::string(host_part);
  *port = value;
  return absl::OkStatus();
}

absl::Status ValidateConfig(const DaemonConfig& config) {
  std::string host;
  int port = 0;
  MOED_RETURN_IF_ERROR(WithContext("--listen", SplitHostPort(config.listen, &host, &port)));
  if (!config.http_listen.empty()) {
    MOED_RETURN_IF_ERROR(
        WithContext("--http-listen", SplitHostPort(config.http_listen, &host, &port)));
  }
  if (config.model.empty() && config.store.empty()) {
    return absl::InvalidArgumentError(
        "no model to serve: pass --model DIR or --store DIR (or set MOED_MODEL)");
  }
  if (!config.model.empty() && !config.store.empty()) {
    return absl::InvalidArgumentError(
        "--model and --store are exclusive: serve a checkpoint or a store");
  }
  if (!(config.gpu_memory_fraction >= 0 && config.gpu_memory_fraction <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--gpu-memory-fraction: ", config.gpu_memory_fraction, " is not between 0 and 1"));
  }
  if (config.gpu_memory_fraction > 0 && config.device_cache_bytes > 0) {
    return absl::InvalidArgumentError(
        "--gpu-memory-fraction and --device-cache-bytes are exclusive: give the device tier one "
        "budget");
  }
  return absl::OkStatus();
}

absl::StatusOr<CommandLine> ParseCommandLine(const std::vector<std::string>& args,
                                             const EnvLookup& env,
                                             const std::vector<std::string>& variable_names) {
  struct FlagValue {
    const OptionSpec* spec;
    std::string value;
  };
  CommandLine result;
  std::vector<FlagValue> flags;
  for (size_t i = 0; i < args.size(); ++i) {
    absl::string_view arg = args[i];
    if (arg == "--help" || arg == "-h") {
      result.action = Action::kHelp;
      return result;
    }
    if (arg == "--version") {
      result.action = Action::kVersion;
      return result;
    }
    if (arg == "--help-markdown") {
      result.action = Action::kHelpMarkdown;
      return result;
    }
    if (arg.size() < 3 || arg.substr(0, 2) != "--") {
      return absl::InvalidArgumentError(
          absl::StrCat("unexpected argument '", arg, "' (options are --name VALUE; see --help)"));
    }
    absl::string_view body = arg.substr(2);
    std::optional<std::string> inline_value;
    if (size_t eq = body.find('='); eq != absl::string_view::npos) {
      inline_value = std::string(body.substr(eq + 1));
      body = body.substr(0, eq);
    }
    const OptionSpec* spec = FindOption(body);
    if (spec == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat("unknown flag --", body, " (see --help)"));
    }
    std::string value;
    if (inline_value.has_value()) {
      value = *inline_value;
    } else if (IsBoolOption(*spec)) {
      // "--flag" alone means true; "--flag false" and "--flag=false" both work.
      value = "true";
      if (i + 1 < args.size() && (args[i + 1] == "true" || args[i + 1] == "false"))
        value = args[++i];
    } else if (i + 1 < args.size()) {
      value = args[++i];
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--", spec->name, " needs a value (", spec->metavar, ")"));
    }
    flags.push_back({spec, std::move(value)});
  }

  // The config file comes first so that variables and flags override it.
  std::optional<std::string> config_path = env("MOED_CONFIG");
  for (const FlagValue& flag : flags) {
    if (flag.spec->name == "config") config_path = flag.value;
  }
  if (config_path.has_value() && !config_path->empty()) {
    result.config.config = *config_path;
    MOED_RETURN_IF_ERROR(ApplyConfigFile(*config_path, &result.config));
  }
  std::set<std::string> known;
  for (const OptionSpec& spec : DaemonOptions()) {
    known.insert(spec.EnvVar());
    if (std::optional<std::string> value = env(spec.EnvVar()); value.has_value()) {
      MOED_RETURN_IF_ERROR(WithContext(spec.EnvVar(), SetFromText(spec, *value, &result.config)));
    }
  }
  // moectl's server address and the tests' data folder share the prefix but are no daemon's.
  known.insert("MOED_SERVER");
  known.insert("MOED_SHARED_DIR");
  std::set<std::string> warned;
  for (const std::string& name : variable_names) {
    if (absl::StartsWith(name, "MOED_") && !known.contains(name) && warned.insert(name).second) {
      result.warnings.push_back(absl::StrCat("environment variable ", name,
                                             " names no moed option and is ignored (see --help)"));
    }
  }
  for (const FlagValue& flag : flags) {
    MOED_RETURN_IF_ERROR(WithContext(absl::StrCat("--", flag.spec->name),
                                     SetFromText(*flag.spec, flag.value, &result.config)));
  }
  MOED_RETURN_IF_ERROR(ValidateConfig(result.config));
  return result;
}

std::string HelpText() {
  std::string text =
      "moed: serving daemon for Mixture-of-Experts language models\n\n"
      "usage: moed (--model DIR | --store DIR) [options]\n\n"
      "Every option can also be set in the --config JSON file (same key, without --) or in the\n"
      "environment variable shown. Precedence: flags, then variables, then the file.\n\n";
  for (const OptionSpec& spec : DaemonOptions()) {
    std::string head = absl::StrCat("  --", spec.name, " ", spec.metavar);
    absl::StrAppend(&text, head, "\n      ", spec.help,
                    "\n      default: ", DefaultText(spec).empty() ? "(none)" : DefaultText(spec));
    if (!spec.choices.empty())
      absl::StrAppend(&text, "; one of ", absl::StrJoin(spec.choices, ", "));
    absl::StrAppend(&text, "; env: ", spec.EnvVar(), "\n");
  }
  absl::StrAppend(&text, "  --help\n      Print this text\n  --version\n      Print the version\n");
  return text;
}

std::string OptionsMarkdown() {
  std::string text =
      "| flag | config key | environment | default | description |\n"
      "| --- | --- | --- | --- | --- |\n";
  for (const OptionSpec& spec : DaemonOptions()) {
    std::string description = spec.help;
    if (!spec.choices.empty()) {
      absl::StrAppend(&description, " (one of: ", absl::StrJoin(spec.choices, ", "), ")");
    }
    std::string default_text = DefaultText(spec);
    absl::StrAppend(&text, "| `--", spec.name, " ", spec.metavar, "` | ",
                    spec.file_key ? absl::StrCat("`", spec.name, "`") : std::string("—"), " | `",
                    spec.EnvVar(), "` | ",
                    default_text.empty() ? "" : absl::StrCat("`", default_text, "`"), " | ",
                    description, " |\n");
  }
  return text;
}

}  // namespace moed::server
