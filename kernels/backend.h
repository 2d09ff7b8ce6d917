// The compute backend seam: everything above kernels/ talks to a Backend and never
// branches on which implementation it has.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::kernels {

enum class BackendKind { kAuto, kCpu, kCuda };

// Parses "auto", "cpu" or "cuda".
absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view text);
absl::string_view BackendKindName(BackendKind kind);

struct DeviceInfo {
  int index = 0;
  std::string name;
  uint64_t total_memory_bytes = 0;
  uint64_t free_memory_bytes = 0;
  // CUDA compute capability ("9.0"); empty for the CPU.
  std::string compute_capability;
  // Streaming multiprocessors on a GPU, hardware threads on the CPU.
  int compute_units = 0;
};

class Backend;

// Memory owned by a backend ("device" memory; on the CPU backend, RAM). Move-only; freed
// when it goes out of scope.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* owner, void* data, size_t bytes)
      : owner_(owner), data_(data), bytes_(bytes) {}
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  ~DeviceBuffer();

  void* data() const { return data_; }
  size_t size() const { return bytes_; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  Backend* owner_ = nullptr;
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;

  // "cpu" or "cuda".
  virtual absl::string_view name() const = 0;
  // The device this backend computes on, with its memory read now.
  virtual absl::StatusOr<DeviceInfo> device() const = 0;

  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  // Starts a host-to-device copy on the backend's copy queue; Synchronize() waits for it.
  virtual absl::Status CopyToDeviceAsync(const DeviceBuffer& dst, size_t dst_offset,
                                         const void* src, size_t bytes) = 0;
  // Copies device memory back to the host; returns when the bytes are in dst.
  virtual absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                                  size_t bytes) = 0;
  // Waits for every copy and kernel this backend has queued.
  virtual absl::Status Synchronize() = 0;

  // Operators. Each is queued on the backend's compute queue.
  // dst[i] = float(src[i]) for `count` bf16 values (bf16 widens exactly).
  virtual absl::Status ConvertBf16ToF32(const DeviceBuffer& src, const DeviceBuffer& dst,
                                        size_t count) = 0;

 protected:
  friend class DeviceBuffer;
  virtual void Free(void* data, size_t bytes) = 0;
};

// Every device a compiled backend can see. Never fails: a backend that cannot enumerate
// (no driver) contributes no devices and says why in `problems`.
struct Discovery {
  std::vector<DeviceInfo> cuda_devices;
  std::vector<std::string> problems;
};
Discovery DiscoverDevices();

struct BackendChoice {
  std::unique_ptr<Backend> backend;
  // Set when kAuto wanted a GPU and fell back to the CPU: why.
  std::string fallback_reason;
};

// kAuto picks CUDA device `cuda_device` when there is one and the CPU otherwise;
// kCuda without a usable device is an error.
absl::StatusOr<BackendChoice> CreateBackend(BackendKind kind, int cuda_device);

// True when this binary was built with the CUDA backend.
bool CudaCompiledIn();

}  // namespace moed::kernels
