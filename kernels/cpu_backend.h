#pragma once

#include "kernels/backend.h"

namespace moed::kernels {

// The CPU backend: "device" memory is 64-byte aligned RAM, copies are memcpy.
class CpuBackend final : public Backend {
 public:
  absl::string_view name() const override { return "cpu"; }
  absl::StatusOr<DeviceInfo> device() const override;
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyToDeviceAsync(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                                 size_t bytes) override;
  absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                          size_t bytes) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }
  absl::Status ConvertBf16ToF32(const DeviceBuffer& src, const DeviceBuffer& dst,
                                size_t count) override;

 protected:
  void Free(void* data, size_t bytes) override;
};

// Fails with OUT_OF_RANGE when [offset, offset + bytes) is not inside the buffer.
absl::Status CheckRange(const DeviceBuffer& buffer, size_t offset, size_t bytes);

}  // namespace moed::kernels
