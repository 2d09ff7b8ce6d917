#include "kernels/thread_pool.h"

#include <immintrin.h>

#include <algorithm>
#include <chrono>

namespace moed::kernels {
namespace {

// A decode step issues hundreds of short parallel loops; sleeping on a condition variable
// between them costs a futex round trip each, so a thread spins this long before it sleeps.
// Measured in time, not in pause instructions: a pause costs ~10 cycles on some cores and ~140
// on others.
constexpr std::chrono::microseconds kSpin{50};
// More chunks than threads lets the threads that run take over the share of one that does not
// (another process on the same cores); few enough that claiming costs nothing.
constexpr int64_t kChunksPerThread = 4;
constexpr uint64_t kChunkMask = 0xffff;

uint64_t LoopOf(uint64_t claim) { return claim >> 32; }
uint64_t ChunksOf(uint64_t claim) { return (claim >> 16) & kChunkMask; }
uint64_t NextOf(uint64_t claim) { return claim & kChunkMask; }

// Spins until done() or kSpin has passed; returns done().
template <typename Done>
bool SpinUntil(const Done& done) {
  auto deadline = std::chrono::steady_clock::now() + kSpin;
  while (!done()) {
    for (int i = 0; i < 16; ++i) _mm_pause();
    if (std::chrono::steady_clock::now() >= deadline) return done();
  }
  return true;
}

}  // namespace

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int i = 1; i < threads; ++i) workers_.emplace_back(&ThreadPool::WorkerLoop, this);
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mutex_);
    stopping_.store(true, std::memory_order_release);
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

int64_t ThreadPool::ChunksFor(int64_t count) const {
  return std::min<int64_t>({count, size() * kChunksPerThread, static_cast<int64_t>(kChunkMask)});
}

void ThreadPool::ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  if (size() == 1 || count == 1) {
    body(0, count);
    return;
  }
  const auto chunks = static_cast<uint64_t>(ChunksFor(count));
  body_ = &body;
  count_ = count;
  finished_.store(0, std::memory_order_relaxed);
  const uint64_t loop = LoopOf(claim_.load(std::memory_order_relaxed)) + 1;
  claim_.store((loop << 32) | (chunks << 16), std::memory_order_release);
  {
    std::lock_guard lock(mutex_);  // pairs with the workers' predicate check
    generation_.fetch_add(1, std::memory_order_release);
  }
  work_ready_.notify_all();
  RunChunks();
  auto all_finished = [&] {
    return finished_.load(std::memory_order_acquire) == static_cast<int64_t>(chunks);
  };
  if (!SpinUntil(all_finished)) {
    std::unique_lock lock(mutex_);
    work_done_.wait(lock, all_finished);
  }
}

void ThreadPool::RunChunks() {
  uint64_t claim = claim_.load(std::memory_order_acquire);
  while (NextOf(claim) < ChunksOf(claim)) {
    if (!claim_.compare_exchange_weak(claim, claim + 1, std::memory_order_acq_rel,
                                      std::memory_order_acquire)) {
      continue;
    }
    const auto chunks = static_cast<int64_t>(ChunksOf(claim));
    const auto chunk = static_cast<int64_t>(NextOf(claim));
    const int64_t begin = count_ * chunk / chunks;
    const int64_t end = count_ * (chunk + 1) / chunks;
    if (begin < end) (*body_)(begin, end);
    if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) {
      std::lock_guard lock(mutex_);
      work_done_.notify_one();
    }
    // The chunk just finished may have been the loop's last: whatever the word says now
    // belongs to the next loop or to none, and the compare-exchange keeps the two apart.
    claim = claim_.load(std::memory_order_acquire);
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  while (true) {
    auto woken = [&] {
      return stopping_.load(std::memory_order_acquire) ||
             generation_.load(std::memory_order_acquire) != seen;
    };
    if (!SpinUntil(woken)) {
      std::unique_lock lock(mutex_);
      work_ready_.wait(lock, woken);
    }
    if (stopping_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    RunChunks();
  }
}

}  // namespace moed::kernels
