#include "kernels/backend.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <vector>

namespace moed::kernels {
namespace {

// Every backend this machine can run: the CPU always, CUDA device 0 when there is one.
std::vector<std::unique_ptr<Backend>> AvailableBackends() {
  std::vector<std::unique_ptr<Backend>> backends;
  backends.push_back(std::move(CreateBackend(BackendKind::kCpu, 0)->backend));
  if (!DiscoverDevices().cuda_devices.empty()) {
    absl::StatusOr<BackendChoice> cuda = CreateBackend(BackendKind::kCuda, 0);
    REQUIRE(cuda.ok());
    backends.push_back(std::move(cuda->backend));
  }
  return backends;
}

float ReferenceBf16ToF32(uint16_t bits) {
  // bf16 is the top half of an IEEE binary32: sign, 8-bit exponent, 7-bit mantissa.
  int sign = (bits >> 15) & 1;
  int exponent = (bits >> 7) & 0xff;
  int mantissa = bits & 0x7f;
  if (exponent == 0xff) {
    if (mantissa != 0) return std::numeric_limits<float>::quiet_NaN();
    return sign ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  }
  double value = exponent == 0 ? std::ldexp(mantissa / 128.0, -126)
                               : std::ldexp(1.0 + mantissa / 128.0, exponent - 127);
  return static_cast<float>(sign ? -value : value);
}

TEST_CASE("backend names parse and unknown names are refused") {
  CHECK(*ParseBackendKind("auto") == BackendKind::kAuto);
  CHECK(*ParseBackendKind("cpu") == BackendKind::kCpu);
  CHECK(*ParseBackendKind("cuda") == BackendKind::kCuda);
  absl::StatusOr<BackendKind> bad = ParseBackendKind("tpu");
  REQUIRE_FALSE(bad.ok());
  CHECK(bad.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(std::string(bad.status().message()).find("tpu") != std::string::npos);
}

TEST_CASE("auto picks CUDA when a device exists and falls back to the CPU with a reason") {
  Discovery discovery = DiscoverDevices();
  absl::StatusOr<BackendChoice> choice = CreateBackend(BackendKind::kAuto, 0);
  REQUIRE(choice.ok());
  if (discovery.cuda_devices.empty()) {
    CHECK(choice->backend->name() == "cpu");
    CHECK_FALSE(choice->fallback_reason.empty());
    REQUIRE_FALSE(discovery.problems.empty());
    absl::StatusOr<BackendChoice> forced = CreateBackend(BackendKind::kCuda, 0);
    REQUIRE_FALSE(forced.ok());
    CHECK(std::string(forced.status().message()).find("--backend cuda") != std::string::npos);
  } else {
    CHECK(choice->backend->name() == "cuda");
    CHECK(choice->fallback_reason.empty());
    for (const DeviceInfo& device : discovery.cuda_devices) {
      CHECK_FALSE(device.name.empty());
      CHECK(device.total_memory_bytes > 0);
      CHECK(device.free_memory_bytes <= device.total_memory_bytes);
      CHECK_FALSE(device.compute_capability.empty());
    }
    CHECK_FALSE(CreateBackend(BackendKind::kCuda, 1000).ok());
  }
}

TEST_CASE("every backend reports its device and memory") {
  for (auto& backend : AvailableBackends()) {
    INFO(backend->name());
    absl::StatusOr<DeviceInfo> device = backend->device();
    REQUIRE(device.ok());
    CHECK_FALSE(device->name.empty());
    CHECK(device->total_memory_bytes > 0);
    CHECK(device->free_memory_bytes <= device->total_memory_bytes);
    CHECK(device->compute_units > 0);
  }
}

TEST_CASE("every backend copies bytes to the device and back unchanged") {
  std::vector<uint8_t> host(1 << 20);
  std::mt19937 rng(7);
  for (auto& b : host) b = static_cast<uint8_t>(rng());
  for (auto& backend : AvailableBackends()) {
    INFO(backend->name());
    absl::StatusOr<DeviceBuffer> buffer = backend->Allocate(host.size() + 4096);
    REQUIRE(buffer.ok());
    REQUIRE(backend->CopyToDeviceAsync(*buffer, 4096, host.data(), host.size()).ok());
    REQUIRE(backend->Synchronize().ok());
    std::vector<uint8_t> back(host.size());
    REQUIRE(backend->CopyToHost(back.data(), *buffer, 4096, back.size()).ok());
    CHECK(back == host);
    absl::Status outside = backend->CopyToDeviceAsync(*buffer, 8192, host.data(), host.size());
    CHECK(outside.code() == absl::StatusCode::kOutOfRange);
  }
}

TEST_CASE("bf16 to f32 conversion matches the plain reference on every backend") {
  std::vector<uint16_t> input;
  for (uint32_t bits = 0; bits < 65536; ++bits) input.push_back(static_cast<uint16_t>(bits));
  for (auto& backend : AvailableBackends()) {
    INFO(backend->name());
    auto src = backend->Allocate(input.size() * 2);
    auto dst = backend->Allocate(input.size() * 4);
    REQUIRE((src.ok() && dst.ok()));
    REQUIRE(backend->CopyToDeviceAsync(*src, 0, input.data(), input.size() * 2).ok());
    REQUIRE(backend->ConvertBf16ToF32(*src, *dst, input.size()).ok());
    std::vector<float> out(input.size());
    REQUIRE(backend->CopyToHost(out.data(), *dst, 0, out.size() * 4).ok());
    size_t mismatches = 0;
    for (size_t i = 0; i < input.size(); ++i) {
      float expected = ReferenceBf16ToF32(input[i]);
      bool same = std::isnan(expected) ? std::isnan(out[i]) : out[i] == expected;
      if (!same) ++mismatches;
    }
    CHECK(mismatches == 0);
    CHECK(backend->ConvertBf16ToF32(*src, *dst, input.size() + 1).code() ==
          absl::StatusCode::kOutOfRange);
  }
}

}  // namespace
}  // namespace moed::kernels
