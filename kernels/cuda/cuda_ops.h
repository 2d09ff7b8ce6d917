// Launchers for the CUDA kernels. Plain C++ (no CUDA or Abseil types) so that nvcc compiles
// only the .cu files and everything else stays in the host compiler.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moed::kernels::cuda {

// Queues dst[i] = float(src[i]) on `stream` (a cudaStream_t). Returns a cudaError_t.
int LaunchConvertBf16ToF32(const uint16_t* src, float* dst, size_t count, void* stream);

}  // namespace moed::kernels::cuda
