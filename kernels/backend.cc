#include "kernels/backend.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/cpu_backend.h"
#ifdef MOED_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace moed::kernels {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) owner_->Free(data_, bytes_);
    owner_ = std::exchange(other.owner_, nullptr);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

DeviceBuffer::~DeviceBuffer() {
  if (data_ != nullptr) owner_->Free(data_, bytes_);
}

absl::StatusOr<BackendKind> ParseBackendKind(absl::string_view text) {
  if (text == "auto") return BackendKind::kAuto;
  if (text == "cpu") return BackendKind::kCpu;
  if (text == "cuda") return BackendKind::kCuda;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", text, "' (expected auto, cpu or cuda)"));
}

absl::string_view BackendKindName(BackendKind kind) {
  switch (kind) {
    case BackendKind::kAuto:
      return "auto";
    case BackendKind::kCpu:
      return "cpu";
    case BackendKind::kCuda:
      return "cuda";
  }
  return "?";
}

bool CudaCompiledIn() {
#ifdef MOED_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

Discovery DiscoverDevices() {
  Discovery discovery;
#ifdef MOED_HAVE_CUDA
  absl::StatusOr<std::vector<DeviceInfo>> devices = cuda::ListDevices();
  if (devices.ok()) {
    discovery.cuda_devices = *std::move(devices);
  } else {
    discovery.problems.push_back(std::string(devices.status().message()));
  }
#else
  discovery.problems.push_back("this build has no CUDA backend");
#endif
  return discovery;
}

absl::StatusOr<BackendChoice> CreateBackend(BackendKind kind, [[maybe_unused]] int cuda_device) {
  BackendChoice choice;
  if (kind == BackendKind::kCpu) {
    choice.backend = std::make_unique<CpuBackend>();
    return choice;
  }
#ifdef MOED_HAVE_CUDA
  absl::StatusOr<std::unique_ptr<Backend>> cuda_backend = cuda::CreateCudaBackend(cuda_device);
  if (cuda_backend.ok()) {
    choice.backend = *std::move(cuda_backend);
    return choice;
  }
  absl::Status failure = cuda_backend.status();
#else
  absl::Status failure = absl::UnavailableError("this build has no CUDA backend");
#endif
  if (kind == BackendKind::kCuda) {
    return absl::Status(failure.code(), absl::StrCat("--backend cuda: ", failure.message()));
  }
  choice.backend = std::make_unique<CpuBackend>();
  choice.fallback_reason = std::string(failure.message());
  return choice;
}

}  // namespace moed::kernels
