#include "kernels/thread_pool.h"

#include <atomic>
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

}  // namespace
}  // namespace moed::kernels
