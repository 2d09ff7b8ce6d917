#include "kernels/delayed_copy_backend.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moed::kernels {

// An ordered queue of work run by a thread of its own; the copy stream's and the compute
// stream's. A point in it is the number of items pushed so far.
class DelayedCopyBackend::Queue {
 public:
  Queue(const DelayedCopyOptions& options, bool copies, std::deque<std::string>* log,
        std::mutex* log_mutex)
      : options_(options), copies_(copies), log_(log), log_mutex_(log_mutex) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Queue() {
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    changed_.notify_all();
    thread_.join();
  }

  // Queues `work`; `label` goes to the log once it has run. Returns its point.
  uint64_t Push(std::function<absl::Status()> work, std::string label, uint64_t bytes = 0,
                bool op = false) {
    std::lock_guard lock(mutex_);
    items_.push_back(Item{std::move(work), std::move(label), bytes, op});
    ++pushed_;
    if (bytes > 0) ++copies_pushed_;
    changed_.notify_all();
    return pushed_;
  }
  uint64_t pushed() const {
    std::lock_guard lock(mutex_);
    return pushed_;
  }
  // Blocks until the work up to `point` has run (or the queue stops).
  void WaitFor(uint64_t point) {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return done_ >= point || stopping_; });
  }
  // Everything pushed so far has run: the first error any of it returned, once.
  absl::Status Drain() {
    WaitFor(pushed());
    std::lock_guard lock(mutex_);
    return std::exchange(error_, absl::OkStatus());
  }
  void Hold(bool held) {
    {
      std::lock_guard lock(mutex_);
      held_ = held;
    }
    changed_.notify_all();
  }
  uint64_t copies_pending() const {
    std::lock_guard lock(mutex_);
    return copies_pushed_ - copies_done_;
  }
  uint64_t copies_done() const {
    std::lock_guard lock(mutex_);
    return copies_done_;
  }

 private:
  struct Item {
    std::function<absl::Status()> work;
    std::string label;
    uint64_t bytes = 0;
    bool op = false;  // an operator
  };

  void Run() {
    std::unique_lock lock(mutex_);
    while (true) {
      changed_.wait(lock, [&] { return stopping_ || (!items_.empty() && !held_); });
      if (stopping_) return;
      Item item = std::move(items_.front());
      items_.pop_front();
      lock.unlock();
      if (copies_ && item.bytes > 0) {
        auto delay = std::chrono::duration<double>(options_.copy_delay);
        if (options_.copy_bytes_per_second > 0) {
          delay += std::chrono::duration<double>(static_cast<double>(item.bytes) /
                                                 options_.copy_bytes_per_second);
        }
        std::this_thread::sleep_for(delay);
      } else if (!copies_ && item.op && options_.op_delay.count() > 0) {
        std::this_thread::sleep_for(options_.op_delay);
      }
      absl::Status status = item.work();
      if (!item.label.empty()) {
        std::lock_guard log_lock(*log_mutex_);
        log_->push_back(std::move(item.label));
        if (log_->size() > (size_t{1} << 16)) log_->pop_front();
      }
      lock.lock();
      if (!status.ok() && error_.ok()) error_ = status;
      if (item.bytes > 0) ++copies_done_;
      ++done_;
      changed_.notify_all();
    }
  }

  const DelayedCopyOptions options_;
  const bool copies_;  // the copy stream's queue (else the compute stream's)
  std::deque<std::string>* log_;
  std::mutex* log_mutex_;
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<Item> items_;
  uint64_t pushed_ = 0, done_ = 0, copies_pushed_ = 0, copies_done_ = 0;
  absl::Status error_;
  bool held_ = false, stopping_ = false;
  std::thread thread_;
};

namespace {

struct EventPoint {
  DelayedCopyBackend::Queue* queue = nullptr;
  uint64_t point = 0;
};

}  // namespace

// Memory of its own: buffers of the inner device, handed out as this device's. Pinned host
// buffers are remembered, so that a copy from one reads its source when it runs.
class DelayedCopyBackend::Memory final : public Device {
 public:
  Memory(DelayedCopyBackend* backend, Device& inner) : backend_(*backend), inner_(inner) {}
  absl::StatusOr<DeviceInfo> info() const override {
    absl::StatusOr<DeviceInfo> info = inner_.info();
    if (info.ok()) info->name = absl::StrCat("delayed copies over ", info->name);
    return info;
  }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    return Hold(inner_.Allocate(bytes), BufferKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    return Hold(inner_.AllocateHost(bytes), BufferKind::kPinnedHost);
  }
  bool host_memory_is_device_memory() const override { return false; }
  bool Supports(Op op, WeightFormat format) const override { return inner_.Supports(op, format); }
  absl::Status WaitForEvent(const Event& event) override {
    if (event.handle() == nullptr) return absl::OkStatus();
    const auto* at = static_cast<const EventPoint*>(event.handle());
    at->queue->WaitFor(at->point);
    return absl::OkStatus();
  }
  // Whether [at, at + bytes) lies in a pinned host buffer of this device.
  bool Pinned(const void* at, size_t bytes) const {
    std::lock_guard lock(mutex_);
    const auto address = reinterpret_cast<uintptr_t>(at);
    auto it = pinned_.upper_bound(address);
    if (it == pinned_.begin()) return false;
    --it;
    return address + bytes <= it->first + it->second;
  }

 protected:
  void Free(void* data, size_t /*bytes*/, BufferKind /*kind*/) override {
    // Work queued on the buffer may still be waiting to run: let it.
    backend_.copy_queue_->Drain().IgnoreError();
    backend_.compute_queue_->Drain().IgnoreError();
    std::lock_guard lock(mutex_);
    pinned_.erase(reinterpret_cast<uintptr_t>(data));
    held_.erase(data);
  }

 private:
  absl::StatusOr<DeviceBuffer> Hold(absl::StatusOr<DeviceBuffer> inner, BufferKind kind) {
    if (!inner.ok()) return inner.status();
    void* data = inner->data();
    const size_t size = inner->size();
    if (data == nullptr) return DeviceBuffer(this, nullptr, 0, kind);
    std::lock_guard lock(mutex_);
    if (kind == BufferKind::kPinnedHost) pinned_[reinterpret_cast<uintptr_t>(data)] = size;
    held_.emplace(data, *std::move(inner));
    return DeviceBuffer(this, data, size, kind);
  }

  DelayedCopyBackend& backend_;
  Device& inner_;
  mutable std::mutex mutex_;
  std::map<void*, DeviceBuffer> held_;
  std::map<uintptr_t, size_t> pinned_;
};

// A Stream whose every call is queued: operators on the inner compute stream, copies done
// here (the inner streams are host memory).
class DelayedCopyBackend::QueueStream final : public Stream {
 public:
  QueueStream(Queue* queue, Memory* memory, Stream* inner, bool is_copy)
      : queue_(*queue), memory_(*memory), inner_(*inner), is_copy_(is_copy) {}

  absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                            size_t bytes) override {
    if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    char* to = static_cast<char*>(dst.data()) + dst_offset;
    if (memory_.Pinned(src, bytes)) {
      CopyItem([to, src, bytes] { std::memcpy(to, src, bytes); }, bytes);
    } else {
      auto snapshot = std::make_shared<std::vector<char>>(static_cast<const char*>(src),
                                                          static_cast<const char*>(src) + bytes);
      CopyItem([to, snapshot] { std::memcpy(to, snapshot->data(), snapshot->size()); }, bytes);
    }
    return absl::OkStatus();
  }
  absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset, const DeviceBuffer& src,
                            size_t src_offset, size_t bytes) override {
    if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
    if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
    if (bytes == 0) return absl::OkStatus();
    char* to = static_cast<char*>(dst.data()) + dst_offset;
    const char* from = static_cast<const char*>(src.data()) + src_offset;
    CopyItem([to, from, bytes] { std::memmove(to, from, bytes); }, bytes);
    return absl::OkStatus();
  }
  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override {
    if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
    const char* from = static_cast<const char*>(src.data()) + src_offset;
    queue_.Push(
        [dst, from, bytes] {
          if (bytes > 0) std::memcpy(dst, from, bytes);
          return absl::OkStatus();
        },
        "");
    return Synchronize();
  }
  absl::StatusOr<Event> Record() override {
    auto point = std::make_shared<EventPoint>(EventPoint{&queue_, queue_.pushed()});
    return Event(std::shared_ptr<void>(point, point.get()));
  }
  absl::Status Wait(const Event& event) override {
    if (event.handle() == nullptr) return absl::OkStatus();
    const EventPoint at = *static_cast<const EventPoint*>(event.handle());
    if (at.queue == &queue_) return absl::OkStatus();  // in order already
    queue_.Push(
        [at] {
          at.queue->WaitFor(at.point);
          return absl::OkStatus();
        },
        "");
    return absl::OkStatus();
  }
  absl::Status Synchronize() override { return queue_.Drain(); }

  absl::Status Embed(const WeightMatrix& table, const int32_t* tokens, int64_t n,
                     float* out) override {
    return Op("embed", [=, this] { return inner_.Embed(table, tokens, n, out); });
  }
  absl::Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t width, float eps,
                       float* y) override {
    return Op("rms_norm", [=, this] { return inner_.RmsNorm(x, weight, rows, width, eps, y); });
  }
  absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) override {
    return Op("matmul", [=, this] { return inner_.MatMul(w, x, n, y); });
  }
  absl::Status AddBias(float* x, const float* bias, int64_t rows, int64_t width) override {
    return Op("add_bias", [=, this] { return inner_.AddBias(x, bias, rows, width); });
  }
  absl::Status Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int64_t* positions,
                    double theta) override {
    return Op("rope", [=, this] { return inner_.Rope(x, n, heads, head_dim, positions, theta); });
  }
  absl::Status WriteKv(const PagedKv& kv, int layer, const float* k, const float* v,
                       int64_t n) override {
    return Op("kv_write", [=, this] { return inner_.WriteKv(kv, layer, k, v, n); });
  }
  absl::Status Attention(const PagedKv& kv, int layer, const float* q, int64_t n, int64_t heads,
                         float* out) override {
    return Op("attention", [=, this] { return inner_.Attention(kv, layer, q, n, heads, out); });
  }
  absl::Status RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k,
                          const RouterSpec& spec, int32_t* chosen, float* weights) override {
    return Op("router_topk", [=, this] {
      return inner_.RouterTopK(logits, n, experts, k, spec, chosen, weights);
    });
  }
  absl::Status SiluMul(const float* gate, const float* up, int64_t count, float* out) override {
    return Op("silu_mul", [=, this] { return inner_.SiluMul(gate, up, count, out); });
  }
  absl::Status ExpertFfn(const SwiGluWeights& w, const float* x, const int32_t* rows, int64_t m,
                         float* out, const int32_t* out_rows, float* scratch) override {
    return Op("expert_ffn",
              [=, this] { return inner_.ExpertFfn(w, x, rows, m, out, out_rows, scratch); });
  }
  absl::Status MoeCombine(const float* expert_out, const float* weights, int64_t n, int64_t k,
                          int64_t width, float* out) override {
    return Op("moe_combine",
              [=, this] { return inner_.MoeCombine(expert_out, weights, n, k, width, out); });
  }
  absl::Status Add(float* acc, const float* x, int64_t count) override {
    return Op("add", [=, this] { return inner_.Add(acc, x, count); });
  }
  absl::Status SigmoidGatedAdd(const float* gate_logits, const float* x, int64_t n, int64_t width,
                               float* out) override {
    return Op("sigmoid_gated_add",
              [=, this] { return inner_.SigmoidGatedAdd(gate_logits, x, n, width, out); });
  }
  absl::Status GatherRows(const float* src, int64_t width, const int32_t* rows, int64_t m,
                          float* dst) override {
    return Op("gather_rows", [=, this] { return inner_.GatherRows(src, width, rows, m, dst); });
  }
  absl::Status Rotary(float* x, int64_t n, const RotarySpec& spec,
                      const int64_t* positions) override {
    return Op("rotary", [=, this] { return inner_.Rotary(x, n, spec, positions); });
  }
  absl::Status MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n,
                            const MlaShape& shape, const WeightMatrix& kv_b, float* out,
                            float* scratch) override {
    return Op("mla_attention", [=, this] {
      return inner_.MlaAttention(kv, layer, q, n, shape, kv_b, out, scratch);
    });
  }

 private:
  template <class Copy>
  void CopyItem(Copy copy, uint64_t bytes) {
    queue_.Push(
        [copy = std::move(copy)] {
          copy();
          return absl::OkStatus();
        },
        is_copy_ ? absl::StrCat("copy ", bytes) : "", is_copy_ ? bytes : 0);
  }
  absl::Status Op(const char* name, std::function<absl::Status()> work) {
    queue_.Push(std::move(work), name, 0, /*op=*/true);
    return absl::OkStatus();
  }

  Queue& queue_;
  Memory& memory_;
  Stream& inner_;
  const bool is_copy_;
};

DelayedCopyBackend::DelayedCopyBackend(std::shared_ptr<Backend> inner,
                                       const DelayedCopyOptions& options)
    : inner_(std::move(inner)) {
  memory_ = std::make_unique<Memory>(this, inner_->device());
  copy_queue_ = std::make_unique<Queue>(options, /*copies=*/true, &log_, &log_mutex_);
  compute_queue_ = std::make_unique<Queue>(options, /*copies=*/false, &log_, &log_mutex_);
  copy_stream_ =
      std::make_unique<QueueStream>(copy_queue_.get(), memory_.get(), &inner_->copy(), true);
  compute_stream_ =
      std::make_unique<QueueStream>(compute_queue_.get(), memory_.get(), &inner_->compute(), false);
}

DelayedCopyBackend::~DelayedCopyBackend() {
  ReleaseCopies();
  copy_queue_->Drain().IgnoreError();
  compute_queue_->Drain().IgnoreError();
  copy_stream_.reset();
  compute_stream_.reset();
  copy_queue_.reset();
  compute_queue_.reset();
}

Device& DelayedCopyBackend::device() { return *memory_; }
Stream& DelayedCopyBackend::compute() { return *compute_stream_; }
Stream& DelayedCopyBackend::copy() { return *copy_stream_; }
void DelayedCopyBackend::HoldCopies() { copy_queue_->Hold(true); }
void DelayedCopyBackend::ReleaseCopies() { copy_queue_->Hold(false); }
uint64_t DelayedCopyBackend::copies_pending() const { return copy_queue_->copies_pending(); }
uint64_t DelayedCopyBackend::copies_done() const { return copy_queue_->copies_done(); }
std::vector<std::string> DelayedCopyBackend::Log() const {
  std::lock_guard lock(log_mutex_);
  return {log_.begin(), log_.end()};
}

}  // namespace moed::kernels
