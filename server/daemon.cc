#include "server/daemon.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "util/fmt_absl.h"
#include "util/status_macros.h"

namespace moed::server {

namespace {

int64_t BytesPerParameter(const std::string& torch_dtype) {
  return torch_dtype == "float32" ? 4 : 2;
}

std::string DirectoryName(const std::string& path) {
  std::filesystem::path p = std::filesystem::path(path).lexically_normal();
  if (!p.has_filename()) p = p.parent_path();
  return p.filename().string();
}

}  // namespace

class MoedService final : public v1::Moed::Service {
 public:
  MoedService(v1::ModelInfoResponse info, kernels::Backend* backend,
              std::shared_ptr<cache::ExpertCache> cache, std::shared_ptr<cache::Store> store)
      : info_(std::move(info)),
        backend_(backend),
        cache_(std::move(cache)),
        store_(std::move(store)) {}

  grpc::Status ModelInfo(grpc::ServerContext* /*context*/, const v1::ModelInfoRequest* /*request*/,
                         v1::ModelInfoResponse* response) override {
    *response = info_;
    // Free memory changes as the daemon runs: read it now.
    if (absl::StatusOr<kernels::DeviceInfo> device = backend_->device(); device.ok()) {
      FillDevice(*device, response->mutable_device());
    }
    if (cache_ != nullptr) FillCacheInfo(*cache_, *store_, response->mutable_expert_cache());
    return grpc::Status::OK;
  }

  grpc::Status Generate(grpc::ServerContext* /*context*/, const v1::GenerateRequest* /*request*/,
                        grpc::ServerWriter<v1::GenerateResponse>* /*writer*/) override {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                        "this daemon build does not generate yet: it has no inference engine");
  }

  grpc::Status Tokenize(grpc::ServerContext* /*context*/, const v1::TokenizeRequest* /*request*/,
                        v1::TokenizeResponse* /*response*/) override {
    return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "this daemon build has no tokenizer yet");
  }

 private:
  const v1::ModelInfoResponse info_;
  kernels::Backend* backend_;
  std::shared_ptr<cache::ExpertCache> cache_;
  std::shared_ptr<cache::Store> store_;
};

void FillCacheInfo(const cache::ExpertCache& cache, const cache::Store& store,
                   v1::ExpertCacheInfo* info) {
  const cache::CacheOptions& options = cache.options();
  cache::CacheCounters counters = cache.counters();
  const uint64_t slot = cache::ExpertCache::SlotBytes(store, options.precision);
  info->set_precision(std::string(cache::PrecisionName(options.precision)));
  info->set_slot_bytes(slot);
  info->set_device_slots(counters.device.slots);
  info->set_host_slots(counters.host.slots);
  info->set_device_budget_bytes(counters.device.slots * slot);
  info->set_host_budget_bytes(counters.host.slots * slot);
  info->set_device_resident(counters.device.resident);
  info->set_host_resident(counters.host.resident);
  info->set_reader(std::string(cache.reader_name()));
  info->set_eviction_policy(options.device_policy == cache::PolicyKind::kLru   ? "lru"
                            : options.device_policy == cache::PolicyKind::kLfu ? "lfu"
                                                                               : "scored");
  info->set_device_hits(counters.device.hits);
  info->set_device_misses(counters.device.misses);
  info->set_host_hits(counters.host.hits);
  info->set_ssd_reads(counters.ssd_reads);
  info->set_ssd_bytes(counters.ssd_bytes);
  info->set_evictions(counters.device.evictions + counters.host.evictions);
  info->set_failed_reads(counters.failed_reads);
  info->set_wait_seconds(counters.wait_seconds);
}

void FillDevice(const kernels::DeviceInfo& info, v1::Device* device) {
  device->set_index(info.index);
  device->set_name(info.name);
  device->set_total_memory_bytes(info.total_memory_bytes);
  device->set_free_memory_bytes(info.free_memory_bytes);
  device->set_compute_capability(info.compute_capability);
  device->set_compute_units(info.compute_units);
}

v1::ModelInfoResponse DescribeModel(const model::ModelConfig& config, const DaemonConfig& daemon) {
  v1::ModelInfoResponse info;
  const std::string& dir = daemon.store.empty() ? daemon.model : daemon.store;
  info.set_model_name(daemon.served_model_name.empty() ? DirectoryName(dir)
                                                       : daemon.served_model_name);
  info.set_architecture(std::string(model::ArchitectureName(config.architecture)));
  info.set_source_path(std::filesystem::absolute(dir).lexically_normal().string());
  info.set_dtype(config.torch_dtype);
  info.set_vocab_size(static_cast<uint32_t>(config.vocab_size));
  info.set_hidden_size(static_cast<uint32_t>(config.hidden_size));
  info.set_num_layers(static_cast<uint32_t>(config.num_layers));
  info.set_num_attention_heads(static_cast<uint32_t>(config.num_attention_heads));
  info.set_num_key_value_heads(static_cast<uint32_t>(config.num_key_value_heads));
  info.set_head_dim(static_cast<uint32_t>(config.head_dim));
  info.set_num_experts(static_cast<uint32_t>(config.num_experts));
  info.set_experts_per_token(static_cast<uint32_t>(config.experts_per_token));
  info.set_expert_intermediate_size(static_cast<uint32_t>(config.expert_intermediate_size));
  info.set_shared_expert_intermediate_size(
      static_cast<uint32_t>(config.shared_expert_intermediate_size));
  info.set_max_context_tokens(static_cast<uint32_t>(config.max_position_embeddings));
  int64_t expert_bytes = config.ExpertParameters() * BytesPerParameter(config.torch_dtype);
  info.set_expert_bytes(static_cast<uint64_t>(expert_bytes));
  info.set_total_expert_bytes(
      static_cast<uint64_t>(expert_bytes * config.num_experts * config.NumMoeLayers()));
  info.set_has_tokenizer(std::filesystem::exists(dir + "/tokenizer.json"));
  for (int64_t eos : config.eos_token_ids) info.add_eos_token_ids(static_cast<uint32_t>(eos));
  info.set_server_version(MOED_VERSION);
  return info;
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(const DaemonConfig& config,
                                                       std::shared_ptr<spdlog::logger> logger) {
  std::unique_ptr<Daemon> daemon(new Daemon());
  daemon->config_ = config;
  daemon->logger_ = std::move(logger);
  spdlog::logger& log = *daemon->logger_;

  model::ModelConfig model_config;
  if (!config.store.empty()) {
    MOED_ASSIGN_OR_RETURN(daemon->store_, cache::Store::Open(config.store));
    model_config = daemon->store_->config();
    cache::CacheOptions options;
    options.device_bytes = static_cast<uint64_t>(config.device_cache_bytes);
    options.host_bytes = static_cast<uint64_t>(config.host_cache_bytes);
    MOED_ASSIGN_OR_RETURN(options.precision, cache::ParsePrecision(config.expert_precision));
    MOED_ASSIGN_OR_RETURN(options.device_policy, cache::ParsePolicyKind(config.eviction_policy));
    options.host_policy = options.device_policy;
    options.reader.queue_depth = static_cast<int>(config.io_queue_depth);
    std::string note;
    MOED_ASSIGN_OR_RETURN(std::unique_ptr<cache::ExpertCache> expert_cache,
                          cache::ExpertCache::Create(daemon->store_, options, {}, &note));
    if (!note.empty()) log.warn("{}", note);
    daemon->cache_ = std::move(expert_cache);
    cache::CacheCounters counters = daemon->cache_->counters();
    log.info("expert cache: {} experts, {} device slots, {} host slots of {:.1f} MiB, reader {}",
             config.expert_precision, counters.device.slots, counters.host.slots,
             cache::ExpertCache::SlotBytes(*daemon->store_, options.precision) / double(1 << 20),
             daemon->cache_->reader_name());
  } else {
    MOED_ASSIGN_OR_RETURN(model_config, model::LoadModelConfig(config.model));
  }
  log.info("model {}: {} with {} layers, {} experts (top-{}), hidden {}, vocab {}",
           config.store.empty() ? config.model : config.store,
           model::ArchitectureName(model_config.architecture), model_config.num_layers,
           model_config.num_experts, model_config.experts_per_token, model_config.hidden_size,
           model_config.vocab_size);

  MOED_ASSIGN_OR_RETURN(kernels::BackendKind kind, kernels::ParseBackendKind(config.backend));
  kernels::Discovery discovery = kernels::DiscoverDevices();
  for (const kernels::DeviceInfo& device : discovery.cuda_devices) {
    log.info("cuda device {}: {} (compute {}, {} SMs), {:.1f} GiB free of {:.1f} GiB", device.index,
             device.name, device.compute_capability, device.compute_units,
             device.free_memory_bytes / double(1 << 30),
             device.total_memory_bytes / double(1 << 30));
  }
  MOED_ASSIGN_OR_RETURN(kernels::BackendChoice choice,
                        kernels::CreateBackend(kind, static_cast<int>(config.cuda_device)));
  if (!choice.fallback_reason.empty()) {
    log.info("no usable CUDA device ({}); using the CPU backend", choice.fallback_reason);
  }
  daemon->backend_ = std::move(choice.backend);
  MOED_ASSIGN_OR_RETURN(kernels::DeviceInfo device, daemon->backend_->device());
  log.info("backend {}: {}, {:.1f} GiB free of {:.1f} GiB", daemon->backend_->name(), device.name,
           device.free_memory_bytes / double(1 << 30), device.total_memory_bytes / double(1 << 30));

  v1::ModelInfoResponse info = DescribeModel(model_config, config);
  info.set_backend(std::string(daemon->backend_->name()));
  FillDevice(device, info.mutable_device());
  for (const kernels::DeviceInfo& cuda_device : discovery.cuda_devices) {
    FillDevice(cuda_device, info.add_cuda_devices());
  }
  info.set_backend_note(choice.fallback_reason);
  daemon->moed_service_ = std::make_unique<MoedService>(std::move(info), daemon->backend_.get(),
                                                        daemon->cache_, daemon->store_);
  daemon->health_service_ = std::make_unique<HealthService>();
  return daemon;
}

Daemon::~Daemon() {
  if (server_) Shutdown(std::chrono::milliseconds(0));
}

absl::StatusOr<std::string> Daemon::Start() {
  std::string host;
  int port = 0;
  MOED_RETURN_IF_ERROR(SplitHostPort(config_.listen, &host, &port));
  health_service_->SetStatus("", grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  health_service_->SetStatus("moed.v1.Moed", grpc::health::v1::HealthCheckResponse::NOT_SERVING);

  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default, which would let a second daemon share a taken port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  int bound_port = 0;
  builder.AddListeningPort(config_.listen, grpc::InsecureServerCredentials(), &bound_port);
  builder.RegisterService(moed_service_.get());
  builder.RegisterService(health_service_.get());
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || bound_port == 0) {
    server_.reset();
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", config_.listen, " (address in use or not local?)"));
  }
  // The model is loaded before Start(), so the daemon is ready as soon as it listens.
  health_service_->SetStatus("", grpc::health::v1::HealthCheckResponse::SERVING);
  health_service_->SetStatus("moed.v1.Moed", grpc::health::v1::HealthCheckResponse::SERVING);
  std::string address = absl::StrCat(host, ":", bound_port);
  logger_->info("serving gRPC on {}", address);
  return address;
}

void Daemon::Shutdown(std::chrono::milliseconds grace) {
  if (!server_) return;
  health_service_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  server_.reset();
  logger_->info("stopped");
}

}  // namespace moed::server
