#include "cache/block_reader.h"

#include <fcntl.h>
#include <liburing.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "cache/store_fault.h"

namespace moed::cache {
namespace {

absl::StatusOr<int> OpenForReading(const std::string& path, bool direct) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (direct ? O_DIRECT : 0));
  if (fd < 0 && direct && errno == EINVAL)
    fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);  // tmpfs
  if (fd < 0)
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  return fd;
}

// A piece of a request in flight.
struct Piece {
  uint64_t id;
  uint64_t at;    // offset within the request
  uint64_t size;  // bytes still to read
  bool background = false;
};

// A request cut into pieces no larger than max_request_bytes; the whole completes when every
// piece has.
struct Pending {
  ReadRequest request;
  int pieces_left = 0;
  absl::Status status;
};

absl::Status CancelledRead(const ReadRequest& request) {
  return absl::CancelledError(
      absl::StrCat("read of ", request.size, " bytes at offset ", request.offset, " cancelled"));
}

class IoUringReader final : public BlockReader {
 public:
  IoUringReader(int fd, const ReaderOptions& options, ReadCallback callback, SubmitHook hook)
      : fd_(fd), options_(options), callback_(std::move(callback)), hook_(std::move(hook)) {}

  absl::Status Init() {
    int rc = io_uring_queue_init(static_cast<unsigned>(std::max(1, options_.queue_depth)) * 2,
                                 &ring_, 0);
    if (rc < 0)
      return absl::UnavailableError(absl::StrCat("io_uring_queue_init: ", std::strerror(-rc)));
    if ((ring_.features & IORING_FEAT_EXT_ARG) == 0) {
      // Waiting with a timeout would then submit from the completion thread.
      io_uring_queue_exit(&ring_);
      return absl::UnavailableError("io_uring without IORING_FEAT_EXT_ARG (Linux 5.11)");
    }
    ring_ready_ = true;
    completer_ = std::thread([this] { CompletionLoop(); });
    return absl::OkStatus();
  }

  ~IoUringReader() override {
    if (ring_ready_) {
      {
        std::unique_lock lock(mutex_);
        idle_.wait(lock, [&] {
          return in_flight_ == 0 && queue_.empty() && background_.empty() && finished_.empty();
        });
        stopping_ = true;
        // Wake the completion thread with a no-op; should the ring refuse it, the thread sees
        // stopping_ at its next timeout.
        if (broken_.ok()) {
          io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
          if (sqe != nullptr) {
            io_uring_prep_nop(sqe);
            io_uring_sqe_set_data(sqe, nullptr);  // the stop marker
            (void)CallSubmit();
          }
        }
      }
      completer_.join();
      io_uring_queue_exit(&ring_);
    }
    ::close(fd_);
  }

  absl::string_view name() const override { return "io_uring"; }

  absl::Status Submit(absl::Span<const ReadRequest> requests) override {
    std::lock_guard lock(mutex_);
    if (!broken_.ok()) return broken_;
    for (const ReadRequest& request : requests) {
      if (request.size == 0) return absl::InvalidArgumentError("empty read request");
    }
    for (const ReadRequest& request : requests) {
      uint64_t id = next_id_++;
      Pending& pending = pending_[id];
      pending.request = request;
      // Background requests in smaller pieces: a cancel or a foreground read then waits for
      // at most one small piece.
      const uint64_t piece_bytes = request.background
                                       ? std::max<uint64_t>(4096, options_.max_request_bytes / 16)
                                       : options_.max_request_bytes;
      for (uint64_t at = 0; at < request.size; at += piece_bytes) {
        (request.background ? background_ : queue_)
            .push_back({id, at, std::min(piece_bytes, request.size - at), request.background});
        ++pending.pieces_left;
      }
      stats_.requests++;
      stats_.bytes += request.size;
    }
    // Accepted: should the ring refuse them now, each still gets its callback (an error).
    SubmitQueuedLocked();
    return absl::OkStatus();
  }

  bool Cancel(uint64_t tag) override {
    std::lock_guard lock(mutex_);
    auto it = std::find_if(pending_.begin(), pending_.end(),
                           [&](const auto& entry) { return entry.second.request.tag == tag; });
    if (it == pending_.end()) return false;
    const uint64_t id = it->first;
    Pending& pending = it->second;
    if (pending.status.ok()) pending.status = CancelledRead(pending.request);
    for (std::deque<Piece>* queue : {&queue_, &background_}) {
      for (auto piece = queue->begin(); piece != queue->end();) {
        if (piece->id == id) {
          piece = queue->erase(piece);
          --pending.pieces_left;
        } else {
          ++piece;
        }
      }
    }
    if (pending.pieces_left == 0) {
      finished_.push_back({tag, pending.status});
      pending_.erase(it);
      WakeCompleterLocked();
    }
    return true;
  }

  void Promote(uint64_t tag) override {
    std::lock_guard lock(mutex_);
    for (auto piece = background_.begin(); piece != background_.end();) {
      if (pending_[piece->id].request.tag == tag) {
        Piece promoted = *piece;
        promoted.background = false;
        queue_.push_back(promoted);
        piece = background_.erase(piece);
      } else {
        ++piece;
      }
    }
    SubmitQueuedLocked();
  }

  ReaderStats stats() const override {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  // Has the completion thread deliver what finished without a completion of its own.
  void WakeCompleterLocked() {
    wake_ = true;
    io_uring_sqe* sqe = broken_.ok() ? io_uring_get_sqe(&ring_) : nullptr;
    if (sqe == nullptr) return;  // it sees wake_ at its next timeout
    io_uring_prep_nop(sqe);
    io_uring_sqe_set_data(sqe, &wake_);
    (void)CallSubmit();
  }

  void SubmitQueuedLocked() {
    if (!broken_.ok()) return;
    int added = 0;
    // Background pieces only while no foreground piece waits or runs, one at a time, so that a
    // foreground read arriving shares the disk with at most one small piece.
    const int background_limit = 1;
    while (in_flight_ < options_.queue_depth) {
      const bool foreground = !queue_.empty();
      if (!foreground && (background_.empty() || foreground_in_flight_ > 0 ||
                          in_flight_ - foreground_in_flight_ >= background_limit)) {
        break;
      }
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      if (sqe == nullptr) break;
      std::deque<Piece>& from = foreground ? queue_ : background_;
      Piece piece = from.front();
      from.pop_front();
      const ReadRequest& request = pending_[piece.id].request;
      io_uring_prep_read(sqe, fd_, request.buffer + piece.at, static_cast<unsigned>(piece.size),
                         request.offset + piece.at);
      auto* carried = new Piece(piece);
      io_uring_sqe_set_data(sqe, carried);
      ++in_flight_;
      if (!piece.background) ++foreground_in_flight_;
      ++added;
    }
    stats_.max_in_flight =
        std::max<uint64_t>(stats_.max_in_flight, static_cast<uint64_t>(in_flight_));
    if (io_uring_sq_ready(&ring_) == 0) return;
    // A full completion queue (EBUSY) or a momentary shortage (EAGAIN) passes once completions
    // are reaped (the completion thread reaps without this lock): try again a few times.
    int rc = 0;
    for (int attempt = 0; attempt < 5; ++attempt) {
      rc = CallSubmit();
      if (rc >= 0 || (rc != -EAGAIN && rc != -EBUSY && rc != -EINTR)) break;
      std::this_thread::sleep_for(std::chrono::microseconds(100 << (2 * attempt)));
    }
    if (rc >= 0) return;
    FailUnsubmittedLocked(
        ReadFailure(ReadFaultKind::kIoError, 0,
                    absl::StrCat("io_uring_submit: ", std::strerror(-rc), " (the reader stops)")));
  }

  int CallSubmit() {
    if (!hook_) return io_uring_submit(&ring_);
    return hook_([this] { return io_uring_submit(&ring_); });
  }

  // The ring refused entries it will never read: each is turned into a no-op (so that nothing
  // reads into a buffer whose request has been failed, should the ring take it later), its
  // request fails with `error`, and so does every request still queued. The reader then
  // refuses new requests, and its destructor does not wait for reads that will never come.
  void FailUnsubmittedLocked(const absl::Status& error) {
    broken_ = error;
    std::vector<Piece*> abandoned;
    for (unsigned head = *ring_.sq.khead; head != ring_.sq.sqe_tail; ++head) {
      io_uring_sqe* sqe = &ring_.sq.sqes[head & *ring_.sq.kring_mask];
      void* data = nullptr;
      std::memcpy(&data, &sqe->user_data, sizeof(data));
      if (data != nullptr && data != this) abandoned.push_back(static_cast<Piece*>(data));
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, this);  // the reader itself marks an abandoned entry
    }
    auto fail = [&](uint64_t id) {
      auto it = pending_.find(id);
      if (it == pending_.end()) return;
      if (it->second.status.ok()) it->second.status = error;
      if (--it->second.pieces_left == 0) {
        finished_.push_back({it->second.request.tag, it->second.status});
        pending_.erase(it);
      }
    };
    for (Piece* piece : abandoned) {
      --in_flight_;
      if (!piece->background) --foreground_in_flight_;
      fail(piece->id);
      delete piece;
    }
    for (std::deque<Piece>* queue : {&queue_, &background_}) {
      while (!queue->empty()) {
        Piece piece = queue->front();
        queue->pop_front();
        fail(piece.id);
      }
    }
    // Delivered by the completion thread (never inside Submit), which this wakes.
    wake_ = true;
  }

  // Callbacks run on the completion thread without the lock (they may submit more reads), so
  // a caller of Submit never sees its callback run inside Submit.
  void DeliverFinishedLocked() {
    if (finished_.empty() || delivering_) return;
    delivering_ = true;
    while (!finished_.empty()) {
      auto [tag, status] = finished_.front();
      finished_.pop_front();
      mutex_.unlock();
      callback_(tag, status);
      mutex_.lock();
    }
    delivering_ = false;
    if (in_flight_ == 0 && queue_.empty() && background_.empty()) idle_.notify_all();
  }

  void CompletionLoop() {
    while (true) {
      io_uring_cqe* cqe = nullptr;
      // A timeout, so that failures made without a completion (FailUnsubmittedLocked) are
      // delivered, and a stop the ring refused to carry is seen.
      __kernel_timespec timeout{0, 50'000'000};
      int rc = io_uring_wait_cqe_timeout(&ring_, &cqe, &timeout);
      if (rc < 0) {
        std::unique_lock lock(mutex_);
        if (wake_) {
          wake_ = false;
          DeliverFinishedLocked();
          if (in_flight_ == 0 && queue_.empty() && background_.empty() && finished_.empty())
            idle_.notify_all();
        }
        if (stopping_ && !broken_.ok()) return;
        continue;
      }
      void* data = io_uring_cqe_get_data(cqe);
      int result = cqe->res;
      io_uring_cqe_seen(&ring_, cqe);
      std::unique_lock lock(mutex_);
      if (data == nullptr) return;
      if (data == this) continue;  // an entry neutralised by FailUnsubmittedLocked
      if (data == &wake_) {        // a Cancel's finished request waits for delivery
        wake_ = false;
        DeliverFinishedLocked();
        if (in_flight_ == 0 && queue_.empty() && background_.empty() && finished_.empty())
          idle_.notify_all();
        continue;
      }
      std::unique_ptr<Piece> piece(static_cast<Piece*>(data));
      --in_flight_;
      if (!piece->background) --foreground_in_flight_;
      Pending& pending = pending_[piece->id];
      if (result < 0) {
        if (pending.status.ok()) {
          const uint64_t at = pending.request.offset + piece->at;
          pending.status =
              ReadFailure(ReadFaultKind::kIoError, at,
                          absl::StrCat("read error at offset ", at, ": ", std::strerror(-result)));
        }
      } else if (static_cast<uint64_t>(result) < piece->size) {
        if (result == 0) {
          if (pending.status.ok()) {
            const uint64_t at = pending.request.offset + piece->at;
            pending.status =
                ReadFailure(ReadFaultKind::kShortRead, at,
                            absl::StrCat("short read at offset ", at, " (end of file)"));
          }
        } else if (pending.status.ok()) {
          // A partial read: queue the rest at the front.
          (piece->background ? background_ : queue_)
              .push_front({piece->id, piece->at + static_cast<uint64_t>(result),
                           piece->size - static_cast<uint64_t>(result), piece->background});
          ++pending.pieces_left;
        }
      }
      if (--pending.pieces_left == 0) {
        finished_.push_back({pending.request.tag, pending.status});
        pending_.erase(piece->id);
      }
      SubmitQueuedLocked();
      DeliverFinishedLocked();
      if (in_flight_ == 0 && queue_.empty() && background_.empty() && finished_.empty())
        idle_.notify_all();
    }
  }

  int fd_;
  ReaderOptions options_;
  ReadCallback callback_;
  SubmitHook hook_;
  absl::Status broken_;  // why the reader stopped, if it has
  bool wake_ = false;    // failures wait for delivery by the completion thread
  io_uring ring_{};
  bool ring_ready_ = false;
  std::thread completer_;
  mutable std::mutex mutex_;
  std::condition_variable idle_;
  std::deque<Piece> queue_;
  std::deque<Piece> background_;
  int foreground_in_flight_ = 0;
  std::map<uint64_t, Pending> pending_;
  std::deque<std::pair<uint64_t, absl::Status>> finished_;
  bool delivering_ = false;
  uint64_t next_id_ = 0;
  int in_flight_ = 0;
  bool stopping_ = false;
  ReaderStats stats_;
};

class PreadReader final : public BlockReader {
 public:
  PreadReader(int fd, const ReaderOptions& options, ReadCallback callback)
      : fd_(fd), options_(options), callback_(std::move(callback)) {
    for (int i = 0; i < std::max(1, options.queue_depth); ++i)
      workers_.emplace_back([this] { Work(); });
  }
  ~PreadReader() override {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    for (auto& worker : workers_) worker.join();
    ::close(fd_);
  }

  absl::string_view name() const override { return "pread"; }

  absl::Status Submit(absl::Span<const ReadRequest> requests) override {
    {
      std::lock_guard lock(mutex_);
      for (const ReadRequest& request : requests) {
        if (request.size == 0) return absl::InvalidArgumentError("empty read request");
      }
      for (const ReadRequest& request : requests) {
        (request.background ? background_ : queue_).push_back(request);
        stats_.requests++;
        stats_.bytes += request.size;
      }
    }
    ready_.notify_all();
    return absl::OkStatus();
  }

  bool Cancel(uint64_t tag) override {
    {
      std::lock_guard lock(mutex_);
      bool found = false;
      for (std::deque<ReadRequest>* queue : {&queue_, &background_}) {
        for (auto it = queue->begin(); it != queue->end(); ++it) {
          if (it->tag != tag) continue;
          cancelled_.push_back(*it);
          queue->erase(it);
          found = true;
          break;
        }
        if (found) break;
      }
      if (!found) return false;  // running or done: its result comes
    }
    ready_.notify_all();  // a worker delivers the cancellation
    return true;
  }

  void Promote(uint64_t tag) override {
    {
      std::lock_guard lock(mutex_);
      for (auto it = background_.begin(); it != background_.end(); ++it) {
        if (it->tag != tag) continue;
        ReadRequest promoted = *it;
        promoted.background = false;
        background_.erase(it);
        queue_.push_back(promoted);
        break;
      }
    }
    ready_.notify_all();
  }

  ReaderStats stats() const override {
    std::lock_guard lock(mutex_);
    return stats_;
  }

 private:
  void Work() {
    while (true) {
      ReadRequest request;
      {
        std::unique_lock lock(mutex_);
        // Background reads only while no foreground read waits or runs.
        auto background_ready = [&] {
          return !background_.empty() && foreground_in_flight_ == 0 &&
                 in_flight_ - foreground_in_flight_ < std::max(1, options_.queue_depth / 2);
        };
        ready_.wait(lock, [&] {
          return stopping_ || !queue_.empty() || !cancelled_.empty() || background_ready();
        });
        if (!cancelled_.empty()) {
          ReadRequest cancelled = cancelled_.front();
          cancelled_.pop_front();
          lock.unlock();
          callback_(cancelled.tag, CancelledRead(cancelled));
          continue;
        }
        if (!queue_.empty()) {
          request = queue_.front();
          queue_.pop_front();
          ++foreground_in_flight_;
        } else if (background_ready()) {
          request = background_.front();
          background_.pop_front();
        } else {
          if (stopping_ && background_.empty()) return;  // stopping, nothing left
          continue;
        }
        stats_.max_in_flight =
            std::max<uint64_t>(stats_.max_in_flight, static_cast<uint64_t>(++in_flight_));
      }
      absl::Status status;
      uint64_t done = 0;
      while (done < request.size) {
        uint64_t want = std::min(options_.max_request_bytes, request.size - done);
        ssize_t n =
            ::pread(fd_, request.buffer + done, want, static_cast<off_t>(request.offset + done));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
          status = ReadFailure(ReadFaultKind::kIoError, request.offset + done,
                               absl::StrCat("read error at offset ", request.offset + done, ": ",
                                            std::strerror(errno)));
          break;
        }
        if (n == 0) {
          status = ReadFailure(
              ReadFaultKind::kShortRead, request.offset + done,
              absl::StrCat("short read at offset ", request.offset + done, " (end of file)"));
          break;
        }
        done += static_cast<uint64_t>(n);
      }
      {
        std::lock_guard lock(mutex_);
        --in_flight_;
        if (!request.background) --foreground_in_flight_;
      }
      ready_.notify_all();  // background reads may wait for this one
      callback_(request.tag, status);
    }
  }

  int fd_;
  ReaderOptions options_;
  ReadCallback callback_;
  std::vector<std::thread> workers_;
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<ReadRequest> queue_;
  std::deque<ReadRequest> background_;
  std::deque<ReadRequest> cancelled_;  // their callbacks wait for a worker
  bool stopping_ = false;
  int in_flight_ = 0;
  int foreground_in_flight_ = 0;
  ReaderStats stats_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<BlockReader>> OpenIoUringReaderForTest(const std::string& path,
                                                                      const ReaderOptions& options,
                                                                      ReadCallback callback,
                                                                      SubmitHook submit) {
  absl::StatusOr<int> fd = OpenForReading(path, options.direct_io);
  if (!fd.ok()) return fd.status();
  auto reader =
      std::make_unique<IoUringReader>(*fd, options, std::move(callback), std::move(submit));
  if (absl::Status s = reader->Init(); !s.ok()) return s;
  return std::unique_ptr<BlockReader>(std::move(reader));
}

absl::StatusOr<std::unique_ptr<BlockReader>> OpenIoUringReader(const std::string& path,
                                                               const ReaderOptions& options,
                                                               ReadCallback callback) {
  return OpenIoUringReaderForTest(path, options, std::move(callback), SubmitHook());
}

absl::StatusOr<std::unique_ptr<BlockReader>> OpenPreadReader(const std::string& path,
                                                             const ReaderOptions& options,
                                                             ReadCallback callback) {
  absl::StatusOr<int> fd = OpenForReading(path, options.direct_io);
  if (!fd.ok()) return fd.status();
  return std::unique_ptr<BlockReader>(new PreadReader(*fd, options, std::move(callback)));
}

absl::StatusOr<std::unique_ptr<BlockReader>> OpenBestReader(const std::string& path,
                                                            const ReaderOptions& options,
                                                            ReadCallback callback,
                                                            std::string* note) {
  absl::StatusOr<std::unique_ptr<BlockReader>> uring = OpenIoUringReader(path, options, callback);
  if (uring.ok()) return uring;
  if (note != nullptr) {
    *note = absl::StrCat("io_uring is not available (", uring.status().message(),
                         "); reading with a pread pool");
  }
  return OpenPreadReader(path, options, std::move(callback));
}

}  // namespace moed::cache
