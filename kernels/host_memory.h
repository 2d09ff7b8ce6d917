// For backends whose device memory is host memory (the CPU; the CUDA kernels run on the
// host in tests): aligned buffers and the copies between them.
#pragma once

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"

namespace moed::kernels::host_memory {

inline absl::StatusOr<DeviceBuffer> Allocate(Device* owner, size_t bytes, BufferKind kind,
                                             size_t alignment) {
  if (bytes == 0) return DeviceBuffer(owner, nullptr, 0, kind);
  void* data = std::aligned_alloc(alignment, (bytes + alignment - 1) / alignment * alignment);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", bytes, " bytes"));
  }
  return DeviceBuffer(owner, data, bytes, kind);
}

inline absl::Status CopyToDevice(const DeviceBuffer& dst, size_t dst_offset, const void* src,
                                 size_t bytes) {
  if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
  if (bytes > 0) std::memcpy(static_cast<char*>(dst.data()) + dst_offset, src, bytes);
  return absl::OkStatus();
}

inline absl::Status CopyOnDevice(const DeviceBuffer& dst, size_t dst_offset,
                                 const DeviceBuffer& src, size_t src_offset, size_t bytes) {
  if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
  if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
  if (bytes > 0) {
    std::memmove(static_cast<char*>(dst.data()) + dst_offset,
                 static_cast<const char*>(src.data()) + src_offset, bytes);
  }
  return absl::OkStatus();
}

inline absl::Status CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                               size_t bytes) {
  if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
  if (bytes > 0) std::memcpy(dst, static_cast<const char*>(src.data()) + src_offset, bytes);
  return absl::OkStatus();
}

}  // namespace moed::kernels::host_memory
