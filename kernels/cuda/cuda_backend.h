#pragma once

#include <memory>
#include <vector>

#include "kernels/backend.h"

namespace moed::kernels::cuda {

// Devices the CUDA runtime can see. An error (no driver, no device) is a status, not a crash.
absl::StatusOr<std::vector<DeviceInfo>> ListDevices();

// A backend computing on CUDA device `index`: a compute stream and a copy stream. Made only
// through kernels::CreateBackend.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(int index);

}  // namespace moed::kernels::cuda
