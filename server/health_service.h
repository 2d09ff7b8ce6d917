// grpc.health.v1.Health: Check and Watch for the daemon as a whole ("") and per service.
#pragma once

#include <condition_variable>
#include <map>
#include <mutex>
#include <string>

#include "grpc/health/v1/health.grpc.pb.h"

namespace moed::server {

class HealthService final : public grpc::health::v1::Health::Service {
 public:
  using ServingStatus = grpc::health::v1::HealthCheckResponse::ServingStatus;

  // Registers or updates a service's status; Watch streams see the change.
  void SetStatus(const std::string& service, ServingStatus status);
  // Every registered service becomes NOT_SERVING and every Watch stream ends.
  void Shutdown();

  grpc::Status Check(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::health::v1::HealthCheckResponse* response) override;
  grpc::Status Watch(grpc::ServerContext* context,
                     const grpc::health::v1::HealthCheckRequest* request,
                     grpc::ServerWriter<grpc::health::v1::HealthCheckResponse>* writer) override;

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  std::map<std::string, ServingStatus> statuses_;
  bool shut_down_ = false;
};

}  // namespace moed::server
