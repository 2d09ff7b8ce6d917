// The block reader seam: read N aligned ranges of one file into N aligned buffers, with
// completions delivered as events on the reader's own thread. io_uring, a pread thread pool
// and a fault-injecting test double implement it; nothing above cares which one it has.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace moed::cache {

struct ReadRequest {
  uint64_t offset = 0;        // multiple of 4096 (O_DIRECT)
  uint64_t size = 0;          // multiple of 4096
  uint8_t* buffer = nullptr;  // 4096-aligned, `size` bytes
  uint64_t tag = 0;           // handed back with the completion
  // Background (a prefetch): read only while no foreground read waits or runs, so that reads
  // a computation waits for are never queued behind reads it may not need.
  bool background = false;
};

// Called once per request, from the reader's completion thread: OK when all `size` bytes
// arrived; otherwise an error carrying a StoreFault (store_fault.h) of kind kIoError or
// kShortRead (the file ended first) and the offset.
using ReadCallback = std::function<void(uint64_t tag, absl::Status status)>;

struct ReaderStats {
  uint64_t requests = 0;
  uint64_t bytes = 0;
  uint64_t max_in_flight = 0;
};

class BlockReader {
 public:
  virtual ~BlockReader() = default;
  // "io_uring", "pread" or a test double's name.
  virtual absl::string_view name() const = 0;
  // Queues the reads; returns at once. Each request's callback comes later.
  virtual absl::Status Submit(absl::Span<const ReadRequest> requests) = 0;
  // Gives up the request with `tag`: what has not started is never read, and its callback
  // comes (later, never inside this call) with a CANCELLED status once nothing of it is in
  // flight. False when the reader does not hold it any more (its callback came or is coming
  // with the result).
  virtual bool Cancel(uint64_t /*tag*/) { return false; }
  // Makes what is left of the background request `tag` foreground (a computation now waits
  // for it).
  virtual void Promote(uint64_t /*tag*/) {}
  virtual ReaderStats stats() const = 0;
};

struct ReaderOptions {
  int queue_depth = 16;                     // reads in flight
  uint64_t max_request_bytes = 4ull << 20;  // larger requests are split into pieces this big
  bool direct_io = true;                    // O_DIRECT (falls back to buffered where refused)
};

// io_uring over `path`. Fails (and the caller may fall back) where io_uring is not permitted.
absl::StatusOr<std::unique_ptr<BlockReader>> OpenIoUringReader(const std::string& path,
                                                               const ReaderOptions& options,
                                                               ReadCallback callback);
// A pool of `options.queue_depth` threads doing pread.
absl::StatusOr<std::unique_ptr<BlockReader>> OpenPreadReader(const std::string& path,
                                                             const ReaderOptions& options,
                                                             ReadCallback callback);

// For tests: io_uring whose every io_uring_submit goes through `submit`, which is handed the
// real call and returns what it returns, or a negative errno instead.
using SubmitHook = std::function<int(const std::function<int()>& real_submit)>;
absl::StatusOr<std::unique_ptr<BlockReader>> OpenIoUringReaderForTest(const std::string& path,
                                                                      const ReaderOptions& options,
                                                                      ReadCallback callback,
                                                                      SubmitHook submit);

// io_uring when it works, else the pread pool; `note` says why when it fell back.
absl::StatusOr<std::unique_ptr<BlockReader>> OpenBestReader(const std::string& path,
                                                            const ReaderOptions& options,
                                                            ReadCallback callback,
                                                            std::string* note);

}  // namespace moed::cache
