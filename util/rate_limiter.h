// Lets at most N events through per interval and counts the rest, so that the next event let
// through can say how many were dropped: log lines that a failing disk would otherwise repeat
// thousands of times a second.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>

namespace moed::util {

class RateLimiter {
 public:
  using Clock = std::chrono::steady_clock;

  RateLimiter(int per_interval, Clock::duration interval)
      : per_interval_(per_interval), interval_(interval) {}

  // True when the event at `now` may go through; then *dropped is the number of events refused
  // since the last one that went through.
  bool Allow(Clock::time_point now, uint64_t* dropped) {
    std::lock_guard lock(mutex_);
    if (now - window_start_ >= interval_) {
      window_start_ = now;
      allowed_in_window_ = 0;
    }
    if (allowed_in_window_ >= per_interval_) {
      ++dropped_;
      return false;
    }
    ++allowed_in_window_;
    *dropped = dropped_;
    dropped_ = 0;
    return true;
  }

 private:
  std::mutex mutex_;
  const int per_interval_;
  const Clock::duration interval_;
  Clock::time_point window_start_{};
  int allowed_in_window_ = 0;
  uint64_t dropped_ = 0;
};

}  // namespace moed::util
