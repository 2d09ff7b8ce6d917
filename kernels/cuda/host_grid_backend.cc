#include "kernels/cuda/host_grid_backend.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/grid_stream.h"
#include "kernels/host_memory.h"

namespace moed::kernels::grid {
namespace {

// Runs bodies as a GPU would index them: block by block, thread by thread.
class HostLauncher {
 public:
  template <class Body>
  void Elementwise(int64_t count, const Body& body) {
    const int64_t blocks = (count + kBlockThreads - 1) / kBlockThreads;
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t thread = 0; thread < kBlockThreads; ++thread) {
        const int64_t i = block * kBlockThreads + thread;
        if (i < count) body(i);
      }
    }
  }

  template <class Body>
  void Warps(int64_t items, const Body& body) {
    using Acc = typename Body::Acc;
    const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
    Acc lanes[kWarpSize], next[kWarpSize];
    for (int64_t block = 0; block < blocks; ++block) {
      for (int64_t warp = 0; warp < kWarpsPerBlock; ++warp) {
        const int64_t item = block * kWarpsPerBlock + warp;
        if (item >= items) continue;
        for (int lane = 0; lane < kWarpSize; ++lane) lanes[lane] = body.Partial(item, lane);
        // __shfl_xor_sync's butterfly: each lane adds its partner's value, offsets 16..1.
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
          for (int lane = 0; lane < kWarpSize; ++lane) {
            next[lane] = lanes[lane] + lanes[lane ^ offset];
          }
          std::memcpy(lanes, next, sizeof(lanes));
        }
        for (int lane = 0; lane < kWarpSize; ++lane) body.Finish(item, lane, lanes[lane]);
      }
    }
  }
};

class HostDevice final : public Device {
 public:
  absl::StatusOr<DeviceInfo> info() const override {
    DeviceInfo info;
    info.name = "CUDA kernels on the host";
    info.compute_units = 1;
    return info;
  }
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    return Make(bytes, BufferKind::kDevice);
  }
  absl::StatusOr<DeviceBuffer> AllocateHost(size_t bytes) override {
    return Make(bytes, BufferKind::kPinnedHost);
  }
  bool host_memory_is_device_memory() const override { return true; }
  // Work runs in order on the calling thread: an event is done once recorded.
  absl::Status WaitForEvent(const Event& /*event*/) override { return absl::OkStatus(); }
  bool Supports(Op op, WeightFormat format) const override {
    return op != Op::kEmbedding || format == WeightFormat::kF32 || format == WeightFormat::kF16 ||
           format == WeightFormat::kBF16;
  }

 protected:
  void Free(void* data, size_t, BufferKind) override { std::free(data); }

 private:
  absl::StatusOr<DeviceBuffer> Make(size_t bytes, BufferKind kind) {
    return host_memory::Allocate(this, bytes, kind, kind == BufferKind::kPinnedHost ? 4096 : 256);
  }
};

class HostGridStream final : public GridStream<HostLauncher> {
 public:
  absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                            size_t bytes) override {
    return host_memory::CopyToDevice(dst, dst_offset, src, bytes);
  }
  absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset, const DeviceBuffer& src,
                            size_t src_offset, size_t bytes) override {
    return host_memory::CopyOnDevice(dst, dst_offset, src, src_offset, bytes);
  }
  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override {
    return host_memory::CopyToHost(dst, src, src_offset, bytes);
  }
  absl::StatusOr<Event> Record() override { return Event(); }
  absl::Status Wait(const Event&) override { return absl::OkStatus(); }
  absl::Status Synchronize() override { return absl::OkStatus(); }

 protected:
  HostLauncher& launcher() override { return launcher_; }
  absl::Status Launched(const char*) override { return absl::OkStatus(); }

 private:
  HostLauncher launcher_;
};

class HostGridBackend final : public Backend {
 public:
  absl::string_view name() const override { return "cuda-host-grid"; }
  Device& device() override { return device_; }
  Stream& compute() override { return compute_; }
  Stream& copy() override { return copy_; }

 private:
  HostDevice device_;
  HostGridStream compute_, copy_;
};

}  // namespace

std::unique_ptr<Backend> CreateHostGridBackend() { return std::make_unique<HostGridBackend>(); }

}  // namespace moed::kernels::grid
