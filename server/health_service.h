// grpc.health.v1.Health: Check and Watch for the daemon as a whole ("") and per service, on
// gRPC's callback API, so that an idle Watch stream holds no thread.
#pragma once

#include <map>
#include <mutex>
#include <set>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"
#include "server/stream_limit.h"

namespace moed::server {

class HealthService final : public grpc::health::v1::Health::CallbackService {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Watch streams count against `streams`, which must outlive the service.
  explicit HealthService(StreamLimit* streams) : streams_(streams) {}

  // Registers or updates a service's status; Watch streams see the change.
  void SetStatus(const std::string& service, ServingStatus status);
  // Every registered service becomes NOT_SERVING and every Watch stream ends.
  void Shutdown();

  grpc::ServerUnaryReactor* Check(grpc::CallbackServerContext* context,
                                  const grpc::health::v1::HealthCheckRequest* request,
                                  grpc::health::v1::HealthCheckResponse* response) override;
  grpc::ServerWriteReactor<grpc::health::v1::HealthCheckResponse>* Watch(
      grpc::CallbackServerContext* context,
      const grpc::health::v1::HealthCheckRequest* request) override;

 private:
  class Watcher;
  ServingStatus StatusLocked(const std::string& service) const;

  StreamLimit* streams_;
  std::mutex mutex_;
  std::map<std::string, ServingStatus> statuses_;
  std::set<Watcher*> watchers_;
  bool shut_down_ = false;
};

}  // namespace moed::server
