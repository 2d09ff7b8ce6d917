#include "kernels/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <catch2/catch.hpp>
#include <vector>

namespace moed::kernels {
namespace {

TEST_CASE("ParallelFor covers every index exactly once, repeatedly") {
  for (int threads : {1, 2, 3, 8}) {
    ThreadPool pool(threads);
    CHECK(pool.size() == threads);
    for (int64_t count : {0, 1, 2, 5, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<size_t>(count));
      for (int round = 0; round < 3; ++round) {
        pool.ParallelFor(count, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) hits[i]++;
        });
      }
      for (auto& h : hits) REQUIRE(h.load() == 3);
    }
  }
}


TEST_CASE("ParallelFor splits a loop into a few chunks per thread, bounds fixed by count") {
  ThreadPool pool(2);
  for (int64_t count : {2, 7, 8, 9, 1000}) {
    const int64_t chunks = std::min<int64_t>(count, 8);
    CHECK(pool.ChunksFor(count) == chunks);
    std::mutex mutex;
    std::set<std::pair<int64_t, int64_t>> seen;
    pool.ParallelFor(count, [&](int64_t begin, int64_t end) {
      std::lock_guard lock(mutex);
      seen.emplace(begin, end);
    });
    std::set<std::pair<int64_t, int64_t>> expected;
    for (int64_t i = 0; i < chunks; ++i) expected.emplace(count * i / chunks, count * (i + 1) / chunks);
    CHECK(seen == expected);
  }
}

TEST_CASE("a thread held up inside its chunk delays the loop by that chunk only") {
  // A worker that stalls (as one the OS has descheduled does) keeps the chunk it holds; the
  // calling thread takes every other chunk instead of waiting for the worker's share.
  ThreadPool pool(2);
  const auto caller = std::this_thread::get_id();
  for (int round = 0; round < 5; ++round) {
    std::atomic<int64_t> by_caller{0}, by_worker{0};
    pool.ParallelFor(1000, [&](int64_t begin, int64_t end) {
      if (std::this_thread::get_id() == caller) {
        by_caller += end - begin;
        return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      by_worker += end - begin;
    });
    CHECK(by_caller + by_worker == 1000);
    CHECK(by_worker <= 1000 / pool.ChunksFor(1000) + 1);
  }
}

}  // namespace
}  // namespace moed::kernels
