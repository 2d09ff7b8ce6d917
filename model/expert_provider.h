// The seam between the architectures and wherever expert weights live. Architecture code
// asks for the experts a layer needs and computes each when the provider hands it over; it
// never assumes all experts are in memory. The expert cache implements this over the store.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "kernels/backend.h"

namespace moed::model {

// One routed expert's SwiGLU weights: down(silu(gate x) * up x).
using ExpertWeights = kernels::SwiGluWeights;

// Where the weights of one expert came from for one ForEachExpert call.
enum class ExpertSource { kDevice, kHost, kDisk };
struct ExpertServed {
  ExpertSource source = ExpertSource::kDevice;
  uint64_t bytes_staged = 0;  // moved into the device tier for this use
  double wait_seconds = 0;    // the caller waited for this expert before computing it
};

using ExpertCompute = std::function<absl::Status(int expert, const ExpertWeights& weights,
                                                 const ExpertServed& served)>;

class ExpertProvider {
 public:
  virtual ~ExpertProvider() = default;

  // Calls `compute` once for each of `experts` of `layer`, in whatever order they become
  // usable; the weights stay valid (pinned) until `compute` returns. Stops at the first error
  // (from the provider or from `compute`) and returns it.
  virtual absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                                     const ExpertCompute& compute) = 0;

  // True when the weights handed to `compute` are in the compute backend's device memory;
  // otherwise they are in host memory, which a GPU backend first copies to the device.
  virtual bool serves_device_memory() const { return false; }
};

}  // namespace moed::model
