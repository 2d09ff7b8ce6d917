// The real moed and moectl binaries on loopback.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "client/client.h"
#include "nlohmann/json.hpp"
#include "tests/integration/daemon_process.h"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace moed::testing {
namespace {

namespace fs = std::filesystem;
using grpc::health::v1::HealthCheckResponse;

// One synthesized checkpoint shared by the tests of this binary.
const fs::path& TestModel() {
  static const ScratchDir scratch("moed_daemon_test");
  static const fs::path dir = [] {
    auto spec = tools::PresetSpec("tiny", model::Architecture::kQwen2Moe);
    REQUIRE(spec.ok());
    REQUIRE(tools::WriteCheckpoint(*spec, (scratch / "tiny-qwen2").string()).ok());
    return scratch / "tiny-qwen2";
  }();
  return dir;
}

struct RunningDaemon {
  explicit RunningDaemon(std::vector<std::string> extra_args = {}) {
    std::vector<std::string> argv = {MOED_BINARY,  "--model",     TestModel().string(),
                                     "--listen",   "127.0.0.1:0", "--http-listen",
                                     "127.0.0.1:0"};
    argv.insert(argv.end(), extra_args.begin(), extra_args.end());
    process = std::make_unique<ChildProcess>(argv);
    REQUIRE(process->started());
    std::optional<std::string> line = process->ReadStdoutLine(std::chrono::seconds(30));
    REQUIRE(line.has_value());
    REQUIRE(line->rfind("listening on 127.0.0.1:", 0) == 0);
    address = line->substr(std::string("listening on ").size());
    line = process->ReadStdoutLine(std::chrono::seconds(30));
    REQUIRE(line.has_value());
    REQUIRE(line->rfind("http listening on 127.0.0.1:", 0) == 0);
    http_address = line->substr(std::string("http listening on ").size());
  }
  std::unique_ptr<ChildProcess> process;
  std::string address;
  std::string http_address;
};

TEST_CASE("the daemon serves Health and ModelInfo for its model, then stops on SIGTERM") {
  RunningDaemon daemon;
  auto client = client::Client::Create(daemon.address, std::chrono::seconds(10));

  auto health = client->Health();
  REQUIRE(health.ok());
  CHECK(*health == HealthCheckResponse::SERVING);
  CHECK(*client->Health("moed.v1.Moed") == HealthCheckResponse::SERVING);
  CHECK(client->Health("no.such.Service").status().code() == absl::StatusCode::kNotFound);

  auto info = client->ModelInfo();
  REQUIRE(info.ok());
  auto config = nlohmann::json::parse(std::ifstream(TestModel() / "config.json"));
  CHECK(info->model_name() == "tiny-qwen2");
  CHECK(info->architecture() == "Qwen2MoeForCausalLM");
  CHECK(info->num_layers() == config["num_hidden_layers"]);
  CHECK(info->num_experts() == config["num_experts"]);
  CHECK(info->experts_per_token() == config["num_experts_per_tok"]);
  CHECK(info->expert_intermediate_size() == config["moe_intermediate_size"]);
  CHECK(info->shared_expert_intermediate_size() == config["shared_expert_intermediate_size"]);
  CHECK(info->vocab_size() == config["vocab_size"]);
  CHECK(info->has_tokenizer());
  CHECK((info->backend() == "cpu" || info->backend() == "cuda"));
  CHECK(info->device().total_memory_bytes() > 0);
  CHECK(info->server_version() == MOED_VERSION);
  if (info->cuda_devices_size() == 0) CHECK_FALSE(info->backend_note().empty());

  CHECK(daemon.process->Stop(SIGTERM) == 0);
  CHECK(daemon.process->stderr_text().find("received SIGTERM: draining") != std::string::npos);
}

TEST_CASE("SIGINT stops the daemon cleanly too") {
  RunningDaemon daemon;
  CHECK(daemon.process->Stop(SIGINT) == 0);
}

TEST_CASE("the daemon reads a JSON config file and writes JSON logs") {
  fs::path config = TestModel().parent_path() / "moed.json";
  std::ofstream(config) << R"({"served-model-name": "from-file", "log-format": "json"})";
  // A misspelt variable is logged as a warning; the daemon starts anyway.
  setenv("MOED_SERVED_MODEL", "typo", 1);
  RunningDaemon daemon({"--config", config.string()});
  unsetenv("MOED_SERVED_MODEL");
  auto info = client::Client::Create(daemon.address, std::chrono::seconds(10))->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->model_name() == "from-file");
  CHECK(daemon.process->Stop() == 0);
  std::string logs = daemon.process->stderr_text();
  size_t lines = 0;
  for (size_t start = 0, end; (end = logs.find('\n', start)) != std::string::npos;
       start = end + 1) {
    auto line = nlohmann::json::parse(logs.substr(start, end - start));
    CHECK(line.contains("ts"));
    CHECK(line.contains("msg"));
    ++lines;
  }
  CHECK(lines >= 3);
  CHECK(logs.find("environment variable MOED_SERVED_MODEL names no moed option") !=
        std::string::npos);
}

TEST_CASE("bad flags, config files and models exit non-zero with a one-line error") {
  struct Case {
    std::vector<std::string> args;
    int exit_code;
    std::string message;
  };
  fs::path bad_config = TestModel().parent_path() / "bad.json";
  std::ofstream(bad_config) << R"({"listen": 50051})";
  fs::path empty_dir = TestModel().parent_path() / "empty";
  fs::create_directories(empty_dir);
  fs::path bad_template = TestModel().parent_path() / "bad.jinja";
  std::ofstream(bad_template) << "{% for m in messages %}\n{{ m.content }}";
  const std::vector<Case> cases = {
      {{"--bogus"}, 2, "moed: error: unknown flag --bogus (see --help)"},
      {{"--model"}, 2, "moed: error: --model needs a value (DIR)"},
      {{},
       2,
       "moed: error: no model to serve: pass --model DIR or --store DIR (or set MOED_MODEL)"},
      {{"--model", TestModel().string(), "--backend", "fpga"},
       2,
       "moed: error: --backend: 'fpga' is not one of auto, cpu, cuda"},
      {{"--config", bad_config.string()},
       2,
       "moed: error: config file " + bad_config.string() + ": \"listen\": must be a string"},
      {{"--model", empty_dir.string()},
       1,
       "moed: error: " + empty_dir.string() + "/config.json: cannot open"},
      {{"--model", TestModel().string(), "--chat-template", bad_template.string()},
       1,
       "moed: error: " + bad_template.string() +
           ": chat template: template line 2: unexpected end of template, expected 'else' or "
           "'endfor'"},
      {{"--model", TestModel().string(), "--tool-call-parser", "xml"},
       2,
       "moed: error: --tool-call-parser: 'xml' is not one of auto, none, hermes, mistral"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> argv = {MOED_BINARY};
    argv.insert(argv.end(), c.args.begin(), c.args.end());
    INFO(c.message);
    CommandResult result = RunCommand(argv);
    CHECK(result.exit_code == c.exit_code);
    // The last line of stderr is the error, alone on its line.
    std::string err = result.err;
    while (!err.empty() && err.back() == '\n') err.pop_back();
    CHECK(err.substr(err.rfind('\n') == std::string::npos ? 0 : err.rfind('\n') + 1) == c.message);
    CHECK(result.out.empty());
  }
}

TEST_CASE("ModelInfo names the chat template and how output is parsed") {
  {
    RunningDaemon daemon;
    auto info = client::Client::Create(daemon.address, std::chrono::seconds(10))->ModelInfo();
    REQUIRE(info.ok());
    CHECK(info->chat_template() == (TestModel() / "tokenizer_config.json").string());
    CHECK(info->tool_call_parser() == "hermes");  // the synthesized template uses <tool_call>
    CHECK(info->reasoning_parser() == "none");
  }
  fs::path own = TestModel().parent_path() / "own.jinja";
  std::ofstream(own) << "[INST] {{ messages[-1].content }} [/INST]";
  RunningDaemon daemon({"--chat-template", own.string(), "--reasoning-parser", "think"});
  auto info = client::Client::Create(daemon.address, std::chrono::seconds(10))->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->chat_template() == own.string());
  CHECK(info->tool_call_parser() == "none");
  CHECK(info->reasoning_parser() == "think");
}

TEST_CASE("moectl chat-template renders a model's own template with its special tokens") {
  fs::path case_file = TestModel().parent_path() / "case.json";
  std::ofstream(case_file)
      << R"({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": true})";
  CommandResult result = RunCommand({MOECTL_BINARY, "chat-template", "--model",
                                     TestModel().string(), "--case", case_file.string()});
  CHECK(result.exit_code == 0);
  CHECK(result.out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  std::ofstream(case_file) << R"({"messages": [{"role": "robot", "content": "hi"}]})";
  result = RunCommand({MOECTL_BINARY, "chat-template", "--model", TestModel().string(), "--case",
                       case_file.string()});
  CHECK(result.exit_code == 1);
  CHECK(result.out.empty());
  CHECK(result.err == "Unexpected message role: robot\n");
}

TEST_CASE("with --api-key, gRPC calls need the key, health stays open") {
  RunningDaemon daemon({"--api-key", "sesame"});
  auto anonymous = client::Client::Create(daemon.address, std::chrono::seconds(10));
  CHECK(*anonymous->Health() == HealthCheckResponse::SERVING);
  CHECK(anonymous->ModelInfo().status().code() == absl::StatusCode::kUnauthenticated);
  auto wrong = client::Client::Create(daemon.address, std::chrono::seconds(10), "sesam");
  CHECK(wrong->ModelInfo().status().code() == absl::StatusCode::kUnauthenticated);
  auto keyed = client::Client::Create(daemon.address, std::chrono::seconds(10), "sesame");
  CHECK(keyed->ModelInfo().ok());
  CommandResult refused = RunCommand({MOECTL_BINARY, "--server", daemon.address, "info"});
  CHECK(refused.exit_code == 1);
  CHECK(refused.err.find("UNAUTHENTICATED") != std::string::npos);
  CommandResult allowed =
      RunCommand({MOECTL_BINARY, "--server", daemon.address, "--api-key", "sesame", "info"});
  CHECK(allowed.exit_code == 0);
}

TEST_CASE("a taken port is reported and the daemon exits 1") {
  RunningDaemon first;
  CommandResult second = RunCommand({MOED_BINARY, "--model", TestModel().string(), "--listen",
                                     first.address, "--http-listen", ""});
  CHECK(second.exit_code == 1);
  CHECK(second.err.find("cannot listen on " + first.address) != std::string::npos);
  // In JSON mode every line but the final one-line error is a JSON log line, the gRPC
  // library's own report included: no raw library output.
  CommandResult json = RunCommand({MOED_BINARY, "--model", TestModel().string(), "--listen",
                                   first.address, "--http-listen", "", "--log-format", "json"});
  CHECK(json.exit_code == 1);
  bool grpc_line = false;
  size_t start = 0;
  for (size_t end; (end = json.err.find('\n', start)) != std::string::npos; start = end + 1) {
    std::string line = json.err.substr(start, end - start);
    if (line.rfind("moed: error: ", 0) == 0) continue;
    auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    INFO(line);
    REQUIRE(!parsed.is_discarded());
    grpc_line |= parsed["logger"] == "grpc";
  }
  CHECK(grpc_line);
}

TEST_CASE("moectl health and info talk to the daemon") {
  RunningDaemon daemon;
  CommandResult health = RunCommand({MOECTL_BINARY, "--server", daemon.address, "health"});
  CHECK(health.exit_code == 0);
  CHECK(health.out == "moed: SERVING\n");

  CommandResult info = RunCommand({MOECTL_BINARY, "--server", daemon.address, "--json", "info"});
  REQUIRE(info.exit_code == 0);
  auto json = nlohmann::json::parse(info.out);
  CHECK(json["model_name"] == "tiny-qwen2");
  CHECK(json["num_experts"] == 8);

  CommandResult human = RunCommand({MOECTL_BINARY, "--server", daemon.address, "info"});
  CHECK(human.exit_code == 0);
  CHECK(human.out.find("Qwen2MoeForCausalLM") != std::string::npos);
  // An idle daemon: nothing running or waiting, no KV cache held, the KV budget's default.
  CHECK(human.out.find("requests:     0 running, 0 waiting, KV cache 0.00 MiB held of ") !=
        std::string::npos);
  CHECK(human.out.find(", 0 preemptions\n") != std::string::npos);
  CHECK(json["kv_cache_budget_bytes"].get<std::string>() != "0");

  CHECK(daemon.process->Stop() == 0);
  CommandResult gone =
      RunCommand({MOECTL_BINARY, "--server", daemon.address, "--timeout", "1", "health"});
  CHECK(gone.exit_code == 1);
  CHECK(gone.err.find("UNAVAILABLE") != std::string::npos);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("moectl logits, tokenize and detokenize run locally") {
  CommandResult logits = RunCommand({MOECTL_BINARY, "logits", "--model", TestModel().string(),
                                     "--tokens", "5,300,17", "--greedy", "3"});
  REQUIRE(logits.exit_code == 0);
  auto json = nlohmann::json::parse(logits.out);
  REQUIRE(json["prompt_logits"].size() == 3);
  CHECK(json["prompt_logits"][0].size() == 512);
  REQUIRE(json["greedy"].size() == 3);
  REQUIRE(json["greedy_logits"].size() == 3);
  // Each greedy token is the argmax of the logits before it.
  auto argmax = [](const nlohmann::json& row) {
    auto values = row.get<std::vector<float>>();
    return static_cast<int>(std::max_element(values.begin(), values.end()) - values.begin());
  };
  CHECK(json["greedy"][0] == argmax(json["prompt_logits"][2]));
  CHECK(json["greedy"][1] == argmax(json["greedy_logits"][0]));

  CommandResult bad =
      RunCommand({MOECTL_BINARY, "logits", "--model", TestModel().string(), "--tokens", "5,9999"});
  CHECK(bad.exit_code == 1);
  CHECK(bad.err.find("token id 9999 is outside the vocabulary of 512") != std::string::npos);

  std::string tokenizer = (TestModel() / "tokenizer.json").string();
  CommandResult ids =
      RunCommand({MOECTL_BINARY, "tokenize", "--tokenizer", tokenizer, "--text", "héllo, 世界"});
  REQUIRE(ids.exit_code == 0);
  auto id_list = nlohmann::json::parse(ids.out).get<std::vector<int>>();
  REQUIRE_FALSE(id_list.empty());
  std::string joined;
  for (size_t i = 0; i < id_list.size(); ++i) joined += (i ? "," : "") + std::to_string(id_list[i]);
  CommandResult text =
      RunCommand({MOECTL_BINARY, "detokenize", "--tokenizer", tokenizer, "--ids", joined});
  CHECK(text.exit_code == 0);
  CHECK(text.out == "héllo, 世界");
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("the daemon serves an expert store and refuses a budget below the minimum") {
  fs::path store = TestModel().parent_path() / "store";
  if (!fs::exists(store))
    REQUIRE(tools::Pack(TestModel().string(), store.string(), tools::PackOptions{}).ok());
  // Two slots of the tiny qwen2 source blobs are the minimum.
  CommandResult too_small =
      RunCommand({MOED_BINARY, "--store", store.string(), "--device-cache-bytes", "4K", "--listen",
                  "127.0.0.1:0", "--http-listen", ""});
  CHECK(too_small.exit_code == 1);
  CHECK(too_small.err.find("device cache budget of 4096 bytes is below the minimum of") !=
        std::string::npos);

  std::vector<std::string> argv = {
      MOED_BINARY, "--store",  store.string(), "--device-cache-bytes", "1M", "--host-cache-bytes",
      "512K",      "--listen", "127.0.0.1:0",  "--http-listen",        ""};
  ChildProcess daemon(argv);
  auto line = daemon.ReadStdoutLine(std::chrono::seconds(30));
  REQUIRE(line.has_value());
  std::string address = line->substr(std::string("listening on ").size());
  auto info = client::Client::Create(address, std::chrono::seconds(10))->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->model_name() == "store");
  CHECK(info->architecture() == "Qwen2MoeForCausalLM");
  REQUIRE(info->has_expert_cache());
  CHECK(info->expert_cache().precision() == "source");
  CHECK(info->expert_cache().device_slots() * info->expert_cache().slot_bytes() <= (1u << 20));
  CHECK(info->expert_cache().host_slots() > 0);
  CHECK((info->expert_cache().reader() == "io_uring" || info->expert_cache().reader() == "pread"));
  CHECK(daemon.Stop() == 0);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("moectl tokenize asks the daemon with --server and generate streams text") {
  RunningDaemon daemon;
  std::string tokenizer = (TestModel() / "tokenizer.json").string();
  CommandResult local =
      RunCommand({MOECTL_BINARY, "tokenize", "--tokenizer", tokenizer, "--text", "the river"});
  CommandResult remote =
      RunCommand({MOECTL_BINARY, "--server", daemon.address, "tokenize", "--text", "the river"});
  REQUIRE(local.exit_code == 0);
  CHECK(remote.exit_code == 0);
  CHECK(remote.out == local.out);

  CommandResult json = RunCommand({MOECTL_BINARY, "--server", daemon.address, "--json", "generate",
                                   "--ids", "5,6", "--max-tokens", "3", "--temperature", "0"});
  REQUIRE(json.exit_code == 0);
  std::vector<nlohmann::json> lines;
  size_t start = 0;
  for (size_t end; (end = json.out.find('\n', start)) != std::string::npos; start = end + 1) {
    lines.push_back(nlohmann::json::parse(json.out.substr(start, end - start)));
  }
  REQUIRE(lines.size() == 4);  // three tokens, then the closing message
  CHECK(lines.back()["finish_reason"] == "FINISH_REASON_LENGTH");
  CHECK(lines.back()["usage"]["completion_tokens"] == 3);
  CHECK(daemon.process->Stop() == 0);
}

TEST_CASE("moectl generate prints token ids for a model without a tokenizer") {
  fs::path bare = TestModel().parent_path() / "bare";
  if (!fs::exists(bare)) {
    fs::copy(TestModel(), bare);
    fs::remove(bare / "tokenizer.json");
  }
  RunningDaemon daemon({"--model", bare.string()});
  std::vector<std::string> generate = {"generate", "--ids",         "5,6", "--max-tokens",
                                       "4",        "--temperature", "0"};
  std::vector<std::string> text_args = {MOECTL_BINARY, "--server", daemon.address};
  text_args.insert(text_args.end(), generate.begin(), generate.end());
  std::vector<std::string> json_args = {MOECTL_BINARY, "--server", daemon.address, "--json"};
  json_args.insert(json_args.end(), generate.begin(), generate.end());
  CommandResult text = RunCommand(text_args);
  CommandResult json = RunCommand(json_args);
  REQUIRE(text.exit_code == 0);
  REQUIRE(json.exit_code == 0);
  // The same greedy ids as the JSON messages carry, space-separated.
  std::string expected;
  size_t start = 0;
  for (size_t end; (end = json.out.find('\n', start)) != std::string::npos; start = end + 1) {
    auto line = nlohmann::json::parse(json.out.substr(start, end - start));
    if (!line.contains("token_ids")) continue;
    for (const auto& id : line["token_ids"]) expected += std::to_string(id.get<uint32_t>()) + " ";
  }
  CHECK(std::count(expected.begin(), expected.end(), ' ') == 4);
  CHECK(text.out == expected);
  CHECK(daemon.process->Stop() == 0);
}

}  // namespace
}  // namespace moed::testing
