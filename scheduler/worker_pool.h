// A loop's iterations spread over a few threads that wait between loops, the caller's among
// them: the scheduler samples a step's sequences with it.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moed::scheduler {

class WorkerPool {
 public:
  // `threads` in all, the caller's included (1 or less: the caller alone).
  explicit WorkerPool(int threads);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  int threads() const { return static_cast<int>(workers_.size()) + 1; }
  // Calls body(i) once for every i < count, on any of the threads, and returns when every call
  // has returned. One loop at a time.
  void ParallelFor(size_t count, const std::function<void(size_t)>& body);

 private:
  void Work();
  // Takes iterations until none is left.
  void RunIterations(const std::function<void(size_t)>& body, size_t count);

  std::mutex mutex_;
  std::condition_variable start_, done_;
  const std::function<void(size_t)>* body_ = nullptr;  // the current loop's; null between loops
  size_t count_ = 0;
  uint64_t generation_ = 0;  // loops started
  int busy_workers_ = 0;     // workers inside the current loop
  bool stopping_ = false;
  std::atomic<size_t> next_{0};
  std::atomic<size_t> finished_{0};
  std::vector<std::thread> workers_;
};

}  // namespace moed::scheduler
