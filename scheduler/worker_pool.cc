#include "scheduler/worker_pool.h"

namespace moed::scheduler {

WorkerPool::WorkerPool(int threads) {
  for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { Work(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  start_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void WorkerPool::RunIterations(const std::function<void(size_t)>& body, size_t count) {
  for (size_t i = next_.fetch_add(1); i < count; i = next_.fetch_add(1)) {
    body(i);
    if (finished_.fetch_add(1) + 1 == count) {
      std::lock_guard lock(mutex_);
      done_.notify_all();
    }
  }
}

void WorkerPool::ParallelFor(size_t count, const std::function<void(size_t)>& body) {
  if (count == 0) return;
  if (workers_.empty() || count == 1) {
    for (size_t i = 0; i < count; ++i) body(i);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    body_ = &body;
    count_ = count;
    next_ = 0;
    finished_ = 0;
    ++generation_;
  }
  start_.notify_all();
  RunIterations(body, count);
  std::unique_lock lock(mutex_);
  // Every call returned, and no worker still holds the loop (a late one leaves at once).
  done_.wait(lock, [&] { return finished_.load() == count && busy_workers_ == 0; });
  body_ = nullptr;
  count_ = 0;
}

void WorkerPool::Work() {
  uint64_t seen = 0;
  std::unique_lock lock(mutex_);
  while (true) {
    start_.wait(lock, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    if (body_ == nullptr) continue;  // woke after the loop ended
    const std::function<void(size_t)>& body = *body_;
    const size_t count = count_;
    ++busy_workers_;
    lock.unlock();
    RunIterations(body, count);
    lock.lock();
    --busy_workers_;
    done_.notify_all();
  }
}

}  // namespace moed::scheduler
