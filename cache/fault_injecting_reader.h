// A BlockReader test double: wraps a real reader and makes chosen reads fail (I/O error),
// come back short, or arrive with flipped bytes (so the checksum catches them).
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/block_reader.h"

namespace moed::cache {

enum class Fault { kIoError, kShortRead, kCorrupt };

class FaultInjectingReader final : public BlockReader {
 public:
  // Opens a pread reader over `path` underneath.
  static absl::StatusOr<std::unique_ptr<FaultInjectingReader>> Open(const std::string& path,
                                                                    ReadCallback callback) {
    std::unique_ptr<FaultInjectingReader> reader(new FaultInjectingReader(std::move(callback)));
    FaultInjectingReader* raw = reader.get();
    ReaderOptions options;
    options.queue_depth = 2;
    auto inner = OpenPreadReader(path, options, [raw](uint64_t tag, absl::Status status) {
      raw->OnInner(tag, std::move(status));
    });
    if (!inner.ok()) return inner.status();
    reader->inner_ = *std::move(inner);
    return reader;
  }
  ~FaultInjectingReader() override {
    inner_.reset();
    for (std::thread& t : failure_threads_) t.join();
  }

  // The next `times` reads that start at `offset` fail this way.
  void Inject(uint64_t offset, Fault fault, int times = 1) {
    std::lock_guard lock(mutex_);
    faults_[offset] = {fault, times};
  }
  void Clear() {
    std::lock_guard lock(mutex_);
    faults_.clear();
  }

  absl::string_view name() const override { return "fault-injecting"; }
  ReaderStats stats() const override { return inner_->stats(); }

  absl::Status Submit(absl::Span<const ReadRequest> requests) override {
    std::vector<ReadRequest> pass;
    std::vector<std::pair<uint64_t, absl::Status>> fail_now;
    {
      std::lock_guard lock(mutex_);
      for (const ReadRequest& request : requests) {
        auto it = faults_.find(request.offset);
        if (it != faults_.end() && it->second.second > 0) {
          --it->second.second;
          if (it->second.first == Fault::kIoError) {
            fail_now.push_back({request.tag, absl::DataLossError(absl::StrCat(
                                                 "read error at offset ", request.offset,
                                                 ": Input/output error (injected)"))});
            continue;
          }
          if (it->second.first == Fault::kShortRead) {
            fail_now.push_back(
                {request.tag, absl::DataLossError(absl::StrCat("short read at offset ",
                                                               request.offset, " (injected)"))});
            continue;
          }
          corrupt_[request.tag] = request.buffer;
        }
        pass.push_back(request);
      }
    }
    if (!pass.empty()) {
      if (absl::Status s = inner_->Submit(pass); !s.ok()) return s;
    }
    // Deliver injected failures from a thread of their own, as a real reader would.
    std::lock_guard lock(mutex_);
    for (auto& [tag, status] : fail_now) {
      // The status is rebuilt on the delivering thread (see ExpertCache::Failure).
      failure_threads_.emplace_back(
          [this, tag = tag, code = status.code(), message = std::string(status.message())] {
            callback_(tag, absl::Status(code, message));
          });
    }
    return absl::OkStatus();
  }

 private:
  explicit FaultInjectingReader(ReadCallback callback) : callback_(std::move(callback)) {}

  void OnInner(uint64_t tag, absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      auto it = corrupt_.find(tag);
      if (it != corrupt_.end()) {
        it->second[17] ^= 0x5A;
        corrupt_.erase(it);
      }
    }
    callback_(tag, std::move(status));
  }

  ReadCallback callback_;
  std::unique_ptr<BlockReader> inner_;
  std::mutex mutex_;
  std::map<uint64_t, std::pair<Fault, int>> faults_;
  std::map<uint64_t, uint8_t*> corrupt_;
  std::vector<std::thread> failure_threads_;
};

}  // namespace moed::cache
