#include "server/health_service.h"

#include <optional>
#include <utility>
#include <vector>

namespace moed::server {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

// One Watch stream. It writes the service's status when the stream opens and whenever it
// changes, one write at a time, and holds no thread between writes. Decisions are taken under
// its lock; gRPC is called outside every lock (a reaction may run on the calling thread).
class HealthService::Watcher final : public grpc::ServerWriteReactor<HealthCheckResponse> {
 public:
  // What to do outside the locks: nothing, start the write prepared, or finish.
  struct Action {
    bool write = false;
    std::optional<grpc::Status> finish;
  };

  Watcher(HealthService* service, std::string name) : service_(service), name_(std::move(name)) {}
  const std::string& name() const { return name_; }

  void Start() {
    if (!service_->streams_->TryAcquire()) {
      Finish(service_->streams_->Refusal());
      return;
    }
    counted_ = true;
    Action action;
    {
      std::lock_guard service_lock(service_->mutex_);
      if (service_->shut_down_) {
        std::lock_guard lock(mutex_);
        finished_ = true;
        action.finish = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the daemon is stopping");
      } else {
        service_->watchers_.insert(this);
        action = Update(service_->StatusLocked(name_), false);
      }
    }
    Perform(action);
  }

  // The status is now `status` (with `closing`, the last: the stream ends once it is written).
  // Called with the service's lock held; the caller performs the action after releasing it
  // (the stream cannot end before: a write started or a finish chosen here is still to come).
  Action Update(ServingStatus status, bool closing) {
    std::lock_guard lock(mutex_);
    if (finished_) return {};
    latest_ = status;
    closing_ = closing_ || closing;
    if (writing_) return {};
    return NextLocked();
  }

  void Perform(const Action& action) {
    if (action.finish.has_value()) {
      Finish(*action.finish);
    } else if (action.write) {
      StartWrite(&response_);
    }
  }

  void OnWriteDone(bool ok) override {
    Action action;
    {
      std::lock_guard lock(mutex_);
      writing_ = false;
      if (!ok || cancelled_) {
        finished_ = true;
        action.finish = grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
      } else {
        action = NextLocked();
      }
    }
    Perform(action);
  }

  void OnCancel() override {
    {
      std::lock_guard lock(mutex_);
      cancelled_ = true;
      if (finished_ || writing_) return;  // the write in flight ends the stream when done
      finished_ = true;
    }
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "cancelled"));
  }

  void OnDone() override {
    {
      std::lock_guard lock(service_->mutex_);
      service_->watchers_.erase(this);
    }
    if (counted_) service_->streams_->Release();
    delete this;
  }

 private:
  // With mutex_ held and no write in flight: prepares the write of a changed status, or ends a
  // closing stream whose last status is written.
  Action NextLocked() {
    Action action;
    if (!written_.has_value() || *written_ != latest_) {
      written_ = latest_;
      response_.set_status(latest_);
      writing_ = true;
      action.write = true;
    } else if (closing_) {
      finished_ = true;
      action.finish = grpc::Status(grpc::StatusCode::UNAVAILABLE, "the daemon is stopping");
    }
    return action;
  }

  HealthService* service_;
  const std::string name_;
  bool counted_ = false;
  std::mutex mutex_;
  bool writing_ = false;
  bool finished_ = false;
  bool closing_ = false;
  bool cancelled_ = false;
  ServingStatus latest_ = HealthCheckResponse::UNKNOWN;
  std::optional<ServingStatus> written_;
  HealthCheckResponse response_;
};

HealthService::ServingStatus HealthService::StatusLocked(const std::string& service) const {
  auto it = statuses_.find(service);
  return it == statuses_.end() ? HealthCheckResponse::SERVICE_UNKNOWN : it->second;
}

void HealthService::SetStatus(const std::string& service, ServingStatus status) {
  std::vector<std::pair<Watcher*, Watcher::Action>> actions;
  {
    std::lock_guard lock(mutex_);
    if (shut_down_) return;
    statuses_[service] = status;
    for (Watcher* watcher : watchers_) {
      if (watcher->name() == service) actions.emplace_back(watcher, watcher->Update(status, false));
    }
  }
  for (auto& [watcher, action] : actions) watcher->Perform(action);
}

void HealthService::Shutdown() {
  std::vector<std::pair<Watcher*, Watcher::Action>> actions;
  {
    std::lock_guard lock(mutex_);
    shut_down_ = true;
    for (auto& [name, status] : statuses_) status = HealthCheckResponse::NOT_SERVING;
    for (Watcher* watcher : watchers_)
      actions.emplace_back(watcher, watcher->Update(StatusLocked(watcher->name()), true));
  }
  for (auto& [watcher, action] : actions) watcher->Perform(action);
}

grpc::ServerUnaryReactor* HealthService::Check(grpc::CallbackServerContext* context,
                                               const HealthCheckRequest* request,
                                               HealthCheckResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  grpc::Status status = grpc::Status::OK;
  {
    std::lock_guard lock(mutex_);
    auto it = statuses_.find(request->service());
    if (it == statuses_.end()) {
      status =
          grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown service '" + request->service() + "'");
    } else {
      response->set_status(it->second);
    }
  }
  reactor->Finish(status);
  return reactor;
}

grpc::ServerWriteReactor<HealthCheckResponse>* HealthService::Watch(
    grpc::CallbackServerContext* /*context*/, const HealthCheckRequest* request) {
  auto* watcher = new Watcher(this, request->service());
  watcher->Start();
  return watcher;
}

}  // namespace moed::server
