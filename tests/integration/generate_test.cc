// Generate against the real daemon on loopback: streaming, finish reasons, every status code,
// cancellation releasing resources, batch-invariant outputs and graceful drain.
#include "model/generate.h"

#include <atomic>
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <thread>

#include "cache/expert_cache.h"
#include "cache/routing_trace.h"
#include "cache/store_reader.h"
#include "client/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/create_channel.h"
#include "kernels/test_backend.h"
#include "tests/integration/daemon_process.h"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace moed::testing {
namespace {

namespace fs = std::filesystem;

const fs::path& Model() {
  static const ScratchDir scratch("moed_generate_test");
  static const fs::path dir = [] {
    REQUIRE(tools::WriteCheckpoint(*tools::PresetSpec("tiny", model::Architecture::kMixtral),
                                   (scratch / "tiny").string())
                .ok());
    return scratch / "tiny";
  }();
  return dir;
}

// The tiny model packed as an expert store (every precision).
const fs::path& Store() {
  static const fs::path dir = [] {
    fs::path path = Model().parent_path() / "store";
    REQUIRE(tools::Pack(Model().string(), path.string(), tools::PackOptions{}).ok());
    return path;
  }();
  return dir;
}

struct Daemon {
  // Serves Model(), unless `extra` names a --store or a --model.
  // No HTTP API unless `extra` names --http-listen (then `http_address` is where it listens).
  explicit Daemon(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {MOED_BINARY, "--listen", "127.0.0.1:0"};
    auto names = [&](const char* flag) {
      return std::find(extra.begin(), extra.end(), flag) != extra.end();
    };
    const bool http = names("--http-listen");
    if (!http) {
      argv.push_back("--http-listen");
      argv.push_back("");
    }
    if (!names("--store") && !names("--model")) {
      argv.push_back("--model");
      argv.push_back(Model().string());
    }
    argv.insert(argv.end(), extra.begin(), extra.end());
    process = std::make_unique<ChildProcess>(argv);
    auto line = process->ReadStdoutLine(std::chrono::seconds(30));
    REQUIRE(line.has_value());
    address = line->substr(std::string("listening on ").size());
    if (http) {
      line = process->ReadStdoutLine(std::chrono::seconds(30));
      REQUIRE(line.has_value());
      http_address = line->substr(std::string("http listening on ").size());
    }
  }
  std::unique_ptr<client::Client> Connect(
      std::chrono::milliseconds timeout = std::chrono::seconds(30)) const {
    return client::Client::Create(address, timeout);
  }
  std::unique_ptr<ChildProcess> process;
  std::string address;
  std::string http_address;
};

v1::GenerateRequest Greedy(const std::vector<uint32_t>& prompt, uint32_t max_tokens) {
  v1::GenerateRequest request;
  for (uint32_t id : prompt) request.add_prompt_token_ids(id);
  request.mutable_sampling()->set_max_tokens(max_tokens);
  request.mutable_sampling()->set_temperature(0);
  request.mutable_sampling()->set_ignore_eos(true);
  return request;
}

struct Collected {
  absl::Status status;
  std::vector<uint32_t> ids;
  std::string text;
  v1::GenerateResponse last;
  int messages = 0;
};

Collected Run(client::Client& c, const v1::GenerateRequest& request) {
  Collected out;
  out.status = c.Generate(request, [&](const v1::GenerateResponse& m) {
    out.ids.insert(out.ids.end(), m.token_ids().begin(), m.token_ids().end());
    out.text += m.text();
    out.last = m;
    ++out.messages;
    return true;
  });
  return out;
}

TEST_CASE("greedy generation streams the engine's own greedy tokens and ends with usage") {
  Daemon daemon;
  auto c = daemon.Connect();
  Collected got = Run(*c, Greedy({5, 300, 17}, 12));
  REQUIRE(got.status.ok());
  auto local = model::Model::Load(Model().string(), kernels::TestCpuBackend(1));
  REQUIRE(local.ok());
  auto expected = model::ScoreAndGreedy(**local, {5, 300, 17}, 12);
  REQUIRE(expected.ok());
  CHECK(got.ids == std::vector<uint32_t>(expected->greedy.begin(), expected->greedy.end()));
  CHECK(got.last.finish_reason() == v1::FINISH_REASON_LENGTH);
  CHECK(got.last.usage().prompt_tokens() == 3);
  CHECK(got.last.usage().completion_tokens() == 12);
  CHECK(got.last.usage().total_tokens() == 15);
  CHECK(got.messages == 13);  // one per token, then the closing message

  // A stop token id ends generation with STOP and names it.
  v1::GenerateRequest stop = Greedy({5, 300, 17}, 12);
  stop.mutable_sampling()->add_stop_token_ids(static_cast<uint32_t>(expected->greedy[2]));
  Collected stopped = Run(*c, stop);
  REQUIRE(stopped.status.ok());
  CHECK(stopped.ids.size() == 3);
  CHECK(stopped.last.finish_reason() == v1::FINISH_REASON_STOP);
  CHECK(stopped.last.matched_stop() == std::to_string(expected->greedy[2]));
  CHECK(daemon.process->Stop() == 0);
}

TEST_CASE("text prompts are tokenized, Tokenize agrees with the prompt's usage") {
  Daemon daemon;
  auto c = daemon.Connect();
  v1::GenerateRequest request;
  request.set_prompt("the clockmaker and the river");
  request.mutable_sampling()->set_max_tokens(5);
  request.mutable_sampling()->set_seed(3);
  Collected got = Run(*c, request);
  REQUIRE(got.status.ok());
  v1::TokenizeRequest tokenize;
  tokenize.set_text("the clockmaker and the river");
  auto ids = c->Tokenize(tokenize);
  REQUIRE(ids.ok());
  CHECK(got.last.usage().prompt_tokens() == static_cast<uint32_t>(ids->token_ids_size()));
  CHECK(ids->tokens_size() == ids->token_ids_size());
  CHECK(got.ids.size() == 5);
}

TEST_CASE("bad requests get INVALID_ARGUMENT naming the problem") {
  Daemon daemon;
  auto c = daemon.Connect();
  auto status_of = [&](const v1::GenerateRequest& r) { return Run(*c, r).status; };
  v1::GenerateRequest both = Greedy({1}, 4);
  both.set_prompt("x");
  CHECK(status_of(both).message() == "give exactly one of prompt and prompt_token_ids");
  CHECK(status_of(v1::GenerateRequest()).code() == absl::StatusCode::kInvalidArgument);
  absl::Status out_of_range = status_of(Greedy({1, 512}, 4));
  CHECK(out_of_range.code() == absl::StatusCode::kInvalidArgument);
  CHECK(out_of_range.message() == "prompt token id 512 is outside the vocabulary of 512");
  // A 1 MiB request id would be echoed in every message: refused, naming the limit.
  v1::GenerateRequest long_id = Greedy({1}, 4);
  long_id.set_request_id(std::string(1 << 20, 'i'));
  absl::Status id_refused = status_of(long_id);
  CHECK(id_refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(id_refused.message() == "request_id is 1048576 bytes, more than the limit of 256");
  // A prompt far beyond the context is refused before it is tokenized, naming the context.
  v1::GenerateRequest huge;
  huge.set_prompt(std::string(4 << 20, 'a'));
  huge.mutable_sampling()->set_max_tokens(1);
  absl::Status huge_refused = status_of(huge);
  CHECK(huge_refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(huge_refused.message().find("bytes are more tokens than the context of 256") !=
        std::string::npos);
  absl::Status too_long = status_of(Greedy({1, 2, 3}, 254));
  CHECK(too_long.code() == absl::StatusCode::kInvalidArgument);
  CHECK(too_long.message().find("exceeds the context of 256 tokens") != std::string::npos);
  v1::GenerateRequest hot = Greedy({1}, 4);
  hot.mutable_sampling()->set_temperature(-1);
  CHECK(status_of(hot).message().rfind("sampling.temperature", 0) == 0);
  v1::GenerateRequest top_p = Greedy({1}, 4);
  top_p.mutable_sampling()->set_top_p(1.5f);
  CHECK(status_of(top_p).code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("a full queue answers RESOURCE_EXHAUSTED, a passed deadline DEADLINE_EXCEEDED") {
  Daemon daemon({"--max-batch", "1", "--max-queue", "0"});
  auto c = daemon.Connect();
  // Occupy the only batch slot with a long generation.
  std::promise<void> first_token;
  auto busy = std::async(std::launch::async, [&] {
    bool signalled = false;
    return c->Generate(Greedy({1, 2}, 250), [&](const v1::GenerateResponse&) {
      if (!signalled) first_token.set_value();
      signalled = true;
      return true;
    });
  });
  first_token.get_future().wait();
  auto second = daemon.Connect();
  absl::Status refused = Run(*second, Greedy({3}, 4)).status;
  CHECK(refused.code() == absl::StatusCode::kResourceExhausted);
  CHECK(refused.message().find("queue is full") != std::string::npos);
  CHECK(busy.get().ok());

  auto hurried = client::Client::Create(daemon.address, std::chrono::seconds(30), "",
                                        std::chrono::milliseconds(2));
  absl::Status late = Run(*hurried, Greedy({1, 2}, 250)).status;
  CHECK(late.code() == absl::StatusCode::kDeadlineExceeded);
}

TEST_CASE("a client that goes away is cancelled and its resources return") {
  Daemon daemon({"--max-batch", "4"});
  auto c = daemon.Connect();
  int seen = 0;
  absl::Status status =
      c->Generate(Greedy({1, 2}, 250), [&](const v1::GenerateResponse&) { return ++seen < 3; });
  CHECK(status.code() == absl::StatusCode::kCancelled);
  // Within a few steps the scheduler has dropped the sequence and its KV cache.
  bool released = false;
  for (int i = 0; i < 200 && !released; ++i) {
    auto info = c->ModelInfo();
    REQUIRE(info.ok());
    released = info->requests_running() == 0 && info->requests_waiting() == 0 &&
               info->kv_cache_bytes() == 0;
    if (!released) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  CHECK(released);
}

const fs::path& LongModel();

TEST_CASE("the same seed gives the same tokens alone and beside 15 other requests") {
  Daemon daemon({"--model", LongModel().string(), "--max-batch", "16"});
  auto c = daemon.Connect();
  v1::GenerateRequest sampled;
  for (uint32_t id : {9, 8, 7}) sampled.add_prompt_token_ids(id);
  sampled.mutable_sampling()->set_max_tokens(20);
  sampled.mutable_sampling()->set_seed(1234);
  sampled.mutable_sampling()->set_temperature(0.8f);
  sampled.mutable_sampling()->set_ignore_eos(true);
  Collected alone = Run(*c, sampled);
  REQUIRE(alone.status.ok());
  // 15 streams far longer than it, all running before the sampled one starts and still
  // running when it ends (they stop only when told, after it), so that every one of its steps
  // is a batch of 16 (a step decodes one token of each).
  constexpr size_t kCrowdTokens = 20000;
  std::atomic<bool> stop{false};
  std::vector<std::future<size_t>> crowd;
  crowd.reserve(15);
  for (int i = 0; i < 15; ++i) {
    crowd.push_back(std::async(std::launch::async, [&, i] {
      auto other = daemon.Connect();
      size_t tokens = 0;
      (void)other->Generate(Greedy({static_cast<uint32_t>(10 + i), 4}, kCrowdTokens),
                            [&](const v1::GenerateResponse& m) {
                              tokens += static_cast<size_t>(m.token_ids_size());
                              return !stop.load();
                            });
      return tokens;
    }));
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (c->ModelInfo()->requests_running() != 15) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  Collected together = Run(*c, sampled);
  stop = true;
  for (auto& f : crowd) CHECK(f.get() < kCrowdTokens);  // still running when it ended
  REQUIRE(together.status.ok());
  CHECK(together.ids == alone.ids);
}

// Peak and current resident memory of a process, from /proc (kB lines of its status).
uint64_t ProcStatusBytes(pid_t pid, const std::string& key) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stoull(line.substr(key.size() + 1)) * 1024;
  }
  return 0;
}

// A small model whose KV cache is large for its size (16 KiB a token, 2 MiB a context), so
// that 64 contexts outweigh everything else the daemon holds, with few tokens to generate.
const fs::path& KvHeavyModel() {
  static const fs::path dir = [] {
    fs::path path = Model().parent_path() / "kv-heavy";
    tools::SynthSpec spec = *tools::PresetSpec("tiny", model::Architecture::kMixtral);
    spec.hidden_size = 256;
    spec.num_layers = 2;
    spec.num_attention_heads = 4;
    spec.num_key_value_heads = 4;
    spec.head_dim = 256;
    spec.max_position_embeddings = 128;
    REQUIRE(tools::WriteCheckpoint(spec, path.string()).ok());
    return path;
  }();
  return dir;
}

TEST_CASE(
    "64 requests to the end of the context under a KV budget of three all complete, "
    "memory stays within the budget, preemptions are counted") {
  const model::ModelConfig config = *model::LoadModelConfig(KvHeavyModel().string());
  const uint64_t full_context = model::KvCache::BytesFor(config, config.max_position_embeddings);
  const uint64_t budget = 3 * full_context;
  Daemon daemon({"--max-batch", "16", "--max-running", "64", "--kv-cache-bytes",
                 std::to_string(budget), "--model", KvHeavyModel().string()});
  auto c = daemon.Connect();
  auto info = c->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->kv_cache_budget_bytes() == budget);
  const uint64_t rss_before = ProcStatusBytes(daemon.process->pid(), "VmRSS");
  // What the daemon says its sequences hold, sampled while they run.
  std::atomic<bool> running{true};
  std::atomic<uint64_t> most_held{0};
  std::thread sampler([&] {
    auto watcher = daemon.Connect();
    while (running) {
      if (auto now = watcher->ModelInfo(); now.ok()) {
        most_held = std::max<uint64_t>(most_held, now->kv_cache_bytes());
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  });
  std::vector<std::future<Collected>> streams;
  for (int i = 0; i < 64; ++i) {
    streams.push_back(std::async(std::launch::async, [&, i] {
      auto own = daemon.Connect(std::chrono::minutes(10));
      v1::GenerateRequest request;  // max_tokens unset: to the end of the context
      request.add_prompt_token_ids(static_cast<uint32_t>(3 + i));
      request.add_prompt_token_ids(9);
      request.mutable_sampling()->set_ignore_eos(true);
      request.mutable_sampling()->set_seed(static_cast<uint64_t>(i));
      return Run(*own, request);
    }));
  }
  for (auto& stream : streams) {
    Collected got = stream.get();
    INFO(got.status.message());
    CHECK(got.status.ok());
    CHECK(got.last.finish_reason() == v1::FINISH_REASON_LENGTH);
    CHECK(got.ids.size() == static_cast<size_t>(config.max_position_embeddings - 2));
  }
  running = false;
  sampler.join();
  info = c->ModelInfo();
  if (!info.ok()) {  // the daemon is gone: say why
    daemon.process->WaitOrKill(std::chrono::seconds(5));
    INFO(daemon.process->stderr_text());
    REQUIRE(info.ok());
  }
  CHECK(info->preemptions() > 0);
  CHECK(info->kv_cache_bytes() == 0);
  CHECK(most_held > 0);
  CHECK(most_held <= budget);
  // Without the budget the 64 sequences would hold 64 full contexts at the end. The daemon's
  // peak stays within what it held idle, the budget, and a stated 64 MiB for the 64 streams'
  // buffers and threads and the step's activations.
  const uint64_t peak = ProcStatusBytes(daemon.process->pid(), "VmHWM");
  INFO("idle " << rss_before << ", peak " << peak << ", budget " << budget << ", 64 contexts "
               << 64 * full_context << ", most held " << most_held);
  CHECK(budget + (64ull << 20) < 64 * full_context);  // the bound excludes the unbudgeted case
#ifndef MOED_SANITIZED
  CHECK(peak <= rss_before + budget + (64ull << 20));
#endif
  const int exit_code = daemon.process->Stop();
  INFO(daemon.process->stderr_text());
  CHECK(exit_code == 0);
}

// The demo-sized model with a 64K context: a generation to the end of it runs for many seconds,
// so that a drain or a signal always finds it running.
const fs::path& LongModel() {
  static const fs::path dir = [] {
    fs::path path = Model().parent_path() / "long";
    tools::SynthSpec spec = *tools::PresetSpec("demo", model::Architecture::kMixtral);
    spec.max_position_embeddings = 65536;
    REQUIRE(tools::WriteCheckpoint(spec, path.string()).ok());
    return path;
  }();
  return dir;
}

// A stream to the end of LongModel()'s context, started once its first message arrived.
struct LongStream {
  explicit LongStream(client::Client& c) {
    std::promise<void> first;
    auto first_arrived = first.get_future();
    result = std::async(std::launch::async, [&c, first = std::move(first)]() mutable {
      bool told = false;
      Collected out;
      out.status = c.Generate(Greedy({1, 2}, 65000), [&](const v1::GenerateResponse& m) {
        if (!told) first.set_value();
        told = true;
        out.ids.insert(out.ids.end(), m.token_ids().begin(), m.token_ids().end());
        out.last = m;
        ++out.messages;
        return true;
      });
      if (!told) first.set_value();
      return out;
    });
    first_arrived.wait();
  }
  std::future<Collected> result;
};

std::unique_ptr<ChildProcess> StartLong(const std::vector<std::string>& extra,
                                        std::string* address) {
  std::vector<std::string> argv = {
      MOED_BINARY, "--model", LongModel().string(), "--listen", "127.0.0.1:0", "--http-listen", ""};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto process = std::make_unique<ChildProcess>(argv);
  auto line = process->ReadStdoutLine(std::chrono::seconds(60));
  REQUIRE(line.has_value());
  *address = line->substr(std::string("listening on ").size());
  return process;
}

grpc::health::v1::HealthCheckResponse::ServingStatus HealthOf(client::Client& c) {
  auto status = c.Health("");
  return status.ok() ? *status : grpc::health::v1::HealthCheckResponse::UNKNOWN;
}

// A stream the drain cut short: cancelled, with the usage of what it generated.
void CheckCancelledWithUsage(const Collected& got) {
  REQUIRE(got.status.ok());
  CHECK(got.last.finish_reason() == v1::FINISH_REASON_CANCELLED);
  CHECK(!got.ids.empty());
  CHECK(got.ids.size() < 65000);
  CHECK(got.last.usage().prompt_tokens() == 2);
  CHECK(got.last.usage().completion_tokens() == got.ids.size());
}

TEST_CASE(
    "when the drain time is up, running streams end cancelled with their usage, and moed exits 0") {
  std::string address;
  auto process = StartLong({"--drain-seconds", "1"}, &address);
  auto c = client::Client::Create(address, std::chrono::seconds(60));
  LongStream stream(*c);
  kill(process->pid(), SIGTERM);
  CheckCancelledWithUsage(stream.result.get());
  const int exit_code = process->WaitOrKill(std::chrono::seconds(60));
  INFO(process->stderr_text());
  CHECK(exit_code == 0);
}

TEST_CASE("a second SIGTERM ends the drain at once: streams end cancelled, exit 0") {
  std::string address;
  // A drain this long would outlast the test: only the second signal can end it in time.
  auto process = StartLong({"--drain-seconds", "3600"}, &address);
  auto c = client::Client::Create(address, std::chrono::seconds(60));
  LongStream stream(*c);
  kill(process->pid(), SIGTERM);
  // Draining: health turns NOT_SERVING (waited for with a deadline).
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (HealthOf(*c) != grpc::health::v1::HealthCheckResponse::NOT_SERVING) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(process->pid(), SIGTERM);
  CheckCancelledWithUsage(stream.result.get());
  const int exit_code = process->WaitOrKill(std::chrono::seconds(60));
  INFO(process->stderr_text());
  CHECK(exit_code == 0);
}

TEST_CASE("SIGHUP does not stop the daemon") {
  Daemon daemon;
  kill(daemon.process->pid(), SIGHUP);
  auto c = daemon.Connect();
  // Still serving well after the signal was delivered: health, then a whole generation.
  CHECK(HealthOf(*c) == grpc::health::v1::HealthCheckResponse::SERVING);
  Collected got = Run(*c, Greedy({3, 4}, 8));
  REQUIRE(got.status.ok());
  CHECK(got.ids.size() == 8);
  CHECK(HealthOf(*c) == grpc::health::v1::HealthCheckResponse::SERVING);
  CHECK(daemon.process->Stop(SIGTERM) == 0);
}

TEST_CASE("SIGTERM drains: requests in flight finish, then the daemon exits 0") {
  Daemon daemon({"--drain-seconds", "30"});
  auto c = daemon.Connect();
  std::promise<void> started;
  auto running = std::async(std::launch::async, [&] {
    bool signalled = false;
    Collected out;
    out.status = c->Generate(Greedy({1, 2}, 120), [&](const v1::GenerateResponse& m) {
      if (!signalled) started.set_value();
      signalled = true;
      out.ids.insert(out.ids.end(), m.token_ids().begin(), m.token_ids().end());
      out.last = m;
      return true;
    });
    return out;
  });
  started.get_future().wait();
  kill(daemon.process->pid(), SIGTERM);
  Collected finished = running.get();
  CHECK(finished.status.ok());
  CHECK(finished.ids.size() == 120);
  CHECK(finished.last.finish_reason() == v1::FINISH_REASON_LENGTH);
  CHECK(daemon.process->Wait() == 0);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("a checkpoint without a tokenizer serves token ids only") {
  fs::path bare = Model().parent_path() / "bare";
  if (!fs::exists(bare)) {
    fs::copy(Model(), bare);
    fs::remove(bare / "tokenizer.json");
  }
  std::vector<std::string> argv = {
      MOED_BINARY, "--model", bare.string(), "--listen", "127.0.0.1:0", "--http-listen", ""};
  ChildProcess process(argv);
  auto line = process.ReadStdoutLine(std::chrono::seconds(30));
  REQUIRE(line.has_value());
  auto c = client::Client::Create(line->substr(std::string("listening on ").size()),
                                  std::chrono::seconds(30));
  v1::GenerateRequest text;
  text.set_prompt("hello");
  absl::Status refused = Run(*c, text).status;
  CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(refused.message() ==
        "this model has no tokenizer: send prompt_token_ids instead of prompt");
  Collected ids = Run(*c, Greedy({4, 5}, 6));
  REQUIRE(ids.status.ok());
  CHECK(ids.ids.size() == 6);
  CHECK(ids.text.empty());
  CHECK(c->Tokenize(v1::TokenizeRequest()).status().code() ==
        absl::StatusCode::kFailedPrecondition);
  auto info = c->ModelInfo();
  REQUIRE(info.ok());
  CHECK_FALSE(info->has_tokenizer());
  CHECK(process.Stop() == 0);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("moed --record-routing writes each finished request's routing as a replayable trace") {
  fs::path trace = Model().parent_path() / "routing.jsonl";
  fs::remove(trace);
  Daemon daemon({"--record-routing", trace.string()});
  auto c = daemon.Connect();
  REQUIRE(Run(*c, Greedy({5, 6, 7}, 4)).status.ok());
  REQUIRE(Run(*c, Greedy({8}, 2)).status.ok());
  CHECK(daemon.process->Stop() == 0);
  auto traces = cache::ReadRoutingTraces(trace.string());
  REQUIRE(traces.ok());
  REQUIRE(traces->size() == 2);
  // Routing is recorded for every token fed to the model: the prompt and all generated
  // tokens but the last, which finished the request without being fed back.
  CHECK((*traces)[0].num_prefill_tokens == 3);
  CHECK((*traces)[0].tokens.size() == 3 + 3);
  CHECK((*traces)[0].num_layers == 2);
  CHECK((*traces)[0].tokens[0][1]->size() == 2);
  CHECK((*traces)[1].tokens.size() == 1 + 1);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("more admitted sequences than a step holds: every one is served, none starves") {
  Daemon daemon({"--max-batch", "1", "--max-running", "4"});
  std::vector<std::future<Collected>> runs;
  runs.reserve(4);
  for (int i = 0; i < 4; ++i) {
    runs.push_back(std::async(std::launch::async, [&, i] {
      auto c = daemon.Connect();
      return Run(*c, Greedy({static_cast<uint32_t>(20 + i), 3}, 30));
    }));
  }
  for (auto& run : runs) {
    Collected got = run.get();
    CHECK(got.status.ok());
    CHECK(got.ids.size() == 30);
    CHECK(got.last.finish_reason() == v1::FINISH_REASON_LENGTH);
  }
  auto info = daemon.Connect()->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->requests_running() == 0);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("a stop string ends the text before it and is named in the last message") {
  Daemon daemon;
  auto c = daemon.Connect();
  Collected full = Run(*c, Greedy({5, 300, 17}, 40));
  REQUIRE(full.status.ok());
  // An ASCII pair at its first occurrence, past the start.
  size_t at = std::string::npos;
  for (size_t p = 1; p + 1 < full.text.size(); ++p) {
    std::string pair = full.text.substr(p, 2);
    if (static_cast<unsigned char>(pair[0]) < 0x80 && static_cast<unsigned char>(pair[1]) < 0x80 &&
        full.text.find(pair) == p) {
      at = p;
      break;
    }
  }
  REQUIRE(at != std::string::npos);
  v1::GenerateRequest stop = Greedy({5, 300, 17}, 40);
  stop.mutable_sampling()->add_stop(full.text.substr(at, 2));
  Collected stopped = Run(*c, stop);
  REQUIRE(stopped.status.ok());
  CHECK(stopped.text == full.text.substr(0, at));
  CHECK(stopped.last.finish_reason() == v1::FINISH_REASON_STOP);
  CHECK(stopped.last.matched_stop() == full.text.substr(at, 2));
  CHECK(stopped.ids.size() < full.ids.size());
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("the last message reports what the expert cache did for the request") {
  SECTION("all resident: every use is a device hit, nothing staged") {
    Daemon daemon;
    Collected got = Run(*daemon.Connect(), Greedy({5, 6, 7}, 6));
    REQUIRE(got.status.ok());
    const v1::ExpertStats& s = got.last.expert_stats();
    // At least one expert per layer and step (2 layers, 1 prefill + 5 decode steps).
    CHECK(s.device_hits() >= uint64_t{12});
    CHECK(s.host_hits() == 0);
    CHECK(s.ssd_reads() == 0);
    CHECK(s.bytes_staged() == 0);
  }
  SECTION("from a store: the request's counts are the cache's, and a repeat reads nothing") {
    Daemon daemon({"--store", Store().string(), "--prefetch", "off"});
    auto c = daemon.Connect();
    Collected first = Run(*c, Greedy({5, 6, 7}, 6));
    REQUIRE(first.status.ok());
    auto info = c->ModelInfo();
    REQUIRE(info.ok());
    const v1::ExpertCacheInfo& cache = info->expert_cache();
    const v1::ExpertStats& s = first.last.expert_stats();
    CHECK(s.ssd_reads() > 0);
    CHECK(s.ssd_reads() == cache.ssd_reads());
    CHECK(s.device_hits() == cache.device_hits());
    CHECK(s.bytes_staged() == cache.ssd_bytes());
    CHECK(s.bytes_staged() == s.ssd_reads() * cache.slot_bytes());
    // The same greedy request again: the same experts, all resident now.
    Collected again = Run(*c, Greedy({5, 6, 7}, 6));
    REQUIRE(again.status.ok());
    CHECK(again.ids == first.ids);
    CHECK(again.last.expert_stats().ssd_reads() == 0);
    CHECK(again.last.expert_stats().bytes_staged() == 0);
    CHECK(again.last.expert_stats().device_hits() == s.device_hits() + s.ssd_reads());
  }
  SECTION("requests sharing steps split the bytes of the experts they share") {
    Daemon daemon({"--store", Store().string(), "--device-cache-bytes", "1M", "--max-batch", "4",
                   "--prefetch", "off"});
    std::vector<std::future<Collected>> runs;
    for (uint32_t i = 0; i < 3; ++i) {
      runs.push_back(std::async(std::launch::async, [&, i] {
        return Run(*daemon.Connect(), Greedy({30 + i, 40 + i}, 12));
      }));
    }
    uint64_t bytes = 0, reads = 0;
    for (auto& run : runs) {
      Collected got = run.get();
      REQUIRE(got.status.ok());
      bytes += got.last.expert_stats().bytes_staged();
      reads += got.last.expert_stats().ssd_reads();
    }
    auto info = daemon.Connect()->ModelInfo();
    REQUIRE(info.ok());
    CHECK(bytes == info->expert_cache().ssd_bytes());
    CHECK(reads >= info->expert_cache().ssd_reads());
  }
  SECTION(
      "with prefetch: the request is charged every prefetch, and every byte read is its or a "
      "prefetch's that served nobody") {
    // Few slots, and sampled tokens: experts come and go from step to step.
    Daemon daemon({"--store", Store().string(), "--device-cache-bytes", "300K", "--prefetch",
                   "gate", "--prefetch-depth", "2"});
    auto c = daemon.Connect();
    v1::GenerateRequest sampled = Greedy({5, 6, 7}, 24);
    sampled.mutable_sampling()->set_temperature(1);
    sampled.mutable_sampling()->set_seed(11);
    Collected got = Run(*c, sampled);
    REQUIRE(got.status.ok());
    auto info = c->ModelInfo();
    REQUIRE(info.ok());
    const v1::ExpertCacheInfo& cache = info->expert_cache();
    const v1::ExpertStats& s = got.last.expert_stats();
    CHECK(cache.prefetch_predictor() == "gate");
    CHECK(cache.prefetch_depth() == 2);
    INFO("slots " << cache.device_slots() << ", cancelled " << cache.prefetch_cancelled()
                  << ", misses " << cache.device_misses());
    CHECK(cache.prefetch_issued() > 0);
    CHECK(s.prefetch_issued() == cache.prefetch_issued());
    CHECK(s.prefetch_wasted() == cache.prefetch_wasted());
    CHECK(s.prefetch_useful() == cache.prefetch_useful());
    CHECK(s.prefetch_late() == cache.prefetch_late());
    CHECK(cache.prefetch_issued() == cache.prefetch_useful() + cache.prefetch_late() +
                                         cache.prefetch_wasted() + cache.prefetch_failed() +
                                         cache.prefetch_pending());
    CHECK(cache.ssd_bytes() ==
          s.bytes_staged() +
              (cache.prefetch_wasted() + cache.prefetch_failed() + cache.prefetch_pending()) *
                  cache.slot_bytes());
    // Both layers of the tiny model are predicted (from the one before, or the step before).
    REQUIRE(cache.per_layer_size() >= 1);
    for (const v1::LayerPrefetchStats& layer : cache.per_layer()) {
      CHECK(layer.recall() >= 0);
      CHECK(layer.recall() <= 1);
      CHECK(layer.precision() <= 1);
    }
  }
}

TEST_CASE("DeepSeek models serve Generate from a store at a 25 percent budget, as resident") {
  for (model::Architecture arch :
       {model::Architecture::kDeepseekV2, model::Architecture::kDeepseekV3}) {
    const std::string name(model::ArchitectureShortName(arch));
    INFO(name);
    const fs::path dir = Model().parent_path() / name;
    tools::SynthSpec spec = *tools::PresetSpec("tiny", arch);
    if (arch == model::Architecture::kDeepseekV3) spec.yarn_factor = 4;
    REQUIRE(tools::WriteCheckpoint(spec, dir.string()).ok());
    const fs::path store = Model().parent_path() / (name + "-store");
    REQUIRE(tools::Pack(dir.string(), store.string(), tools::PackOptions{}).ok());
    const v1::GenerateRequest request = Greedy({11, 22, 33, 44, 55}, 12);

    Daemon resident({"--model", dir.string()});
    auto info = resident.Connect()->ModelInfo();
    REQUIRE(info.ok());
    CHECK(info->architecture() == model::ArchitectureName(arch));
    CHECK(info->kv_lora_rank() == 32);
    CHECK(info->qk_rope_head_dim() == 8);
    CHECK(info->v_head_dim() == 16);
    CHECK(info->moe_layers() == 2);
    // MLA caches 32 latent + 8 rope floats per token and layer: 3 layers, fp32.
    CHECK(info->kv_bytes_per_token() == 3 * 40 * 4);
    if (arch == model::Architecture::kDeepseekV3) {
      CHECK(info->q_lora_rank() == 48);
      CHECK(info->routing() ==
            "sigmoid + correction bias, top-4 of the best 2 of 4 groups, renormalized, x2.5");
      CHECK(info->rope_scaling() == "yarn x4 (from 64 positions)");
    } else {
      CHECK(info->routing() == "softmax, top-2, x2.5");
    }
    Collected expected = Run(*resident.Connect(), request);
    REQUIRE(expected.status.ok());
    REQUIRE(expected.ids.size() == 12);

    const uint64_t quarter = info->total_expert_bytes() / 4;
    Daemon offloaded({"--store", store.string(), "--device-cache-bytes", std::to_string(quarter)});
    Collected got = Run(*offloaded.Connect(), request);
    REQUIRE(got.status.ok());
    CHECK(got.ids == expected.ids);
    CHECK(got.last.expert_stats().ssd_reads() > 0);
    auto offloaded_info = offloaded.Connect()->ModelInfo();
    REQUIRE(offloaded_info.ok());
    CHECK(offloaded_info->expert_cache().device_budget_bytes() <= quarter);
  }
}

TEST_CASE("expert_precision: a request that refuses the daemon's expert copies is refused") {
  SECTION("exact experts satisfy every request") {
    Daemon daemon;
    auto c = daemon.Connect();
    for (auto p : {v1::EXPERT_PRECISION_SOURCE, v1::EXPERT_PRECISION_ALLOW_INT8,
                   v1::EXPERT_PRECISION_ALLOW_INT4}) {
      v1::GenerateRequest request = Greedy({5}, 2);
      request.set_expert_precision(p);
      CHECK(Run(*c, request).status.ok());
    }
    v1::GenerateRequest bad = Greedy({5}, 2);
    bad.set_expert_precision(static_cast<v1::ExpertPrecision>(9));
    absl::Status status = Run(*c, bad).status;
    CHECK(status.code() == absl::StatusCode::kInvalidArgument);
    CHECK(status.message().find("unknown expert_precision 9") != std::string::npos);
  }
  SECTION("int8 experts: SOURCE is refused naming the daemon's precision, looser ones run") {
    Daemon daemon({"--store", Store().string(), "--expert-precision", "int8"});
    auto c = daemon.Connect();
    v1::GenerateRequest exact = Greedy({5}, 2);
    exact.set_expert_precision(v1::EXPERT_PRECISION_SOURCE);
    absl::Status status = Run(*c, exact).status;
    CHECK(status.code() == absl::StatusCode::kFailedPrecondition);
    CHECK(status.message().find("--expert-precision int8") != std::string::npos);
    for (auto p : {v1::EXPERT_PRECISION_UNSPECIFIED, v1::EXPERT_PRECISION_ALLOW_INT8,
                   v1::EXPERT_PRECISION_ALLOW_INT4}) {
      v1::GenerateRequest request = Greedy({5}, 2);
      request.set_expert_precision(p);
      CHECK(Run(*c, request).status.ok());
    }
    auto info = c->ModelInfo();
    REQUIRE(info.ok());
    CHECK(info->requests_running() == 0);
  }
}

TEST_CASE("precision policy: requests that accept int4 copies fall back, exact ones never do") {
  auto store = cache::Store::Open(Store().string());
  REQUIRE(store.ok());
  // The policy's minimum: two full and two int4 slots.
  const uint64_t budget = 2 * (cache::ExpertCache::SlotBytes(**store, cache::Precision::kSource) +
                               cache::ExpertCache::SlotBytes(**store, cache::Precision::kInt4));
  Daemon reference;  // the checkpoint, every expert resident
  Collected expected = Run(*reference.Connect(), Greedy({5, 6, 7}, 8));
  REQUIRE(expected.status.ok());

  Daemon daemon({"--store", Store().string(), "--device-cache-bytes", std::to_string(budget),
                 "--precision-policy", "always", "--fallback-precision", "int4", "--prefetch",
                 "off"});
  auto c = daemon.Connect();
  auto run = [&](v1::ExpertPrecision precision) {
    v1::GenerateRequest request = Greedy({5, 6, 7}, 8);
    request.set_expert_precision(precision);
    Collected got = Run(*c, request);
    REQUIRE(got.status.ok());
    return got;
  };
  // Exact, and int8 only against an int4 fallback: never a fallback, the reference's tokens.
  for (auto p : {v1::EXPERT_PRECISION_SOURCE, v1::EXPERT_PRECISION_ALLOW_INT8}) {
    Collected exact = run(p);
    CHECK(exact.ids == expected.ids);
    CHECK(exact.last.expert_stats().low_precision_fallbacks() == 0);
  }
  // ALLOW_INT4, and UNSPECIFIED (the daemon's policy): misses run from int4 copies.
  uint64_t fallbacks = 0;
  for (auto p : {v1::EXPERT_PRECISION_ALLOW_INT4, v1::EXPERT_PRECISION_UNSPECIFIED}) {
    const v1::ExpertStats s = run(p).last.expert_stats();
    CHECK(s.fallbacks_int4() > 0);
    CHECK(s.fallbacks_int8() == 0);
    CHECK(s.low_precision_fallbacks() == s.fallbacks_int4());
    fallbacks += s.fallbacks_int4();
  }
  auto info = c->ModelInfo();
  REQUIRE(info.ok());
  const v1::ExpertCacheInfo& cache_info = info->expert_cache();
  CHECK(cache_info.precision_policy() == "always");
  CHECK(cache_info.fallback_precision() == "int4");
  CHECK(cache_info.fallback_slots() == 2);
  CHECK(cache_info.fallback_slot_bytes() ==
        cache::ExpertCache::SlotBytes(**store, cache::Precision::kInt4));
  CHECK(cache_info.device_budget_bytes() == budget);
  // One request at a time: the cache's count is the requests'.
  CHECK(cache_info.fallbacks_int4() == fallbacks);
}

TEST_CASE("moectl --timeout bounds reaching the daemon, not how long a stream runs") {
  std::string address;
  auto process = StartLong({}, &address);
  // Longer than the 0.5 s timeout (the demo-sized model decodes about a thousand tokens a
  // second on one core).
  CommandResult slow =
      RunCommand({MOECTL_BINARY, "--server", address, "--timeout", "0.5", "generate", "--ids",
                  "1,2", "--max-tokens", "1000", "--ignore-eos"});
  CHECK(slow.exit_code == 0);
  CHECK(slow.err.find("[FINISH_REASON_LENGTH, ") != std::string::npos);
  // A stream limit, when asked for, still applies.
  CommandResult limited =
      RunCommand({MOECTL_BINARY, "--server", address, "--stream-timeout", "0.2", "generate",
                  "--ids", "1,2", "--max-tokens", "60000", "--ignore-eos"});
  CHECK(limited.exit_code != 0);
  CHECK(limited.err.find("DEADLINE_EXCEEDED") != std::string::npos);
  // No daemon at all: refused within the timeout.
  CommandResult nobody = RunCommand(
      {MOECTL_BINARY, "--server", "127.0.0.1:1", "--timeout", "1", "generate", "--ids", "1,2"});
  CHECK(nobody.exit_code != 0);
  CHECK(nobody.err.find("UNAVAILABLE") != std::string::npos);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

using Serving = grpc::health::v1::HealthCheckResponse;

// Waits up to 10 s for the daemon's health to become `want`.
bool HealthBecomes(client::Client& c, Serving::ServingStatus want) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (HealthOf(c) != want) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// A private copy of Store(), for tests that damage it.
fs::path CopyOfStore(const std::string& name) {
  fs::path copy = Store().parent_path() / name;
  fs::remove_all(copy);
  fs::copy(Store(), copy, fs::copy_options::recursive);
  return copy;
}

TEST_CASE("an unreadable store turns health NOT_SERVING until it reads again") {
  const fs::path store = CopyOfStore("store-truncated");
  const fs::path experts = store / "experts.bin";
  const uintmax_t size = fs::file_size(experts);
  fs::copy_file(experts, store / "saved.bin");
  Daemon daemon({"--store", store.string()});
  auto c = daemon.Connect();
  REQUIRE(HealthOf(*c) == Serving::SERVING);
  fs::resize_file(experts, size / 2);
  CHECK(HealthBecomes(*c, Serving::NOT_SERVING));
  // Put back in place: serving again, with the tokens of the intact model.
  fs::copy_file(store / "saved.bin", experts, fs::copy_options::overwrite_existing);
  CHECK(HealthBecomes(*c, Serving::SERVING));
  Collected got = Run(*c, Greedy({5, 300, 17}, 4));
  REQUIRE(got.status.ok());
  auto local = model::Model::Load(Model().string(), kernels::TestCpuBackend(1));
  REQUIRE(local.ok());
  auto expected = model::ScoreAndGreedy(**local, {5, 300, 17}, 4);
  REQUIRE(expected.ok());
  CHECK(got.ids == std::vector<uint32_t>(expected->greedy.begin(), expected->greedy.end()));
  REQUIRE(daemon.process->Stop() == 0);
  const std::string& log = daemon.process->stderr_text();
  CHECK(log.find("the expert store cannot be read") != std::string::npos);
  CHECK(log.find("(truncated)") != std::string::npos);
  CHECK(log.find("the expert store reads again: serving") != std::string::npos);
  fs::remove_all(store);
}

TEST_CASE("checksum mismatches fail the requests that need the blobs, never readiness") {
  const fs::path store = CopyOfStore("store-corrupt");
  {
    // Damage every source blob of layer 0: every request needs one.
    auto opened = cache::Store::Open(store.string());
    REQUIRE(opened.ok());
    std::fstream file(store / "experts.bin", std::ios::in | std::ios::out | std::ios::binary);
    for (const cache::BlobEntry& blob : (*opened)->manifest().blobs) {
      if (blob.layer != 0 || blob.precision != cache::Precision::kSource) continue;
      file.seekp(static_cast<std::streamoff>(blob.offset + 100));
      file.put('\x5A');
    }
  }
  Daemon daemon({"--store", store.string()});
  auto c = daemon.Connect();
  for (int i = 0; i < 3; ++i) {
    Collected got = Run(*c, Greedy({static_cast<uint32_t>(5 + i)}, 2));
    CHECK(got.status.code() == absl::StatusCode::kDataLoss);
    CHECK(got.status.message().find("checksum mismatch") != std::string::npos);
  }
  // Several store checks later, still serving: the rest of the store is sound.
  std::this_thread::sleep_for(std::chrono::milliseconds(800));
  CHECK(HealthOf(*c) == Serving::SERVING);
  auto info = c->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->expert_cache().failed_reads() >= 3);
  REQUIRE(daemon.process->Stop() == 0);
  CHECK(daemon.process->stderr_text().find(" source, checksum, attempt 1): checksum mismatch") !=
        std::string::npos);
  fs::remove_all(store);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

// The value of the first sample of `name` whose labels include `label`, -1 when none.
double Sample(const std::string& metrics, const std::string& name, const std::string& label) {
  std::istringstream lines(metrics);
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind(name + "{", 0) == 0 && line.find(label) != std::string::npos)
      return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

TEST_CASE("the daemon ends a queued request whose deadline passed, freeing its queue place") {
  Daemon daemon({"--model", LongModel().string(), "--http-listen", "127.0.0.1:0", "--max-batch",
                 "1", "--max-queue", "1", "--drain-seconds", "1"});
  auto c = daemon.Connect();
  LongStream busy(*c);  // holds the only batch place
  // Should a check fail, the daemon goes first, so that the long stream ends.
  struct KillFirst {
    ChildProcess* process;
    ~KillFirst() { process->Stop(SIGKILL); }
  } kill_first{daemon.process.get()};
  auto hurried = client::Client::Create(daemon.address, std::chrono::seconds(30), "",
                                        std::chrono::milliseconds(300));
  absl::Status late = Run(*hurried, Greedy({1, 2}, 4)).status;
  CHECK(late.code() == absl::StatusCode::kDeadlineExceeded);
  // The daemon itself drops it from the queue (while the long stream still runs) and counts a
  // deadline, not a client that went away.
  const std::string metrics_path = "/metrics";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  std::string metrics;
  while (true) {
    metrics = HttpGet(daemon.http_address, metrics_path).value_or("");
    if (Sample(metrics, "moed_request_errors_total", "code=\"deadline_exceeded\"") >= 1) break;
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  auto info = c->ModelInfo();
  REQUIRE(info.ok());
  CHECK(info->requests_waiting() == 0);
  CHECK(info->requests_running() == 1);
  // Its queue place is free again: one more request may wait.
  auto queued =
      std::async(std::launch::async, [&] { return Run(*daemon.Connect(), Greedy({3}, 2)); });
  const auto wait_until = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (c->ModelInfo()->requests_waiting() != 1) {
    REQUIRE(std::chrono::steady_clock::now() < wait_until);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  kill(daemon.process->pid(), SIGTERM);  // a drain of 1 s: both end cancelled
  Collected waited = queued.get();
  CHECK(waited.status.ok());
  CHECK(waited.last.finish_reason() == v1::FINISH_REASON_CANCELLED);
  CheckCancelledWithUsage(busy.result.get());
  CHECK(daemon.process->Wait() == 0);
}

}  // namespace
}  // namespace moed::testing

namespace moed::testing {
namespace {

TEST_CASE("invalid UTF-8 in a string field is INVALID_ARGUMENT naming the field") {
  Daemon daemon({"--log-format", "json"});
  auto c = daemon.Connect();
  v1::GenerateRequest request = Greedy({}, 2);
  request.clear_prompt_token_ids();
  request.set_prompt("caf\xC3 au lait");
  absl::Status refused = Run(*c, request).status;
  CHECK(refused.code() == absl::StatusCode::kInvalidArgument);
  CHECK(refused.message() == "field 'prompt' is not valid UTF-8 (string fields must be)");
  request.set_prompt("fine");
  request.mutable_sampling()->add_stop("\xFF");
  refused = Run(*c, request).status;
  CHECK(refused.message() == "field 'sampling.stop' is not valid UTF-8 (string fields must be)");
  v1::TokenizeRequest tokenize;
  tokenize.set_text("\xED\xA0\x80");  // a surrogate
  auto tokenized = c->Tokenize(tokenize);
  CHECK(tokenized.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(tokenized.status().message() == "field 'text' is not valid UTF-8 (string fields must be)");
  // The daemon serves on; whatever the libraries said went through its JSON logger.
  request.mutable_sampling()->clear_stop();
  CHECK(Run(*c, request).status.ok());
  REQUIRE(daemon.process->Stop() == 0);
  std::istringstream lines(daemon.process->stderr_text());
  for (std::string line; std::getline(lines, line);) {
    INFO(line);
    CHECK((line.front() == '{' && line.back() == '}'));
  }
}

// Threads of a process, from /proc.
int ThreadsOf(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  return -1;
}

// Opens `count` health Watch streams on one channel and reads each one's first status.
struct Watches {
  Watches(const std::string& address, int count)
      : channel(grpc::CreateChannel(address, grpc::InsecureChannelCredentials())),
        stub(grpc::health::v1::Health::NewStub(channel)) {
    for (int i = 0; i < count; ++i) {
      contexts.push_back(std::make_unique<grpc::ClientContext>());
      grpc::health::v1::HealthCheckRequest request;
      readers.push_back(stub->Watch(contexts.back().get(), request));
    }
  }
  ~Watches() {
    for (auto& context : contexts) context->TryCancel();
    for (auto& reader : readers) (void)reader->Finish();
  }
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::health::v1::Health::Stub> stub;
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<grpc::health::v1::HealthCheckResponse>>> readers;
};

TEST_CASE("idle streams hold no thread: 1000 health watches") {
  Daemon daemon;
  const int before = ThreadsOf(daemon.process->pid());
  Watches watches(daemon.address, 1000);
  for (auto& reader : watches.readers) {
    grpc::health::v1::HealthCheckResponse first;
    REQUIRE(reader->Read(&first));
    CHECK(first.status() == grpc::health::v1::HealthCheckResponse::SERVING);
  }
  const int during = ThreadsOf(daemon.process->pid());
  INFO("threads before " << before << ", with 1000 open watches " << during);
  CHECK(during < before + 64);
}

TEST_CASE("streams past --max-concurrent-streams are refused with RESOURCE_EXHAUSTED") {
  Daemon daemon({"--max-concurrent-streams", "3"});
  Watches watches(daemon.address, 3);
  for (auto& reader : watches.readers) {
    grpc::health::v1::HealthCheckResponse first;
    REQUIRE(reader->Read(&first));
  }
  auto c = daemon.Connect();
  absl::Status refused = Run(*c, Greedy({1}, 2)).status;
  CHECK(refused.code() == absl::StatusCode::kResourceExhausted);
  CHECK(refused.message() == "too many open streams: 3 are open (--max-concurrent-streams)");
  Watches one_more(daemon.address, 1);
  grpc::health::v1::HealthCheckResponse nothing;
  CHECK_FALSE(one_more.readers[0]->Read(&nothing));
  CHECK(one_more.readers[0]->Finish().error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED);
  one_more.readers.clear();
  // Unary calls are not streams; and once a watch closes, a stream may open again.
  CHECK(c->ModelInfo().ok());
  watches.contexts[0]->TryCancel();
  (void)watches.readers[0]->Finish();
  watches.readers.erase(watches.readers.begin());
  watches.contexts.erase(watches.contexts.begin());
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!Run(*c, Greedy({1}, 2)).status.ok()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace
}  // namespace moed::testing
