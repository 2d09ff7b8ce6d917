// The daemon: loads the model named by the configuration, picks the compute backend and
// serves the gRPC API until told to stop.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "cache/expert_cache.h"
#include "grpcpp/server.h"
#include "kernels/backend.h"
#include "model/chat_template.h"
#include "model/model_config.h"
#include "model/tokenizer.h"
#include "moed/v1/moed.grpc.pb.h"
#include "scheduler/scheduler.h"
#include "server/config.h"
#include "server/health_service.h"
#include "server/http_server.h"
#include "server/openai_service.h"
#include "server/serving_core.h"
#include "server/stream_limit.h"
#include "spdlog/logger.h"

namespace moed::server {

class MoedService;

class Daemon {
 public:
  static absl::StatusOr<std::unique_ptr<Daemon>> Create(const DaemonConfig& config,
                                                        std::shared_ptr<spdlog::logger> logger);
  ~Daemon();

  struct Addresses {
    std::string grpc;  // the bound "host:port"
    std::string http;  // empty when --http-listen is ""
  };
  // Binds the listening addresses and starts serving.
  absl::StatusOr<Addresses> Start();
  // Stops accepting requests (new ones get UNAVAILABLE, health says NOT_SERVING) and waits up
  // to `limit` for those in flight to finish, or until `stop_now` (polled) says to end at once.
  // Requests still waiting or running then end with FINISH_REASON_CANCELLED and their usage;
  // their last messages are handed to the connections within a few seconds.
  void Drain(std::chrono::seconds limit, const std::function<bool()>& stop_now = {});
  // Stops accepting calls, lets calls in flight finish for up to `grace`, then cancels them.
  void Shutdown(std::chrono::milliseconds grace);

 private:
  Daemon() = default;

  DaemonConfig config_;
  std::shared_ptr<spdlog::logger> logger_;
  std::shared_ptr<kernels::Backend> backend_;
  std::shared_ptr<cache::Store> store_;
  std::shared_ptr<cache::ExpertCache> cache_;
  std::shared_ptr<cache::Prefetcher> prefetcher_;
  // Declared before the scheduler, so destroyed after it: no event reaches a dead connection.
  std::unique_ptr<HttpServer> http_server_;
  std::unique_ptr<OpenAiService> openai_service_;
  std::atomic<bool> draining_{false};
  // The store watcher: readiness follows whether the expert store can be read.
  static constexpr std::chrono::milliseconds kStoreCheckInterval{250};
  void WatchStore();
  void StopWatchingStore();
  std::atomic<bool> store_readable_{true};
  std::mutex watcher_mutex_;
  std::condition_variable watcher_wake_;
  bool stop_watching_ = false;
  std::thread store_watcher_;
  std::shared_ptr<scheduler::Scheduler> scheduler_;
  std::shared_ptr<ServingCore> core_;
  std::unique_ptr<StreamLimit> streams_;
  std::unique_ptr<MoedService> moed_service_;
  std::unique_ptr<HealthService> health_service_;
  std::unique_ptr<grpc::Server> server_;
};

// ModelInfo's static part, from the model's config and the checkpoint or store directory.
v1::ModelInfoResponse DescribeModel(const model::ModelConfig& config, const DaemonConfig& daemon);
void FillDevice(const kernels::DeviceInfo& info, v1::Device* device);
// `prefetcher` is null when prefetch is off.
void FillCacheInfo(const cache::ExpertCache& cache, const cache::Store& store,
                   const cache::Prefetcher* prefetcher, v1::ExpertCacheInfo* info);

}  // namespace moed::server
