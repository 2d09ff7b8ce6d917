// moed-bench-batching: experts staged per generated token with expert-aware batch formation
// against plain round-robin (FIFO) on the same workload: 16 concurrent requests, 4 per step,
// an expert store with part of its experts in the device tier.
#include <chrono>
#include <cstdio>
#include <random>

#include "CLI/CLI.hpp"
#include "cache/expert_cache.h"
#include "scheduler/scheduler.h"
#include "server/engine.h"

int main(int argc, char** argv) try {
  std::string store_dir = "build/bench-models/bench-6g-store";
  double fraction = 0.5;
  int requests = 16, batch = 4, tokens = 24;
  std::string scope = "layer";
  CLI::App app{"moed-bench-batching: expert-aware batch formation against FIFO"};
  app.add_option("--store", store_dir, "expert store (see moed-bench-offload)")
      ->capture_default_str();
  app.add_option("--budget", fraction, "device budget as a fraction of the experts")
      ->capture_default_str();
  app.add_option("--requests", requests, "concurrent requests")->capture_default_str();
  app.add_option("--batch", batch, "sequences per step (--max-batch)")->capture_default_str();
  app.add_option("--tokens", tokens, "tokens per request")->capture_default_str();
  app.add_option("--eviction-scope", scope, "layer or global")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  auto store = moed::cache::Store::Open(store_dir);
  if (!store.ok()) {
    std::fprintf(stderr, "%s (run moed-bench-offload once to create it)\n",
                 std::string(store.status().message()).c_str());
    return 1;
  }
  const auto& c = (*store)->config();
  const uint64_t all =
      moed::cache::ExpertCache::SlotBytes(**store, moed::cache::Precision::kSource) *
      c.NumMoeLayers() * c.num_experts;
  auto eviction_scope = moed::cache::ParseEvictionScope(scope);
  if (!eviction_scope.ok()) {
    std::fprintf(stderr, "%s\n", std::string(eviction_scope.status().message()).c_str());
    return 1;
  }
  std::printf(
      "%s: %d requests x %d tokens, %d per step, device budget %.0f%% of the experts, LRU per "
      "%s\n",
      store_dir.c_str(), requests, tokens, batch, 100 * fraction, scope.c_str());
  std::printf("%-14s %10s %14s %18s %10s\n", "formation", "tokens/s", "experts read",
              "experts / token", "hit rate");
  double baseline = 0;
  for (bool aware : {false, true}) {
    moed::server::DaemonConfig config;
    config.store = store_dir;
    config.backend = "cpu";
    config.device_cache_bytes = static_cast<int64_t>(fraction * all);
    config.eviction_scope = scope;
    auto engine = moed::server::BuildEngine(config);
    if (!engine.ok()) return 1;
    std::shared_ptr<moed::cache::ExpertCache> cache = engine->cache;
    moed::scheduler::SchedulerOptions so;
    so.max_batch = batch;
    so.max_running = requests;
    so.expert_aware = aware;
    so.resident_experts = [cache] { return cache->DeviceResidency(); };
    moed::scheduler::Scheduler scheduler(engine->model, nullptr, so);
    std::mt19937 rng(3);
    std::vector<std::shared_ptr<moed::scheduler::RequestHandle>> handles;
    auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < requests; ++r) {
      moed::scheduler::GenerationRequest request;
      for (int i = 0; i < 8; ++i)
        request.prompt.push_back(static_cast<int32_t>(rng() % c.vocab_size));
      request.sampling.max_tokens = static_cast<uint32_t>(tokens);
      request.sampling.temperature = 0.8f;
      request.sampling.seed = static_cast<uint64_t>(r);
      request.sampling.ignore_eos = true;
      handles.push_back(*scheduler.Submit(std::move(request)));
    }
    for (auto& handle : handles) {
      while (true) {
        auto event = handle->Next(std::chrono::minutes(10));
        if (!event.has_value() || event->last()) break;
      }
    }
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    auto counters = cache->counters();
    double generated = static_cast<double>(requests) * tokens;
    double per_token = counters.ssd_reads / generated;
    if (!aware) baseline = per_token;
    std::printf("%-14s %10.2f %14lu %18.2f %9.0f%%%s\n", aware ? "expert-aware" : "round-robin",
                generated / seconds, static_cast<unsigned long>(counters.ssd_reads), per_token,
                100.0 * counters.device.hits /
                    std::max<uint64_t>(1, counters.device.hits + counters.device.misses),
                aware && baseline > 0
                    ? ("   (" + std::to_string(static_cast<int>(100 * per_token / baseline)) +
                       "% of round-robin)")
                          .c_str()
                    : "");
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moed-bench-batching: %s\n", e.what());
  return 1;
}
