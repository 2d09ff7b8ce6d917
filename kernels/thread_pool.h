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

  // Splits [0, count) into contiguous chunks (a few per thread, their bounds a function of
  // count and size() only) and runs body(begin, end) on each, in parallel; returns when all are
  // done. Threads take chunks as they come free, so a thread the OS has descheduled delays the
  // loop by at most the chunk it holds. Which thread runs which chunk never changes what is
  // computed: callers write disjoint outputs.
  void ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body);

  // Chunks a loop of `count` items is split into.
  int64_t ChunksFor(int64_t count) const;

 private:
  void WorkerLoop();
  // Claims and runs chunks of the current loop until none is left.
  void RunChunks();

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  // The current loop: (loop number << 32) | (chunk count << 16) | next unclaimed chunk. A
  // thread claims a chunk with a compare-exchange on the whole word, so a late thread can never
  // claim a chunk of a loop other than the one it read.
  std::atomic<uint64_t> claim_{0};
  // Read only by a thread holding a claimed, unfinished chunk: the caller does not rewrite
  // them until every chunk is finished.
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> finished_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stopping_{false};
};

}  // namespace moed::kernels
