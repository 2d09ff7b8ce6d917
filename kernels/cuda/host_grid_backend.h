// The CUDA backend's kernel bodies run on the host: a plain loop over each launch grid
// (blocks × threads, warps with the device's butterfly order), in host memory. Not a serving
// backend: it lets every machine test the CUDA kernels' indexing, tails and numerics against
// the same reference table as the CPU backend.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace moed::kernels::grid {

std::unique_ptr<Backend> CreateHostGridBackend();

}  // namespace moed::kernels::grid
