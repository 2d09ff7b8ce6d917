// A loaded MoE model and its forward pass, computed through a kernels::Backend in exact mode:
// fp32 activations, accumulators and KV cache; weights widened inside the dot products.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "kernels/backend.h"
#include "model/expert_provider.h"
#include "model/model_config.h"
#include "model/safetensors.h"

namespace moed::model {

// Tokens per KV block.
inline constexpr int64_t kKvBlockSize = 16;

// The KV memory budget every cache of a model draws its blocks from, counted in blocks.
class KvBlockPool {
 public:
  KvBlockPool(int64_t total_blocks, uint64_t block_bytes)
      : total_(total_blocks), block_bytes_(block_bytes) {}
  int64_t total() const { return total_; }
  int64_t used() const { return used_.load(std::memory_order_relaxed); }
  int64_t free() const { return total_ - used(); }
  uint64_t block_bytes() const { return block_bytes_; }

 private:
  friend class KvCache;
  const int64_t total_;
  const uint64_t block_bytes_;
  std::atomic<int64_t> used_{0};
};

// Keys and values of one sequence for every layer, in fixed-size blocks of the backend's
// memory (the paged layout of kernels::PagedKv), allocated as the sequence grows, from the
// model's KV budget when it has one.
class KvCache {
 public:
  KvCache(kernels::Device& device, const ModelConfig& config, int64_t capacity,
          int64_t block_size = kKvBlockSize, std::shared_ptr<KvBlockPool> pool = nullptr);
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;
  // What a cache of `capacity` tokens holds when full, without making one.
  static uint64_t BytesFor(const ModelConfig& config, int64_t capacity,
                           int64_t block_size = kKvBlockSize);
  int64_t length() const { return length_; }
  int64_t capacity() const { return capacity_; }
  int64_t block_size() const { return block_size_; }
  // Memory held for keys and values now.
  uint64_t bytes() const { return blocks_.size() * block_bytes_; }
  int64_t blocks_held() const { return static_cast<int64_t>(blocks_.size()); }
  // Blocks the first `tokens` positions take.
  int64_t BlocksFor(int64_t tokens) const { return (tokens + block_size_ - 1) / block_size_; }

 private:
  friend class Model;
  // Blocks for the first `tokens` positions; on failure the cache holds what it held.
  absl::Status Reserve(int64_t tokens);

  kernels::Device& device_;
  int64_t capacity_;
  int64_t block_size_;
  uint64_t block_bytes_;
  int64_t length_ = 0;
  std::vector<kernels::DeviceBuffer> blocks_;
  std::shared_ptr<KvBlockPool> pool_;
};

// The tokens one sequence contributes to a forward step.
struct SequenceInput {
  KvCache* cache = nullptr;
  std::vector<int32_t> tokens;
  // Logits for every token of this input (prefill scoring) or only for the last.
  bool all_logits = false;
  // The loosest expert copy this input's experts may run from when the provider's precision
  // policy falls back (kSource: exact, whatever the policy).
  Precision loosest_precision = Precision::kSource;
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
  // Prefetches the provider started, and prefetched experts it evicted unused, during the step
  // (or since the step before it).
  ExpertProvider::StepPrefetches prefetches;
};

struct LayerWeights {
  kernels::DeviceBuffer input_norm, post_norm;  // fp32 [hidden]
  kernels::WeightMatrix q, k, v, o;             // MLA: q (or q_b after q_a), o; no k or v
  // MLA (DeepSeek): the optional low-rank query, the latent and rope-key projection (rows of
  // kv_a_proj_with_mqa), the latent's norm and kv_b_proj.
  kernels::WeightMatrix q_a;
  kernels::DeviceBuffer q_a_norm;
  kernels::WeightMatrix kv_a_latent, kv_a_rope, kv_b;
  kernels::DeviceBuffer kv_a_norm;
  kernels::DeviceBuffer q_bias, k_bias, v_bias;  // empty when the checkpoint has none
  kernels::DeviceBuffer q_norm, k_norm;          // Qwen3 (per head) / OLMoE (whole width)
  bool moe = true;
  kernels::WeightMatrix router;       // [experts, hidden]
  kernels::DeviceBuffer router_bias;  // DeepSeek-V3's e_score_correction_bias; may be empty
  bool has_shared_expert = false;
  kernels::SwiGluWeights shared_expert;      // Qwen2-MoE (gated), DeepSeek (always on)
  kernels::WeightMatrix shared_expert_gate;  // [1, hidden]; Qwen2-MoE only
  kernels::SwiGluWeights dense_mlp;          // non-MoE layers
};

// Replaces the router's choice for some tokens (trace-driven benchmarks: the experts and gate
// weights a recorded trace chose, so the cache sees real routing while the compute is real).
class RoutingOverride {
 public:
  virtual ~RoutingOverride() = default;
  // For `token` at `layer`: fills `experts` and `weights` (top_k each) and returns true, or
  // returns false to keep the router's own choice.
  virtual bool Route(const TokenRef& token, int layer, absl::Span<int32_t> experts,
                     absl::Span<float> weights) = 0;
};

class Model {
 public:
  // Opens the checkpoint in `dir`, checks every tensor the config implies (name, dtype and
  // shape) and serves the experts from the checkpoint (copied to the device when the backend
  // cannot read host memory).
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     std::shared_ptr<kernels::Backend> backend);

  // A model whose dense weights come from `dense` (kept alive by the model) and whose routed
  // experts come from `experts`.
  static absl::StatusOr<std::unique_ptr<Model>> Create(const ModelConfig& config,
                                                       std::shared_ptr<const TensorSource> dense,
                                                       std::unique_ptr<ExpertProvider> experts,
                                                       std::shared_ptr<kernels::Backend> backend);

  const ModelConfig& config() const { return config_; }
  kernels::Backend& backend() const { return *backend_; }

  // An empty KV cache for up to `capacity` tokens in this model's backend, drawing from the
  // KV budget when one is set.
  std::unique_ptr<KvCache> NewKvCache(int64_t capacity) const;
  // Caps the KV memory of every cache made from now on at `bytes` (whole blocks, at least
  // one); 0 lifts the cap.
  void SetKvBudget(uint64_t bytes);
  // The budget's pool; null without a budget.
  const KvBlockPool* kv_pool() const { return kv_pool_.get(); }
  // What one block of kKvBlockSize tokens holds.
  uint64_t kv_block_bytes() const { return KvCache::BytesFor(config_, kKvBlockSize); }

  // Runs one step: every input's tokens are appended to its cache. Fails without touching
  // any cache on bad token ids, a full context or a KV block that cannot be allocated. One
  // step at a time (the engine thread's): steps share the model's activation buffer.
  absl::StatusOr<ForwardOutput> Forward(absl::Span<SequenceInput> inputs);

  // Replaces where the experts come from (the expert cache, in offloaded mode).
  void SetExpertProvider(std::unique_ptr<ExpertProvider> provider) {
    experts_ = std::move(provider);
  }
  // Runs the experts the provider hands over to run on the host (ExpertServed::on_host) on
  // `host`, a backend whose device memory is host memory (the CPU).
  absl::Status SetHostBackend(std::shared_ptr<kernels::Backend> host);
  // Routes through `routing` from now on (null: the routers decide). Not exact: logits follow
  // the imposed routing.
  void SetRoutingOverride(std::shared_ptr<RoutingOverride> routing) {
    routing_override_ = std::move(routing);
  }

 private:
  struct StepBuffers;
  Model() = default;
  absl::Status MoeBlock(int layer, StepBuffers& step, ForwardOutput* output);
  // The post-attention norm, the layer's MoE block or dense MLP, and the residual add.
  absl::Status FfnBlock(int layer, StepBuffers& step, ForwardOutput* output);
  // Grouped-query attention of one layer (q/k/v, biases, q/k norms, RoPE, the KV write):
  // step.x in, step.attn out.
  absl::Status GqaBlock(int layer, StepBuffers& step);
  // Multi-head Latent Attention of one layer: step.x in, step.attn out.
  absl::Status MlaBlock(int layer, StepBuffers& step);
  // What the config fixes for every step: the router's spec, and for MLA the rotary frequency
  // table, the rotations and the attention's shapes and score scale.
  absl::Status PrepareOperatorSpecs();
  absl::Status Mlp(const kernels::SwiGluWeights& mlp, const float* x, int64_t n, float* out,
                   StepBuffers& step);
  // The expert's weights where the backend computes on them: as served, or copied into the
  // staging buffer when the provider serves host memory the device cannot read.
  absl::StatusOr<ExpertWeights> OnDevice(const ExpertWeights& served);
  // One expert on the host backend over its tokens' rows of host_x_ (step.x, brought back
  // with the layer's routing), its outputs into their (token, rank) slots of host_out_ and from
  // there, on the compute stream, into the same slots of step.expert_out.
  absl::Status HostExpert(const ExpertWeights& weights,
                          const std::vector<std::pair<int32_t, int32_t>>& tokens,
                          StepBuffers& step);

  ModelConfig config_;
  std::shared_ptr<kernels::Backend> backend_;
  std::shared_ptr<const TensorSource> dense_;
  // Device copies of the weights when the backend cannot read host memory; the fp32 norm
  // vectors and biases always.
  std::vector<kernels::DeviceBuffer> weight_buffers_;
  kernels::DeviceBuffer final_norm_;
  kernels::WeightMatrix embed_, lm_head_;
  std::vector<LayerWeights> layers_;
  std::unique_ptr<ExpertProvider> experts_;
  std::shared_ptr<RoutingOverride> routing_override_;
  kernels::DeviceBuffer expert_staging_;
  std::shared_ptr<kernels::Backend> host_backend_;
  // HostExpert's: the layer's normed hidden states, and pinned memory the copy to the device
  // reads without holding up the compute stream (each slot is written once per layer, and the
  // next layer's routing waits for the stream, copies included, before it is reused).
  std::vector<float> host_x_, host_scratch_;
  std::vector<int32_t> host_rows_, host_out_rows_;
  kernels::DeviceBuffer host_out_;
  // MLA: inv_freq of the rope slice (doubles, YaRN-adjusted) and its shapes.
  kernels::DeviceBuffer rope_inv_freq_;
  kernels::RotarySpec q_rotary_, k_rotary_;
  kernels::MlaShape mla_shape_;
  kernels::RouterSpec router_spec_;
  kernels::DeviceBuffer step_arena_;
  std::shared_ptr<KvBlockPool> kv_pool_;
};

}  // namespace moed::model
