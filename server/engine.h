// The one place an engine is built from the configuration: the compute backend, the model's
// weights in it, and, for a store, the store and the expert cache that serves it. The daemon,
// `moectl logits` and the benchmarks all build theirs here.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "cache/expert_cache.h"
#include "cache/prefetcher.h"
#include "cache/routing_trace.h"
#include "cache/store.h"
#include "kernels/backend.h"
#include "model/model.h"
#include "server/config.h"

namespace moed::server {

struct Engine {
  std::shared_ptr<kernels::Backend> backend;
  // Set when --backend auto found no usable GPU: why.
  std::string backend_fallback_reason;
  kernels::Discovery discovery;
  model::ModelConfig model_config;
  // A store (--store): the expert cache serves its experts. Both null for a checkpoint.
  std::shared_ptr<cache::Store> store;
  std::shared_ptr<cache::ExpertCache> cache;
  // The prefetcher feeding the cache (--prefetch); null when off or without a store.
  std::shared_ptr<cache::Prefetcher> prefetcher;
  // A warning from the cache's set-up (its reader fell back), empty when none.
  std::string cache_note;
  // With --host-compute auto on a GPU: the CPU backend experts may run on, and the rates
  // measured at start-up that decide when they do (in words for the log).
  std::shared_ptr<kernels::Backend> host_backend;
  std::string host_compute_note;
  std::shared_ptr<model::Model> model;
  // The KV cache budget set on the model (--kv-cache-bytes, or the default it resolved to).
  uint64_t kv_cache_budget_bytes = 0;
};

// What the caller wants told about the engine at work.
struct EngineHooks {
  // Every failed expert read attempt (see cache::CacheOptions::on_read_failure).
  std::function<void(const cache::StoreFault& fault, absl::string_view message, bool will_retry)>
      on_read_failure;
};

// Reads config.backend, cuda_device, threads, model or store, the cache and prefetch options,
// routing_trace and the KV budget (kv_cache_bytes; its default needs max_batch and
// max_running).
absl::StatusOr<Engine> BuildEngine(const DaemonConfig& config, const EngineHooks& hooks = {});

}  // namespace moed::server
