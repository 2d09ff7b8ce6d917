// moed-soak: the engine under store faults. It packs a synthetic model into an expert store,
// runs N concurrent sampled streams through the scheduler from a cache at a fraction of the
// experts, first with a clean reader (the reference), then with a fault-injecting reader that
// fails a share of reads with I/O errors, returns a share short, and corrupts one blob on every
// read. It checks, and exits 1 unless all hold:
//   - every request that completes equals the reference run with the same seed, token for token;
//   - every request whose reference routing uses the corrupt expert fails with DATA_LOSS naming
//     it, and every other request completes;
//   - the cache's failed-read counters equal the faults injected, kind by kind.
// The faults come from a test double handed to the cache directly: the daemon has no flag for
// them.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "cache/expert_cache.h"
#include "cache/fault_injecting_reader.h"
#include "cache/store_reader.h"
#include "kernels/backend.h"
#include "scheduler/scheduler.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace {

namespace fs = std::filesystem;
using moed::cache::Fault;

struct Options {
  std::string preset = "tiny";
  std::string work_dir;
  int streams = 64;
  int tokens = 24;
  double budget_fraction = 0.25;
  double io_error_rate = 0.01;
  double short_read_rate = 0.01;
  uint64_t seed = 1;
  int threads = 0;
};

struct Outcome {
  absl::StatusCode code = absl::StatusCode::kOk;
  std::string message;
  std::vector<int32_t> tokens;
};

struct RunResult {
  std::vector<Outcome> outcomes;
  // Reference runs only: request index -> routing[layer][token].
  std::map<int, std::vector<std::vector<std::vector<int>>>> routing;
  moed::cache::CacheCounters counters;
  uint64_t injected[3] = {0, 0, 0};
  double seconds = 0;
  uint64_t tokens = 0;
};

std::vector<int32_t> PromptFor(int index, int vocab) {
  std::vector<int32_t> prompt;
  prompt.reserve(static_cast<size_t>(3 + index % 5));
  for (int i = 0; i < 3 + index % 5; ++i) prompt.push_back((index * 131 + i * 17 + 7) % vocab);
  return prompt;
}

// Runs every stream to its end through a fresh cache, model and scheduler.
absl::StatusOr<RunResult> RunStreams(const Options& options,
                                     const std::shared_ptr<moed::cache::Store>& store,
                                     const moed::cache::BlobEntry* corrupt, bool faults) {
  moed::cache::CacheOptions cache_options;
  const uint64_t slot =
      moed::cache::ExpertCache::SlotBytes(*store, moed::cache::Precision::kSource);
  const uint64_t experts = static_cast<uint64_t>(store->config().NumMoeLayers()) *
                           static_cast<uint64_t>(store->config().num_experts);
  cache_options.device_bytes = std::max(
      moed::cache::ExpertCache::MinimumDeviceBytes(*store, moed::cache::Precision::kSource),
      static_cast<uint64_t>(static_cast<double>(experts) * options.budget_fraction) * slot);
  cache_options.retry_backoff = std::chrono::microseconds(200);
  moed::cache::FaultInjectingReader* injector = nullptr;
  auto cache = moed::cache::ExpertCache::Create(
      store, cache_options,
      [&](moed::cache::ReadCallback callback)
          -> absl::StatusOr<std::unique_ptr<moed::cache::BlockReader>> {
        auto reader =
            moed::cache::FaultInjectingReader::Open(store->experts_path(), std::move(callback), 4);
        if (!reader.ok()) return reader.status();
        injector = reader->get();
        return std::unique_ptr<moed::cache::BlockReader>(*std::move(reader));
      });
  if (!cache.ok()) return cache.status();
  std::shared_ptr<moed::cache::ExpertCache> shared_cache = *std::move(cache);
  if (faults) {
    injector->InjectAtRandom(options.io_error_rate, options.short_read_rate, options.seed);
    injector->Inject(corrupt->offset, Fault::kCorrupt, -1);
  }
  auto backend = moed::kernels::CreateBackend(moed::kernels::BackendKind::kCpu,
                                              {.cpu_threads = options.threads});
  if (!backend.ok()) return backend.status();
  auto model =
      moed::model::Model::Create(store->config(), store, moed::cache::SharedProvider(shared_cache),
                                 std::move(backend->backend));
  if (!model.ok()) return model.status();

  RunResult result;
  std::mutex routing_mutex;
  moed::scheduler::SchedulerOptions scheduler_options;
  scheduler_options.max_batch = 16;
  scheduler_options.max_running = options.streams;
  scheduler_options.max_queue = options.streams;
  scheduler_options.on_routing = [&](const std::string& id, int,
                                     const std::vector<std::vector<std::vector<int>>>& routing) {
    std::lock_guard lock(routing_mutex);
    result.routing[std::stoi(id)] = routing;
  };
  const auto started = std::chrono::steady_clock::now();
  {
    moed::scheduler::Scheduler scheduler(*std::move(model), nullptr, scheduler_options);
    std::vector<std::shared_ptr<moed::scheduler::RequestHandle>> handles;
    for (int i = 0; i < options.streams; ++i) {
      moed::scheduler::GenerationRequest request;
      request.id = std::to_string(i);
      request.prompt = PromptFor(i, static_cast<int>(store->config().vocab_size));
      request.sampling.max_tokens = static_cast<uint32_t>(options.tokens);
      request.sampling.temperature = 0.8f;
      request.sampling.ignore_eos = true;
      request.sampling.seed = options.seed * 1000 + static_cast<uint64_t>(i);
      auto handle = scheduler.Submit(std::move(request));
      if (!handle.ok()) return handle.status();
      handles.push_back(*std::move(handle));
    }
    result.outcomes.resize(handles.size());
    for (size_t i = 0; i < handles.size(); ++i) {
      while (true) {
        std::optional<moed::scheduler::StreamEvent> event =
            handles[i]->Next(std::chrono::seconds(600));
        if (!event.has_value()) return absl::DeadlineExceededError("a stream stalled");
        result.outcomes[i].tokens.insert(result.outcomes[i].tokens.end(), event->token_ids.begin(),
                                         event->token_ids.end());
        result.tokens += event->token_ids.size();
        if (!event->error.ok()) {
          result.outcomes[i].code = event->error.code();
          result.outcomes[i].message = std::string(event->error.message());
        }
        if (event->last()) break;
      }
    }
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  result.counters = shared_cache->counters();
  if (injector != nullptr) {
    for (Fault f : {Fault::kIoError, Fault::kShortRead, Fault::kCorrupt})
      result.injected[static_cast<int>(f)] = injector->injected(f);
  }
  return result;
}

bool UsesExpert(const std::vector<std::vector<std::vector<int>>>& routing, int layer, int expert) {
  if (layer >= static_cast<int>(routing.size())) return false;
  for (const std::vector<int>& chosen : routing[static_cast<size_t>(layer)]) {
    for (int e : chosen)
      if (e == expert) return true;
  }
  return false;
}

int Run(int argc, char** argv) {
  Options options;
  CLI::App app{
      "moed-soak: the engine's streams under injected store faults, checked against a "
      "fault-free run"};
  app.add_option("--preset", options.preset, "model preset of moed-synth (tiny, demo)");
  app.add_option("--work-dir", options.work_dir,
                 "where the model and store are written (default: a temporary directory)");
  app.add_option("--streams", options.streams, "concurrent streams")->check(CLI::Range(1, 4096));
  app.add_option("--tokens", options.tokens, "tokens each stream generates")
      ->check(CLI::Range(1, 4096));
  app.add_option("--budget-fraction", options.budget_fraction,
                 "device cache budget as a fraction of all experts")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--io-error-rate", options.io_error_rate, "share of reads failing with EIO")
      ->check(CLI::Range(0.0, 0.5));
  app.add_option("--short-read-rate", options.short_read_rate, "share of reads returned short")
      ->check(CLI::Range(0.0, 0.5));
  app.add_option("--seed", options.seed, "seed of the faults and of the streams' sampling");
  app.add_option("--threads", options.threads, "compute threads (0: one per core)");
  CLI11_PARSE(app, argc, argv);

  const bool temporary = options.work_dir.empty();
  const fs::path work = temporary ? fs::temp_directory_path() / absl::StrCat("moed_soak_", getpid())
                                  : fs::path(options.work_dir);
  fs::remove_all(work);
  fs::create_directories(work);
  auto spec = moed::tools::PresetSpec(options.preset, moed::model::Architecture::kMixtral);
  if (!spec.ok()) {
    std::fprintf(stderr, "moed-soak: %s\n", std::string(spec.status().message()).c_str());
    return 2;
  }
  absl::Status written = moed::tools::WriteCheckpoint(*spec, (work / "model").string());
  if (written.ok()) {
    moed::tools::PackOptions pack;
    pack.precisions = {moed::cache::Precision::kSource};
    written = moed::tools::Pack((work / "model").string(), (work / "store").string(), pack);
  }
  auto store = written.ok() ? moed::cache::Store::Open((work / "store").string())
                            : absl::StatusOr<std::shared_ptr<moed::cache::Store>>(written);
  if (!store.ok()) {
    std::fprintf(stderr, "moed-soak: %s\n", std::string(store.status().message()).c_str());
    return 1;
  }

  auto reference = RunStreams(options, *store, nullptr, false);
  if (!reference.ok()) {
    std::fprintf(stderr, "moed-soak: reference run: %s\n",
                 std::string(reference.status().message()).c_str());
    return 1;
  }
  // Corrupt the expert the fewest streams use, so that most streams must complete.
  const moed::model::ModelConfig& config = (*store)->config();
  int best_layer = -1, best_expert = -1, best_users = options.streams + 1;
  for (int layer = 0; layer < config.num_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int e = 0; e < config.num_experts; ++e) {
      int users = 0;
      for (const auto& [index, routing] : reference->routing)
        users += UsesExpert(routing, layer, e);
      if (users > 0 && users < best_users) {
        best_users = users;
        best_layer = layer;
        best_expert = e;
      }
    }
  }
  const moed::cache::BlobEntry* corrupt =
      (*store)->manifest().FindBlob(best_layer, best_expert, moed::cache::Precision::kSource);
  auto faulty = RunStreams(options, *store, corrupt, true);
  if (!faulty.ok()) {
    std::fprintf(stderr, "moed-soak: faulty run: %s\n",
                 std::string(faulty.status().message()).c_str());
    return 1;
  }

  std::vector<std::string> violations;
  const std::string corrupt_name =
      absl::StrCat("layer ", best_layer, " expert ", best_expert, " (source): checksum mismatch");
  int completed = 0, failed = 0, routed_to_corrupt = 0;
  for (int i = 0; i < options.streams; ++i) {
    const Outcome& want = reference->outcomes[static_cast<size_t>(i)];
    const Outcome& got = faulty->outcomes[static_cast<size_t>(i)];
    if (want.code != absl::StatusCode::kOk) {
      violations.push_back(absl::StrCat("stream ", i, " failed without faults: ", want.message));
      continue;
    }
    const bool routed = UsesExpert(reference->routing[i], best_layer, best_expert);
    routed_to_corrupt += routed;
    if (got.code == absl::StatusCode::kOk) {
      ++completed;
      if (routed)
        violations.push_back(absl::StrCat("stream ", i, " used the corrupt expert yet completed"));
      if (got.tokens != want.tokens)
        violations.push_back(absl::StrCat("stream ", i, " completed with other tokens"));
    } else {
      ++failed;
      if (!routed) {
        violations.push_back(
            absl::StrCat("stream ", i, " never uses the corrupt expert but failed: ", got.message));
      } else if (got.code != absl::StatusCode::kDataLoss ||
                 got.message.rfind(corrupt_name, 0) != 0) {
        violations.push_back(absl::StrCat("stream ", i, " failed otherwise than DATA_LOSS naming ",
                                          corrupt_name, ": ", got.message));
      }
    }
  }
  const moed::cache::CacheCounters& c = faulty->counters;
  const uint64_t* injected = faulty->injected;
  if (c.failed_io != injected[0] || c.failed_short_reads != injected[1] ||
      c.failed_checksums != injected[2]) {
    violations.push_back(absl::StrCat(
        "failed reads counted io ", c.failed_io, " short ", c.failed_short_reads, " checksum ",
        c.failed_checksums, ", injected ", injected[0], " ", injected[1], " ", injected[2]));
  }

  std::printf(
      "moed-soak: %s preset, %d streams of %d sampled tokens, device budget %.0f %% of "
      "the experts\n",
      options.preset.c_str(), options.streams, options.tokens, options.budget_fraction * 100);
  std::printf("%-34s %12s %12s\n", "", "fault-free", "faulty");
  std::printf("%-34s %12llu %12llu\n", "store reads",
              static_cast<unsigned long long>(reference->counters.ssd_reads),
              static_cast<unsigned long long>(c.ssd_reads));
  std::printf("%-34s %12s %12llu\n", "injected I/O errors", "0",
              static_cast<unsigned long long>(injected[0]));
  std::printf("%-34s %12s %12llu\n", "injected short reads", "0",
              static_cast<unsigned long long>(injected[1]));
  std::printf("%-34s %12s %12llu\n", "corrupted reads (one blob)", "0",
              static_cast<unsigned long long>(injected[2]));
  std::printf("%-34s %12llu %12llu\n", "failed reads counted",
              static_cast<unsigned long long>(reference->counters.failed_reads),
              static_cast<unsigned long long>(c.failed_reads));
  std::printf("%-34s %12d %12d\n", "streams completed", options.streams, completed);
  std::printf("%-34s %12d %12d\n", "streams failed (corrupt expert)", 0, failed);
  std::printf("%-34s %12.1f %12.1f\n", "tokens/s", reference->tokens / reference->seconds,
              faulty->tokens / faulty->seconds);
  std::printf("corrupt blob: layer %d expert %d, used by %d of %d streams\n", best_layer,
              best_expert, routed_to_corrupt, options.streams);
  if (temporary) fs::remove_all(work);
  if (!violations.empty()) {
    for (const std::string& v : violations) std::printf("VIOLATION: %s\n", v.c_str());
    return 1;
  }
  std::printf("every check held\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {  // CLI11's and the standard library's
    std::fprintf(stderr, "moed-soak: %s\n", e.what());
    return 1;
  }
}
