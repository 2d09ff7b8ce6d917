// Launches the kernel bodies on a CUDA stream. Plain C++ (no CUDA or Abseil types) so that
// nvcc compiles only cuda_kernels.cu and everything else stays in the host compiler. One
// overload per body: the grid and the indexing are kernel_bodies.h's.
#pragma once

#include "kernels/cuda/kernel_bodies.h"

namespace moed::kernels::cuda {

class DeviceLauncher {
 public:
  explicit DeviceLauncher(void* stream) : stream_(stream) {}

#define MOED_ELEMENT_BODY(Body) void Elementwise(int64_t count, const grid::Body& body);
#define MOED_WARP_BODY(Body) void Warps(int64_t items, const grid::Body& body);
#include "kernels/cuda/kernel_list.inc"
#undef MOED_ELEMENT_BODY
#undef MOED_WARP_BODY

  // The first launch error since the last call (a cudaError_t), then cudaSuccess.
  int TakeError();

 private:
  void Note(int error) {
    if (error_ == 0) error_ = error;
  }
  void* stream_;
  int error_ = 0;
};

}  // namespace moed::kernels::cuda
