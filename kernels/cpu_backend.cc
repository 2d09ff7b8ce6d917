#include "kernels/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace moed::kernels {
namespace {

constexpr size_t kAlignment = 64;

std::string CpuModelName() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (absl::StartsWith(line, "model name")) {
      std::pair<absl::string_view, absl::string_view> kv =
          absl::StrSplit(line, absl::MaxSplits(':', 1));
      return std::string(absl::StripAsciiWhitespace(kv.second));
    }
  }
  return "CPU";
}

// Reads "MemTotal" / "MemAvailable" (kB) from /proc/meminfo.
uint64_t MemInfoBytes(absl::string_view key) {
  std::ifstream meminfo("/proc/meminfo");
  std::string line;
  while (std::getline(meminfo, line)) {
    absl::string_view rest = line;
    if (absl::ConsumePrefix(&rest, key) && absl::ConsumePrefix(&rest, ":")) {
      rest = absl::StripAsciiWhitespace(rest);
      absl::ConsumeSuffix(&rest, " kB");
      uint64_t kib = 0;
      if (absl::SimpleAtoi(rest, &kib)) return kib * 1024;
    }
  }
  return 0;
}

}  // namespace

absl::Status CheckRange(const DeviceBuffer& buffer, size_t offset, size_t bytes) {
  if (offset > buffer.size() || bytes > buffer.size() - offset) {
    return absl::OutOfRangeError(absl::StrCat("range [", offset, ", ", offset + bytes,
                                              ") is outside a buffer of ", buffer.size(),
                                              " bytes"));
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceInfo> CpuBackend::device() const {
  DeviceInfo info;
  info.index = 0;
  info.name = CpuModelName();
  info.total_memory_bytes = MemInfoBytes("MemTotal");
  info.free_memory_bytes = MemInfoBytes("MemAvailable");
  info.compute_units = static_cast<int>(std::thread::hardware_concurrency());
  return info;
}

absl::StatusOr<DeviceBuffer> CpuBackend::Allocate(size_t bytes) {
  if (bytes == 0) return DeviceBuffer(this, nullptr, 0);
  size_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* data = std::aligned_alloc(kAlignment, rounded);
  if (data == nullptr) {
    return absl::ResourceExhaustedError(absl::StrCat("cpu: cannot allocate ", bytes, " bytes"));
  }
  return DeviceBuffer(this, data, bytes);
}

void CpuBackend::Free(void* data, size_t /*bytes*/) { std::free(data); }

absl::Status CpuBackend::CopyToDeviceAsync(const DeviceBuffer& dst, size_t dst_offset,
                                           const void* src, size_t bytes) {
  if (absl::Status s = CheckRange(dst, dst_offset, bytes); !s.ok()) return s;
  if (bytes > 0) std::memcpy(static_cast<char*>(dst.data()) + dst_offset, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyToHost(void* dst, const DeviceBuffer& src, size_t src_offset,
                                    size_t bytes) {
  if (absl::Status s = CheckRange(src, src_offset, bytes); !s.ok()) return s;
  if (bytes > 0) std::memcpy(dst, static_cast<const char*>(src.data()) + src_offset, bytes);
  return absl::OkStatus();
}

}  // namespace moed::kernels

namespace moed::kernels {

absl::Status CpuBackend::ConvertBf16ToF32(const DeviceBuffer& src, const DeviceBuffer& dst,
                                          size_t count) {
  if (absl::Status s = CheckRange(src, 0, count * sizeof(uint16_t)); !s.ok()) return s;
  if (absl::Status s = CheckRange(dst, 0, count * sizeof(float)); !s.ok()) return s;
  const auto* in = static_cast<const uint16_t*>(src.data());
  auto* out = static_cast<float*>(dst.data());
  for (size_t i = 0; i < count; ++i) {
    uint32_t bits = static_cast<uint32_t>(in[i]) << 16;
    std::memcpy(&out[i], &bits, sizeof(float));
  }
  return absl::OkStatus();
}

}  // namespace moed::kernels
