#include "kernels/thread_pool.h"

#include <immintrin.h>

#include <algorithm>

namespace moed::kernels {
namespace {

// A decode step issues hundreds of short parallel loops; sleeping on a condition variable
// between them costs a futex round trip each. Spin this many pauses (tens of microseconds)
// before sleeping.
constexpr int kSpinIterations = 20000;

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < threads; ++i) workers_.emplace_back(&ThreadPool::WorkerLoop, this, i);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_.store(true, std::memory_order_release);
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

void ThreadPool::ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  const int parts = size();
  if (parts == 1 || count == 1) {
    body(0, count);
    return;
  }
  body_ = &body;
  count_ = count;
  pending_.store(parts - 1, std::memory_order_relaxed);
  {
    std::lock_guard lock(mutex_);  // pairs with the workers' predicate check
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_ready_.notify_all();
  body(0, count / parts);  // the caller takes range 0
  for (int spin = 0; spin < kSpinIterations && pending_.load(std::memory_order_acquire) != 0;
       ++spin) {
    _mm_pause();
  }
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock lock(mutex_);
    work_done_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
  }
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  while (true) {
    for (int spin = 0;
         spin < kSpinIterations && generation_.load(std::memory_order_acquire) == seen &&
         !stopping_.load(std::memory_order_acquire);
         ++spin) {
      _mm_pause();
    }
    if (generation_.load(std::memory_order_acquire) == seen &&
        !stopping_.load(std::memory_order_acquire)) {
      std::unique_lock lock(mutex_);
      work_ready_.wait(lock, [&] {
        return stopping_.load(std::memory_order_acquire) ||
               generation_.load(std::memory_order_acquire) != seen;
      });
    }
    if (stopping_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    const int parts = size();
    int64_t begin = count_ * index / parts;
    int64_t end = count_ * (index + 1) / parts;
    if (begin < end) (*body_)(begin, end);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard lock(mutex_);
      work_done_.notify_one();
    }
  }
}

}  // namespace moed::kernels
