// For tests and benchmarks: a CPU backend from the factory, shared as models hold it.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace moed::kernels {

inline std::shared_ptr<Backend> TestCpuBackend(int threads = 0) {
  BackendOptions options;
  options.cpu_threads = threads;
  return std::move(CreateBackend(BackendKind::kCpu, options)->backend);
}

}  // namespace moed::kernels
