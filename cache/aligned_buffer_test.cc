#include "cache/aligned_buffer.h"

#include <catch2/catch.hpp>

namespace moed::cache {
namespace {

TEST_CASE("aligned buffers round their size up and align their address") {
  absl::StatusOr<AlignedBuffer> buffer = AlignedBuffer::Allocate(5000);
  REQUIRE(buffer.ok());
  CHECK(buffer->size() == 8192);
  CHECK(reinterpret_cast<uintptr_t>(buffer->data()) % kDirectIoAlignment == 0);
  CHECK(buffer->data()[8191] == 0);

  AlignedBuffer moved = std::move(*buffer);
  CHECK(moved.size() == 8192);
  CHECK(buffer->data() == nullptr);
  CHECK(buffer->size() == 0);
}

TEST_CASE("alignment must be a power of two") {
  CHECK(AlignedBuffer::Allocate(100, 3000).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(AlignUp(0, 4096) == 0);
  CHECK(AlignUp(1, 4096) == 4096);
  CHECK(AlignUp(4096, 4096) == 4096);
}

}  // namespace
}  // namespace moed::cache
