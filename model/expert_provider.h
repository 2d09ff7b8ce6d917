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

// Which copy of an expert's weights: the full one in the checkpoint's own precision, or a
// quantized one the store also holds.
enum class Precision { kSource, kInt8, kInt4 };
// How far `precision` is from the checkpoint's own weights: 0 (source), 1 (int8), 2 (int4).
inline int PrecisionLooseness(Precision precision) { return static_cast<int>(precision); }

// Where the weights of one expert came from for one ForEachExpert call.
enum class ExpertSource { kDevice, kHost, kDisk };
// What a prefetch did for this use: none was made, it arrived before the use (useful), or the
// use found it still on its way (late).
enum class PrefetchOutcome { kNone, kUseful, kLate };
struct ExpertServed {
  ExpertSource source = ExpertSource::kDevice;
  uint64_t bytes_staged = 0;  // moved into the device tier for this use
  double wait_seconds = 0;    // the caller waited for this expert before computing it
  PrefetchOutcome prefetch = PrefetchOutcome::kNone;
  // The copy the expert ran from, and whether that was a low-precision copy standing in for
  // the full one the provider serves (a fallback).
  Precision precision = Precision::kSource;
  bool fallback = false;
  // The weights are in host memory and the expert is to run on the host (its copy to the
  // device was estimated to take longer than computing it on the CPU).
  bool on_host = false;
  // When the weights are in device memory that a copy is still filling: the compute stream
  // waits for this event before reading them (empty: nothing to wait for).
  kernels::Event ready;
};

// One token of a step, as prediction sees it: which sequence (an opaque key, stable while the
// sequence runs; position 0 starts a new one) and where in it.
struct TokenRef {
  uint64_t sequence = 0;
  int64_t position = 0;
};

// What the engine knows once a layer has routed its tokens, before its experts compute.
struct LayerRouting {
  int layer = 0;
  int num_experts = 0;
  int top_k = 0;
  // Per token of the step: the experts chosen, in rank order, and their gate weights.
  const std::vector<std::vector<int>>* chosen = nullptr;
  const float* gate_weights = nullptr;  // [tokens, top_k]
  const TokenRef* tokens = nullptr;     // [tokens]
  // [tokens]: the loosest copy each token's request lets its experts run from (kSource: only
  // the full copy, exact results); null: every token exact.
  const Precision* loosest = nullptr;
  // lookahead[j]: the router of layer `layer + 1 + j` applied to this layer's normed hidden
  // state after attention, as probabilities [tokens, num_experts]; empty where that layer is
  // dense or past the last. Only as many layers as lookahead_layers() asks for.
  std::vector<std::vector<float>> lookahead;
  size_t num_tokens() const { return chosen == nullptr ? 0 : chosen->size(); }
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

  // Told each MoE layer's routing just before that layer's ForEachExpert: a provider that
  // prefetches predicts later layers' experts from it.
  virtual void Routed(const LayerRouting& /*routing*/) {}
  // Prefetches started and prefetched experts evicted unused since the last call: the engine
  // asks once per step, to charge them to the step's requests.
  struct StepPrefetches {
    uint64_t issued = 0;
    uint64_t wasted = 0;
  };
  virtual StepPrefetches TakeStepPrefetches() { return {}; }
  // How many later layers' routers the engine should apply to each layer's hidden state and
  // hand over in LayerRouting::lookahead (0: none; computing them costs a router matmul each).
  virtual int lookahead_layers() const { return 0; }

  // True when the weights handed to `compute` are in the compute backend's device memory;
  // otherwise they are in host memory, which a GPU backend first copies to the device.
  virtual bool serves_device_memory() const { return false; }
};

}  // namespace moed::model
