// The readers against the bytes of a file (io_uring must be permitted where the tests run):
// every read arrives whole at any queue depth, and a ring that refuses submissions fails its
// reads instead of losing them.
#include "cache/block_reader.h"

#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <vector>

#include "cache/aligned_buffer.h"
#include "cache/store_fault.h"

namespace moed::cache {
namespace {

namespace fs = std::filesystem;

constexpr uint64_t kBlock = 4096;

struct File {
  File() {
    path = fs::temp_directory_path() / ("moed_block_reader_test_" + std::to_string(getpid()));
    std::ofstream out(path, std::ios::binary);
    for (uint64_t i = 0; i < kBlocks * kBlock; ++i)
      out.put(static_cast<char>((i * 7 + i / 4096) & 0xFF));
  }
  ~File() { fs::remove(path); }
  static constexpr uint64_t kBlocks = 64;
  fs::path path;
};

// Collects completions; Wait() returns them once `count` have come, or after 10 s.
struct Completions {
  void Add(uint64_t tag, absl::Status status) {
    std::lock_guard lock(mutex);
    got[tag] = {status.code(), std::string(status.message())};
    changed.notify_all();
  }
  bool Wait(size_t count) {
    std::unique_lock lock(mutex);
    return changed.wait_for(lock, std::chrono::seconds(10), [&] { return got.size() >= count; });
  }
  std::mutex mutex;
  std::condition_variable changed;
  std::map<uint64_t, std::pair<absl::StatusCode, std::string>> got;
};

bool BlockMatches(const uint8_t* data, uint64_t block) {
  for (uint64_t i = 0; i < kBlock; ++i) {
    const uint64_t at = block * kBlock + i;
    if (data[i] != static_cast<uint8_t>((at * 7 + at / 4096) & 0xFF)) return false;
  }
  return true;
}

TEST_CASE("io_uring and pread readers deliver every block's bytes, past the end fails short") {
  File file;
  for (bool uring : {true, false}) {
    INFO(uring);
    Completions done;
    ReaderOptions options;
    options.queue_depth = 3;
    options.max_request_bytes = 2 * kBlock;  // requests of 3 blocks are split
    auto callback = [&](uint64_t tag, absl::Status status) { done.Add(tag, std::move(status)); };
    auto reader = uring ? OpenIoUringReader(file.path.string(), options, callback)
                        : OpenPreadReader(file.path.string(), options, callback);
    INFO(reader.status().ToString());
    REQUIRE(reader.ok());
    auto buffer = AlignedBuffer::Allocate(File::kBlocks * kBlock);
    REQUIRE(buffer.ok());
    std::vector<ReadRequest> requests;
    for (uint64_t b = 0; b + 3 <= File::kBlocks; b += 3)
      requests.push_back({b * kBlock, 3 * kBlock, buffer->data() + b * kBlock, b});
    // Starts inside the file, ends past it.
    auto tail = AlignedBuffer::Allocate(2 * kBlock);
    REQUIRE(tail.ok());
    requests.push_back({(File::kBlocks - 1) * kBlock, 2 * kBlock, tail->data(), 1000});
    REQUIRE((*reader)->Submit(requests).ok());
    REQUIRE(done.Wait(requests.size()));
    for (const ReadRequest& r : requests) {
      if (r.tag == 1000) continue;
      CHECK(done.got[r.tag].first == absl::StatusCode::kOk);
      for (uint64_t b = r.offset / kBlock; b < (r.offset + r.size) / kBlock; ++b)
        CHECK(BlockMatches(buffer->data() + b * kBlock, b));
    }
    CHECK(done.got[1000].first == absl::StatusCode::kDataLoss);
    CHECK(done.got[1000].second.find("short read") != std::string::npos);
  }
}

TEST_CASE(
    "background reads all arrive, a cancelled one is never read, a promoted one overtakes "
    "the background queue") {
  File file;
  for (bool uring : {true, false}) {
    INFO(uring);
    Completions done;
    std::mutex order_mutex;
    std::vector<uint64_t> order;
    ReaderOptions options;
    options.queue_depth = 2;
    options.max_request_bytes = 4 * kBlock;
    auto callback = [&](uint64_t tag, absl::Status status) {
      {
        std::lock_guard lock(order_mutex);
        order.push_back(tag);
      }
      done.Add(tag, std::move(status));
    };
    auto reader = uring ? OpenIoUringReader(file.path.string(), options, callback)
                        : OpenPreadReader(file.path.string(), options, callback);
    REQUIRE(reader.ok());
    constexpr uint64_t kRequests = 16;
    auto buffer = AlignedBuffer::Allocate(kRequests * 4 * kBlock);
    REQUIRE(buffer.ok());
    std::memset(buffer->data(), 0xEE, kRequests * 4 * kBlock);
    std::vector<ReadRequest> requests;
    for (uint64_t r = 0; r < kRequests; ++r) {
      requests.push_back(
          {r * 4 * kBlock, 4 * kBlock, buffer->data() + r * 4 * kBlock, r, /*background=*/true});
    }
    REQUIRE((*reader)->Submit(requests).ok());
    // Background reads go one at a time: the last ones are still queued.
    CHECK((*reader)->Cancel(kRequests - 1));
    CHECK_FALSE((*reader)->Cancel(999));
    (*reader)->Promote(kRequests - 2);
    REQUIRE(done.Wait(kRequests));
    for (uint64_t r = 0; r + 1 < kRequests; ++r) {
      CHECK(done.got[r].first == absl::StatusCode::kOk);
      for (uint64_t b = 4 * r; b < 4 * r + 4; ++b)
        CHECK(BlockMatches(buffer->data() + b * kBlock, b));
    }
    CHECK(done.got[kRequests - 1].first == absl::StatusCode::kCancelled);
    const uint8_t* cancelled = buffer->data() + (kRequests - 1) * 4 * kBlock;
    CHECK(std::all_of(cancelled, cancelled + 4 * kBlock, [](uint8_t v) { return v == 0xEE; }));
    const auto position = [&](uint64_t tag) {
      return std::find(order.begin(), order.end(), tag) - order.begin();
    };
    CHECK(position(kRequests - 2) < position(kRequests - 3));
  }
}

TEST_CASE("io_uring: a refused submission is tried again, one refused for good fails its reads") {
  File file;
  ReaderOptions options;
  options.queue_depth = 4;
  SECTION("EAGAIN twice, then the ring takes it: the reads arrive") {
    Completions done;
    int refusals = 2;
    auto reader = OpenIoUringReaderForTest(
        file.path.string(), options,
        [&](uint64_t tag, absl::Status status) { done.Add(tag, std::move(status)); },
        [&](const std::function<int()>& real) { return refusals-- > 0 ? -EAGAIN : real(); });
    INFO(reader.status().ToString());
    REQUIRE(reader.ok());
    auto buffer = AlignedBuffer::Allocate(kBlock);
    REQUIRE(buffer.ok());
    ReadRequest request{5 * kBlock, kBlock, buffer->data(), 5};
    REQUIRE((*reader)->Submit(absl::MakeConstSpan(&request, 1)).ok());
    REQUIRE(done.Wait(1));
    CHECK(done.got[5].first == absl::StatusCode::kOk);
    CHECK(BlockMatches(buffer->data(), 5));
  }
  SECTION(
      "EINVAL: every read accepted fails with an I/O error, later ones are refused, the "
      "reader closes without hanging") {
    Completions done;
    bool refuse = false;
    auto reader = OpenIoUringReaderForTest(
        file.path.string(), options,
        [&](uint64_t tag, absl::Status status) { done.Add(tag, std::move(status)); },
        [&](const std::function<int()>& real) { return refuse ? -EINVAL : real(); });
    INFO(reader.status().ToString());
    REQUIRE(reader.ok());
    auto buffer = AlignedBuffer::Allocate(8 * kBlock);
    REQUIRE(buffer.ok());
    refuse = true;
    std::vector<ReadRequest> requests;
    for (uint64_t i = 0; i < 8; ++i)
      requests.push_back({i * kBlock, kBlock, buffer->data() + i * kBlock, i});
    REQUIRE((*reader)->Submit(requests).ok());
    REQUIRE(done.Wait(8));
    for (uint64_t i = 0; i < 8; ++i) {
      CHECK(done.got[i].first == absl::StatusCode::kUnavailable);
      CHECK(done.got[i].second.find("io_uring_submit") != std::string::npos);
    }
    std::optional<StoreFault> fault = StoreFaultOf(
        absl::Status(done.got[0].first, done.got[0].second));  // message only: no payload
    CHECK_FALSE(fault.has_value());
    ReadRequest late{0, kBlock, buffer->data(), 99};
    absl::Status refused = (*reader)->Submit(absl::MakeConstSpan(&late, 1));
    CHECK(refused.code() == absl::StatusCode::kUnavailable);
    auto started = std::chrono::steady_clock::now();
    reader->reset();
    CHECK(std::chrono::steady_clock::now() - started < std::chrono::seconds(5));
    CHECK(done.got.size() == 8);  // the refused request got no callback
  }
}

}  // namespace
}  // namespace moed::cache
