// The daemon's bound on open gRPC streams (Generate and health Watch together): past it a new
// stream is refused with RESOURCE_EXHAUSTED instead of taking memory a client decides.
#pragma once

#include <atomic>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "grpcpp/support/status.h"

namespace moed::server {

class StreamLimit {
 public:
  explicit StreamLimit(int64_t max_streams) : max_(max_streams) {}

  // True when a stream may open; it must then call Release() once when it ends.
  bool TryAcquire() {
    if (open_.fetch_add(1, std::memory_order_relaxed) + 1 > max_) {
      open_.fetch_sub(1, std::memory_order_relaxed);
      return false;
    }
    return true;
  }
  void Release() { open_.fetch_sub(1, std::memory_order_relaxed); }
  int64_t open() const { return open_.load(std::memory_order_relaxed); }

  grpc::Status Refusal() const {
    return grpc::Status(
        grpc::StatusCode::RESOURCE_EXHAUSTED,
        absl::StrCat("too many open streams: ", max_, " are open (--max-concurrent-streams)"));
  }

 private:
  std::atomic<int64_t> open_{0};
  const int64_t max_;
};

}  // namespace moed::server
