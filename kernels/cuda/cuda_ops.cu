#include <cuda_runtime.h>

#include "kernels/cuda/cuda_ops.h"

namespace moed::kernels::cuda {
namespace {

__global__ void ConvertBf16ToF32Kernel(const uint16_t* __restrict__ src, float* __restrict__ dst,
                                       size_t count) {
  size_t stride = static_cast<size_t>(blockDim.x) * gridDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += stride) {
    dst[i] = __uint_as_float(static_cast<unsigned int>(src[i]) << 16);
  }
}

}  // namespace

int LaunchConvertBf16ToF32(const uint16_t* src, float* dst, size_t count, void* stream) {
  if (count == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  size_t blocks = (count + kThreads - 1) / kThreads;
  if (blocks > 65535) blocks = 65535;
  ConvertBf16ToF32Kernel<<<static_cast<unsigned int>(blocks), kThreads, 0,
                           static_cast<cudaStream_t>(stream)>>>(src, dst, count);
  return cudaGetLastError();
}

}  // namespace moed::kernels::cuda
