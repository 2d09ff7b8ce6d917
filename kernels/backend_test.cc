#include "kernels/backend.h"

#include <catch2/catch.hpp>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "kernels/delayed_copy_backend.h"

namespace moed::kernels {
namespace {

// Every backend this machine can run: the CPU always, CUDA device 0 when there is one.
std::vector<std::unique_ptr<Backend>> AvailableBackends() {
  std::vector<std::unique_ptr<Backend>> backends;
  backends.push_back(std::move(CreateBackend(BackendKind::kCpu)->backend));
  if (!DiscoverDevices().cuda_devices.empty()) {
    absl::StatusOr<BackendChoice> cuda = CreateBackend(BackendKind::kCuda);
    REQUIRE(cuda.ok());
    backends.push_back(std::move(cuda->backend));
  }
  // The GPU stand-in the cache's overlap tests run on, over the CPU.
  backends.push_back(std::make_unique<DelayedCopyBackend>(
      std::shared_ptr<Backend>(std::move(CreateBackend(BackendKind::kCpu)->backend)),
      DelayedCopyOptions{std::chrono::microseconds(200)}));
  return backends;
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
  absl::StatusOr<BackendChoice> choice = CreateBackend(BackendKind::kAuto);
  REQUIRE(choice.ok());
  if (discovery.cuda_devices.empty()) {
    CHECK(choice->backend->name() == "cpu");
    CHECK_FALSE(choice->fallback_reason.empty());
    REQUIRE_FALSE(discovery.problems.empty());
    absl::StatusOr<BackendChoice> forced = CreateBackend(BackendKind::kCuda);
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
    CHECK_FALSE(CreateBackend(BackendKind::kCuda, BackendOptions{1000, 0}).ok());
  }
}

TEST_CASE("every backend reports its device and memory") {
  for (auto& backend : AvailableBackends()) {
    INFO(backend->name());
    absl::StatusOr<DeviceInfo> device = backend->device().info();
    REQUIRE(device.ok());
    CHECK_FALSE(device->name.empty());
    CHECK(device->total_memory_bytes > 0);
    CHECK(device->free_memory_bytes <= device->total_memory_bytes);
    CHECK(device->compute_units > 0);
  }
}

TEST_CASE("every backend copies bytes to the device, between buffers and back unchanged") {
  std::vector<uint8_t> host(1 << 20);
  std::mt19937 rng(7);
  for (auto& b : host) b = static_cast<uint8_t>(rng());
  for (auto& backend : AvailableBackends()) {
    INFO(backend->name());
    absl::StatusOr<DeviceBuffer> buffer = backend->device().Allocate(host.size() + 4096);
    absl::StatusOr<DeviceBuffer> second = backend->device().Allocate(host.size());
    absl::StatusOr<DeviceBuffer> pinned = backend->device().AllocateHost(host.size());
    REQUIRE((buffer.ok() && second.ok() && pinned.ok()));
    CHECK(pinned->kind() == BufferKind::kPinnedHost);
    std::memcpy(pinned->data(), host.data(), host.size());
    // Staged on the copy stream; the compute stream waits for it through an event.
    REQUIRE(backend->copy().CopyToDevice(*buffer, 4096, pinned->data(), host.size()).ok());
    absl::StatusOr<Event> copied = backend->copy().Record();
    REQUIRE(copied.ok());
    REQUIRE(backend->compute().Wait(*copied).ok());
    REQUIRE(backend->compute().CopyOnDevice(*second, 0, *buffer, 4096, host.size()).ok());
    std::vector<uint8_t> back(host.size());
    REQUIRE(backend->compute().CopyToHost(back.data(), *second, 0, back.size()).ok());
    CHECK(back == host);
    absl::Status outside = backend->compute().CopyToDevice(*buffer, 8192, host.data(), host.size());
    CHECK(outside.code() == absl::StatusCode::kOutOfRange);
    CHECK(backend->compute().CopyOnDevice(*second, 1, *buffer, 0, host.size()).code() ==
          absl::StatusCode::kOutOfRange);
  }
}

TEST_CASE("the delayed-copy backend copies only when released, and a waiting stream sees it") {
  DelayedCopyBackend backend(
      std::shared_ptr<Backend>(std::move(CreateBackend(BackendKind::kCpu)->backend)),
      DelayedCopyOptions{});
  constexpr size_t kFloats = 1024;
  absl::StatusOr<DeviceBuffer> device = backend.device().Allocate(2 * kFloats * sizeof(float));
  absl::StatusOr<DeviceBuffer> pinned = backend.device().AllocateHost(kFloats * sizeof(float));
  REQUIRE((device.ok() && pinned.ok()));
  CHECK_FALSE(backend.device().host_memory_is_device_memory());
  std::vector<float> pageable(kFloats, 2.0f);
  for (size_t i = 0; i < kFloats; ++i) pinned->as<float>()[i] = 1.0f;

  backend.HoldCopies();
  Stream& copy = backend.copy();
  REQUIRE(copy.CopyToDevice(*device, 0, pinned->data(), kFloats * sizeof(float)).ok());
  REQUIRE(
      copy.CopyToDevice(*device, kFloats * sizeof(float), pageable.data(), kFloats * sizeof(float))
          .ok());
  absl::StatusOr<Event> copied = copy.Record();
  REQUIRE(copied.ok());
  // A DMA engine reads pinned memory when the copy runs; pageable memory is read when queued.
  for (size_t i = 0; i < kFloats; ++i) pinned->as<float>()[i] = 3.0f;
  std::fill(pageable.begin(), pageable.end(), 5.0f);

  Stream& compute = backend.compute();
  REQUIRE(compute.Wait(*copied).ok());
  float* first = device->as<float>();
  REQUIRE(compute.Add(first, first + kFloats, kFloats).ok());  // 3 + 2
  std::vector<float> back(kFloats);
  absl::Status read;
  std::thread reader([&] { read = compute.CopyToHost(back.data(), *device, 0, back.size() * 4); });
  // Held: nothing has been copied, so the compute stream has not run the add either.
  CHECK(backend.copies_pending() == 2);
  CHECK(backend.copies_done() == 0);
  backend.ReleaseCopies();
  reader.join();
  REQUIRE(read.ok());
  REQUIRE(backend.device().WaitForEvent(*copied).ok());
  CHECK(backend.copies_done() == 2);
  CHECK(std::all_of(back.begin(), back.end(), [](float v) { return v == 5.0f; }));
  const std::vector<std::string> log = backend.Log();
  const auto add = std::find(log.begin(), log.end(), "add");
  REQUIRE(add != log.end());
  CHECK(std::count(log.begin(), add, "copy 4096") == 2);
}

}  // namespace
}  // namespace moed::kernels
