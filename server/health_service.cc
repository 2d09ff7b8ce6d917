#include "server/health_service.h"

#include <chrono>

namespace moed::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

void HealthService::SetStatus(const std::string& service, ServingStatus status) {
  std::lock_guard lock(mutex_);
  if (shut_down_) return;
  statuses_[service] = status;
  changed_.notify_all();
}

void HealthService::Shutdown() {
  std::lock_guard lock(mutex_);
  shut_down_ = true;
  for (auto& [name, status] : statuses_) status = HealthCheckResponse::NOT_SERVING;
  changed_.notify_all();
}

grpc::Status HealthService::Check(grpc::ServerContext* /*context*/,
                                  const HealthCheckRequest* request,
                                  HealthCheckResponse* response) {
  std::lock_guard lock(mutex_);
  auto it = statuses_.find(request->service());
  if (it == statuses_.end()) {
    return grpc::Status(grpc::StatusCode::NOT_FOUND,
                        "unknown service '" + request->service() + "'");
  }
  response->set_status(it->second);
  return grpc::Status::OK;
}

grpc::Status HealthService::Watch(grpc::ServerContext* context, const HealthCheckRequest* request,
                                  grpc::ServerWriter<HealthCheckResponse>* writer) {
  std::unique_lock lock(mutex_);
  bool first = true;
  ServingStatus last = HealthCheckResponse::UNKNOWN;
  while (true) {
    auto it = statuses_.find(request->service());
    ServingStatus now = it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
    if (first || now != last) {
      HealthCheckResponse response;
      response.set_status(now);
      lock.unlock();
      bool written = writer->Write(response);
      lock.lock();
      if (!written) return grpc::Status(grpc::StatusCode::CANCELLED, "client went away");
      first = false;
      last = now;
    }
    if (shut_down_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "the daemon is stopping");
    // Cancellation is not signalled through our condition variable: poll for it.
    changed_.wait_for(lock, std::chrono::milliseconds(200));
    if (context->IsCancelled()) return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
  }
}

}  // namespace moed::server
