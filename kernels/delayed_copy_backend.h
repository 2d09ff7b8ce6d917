// A stand-in for a GPU that runs on any machine, for the tests of everything that overlaps
// copies with compute. Like a GPU it has memory of its own that host code must not read, and
// two streams that run their work later, each on a thread of its own, in order: the copy
// stream after a delay per copy (a slow bus), the compute stream with another backend's
// operators. Copies from its pinned host buffers read their source when they run, as a DMA
// engine does; copies from other host memory read it when queued, as a copy from pageable
// memory does. A missing wait for an event therefore shows up as wrong numbers, and the copy
// stream can be held to see what runs while a copy has not happened yet.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/backend.h"

namespace moed::kernels {

struct DelayedCopyOptions {
  // Each copy on the copy stream waits this long, plus its bytes at `copy_bytes_per_second`
  // (0: no per-byte time), before it happens.
  std::chrono::microseconds copy_delay{0};
  double copy_bytes_per_second = 0;
  // Each operator on the compute stream waits this long before it runs (a busy device).
  std::chrono::microseconds op_delay{0};
};

class DelayedCopyBackend final : public Backend {
 public:
  // Operators run on `inner`'s compute stream, from this backend's compute thread.
  DelayedCopyBackend(std::shared_ptr<Backend> inner, const DelayedCopyOptions& options);
  ~DelayedCopyBackend() override;

  absl::string_view name() const override { return "delayed-copy"; }
  Device& device() override;
  Stream& compute() override;
  Stream& copy() override;

  // While held, the copy stream starts nothing (copies already running finish).
  void HoldCopies();
  void ReleaseCopies();
  // Copies queued on the copy stream and not yet done, and copies it has done.
  uint64_t copies_pending() const;
  uint64_t copies_done() const;
  // What happened, in order: "copy <bytes>" when a copy-stream copy is done, "<op>" when a
  // compute-stream operator has run.
  std::vector<std::string> Log() const;

  class Queue;

 private:
  class Memory;
  class QueueStream;
  std::shared_ptr<Backend> inner_;
  std::unique_ptr<Memory> memory_;
  std::unique_ptr<Queue> copy_queue_, compute_queue_;
  std::unique_ptr<QueueStream> copy_stream_, compute_stream_;
  mutable std::mutex log_mutex_;
  std::deque<std::string> log_;
};

}  // namespace moed::kernels
