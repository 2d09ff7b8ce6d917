#include "server/daemon.h"

#include <sys/resource.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cache/routing_trace.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/support/proto_buffer_writer.h"
#include "server/engine.h"
#include "server/grpc_request.h"
#include "util/fmt_absl.h"
#include "util/rate_limiter.h"
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

// What the service needs from the daemon.
struct ServiceParts {
  v1::ModelInfoResponse info;
  kernels::Backend* backend = nullptr;
  std::shared_ptr<cache::ExpertCache> cache;
  std::shared_ptr<cache::Prefetcher> prefetcher;
  std::shared_ptr<cache::Store> store;
  std::shared_ptr<ServingCore> core;  // the scheduler and tokenizer are the core's
  std::string api_key;
};

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

v1::FinishReason ToProto(scheduler::FinishReason reason) {
  switch (reason) {
    case scheduler::FinishReason::kStop:
      return v1::FINISH_REASON_STOP;
    case scheduler::FinishReason::kLength:
      return v1::FINISH_REASON_LENGTH;
    case scheduler::FinishReason::kCancelled:
      return v1::FINISH_REASON_CANCELLED;
    case scheduler::FinishReason::kNone:
      break;
  }
  return v1::FINISH_REASON_UNSPECIFIED;
}

// Generate and Tokenize take their requests as bytes (a raw method) so that a string field
// holding invalid UTF-8 is answered INVALID_ARGUMENT naming the field (gRPC's own parsing
// would answer INTERNAL with no message).
using MoedServiceBase =
    v1::Moed::WithRawCallbackMethod_Generate<v1::Moed::WithRawCallbackMethod_Tokenize<
        v1::Moed::WithCallbackMethod_ModelInfo<v1::Moed::Service>>>;

grpc::ByteBuffer Serialize(const google::protobuf::Message& message) {
  grpc::ByteBuffer buffer;
  bool own = false;
  (void)grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(message, &buffer,
                                                                                   &own);
  return buffer;
}

class MoedService;

// One Generate stream on the callback API: events come from the scheduler (its listener runs
// on the engine thread) and are written one at a time; the stream holds no thread while it
// waits. Decisions are taken under the lock, gRPC is called outside it.
class GenerateStream final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  GenerateStream(MoedService* service, grpc::CallbackServerContext* context)
      : service_(service), context_(context), shared_(std::make_shared<Shared>()) {
    shared_->stream = this;
  }
  void Start(const grpc::ByteBuffer& request);
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // What the scheduler's listener reaches: the stream while it lives. A listener call that is
  // acting on the stream outside the lock counts as a user; the stream's memory is freed when
  // it is done and no user is left, whichever comes last.
  struct Shared {
    std::mutex mutex;
    GenerateStream* stream = nullptr;
    int users = 0;
    GenerateStream* done = nullptr;  // OnDone has run: free once users reach 0
  };
  struct Action {
    bool write = false;
    std::optional<grpc::Status> finish;
  };
  // With shared_->mutex held and no write in flight: the next event as a write, or the end.
  Action NextLocked();
  void Perform(const Action& action);
  // With shared_->mutex held: how the stream ends now that the client is gone or its deadline
  // passed (the scheduler ends an expired request itself and counts it as such).
  grpc::Status GoneLocked();

  MoedService* service_;
  grpc::CallbackServerContext* context_;
  std::shared_ptr<Shared> shared_;
  bool counted_ = false;
  std::shared_ptr<scheduler::RequestHandle> handle_;
  std::string request_id_;
  bool want_logprobs_ = false;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  // Guarded by shared_->mutex.
  bool writing_ = false;
  bool finished_ = false;
  bool wrote_last_ = false;
  bool cancelled_ = false;
  bool left_to_deadline_ = false;
  grpc::ByteBuffer response_;
  static constexpr std::chrono::milliseconds kDeadlineSkew{1000};
};

class MoedService final : public MoedServiceBase {
 public:
  MoedService(ServiceParts parts, StreamLimit* streams)
      : parts_(std::move(parts)), streams_(streams) {}

  grpc::ServerUnaryReactor* ModelInfo(grpc::CallbackServerContext* context,
                                      const v1::ModelInfoRequest* /*request*/,
                                      v1::ModelInfoResponse* response) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    if (grpc::Status denied = Authorize(*context); !denied.ok()) {
      reactor->Finish(denied);
      return reactor;
    }
    *response = parts_.info;
    // Free memory changes as the daemon runs: read it now.
    if (absl::StatusOr<kernels::DeviceInfo> device = parts_.backend->device().info(); device.ok()) {
      FillDevice(*device, response->mutable_device());
    }
    if (parts_.cache != nullptr)
      FillCacheInfo(*parts_.cache, *parts_.store, parts_.prefetcher.get(),
                    response->mutable_expert_cache());
    scheduler::SchedulerStats stats = parts_.core->parts().scheduler->stats();
    response->set_requests_waiting(stats.waiting);
    response->set_requests_running(stats.running);
    response->set_kv_cache_bytes(stats.kv_cache_bytes);
    response->set_kv_cache_budget_bytes(stats.kv_cache_budget_bytes);
    response->set_preemptions(stats.preemptions);
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }

  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override {
    auto* stream = new GenerateStream(this, context);
    stream->Start(*request);
    return stream;
  }

  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request_bytes,
                                     grpc::ByteBuffer* response_bytes) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish([&]() -> grpc::Status {
      if (grpc::Status denied = Authorize(*context); !denied.ok()) return denied;
      v1::TokenizeRequest request;
      if (absl::Status parsed = ParseRequest(*request_bytes, &request); !parsed.ok())
        return ToGrpc(parsed);
      auto ids = parts_.core->Tokenize(
          request.text(), request.has_add_special_tokens() && request.add_special_tokens());
      if (!ids.ok()) return ToGrpc(ids.status());
      v1::TokenizeResponse response;
      for (int32_t id : *ids) {
        response.add_token_ids(static_cast<uint32_t>(id));
        response.add_tokens(tokenizer()->TokenText(id).value_or(""));
      }
      *response_bytes = Serialize(response);
      return grpc::Status::OK;
    }());
    return reactor;
  }

  // For GenerateStream.
  const ServiceParts& parts() const { return parts_; }
  StreamLimit& streams() { return *streams_; }
  const model::Tokenizer* tokenizer() const { return parts_.core->parts().tokenizer.get(); }

  grpc::Status Authorize(const grpc::ServerContextBase& context) const {
    if (parts_.api_key.empty()) return grpc::Status::OK;
    auto it = context.client_metadata().find("authorization");
    absl::string_view given = it == context.client_metadata().end()
                                  ? ""
                                  : absl::string_view(it->second.data(), it->second.size());
    if (BearerMatches(given, parts_.api_key)) return grpc::Status::OK;
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "a valid API key is needed: send 'authorization: Bearer KEY' metadata");
  }

  absl::StatusOr<GenerateInput> Convert(const v1::GenerateRequest& request,
                                        const grpc::ServerContextBase& context) {
    GenerateInput out;
    if (!request.prompt().empty()) out.prompt_text = request.prompt();
    for (uint32_t id : request.prompt_token_ids()) {
      if (id > static_cast<uint32_t>(INT32_MAX))
        return absl::InvalidArgumentError("prompt token id out of range");
      out.prompt_ids.push_back(static_cast<int32_t>(id));
    }
    out.add_special_tokens = !request.has_add_special_tokens() || request.add_special_tokens();
    const v1::SamplingParams& s = request.sampling();
    out.sampling.max_tokens = s.max_tokens();
    out.sampling.temperature = s.has_temperature() ? s.temperature() : 1.0f;
    out.sampling.top_p = s.has_top_p() ? s.top_p() : 1.0f;
    out.sampling.top_k = s.top_k();
    out.sampling.min_p = s.min_p();
    if (s.has_seed()) out.sampling.seed = s.seed();
    out.sampling.stop.assign(s.stop().begin(), s.stop().end());
    out.sampling.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
    out.sampling.presence_penalty = s.presence_penalty();
    out.sampling.frequency_penalty = s.frequency_penalty();
    out.sampling.repetition_penalty = s.has_repetition_penalty() ? s.repetition_penalty() : 1.0f;
    out.sampling.ignore_eos = s.ignore_eos();
    out.sampling.logprobs = s.logprobs();
    out.sampling.top_logprobs = s.top_logprobs();
    out.skip_special_tokens = !request.has_skip_special_tokens() || request.skip_special_tokens();
    out.priority = request.priority();
    switch (request.expert_precision()) {
      case v1::EXPERT_PRECISION_UNSPECIFIED:
        break;
      case v1::EXPERT_PRECISION_SOURCE:
        out.loosest_precision = cache::Precision::kSource;
        break;
      case v1::EXPERT_PRECISION_ALLOW_INT8:
        out.loosest_precision = cache::Precision::kInt8;
        break;
      case v1::EXPERT_PRECISION_ALLOW_INT4:
        out.loosest_precision = cache::Precision::kInt4;
        break;
      default:
        return absl::InvalidArgumentError(
            absl::StrCat("unknown expert_precision ", request.expert_precision()));
    }
    out.request_id =
        request.request_id().empty() ? parts_.core->NewRequestId("req-") : request.request_id();
    auto deadline = context.deadline();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      out.deadline =
          std::chrono::steady_clock::now() + (deadline - std::chrono::system_clock::now());
    }
    return out;
  }

 private:
  ServiceParts parts_;
  StreamLimit* streams_;
};

void GenerateStream::Start(const grpc::ByteBuffer& request_bytes) {
  auto refuse = [&](const grpc::Status& status) {
    {
      std::lock_guard lock(shared_->mutex);
      finished_ = true;
    }
    Finish(status);
  };
  if (!service_->streams().TryAcquire()) return refuse(service_->streams().Refusal());
  counted_ = true;
  if (grpc::Status denied = service_->Authorize(*context_); !denied.ok()) return refuse(denied);
  v1::GenerateRequest request;
  absl::Status parsed = ParseRequest(request_bytes, &request);
  absl::StatusOr<GenerateInput> converted =
      parsed.ok() ? service_->Convert(request, *context_) : absl::StatusOr<GenerateInput>(parsed);
  if (!converted.ok()) {
    service_->parts().core->RecordRefusal(converted.status().code());
    return refuse(ToGrpc(converted.status()));
  }
  request_id_ = converted->request_id;
  deadline_ = converted->deadline;
  want_logprobs_ = request.sampling().logprobs();
  absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> handle =
      service_->parts().core->Submit(*std::move(converted));
  if (!handle.ok()) return refuse(ToGrpc(handle.status()));
  handle_ = *std::move(handle);
  // The engine thread calls this after each event: write it if no write is in flight. The
  // stream outlives the action taken: it cannot end before the write or finish chosen here.
  handle_->SetListener([shared = shared_] {
    GenerateStream* stream = nullptr;
    Action action;
    {
      std::lock_guard lock(shared->mutex);
      stream = shared->stream;
      if (stream == nullptr) return;
      action = stream->NextLocked();
      ++shared->users;
    }
    stream->Perform(action);
    GenerateStream* free_now = nullptr;
    {
      std::lock_guard lock(shared->mutex);
      if (--shared->users == 0) std::swap(free_now, shared->done);
    }
    delete free_now;
  });
}

grpc::Status GenerateStream::GoneLocked() {
  finished_ = true;
  // The client's own deadline timer fires a little before the daemon's (the daemon's starts
  // when the call arrives), so a call cancelled this close to its deadline is left for the
  // scheduler to end at the deadline, as DEADLINE_EXCEEDED, rather than counted as a client
  // that went away.
  if (deadline_.has_value() && std::chrono::steady_clock::now() + kDeadlineSkew >= *deadline_) {
    left_to_deadline_ = true;
    return grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "the request's deadline passed");
  }
  handle_->Cancel();  // frees the slot, KV cache and pins at the next step
  return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
}

GenerateStream::Action GenerateStream::NextLocked() {
  Action action;
  if (writing_ || finished_) return action;
  std::optional<scheduler::StreamEvent> event = handle_->Next(std::chrono::milliseconds(0));
  if (!event.has_value()) return action;
  if (!event->error.ok()) {
    finished_ = true;
    action.finish = ToGrpc(event->error);
    return action;
  }
  v1::GenerateResponse response;
  response.set_request_id(request_id_);
  response.set_text(event->text);
  for (int32_t id : event->token_ids) response.add_token_ids(static_cast<uint32_t>(id));
  const model::Tokenizer* tokenizer = service_->tokenizer();
  if (want_logprobs_) {
    for (const model::TokenChoice& choice : event->choices) {
      v1::TokenLogprob* lp = response.add_logprobs();
      lp->set_token_id(static_cast<uint32_t>(choice.token));
      lp->set_logprob(choice.logprob);
      if (tokenizer != nullptr) lp->set_token(tokenizer->TokenText(choice.token).value_or(""));
      for (const auto& [id, logprob] : choice.top_logprobs) {
        v1::TopLogprob* top = lp->add_top_logprobs();
        top->set_token_id(static_cast<uint32_t>(id));
        top->set_logprob(logprob);
        if (tokenizer != nullptr) top->set_token(tokenizer->TokenText(id).value_or(""));
      }
    }
  }
  if (event->last()) {
    response.set_finish_reason(ToProto(event->finish));
    response.set_matched_stop(event->matched_stop);
    response.mutable_usage()->set_prompt_tokens(event->prompt_tokens);
    response.mutable_usage()->set_completion_tokens(event->completion_tokens);
    response.mutable_usage()->set_total_tokens(event->prompt_tokens + event->completion_tokens);
    const scheduler::RequestExpertStats& es = event->expert_stats;
    v1::ExpertStats* stats = response.mutable_expert_stats();
    stats->set_device_hits(es.device_hits);
    stats->set_host_hits(es.host_hits);
    stats->set_ssd_reads(es.ssd_reads);
    stats->set_low_precision_fallbacks(es.low_precision_fallbacks);
    stats->set_fallbacks_int8(es.fallbacks_int8);
    stats->set_fallbacks_int4(es.fallbacks_int4);
    stats->set_bytes_staged(es.bytes_staged);
    stats->set_stall_seconds(es.stall_seconds);
    stats->set_prefetch_issued(es.prefetch_issued);
    stats->set_prefetch_useful(es.prefetch_useful);
    stats->set_prefetch_late(es.prefetch_late);
    stats->set_prefetch_wasted(es.prefetch_wasted);
    wrote_last_ = true;
  }
  response_ = Serialize(response);
  writing_ = true;
  action.write = true;
  return action;
}

void GenerateStream::Perform(const Action& action) {
  if (action.finish.has_value()) {
    Finish(*action.finish);
  } else if (action.write) {
    StartWrite(&response_);
  }
}

void GenerateStream::OnWriteDone(bool ok) {
  Action action;
  {
    std::lock_guard lock(shared_->mutex);
    writing_ = false;
    if (!ok || (cancelled_ && !wrote_last_)) {
      action.finish = GoneLocked();
    } else if (wrote_last_) {
      finished_ = true;
      action.finish = grpc::Status::OK;
    } else {
      action = NextLocked();
    }
  }
  Perform(action);
}

void GenerateStream::OnCancel() {
  grpc::Status status;
  {
    std::lock_guard lock(shared_->mutex);
    cancelled_ = true;
    if (finished_ || writing_ || handle_ == nullptr) return;  // a write in flight ends it
    status = GoneLocked();
  }
  Finish(status);
}

void GenerateStream::OnDone() {
  if (handle_ != nullptr) {
    handle_->SetListener(nullptr);
    if (!wrote_last_ && !left_to_deadline_) handle_->Cancel();
  }
  if (counted_) service_->streams().Release();
  // Keep `shared_` alive past the delete: a listener call may still hold it.
  std::shared_ptr<Shared> shared = shared_;
  {
    std::lock_guard lock(shared->mutex);
    shared->stream = nullptr;
    if (shared->users > 0) {
      shared->done = this;  // the last listener call frees it
      return;
    }
  }
  delete this;
}

void FillCacheInfo(const cache::ExpertCache& cache, const cache::Store& store,
                   const cache::Prefetcher* prefetcher, v1::ExpertCacheInfo* info) {
  const cache::CacheOptions& options = cache.options();
  cache::CacheCounters counters = cache.counters();
  const uint64_t slot = cache::ExpertCache::SlotBytes(store, options.precision);
  info->set_precision(std::string(cache::PrecisionName(options.precision)));
  info->set_slot_bytes(slot);
  info->set_device_slots(counters.device.slots);
  info->set_host_slots(counters.host.slots);
  info->set_device_budget_bytes(counters.device.slots * slot + counters.fallback.budget_bytes);
  info->set_host_budget_bytes(counters.host.slots * slot);
  info->set_device_resident(counters.device.resident);
  info->set_host_resident(counters.host.resident);
  info->set_reader(std::string(cache.reader_name()));
  info->set_eviction_policy(std::string(cache::PolicyName(options.device_policy)));
  info->set_eviction_scope(options.eviction_scope == cache::EvictionScope::kLayer ? "layer"
                                                                                  : "global");
  info->set_device_hits(counters.device.hits);
  info->set_device_misses(counters.device.misses);
  info->set_host_hits(counters.host.hits);
  info->set_ssd_reads(counters.ssd_reads);
  info->set_ssd_bytes(counters.ssd_bytes);
  info->set_evictions(counters.device.evictions + counters.host.evictions);
  info->set_failed_reads(counters.failed_reads);
  info->set_wait_seconds(counters.wait_seconds);
  info->set_prefetch_predictor(prefetcher == nullptr
                                   ? "off"
                                   : std::string(cache::PredictorName(prefetcher->options().kind)));
  info->set_prefetch_depth(
      prefetcher == nullptr ? 0 : static_cast<uint32_t>(prefetcher->options().depth));
  info->set_prefetch_issued(counters.prefetch_issued);
  info->set_prefetch_useful(counters.prefetch_useful);
  info->set_prefetch_late(counters.prefetch_late);
  info->set_prefetch_wasted(counters.prefetch_wasted);
  info->set_prefetch_failed(counters.prefetch_failures);
  info->set_prefetch_pending(counters.prefetch_pending);
  info->set_prefetch_cancelled(counters.prefetch_cancelled);
  info->set_prefetch_wait_seconds(counters.prefetch_wait_seconds);
  const cache::PrecisionPolicyOptions& policy = cache.precision_policy().options();
  info->set_precision_policy(std::string(cache::PrecisionPolicyName(policy.kind)));
  if (cache.precision_policy().falls_back()) {
    info->set_fallback_precision(std::string(cache::PrecisionName(policy.fallback)));
    info->set_fallback_slot_bytes(cache::ExpertCache::SlotBytes(store, policy.fallback));
  }
  info->set_low_bit_floor(policy.low_bit_floor);
  info->set_fallback_slots(counters.fallback.slots);
  info->set_fallback_resident(counters.fallback.resident);
  info->set_fallbacks_int8(counters.fallbacks_int8);
  info->set_fallbacks_int4(counters.fallbacks_int4);
  info->set_floor_reads(counters.floor_reads);
  info->set_upgrade_reads(counters.upgrade_reads);
  info->set_host_computes(counters.host_computes);
  info->set_copy_bytes_queued(counters.copy_bytes_queued);
  if (prefetcher != nullptr) {
    for (const cache::LayerPrefetchStats& layer : prefetcher->layer_stats()) {
      if (layer.needed == 0) continue;  // never predicted
      v1::LayerPrefetchStats* out = info->add_per_layer();
      out->set_layer(static_cast<uint32_t>(layer.layer));
      out->set_recall(layer.recall());
      out->set_precision(layer.precision());
    }
  }
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
  info.set_kv_bytes_per_token(
      static_cast<uint64_t>(config.num_layers * config.KvFloatsPerTokenLayer()) * sizeof(float));
  info.set_moe_layers(static_cast<uint32_t>(config.NumMoeLayers()));
  info.set_routing(model::RoutingDescription(config));
  info.set_kv_lora_rank(static_cast<uint32_t>(config.mla.kv_lora_rank));
  info.set_q_lora_rank(static_cast<uint32_t>(config.mla.q_lora_rank));
  info.set_qk_rope_head_dim(static_cast<uint32_t>(config.mla.rope_dim));
  info.set_v_head_dim(static_cast<uint32_t>(config.mla.value_dim));
  if (config.yarn.has_value()) {
    info.set_rope_scaling(absl::StrCat("yarn x", config.yarn->factor, " (from ",
                                       config.yarn->original_max_position_embeddings,
                                       " positions)"));
  }
  return info;
}

absl::StatusOr<std::unique_ptr<Daemon>> Daemon::Create(const DaemonConfig& config,
                                                       std::shared_ptr<spdlog::logger> logger) {
  std::unique_ptr<Daemon> daemon(new Daemon());
  daemon->config_ = config;
  daemon->logger_ = std::move(logger);
  spdlog::logger& log = *daemon->logger_;

  EngineHooks hooks;
  // A failing disk fails reads by the thousand: a few lines a second, then a count.
  hooks.on_read_failure =
      [logger = daemon->logger_,
       limiter = std::make_shared<util::RateLimiter>(5, std::chrono::seconds(1))](
          const cache::StoreFault& fault, absl::string_view message, bool will_retry) {
        uint64_t dropped = 0;
        if (!limiter->Allow(util::RateLimiter::Clock::now(), &dropped)) return;
        logger->warn("expert read failed (layer {} expert {} {}, {}, attempt {}{}): {}{}",
                     fault.layer, fault.expert, cache::PrecisionName(fault.precision),
                     cache::ReadFaultKindName(fault.kind), fault.attempts,
                     will_retry ? ", will retry" : "", message,
                     dropped > 0 ? absl::StrCat(" (", dropped, " more failed reads not logged)")
                                 : std::string());
      };
  MOED_ASSIGN_OR_RETURN(Engine engine, BuildEngine(config, hooks));
  const model::ModelConfig& model_config = engine.model_config;
  daemon->store_ = engine.store;
  daemon->cache_ = engine.cache;
  daemon->prefetcher_ = engine.prefetcher;
  daemon->backend_ = engine.backend;
  if (!engine.cache_note.empty()) log.warn("{}", engine.cache_note);
  if (!engine.host_compute_note.empty()) log.info("{}", engine.host_compute_note);
  if (daemon->cache_ != nullptr) {
    cache::CacheCounters counters = daemon->cache_->counters();
    log.info("expert cache: {} experts, {} device slots, {} host slots of {:.1f} MiB, reader {}",
             config.expert_precision, counters.device.slots, counters.host.slots,
             cache::ExpertCache::SlotBytes(*daemon->store_, daemon->cache_->options().precision) /
                 double(1 << 20),
             daemon->cache_->reader_name());
    log.info(
        "prefetch: {}{}", config.prefetch,
        daemon->prefetcher_ == nullptr
            ? std::string()
            : absl::StrCat(", ", config.prefetch_depth, " layer(s) ahead",
                           config.prefetch_calibration.empty()
                               ? std::string()
                               : absl::StrCat(", calibrated on ", config.prefetch_calibration)));
  }
  if (!config.routing_trace.empty()) {
    log.warn("routing follows the trace {}: outputs are not the model's (benchmarks only)",
             config.routing_trace);
  }
  log.info("model {}: {} with {} layers, {} experts (top-{}), hidden {}, vocab {}",
           config.store.empty() ? config.model : config.store,
           model::ArchitectureName(model_config.architecture), model_config.num_layers,
           model_config.num_experts, model_config.experts_per_token, model_config.hidden_size,
           model_config.vocab_size);
  for (const kernels::DeviceInfo& device : engine.discovery.cuda_devices) {
    log.info("cuda device {}: {} (compute {}, {} SMs), {:.1f} GiB free of {:.1f} GiB", device.index,
             device.name, device.compute_capability, device.compute_units,
             device.free_memory_bytes / double(1 << 30),
             device.total_memory_bytes / double(1 << 30));
  }
  if (!engine.backend_fallback_reason.empty()) {
    log.info("no usable CUDA device ({}); using the CPU backend", engine.backend_fallback_reason);
  }
  MOED_ASSIGN_OR_RETURN(kernels::DeviceInfo device, daemon->backend_->device().info());
  log.info("backend {} computes: {}, {:.1f} GiB free of {:.1f} GiB", daemon->backend_->name(),
           device.name, device.free_memory_bytes / double(1 << 30),
           device.total_memory_bytes / double(1 << 30));

  v1::ModelInfoResponse info = DescribeModel(model_config, config);
  info.set_backend(std::string(daemon->backend_->name()));
  FillDevice(device, info.mutable_device());
  for (const kernels::DeviceInfo& cuda_device : engine.discovery.cuda_devices) {
    FillDevice(cuda_device, info.add_cuda_devices());
  }
  info.set_backend_note(engine.backend_fallback_reason);
  // The engine: the model's weights, the tokenizer when the directory has one, the scheduler.
  const std::string dir = config.store.empty() ? config.model : config.store;
  std::shared_ptr<model::Model> engine_model = engine.model;
  std::shared_ptr<const model::Tokenizer> tokenizer;
  if (std::filesystem::exists(dir + "/tokenizer.json")) {
    MOED_ASSIGN_OR_RETURN(tokenizer, model::Tokenizer::FromFile(dir + "/tokenizer.json"));
  } else {
    log.info("no tokenizer.json in {}: serving token ids only", dir);
  }
  // What the serving core needs beside the scheduler, which comes below.
  ServingParts serving;
  MOED_ASSIGN_OR_RETURN(std::optional<model::ChatTemplate> chat_template,
                        model::ChatTemplate::LoadForModel(dir, config.chat_template));
  MOED_ASSIGN_OR_RETURN(serving.tool_calls, model::ParseToolCallFormat(config.tool_call_parser));
  MOED_ASSIGN_OR_RETURN(serving.reasoning, model::ParseReasoningFormat(config.reasoning_parser));
  if (chat_template) {
    serving.tool_calls = chat_template->Resolve(serving.tool_calls);
    serving.reasoning = chat_template->Resolve(serving.reasoning);
    log.info("chat template from {} ({}); tool calls: {}, reasoning: {}", chat_template->origin(),
             absl::StrJoin(chat_template->names(), ", "),
             model::ToolCallFormatName(serving.tool_calls),
             model::ReasoningFormatName(serving.reasoning));
    info.set_chat_template(chat_template->origin());
    serving.chat_template = std::make_shared<const model::ChatTemplate>(*std::move(chat_template));
  } else {
    // Without a template "auto" has nothing to follow.
    if (serving.tool_calls == model::ToolCallFormat::kAuto)
      serving.tool_calls = model::ToolCallFormat::kNone;
    if (serving.reasoning == model::ReasoningFormat::kAuto)
      serving.reasoning = model::ReasoningFormat::kNone;
    log.info("{} has no chat template (chat_template.jinja or tokenizer_config.json)", dir);
  }
  info.set_tool_call_parser(std::string(model::ToolCallFormatName(serving.tool_calls)));
  info.set_reasoning_parser(std::string(model::ReasoningFormatName(serving.reasoning)));
  scheduler::SchedulerOptions scheduler_options;
  scheduler_options.max_batch = static_cast<int>(config.max_batch);
  scheduler_options.max_queue = static_cast<int>(config.max_queue);
  scheduler_options.max_tokens_per_step = static_cast<int>(config.max_tokens_per_step);
  scheduler_options.max_running = static_cast<int>(config.max_running);
  scheduler_options.expert_aware = config.expert_aware_batching;
  scheduler_options.max_delay_steps = static_cast<int>(config.max_delay_steps);
  if (daemon->cache_ != nullptr) {
    std::shared_ptr<cache::ExpertCache> expert_cache = daemon->cache_;
    scheduler_options.resident_experts = [expert_cache] { return expert_cache->DeviceResidency(); };
  }
  if (daemon->cache_ != nullptr) {
    serving.served_precision = daemon->cache_->options().precision;
    if (daemon->cache_->precision_policy().falls_back())
      serving.fallback_precision = daemon->cache_->precision_policy().options().fallback;
  }
  if (config.metrics) {
    MetricsInfo metrics_info;
    metrics_info.model_name = info.model_name();
    metrics_info.version = MOED_VERSION;
    metrics_info.backend = info.backend();
    metrics_info.architecture = info.architecture();
    metrics_info.expert_precision = std::string(cache::PrecisionName(serving.served_precision));
    metrics_info.num_layers = info.num_layers();
    metrics_info.num_experts = info.num_experts();
    metrics_info.experts_per_token = info.experts_per_token();
    metrics_info.expert_bytes = info.expert_bytes();
    serving.metrics = std::make_shared<ServingMetrics>(std::move(metrics_info));
    scheduler_options.observer = serving.metrics;
  }
  if (!config.record_routing.empty()) {
    std::shared_ptr<spdlog::logger> trace_log = daemon->logger_;
    scheduler_options.on_routing = [path = config.record_routing, trace_log, model_config, dir](
                                       const std::string& id, int prompt_tokens,
                                       const std::vector<std::vector<std::vector<int>>>& routing) {
      cache::RoutingTrace trace = cache::TraceFromRouting(
          routing, static_cast<int>(model_config.num_experts),
          static_cast<int>(model_config.experts_per_token), prompt_tokens, dir);
      trace.task = id;
      if (absl::Status s = cache::AppendRoutingTrace(path, trace); !s.ok())
        trace_log->warn("{}", s.message());
    };
  }
  daemon->scheduler_ =
      std::make_shared<scheduler::Scheduler>(engine_model, tokenizer, scheduler_options);
  serving.model_name = info.model_name();
  serving.max_context_tokens = info.max_context_tokens();
  serving.scheduler = daemon->scheduler_;
  serving.tokenizer = tokenizer;
  daemon->core_ = std::make_shared<ServingCore>(std::move(serving));
  OpenAiServiceOptions openai;
  openai.api_key = config.api_key;
  openai.system_fingerprint = absl::StrCat("moed-", MOED_VERSION, "-", info.backend());
  Daemon* self = daemon.get();
  openai.ready = [self] { return !self->draining_.load() && self->store_readable_.load(); };
  if (std::shared_ptr<ServingMetrics> metrics = daemon->core_->parts().metrics) {
    // The HTTP threads hold what a scrape reads, not the daemon.
    openai.metrics = [metrics, scheduler = daemon->scheduler_, cache = daemon->cache_,
                      prefetcher = daemon->prefetcher_] {
      return metrics->Render(scheduler->stats(), cache.get(), ReadProcessStats(), prefetcher.get());
    };
  }
  daemon->openai_service_ = std::make_unique<OpenAiService>(daemon->core_, std::move(openai));
  ServiceParts parts{std::move(info), daemon->backend_.get(), daemon->cache_, daemon->prefetcher_,
                     daemon->store_,  daemon->core_,          config.api_key};
  daemon->streams_ = std::make_unique<StreamLimit>(config.max_concurrent_streams);
  daemon->moed_service_ = std::make_unique<MoedService>(std::move(parts), daemon->streams_.get());
  daemon->health_service_ = std::make_unique<HealthService>(daemon->streams_.get());
  return daemon;
}

Daemon::~Daemon() {
  StopWatchingStore();
  if (server_) Shutdown(std::chrono::milliseconds(0));
}

namespace {

// Each open HTTP connection holds a descriptor: take the hard limit, not the soft default.
void RaiseDescriptorLimit(spdlog::logger& log) {
  rlimit limit{};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  const rlim_t before = limit.rlim_cur;
  limit.rlim_cur = limit.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &limit) == 0) {
    log.info("open file limit raised from {} to {}", before, limit.rlim_max);
  } else {
    log.warn("open file limit stays at {}: {}", before, std::strerror(errno));
  }
}

}  // namespace

absl::StatusOr<Daemon::Addresses> Daemon::Start() {
  std::string host;
  int port = 0;
  MOED_RETURN_IF_ERROR(SplitHostPort(config_.listen, &host, &port));
  health_service_->SetStatus("", grpc::health::v1::HealthCheckResponse::NOT_SERVING);
  health_service_->SetStatus("moed.v1.Moed", grpc::health::v1::HealthCheckResponse::NOT_SERVING);

  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default, which would let a second daemon share a taken port.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  // gRPC's own limit (4 MiB by default) would refuse a long prompt before moed's checks, which
  // name the limit: let through the longest prompt moed accepts and the rest of a request.
  builder.SetMaxReceiveMessageSize(static_cast<int>(ServingCore::kMaxPromptBytes + (1 << 20)));
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
  Addresses addresses;
  addresses.grpc = absl::StrCat(host, ":", bound_port);
  if (!config_.http_listen.empty()) {
    RaiseDescriptorLimit(*logger_);
    HttpLimits limits;
    limits.max_connections = config_.max_connections;
    limits.max_body_bytes = static_cast<size_t>(config_.http_max_body_bytes);
    limits.idle_timeout = std::chrono::seconds(config_.http_idle_seconds);
    OpenAiService* service = openai_service_.get();
    absl::StatusOr<std::unique_ptr<HttpServer>> http =
        HttpServer::Start(config_.http_listen, limits,
                          [service](HttpRequest request, std::shared_ptr<HttpExchange> exchange) {
                            service->Handle(std::move(request), std::move(exchange));
                          });
    if (!http.ok()) {
      server_->Shutdown();
      server_.reset();
      return http.status();
    }
    http_server_ = *std::move(http);
    addresses.http = http_server_->address();
    logger_->info("serving HTTP on {}", addresses.http);
  }
  // The model is loaded before Start(), so the daemon is ready as soon as it listens.
  health_service_->SetStatus("", grpc::health::v1::HealthCheckResponse::SERVING);
  health_service_->SetStatus("moed.v1.Moed", grpc::health::v1::HealthCheckResponse::SERVING);
  if (cache_ != nullptr) store_watcher_ = std::thread([this] { WatchStore(); });
  logger_->info("serving gRPC on {}", addresses.grpc);
  return addresses;
}

void Daemon::WatchStore() {
  std::unique_lock lock(watcher_mutex_);
  while (!watcher_wake_.wait_for(lock, kStoreCheckInterval, [&] { return stop_watching_; })) {
    lock.unlock();
    const cache::StoreHealth health = cache_->CheckStore();
    lock.lock();
    if (stop_watching_) return;
    if (health.readable == store_readable_.load()) continue;
    store_readable_ = health.readable;
    const auto status = health.readable ? grpc::health::v1::HealthCheckResponse::SERVING
                                        : grpc::health::v1::HealthCheckResponse::NOT_SERVING;
    health_service_->SetStatus("", status);
    health_service_->SetStatus("moed.v1.Moed", status);
    if (health.readable) {
      logger_->info("the expert store reads again: serving");
    } else {
      logger_->error("the expert store cannot be read ({}): not serving until it can",
                     health.reason);
    }
  }
}

void Daemon::StopWatchingStore() {
  {
    std::lock_guard lock(watcher_mutex_);
    stop_watching_ = true;
  }
  watcher_wake_.notify_all();
  if (store_watcher_.joinable()) store_watcher_.join();
}

void Daemon::Drain(std::chrono::seconds limit, const std::function<bool()>& stop_now) {
  draining_ = true;
  StopWatchingStore();  // it must not turn health back to SERVING
  scheduler_->StopAccepting();
  health_service_->Shutdown();
  // Polls until the scheduler is idle (true), the time is up or `stop` says so (false).
  auto wait_idle = [&](std::chrono::steady_clock::duration within,
                       const std::function<bool()>& stop) {
    const auto deadline = std::chrono::steady_clock::now() + within;
    while (!scheduler_->Idle()) {
      if (std::chrono::steady_clock::now() >= deadline || (stop && stop())) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return true;
  };
  bool interrupted = false;
  auto stop_requested = [&] {
    interrupted = stop_now && stop_now();
    return interrupted;
  };
  if (wait_idle(limit, stop_requested)) return;
  const scheduler::SchedulerStats stats = scheduler_->stats();
  logger_->warn("{}: cancelling {} running and {} waiting requests",
                interrupted ? "drain ended early" : "drain time is up", stats.running,
                stats.waiting);
  // Each ends at the next step boundary with its last message (cancelled, with usage).
  scheduler_->CancelAll();
  wait_idle(std::chrono::seconds(5), {});
}

void Daemon::Shutdown(std::chrono::milliseconds grace) {
  StopWatchingStore();
  if (http_server_) http_server_->Stop(std::max(grace, std::chrono::milliseconds(5000)));
  if (!server_) return;
  health_service_->Shutdown();
  server_->Shutdown(std::chrono::system_clock::now() + grace);
  server_->Wait();
  server_.reset();
  logger_->info("stopped");
}

}  // namespace moed::server
