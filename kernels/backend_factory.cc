// The one place backends are made: the only code that names the implementations.
#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cpu_backend.h"
#ifdef MOED_HAVE_CUDA
#include "kernels/cuda/cuda_backend.h"
#endif

namespace moed::kernels {

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

absl::StatusOr<BackendChoice> CreateBackend(BackendKind kind, const BackendOptions& options) {
  BackendChoice choice;
  if (kind == BackendKind::kCpu) {
    choice.backend = CreateCpuBackend(options.cpu_threads);
    return choice;
  }
#ifdef MOED_HAVE_CUDA
  absl::StatusOr<std::unique_ptr<Backend>> cuda_backend =
      cuda::CreateCudaBackend(options.cuda_device);
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
  choice.backend = CreateCpuBackend(options.cpu_threads);
  choice.fallback_reason = std::string(failure.message());
  return choice;
}

}  // namespace moed::kernels
