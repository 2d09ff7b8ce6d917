#include "cache/aligned_buffer.h"

#include <cstdlib>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"

namespace moed::cache {

absl::StatusOr<AlignedBuffer> AlignedBuffer::Allocate(size_t bytes, size_t alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("alignment ", alignment, " is not a power of two"));
  }
  size_t rounded = AlignUp(bytes, alignment);
  AlignedBuffer buffer;
  if (rounded > 0) {
    void* memory = std::aligned_alloc(alignment, rounded);
    if (memory == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate ", rounded, " bytes"));
    }
    std::memset(memory, 0, rounded);
    buffer.data_ = static_cast<uint8_t*>(memory);
  }
  buffer.size_ = rounded;
  buffer.alignment_ = alignment;
  return buffer;
}

AlignedBuffer::AlignedBuffer(AlignedBuffer&& other) noexcept { *this = std::move(other); }

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    alignment_ = std::exchange(other.alignment_, 0);
  }
  return *this;
}

AlignedBuffer::~AlignedBuffer() { std::free(data_); }

}  // namespace moed::cache
