// A histogram with fixed bucket bounds that many threads record into without a lock: one
// relaxed atomic add per observation for the bucket and one for the sum. Readers take a
// snapshot; it is exact once recording has stopped and off by observations in flight otherwise.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace moed::util {

struct HistogramSnapshot {
  std::vector<double> bounds;     // upper bounds, ascending; +Inf is implied
  std::vector<uint64_t> buckets;  // bounds.size() + 1 counts, not cumulative; the last is +Inf
  double sum = 0;
  uint64_t count() const {
    uint64_t n = 0;
    for (uint64_t b : buckets) n += b;
    return n;
  }
};

class Histogram {
 public:
  // `bounds` must be ascending; a value equal to a bound falls in that bound's bucket.
  explicit Histogram(std::vector<double> bounds)
      : bounds_(std::move(bounds)),
        buckets_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {}

  void Observe(double value) {
    const size_t bucket = static_cast<size_t>(
        std::lower_bound(bounds_.begin(), bounds_.end(), value) - bounds_.begin());
    buckets_[bucket].fetch_add(1, std::memory_order_relaxed);
    sum_.fetch_add(value, std::memory_order_relaxed);
  }

  HistogramSnapshot Snapshot() const {
    HistogramSnapshot s;
    s.bounds = bounds_;
    s.buckets.resize(bounds_.size() + 1);
    for (size_t i = 0; i <= bounds_.size(); ++i)
      s.buckets[i] = buckets_[i].load(std::memory_order_relaxed);
    s.sum = sum_.load(std::memory_order_relaxed);
    return s;
  }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> buckets_;
  std::atomic<double> sum_{0};
};

}  // namespace moed::util
