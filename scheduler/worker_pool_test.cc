#include "scheduler/worker_pool.h"

#include <catch2/catch.hpp>
#include <set>
#include <thread>
#include <vector>

namespace moed::scheduler {
namespace {

TEST_CASE("a worker pool calls every iteration once, on several threads, loop after loop") {
  for (int threads : {1, 2, 4}) {
    WorkerPool pool(threads);
    CHECK(pool.threads() == threads);
    for (size_t count : {size_t{0}, size_t{1}, size_t{3}, size_t{64}, size_t{1000}}) {
      INFO(threads << " threads, " << count << " iterations");
      std::vector<std::atomic<int>> calls(count);
      std::mutex mutex;
      std::set<std::thread::id> ran_on;
      pool.ParallelFor(count, [&](size_t i) {
        ++calls[i];
        std::lock_guard lock(mutex);
        ran_on.insert(std::this_thread::get_id());
      });
      for (size_t i = 0; i < count; ++i) CHECK(calls[i].load() == 1);
      CHECK(ran_on.size() <= static_cast<size_t>(threads));
    }
  }
  // Iterations that wait for each other finish only if they run at the same time.
  WorkerPool pool(2);
  std::atomic<int> arrived{0};
  pool.ParallelFor(2, [&](size_t) {
    ++arrived;
    while (arrived.load() < 2) std::this_thread::yield();
  });
  CHECK(arrived.load() == 2);
}

}  // namespace
}  // namespace moed::scheduler
