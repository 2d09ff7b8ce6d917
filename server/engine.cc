#include "server/engine.h"

#include <algorithm>

#include "util/status_macros.h"

namespace moed::server {

absl::StatusOr<Engine> BuildEngine(const DaemonConfig& config, const EngineHooks& hooks) {
  Engine engine;
  MOED_ASSIGN_OR_RETURN(kernels::BackendKind kind, kernels::ParseBackendKind(config.backend));
  if (!config.store.empty()) {
    MOED_ASSIGN_OR_RETURN(engine.store, cache::Store::Open(config.store));
    engine.model_config = engine.store->config();
  } else {
    MOED_ASSIGN_OR_RETURN(engine.model_config, model::LoadModelConfig(config.model));
  }
  engine.discovery = kernels::DiscoverDevices();
  kernels::BackendOptions backend_options;
  backend_options.cuda_device = static_cast<int>(config.cuda_device);
  backend_options.cpu_threads = static_cast<int>(config.threads);
  MOED_ASSIGN_OR_RETURN(kernels::BackendChoice choice,
                        kernels::CreateBackend(kind, backend_options));
  engine.backend = std::move(choice.backend);
  engine.backend_fallback_reason = std::move(choice.fallback_reason);

  if (engine.store != nullptr) {
    cache::CacheOptions options;
    options.device_bytes = static_cast<uint64_t>(config.device_cache_bytes);
    options.host_bytes = static_cast<uint64_t>(config.host_cache_bytes);
    MOED_ASSIGN_OR_RETURN(options.precision, cache::ParsePrecision(config.expert_precision));
    MOED_ASSIGN_OR_RETURN(options.device_policy, cache::ParsePolicyKind(config.eviction_policy));
    options.host_policy = options.device_policy;
    MOED_ASSIGN_OR_RETURN(options.eviction_scope, cache::ParseEvictionScope(config.eviction_scope));
    options.reader.queue_depth = static_cast<int>(config.io_queue_depth);
    options.on_read_failure = hooks.on_read_failure;
    MOED_ASSIGN_OR_RETURN(options.precision_policy.kind,
                          cache::ParsePrecisionPolicyKind(config.precision_policy));
    MOED_ASSIGN_OR_RETURN(options.precision_policy.fallback,
                          cache::ParsePrecision(config.fallback_precision));
    options.precision_policy.threshold = config.fallback_threshold;
    options.precision_policy.min_rank = static_cast<int>(config.fallback_min_rank);
    options.precision_policy.low_bit_floor = config.low_bit_floor;
    MOED_ASSIGN_OR_RETURN(cache::PredictorKind predictor,
                          cache::ParsePredictorKind(config.prefetch));
    // One slot of the budget for prefetches to land in: one is read at a time.
    options.prefetch_slots = predictor == cache::PredictorKind::kOff ? 0 : 1;
    MOED_ASSIGN_OR_RETURN(
        std::unique_ptr<cache::ExpertCache> expert_cache,
        cache::ExpertCache::Create(engine.store, options, {}, &engine.cache_note));
    engine.cache = std::move(expert_cache);
    std::shared_ptr<const cache::AffinityTable> calibration;
    if (!config.prefetch_calibration.empty()) {
      MOED_ASSIGN_OR_RETURN(
          cache::AffinityTable table,
          cache::AffinityTable::FromFile(config.prefetch_calibration,
                                         static_cast<int>(config.prefetch_depth)));
      calibration = std::make_shared<const cache::AffinityTable>(std::move(table));
    }
    if (predictor != cache::PredictorKind::kOff) {
      cache::PrefetcherOptions prefetch;
      prefetch.kind = predictor;
      prefetch.depth = static_cast<int>(config.prefetch_depth);
      prefetch.candidates = static_cast<int>(config.prefetch_candidates);
      MOED_ASSIGN_OR_RETURN(
          engine.prefetcher,
          cache::Prefetcher::Create(prefetch, static_cast<int>(engine.model_config.num_layers),
                                    static_cast<int>(engine.model_config.num_experts),
                                    std::move(calibration)));
    }
    MOED_ASSIGN_OR_RETURN(
        engine.model, model::Model::Create(engine.model_config, engine.store,
                                           cache::SharedProvider(engine.cache, engine.prefetcher),
                                           engine.backend));
  } else {
    if (config.precision_policy != "exact") {
      return absl::InvalidArgumentError(
          "--precision-policy other than exact needs --store (the fallback copies are in the "
          "store)");
    }
    MOED_ASSIGN_OR_RETURN(engine.model, model::Model::Load(config.model, engine.backend));
  }
  if (!config.routing_trace.empty()) {
    MOED_ASSIGN_OR_RETURN(std::shared_ptr<cache::TraceRouting> routing,
                          cache::TraceRouting::FromFile(config.routing_trace, engine.model_config));
    engine.model->SetRoutingOverride(std::move(routing));
  }
  engine.kv_cache_budget_bytes = static_cast<uint64_t>(config.kv_cache_bytes);
  if (engine.kv_cache_budget_bytes == 0) {
    // Room for every running sequence to reach the full context, within half of what the
    // compute device has free now.
    const uint64_t running =
        static_cast<uint64_t>(std::max<int64_t>(1, std::max(config.max_batch, config.max_running)));
    const uint64_t full =
        running *
        model::KvCache::BytesFor(engine.model_config, engine.model_config.max_position_embeddings);
    MOED_ASSIGN_OR_RETURN(kernels::DeviceInfo device, engine.backend->device().info());
    const uint64_t half_free = device.free_memory_bytes / 2;
    engine.kv_cache_budget_bytes = half_free > 0 ? std::min(full, half_free) : full;
  }
  engine.kv_cache_budget_bytes =
      std::max(engine.kv_cache_budget_bytes, engine.model->kv_block_bytes());
  engine.model->SetKvBudget(engine.kv_cache_budget_bytes);
  return engine;
}

}  // namespace moed::server
