// The scheduler in-process, with an expert provider that can hold a step inside the model so
// that what queues behind it is known exactly.
#include "scheduler/scheduler.h"

#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cache/expert_cache.h"
#include "kernels/test_backend.h"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"
#include "util/unshared_status.h"

namespace moed::scheduler {
namespace {

namespace fs = std::filesystem;

// Forwards to the cache; while held, the next ForEachExpert waits until released.
class GatedProvider final : public model::ExpertProvider {
 public:
  explicit GatedProvider(std::shared_ptr<cache::ExpertCache> cache) : cache_(std::move(cache)) {}
  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const model::ExpertCompute& compute) override {
    {
      std::unique_lock lock(mutex_);
      entered_ = true;
      changed_.notify_all();
      changed_.wait(lock, [&] { return !held_; });
    }
    return cache_->ForEachExpert(layer, experts, compute);
  }
  void Hold() {
    std::lock_guard lock(mutex_);
    held_ = true;
    entered_ = false;
  }
  void WaitUntilEntered() {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return entered_; });
  }
  void Release() {
    std::lock_guard lock(mutex_);
    held_ = false;
    changed_.notify_all();
  }

 private:
  std::shared_ptr<cache::ExpertCache> cache_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool held_ = false;
  bool entered_ = false;
};

struct Fixture {
  Fixture() {
    root = fs::temp_directory_path() / ("moed_scheduler_test_" + std::to_string(getpid()));
    fs::remove_all(root);
    REQUIRE(tools::WriteCheckpoint(*tools::PresetSpec("tiny", model::Architecture::kMixtral),
                                   (root / "m").string())
                .ok());
    REQUIRE(tools::Pack((root / "m").string(), (root / "s").string(), tools::PackOptions{}).ok());
    auto opened = cache::Store::Open((root / "s").string());
    REQUIRE(opened.ok());
    store = *opened;
    auto made = cache::ExpertCache::Create(store, cache::CacheOptions{});
    REQUIRE(made.ok());
    auto provider = std::make_unique<GatedProvider>(*std::move(made));
    gate = provider.get();
    auto created = model::Model::Create(store->config(), store, std::move(provider),
                                        kernels::TestCpuBackend(1));
    REQUIRE(created.ok());
    model = *std::move(created);
  }
  ~Fixture() { fs::remove_all(root); }
  fs::path root;
  std::shared_ptr<cache::Store> store;
  std::shared_ptr<model::Model> model;
  GatedProvider* gate = nullptr;
};

// `sequences` full contexts of KV memory, computed from the shapes (keys and values, fp32).
uint64_t KvBudgetFor(const model::ModelConfig& c, double sequences) {
  return static_cast<uint64_t>(sequences * 2.0 * static_cast<double>(c.num_layers) *
                               static_cast<double>(c.max_position_embeddings) *
                               static_cast<double>(c.num_key_value_heads * c.head_dim) * 4.0);
}

GenerationRequest Request(const std::string& id, int32_t priority) {
  GenerationRequest r;
  r.id = id;
  r.prompt = {5, 6};
  r.sampling.max_tokens = 3;
  r.sampling.temperature = 0;
  r.sampling.ignore_eos = true;
  r.priority = priority;
  return r;
}

void DrainAll(const std::vector<std::shared_ptr<RequestHandle>>& handles) {
  for (const auto& handle : handles) {
    while (true) {
      auto event = handle->Next(std::chrono::seconds(30));
      REQUIRE(event.has_value());
      if (event->last()) {
        CHECK(event->error.ok());
        break;
      }
    }
  }
}

TEST_CASE("queued requests leave the queue by priority, equal priorities in arrival order") {
  Fixture f;
  std::mutex mutex;
  std::vector<std::string> finished;
  SchedulerOptions options;
  options.max_batch = 1;
  options.on_routing = [&](const std::string& id, int, const auto&) {
    std::lock_guard lock(mutex);
    finished.push_back(id);
  };
  Scheduler scheduler(f.model, nullptr, options);
  f.gate->Hold();
  std::vector<std::shared_ptr<RequestHandle>> handles;
  handles.push_back(*scheduler.Submit(Request("first", 0)));
  f.gate->WaitUntilEntered();  // "first" is inside its first step; the rest must queue
  for (auto [id, priority] : std::vector<std::pair<std::string, int>>{
           {"low-1", 0}, {"high", 5}, {"low-2", 0}, {"negative", -3}, {"higher", 9}}) {
    handles.push_back(*scheduler.Submit(Request(id, priority)));
  }
  CHECK(scheduler.stats().waiting == 5);
  f.gate->Release();
  DrainAll(handles);
  // on_routing runs just after the last event is handed over: wait for the last call.
  for (int i = 0; i < 1000 && !scheduler.Idle(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  std::lock_guard lock(mutex);
  CHECK(finished ==
        std::vector<std::string>{"first", "higher", "high", "low-1", "low-2", "negative"});
}

TEST_CASE("the counters leave a request out as soon as its last event is handed over") {
  Fixture f;
  Scheduler scheduler(f.model, nullptr, SchedulerOptions{});
  for (int round = 1; round <= 20; ++round) {
    std::shared_ptr<RequestHandle> handle = *scheduler.Submit(Request("r", 0));
    std::optional<StreamEvent> event;
    do {
      event = handle->Next(std::chrono::seconds(30));
      REQUIRE(event.has_value());
    } while (!event->last());
    // No waiting: read at once, as a client reads ModelInfo right after its stream ends.
    SchedulerStats stats = scheduler.stats();
    CHECK(stats.running == 0);
    CHECK(stats.kv_cache_bytes == 0);
    CHECK(stats.completed == static_cast<uint64_t>(round));
    CHECK(scheduler.Idle());
  }
}

TEST_CASE("a listener hears each event as it is queued, and at once for earlier ones") {
  Fixture f;
  Scheduler scheduler(f.model, nullptr, SchedulerOptions{});
  f.gate->Hold();
  std::shared_ptr<RequestHandle> handle = *scheduler.Submit(Request("r", 0));
  std::mutex mutex;
  std::condition_variable heard;
  int calls = 0;
  bool last = false;
  handle->SetListener([&] {
    std::lock_guard lock(mutex);
    ++calls;
    while (auto event = handle->Next(std::chrono::milliseconds(0))) last |= event->last();
    heard.notify_all();
  });
  f.gate->Release();
  std::unique_lock lock(mutex);
  CHECK(heard.wait_for(lock, std::chrono::seconds(30), [&] { return last; }));
  CHECK(calls >= 2);  // Request() asks for 3 tokens: several events, each heard
}

// Counts what it is told, with atomics, as a metrics sink does.
class CountingObserver final : public RequestObserver {
 public:
  void OnAdmitted(double seconds) override {
    ++admitted;
    CHECK(seconds >= 0);
  }
  void OnStepTokens(uint64_t prompt, uint64_t generation) override {
    prompt_tokens += prompt;
    generation_tokens += generation;
  }
  void OnFirstToken(double seconds) override {
    ++first_tokens;
    CHECK(seconds >= 0);
  }
  void OnInterToken(double seconds) override {
    ++inter_tokens;
    CHECK(seconds >= 0);
  }
  void OnFinished(const FinishedRequest& request) override {
    ++finished;
    if (request.reason == FinishReason::kLength) ++lengths;
    if (request.reason == FinishReason::kCancelled) ++cancels;
    finished_generation_tokens += request.generation_tokens;
  }
  std::atomic<uint64_t> admitted{0}, prompt_tokens{0}, generation_tokens{0}, first_tokens{0},
      inter_tokens{0}, finished{0}, lengths{0}, cancels{0}, finished_generation_tokens{0};
};

TEST_CASE("the observer hears every token and every end before the last event is handed over") {
  Fixture f;
  auto observer = std::make_shared<CountingObserver>();
  SchedulerOptions options;
  options.observer = observer;
  options.max_tokens_per_step = 3;  // a 5-token prompt takes two steps to prefill
  Scheduler scheduler(f.model, nullptr, options);
  uint64_t generated = 0;
  for (int round = 1; round <= 5; ++round) {
    GenerationRequest request = Request("r", 0);
    request.prompt = {1, 2, 3, 4, 5};
    request.sampling.max_tokens = static_cast<uint32_t>(round);
    std::shared_ptr<RequestHandle> handle = *scheduler.Submit(std::move(request));
    std::optional<StreamEvent> event;
    do {
      event = handle->Next(std::chrono::seconds(30));
      REQUIRE(event.has_value());
    } while (!event->last());
    CHECK(event->completion_tokens == static_cast<uint32_t>(round));
    generated += event->completion_tokens;
    // Read at once: the last event comes after the observer heard everything.
    CHECK(observer->finished == static_cast<uint64_t>(round));
    CHECK(observer->lengths == static_cast<uint64_t>(round));
    CHECK(observer->generation_tokens == generated);
    CHECK(observer->finished_generation_tokens == generated);
    CHECK(observer->prompt_tokens == 5u * static_cast<uint64_t>(round));
    CHECK(observer->first_tokens == static_cast<uint64_t>(round));
    CHECK(observer->inter_tokens == generated - static_cast<uint64_t>(round));
    CHECK(observer->admitted == static_cast<uint64_t>(round));
  }
  // A cancelled request ends as an abort, counted before its last event too.
  f.gate->Hold();
  std::shared_ptr<RequestHandle> handle = *scheduler.Submit(Request("c", 0));
  f.gate->WaitUntilEntered();
  handle->Cancel();
  f.gate->Release();
  std::optional<StreamEvent> event;
  do {
    event = handle->Next(std::chrono::seconds(30));
    REQUIRE(event.has_value());
  } while (!event->last());
  CHECK(event->finish == FinishReason::kCancelled);
  CHECK(observer->cancels == 1u);
  CHECK(observer->finished == 6u);
}

TEST_CASE("the KV budget is max_running sequences of the full context") {
  Fixture f;
  SchedulerOptions options;
  options.max_batch = 2;
  options.max_running = 3;
  Scheduler scheduler(f.model, nullptr, options);
  const model::ModelConfig& c = f.model->config();
  // Keys and values: 2 × layers × positions × kv heads × head_dim floats.
  const uint64_t per_sequence = 2ull * static_cast<uint64_t>(c.num_layers) *
                                static_cast<uint64_t>(c.max_position_embeddings) *
                                static_cast<uint64_t>(c.num_key_value_heads * c.head_dim) * 4;
  CHECK(scheduler.stats().kv_cache_budget_bytes == 3 * per_sequence);
  CHECK(model::KvCache::BytesFor(c, c.max_position_embeddings) == per_sequence);
  // Blocks are taken as a sequence grows: an empty cache holds none.
  CHECK(f.model->NewKvCache(c.max_position_embeddings)->bytes() == 0);
}

// Every token id a request streams, and how it ended.
struct Outcome {
  std::vector<int32_t> tokens;
  absl::Status error;
  FinishReason finish = FinishReason::kNone;
};

Outcome Collect(RequestHandle& handle) {
  Outcome outcome;
  while (true) {
    auto event = handle.Next(std::chrono::seconds(60));
    REQUIRE(event.has_value());
    outcome.tokens.insert(outcome.tokens.end(), event->token_ids.begin(), event->token_ids.end());
    if (event->last()) {
      outcome.error = event->error;
      outcome.finish = event->finish;
      return outcome;
    }
  }
}

GenerationRequest ToContextEnd(int i) {
  GenerationRequest r;
  r.id = "r" + std::to_string(i);
  r.prompt = {static_cast<int32_t>(5 + i), 6, static_cast<int32_t>(7 + 3 * i)};
  r.sampling.max_tokens = 0;  // to the end of the context
  r.sampling.temperature = 0.8f;
  r.sampling.seed = static_cast<uint64_t>(100 + i);
  r.sampling.ignore_eos = true;
  return r;
}

TEST_CASE(
    "with a KV budget of a few sequences, requests to the end of the context all "
    "complete with the tokens they get alone, through preemptions") {
  Fixture f;
  const model::ModelConfig& c = f.model->config();
  const int requests = 8;
  // Each alone, without a budget: the reference.
  std::vector<Outcome> alone;
  {
    Scheduler scheduler(f.model, nullptr, SchedulerOptions{});
    for (int i = 0; i < requests; ++i) {
      auto handle = scheduler.Submit(ToContextEnd(i));
      REQUIRE(handle.ok());
      alone.push_back(Collect(**handle));
      REQUIRE(alone.back().error.ok());
      CHECK(alone.back().tokens.size() == static_cast<size_t>(c.max_position_embeddings - 3));
    }
  }
  // Two and a half full sequences of KV memory for eight that each grow to the full context.
  const uint64_t budget = KvBudgetFor(c, 2.5);
  f.model->SetKvBudget(budget);
  SchedulerOptions options;
  options.max_batch = 8;
  options.max_running = 8;
  Scheduler scheduler(f.model, nullptr, options);
  CHECK(scheduler.stats().kv_cache_budget_bytes <= budget);
  CHECK(scheduler.stats().kv_cache_budget_bytes > budget - f.model->kv_block_bytes());
  std::vector<std::shared_ptr<RequestHandle>> handles;
  handles.reserve(requests);
  for (int i = 0; i < requests; ++i) handles.push_back(*scheduler.Submit(ToContextEnd(i)));
  for (int i = 0; i < requests; ++i) {
    INFO("request " << i);
    Outcome outcome = Collect(*handles[i]);
    CHECK(outcome.error.ok());
    CHECK(outcome.finish == FinishReason::kLength);
    CHECK(outcome.tokens == alone[i].tokens);
  }
  CHECK(scheduler.stats().preemptions > 0);
  CHECK(f.model->kv_pool()->used() == 0);  // every block back once all finished
  f.model->SetKvBudget(0);
}

TEST_CASE("sampled requests batched together get the tokens they get alone, sampled in parallel") {
  Fixture f;
  const int requests = 8;
  std::vector<Outcome> alone;
  {
    SchedulerOptions serial;
    serial.sampling_threads = 1;
    Scheduler scheduler(f.model, nullptr, serial);
    for (int i = 0; i < requests; ++i) {
      auto handle = scheduler.Submit(ToContextEnd(i));
      REQUIRE(handle.ok());
      alone.push_back(Collect(**handle));
      REQUIRE(alone.back().error.ok());
    }
  }
  for (int threads : {2, 4}) {
    SchedulerOptions options;
    options.max_batch = requests;
    options.sampling_threads = threads;
    Scheduler scheduler(f.model, nullptr, options);
    std::vector<std::shared_ptr<RequestHandle>> handles;
    handles.reserve(requests);
    for (int i = 0; i < requests; ++i) handles.push_back(*scheduler.Submit(ToContextEnd(i)));
    for (int i = 0; i < requests; ++i) {
      INFO(threads << " sampling threads, request " << i);
      Outcome outcome = Collect(*handles[i]);
      CHECK(outcome.error.ok());
      CHECK(outcome.tokens == alone[i].tokens);
    }
  }
}

TEST_CASE(
    "a damaged expert fails only the requests routed to it, and the others in its steps "
    "complete with the tokens of a fault-free run") {
  const testing::ScratchDir scratch("moed_scheduler_fault");
  const fs::path& root = scratch.path();
  REQUIRE(tools::WriteCheckpoint(*tools::PresetSpec("tiny", model::Architecture::kMixtral),
                                 (root / "m").string())
              .ok());
  REQUIRE(tools::Pack((root / "m").string(), (root / "s").string(), tools::PackOptions{}).ok());
  const int requests = 8;
  auto make = [](int i) {
    GenerationRequest r;
    r.id = std::to_string(i);
    r.prompt = {static_cast<int32_t>(11 + 7 * i), static_cast<int32_t>(3 + i)};
    r.sampling.max_tokens = 8;
    r.sampling.temperature = 0.8f;
    r.sampling.seed = static_cast<uint64_t>(i);
    r.sampling.ignore_eos = true;
    return r;
  };
  // The fault-free run, from the checkpoint: each request's tokens and every (layer, expert)
  // its tokens were routed to.
  std::mutex mutex;
  std::map<std::string, std::set<std::pair<int, int>>> used;
  std::vector<Outcome> reference;
  {
    auto checkpoint = model::Model::Load((root / "m").string(), kernels::TestCpuBackend(1));
    REQUIRE(checkpoint.ok());
    SchedulerOptions options;
    options.max_batch = requests;
    options.on_routing = [&](const std::string& id, int, const auto& routing) {
      std::lock_guard lock(mutex);
      for (size_t layer = 0; layer < routing.size(); ++layer)
        for (const auto& token : routing[layer])
          for (int e : token) used[id].insert({static_cast<int>(layer), e});
    };
    Scheduler scheduler(std::shared_ptr<model::Model>(*std::move(checkpoint)), nullptr, options);
    std::vector<std::shared_ptr<RequestHandle>> handles;
    handles.reserve(requests);
    for (int i = 0; i < requests; ++i) handles.push_back(*scheduler.Submit(make(i)));
    for (auto& handle : handles) reference.push_back(Collect(*handle));
    for (int i = 0; i < 1000 && !scheduler.Idle(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  // Damage an expert that some requests use and most do not.
  std::pair<int, int> damaged{-1, -1};
  size_t users = 0;
  for (const auto& [id, experts] : used) {
    for (const auto& expert : experts) {
      size_t n = 0;
      for (const auto& [other, set] : used) n += set.count(expert);
      if (n >= 1 && n <= requests / 2 && (damaged.first < 0 || n > users)) {
        damaged = expert;
        users = n;
      }
    }
  }
  REQUIRE(damaged.first >= 0);
  auto store = cache::Store::Open((root / "s").string());
  REQUIRE(store.ok());
  const cache::BlobEntry* blob =
      (*store)->manifest().FindBlob(damaged.first, damaged.second, cache::Precision::kSource);
  REQUIRE(blob != nullptr);
  {
    std::fstream file((*store)->experts_path(), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(blob->offset + 100));
    file.put('\x5A');
  }
  auto experts = cache::ExpertCache::Create(*store, cache::CacheOptions{});
  REQUIRE(experts.ok());
  auto provider = std::make_unique<GatedProvider>(*std::move(experts));
  GatedProvider* gate = provider.get();
  auto faulty = model::Model::Create((*store)->config(), *store, std::move(provider),
                                     kernels::TestCpuBackend(1));
  REQUIRE(faulty.ok());
  SchedulerOptions options;
  options.max_batch = requests;
  Scheduler scheduler(std::shared_ptr<model::Model>(*std::move(faulty)), nullptr, options);
  // The first request holds its first step; the other seven queue and then step together.
  gate->Hold();
  std::vector<std::shared_ptr<RequestHandle>> handles;
  handles.push_back(*scheduler.Submit(make(0)));
  gate->WaitUntilEntered();
  for (int i = 1; i < requests; ++i) handles.push_back(*scheduler.Submit(make(i)));
  gate->Release();
  size_t failed = 0;
  for (int i = 0; i < requests; ++i) {
    INFO("request " << i << ", damaged layer " << damaged.first << " expert " << damaged.second);
    Outcome outcome = Collect(*handles[i]);
    if (used[std::to_string(i)].count(damaged) == 1) {
      ++failed;
      CHECK(outcome.error.code() == absl::StatusCode::kDataLoss);
      CHECK(std::string(outcome.error.message())
                .find(absl::StrCat("layer ", damaged.first, " expert ", damaged.second)) !=
            std::string::npos);
    } else {
      CHECK(outcome.error.ok());
      CHECK(outcome.tokens == reference[i].tokens);
    }
  }
  CHECK(failed == users);
  CHECK(failed < static_cast<size_t>(requests));
}

TEST_CASE("a prompt that cannot fit the KV budget is refused, naming the budget") {
  Fixture f;
  f.model->SetKvBudget(f.model->kv_block_bytes());  // one block: 16 tokens
  Scheduler scheduler(f.model, nullptr, SchedulerOptions{});
  GenerationRequest r = Request("long", 0);
  r.prompt.assign(16, 5);  // 16 tokens and the first new one need two blocks
  auto refused = scheduler.Submit(r);
  REQUIRE_FALSE(refused.ok());
  CHECK(refused.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(refused.status().message()).find("--kv-cache-bytes") != std::string::npos);
  // A sequence alone that outgrows the budget fails with RESOURCE_EXHAUSTED, not a crash.
  r.prompt.assign(10, 5);
  r.sampling.max_tokens = 20;
  auto handle = scheduler.Submit(r);
  REQUIRE(handle.ok());
  Outcome outcome = Collect(**handle);
  CHECK(outcome.error.code() == absl::StatusCode::kResourceExhausted);
  // The prefill's token, then one per decode of positions 10..15 (the block's last six); the
  // next decode would need position 16, a second block.
  CHECK(outcome.tokens.size() == 7);
  f.model->SetKvBudget(0);
}

TEST_CASE("a status handed to a stream equals the original and shares none of its memory") {
  absl::Status original = absl::DataLossError("expert 3 of layer 1: checksum mismatch");
  original.SetPayload("moed/test", absl::Cord(std::string(100, 'x')));
  const absl::Status copy = util::Unshared(original);
  CHECK(copy == original);
  CHECK(copy.message().data() != original.message().data());
  CHECK(util::Unshared(absl::OkStatus()).ok());
}

}  // namespace
}  // namespace moed::scheduler
