// A fixed set of worker threads for fork-join loops. Owned by whoever computes (a backend),
// never global.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moed::kernels {

class ThreadPool {
 public:
  // 0 threads means one per hardware thread. The calling thread works too.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, count) into size() contiguous ranges and runs body(begin, end) on each, in
  // parallel; returns when all are done. Which thread gets which range never changes what is
  // computed: callers write disjoint outputs.
  void ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body);

 private:
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  // Published by the release increment of generation_.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace moed::kernels
