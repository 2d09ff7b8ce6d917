// The tiered expert cache under the real model: exact results at every budget, policy and
// reader; counters; and failures that name the expert and leave the cache usable.
#include "cache/expert_cache.h"

#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include "cache/fault_injecting_reader.h"
#include "kernels/delayed_copy_backend.h"
#include "kernels/quant.h"
#include "kernels/test_backend.h"
#include "model/generate.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace moed::cache {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  // `layers` > 0 overrides the preset's layer count.
  explicit Fixture(model::Architecture arch, int64_t layers = 0) {
    root = fs::temp_directory_path() / ("moed_cache_test_" + std::to_string(getpid()) + "_" +
                                        std::string(model::ArchitectureShortName(arch)));
    fs::remove_all(root);
    fs::create_directories(root);
    tools::SynthSpec spec = *tools::PresetSpec("tiny", arch);
    if (layers > 0) spec.num_layers = layers;
    REQUIRE(tools::WriteCheckpoint(spec, (root / "m").string()).ok());
    REQUIRE(tools::Pack((root / "m").string(), (root / "s").string(), tools::PackOptions{}).ok());
    auto opened = Store::Open((root / "s").string());
    REQUIRE(opened.ok());
    store = *opened;
    auto model = model::Model::Load((root / "m").string(), kernels::TestCpuBackend(2));
    REQUIRE(model.ok());
    auto result = model::ScoreAndGreedy(**model, kPrompt, 6);
    REQUIRE(result.ok());
    reference = *std::move(result);
  }
  ~Fixture() { fs::remove_all(root); }

  uint64_t AllExpertsBytes(Precision p) const {
    return ExpertCache::SlotBytes(*store, p) * store->config().NumMoeLayers() *
           store->config().num_experts;
  }

  static inline const std::vector<int32_t> kPrompt = {3, 77, 410, 12, 9, 250, 100};
  fs::path root;
  std::shared_ptr<Store> store;
  model::GreedyResult reference;
};

struct Run {
  absl::StatusOr<model::GreedyResult> result;
  CacheCounters counters;
};

Run RunWith(const Fixture& f, const CacheOptions& options, const ReaderFactory& factory = {}) {
  auto cache = ExpertCache::Create(f.store, options, factory);
  INFO(cache.status().ToString());
  REQUIRE(cache.ok());
  ExpertCache* raw = cache->get();
  auto model = model::Model::Create(f.store->config(), f.store, *std::move(cache),
                                    kernels::TestCpuBackend(2));
  REQUIRE(model.ok());
  Run run{model::ScoreAndGreedy(**model, Fixture::kPrompt, 6), {}};
  run.counters = raw->counters();
  return run;
}

TEST_CASE(
    "logits are bitwise those of all-resident execution at every budget, tier, policy and reader") {
  for (auto arch : {model::Architecture::kMixtral, model::Architecture::kQwen3Moe}) {
    Fixture f(arch);
    const uint64_t all = f.AllExpertsBytes(Precision::kSource);
    const uint64_t minimum = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
    for (uint64_t budget : {minimum, all / 4, all / 2, all}) {
      for (uint64_t host : {uint64_t{0}, all / 2}) {
        for (PolicyKind policy :
             {PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kScored, PolicyKind::kSweep}) {
          for (bool io_uring : {true, false}) {
            // Both scopes under LRU; the other policies with the default scope.
            for (EvictionScope scope : {EvictionScope::kLayer, EvictionScope::kGlobal}) {
              if (scope == EvictionScope::kGlobal && policy != PolicyKind::kLru) continue;
              INFO(model::ArchitectureShortName(arch)
                   << " budget " << budget << " host " << host << " policy "
                   << static_cast<int>(policy) << " io_uring " << io_uring << " scope "
                   << static_cast<int>(scope));
              CacheOptions options;
              options.device_bytes = std::max(budget, minimum);
              options.host_bytes = host;
              options.device_policy = options.host_policy = policy;
              options.eviction_scope = scope;
              options.allow_io_uring = io_uring;
              Run run = RunWith(f, options);
              REQUIRE(run.result.ok());
              CHECK(run.result->prompt_logits == f.reference.prompt_logits);
              CHECK(run.result->greedy_logits == f.reference.greedy_logits);
              CHECK(run.result->greedy == f.reference.greedy);
              CHECK(run.counters.failed_reads == 0);
              if (budget == all && host == 0) {
                // Each expert is read at most once when everything fits.
                CHECK(run.counters.ssd_reads <=
                      static_cast<uint64_t>(f.store->config().NumMoeLayers() *
                                            f.store->config().num_experts));
                CHECK(run.counters.device.evictions == 0);
              }
              if (budget == minimum) CHECK(run.counters.device.evictions > 0);
              if (host > 0 && budget == minimum) CHECK(run.counters.host.hits > 0);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("per-layer eviction keeps each layer's share across layer sweeps, one pool thrashes") {
  Fixture f(model::Architecture::kMixtral, 8);
  const model::ModelConfig& config = f.store->config();
  const int layers = static_cast<int>(config.num_layers);
  const int share = static_cast<int>(config.num_experts / 2);
  // Every sweep asks each layer for share + 1 experts: one more than the layer's share, so
  // the sweep's experts exceed the tier (the engine's pattern when a step's sequences
  // together use more experts than fit).
  std::vector<int> wanted;
  for (int e = 0; e <= share; ++e) wanted.push_back(e);
  auto last_sweep_hits = [&](EvictionScope scope) {
    CacheOptions options;
    options.device_bytes = ExpertCache::SlotBytes(*f.store, Precision::kSource) *
                           static_cast<uint64_t>(share * layers);
    options.eviction_scope = scope;
    auto cache = ExpertCache::Create(f.store, options);
    REQUIRE(cache.ok());
    uint64_t before = 0;
    for (int sweep = 0; sweep < 4; ++sweep) {
      before = (*cache)->counters().device.hits;
      for (int layer = 0; layer < layers; ++layer) {
        int computed = 0;
        REQUIRE(
            (*cache)
                ->ForEachExpert(layer, wanted,
                                [&](int, const model::ExpertWeights&, const model::ExpertServed&) {
                                  ++computed;
                                  return absl::OkStatus();
                                })
                .ok());
        CHECK(computed == share + 1);
      }
    }
    return (*cache)->counters().device.hits - before;
  };
  const uint64_t per_layer = last_sweep_hits(EvictionScope::kLayer);
  const uint64_t pooled = last_sweep_hits(EvictionScope::kGlobal);
  CHECK(per_layer == static_cast<uint64_t>(share * layers));
  CHECK(pooled < static_cast<uint64_t>(layers));
}

TEST_CASE("a budget below the minimum is refused with the minimum") {
  Fixture f(model::Architecture::kMixtral);
  CacheOptions options;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource) - 1;
  auto cache = ExpertCache::Create(f.store, options);
  REQUIRE_FALSE(cache.ok());
  CHECK(cache.status().message().find("is below the minimum of " +
                                      std::to_string(ExpertCache::MinimumDeviceBytes(
                                          *f.store, Precision::kSource))) != std::string::npos);
  options.device_bytes = 0;
  options.host_bytes = 100;
  CHECK(ExpertCache::Create(f.store, options).status().message().find("below one expert slot") !=
        std::string::npos);
}

TEST_CASE("quantized precisions run from the cache too") {
  Fixture f(model::Architecture::kMixtral);
  for (Precision p : {Precision::kInt8, Precision::kInt4}) {
    CacheOptions options;
    options.precision = p;
    options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, p);
    Run small = RunWith(f, options);
    options.device_bytes = 0;
    Run all = RunWith(f, options);
    REQUIRE((small.result.ok() && all.result.ok()));
    CHECK(small.result->prompt_logits ==
          all.result->prompt_logits);  // budget never changes results
    CHECK(small.counters.ssd_bytes < 2 * f.AllExpertsBytes(Precision::kSource) * 16);
  }
}

// A cache over `f`'s store whose reads go through a fault injector (set into `*injector`).
std::unique_ptr<ExpertCache> FaultyCache(const Fixture& f, CacheOptions options,
                                         FaultInjectingReader** injector) {
  auto cache = ExpertCache::Create(
      f.store, options, [&](ReadCallback callback) -> absl::StatusOr<std::unique_ptr<BlockReader>> {
        auto reader = FaultInjectingReader::Open(f.store->experts_path(), std::move(callback));
        if (!reader.ok()) return reader.status();
        *injector = reader->get();
        return std::unique_ptr<BlockReader>(*std::move(reader));
      });
  REQUIRE(cache.ok());
  return *std::move(cache);
}

CacheOptions SmallBudget(const Fixture& f) {
  CacheOptions options;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
  options.retry_backoff = std::chrono::microseconds(100);
  return options;
}

// The fixture's model with its experts served by `cache`.
std::shared_ptr<model::Model> ModelOver(const Fixture& f, std::unique_ptr<ExpertCache> cache) {
  auto model = model::Model::Create(f.store->config(), f.store, std::move(cache),
                                    kernels::TestCpuBackend(2));
  REQUIRE(model.ok());
  return *std::move(model);
}

TEST_CASE("read faults that persist fail the step naming the expert and the kind") {
  Fixture f(model::Architecture::kMixtral);
  // An expert the prompt's first token uses in layer 1.
  const int used = f.reference.routing[1][0][0];
  const BlobEntry* victim = f.store->manifest().FindBlob(1, used, Precision::kSource);
  REQUIRE(victim != nullptr);
  for (Fault fault : {Fault::kIoError, Fault::kShortRead, Fault::kCorrupt}) {
    INFO(static_cast<int>(fault));
    FaultInjectingReader* injector = nullptr;
    CacheOptions options = SmallBudget(f);
    std::mutex mutex;
    std::vector<std::pair<StoreFault, bool>> told;
    options.on_read_failure = [&](const StoreFault& fault, absl::string_view, bool will_retry) {
      std::lock_guard lock(mutex);
      told.emplace_back(fault, will_retry);
    };
    std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
    ExpertCache* raw = cache.get();
    injector->Inject(victim->offset, fault, -1);
    auto model = ModelOver(f, std::move(cache));
    auto failed = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE_FALSE(failed.ok());
    // An I/O error may pass (UNAVAILABLE); a file that ends early or bytes that fail their
    // checksum are lost data.
    CHECK(failed.status().code() == (fault == Fault::kIoError ? absl::StatusCode::kUnavailable
                                                              : absl::StatusCode::kDataLoss));
    CHECK(failed.status().message().rfind("layer 1 expert " + std::to_string(used) + " (source): ",
                                          0) == 0);
    CHECK(failed.status().message().find("experts.bin at offset " +
                                         std::to_string(victim->offset)) != std::string::npos);
    const int attempts = fault == Fault::kCorrupt ? 1 : options.max_read_attempts;
    std::optional<StoreFault> carried = StoreFaultOf(failed.status());
    REQUIRE(carried.has_value());
    CHECK(static_cast<int>(carried->kind) == static_cast<int>(fault));
    CHECK(carried->layer == 1);
    CHECK(carried->expert == used);
    CHECK(carried->precision == Precision::kSource);
    CHECK(carried->offset == victim->offset);
    CHECK(carried->attempts == attempts);
    if (fault == Fault::kCorrupt) {
      CHECK(failed.status().message().find("checksum mismatch") != std::string::npos);
    } else {
      CHECK(failed.status().message().find("(4 attempts)") != std::string::npos);
    }
    // Every failed attempt is counted under its kind, and only there; corruption is never
    // retried.
    const CacheCounters counters = raw->counters();
    CHECK(counters.failed_reads == injector->injected(fault));
    CHECK(counters.failed_reads == static_cast<uint64_t>(attempts));
    CHECK(counters.failed_io == (fault == Fault::kIoError ? counters.failed_reads : 0));
    CHECK(counters.failed_short_reads == (fault == Fault::kShortRead ? counters.failed_reads : 0));
    CHECK(counters.failed_checksums == (fault == Fault::kCorrupt ? counters.failed_reads : 0));
    {
      std::lock_guard lock(mutex);
      REQUIRE(told.size() == static_cast<size_t>(attempts));
      for (size_t i = 0; i < told.size(); ++i) {
        CHECK(told[i].first.attempts == static_cast<int>(i) + 1);
        CHECK(told[i].second == (static_cast<int>(i) + 1 < attempts));  // retried but the last
      }
    }
    // One blob's failures do not make the store unreadable.
    CHECK(raw->store_health().readable);
    // Clear the fault: the same cache now serves the same prompt exactly.
    injector->Clear();
    auto healed = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE(healed.ok());
    CHECK(healed->prompt_logits == f.reference.prompt_logits);
    CHECK(healed->greedy == f.reference.greedy);
  }
}

TEST_CASE("I/O errors and short reads that pass are retried: the results stay exact") {
  Fixture f(model::Architecture::kMixtral);
  const int used = f.reference.routing[1][0][0];
  const BlobEntry* victim = f.store->manifest().FindBlob(1, used, Precision::kSource);
  for (Fault fault : {Fault::kIoError, Fault::kShortRead}) {
    FaultInjectingReader* injector = nullptr;
    std::unique_ptr<ExpertCache> cache = FaultyCache(f, SmallBudget(f), &injector);
    ExpertCache* raw = cache.get();
    injector->Inject(victim->offset, fault, 3);  // the fourth attempt succeeds
    auto model = ModelOver(f, std::move(cache));
    auto run = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE(run.ok());
    CHECK(run->prompt_logits == f.reference.prompt_logits);
    CHECK(run->greedy == f.reference.greedy);
    CHECK(raw->counters().failed_reads == 3);
    CHECK(injector->injected(fault) == 3);
  }
  // At random, 5 % of reads each way, over a whole generation at the smallest budget.
  FaultInjectingReader* injector = nullptr;
  std::unique_ptr<ExpertCache> cache = FaultyCache(f, SmallBudget(f), &injector);
  ExpertCache* raw = cache.get();
  injector->InjectAtRandom(0.05, 0.05, 7);
  auto model = ModelOver(f, std::move(cache));
  auto run = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
  REQUIRE(run.ok());
  CHECK(run->prompt_logits == f.reference.prompt_logits);
  CHECK(run->greedy == f.reference.greedy);
  const CacheCounters counters = raw->counters();
  CHECK(counters.failed_io == injector->injected(Fault::kIoError));
  CHECK(counters.failed_short_reads == injector->injected(Fault::kShortRead));
  CHECK(counters.failed_reads > 0);
}

TEST_CASE("failed reads of several blobs in a row make the store unreadable until a probe reads") {
  Fixture f(model::Architecture::kMixtral);
  FaultInjectingReader* injector = nullptr;
  CacheOptions options = SmallBudget(f);
  options.max_read_attempts = 1;
  std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
  ExpertCache* raw = cache.get();
  auto model = ModelOver(f, std::move(cache));
  CHECK(raw->CheckStore().readable);
  // Every read fails: the disk is gone.
  injector->InjectAtRandom(1.0, 0, 1);
  CHECK_FALSE(model::ScoreAndGreedy(*model, Fixture::kPrompt, 1).ok());
  CHECK_FALSE(model::ScoreAndGreedy(*model, {5}, 1).ok());
  CHECK_FALSE(model::ScoreAndGreedy(*model, {9}, 1).ok());
  StoreHealth health = raw->store_health();
  CHECK_FALSE(health.readable);
  CHECK(health.reason.find("different expert blobs") != std::string::npos);
  // The probe reads through the store's own file, which is intact: readable again.
  injector->Clear();
  CHECK(raw->CheckStore().readable);
  auto healed = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
  REQUIRE(healed.ok());
  CHECK(healed->greedy == f.reference.greedy);
}

TEST_CASE(
    "experts.bin truncated or removed makes the store unreadable, restored makes it readable") {
  Fixture f(model::Architecture::kMixtral);
  auto cache = ExpertCache::Create(f.store, SmallBudget(f));
  REQUIRE(cache.ok());
  CHECK((*cache)->CheckStore().readable);
  const fs::path path = f.store->experts_path();
  const uintmax_t size = fs::file_size(path);
  fs::copy_file(path, f.root / "saved.bin");
  fs::resize_file(path, size / 2);
  StoreHealth health = (*cache)->CheckStore();
  CHECK_FALSE(health.readable);
  CHECK(health.reason.find("(truncated)") != std::string::npos);
  CHECK_FALSE((*cache)->store_health().readable);
  // Put back in place (same file): readable again.
  fs::copy_file(f.root / "saved.bin", path, fs::copy_options::overwrite_existing);
  CHECK((*cache)->CheckStore().readable);
  // Removed: cannot be opened.
  fs::rename(path, f.root / "moved.bin");
  health = (*cache)->CheckStore();
  CHECK_FALSE(health.readable);
  CHECK(health.reason.find("cannot open") != std::string::npos);
  fs::rename(f.root / "moved.bin", path);
  CHECK((*cache)->CheckStore().readable);
}

// Each expert of `experts` of `layer` through the cache, computing nothing; what the prefetch
// did for each use, in the order computed.
std::vector<model::PrefetchOutcome> Use(ExpertCache& cache, int layer,
                                        const std::vector<int>& experts) {
  std::vector<model::PrefetchOutcome> outcomes;
  absl::Status status = cache.ForEachExpert(
      layer, experts, [&](int, const model::ExpertWeights&, const model::ExpertServed& served) {
        outcomes.push_back(served.prefetch);
        return absl::OkStatus();
      });
  REQUIRE(status.ok());
  return outcomes;
}

void WaitFor(const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!done()) {
    REQUIRE(std::chrono::steady_clock::now() < deadline);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

TEST_CASE("every prefetch ends useful, late, wasted or failed, or is still pending") {
  Fixture f(model::Architecture::kMixtral);
  FaultInjectingReader* injector = nullptr;
  CacheOptions options = SmallBudget(f);
  options.device_bytes = 3 * ExpertCache::SlotBytes(*f.store, Precision::kSource);
  options.prefetch_slots = 1;  // two slots for uses, one for prefetches to land in
  options.eviction_scope = EvictionScope::kGlobal;
  std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
  ExpertCache& c = *cache;
  auto offset = [&](int layer, int expert) {
    return f.store->manifest().FindBlob(layer, expert, Precision::kSource)->offset;
  };
  auto resident = [&](int layer, int expert) -> bool { return c.DeviceResidency()[layer][expert]; };
  using model::PrefetchOutcome;

  // Useful: resident before the use.
  c.Prefetch({{1, 0, 0.9}});
  WaitFor([&] { return resident(1, 0); });
  CHECK(Use(c, 1, {0}) == std::vector{PrefetchOutcome::kUseful});

  // Late: the use arrives while the read is held back, and waits for it.
  injector->Hold(offset(1, 1));
  c.Prefetch({{1, 1, 0.9}});
  const uint64_t misses = c.counters().device.misses;
  std::thread release([&] {
    WaitFor([&] { return c.counters().device.misses > misses; });  // the use is waiting
    injector->ReleaseHeld();
  });
  CHECK(Use(c, 1, {1}) == std::vector{PrefetchOutcome::kLate});
  release.join();
  CHECK(c.counters().prefetch_wait_seconds > 0);

  // Wasted: it lands (in the landing slot: the two others are taken), and its layer comes
  // without needing it.
  c.Prefetch({{0, 5, 0.9}});
  WaitFor([&] { return resident(0, 5); });
  CHECK(resident(1, 0));  // a prefetch evicts nothing
  CHECK(resident(1, 1));
  CHECK(Use(c, 0, {2}) == std::vector{PrefetchOutcome::kNone});
  CHECK_FALSE(resident(0, 5));

  // Failed: the read comes back corrupt; nothing waits for it.
  injector->Inject(offset(0, 6), Fault::kCorrupt, 1);
  c.Prefetch({{0, 6, 0.9}});
  WaitFor([&] { return c.counters().prefetch_failures == 1; });

  // Pending: resident, not used yet.
  c.Prefetch({{0, 7, 0.9}});
  WaitFor([&] { return resident(0, 7); });

  const CacheCounters counters = c.counters();
  CHECK(counters.prefetch_issued == 5);
  CHECK(counters.prefetch_useful == 1);
  CHECK(counters.prefetch_late == 1);
  CHECK(counters.prefetch_wasted == 1);
  CHECK(counters.prefetch_failures == 1);
  CHECK(counters.prefetch_pending == 1);
  CHECK(counters.prefetch_issued == counters.prefetch_useful + counters.prefetch_late +
                                        counters.prefetch_wasted + counters.prefetch_failures +
                                        counters.prefetch_pending);
  CHECK(counters.failed_checksums == 1);
}

TEST_CASE(
    "a prefetch never evicts: it waits for a free or landing slot, newer hints replace "
    "queued ones, and a used prefetch joins its layer, which gives a slot back") {
  Fixture f(model::Architecture::kMixtral);
  FaultInjectingReader* injector = nullptr;
  CacheOptions options;
  options.device_bytes = 3 * ExpertCache::SlotBytes(*f.store, Precision::kSource);
  options.prefetch_slots = 1;
  options.eviction_scope = EvictionScope::kGlobal;
  std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
  ExpertCache& c = *cache;
  auto resident = [&](int layer, int expert) -> bool { return c.DeviceResidency()[layer][expert]; };

  Use(c, 0, {1, 2});  // both slots for uses taken
  injector->Hold(f.store->manifest().FindBlob(1, 4, Precision::kSource)->offset);
  c.Prefetch({{1, 4, 0.9}, {1, 5, 0.8}});
  CHECK(c.counters().prefetch_issued == 1);  // (1,4) in the landing slot; (1,5) waits
  c.Prefetch({{0, 3, 0.5}});                 // (1,5) is superseded
  CHECK(c.counters().prefetch_cancelled == 1);
  injector->ReleaseHeld();
  WaitFor([&] { return resident(1, 4); });
  CHECK(c.counters().prefetch_issued == 1);  // (0,3) still waits: no slot to land in
  CHECK(resident(0, 1));
  CHECK(resident(0, 2));
  CHECK(c.counters().device.evictions == 0);

  // Used: (1,4) joins layer 1, and layer 0 (now over its share) gives up a slot for landing.
  CHECK(Use(c, 1, {4}) == std::vector{model::PrefetchOutcome::kUseful});
  CHECK(resident(1, 4));
  CHECK((resident(0, 1) != resident(0, 2)));
  CHECK(c.counters().device.evictions == 1);
  // The use's (empty) hints replaced the queue: (0,3) never started.
  CHECK(c.counters().prefetch_cancelled == 2);
  CHECK(c.counters().prefetch_issued == 1);
}

TEST_CASE("a prefetch that fails fails no request, one that succeeds saves the read") {
  Fixture f(model::Architecture::kMixtral);
  const int used = f.reference.routing[1][0][0];
  const BlobEntry* blob = f.store->manifest().FindBlob(1, used, Precision::kSource);
  auto wait_for = [](const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!done()) {
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  };
  SECTION("corrupt: counted, the slot freed, the use reads it again") {
    FaultInjectingReader* injector = nullptr;
    std::unique_ptr<ExpertCache> cache = FaultyCache(f, SmallBudget(f), &injector);
    ExpertCache* raw = cache.get();
    injector->Inject(blob->offset, Fault::kCorrupt, 1);
    raw->Prefetch({{1, used, 1.0}});
    wait_for([&] { return raw->counters().prefetch_failures == 1; });
    CHECK(raw->counters().failed_checksums == 1);
    CHECK_FALSE(raw->DeviceResidency()[1][used]);
    auto model = ModelOver(f, std::move(cache));
    auto run = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE(run.ok());
    CHECK(run->prompt_logits == f.reference.prompt_logits);
    CHECK(run->greedy == f.reference.greedy);
  }
  SECTION("I/O errors through every attempt while a use waits: the use reads it itself") {
    FaultInjectingReader* injector = nullptr;
    CacheOptions options = SmallBudget(f);
    options.retry_backoff = std::chrono::milliseconds(20);  // the use arrives meanwhile
    std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
    ExpertCache* raw = cache.get();
    injector->Inject(blob->offset, Fault::kIoError, options.max_read_attempts);
    raw->Prefetch({{1, used, 1.0}});
    auto model = ModelOver(f, std::move(cache));
    auto run = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE(run.ok());
    CHECK(run->prompt_logits == f.reference.prompt_logits);
    CHECK(raw->counters().prefetch_failures == 1);
    CHECK(raw->counters().failed_io == static_cast<uint64_t>(options.max_read_attempts));
  }
  SECTION("success: resident before its use, read once") {
    CacheOptions options;  // room for every expert: each is read at most once
    auto made = ExpertCache::Create(f.store, options);
    REQUIRE(made.ok());
    ExpertCache* raw = made->get();
    raw->Prefetch({{1, used, 1.0}});
    wait_for([&]() -> bool { return raw->DeviceResidency()[1][used]; });
    CHECK(raw->counters().prefetch_reads == 1);
    auto model = ModelOver(f, *std::move(made));
    auto run = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
    REQUIRE(run.ok());
    CHECK(run->prompt_logits == f.reference.prompt_logits);
    std::set<std::pair<int, int>> distinct;
    for (size_t layer = 0; layer < run->routing.size(); ++layer) {
      for (const auto& chosen : run->routing[layer]) {
        for (int e : chosen) distinct.emplace(static_cast<int>(layer), e);
      }
    }
    CHECK(raw->counters().ssd_reads == distinct.size());
  }
}

TEST_CASE("a corrupted store file fails only the steps that need the damaged expert") {
  Fixture f(model::Architecture::kMixtral);
  const BlobEntry* victim = f.store->manifest().FindBlob(0, 6, Precision::kSource);
  {
    std::fstream file(f.store->experts_path(), std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(static_cast<std::streamoff>(victim->offset + 4000));
    file.put('\x7F');
  }
  CacheOptions options;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
  auto cache = ExpertCache::Create(f.store, options);
  REQUIRE(cache.ok());
  auto model = model::Model::Create(f.store->config(), f.store, *std::move(cache),
                                    kernels::TestCpuBackend(2));
  REQUIRE(model.ok());
  // Find one token routed to layer 0 expert 6 and one that avoids it.
  int needs = -1, avoids = -1;
  auto reference = model::Model::Load((f.root / "m").string(), kernels::TestCpuBackend(1));
  REQUIRE(reference.ok());
  for (int token = 0; token < 512 && (needs < 0 || avoids < 0); ++token) {
    auto r = model::ScoreAndGreedy(**reference, {token}, 0);
    REQUIRE(r.ok());
    const auto& chosen = r->routing[0][0];
    bool uses = std::find(chosen.begin(), chosen.end(), 6) != chosen.end();
    if (uses && needs < 0) needs = token;
    if (!uses && avoids < 0) avoids = token;
  }
  REQUIRE((needs >= 0 && avoids >= 0));
  auto bad = model::ScoreAndGreedy(**model, {needs}, 0);
  CHECK(bad.status().message().rfind("layer 0 expert 6 (source): checksum mismatch", 0) == 0);
  // A request that does not touch the damaged expert (only layer 0's expert 6 is damaged) is
  // served, bitwise as from the intact checkpoint.
  auto good = model::ScoreAndGreedy(**model, {avoids}, 0);
  REQUIRE(good.ok());
  auto expected = model::ScoreAndGreedy(**reference, {avoids}, 0);
  REQUIRE(expected.ok());
  CHECK(good->prompt_logits == expected->prompt_logits);
}

// What one ForEachExpert call handed over, per expert.
struct Served {
  model::ExpertServed how;
  kernels::Quantization quantization = kernels::Quantization::kNone;
};

std::map<int, Served> Serve(ExpertCache& cache, int layer, const std::vector<int>& experts,
                            const std::vector<bool>& may_fall_back) {
  std::map<int, Served> out;
  std::vector<ExpertUse> uses(may_fall_back.size());
  for (size_t i = 0; i < uses.size(); ++i) uses[i].may_fall_back = may_fall_back[i];
  absl::Status status = cache.ForEachExpert(
      layer, experts,
      [&](int e, const model::ExpertWeights& weights, const model::ExpertServed& how) {
        out[e] = {how, weights.gate.quantization};
        return absl::OkStatus();
      },
      {}, uses);
  REQUIRE(status.ok());
  return out;
}

CacheOptions AlwaysInt4(const Fixture& f, bool floor) {
  CacheOptions options;
  options.precision_policy.kind = PrecisionPolicyKind::kAlways;
  options.precision_policy.fallback = Precision::kInt4;
  options.precision_policy.low_bit_floor = floor;
  // A quarter of the full copies' bytes.
  options.device_bytes = f.AllExpertsBytes(Precision::kSource) / 4;
  return options;
}

TEST_CASE(
    "a missing expert runs from its fallback copy only when allowed and its full copy is "
    "not resident") {
  Fixture f(model::Architecture::kMixtral);
  FaultInjectingReader* injector = nullptr;
  std::unique_ptr<ExpertCache> made = FaultyCache(f, AlwaysInt4(f, false), &injector);
  ExpertCache& cache = *made;
  REQUIRE(cache.counters().fallback.slots > 0);
  // Expert 0's full copy, read in the background once expert 0 has run from int4 (an
  // upgrade), is held on its way until released.
  injector->Hold(f.store->manifest().FindBlob(0, 0, Precision::kSource)->offset);
  // Expert 0 may fall back: its int4 copy is read. Expert 1 may not: its full copy is read.
  auto first = Serve(cache, 0, {0, 1}, {true, false});
  CHECK(first[0].how.fallback);
  CHECK(first[0].how.precision == Precision::kInt4);
  CHECK(first[0].quantization == kernels::Quantization::kInt4Grouped);
  CHECK(first[0].how.source == model::ExpertSource::kDisk);
  CHECK(first[0].how.bytes_staged == ExpertCache::SlotBytes(*f.store, Precision::kInt4));
  CHECK_FALSE(first[1].how.fallback);
  CHECK(first[1].how.precision == Precision::kSource);
  CHECK(first[1].quantization == kernels::Quantization::kNone);
  // Expert 1's full copy is resident: it serves even a use that may fall back. Expert 0's
  // full copy is still on its way: its resident int4 copy serves, a hit in the fallback pool.
  auto second = Serve(cache, 0, {0, 1}, {true, true});
  CHECK(second[0].how.fallback);
  CHECK(second[0].how.source == model::ExpertSource::kDevice);
  CHECK_FALSE(second[1].how.fallback);
  CHECK(second[1].how.source == model::ExpertSource::kDevice);
  // The upgrade arrives: from now on the full copy serves expert 0, whether or not it may fall
  // back.
  injector->ReleaseHeld();
  WaitFor([&]() -> bool { return cache.DeviceResidency()[0][0]; });
  auto third = Serve(cache, 0, {0}, {true});
  CHECK_FALSE(third[0].how.fallback);
  CHECK(third[0].how.source == model::ExpertSource::kDevice);
  const CacheCounters c = cache.counters();
  CHECK(c.fallbacks_int4 == 2);
  CHECK(c.fallbacks_int8 == 0);
  CHECK(c.fallback.misses == 1);
  CHECK(c.fallback.hits == 1);
  CHECK(c.upgrade_reads == 1);
  CHECK(c.ssd_reads == 3);
  CHECK(c.ssd_bytes == ExpertCache::SlotBytes(*f.store, Precision::kInt4) +
                           2 * ExpertCache::SlotBytes(*f.store, Precision::kSource));
}

TEST_CASE("exact requests stay bitwise exact under a policy that falls back") {
  Fixture f(model::Architecture::kMixtral);
  auto made = ExpertCache::Create(f.store, AlwaysInt4(f, false));
  REQUIRE(made.ok());
  ExpertCache* raw = made->get();
  auto model = ModelOver(f, *std::move(made));
  // Through the model: exact runs never fall back; a run that accepts int4 does.
  auto exact = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
  REQUIRE(exact.ok());
  CHECK(exact->prompt_logits == f.reference.prompt_logits);
  CHECK(exact->greedy == f.reference.greedy);
  CHECK(exact->fallbacks == 0);
  auto loose = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6, Precision::kInt4);
  REQUIRE(loose.ok());
  CHECK(loose->fallbacks > 0);
  CHECK(raw->counters().fallbacks_int4 == loose->fallbacks);
  CHECK(loose->prompt_logits != f.reference.prompt_logits);
  auto exact_again = model::ScoreAndGreedy(*model, Fixture::kPrompt, 6);
  REQUIRE(exact_again.ok());
  CHECK(exact_again->prompt_logits == f.reference.prompt_logits);
  CHECK(exact_again->greedy_logits == f.reference.greedy_logits);
}

TEST_CASE("the low-bit floor reads every fallback copy while the disk is idle, then upgrades") {
  Fixture f(model::Architecture::kMixtral);
  CacheOptions options = AlwaysInt4(f, true);
  options.device_bytes = f.AllExpertsBytes(Precision::kSource) / 2;
  auto made = ExpertCache::Create(f.store, options);
  REQUIRE(made.ok());
  ExpertCache& cache = **made;
  const uint64_t experts =
      static_cast<uint64_t>(f.store->config().NumMoeLayers() * f.store->config().num_experts);
  REQUIRE(cache.counters().fallback.slots == experts);
  cache.Prefetch({});  // the disk is idle: the floor starts filling
  WaitFor([&] { return cache.counters().fallback.resident == experts; });
  CHECK(cache.counters().floor_reads == experts);
  // A miss now never waits for the disk: it runs from the floor ...
  auto served = Serve(cache, 1, {3}, {true});
  CHECK(served[3].how.fallback);
  CHECK(served[3].how.source == model::ExpertSource::kDevice);
  CHECK(served[3].how.wait_seconds == 0);
  // ... and its full copy is read in the background.
  WaitFor([&]() -> bool { return cache.DeviceResidency()[1][3]; });
  CHECK(cache.counters().upgrade_reads == 1);
  auto upgraded = Serve(cache, 1, {3}, {true});
  CHECK_FALSE(upgraded[3].how.fallback);
  CHECK(cache.counters().floor_reads == experts);  // nothing read twice
}

TEST_CASE("a floor read that fails fails nothing: the copy is read again when a use needs it") {
  Fixture f(model::Architecture::kMixtral);
  FaultInjectingReader* injector = nullptr;
  CacheOptions options = AlwaysInt4(f, true);
  options.device_bytes = f.AllExpertsBytes(Precision::kSource) / 2;
  std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
  const BlobEntry* blob = f.store->manifest().FindBlob(0, 2, Precision::kInt4);
  injector->Inject(blob->offset, Fault::kCorrupt, 1);
  const uint64_t experts =
      static_cast<uint64_t>(f.store->config().NumMoeLayers() * f.store->config().num_experts);
  cache->Prefetch({});
  WaitFor([&] { return cache->counters().floor_reads == experts; });
  WaitFor([&] { return cache->counters().failed_checksums == 1; });
  // The last floor reads may still be on their way: every copy but the damaged one arrives.
  WaitFor([&] { return cache->counters().fallback.resident == experts - 1; });
  auto served = Serve(*cache, 0, {2}, {true});
  CHECK(served[2].how.fallback);
  CHECK(served[2].how.source == model::ExpertSource::kDisk);
}

TEST_CASE("Acquire hands out pinned, future-like handles keyed by precision") {
  Fixture f(model::Architecture::kMixtral);
  SECTION("a miss becomes ready, a second claim is a hit on the same bytes, in place") {
    auto made = ExpertCache::Create(f.store, CacheOptions{});
    REQUIRE(made.ok());
    ExpertCache& cache = **made;
    auto first = cache.Acquire(1, 5, Precision::kSource);
    REQUIRE(first.ok());
    REQUIRE(first->Wait().ok());
    CHECK(first->ready());
    CHECK(first->served().source == model::ExpertSource::kDisk);
    auto second = cache.Acquire(1, 5, Precision::kSource);
    REQUIRE(second.ok());
    CHECK(second->ready());
    CHECK(second->served().source == model::ExpertSource::kDevice);
    CHECK(second->weights().gate.data == first->weights().gate.data);
    CHECK(second->weights().gate.quantization == kernels::Quantization::kNone);
    CHECK(cache.counters().ssd_reads == 1);
  }
  SECTION("copies of another precision need its pool") {
    auto exact = ExpertCache::Create(f.store, CacheOptions{});
    REQUIRE(exact.ok());
    auto refused = (*exact)->Acquire(0, 1, Precision::kInt4);
    REQUIRE_FALSE(refused.ok());
    CHECK(refused.status().message().find("no int4 copies") != std::string::npos);
    CHECK_FALSE((*exact)->Acquire(0, 99, Precision::kSource).ok());  // no such expert
    auto mixed = ExpertCache::Create(f.store, AlwaysInt4(f, false));
    REQUIRE(mixed.ok());
    auto low = (*mixed)->Acquire(0, 1, Precision::kInt4);
    auto full = (*mixed)->Acquire(0, 1, Precision::kSource);
    REQUIRE((low.ok() && full.ok()));
    REQUIRE((low->Wait().ok() && full->Wait().ok()));
    // Both copies of one expert resident at once.
    CHECK(low->weights().gate.quantization == kernels::Quantization::kInt4Grouped);
    CHECK(full->weights().gate.quantization == kernels::Quantization::kNone);
  }
  SECTION("a held copy is never evicted; a claim with no free slot waits for a release") {
    CacheOptions options;
    options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
    // Two slots in one pool (with per-layer shares, layer 0's one slot would be the held one).
    options.eviction_scope = EvictionScope::kGlobal;
    auto made = ExpertCache::Create(f.store, options);
    REQUIRE(made.ok());
    ExpertCache& cache = **made;
    auto held = cache.Acquire(0, 0, Precision::kSource);
    REQUIRE((held.ok() && held->Wait().ok()));
    const void* held_bytes = held->weights().gate.data;
    for (int e = 1; e < 5; ++e) {  // each takes the one other slot, evicting the last
      auto other = cache.Acquire(0, e, Precision::kSource);
      REQUIRE((other.ok() && other->Wait().ok()));
    }
    CHECK(held->ready());
    CHECK(held->weights().gate.data == held_bytes);
    CHECK(cache.DeviceResidency()[0][0]);
    auto second = cache.Acquire(0, 6, Precision::kSource);
    REQUIRE((second.ok() && second->Wait().ok()));
    auto third = cache.Acquire(0, 7, Precision::kSource);  // both slots pinned
    REQUIRE(third.ok());
    CHECK_FALSE(third->ready());
    std::thread releaser([&] {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      held->Release();
    });
    CHECK(third->Wait().ok());
    releaser.join();
    CHECK(third->ready());
    CHECK_FALSE(cache.DeviceResidency()[0][0]);  // its slot went to the waiting claim
  }
  SECTION("a failed read fails the handle's Wait, naming the expert, and the cache goes on") {
    FaultInjectingReader* injector = nullptr;
    std::unique_ptr<ExpertCache> cache = FaultyCache(f, SmallBudget(f), &injector);
    const BlobEntry* blob = f.store->manifest().FindBlob(1, 2, Precision::kSource);
    injector->Inject(blob->offset, Fault::kCorrupt, 1);
    auto handle = cache->Acquire(1, 2, Precision::kSource);
    REQUIRE(handle.ok());
    absl::Status waited = handle->Wait();
    CHECK(waited.code() == absl::StatusCode::kDataLoss);
    CHECK(waited.message().find("expert 2") != std::string::npos);
    handle->Release();
    auto again = cache->Acquire(1, 2, Precision::kSource);  // the fault was injected once
    REQUIRE(again.ok());
    CHECK(again->Wait().ok());
  }
}

// ---- The device tier in memory the host cannot read (a GPU), on the delayed-copy stand-in ----

std::shared_ptr<kernels::DelayedCopyBackend> DelayedBackend(std::chrono::microseconds delay) {
  return std::make_shared<kernels::DelayedCopyBackend>(kernels::TestCpuBackend(2),
                                                       kernels::DelayedCopyOptions{delay});
}

// The devices whose memory the host cannot read: the delayed-copy stand-in always, and the
// CUDA device where there is one (the GPU check runs this test there).
std::vector<std::shared_ptr<kernels::Backend>> DevicesWithOwnMemory() {
  std::vector<std::shared_ptr<kernels::Backend>> devices = {
      DelayedBackend(std::chrono::microseconds(100))};
  if (!kernels::DiscoverDevices().cuda_devices.empty()) {
    auto cuda = kernels::CreateBackend(kernels::BackendKind::kCuda);
    REQUIRE(cuda.ok());
    devices.push_back(std::move(cuda->backend));
  }
  return devices;
}

TEST_CASE("overlap: on a device that cannot read host memory, exact mode is bitwise all-resident") {
  for (auto arch : {model::Architecture::kMixtral, model::Architecture::kDeepseekV2}) {
    Fixture f(arch);
    const uint64_t all = f.AllExpertsBytes(Precision::kSource);
    const uint64_t minimum = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
    for (const std::shared_ptr<kernels::Backend>& backend : DevicesWithOwnMemory()) {
      auto decode = [&](uint64_t budget, uint64_t host, int staging, bool prefetch) {
        CacheOptions options;
        options.device_bytes = std::max(budget, minimum);
        options.host_bytes = host;
        options.backend = backend;
        options.staging_buffers = staging;
        options.prefetch_slots = prefetch ? 1 : 0;
        auto cache = ExpertCache::Create(f.store, options);
        INFO(cache.status().ToString());
        REQUIRE(cache.ok());
        std::shared_ptr<ExpertCache> shared = *std::move(cache);
        std::shared_ptr<Prefetcher> prefetcher;
        if (prefetch) {
          PrefetcherOptions prefetch_options;
          prefetch_options.kind = PredictorKind::kGate;
          auto made =
              Prefetcher::Create(prefetch_options, static_cast<int>(f.store->config().num_layers),
                                 static_cast<int>(f.store->config().num_experts), nullptr);
          REQUIRE(made.ok());
          prefetcher = *std::move(made);
        }
        absl::StatusOr<model::GreedyResult> result;
        {
          auto model = model::Model::Create(f.store->config(), f.store,
                                            SharedProvider(shared, prefetcher), backend);
          REQUIRE(model.ok());
          result = model::ScoreAndGreedy(**model, Fixture::kPrompt, 6);
        }
        REQUIRE(result.ok());
        return std::make_pair(*std::move(result), shared->counters());
      };
      // All-resident on this device is the reference; on the stand-in it is the CPU's too.
      const model::GreedyResult resident = decode(all, 0, 8, false).first;
      if (backend->name() == "delayed-copy") {
        CHECK(resident.prompt_logits == f.reference.prompt_logits);
        CHECK(resident.greedy_logits == f.reference.greedy_logits);
      }
      for (uint64_t budget : {minimum, all / 4, all / 2}) {
        for (uint64_t host : {uint64_t{0}, all / 2}) {
          for (int staging : {1, 8}) {
            for (bool prefetch : {false, true}) {
              INFO(backend->name()
                   << " " << model::ArchitectureShortName(arch) << " budget " << budget << " host "
                   << host << " staging " << staging << " prefetch " << prefetch);
              auto [result, counters] = decode(budget, host, staging, prefetch);
              CHECK(result.prompt_logits == resident.prompt_logits);
              CHECK(result.greedy_logits == resident.greedy_logits);
              CHECK(result.greedy == resident.greedy);
              CHECK(counters.failed_reads == 0);
              CHECK(counters.device.evictions > 0);  // below all-resident, experts came and went
              if (host > 0 && budget == minimum) CHECK(counters.host.hits > 0);
            }
          }
        }
      }
    }
  }
}

// The first row of an expert's gate matrix, as the store holds it.
std::vector<float> GateRowInStore(const Store& store, int layer, int expert, int64_t width) {
  const BlobEntry* blob = store.manifest().FindBlob(layer, expert, Precision::kSource);
  auto buffer =
      AlignedBuffer::Allocate(store.manifest().layouts.at(Precision::kSource).padded_size);
  REQUIRE(buffer.ok());
  REQUIRE(store.ReadBlob(*blob, buffer->data()).ok());
  const model::ExpertWeights weights =
      ExpertWeightsInBlob(store.manifest().layouts.at(Precision::kSource), buffer->data());
  std::vector<float> row(static_cast<size_t>(width));
  kernels::WidenToF32(weights.gate.dtype, weights.gate.data, width, row.data());
  return row;
}

// Reads the first gate row of the expert a handle (or a use) holds into `out`, on the compute
// stream, after waiting for its copy: what an expert FFN does with its weights.
struct GateReader {
  GateReader(kernels::Backend& backend, int64_t width) : backend(backend), width(width) {
    rows = *backend.device().Allocate(sizeof(int32_t));
    const int32_t zero = 0;
    REQUIRE(backend.compute().CopyToDevice(rows, 0, &zero, sizeof(zero)).ok());
  }
  // Queues the read into a fresh device buffer; returns its index.
  size_t Read(const model::ExpertWeights& weights, const kernels::Event& ready) {
    outputs.push_back(*backend.device().Allocate(static_cast<size_t>(width) * sizeof(float)));
    widened.push_back(*backend.device().Allocate(static_cast<size_t>(width) * sizeof(float)));
    kernels::Stream& s = backend.compute();
    REQUIRE(s.Wait(ready).ok());
    // The gate row widened to fp32 (an embedding of row 0 reads it as the FFN would).
    kernels::WeightMatrix gate = weights.gate;
    REQUIRE(s.Embed(gate, rows.as<int32_t>(), 1, widened.back().as<float>()).ok());
    REQUIRE(s.GatherRows(widened.back().as<float>(), width, rows.as<int32_t>(), 1,
                         outputs.back().as<float>())
                .ok());
    return outputs.size() - 1;
  }
  std::vector<float> Result(size_t i) {
    std::vector<float> row(static_cast<size_t>(width));
    REQUIRE(
        backend.compute().CopyToHost(row.data(), outputs[i], 0, row.size() * sizeof(float)).ok());
    return row;
  }
  kernels::Backend& backend;
  int64_t width;
  kernels::DeviceBuffer rows;
  std::vector<kernels::DeviceBuffer> outputs, widened;
};

TEST_CASE("overlap: compute waits only for the experts it needs, and reads them after the copy") {
  Fixture f(model::Architecture::kMixtral);
  auto backend = DelayedBackend(std::chrono::microseconds(0));
  CacheOptions options;
  options.backend = backend;
  auto made = ExpertCache::Create(f.store, options);
  REQUIRE(made.ok());
  ExpertCache& cache = **made;
  const int64_t width = f.store->config().hidden_size;
  GateReader reader(*backend, width);
  {  // Expert 0 of layer 0 is resident, its copy done.
    auto warm = cache.Acquire(0, 0, Precision::kSource);
    REQUIRE((warm.ok() && warm->Wait().ok()));
    REQUIRE(backend->device().WaitForEvent(warm->ready_event()).ok());
  }
  backend->HoldCopies();
  std::vector<kernels::Event> computed(2);
  std::vector<size_t> output(2);
  REQUIRE(cache
              .ForEachExpert(0, {0, 1},
                             [&](int e, const model::ExpertWeights& w,
                                 const model::ExpertServed& served) -> absl::Status {
                               output[e] = reader.Read(w, served.ready);
                               computed[e] = *backend->compute().Record();
                               return absl::OkStatus();
                             })
              .ok());
  // Both were handed over while expert 1's copy is held: the engine thread never waited for it.
  CHECK(backend->copies_pending() == 1);
  // Expert 0 computes; expert 1's reads wait on the device for its copy.
  REQUIRE(backend->device().WaitForEvent(computed[0]).ok());
  CHECK(backend->copies_pending() == 1);
  std::vector<std::string> log = backend->Log();
  CHECK(std::count(log.begin(), log.end(), "gather_rows") == 1);
  backend->ReleaseCopies();
  REQUIRE(backend->device().WaitForEvent(computed[1]).ok());
  log = backend->Log();
  CHECK(std::count(log.begin(), log.end(), "gather_rows") == 2);
  CHECK(reader.Result(output[0]) == GateRowInStore(*f.store, 0, 0, width));
  CHECK(reader.Result(output[1]) == GateRowInStore(*f.store, 0, 1, width));
}

TEST_CASE("overlap: a slot is refilled only after the compute stream's last read of it") {
  Fixture f(model::Architecture::kMixtral);
  // A slow compute stream: a copy that did not wait for the read would overtake it.
  kernels::DelayedCopyOptions slow_compute;
  slow_compute.op_delay = std::chrono::milliseconds(5);
  auto backend =
      std::make_shared<kernels::DelayedCopyBackend>(kernels::TestCpuBackend(2), slow_compute);
  CacheOptions options;
  options.backend = backend;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
  options.eviction_scope = EvictionScope::kGlobal;  // two slots, one pool
  auto made = ExpertCache::Create(f.store, options);
  REQUIRE(made.ok());
  ExpertCache& cache = **made;
  const int64_t width = f.store->config().hidden_size;
  GateReader reader(*backend, width);
  // Nothing is copied until every copy is queued: the read of expert 0 is still waiting for
  // its copy when expert 2 is to take its slot.
  backend->HoldCopies();
  size_t first = 0;
  for (int e : {0, 1, 2}) {
    auto handle = cache.Acquire(0, e, Precision::kSource);
    REQUIRE((handle.ok() && handle->Wait().ok()));
    const size_t out = reader.Read(handle->weights(), handle->ready_event());
    if (e == 0) first = out;
  }
  CHECK(backend->copies_pending() == 3);
  CHECK_FALSE(cache.DeviceResidency()[0][0]);  // evicted: expert 2 has its slot
  backend->ReleaseCopies();
  CHECK(reader.Result(first) == GateRowInStore(*f.store, 0, 0, width));
  const std::vector<std::string> log = backend->Log();
  // Expert 2's copy (the third) came after expert 0's read.
  std::vector<std::string> order;
  for (const std::string& entry : log) {
    if (entry == "gather_rows" || entry.rfind("copy ", 0) == 0) order.push_back(entry);
  }
  REQUIRE(order.size() >= 4);
  const auto first_read = std::find(order.begin(), order.end(), "gather_rows");
  int copies = 0;
  auto third_copy = order.begin();
  for (; third_copy != order.end(); ++third_copy) {
    if (third_copy->rfind("copy ", 0) == 0 && ++copies == 3) break;
  }
  REQUIRE(third_copy != order.end());
  CHECK(first_read < third_copy);
}

TEST_CASE("overlap: the host-compute estimate is the queued copy's time against the CPU's") {
  HostComputeOptions options;
  options.enabled = true;
  options.copy_bytes_per_second = 1000;
  options.host_seconds_per_expert = 0.5;
  options.host_seconds_per_token = 0.25;
  // 400 bytes behind 600 queued: a second; 1 token: 0.75 s, 2 tokens: 1 s (not faster).
  HostComputeEstimate estimate = EstimateHostCompute(options, 400, 600, 1);
  CHECK(estimate.copy_seconds == 1.0);
  CHECK(estimate.host_seconds == 0.75);
  CHECK(estimate.host_is_faster());
  estimate = EstimateHostCompute(options, 400, 600, 2);
  CHECK(estimate.host_seconds == 1.0);
  CHECK_FALSE(estimate.host_is_faster());
  CHECK_FALSE(EstimateHostCompute(options, 400, 0, 1).host_is_faster());  // 0.4 s to copy
  CHECK(ValidateHostCompute(options).ok());
  options.copy_bytes_per_second = 0;
  CHECK(ValidateHostCompute(options).code() == absl::StatusCode::kInvalidArgument);
  options.copy_bytes_per_second = 1;
  options.host_seconds_per_token = -1;
  CHECK_FALSE(ValidateHostCompute(options).ok());
}

TEST_CASE("overlap: an expert runs on the CPU exactly when its estimate beats the copy's") {
  Fixture f(model::Architecture::kMixtral);
  const uint64_t slot = ExpertCache::SlotBytes(*f.store, Precision::kSource);
  auto backend = DelayedBackend(std::chrono::microseconds(0));
  CacheOptions options;
  options.backend = backend;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
  options.eviction_scope = EvictionScope::kGlobal;
  options.host_bytes = f.AllExpertsBytes(Precision::kSource);
  // A copy takes a second per expert; the CPU takes 1.5 s for any expert.
  options.host_compute.enabled = true;
  options.host_compute.copy_bytes_per_second = static_cast<double>(slot);
  options.host_compute.host_seconds_per_expert = 1.5;
  SECTION("with inexact tokens, or a host that computes bitwise as the device does") {
    const bool bitwise = GENERATE(false, true);
    options.host_compute.bitwise_equal = bitwise;
    auto made = ExpertCache::Create(f.store, options);
    REQUIRE(made.ok());
    ExpertCache& cache = **made;
    // Experts 0-5 of layer 0 pass through: all in the host tier, the last two on the device.
    for (int e = 0; e < 6; ++e) {
      auto handle = cache.Acquire(0, e, Precision::kSource);
      REQUIRE((handle.ok() && handle->Wait().ok()));
      REQUIRE(backend->device().WaitForEvent(handle->ready_event()).ok());
    }
    REQUIRE(cache.DeviceResidency()[0][5]);
    REQUIRE_FALSE(cache.DeviceResidency()[0][0]);
    WaitFor([&] { return cache.counters().copy_bytes_queued == 0; });
    auto serve = [&](int expert, bool inexact) {
      model::ExpertServed served;
      ExpertUse use{false, 1, inexact};
      REQUIRE(
          cache
              .ForEachExpert(0, {expert},
                             [&](int, const model::ExpertWeights&, const model::ExpertServed& how) {
                               served = how;
                               return absl::OkStatus();
                             },
                             {}, {use})
              .ok());
      return served;
    };
    // Nothing queued: the copy (1 s) beats the CPU (1.5 s).
    model::ExpertServed served = serve(0, true);
    CHECK_FALSE(served.on_host);
    CHECK(cache.counters().host_computes == 0);
    REQUIRE(backend->device().WaitForEvent(served.ready).ok());
    WaitFor([&] { return cache.counters().copy_bytes_queued == 0; });
    // One copy queued ahead (held): 2 s against 1.5 s, the CPU wins, for tokens that allow it.
    backend->HoldCopies();
    auto queued = cache.Acquire(0, 1, Precision::kSource);
    REQUIRE((queued.ok() && queued->Wait().ok()));
    REQUIRE(backend->copies_pending() == 1);
    CHECK(cache.counters().copy_bytes_queued == slot);
    served = serve(2, /*inexact=*/false);
    CHECK(served.on_host == bitwise);
    served = serve(3, /*inexact=*/true);
    CHECK(served.on_host);
    CHECK(served.source == model::ExpertSource::kHost);
    CHECK(served.bytes_staged == 0);
    CHECK(cache.counters().host_computes == (bitwise ? 2 : 1));
    // An expert on the device, or on its way there, is never computed on the host.
    CHECK_FALSE(serve(1, true).on_host);
    backend->ReleaseCopies();
    queued->Release();
  }
  SECTION("without a host tier or a device of its own, host compute is refused") {
    CacheOptions no_host = options;
    no_host.host_bytes = 0;
    CHECK(ExpertCache::Create(f.store, no_host).status().code() ==
          absl::StatusCode::kInvalidArgument);
    CacheOptions on_cpu = options;
    on_cpu.backend = kernels::TestCpuBackend(1);
    CHECK_FALSE(ExpertCache::Create(f.store, on_cpu).ok());
  }
}

TEST_CASE("overlap: experts computed on the host keep exact mode bitwise all-resident") {
  for (auto arch : {model::Architecture::kMixtral, model::Architecture::kQwen2Moe}) {
    Fixture f(arch);
    const uint64_t minimum = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
    for (uint64_t budget : {minimum, f.AllExpertsBytes(Precision::kSource) / 4}) {
      for (bool cpu_wins : {true, false}) {
        INFO(model::ArchitectureShortName(arch) << " budget " << budget << " cpu " << cpu_wins);
        auto backend = DelayedBackend(std::chrono::microseconds(50));
        CacheOptions options;
        options.backend = backend;
        options.device_bytes = budget;
        options.host_bytes = f.AllExpertsBytes(Precision::kSource);
        options.host_compute.enabled = true;
        options.host_compute.bitwise_equal = true;  // the stand-in computes with the CPU's code
        options.host_compute.copy_bytes_per_second = 1e9;
        options.host_compute.host_seconds_per_expert = cpu_wins ? 0 : 1e9;
        auto cache = ExpertCache::Create(f.store, options);
        REQUIRE(cache.ok());
        ExpertCache* raw = cache->get();
        auto model = model::Model::Create(f.store->config(), f.store, *std::move(cache), backend);
        REQUIRE(model.ok());
        REQUIRE((*model)->SetHostBackend(kernels::TestCpuBackend(1)).ok());
        auto result = model::ScoreAndGreedy(**model, Fixture::kPrompt, 6);
        REQUIRE(result.ok());
        CHECK(result->prompt_logits == f.reference.prompt_logits);
        CHECK(result->greedy_logits == f.reference.greedy_logits);
        CHECK(result->greedy == f.reference.greedy);
        if (cpu_wins) {
          CHECK(raw->counters().host_computes > 0);
        } else {
          CHECK(raw->counters().host_computes == 0);
        }
      }
    }
  }
}

TEST_CASE(
    "overlap: an expert handed over to run on the host fails a model without a host backend") {
  Fixture f(model::Architecture::kMixtral);
  auto backend = DelayedBackend(std::chrono::microseconds(0));
  CacheOptions options;
  options.backend = backend;
  options.device_bytes = ExpertCache::MinimumDeviceBytes(*f.store, Precision::kSource);
  options.host_bytes = f.AllExpertsBytes(Precision::kSource);
  options.host_compute.enabled = true;
  options.host_compute.bitwise_equal = true;
  options.host_compute.copy_bytes_per_second = 1;  // the CPU always wins
  auto cache = ExpertCache::Create(f.store, options);
  REQUIRE(cache.ok());
  auto model = model::Model::Create(f.store->config(), f.store, *std::move(cache), backend);
  REQUIRE(model.ok());
  CHECK((*model)->SetHostBackend(backend).code() == absl::StatusCode::kInvalidArgument);
  // The first step fills the host tier; a later one finds experts there and no host backend.
  auto result = model::ScoreAndGreedy(**model, Fixture::kPrompt, 6);
  REQUIRE_FALSE(result.ok());
  CHECK(result.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(result.status().message().find("no host backend") != std::string::npos);
}

TEST_CASE("overlap: failed reads through a staging buffer give it back, and the cache goes on") {
  Fixture f(model::Architecture::kMixtral);
  const int used = f.reference.routing[1][0][0];
  const BlobEntry* victim = f.store->manifest().FindBlob(1, used, Precision::kSource);
  REQUIRE(victim != nullptr);
  for (Fault fault : {Fault::kIoError, Fault::kCorrupt}) {
    for (uint64_t host : {uint64_t{0}, f.AllExpertsBytes(Precision::kSource)}) {
      INFO("fault " << static_cast<int>(fault) << " host " << host);
      auto backend = DelayedBackend(std::chrono::microseconds(20));
      CacheOptions options = SmallBudget(f);
      options.backend = backend;
      options.host_bytes = host;
      options.staging_buffers = 1;  // a buffer kept by a failed read would stall every read after
      FaultInjectingReader* injector = nullptr;
      std::unique_ptr<ExpertCache> cache = FaultyCache(f, options, &injector);
      ExpertCache* raw = cache.get();
      injector->Inject(victim->offset, fault, -1);
      auto model = model::Model::Create(f.store->config(), f.store, std::move(cache), backend);
      REQUIRE(model.ok());
      auto failed = model::ScoreAndGreedy(**model, Fixture::kPrompt, 6);
      REQUIRE_FALSE(failed.ok());
      CHECK(failed.status().message().rfind(
                "layer 1 expert " + std::to_string(used) + " (source): ", 0) == 0);
      injector->Clear();
      auto healed = model::ScoreAndGreedy(**model, Fixture::kPrompt, 6);
      REQUIRE(healed.ok());
      CHECK(healed->prompt_logits == f.reference.prompt_logits);
      CHECK(healed->greedy == f.reference.greedy);
      WaitFor([&] { return raw->counters().copy_bytes_queued == 0; });
    }
  }
}

TEST_CASE("byte sizes parse with binary suffixes") {
  CHECK(*ParseByteSize("1024") == 1024);
  CHECK(*ParseByteSize("64K") == 65536);
  CHECK(*ParseByteSize("3m") == 3ull << 20);
  CHECK(*ParseByteSize("2G") == 2ull << 30);
  CHECK_FALSE(ParseByteSize("").ok());
  CHECK_FALSE(ParseByteSize("1.5G").ok());
  CHECK_FALSE(ParseByteSize("99999999999999999999").ok());
  CHECK_FALSE(ParseByteSize("G").ok());
}

}  // namespace
}  // namespace moed::cache
