// The CPU backend: device memory is 64-byte aligned RAM, copies are memcpy, operators run on
// the calling thread and a pool of workers (kernels/cpu_ops.h) and are done when they return.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace moed::kernels {

// `threads` 0: one per hardware thread. Made only through CreateBackend.
std::unique_ptr<Backend> CreateCpuBackend(int threads);

}  // namespace moed::kernels
