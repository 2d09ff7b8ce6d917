// A BlockReader test double: wraps a real reader and makes chosen reads fail (I/O error),
// come back short, or arrive with flipped bytes (so the checksum catches them), either at
// chosen offsets or at random with given rates. It counts what it injected, so a test can
// compare the cache's failure counters with the truth.
#pragma once

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cache/block_reader.h"
#include "cache/store_fault.h"

namespace moed::cache {

enum class Fault { kIoError, kShortRead, kCorrupt };

class FaultInjectingReader final : public BlockReader {
 public:
  // Opens a pread reader over `path` underneath.
  static absl::StatusOr<std::unique_ptr<FaultInjectingReader>> Open(const std::string& path,
                                                                    ReadCallback callback,
                                                                    int queue_depth = 2) {
    std::unique_ptr<FaultInjectingReader> reader(new FaultInjectingReader(std::move(callback)));
    FaultInjectingReader* raw = reader.get();
    ReaderOptions options;
    options.queue_depth = queue_depth;
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

  // The next `times` reads that start at `offset` fail this way (a negative `times`: every
  // read from now on).
  void Inject(uint64_t offset, Fault fault, int times = 1) {
    std::lock_guard lock(mutex_);
    faults_[offset] = {fault, times};
  }
  // Every read not covered by Inject fails with an I/O error with probability `io_error`, or
  // comes back short with probability `short_read`, drawn from a generator seeded with `seed`.
  void InjectAtRandom(double io_error, double short_read, uint64_t seed) {
    std::lock_guard lock(mutex_);
    random_io_error_ = io_error;
    random_short_read_ = short_read;
    random_.seed(seed);
  }
  // Reads that start at `offset` complete, but are reported only at ReleaseHeld().
  void Hold(uint64_t offset) {
    std::lock_guard lock(mutex_);
    held_offsets_.insert(offset);
  }
  // Reports every held read now (on the calling thread) and holds no more.
  void ReleaseHeld() {
    std::vector<std::pair<uint64_t, absl::Status>> held;
    {
      std::lock_guard lock(mutex_);
      held_offsets_.clear();
      held.swap(held_);
      release_ = true;
    }
    for (auto& [tag, status] : held) callback_(tag, std::move(status));
  }
  void Clear() {
    std::lock_guard lock(mutex_);
    faults_.clear();
    random_io_error_ = random_short_read_ = 0;
  }
  // Faults of `fault`'s kind injected so far.
  uint64_t injected(Fault fault) const {
    std::lock_guard lock(mutex_);
    return injected_[static_cast<size_t>(fault)];
  }

  absl::string_view name() const override { return "fault-injecting"; }
  bool Cancel(uint64_t tag) override { return inner_->Cancel(tag); }
  void Promote(uint64_t tag) override { inner_->Promote(tag); }
  ReaderStats stats() const override { return inner_->stats(); }

  absl::Status Submit(absl::Span<const ReadRequest> requests) override {
    std::vector<ReadRequest> pass;
    std::vector<std::pair<uint64_t, Fault>> fail_now;
    std::vector<uint64_t> fail_offsets;
    {
      std::lock_guard lock(mutex_);
      for (const ReadRequest& request : requests) {
        std::optional<Fault> fault = DrawLocked(request.offset);
        if (fault.has_value()) ++injected_[static_cast<size_t>(*fault)];
        if (fault == Fault::kIoError || fault == Fault::kShortRead) {
          fail_now.push_back({request.tag, *fault});
          fail_offsets.push_back(request.offset);
          continue;
        }
        if (fault == Fault::kCorrupt) corrupt_[request.tag] = request.buffer;
        if (held_offsets_.contains(request.offset)) held_tags_.insert(request.tag);
        pass.push_back(request);
      }
    }
    if (!pass.empty()) {
      if (absl::Status s = inner_->Submit(pass); !s.ok()) return s;
    }
    // Deliver injected failures from a thread of their own, as a real reader would (and so
    // that the status is made on the thread that delivers it).
    std::lock_guard lock(mutex_);
    for (size_t i = 0; i < fail_now.size(); ++i) {
      failure_threads_.emplace_back([this, tag = fail_now[i].first, fault = fail_now[i].second,
                                     offset = fail_offsets[i]] {
        callback_(tag,
                  fault == Fault::kIoError
                      ? ReadFailure(ReadFaultKind::kIoError, offset,
                                    absl::StrCat("read error at offset ", offset,
                                                 ": Input/output error (injected)"))
                      : ReadFailure(ReadFaultKind::kShortRead, offset,
                                    absl::StrCat("short read at offset ", offset, " (injected)")));
      });
    }
    return absl::OkStatus();
  }

 private:
  explicit FaultInjectingReader(ReadCallback callback) : callback_(std::move(callback)) {}

  std::optional<Fault> DrawLocked(uint64_t offset) {
    auto it = faults_.find(offset);
    if (it != faults_.end() && it->second.second != 0) {
      if (it->second.second > 0) --it->second.second;
      return it->second.first;
    }
    if (random_io_error_ <= 0 && random_short_read_ <= 0) return std::nullopt;
    const double draw = std::uniform_real_distribution<double>(0, 1)(random_);
    if (draw < random_io_error_) return Fault::kIoError;
    if (draw < random_io_error_ + random_short_read_) return Fault::kShortRead;
    return std::nullopt;
  }

  void OnInner(uint64_t tag, absl::Status status) {
    {
      std::lock_guard lock(mutex_);
      auto it = corrupt_.find(tag);
      if (it != corrupt_.end()) {
        it->second[17] ^= 0x5A;
        corrupt_.erase(it);
      }
      if (held_tags_.erase(tag) > 0 && !release_) {
        held_.emplace_back(tag, std::move(status));
        return;
      }
    }
    callback_(tag, std::move(status));
  }

  ReadCallback callback_;
  std::unique_ptr<BlockReader> inner_;
  mutable std::mutex mutex_;
  std::map<uint64_t, std::pair<Fault, int>> faults_;
  std::map<uint64_t, uint8_t*> corrupt_;
  double random_io_error_ = 0, random_short_read_ = 0;
  std::mt19937_64 random_;
  std::array<uint64_t, 3> injected_{};
  std::set<uint64_t> held_offsets_, held_tags_;
  std::vector<std::pair<uint64_t, absl::Status>> held_;
  bool release_ = false;
  std::vector<std::thread> failure_threads_;
};

}  // namespace moed::cache
