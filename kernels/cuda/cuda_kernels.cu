#include <cuda_runtime.h>

#include "kernels/cuda/cuda_kernels.h"

namespace moed::kernels::cuda {
namespace {

template <class Body>
__global__ void ElementKernel(int64_t count, Body body) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) body(i);
}

template <class Body>
__global__ void WarpKernel(int64_t items, Body body) {
  const int64_t item =
      static_cast<int64_t>(blockIdx.x) * grid::kWarpsPerBlock + threadIdx.x / grid::kWarpSize;
  const int lane = static_cast<int>(threadIdx.x % grid::kWarpSize);
  if (item >= items) return;  // whole warps leave together: items are per warp
  typename Body::Acc value = body.Partial(item, lane);
  for (int offset = grid::kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xFFFFFFFFu, value, offset);
  }
  body.Finish(item, lane, value);
}

unsigned int Blocks(int64_t count, int64_t per_block) {
  return static_cast<unsigned int>((count + per_block - 1) / per_block);
}

}  // namespace

#define MOED_ELEMENT_BODY(Body)                                                 \
  void DeviceLauncher::Elementwise(int64_t count, const grid::Body& body) {     \
    if (count <= 0) return;                                                     \
    ElementKernel<<<Blocks(count, grid::kBlockThreads), grid::kBlockThreads, 0, \
                    static_cast<cudaStream_t>(stream_)>>>(count, body);         \
    Note(static_cast<int>(cudaGetLastError()));                                 \
  }
#define MOED_WARP_BODY(Body)                                                  \
  void DeviceLauncher::Warps(int64_t items, const grid::Body& body) {         \
    if (items <= 0) return;                                                   \
    WarpKernel<<<Blocks(items, grid::kWarpsPerBlock), grid::kBlockThreads, 0, \
                 static_cast<cudaStream_t>(stream_)>>>(items, body);          \
    Note(static_cast<int>(cudaGetLastError()));                               \
  }
#include "kernels/cuda/kernel_list.inc"
#undef MOED_ELEMENT_BODY
#undef MOED_WARP_BODY

int DeviceLauncher::TakeError() {
  int error = error_;
  error_ = 0;
  return error;
}

}  // namespace moed::kernels::cuda
