#include "server/engine.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

  // The KV budget: --kv-cache-bytes, or room for every running sequence to reach the full
  // context within half of what the compute device has free (after the dense weights).
  const auto resolve_kv_budget = [&](uint64_t free_bytes) {
    uint64_t budget = static_cast<uint64_t>(config.kv_cache_bytes);
    if (budget == 0) {
      const uint64_t running = static_cast<uint64_t>(
          std::max<int64_t>(1, std::max(config.max_batch, config.max_running)));
      const uint64_t full =
          running * model::KvCache::BytesFor(engine.model_config,
                                             engine.model_config.max_position_embeddings);
      budget = free_bytes > 0 ? std::min(full, free_bytes / 2) : full;
    }
    return std::max(budget, model::KvCache::BytesFor(engine.model_config, model::kKvBlockSize));
  };

  if (engine.store != nullptr) {
    // The expert tier's share of the device is set before the dense weights are copied there:
    // count them out of what is free now (on the CPU they are mapped files, not counted).
    MOED_ASSIGN_OR_RETURN(kernels::DeviceInfo device, engine.backend->device().info());
    const bool device_memory_is_host = engine.backend->device().host_memory_is_device_memory();
    uint64_t dense_bytes = 0;
    if (!device_memory_is_host) {
      for (const cache::DenseTensor& tensor : engine.store->manifest().dense) {
        dense_bytes += tensor.bytes;
      }
    }
    const uint64_t free_bytes =
        device.free_memory_bytes > dense_bytes ? device.free_memory_bytes - dense_bytes : 0;
    engine.kv_cache_budget_bytes = resolve_kv_budget(free_bytes);
    cache::CacheOptions options;
    options.backend = engine.backend;
    options.staging_buffers = static_cast<int>(config.staging_buffers);
    options.device_bytes = static_cast<uint64_t>(config.device_cache_bytes);
    if (config.gpu_memory_fraction > 0) {
      if (free_bytes <= engine.kv_cache_budget_bytes) {
        return absl::ResourceExhaustedError(absl::StrCat(
            "--gpu-memory-fraction: no device memory is left for experts (", device.name, " has ",
            device.free_memory_bytes, " bytes free; the dense weights take ", dense_bytes,
            " and the KV cache ", engine.kv_cache_budget_bytes, ")"));
      }
      options.device_bytes =
          static_cast<uint64_t>(config.gpu_memory_fraction *
                                static_cast<double>(free_bytes - engine.kv_cache_budget_bytes));
    }
    options.host_bytes = static_cast<uint64_t>(config.host_cache_bytes);
    MOED_ASSIGN_OR_RETURN(options.precision, cache::ParsePrecision(config.expert_precision));
    if (!device_memory_is_host && options.host_bytes > 0 && config.host_compute == "auto") {
      MOED_ASSIGN_OR_RETURN(kernels::BackendChoice cpu,
                            kernels::CreateBackend(kernels::BackendKind::kCpu, backend_options));
      engine.host_backend = std::move(cpu.backend);
      MOED_ASSIGN_OR_RETURN(options.host_compute,
                            cache::MeasureHostCompute(*engine.backend, *engine.host_backend,
                                                      *engine.store, options.precision));
      options.host_compute.enabled = true;
      engine.host_compute_note = absl::StrFormat(
          "host compute: copies to the device at %.2f GB/s; an expert on the CPU takes %.3f ms "
          "+ %.3f ms per token",
          options.host_compute.copy_bytes_per_second / 1e9,
          options.host_compute.host_seconds_per_expert * 1e3,
          options.host_compute.host_seconds_per_token * 1e3);
    }
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
    MOED_RETURN_IF_ERROR(engine.model->SetHostBackend(engine.host_backend));
  } else {
    if (config.precision_policy != "exact") {
      return absl::InvalidArgumentError(
          "--precision-policy other than exact needs --store (the fallback copies are in the "
          "store)");
    }
    MOED_ASSIGN_OR_RETURN(engine.model, model::Model::Load(config.model, engine.backend));
    MOED_ASSIGN_OR_RETURN(kernels::DeviceInfo device, engine.backend->device().info());
    engine.kv_cache_budget_bytes = resolve_kv_budget(device.free_memory_bytes);
  }
  if (!config.routing_trace.empty()) {
    MOED_ASSIGN_OR_RETURN(std::shared_ptr<cache::TraceRouting> routing,
                          cache::TraceRouting::FromFile(config.routing_trace, engine.model_config));
    engine.model->SetRoutingOverride(std::move(routing));
  }
  engine.model->SetKvBudget(engine.kv_cache_budget_bytes);
  return engine;
}

}  // namespace moed::server
