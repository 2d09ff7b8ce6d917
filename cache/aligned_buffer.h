// Memory aligned for O_DIRECT reads: the address and the size are multiples of the alignment,
// so a buffer can be handed to the SSD stager without copying. A type, not a convention.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"

namespace moed::cache {

inline constexpr size_t kDirectIoAlignment = 4096;

constexpr uint64_t AlignUp(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

class AlignedBuffer {
 public:
  // `bytes` is rounded up to the alignment; the memory is touched once so that the first
  // read into it does not pay page faults.
  static absl::StatusOr<AlignedBuffer> Allocate(size_t bytes,
                                                size_t alignment = kDirectIoAlignment);

  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept;
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept;
  ~AlignedBuffer();

  uint8_t* data() { return data_; }
  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  size_t alignment() const { return alignment_; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t alignment_ = 0;
};

}  // namespace moed::cache
