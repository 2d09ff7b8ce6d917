// A loaded MoE model and its forward pass on the CPU, in exact mode: fp32 activations,
// accumulators and KV cache; weights widened inside the dot products.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/cpu_ops.h"
#include "kernels/thread_pool.h"
#include "model/expert_provider.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace moed::model {

// Keys and values of one sequence for every layer: [capacity, kv_heads, head_dim] each, fp32.
class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t capacity);
  // What a cache of `capacity` tokens holds, without making one.
  static uint64_t BytesFor(const ModelConfig& config, int64_t capacity);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  // Memory held for keys and values.
  uint64_t bytes() const;

 private:
  friend class Model;
  int64_t capacity_;
  int64_t length_ = 0;
  std::vector<std::vector<float>> keys_;    // per layer
  std::vector<std::vector<float>> values_;  // per layer
};

// The tokens one sequence contributes to a forward step.
struct SequenceInput {
  KvCache* cache = nullptr;
  std::vector<int32_t> tokens;
  // Logits for every token of this input (prefill scoring) or only for the last.
  bool all_logits = false;
};

// Which experts each token of a step chose, per layer: routing[layer][token] = expert ids in
// rank order. Tokens are numbered across the step's inputs in order.
using Routing = std::vector<std::vector<std::vector<int>>>;

// One expert a step computed, and how the provider served it.
struct ExpertUse {
  int layer = 0;
  int expert = 0;
  ExpertServed served;
};

struct ForwardOutput {
  // Row-major [rows, vocab]: for each input in order, one row per token (all_logits) or one.
  std::vector<float> logits;
  int64_t rows = 0;
  Routing routing;
  // Every (layer, expert) the step computed, once each, in the order computed.
  std::vector<ExpertUse> expert_uses;
};

struct DenseMlp {
  kernels::WeightMatrix gate, up, down;
};

struct LayerWeights {
  std::vector<float> input_norm, post_norm;
  kernels::WeightMatrix q, k, v, o;
  std::vector<float> q_bias, k_bias, v_bias;  // empty when the checkpoint has none
  std::vector<float> q_norm, k_norm;          // Qwen3 (per head) / OLMoE (whole width)
  bool moe = true;
  kernels::WeightMatrix router;  // [experts, hidden]
  bool has_shared_expert = false;
  DenseMlp shared_expert;                    // Qwen2-MoE
  kernels::WeightMatrix shared_expert_gate;  // [1, hidden]
  DenseMlp dense_mlp;                        // non-MoE layers
};

class Model {
 public:
  // Opens the checkpoint in `dir`, checks every tensor the config implies (name, dtype and
  // shape) and serves the experts from the checkpoint's mapping.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir, int threads = 0);

  // A model whose dense weights come from `dense` (kept alive by the model) and whose routed
  // experts come from `experts`.
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       std::shared_ptr<const TensorSource> dense,
                                                       std::unique_ptr<ExpertProvider> experts,
                                                       int threads = 0);

  const ModelConfig& config() const { return config_; }

  // Runs one step: every input's tokens are appended to its cache. Fails without touching
  // any cache on bad token ids or a full context.
  absl::StatusOr<ForwardOutput> Forward(absl::Span<SequenceInput> inputs);

  // Replaces where the experts come from (the expert cache, in offloaded mode).
  void SetExpertProvider(std::unique_ptr<ExpertProvider> provider) {
    experts_ = std::move(provider);
  }

 private:
  Model() = default;
  absl::Status MoeBlock(int layer, const float* x, int64_t n, float* out, Routing* routing,
                        std::vector<ExpertUse>* uses);
  void Mlp(const DenseMlp& mlp, const float* x, int64_t n, float* out);

  ModelConfig config_;
  std::shared_ptr<const TensorSource> dense_;
  std::vector<float> final_norm_;
  kernels::WeightMatrix embed_, lm_head_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<ExpertProvider> experts_;
  std::unique_ptr<kernels::ThreadPool> pool_;
};

}  // namespace moed::model
