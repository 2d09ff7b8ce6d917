// moectl: the command-line client. Commands that talk to a daemon print human text, or one
// JSON object per line with --json.
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "cache/expert_cache.h"
#include "cache/routing_trace.h"
#include "cache/store_reader.h"
#include "client/client.h"
#include "google/protobuf/util/json_util.h"
#include "model/chat_template.h"
#include "model/generate.h"
#include "model/quality_eval.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "server/engine.h"
#include "util/read_file.h"
#include "util/status_macros.h"

namespace {

struct GlobalOptions {
  std::string server = "127.0.0.1:50051";
  bool json = false;
  double timeout_seconds = 10;
  double stream_timeout_seconds = 0;
  std::string api_key;
};

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  if (!google::protobuf::util::MessageToJsonString(message, &out, options).ok()) return "{}";
  return out;
}

std::string Gib(uint64_t bytes) { return absl::StrFormat("%.2f GiB", bytes / double(1ull << 30)); }
std::string Mib(uint64_t bytes) { return absl::StrFormat("%.2f MiB", bytes / double(1ull << 20)); }

int Fail(const absl::Status& status, const GlobalOptions& options) {
  std::cerr << "moectl: " << options.server << ": " << absl::StatusCodeToString(status.code())
            << ": " << status.message() << "\n";
  return 1;
}

std::unique_ptr<moed::client::Client> Connect(const GlobalOptions& options) {
  return moed::client::Client::Create(
      options.server,
      std::chrono::milliseconds(static_cast<int64_t>(options.timeout_seconds * 1000)),
      options.api_key,
      std::chrono::milliseconds(static_cast<int64_t>(options.stream_timeout_seconds * 1000)));
}

int RunHealth(const GlobalOptions& options, const std::string& service) {
  auto status = Connect(options)->Health(service);
  if (!status.ok()) return Fail(status.status(), options);
  std::string name = grpc::health::v1::HealthCheckResponse::ServingStatus_Name(*status);
  if (options.json) {
    std::cout << "{\"service\":\"" << service << "\",\"status\":\"" << name << "\"}\n";
  } else {
    std::cout << (service.empty() ? "moed" : service) << ": " << name << "\n";
  }
  return *status == grpc::health::v1::HealthCheckResponse::SERVING ? 0 : 1;
}

void PrintDevice(const moed::v1::Device& device) {
  std::cout << "  " << device.name();
  if (!device.compute_capability().empty())
    std::cout << " (compute " << device.compute_capability() << ")";
  std::cout << ": " << Gib(device.free_memory_bytes()) << " free of "
            << Gib(device.total_memory_bytes()) << ", " << device.compute_units()
            << " compute units\n";
}

int RunInfo(const GlobalOptions& options) {
  auto info = Connect(options)->ModelInfo();
  if (!info.ok()) return Fail(info.status(), options);
  if (options.json) {
    std::cout << ToJson(*info) << "\n";
    return 0;
  }
  std::cout << "model:        " << info->model_name() << " (" << info->architecture() << ", "
            << info->dtype() << ")\n"
            << "source:       " << info->source_path() << "\n"
            << "shape:        " << info->num_layers() << " layers (" << info->moe_layers()
            << " MoE), hidden " << info->hidden_size() << ", vocab " << info->vocab_size() << "\n"
            << "attention:    "
            << (info->kv_lora_rank() > 0
                    ? absl::StrCat("MLA, ", info->num_attention_heads(), " heads of ",
                                   info->head_dim(), " (rope ", info->qk_rope_head_dim(),
                                   ", value ", info->v_head_dim(), "), latent ",
                                   info->kv_lora_rank(),
                                   info->q_lora_rank() > 0
                                       ? absl::StrCat(", query rank ", info->q_lora_rank())
                                       : std::string())
                    : absl::StrCat(info->num_attention_heads(), " heads / ",
                                   info->num_key_value_heads(), " KV heads of ", info->head_dim()))
            << (info->rope_scaling().empty() ? "" : ", rope " + info->rope_scaling()) << "; "
            << info->kv_bytes_per_token() << " KV bytes per token\n"
            << "experts:      " << info->num_experts() << " per layer (" << info->routing()
            << "), intermediate " << info->expert_intermediate_size()
            << (info->shared_expert_intermediate_size() > 0
                    ? absl::StrCat(", shared ", info->shared_expert_intermediate_size())
                    : std::string())
            << ", " << Mib(info->expert_bytes()) << " each, " << Mib(info->total_expert_bytes())
            << " in all\n"
            << "context:      " << info->max_context_tokens() << " tokens\n"
            << "tokenizer:    " << (info->has_tokenizer() ? "yes" : "no (token ids only)") << "\n"
            << "chat:         "
            << (info->chat_template().empty()
                    ? std::string("no chat template")
                    : absl::StrCat(info->chat_template(),
                                   " (tool calls: ", info->tool_call_parser(),
                                   ", reasoning: ", info->reasoning_parser(), ")"))
            << "\n"
            << "backend:      " << info->backend() << "\n";
  PrintDevice(info->device());
  if (!info->backend_note().empty()) std::cout << "  (" << info->backend_note() << ")\n";
  for (const auto& device : info->cuda_devices()) {
    std::cout << "cuda device " << device.index() << ":\n";
    PrintDevice(device);
  }
  if (info->has_expert_cache()) {
    const auto& c = info->expert_cache();
    std::cout << "expert cache: " << c.precision() << " experts, " << c.eviction_policy()
              << " eviction (" << c.eviction_scope() << " scope), reader " << c.reader() << "\n"
              << "  device: " << c.device_resident() << " of " << c.device_slots() << " slots of "
              << Mib(c.slot_bytes()) << " (" << Mib(c.device_budget_bytes()) << ")\n"
              << "  host:   " << c.host_resident() << " of " << c.host_slots() << " slots ("
              << Mib(c.host_budget_bytes()) << ")\n"
              << "  hits " << c.device_hits() << ", misses " << c.device_misses() << ", host hits "
              << c.host_hits() << ", disk reads " << c.ssd_reads() << " (" << Mib(c.ssd_bytes())
              << "), failed " << c.failed_reads() << "\n"
              << "  prefetch: " << c.prefetch_predictor();
    if (c.prefetch_predictor() != "off") {
      uint64_t layers = 0;
      double recall = 0;
      for (const auto& layer : c.per_layer()) {
        recall += layer.recall();
        ++layers;
      }
      std::cout << ", " << c.prefetch_depth() << " layer(s) ahead; issued " << c.prefetch_issued()
                << ": useful " << c.prefetch_useful() << ", late " << c.prefetch_late()
                << ", wasted " << c.prefetch_wasted() << ", failed " << c.prefetch_failed()
                << ", pending " << c.prefetch_pending();
      if (layers > 0) std::cout << "; mean recall " << recall / static_cast<double>(layers);
    }
    std::cout << "\n  precision policy: " << c.precision_policy();
    if (!c.fallback_precision().empty()) {
      std::cout << ", fallback " << c.fallback_precision()
                << (c.low_bit_floor() ? " with floor" : "") << ": " << c.fallback_resident()
                << " of " << c.fallback_slots() << " slots of " << Mib(c.fallback_slot_bytes())
                << "; fallbacks int8 " << c.fallbacks_int8() << ", int4 " << c.fallbacks_int4()
                << "; background reads: floor " << c.floor_reads() << ", upgrade "
                << c.upgrade_reads();
    }
    if (c.host_computes() > 0 || c.copy_bytes_queued() > 0) {
      std::cout << "\n  GPU copies: " << Mib(c.copy_bytes_queued()) << " queued; "
                << c.host_computes() << " experts run on the CPU instead";
    }
    std::cout << "\n";
  }
  std::cout << "requests:     " << info->requests_running() << " running, "
            << info->requests_waiting() << " waiting, KV cache " << Mib(info->kv_cache_bytes())
            << " held of " << Mib(info->kv_cache_budget_bytes()) << ", " << info->preemptions()
            << " preemptions\n"
            << "version:      " << info->server_version() << "\n";
  return 0;
}

struct LogitsOptions {
  std::string model_dir, store_dir, precision = "source", device_bytes = "0", host_bytes = "0",
                                    policy = "lru", scope = "layer", backend = "auto";
  std::string tokens, record_routing;
  std::string prefetch = "combined", prefetch_calibration, routing_trace;
  int greedy = 0, threads = 0, cuda_device = 0, prefetch_depth = 1;
  std::string precision_policy = "exact", fallback_precision = "int4";
  double fallback_threshold = 0.2;
  int fallback_min_rank = 64;
  bool low_bit_floor = false;
  // eval
  std::string prompts;
  int max_tokens = 16;
  bool json = false;
};

// The loosest copy a local run accepts: the fallback copy when the policy falls back.
moed::model::Precision LocalLoosest(const LogitsOptions& o) {
  if (o.precision_policy == "exact") return moed::model::Precision::kSource;
  // CLI11 checked the name already.
  return moed::cache::ParsePrecision(o.fallback_precision).value_or(moed::model::Precision::kInt4);
}

// The same engine the daemon builds, from the same configuration fields.
absl::StatusOr<moed::server::Engine> OpenForLogits(const LogitsOptions& o) {
  moed::server::DaemonConfig config;
  config.model = o.model_dir;
  config.store = o.store_dir;
  config.backend = o.backend;
  config.cuda_device = o.cuda_device;
  config.threads = o.threads;
  config.expert_precision = o.precision;
  MOED_ASSIGN_OR_RETURN(uint64_t device_bytes, moed::cache::ParseByteSize(o.device_bytes));
  MOED_ASSIGN_OR_RETURN(uint64_t host_bytes, moed::cache::ParseByteSize(o.host_bytes));
  config.device_cache_bytes = static_cast<int64_t>(device_bytes);
  config.host_cache_bytes = static_cast<int64_t>(host_bytes);
  config.eviction_policy = o.policy;
  config.eviction_scope = o.scope;
  config.prefetch = o.prefetch;
  config.prefetch_depth = o.prefetch_depth;
  config.prefetch_calibration = o.prefetch_calibration;
  config.routing_trace = o.routing_trace;
  config.precision_policy = o.precision_policy;
  config.fallback_precision = o.fallback_precision;
  config.fallback_threshold = o.fallback_threshold;
  config.fallback_min_rank = o.fallback_min_rank;
  config.low_bit_floor = o.low_bit_floor;
  return moed::server::BuildEngine(config);
}

// Local: loads the checkpoint or store itself, no daemon. Prints one JSON object with the
// golden cases' fields.
int RunLogits(const LogitsOptions& o) {
  std::vector<int32_t> tokens;
  for (absl::string_view piece : absl::StrSplit(o.tokens, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moectl logits: --tokens: '" << piece << "' is not a token id\n";
      return 2;
    }
    tokens.push_back(id);
  }
  auto engine = OpenForLogits(o);
  if (!engine.ok()) {
    std::cerr << "moectl logits: " << engine.status().message() << "\n";
    return 1;
  }
  auto result = moed::model::ScoreAndGreedy(*engine->model, tokens, o.greedy, LocalLoosest(o));
  if (!result.ok()) {
    std::cerr << "moectl logits: " << result.status().message() << "\n";
    return 1;
  }
  if (!o.record_routing.empty()) {
    const auto& c = engine->model_config;
    auto trace = moed::cache::TraceFromRouting(
        result->routing, static_cast<int>(c.num_experts), static_cast<int>(c.experts_per_token),
        static_cast<int>(tokens.size()), o.store_dir.empty() ? o.model_dir : o.store_dir);
    if (absl::Status s = moed::cache::AppendRoutingTrace(o.record_routing, trace); !s.ok()) {
      std::cerr << "moectl logits: " << s.message() << "\n";
      return 1;
    }
  }
  nlohmann::json out = {{"prompt_logits", result->prompt_logits},
                        {"greedy", result->greedy},
                        {"greedy_logits", result->greedy_logits}};
  std::cout << out.dump() << "\n";
  return 0;
}

// Reads the prompts file: JSON Lines, each {"prompt": "..."} or {"prompt_token_ids": [...]}.
absl::StatusOr<std::vector<std::vector<int32_t>>> ReadEvalPrompts(
    const std::string& path, const std::string& tokenizer_dir) {
  MOED_ASSIGN_OR_RETURN(std::string text, moed::util::ReadFile(path));
  std::unique_ptr<moed::model::Tokenizer> tokenizer;
  std::vector<std::vector<int32_t>> prompts;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    if (absl::StripAsciiWhitespace(line).empty()) continue;
    const std::string where = absl::StrCat(path, ":", line_number);
    nlohmann::json entry = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": not a JSON object"));
    }
    const bool has_text = entry.contains("prompt"), has_ids = entry.contains("prompt_token_ids");
    if (has_text == has_ids) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": give exactly one of \"prompt\" and \"prompt_token_ids\""));
    }
    std::vector<int32_t> ids;
    if (has_ids) {
      const nlohmann::json& list = entry["prompt_token_ids"];
      if (!list.is_array()) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": prompt_token_ids is not an array"));
      }
      for (const nlohmann::json& id : list) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return absl::InvalidArgumentError(
              absl::StrCat(where, ": prompt_token_ids holds something other than a token id"));
        }
        ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
    } else {
      if (!entry["prompt"].is_string()) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": prompt is not a string"));
      }
      if (tokenizer == nullptr) {
        MOED_ASSIGN_OR_RETURN(tokenizer,
                              moed::model::Tokenizer::FromFile(tokenizer_dir + "/tokenizer.json"));
      }
      MOED_ASSIGN_OR_RETURN(ids, tokenizer->Encode(entry["prompt"].get<std::string>(), true));
    }
    if (ids.empty()) return absl::InvalidArgumentError(absl::StrCat(where, ": empty prompt"));
    prompts.push_back(std::move(ids));
  }
  if (prompts.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return prompts;
}

// Local: exact mode against the configured precision policy on the same model.
int RunEval(const LogitsOptions& o) {
  auto prompts = ReadEvalPrompts(o.prompts, o.store_dir.empty() ? o.model_dir : o.store_dir);
  if (!prompts.ok()) {
    std::cerr << "moectl eval: " << prompts.status().message() << "\n";
    return 1;
  }
  auto engine = OpenForLogits(o);
  if (!engine.ok()) {
    std::cerr << "moectl eval: " << engine.status().message() << "\n";
    return 1;
  }
  auto result =
      moed::model::EvaluateQuality(*engine->model, *prompts, o.max_tokens, LocalLoosest(o));
  if (!result.ok()) {
    std::cerr << "moectl eval: " << result.status().message() << "\n";
    return 1;
  }
  nlohmann::json out = {
      {"precision_policy", o.precision_policy},
      {"fallback_precision", o.precision_policy == "exact" ? nlohmann::json(nullptr)
                                                           : nlohmann::json(o.fallback_precision)},
      {"prompts", result->prompts},
      {"positions", result->positions},
      {"kl_mean", result->kl_mean},
      {"top1_agreement", result->top1_agreement},
      {"greedy_agreement_tokens", result->greedy_agreement_tokens},
      {"fallbacks", result->fallbacks}};
  if (o.precision_policy == "threshold") {
    out["fallback_threshold"] = o.fallback_threshold;
    out["fallback_min_rank"] = o.fallback_min_rank;
  }
  out["low_bit_floor"] = o.low_bit_floor;
  if (o.json) {
    std::cout << out.dump() << "\n";
  } else {
    std::cout << absl::StrFormat(
        "%d prompts, %d positions: KL %.6g nats, top-1 agreement %.4f, greedy agreement %.2f "
        "tokens, %d fallbacks\n",
        result->prompts, result->positions, result->kl_mean, result->top1_agreement,
        result->greedy_agreement_tokens, result->fallbacks);
  }
  return 0;
}

std::optional<std::unique_ptr<moed::model::Tokenizer>> LoadTokenizer(const std::string& path,
                                                                     const char* command) {
  auto tokenizer = moed::model::Tokenizer::FromFile(path);
  if (!tokenizer.ok()) {
    std::cerr << "moectl " << command << ": " << tokenizer.status().message() << "\n";
    return std::nullopt;
  }
  return *std::move(tokenizer);
}

// Local: prints the ids as a JSON array.
int RunTokenize(const std::string& path, std::optional<std::string> text, bool add_special) {
  auto tokenizer = LoadTokenizer(path, "tokenize");
  if (!tokenizer) return 1;
  if (!text.has_value()) {
    std::stringstream in;
    in << std::cin.rdbuf();
    text = in.str();
  }
  auto ids = (*tokenizer)->Encode(*text, add_special);
  if (!ids.ok()) {
    std::cerr << "moectl tokenize: " << ids.status().message() << "\n";
    return 1;
  }
  std::cout << nlohmann::json(*ids).dump() << "\n";
  return 0;
}

int RunDetokenize(const std::string& path, const std::string& ids_text, bool skip_special) {
  std::vector<int32_t> ids;
  for (absl::string_view piece : absl::StrSplit(ids_text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moectl detokenize: --ids: '" << piece << "' is not a token id\n";
      return 2;
    }
    ids.push_back(id);
  }
  auto tokenizer = LoadTokenizer(path, "detokenize");
  if (!tokenizer) return 1;
  auto text = (*tokenizer)->Decode(ids, skip_special);
  if (!text.ok()) {
    std::cerr << "moectl detokenize: " << text.status().message() << "\n";
    return 1;
  }
  std::cout << *text;
  return 0;
}

struct GenerateOptions {
  std::string prompt, ids;
  uint32_t max_tokens = 64;
  std::optional<float> temperature, top_p;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool logprobs = false;
  bool ignore_eos = false;
};

int RunGenerate(const GlobalOptions& options, const GenerateOptions& g) {
  moed::v1::GenerateRequest request;
  request.set_prompt(g.prompt);
  for (absl::string_view piece : absl::StrSplit(g.ids, ',', absl::SkipWhitespace())) {
    uint32_t id = 0;
    if (!absl::SimpleAtoi(piece, &id)) {
      std::cerr << "moectl generate: --ids: '" << piece << "' is not a token id\n";
      return 2;
    }
    request.add_prompt_token_ids(id);
  }
  auto* sampling = request.mutable_sampling();
  sampling->set_max_tokens(g.max_tokens);
  sampling->set_ignore_eos(g.ignore_eos);
  if (g.temperature) sampling->set_temperature(*g.temperature);
  if (g.top_p) sampling->set_top_p(*g.top_p);
  if (g.seed) sampling->set_seed(*g.seed);
  for (const std::string& s : g.stop) sampling->add_stop(s);
  sampling->set_logprobs(g.logprobs);
  std::unique_ptr<moed::client::Client> client = Connect(options);
  // A model without a tokenizer streams token ids and no text: print the ids then.
  bool print_ids = false;
  if (!options.json) {
    absl::StatusOr<moed::v1::ModelInfoResponse> info = client->ModelInfo();
    if (!info.ok()) return Fail(info.status(), options);
    print_ids = !info->has_tokenizer();
  }
  moed::v1::GenerateResponse last;
  absl::Status status = client->Generate(request, [&](const moed::v1::GenerateResponse& message) {
    if (options.json) {
      std::cout << ToJson(message) << std::endl;
    } else if (print_ids) {
      for (uint32_t id : message.token_ids()) std::cout << id << ' ';
      std::cout << std::flush;
    } else {
      std::cout << message.text() << std::flush;
    }
    last = message;
    return true;
  });
  if (!status.ok()) {
    if (!options.json) std::cout << "\n";
    return Fail(status, options);
  }
  if (!options.json) {
    std::cerr << "\n[" << moed::v1::FinishReason_Name(last.finish_reason()) << ", "
              << last.usage().prompt_tokens() << " prompt + " << last.usage().completion_tokens()
              << " completion tokens";
    const moed::v1::ExpertStats& es = last.expert_stats();
    if (es.device_hits() + es.host_hits() + es.ssd_reads() > 0) {
      std::cerr << "; experts: " << es.device_hits() << " device hits, " << es.host_hits()
                << " host hits, " << es.ssd_reads() << " disk reads, "
                << absl::StrFormat("%.1f MiB staged, %.2f s stalled",
                                   static_cast<double>(es.bytes_staged()) / (1 << 20),
                                   es.stall_seconds());
      if (es.low_precision_fallbacks() > 0) {
        std::cerr << ", " << es.fallbacks_int8() << " int8 and " << es.fallbacks_int4()
                  << " int4 fallbacks";
      }
    }
    std::cerr << "]\n";
  }
  return 0;
}

}  // namespace

// Renders one case of the chat-template test-vector format (messages, tools,
// add_generation_prompt, bos_token, eos_token, template_kwargs) and prints exactly the
// rendered text: nothing added, no newline.
int RunChatTemplate(const std::string& template_file, const std::string& model_dir,
                    const std::string& case_file, const std::string& now_text) {
  absl::StatusOr<std::string> text = moed::util::ReadFile(case_file);
  if (!text.ok()) {
    std::cerr << "moectl chat-template: " << text.status().message() << "\n";
    return 2;
  }
  nlohmann::ordered_json test_case = nlohmann::ordered_json::parse(*text, nullptr, false);
  if (test_case.is_discarded() || !test_case.is_object()) {
    std::cerr << "moectl chat-template: " << case_file << ": not a JSON object\n";
    return 2;
  }
  absl::StatusOr<std::tm> now = moed::model::ParseTemplateClock(now_text);
  if (!now.ok()) {
    std::cerr << "moectl chat-template: --now: " << now.status().message() << "\n";
    return 2;
  }
  std::optional<moed::model::ChatTemplate> chat_template;
  if (!template_file.empty()) {
    absl::StatusOr<std::optional<moed::model::ChatTemplate>> loaded =
        moed::model::ChatTemplate::LoadForModel("", template_file);
    if (!loaded.ok()) {
      std::cerr << loaded.status().message() << "\n";
      return 1;
    }
    chat_template = *std::move(loaded);
    chat_template->set_special_tokens(std::nullopt, std::nullopt);
  } else {
    absl::StatusOr<std::optional<moed::model::ChatTemplate>> loaded =
        moed::model::ChatTemplate::LoadForModel(model_dir, "");
    if (!loaded.ok()) {
      std::cerr << loaded.status().message() << "\n";
      return 1;
    }
    if (!loaded->has_value()) {
      std::cerr << "moectl chat-template: " << model_dir << " has no chat template\n";
      return 1;
    }
    chat_template = *std::move(loaded);
  }
  // The case's tokens replace the model's; a null one is not passed at all.
  std::optional<std::string> bos = chat_template->bos_token(), eos = chat_template->eos_token();
  for (auto [key, token] : {std::pair{"bos_token", &bos}, std::pair{"eos_token", &eos}}) {
    auto it = test_case.find(key);
    if (it == test_case.end()) continue;
    if (it->is_string()) {
      *token = it->get<std::string>();
    } else if (it->is_null()) {
      *token = std::nullopt;
    }
  }
  chat_template->set_special_tokens(bos, eos);
  moed::model::ChatTemplateInput input;
  input.messages = test_case.value("messages", nlohmann::ordered_json::array());
  input.tools = test_case.value("tools", nlohmann::ordered_json());
  input.add_generation_prompt = test_case.value("add_generation_prompt", false);
  input.kwargs = test_case.value("template_kwargs", nlohmann::ordered_json::object());
  absl::StatusOr<std::string> rendered = chat_template->Render(input, *now);
  if (!rendered.ok()) {
    std::cerr << rendered.status().message() << "\n";
    return 1;
  }
  std::cout << *rendered << std::flush;
  return 0;
}

int main(int argc, char** argv) try {
  GlobalOptions options;
  if (const char* env = std::getenv("MOED_SERVER"); env != nullptr) options.server = env;
  if (const char* env = std::getenv("MOED_API_KEY"); env != nullptr) options.api_key = env;
  CLI::App app{"moectl: command-line client for the moed daemon"};
  app.require_subcommand(1);
  app.add_option("--server", options.server, "daemon address HOST:PORT (env MOED_SERVER)")
      ->capture_default_str();
  app.add_flag("--json", options.json, "print one JSON object per line");
  app.add_option("--api-key", options.api_key,
                 "the daemon's --api-key, sent as 'authorization: Bearer KEY' (env MOED_API_KEY)");
  app.add_option("--timeout", options.timeout_seconds,
                 "seconds to wait for the daemon: each unary call, and reaching it before a stream")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--stream-timeout", options.stream_timeout_seconds,
                 "seconds a generate stream may run (0: until it ends)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);

  std::string service;
  CLI::App* health =
      app.add_subcommand("health", "ask the daemon whether it is serving (exit 0 if so)");
  health->add_option("--service", service, "service name; empty for the daemon as a whole");
  CLI::App* info = app.add_subcommand("info", "describe the served model and the compute backend");

  LogitsOptions logits_options;
  // The engine's options, shared by the local subcommands (the daemon's names).
  auto add_engine_options = [](CLI::App* cmd, LogitsOptions& o) {
    auto* model_option =
        cmd->add_option("--model", o.model_dir, "Hugging Face checkpoint directory");
    auto* store_option =
        cmd->add_option("--store", o.store_dir, "expert store directory (from moed-pack)");
    model_option->excludes(store_option);
    cmd->add_option("--threads", o.threads, "compute threads (0: every core)")
        ->capture_default_str();
    cmd->add_option("--backend", o.backend,
                    "what computes: cpu, cuda, or auto (a GPU when there is one)")
        ->capture_default_str()
        ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
    cmd->add_option("--cuda-device", o.cuda_device, "with --backend cuda: the GPU")
        ->capture_default_str();
    cmd->add_option("--expert-precision", o.precision, "with --store: source (exact), int8 or int4")
        ->capture_default_str()
        ->check(CLI::IsMember({"source", "int8", "int4"}));
    cmd->add_option("--device-cache-bytes", o.device_bytes,
                    "with --store: device tier budget (K/M/G suffixes; 0: every expert)")
        ->capture_default_str();
    cmd->add_option("--host-cache-bytes", o.host_bytes, "with --store: host tier budget (0: none)")
        ->capture_default_str();
    cmd->add_option("--eviction-policy", o.policy, "with --store: lru, lfu, scored or sweep")
        ->capture_default_str()
        ->check(CLI::IsMember({"lru", "lfu", "scored", "sweep"}));
    cmd->add_option("--eviction-scope", o.scope, "with --store: layer or global")
        ->capture_default_str()
        ->check(CLI::IsMember({"layer", "global"}));
    cmd->add_option("--prefetch", o.prefetch,
                    "with --store: off, gate, affinity, history or combined (exact results are "
                    "the same for every value)")
        ->capture_default_str()
        ->check(CLI::IsMember({"off", "gate", "affinity", "history", "combined"}));
    cmd->add_option("--prefetch-depth", o.prefetch_depth,
                    "with --store: layers ahead the prefetcher predicts")
        ->capture_default_str()
        ->check(CLI::Range(1, 8));
    cmd->add_option("--prefetch-calibration", o.prefetch_calibration,
                    "routing trace (.jsonl) to calibrate the affinity predictor on");
    cmd->add_option("--routing-trace", o.routing_trace,
                    "route as this recorded trace does (benchmarks; not the model's output)");

    cmd->add_option("--precision-policy", o.precision_policy,
                    "with --store: when a missing expert runs from its fallback copy: exact "
                    "(never), threshold or always")
        ->capture_default_str()
        ->check(CLI::IsMember({"exact", "threshold", "always"}));
    cmd->add_option("--fallback-precision", o.fallback_precision, "the fallback copy: int8 or int4")
        ->capture_default_str()
        ->check(CLI::IsMember({"int8", "int4"}));
    cmd->add_option("--fallback-threshold", o.fallback_threshold,
                    "threshold policy: a gate weight below this may fall back")
        ->capture_default_str()
        ->check(CLI::Range(0.0, 1.0));
    cmd->add_option("--fallback-min-rank", o.fallback_min_rank,
                    "threshold policy: a rank (0: first) of at least this may fall back")
        ->capture_default_str()
        ->check(CLI::Range(1, 64));
    cmd->add_option("--low-bit-floor", o.low_bit_floor,
                    "keep every expert's fallback copy resident as the budget allows")
        ->capture_default_str();
  };

  CLI::App* logits = app.add_subcommand(
      "logits",
      "run a checkpoint or store locally: logits of every prompt position and a greedy "
      "continuation, as one JSON object");
  add_engine_options(logits, logits_options);
  logits->add_option("--tokens", logits_options.tokens, "prompt token ids, comma-separated")
      ->required();
  logits->add_option("--greedy", logits_options.greedy, "greedy steps after the prompt")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  logits->add_option(
      "--record-routing", logits_options.record_routing,
      "append the routing of the run (every token, every layer) to this .jsonl trace");

  LogitsOptions eval_options;
  CLI::App* eval = app.add_subcommand(
      "eval",
      "run a checkpoint or store locally: what the precision policy costs against exact mode "
      "(KL, top-1 and greedy agreement), over a JSON Lines prompts file");
  add_engine_options(eval, eval_options);
  eval->add_option("--prompts", eval_options.prompts,
                   "JSON Lines: {\"prompt\": \"...\"} or {\"prompt_token_ids\": [...]} per line")
      ->required();
  eval->add_option("--max-tokens", eval_options.max_tokens,
                   "greedy tokens after each prompt, scored too")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  eval->add_flag("--json", eval_options.json, "one JSON object on the last line");

  GenerateOptions generate_options;
  CLI::App* generate = app.add_subcommand("generate", "stream a completion from the daemon");
  generate->add_option("--prompt", generate_options.prompt, "prompt text");
  generate->add_option("--ids", generate_options.ids,
                       "prompt as comma-separated token ids (instead of --prompt)");
  generate->add_option("--max-tokens", generate_options.max_tokens, "most tokens to generate")
      ->capture_default_str();
  generate->add_option("--temperature", generate_options.temperature, "0 is greedy; default 1");
  generate->add_option("--top-p", generate_options.top_p, "nucleus sampling threshold");
  generate->add_option("--seed", generate_options.seed, "sampling seed (same seed, same tokens)");
  generate->add_option("--stop", generate_options.stop, "stop string (repeatable)");
  generate->add_flag("--ignore-eos", generate_options.ignore_eos,
                     "keep generating past end-of-sequence tokens, to --max-tokens");
  generate->add_flag("--logprobs", generate_options.logprobs,
                     "return each token's log probability (with --json)");

  std::string tokenizer_path, text, ids_text;
  bool read_stdin = false, add_special = false, skip_special = false;
  CLI::App* tokenize =
      app.add_subcommand("tokenize", "text to token ids with a tokenizer.json (JSON array)");
  tokenize->add_option("--tokenizer", tokenizer_path,
                       "tokenizer.json (without it, the daemon at --server tokenizes)");
  auto* text_option = tokenize->add_option("--text", text, "the text");
  auto* stdin_option =
      tokenize->add_flag("--stdin", read_stdin, "read the text from standard input");
  text_option->excludes(stdin_option);
  tokenize->add_flag("--add-special-tokens", add_special, "apply the post-processor (BOS)");
  CLI::App* detokenize =
      app.add_subcommand("detokenize", "token ids to text with a tokenizer.json");
  detokenize->add_option("--tokenizer", tokenizer_path, "tokenizer.json")->required();
  detokenize->add_option("--ids", ids_text, "comma-separated token ids")->required();
  detokenize->add_flag("--skip-special-tokens", skip_special, "leave special tokens out");

  std::string template_file, template_model, case_file;
  std::string now_text = moed::model::kTemplateTestClock;
  CLI::App* chat_template = app.add_subcommand(
      "chat-template",
      "render one chat-template case (messages, tools, ...) exactly as Hugging Face does");
  auto* template_option =
      chat_template->add_option("--template", template_file, "a Jinja chat template file");
  auto* template_model_option = chat_template->add_option(
      "--model", template_model, "a model or store directory: its own template and special tokens");
  template_option->excludes(template_model_option);
  chat_template
      ->add_option("--case", case_file,
                   "a JSON object: messages, tools, add_generation_prompt, bos_token, eos_token, "
                   "template_kwargs")
      ->required();
  chat_template
      ->add_option("--now", now_text, "the clock strftime_now() reads, \"YYYY-MM-DD HH:MM:SS\"")
      ->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (health->parsed()) return RunHealth(options, service);
  if (info->parsed()) return RunInfo(options);
  if (logits->parsed()) {
    if (logits_options.model_dir.empty() == logits_options.store_dir.empty()) {
      std::cerr << "moectl logits: give exactly one of --model DIR and --store DIR\n";
      return 2;
    }
    return RunLogits(logits_options);
  }
  if (eval->parsed()) {
    if (eval_options.model_dir.empty() == eval_options.store_dir.empty()) {
      std::cerr << "moectl eval: give exactly one of --model DIR and --store DIR\n";
      return 2;
    }
    return RunEval(eval_options);
  }
  if (generate->parsed()) return RunGenerate(options, generate_options);
  if (tokenize->parsed()) {
    if (text_option->count() == 0 && !read_stdin) {
      std::cerr << "moectl tokenize: give --text T or --stdin\n";
      return 2;
    }
    if (tokenizer_path.empty()) {
      moed::v1::TokenizeRequest request;
      if (read_stdin) {
        std::stringstream in;
        in << std::cin.rdbuf();
        request.set_text(in.str());
      } else {
        request.set_text(text);
      }
      request.set_add_special_tokens(add_special);
      auto response = Connect(options)->Tokenize(request);
      if (!response.ok()) return Fail(response.status(), options);
      std::cout << nlohmann::json(std::vector<uint32_t>(response->token_ids().begin(),
                                                        response->token_ids().end()))
                       .dump()
                << "\n";
      return 0;
    }
    return RunTokenize(tokenizer_path, read_stdin ? std::nullopt : std::optional<std::string>(text),
                       add_special);
  }
  if (detokenize->parsed()) return RunDetokenize(tokenizer_path, ids_text, skip_special);
  if (chat_template->parsed()) {
    if (template_file.empty() == template_model.empty()) {
      std::cerr << "moectl chat-template: give exactly one of --template FILE and --model DIR\n";
      return 2;
    }
    return RunChatTemplate(template_file, template_model, case_file, now_text);
  }
  return 2;
} catch (const std::exception& e) {
  std::cerr << "moectl: " << e.what() << "\n";
  return 1;
}
