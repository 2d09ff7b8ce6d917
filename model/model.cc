#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/quant.h"
#include "util/status_macros.h"

namespace moed::model {
namespace {

using kernels::DeviceBuffer;
using kernels::WeightMatrix;

std::string ShapeText(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Looks tensors up by name and checks them against the shapes the config implies.
class WeightBinder {
 public:
  explicit WeightBinder(const TensorSource& checkpoint) : checkpoint_(checkpoint) {}

  absl::StatusOr<TensorRef> Tensor(const std::string& name, const std::vector<int64_t>& shape) {
    MOED_ASSIGN_OR_RETURN(TensorRef ref, checkpoint_.Find(name));
    if (ref.info->shape != shape) {
      return absl::InvalidArgumentError(
          absl::StrCat(*ref.file, ": tensor ", name, " has shape ", ShapeText(ref.info->shape),
                       ", but config.json implies ", ShapeText(shape)));
    }
    return ref;
  }

  absl::StatusOr<WeightMatrix> Matrix(const std::string& name, int64_t rows, int64_t cols) {
    MOED_ASSIGN_OR_RETURN(TensorRef ref, Tensor(name, {rows, cols}));
    return WeightMatrix{ref.info->dtype, ref.data, rows, cols};
  }

  absl::StatusOr<std::vector<float>> Vector(const std::string& name, int64_t size) {
    MOED_ASSIGN_OR_RETURN(TensorRef ref, Tensor(name, {size}));
    std::vector<float> out(static_cast<size_t>(size));
    kernels::WidenToF32(ref.info->dtype, ref.data, size, out.data());
    return out;
  }

  absl::StatusOr<kernels::SwiGluWeights> Mlp(const std::string& prefix, absl::string_view gate,
                                             absl::string_view up, absl::string_view down,
                                             int64_t hidden, int64_t inter) {
    kernels::SwiGluWeights mlp;
    MOED_ASSIGN_OR_RETURN(mlp.gate, Matrix(absl::StrCat(prefix, gate, ".weight"), inter, hidden));
    MOED_ASSIGN_OR_RETURN(mlp.up, Matrix(absl::StrCat(prefix, up, ".weight"), inter, hidden));
    MOED_ASSIGN_OR_RETURN(mlp.down, Matrix(absl::StrCat(prefix, down, ".weight"), hidden, inter));
    return mlp;
  }

 private:
  const TensorSource& checkpoint_;
};

// Copies host bytes into a new device buffer and waits for the copy.
absl::StatusOr<DeviceBuffer> UploadBytes(kernels::Backend& backend, const void* data,
                                         size_t bytes) {
  MOED_ASSIGN_OR_RETURN(DeviceBuffer buffer, backend.device().Allocate(bytes));
  MOED_RETURN_IF_ERROR(backend.compute().CopyToDevice(buffer, 0, data, bytes));
  MOED_RETURN_IF_ERROR(backend.compute().Synchronize());
  return buffer;
}

// Puts a host matrix where the backend computes on it: the same memory when the device
// reads host memory, a device copy (kept in `owned`) otherwise.
absl::StatusOr<WeightMatrix> PlaceMatrix(kernels::Backend& backend, const WeightMatrix& host,
                                         std::vector<DeviceBuffer>* owned) {
  if (backend.device().host_memory_is_device_memory() || host.data == nullptr) return host;
  WeightMatrix placed = host;
  MOED_ASSIGN_OR_RETURN(DeviceBuffer data,
                        UploadBytes(backend, host.data, static_cast<size_t>(host.DataBytes())));
  placed.data = data.data();
  owned->push_back(std::move(data));
  if (host.scales != nullptr) {
    MOED_ASSIGN_OR_RETURN(DeviceBuffer scales, UploadBytes(backend, host.scales,
                                                           static_cast<size_t>(host.ScaleBytes())));
    placed.scales = scales.as<const float>();
    owned->push_back(std::move(scales));
  }
  return placed;
}

absl::StatusOr<kernels::SwiGluWeights> PlaceSwiGlu(kernels::Backend& backend,
                                                   const kernels::SwiGluWeights& host,
                                                   std::vector<DeviceBuffer>* owned) {
  kernels::SwiGluWeights placed;
  MOED_ASSIGN_OR_RETURN(placed.gate, PlaceMatrix(backend, host.gate, owned));
  MOED_ASSIGN_OR_RETURN(placed.up, PlaceMatrix(backend, host.up, owned));
  MOED_ASSIGN_OR_RETURN(placed.down, PlaceMatrix(backend, host.down, owned));
  return placed;
}

absl::StatusOr<DeviceBuffer> UploadFloats(kernels::Backend& backend,
                                          const std::vector<float>& values) {
  return UploadBytes(backend, values.data(), values.size() * sizeof(float));
}

// Rows [begin, begin + count) of a host matrix, in place.
WeightMatrix RowSlice(const WeightMatrix& m, int64_t begin, int64_t count) {
  WeightMatrix slice = m;
  slice.rows = count;
  const char* data = static_cast<const char*>(m.data);
  switch (m.quantization) {
    case kernels::Quantization::kNone:
      slice.data = data + begin * m.cols * static_cast<int64_t>(kernels::DTypeSize(m.dtype));
      break;
    case kernels::Quantization::kInt8PerRow:
      slice.data = data + begin * m.cols;
      slice.scales = m.scales + begin;
      break;
    case kernels::Quantization::kInt4Grouped:
      slice.data = data + begin * (m.cols / 2);
      slice.scales = m.scales + begin * (m.cols / m.group_size);
      break;
  }
  return slice;
}

// transformers builds DeepSeek's q_a_layernorm and kv_a_layernorm with RMSNorm's default eps,
// not the config's rms_norm_eps.
constexpr float kLowRankNormEps = 1e-6f;

// YaRN's magnitude correction (DeepSeek's yarn_get_mscale).
double YarnMscale(double factor, double mscale) {
  return factor <= 1 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

// inv_freq of a rotary slice of `dims` floats: theta^(-2i/dims), blended towards
// inv_freq / factor over YaRN's ramp when the config extends the context.
std::vector<double> RotaryInvFreq(const ModelConfig& c, int64_t dims) {
  const int64_t half = dims / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / dims);
  }
  if (!c.yarn.has_value()) return inv_freq;
  const YarnScaling& y = *c.yarn;
  const double d = static_cast<double>(dims);
  const auto correction_dim = [&](double rotations) {
    return d *
           std::log(static_cast<double>(y.original_max_position_embeddings) /
                    (rotations * 2 * M_PI)) /
           (2 * std::log(c.rope_theta));
  };
  double low = std::max(0.0, std::floor(correction_dim(y.beta_fast)));
  double high = std::min(d - 1, std::ceil(correction_dim(y.beta_slow)));
  if (low == high) high += 0.001;
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolated = 1.0 - ramp;  // the share of the unscaled frequency
    inv_freq[i] = inv_freq[i] / y.factor * (1.0 - extrapolated) + inv_freq[i] * extrapolated;
  }
  return inv_freq;
}

// Serves every expert from the checkpoint: its memory mapping, or device copies of it.
class CheckpointExpertProvider final : public ExpertProvider {
 public:
  CheckpointExpertProvider(std::vector<std::vector<ExpertWeights>> experts,
                           std::vector<DeviceBuffer> device_copies)
      : experts_(std::move(experts)), device_copies_(std::move(device_copies)) {}

  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const ExpertCompute& compute) override {
    for (int expert : experts)
      MOED_RETURN_IF_ERROR(compute(expert, experts_[layer][expert], ExpertServed{}));
    return absl::OkStatus();
  }
  bool serves_device_memory() const override { return true; }

 private:
  std::vector<std::vector<ExpertWeights>> experts_;  // [layer][expert]; empty for dense layers
  std::vector<DeviceBuffer> device_copies_;
};

// Offsets of one step's activations inside a single device allocation.
class ArenaLayout {
 public:
  size_t Add(size_t bytes) {
    size_t at = total_;
    total_ += (bytes + kAlign - 1) / kAlign * kAlign;
    return at;
  }
  size_t total() const { return total_; }

 private:
  static constexpr size_t kAlign = 256;
  size_t total_ = 0;
};

}  // namespace

KvCache::KvCache(kernels::Device& device, const ModelConfig& config, int64_t capacity,
                 int64_t block_size, std::shared_ptr<KvBlockPool> pool)
    : device_(device),
      capacity_(capacity),
      block_size_(block_size),
      block_bytes_(BytesFor(config, block_size, block_size)),
      pool_(std::move(pool)) {}

KvCache::~KvCache() {
  if (pool_ != nullptr) pool_->used_.fetch_sub(blocks_held(), std::memory_order_relaxed);
}

uint64_t KvCache::BytesFor(const ModelConfig& config, int64_t capacity, int64_t block_size) {
  // Whole blocks; each holds every layer's keys and values (MLA: latents and rope keys) of
  // block_size tokens.
  const uint64_t blocks = static_cast<uint64_t>((capacity + block_size - 1) / block_size);
  return blocks * static_cast<uint64_t>(config.num_layers) * static_cast<uint64_t>(block_size) *
         static_cast<uint64_t>(config.KvFloatsPerTokenLayer()) * sizeof(float);
}

absl::Status KvCache::Reserve(int64_t tokens) {
  const size_t needed = static_cast<size_t>(BlocksFor(tokens));
  if (needed <= blocks_.size()) return absl::OkStatus();
  const int64_t more = static_cast<int64_t>(needed - blocks_.size());
  if (pool_ != nullptr) {
    // Claimed before allocating, so two caches can never both take the last blocks.
    if (pool_->used_.fetch_add(more, std::memory_order_relaxed) + more > pool_->total()) {
      pool_->used_.fetch_sub(more, std::memory_order_relaxed);
      return absl::ResourceExhaustedError(
          absl::StrCat("the KV cache budget (", pool_->total(), " blocks of ", block_bytes_,
                       " bytes) has no room for ", more, " more block", more == 1 ? "" : "s"));
    }
  }
  std::vector<DeviceBuffer> added;
  while (blocks_.size() + added.size() < needed) {
    absl::StatusOr<DeviceBuffer> block = device_.Allocate(block_bytes_);
    if (!block.ok()) {
      if (pool_ != nullptr) pool_->used_.fetch_sub(more, std::memory_order_relaxed);
      return absl::ResourceExhaustedError(absl::StrCat("cannot allocate a KV cache block of ",
                                                       block_bytes_,
                                                       " bytes: ", block.status().message()));
    }
    added.push_back(*std::move(block));
  }
  for (DeviceBuffer& block : added) blocks_.push_back(std::move(block));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   std::shared_ptr<kernels::Backend> backend) {
  MOED_ASSIGN_OR_RETURN(ModelConfig c, LoadModelConfig(dir));
  MOED_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> opened, Checkpoint::Open(dir));
  std::shared_ptr<const Checkpoint> checkpoint = std::move(opened);
  WeightBinder bind(*checkpoint);
  std::vector<std::vector<ExpertWeights>> experts(static_cast<size_t>(c.num_layers));
  std::vector<DeviceBuffer> device_copies;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    if (!c.IsMoeLayer(layer)) continue;
    for (int e = 0; e < c.num_experts; ++e) {
      ExpertTensorNames names = RoutedExpertTensorNames(c.architecture, layer, e);
      ExpertWeights weights;
      const int64_t h = c.hidden_size, inter = c.expert_intermediate_size;
      MOED_ASSIGN_OR_RETURN(weights.gate, bind.Matrix(names.gate, inter, h));
      MOED_ASSIGN_OR_RETURN(weights.up, bind.Matrix(names.up, inter, h));
      MOED_ASSIGN_OR_RETURN(weights.down, bind.Matrix(names.down, h, inter));
      MOED_ASSIGN_OR_RETURN(weights, PlaceSwiGlu(*backend, weights, &device_copies));
      experts[layer].push_back(weights);
    }
  }
  return Create(
      c, checkpoint,
      std::make_unique<CheckpointExpertProvider>(std::move(experts), std::move(device_copies)),
      std::move(backend));
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     std::shared_ptr<const TensorSource> dense,
                                                     std::unique_ptr<ExpertProvider> experts,
                                                     std::shared_ptr<kernels::Backend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("a model needs a compute backend");
  std::unique_ptr<Model> model(new Model());
  model->config_ = config;
  model->backend_ = std::move(backend);
  model->dense_ = std::move(dense);
  kernels::Backend& b = *model->backend_;
  std::vector<DeviceBuffer>* owned = &model->weight_buffers_;
  const ModelConfig& c = model->config_;
  WeightBinder bind(*model->dense_);
  const int64_t h = c.hidden_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;
  auto matrix = [&](const std::string& name, int64_t rows,
                    int64_t cols) -> absl::StatusOr<WeightMatrix> {
    MOED_ASSIGN_OR_RETURN(WeightMatrix host, bind.Matrix(name, rows, cols));
    return PlaceMatrix(b, host, owned);
  };
  auto vector = [&](const std::string& name, int64_t size) -> absl::StatusOr<DeviceBuffer> {
    MOED_ASSIGN_OR_RETURN(std::vector<float> values, bind.Vector(name, size));
    return UploadFloats(b, values);
  };
  auto mlp = [&](const std::string& prefix,
                 int64_t inter) -> absl::StatusOr<kernels::SwiGluWeights> {
    MOED_ASSIGN_OR_RETURN(kernels::SwiGluWeights host,
                          bind.Mlp(prefix, "gate_proj", "up_proj", "down_proj", h, inter));
    return PlaceSwiGlu(b, host, owned);
  };

  MOED_ASSIGN_OR_RETURN(model->embed_, matrix("model.embed_tokens.weight", c.vocab_size, h));
  MOED_ASSIGN_OR_RETURN(model->final_norm_, vector("model.norm.weight", h));
  if (model->dense_->Contains("lm_head.weight") || !c.tie_word_embeddings) {
    MOED_ASSIGN_OR_RETURN(model->lm_head_, matrix("lm_head.weight", c.vocab_size, h));
  } else {
    model->lm_head_ = model->embed_;
  }

  for (int layer = 0; layer < c.num_layers; ++layer) {
    LayerWeights w;
    std::string p = absl::StrCat("model.layers.", layer, ".");
    MOED_ASSIGN_OR_RETURN(w.input_norm, vector(p + "input_layernorm.weight", h));
    MOED_ASSIGN_OR_RETURN(w.post_norm, vector(p + "post_attention_layernorm.weight", h));
    if (c.uses_mla()) {
      const MlaConfig& m = c.mla;
      const int64_t heads = c.num_attention_heads, rank = m.kv_lora_rank;
      if (m.q_lora_rank > 0) {
        MOED_ASSIGN_OR_RETURN(w.q_a, matrix(p + "self_attn.q_a_proj.weight", m.q_lora_rank, h));
        MOED_ASSIGN_OR_RETURN(w.q_a_norm,
                              vector(p + "self_attn.q_a_layernorm.weight", m.q_lora_rank));
        MOED_ASSIGN_OR_RETURN(
            w.q, matrix(p + "self_attn.q_b_proj.weight", heads * m.q_head_dim(), m.q_lora_rank));
      } else {
        MOED_ASSIGN_OR_RETURN(w.q,
                              matrix(p + "self_attn.q_proj.weight", heads * m.q_head_dim(), h));
      }
      // Rows 0..rank-1 make the latent, the rest the shared rope key: two matrices.
      MOED_ASSIGN_OR_RETURN(
          WeightMatrix kv_a,
          bind.Matrix(p + "self_attn.kv_a_proj_with_mqa.weight", rank + m.rope_dim, h));
      MOED_ASSIGN_OR_RETURN(w.kv_a_latent, PlaceMatrix(b, RowSlice(kv_a, 0, rank), owned));
      MOED_ASSIGN_OR_RETURN(w.kv_a_rope, PlaceMatrix(b, RowSlice(kv_a, rank, m.rope_dim), owned));
      MOED_ASSIGN_OR_RETURN(w.kv_a_norm, vector(p + "self_attn.kv_a_layernorm.weight", rank));
      MOED_ASSIGN_OR_RETURN(w.kv_b, matrix(p + "self_attn.kv_b_proj.weight",
                                           heads * (m.nope_dim + m.value_dim), rank));
      MOED_ASSIGN_OR_RETURN(w.o, matrix(p + "self_attn.o_proj.weight", h, heads * m.value_dim));
    } else {
      MOED_ASSIGN_OR_RETURN(w.q, matrix(p + "self_attn.q_proj.weight", q_width, h));
      MOED_ASSIGN_OR_RETURN(w.k, matrix(p + "self_attn.k_proj.weight", kv_width, h));
      MOED_ASSIGN_OR_RETURN(w.v, matrix(p + "self_attn.v_proj.weight", kv_width, h));
      MOED_ASSIGN_OR_RETURN(w.o, matrix(p + "self_attn.o_proj.weight", h, q_width));
    }
    // Qwen2-MoE has q/k/v biases; they are detected from the tensors, as the config may not say.
    if (model->dense_->Contains(p + "self_attn.q_proj.bias")) {
      MOED_ASSIGN_OR_RETURN(w.q_bias, vector(p + "self_attn.q_proj.bias", q_width));
      MOED_ASSIGN_OR_RETURN(w.k_bias, vector(p + "self_attn.k_proj.bias", kv_width));
      MOED_ASSIGN_OR_RETURN(w.v_bias, vector(p + "self_attn.v_proj.bias", kv_width));
    }
    if (c.architecture == Architecture::kQwen3Moe) {
      MOED_ASSIGN_OR_RETURN(w.q_norm, vector(p + "self_attn.q_norm.weight", c.head_dim));
      MOED_ASSIGN_OR_RETURN(w.k_norm, vector(p + "self_attn.k_norm.weight", c.head_dim));
    } else if (c.architecture == Architecture::kOlmoe) {
      MOED_ASSIGN_OR_RETURN(w.q_norm, vector(p + "self_attn.q_norm.weight", q_width));
      MOED_ASSIGN_OR_RETURN(w.k_norm, vector(p + "self_attn.k_norm.weight", kv_width));
    }
    w.moe = c.IsMoeLayer(layer);
    if (!w.moe) {
      MOED_ASSIGN_OR_RETURN(w.dense_mlp, mlp(p + "mlp.", c.dense_intermediate_size));
    } else {
      std::string moe = MoeBlockPrefix(c.architecture, layer);
      MOED_ASSIGN_OR_RETURN(w.router, matrix(moe + "gate.weight", c.num_experts, h));
      if (c.topk_method == TopKMethod::kNoAuxTc) {
        MOED_ASSIGN_OR_RETURN(w.router_bias,
                              vector(moe + "gate.e_score_correction_bias", c.num_experts));
      }
      if (c.shared_expert_intermediate_size > 0) {
        w.has_shared_expert = true;
        if (c.shared_expert_gated) {
          MOED_ASSIGN_OR_RETURN(w.shared_expert,
                                mlp(moe + "shared_expert.", c.shared_expert_intermediate_size));
          MOED_ASSIGN_OR_RETURN(w.shared_expert_gate,
                                matrix(moe + "shared_expert_gate.weight", 1, h));
        } else {
          MOED_ASSIGN_OR_RETURN(w.shared_expert,
                                mlp(moe + "shared_experts.", c.shared_expert_intermediate_size));
        }
      }
    }
    model->layers_.push_back(std::move(w));
  }
  // Refuse at load, not mid-request, a backend that lacks an operator these weights need.
  std::vector<std::pair<kernels::Op, const WeightMatrix*>> needs = {
      {kernels::Op::kEmbedding, &model->embed_}, {kernels::Op::kMatMul, &model->lm_head_}};
  for (const LayerWeights& w : model->layers_) {
    for (const WeightMatrix* m : {&w.q, &w.k, &w.v, &w.o, &w.q_a, &w.kv_a_latent, &w.kv_a_rope}) {
      if (m->data != nullptr) needs.push_back({kernels::Op::kMatMul, m});
    }
    if (w.kv_b.data != nullptr) needs.push_back({kernels::Op::kMlaAttention, &w.kv_b});
  }
  for (const auto& [op, m] : needs) {
    if (!b.device().Supports(op, m->format())) {
      return absl::UnimplementedError(
          absl::StrCat("the ", b.name(), " backend has no ", kernels::OpName(op), " for ",
                       kernels::WeightFormatName(m->format()), " weights"));
    }
  }
  model->experts_ = std::move(experts);
  MOED_RETURN_IF_ERROR(model->PrepareOperatorSpecs());
  return model;
}

absl::Status Model::PrepareOperatorSpecs() {
  const ModelConfig& c = config_;
  router_spec_ = kernels::RouterSpec();
  router_spec_.scoring = c.scoring == RouterScoringFunction::kSigmoid
                             ? kernels::RouterScoring::kSigmoid
                             : kernels::RouterScoring::kSoftmax;
  router_spec_.renormalize = c.RenormalizesTopK();
  router_spec_.scale = static_cast<float>(c.RoutedWeightScale());
  router_spec_.groups = c.n_group;
  router_spec_.top_groups = c.topk_group;
  router_spec_.group_score = c.topk_method == TopKMethod::kNoAuxTc ? kernels::GroupScore::kTopTwoSum
                                                                   : kernels::GroupScore::kMax;
  if (!c.uses_mla()) return absl::OkStatus();
  const MlaConfig& m = c.mla;
  std::vector<double> inv_freq = RotaryInvFreq(c, m.rope_dim);
  MOED_ASSIGN_OR_RETURN(rope_inv_freq_,
                        UploadBytes(*backend_, inv_freq.data(), inv_freq.size() * sizeof(double)));
  double magnitude = 1.0, scale = 1.0 / std::sqrt(static_cast<double>(m.q_head_dim()));
  if (c.yarn.has_value()) {
    magnitude = YarnMscale(c.yarn->factor, c.yarn->mscale) /
                YarnMscale(c.yarn->factor, c.yarn->mscale_all_dim);
    if (c.yarn->mscale_all_dim > 0) {
      const double all = YarnMscale(c.yarn->factor, c.yarn->mscale_all_dim);
      scale *= all * all;
    }
  }
  q_rotary_ = {c.num_attention_heads,
               m.q_head_dim(),
               m.nope_dim,
               m.rope_dim,
               kernels::RotaryStyle::kPairs,
               rope_inv_freq_.as<const double>(),
               magnitude};
  k_rotary_ = {1,
               m.rope_dim,
               0,
               m.rope_dim,
               kernels::RotaryStyle::kPairs,
               rope_inv_freq_.as<const double>(),
               magnitude};
  mla_shape_ = {c.num_attention_heads, m.nope_dim,     m.rope_dim,
                m.value_dim,           m.kv_lora_rank, static_cast<float>(scale)};
  return absl::OkStatus();
}

std::unique_ptr<KvCache> Model::NewKvCache(int64_t capacity) const {
  return std::make_unique<KvCache>(backend_->device(), config_, capacity, kKvBlockSize, kv_pool_);
}

void Model::SetKvBudget(uint64_t bytes) {
  if (bytes == 0) {
    kv_pool_ = nullptr;
    return;
  }
  const uint64_t block = kv_block_bytes();
  kv_pool_ = std::make_shared<KvBlockPool>(
      static_cast<int64_t>(std::max<uint64_t>(1, bytes / block)), block);
}

// One step's activations and index arrays, all in one device allocation.
struct Model::StepBuffers {
  int64_t n = 0;
  const DeviceBuffer* arena = nullptr;
  float* hidden = nullptr;       // [n, h] residual stream
  float* x = nullptr;            // [n, h] normed
  float* q = nullptr;            // [n, q_width]
  float* k = nullptr;            // [n, kv_width]
  float* v = nullptr;            // [n, kv_width]
  float* attn = nullptr;         // [n, q_width] (MLA: [n, heads * value_dim])
  float* q_low = nullptr;        // MLA: [n, q_lora_rank]
  float* mla_scratch = nullptr;  // MLA: MlaScratchFloats
  const int64_t* positions = nullptr;
  float* projected = nullptr;         // [n, h]
  float* router_logits = nullptr;     // [n, experts]
  float* lookahead_logits = nullptr;  // [n, experts]: a later layer's router, for prefetch
  std::vector<TokenRef> tokens;       // host: each token's sequence and position
  std::vector<Precision> loosest;     // host: the loosest expert copy each token accepts
  bool any_loose = false;             // some token accepts a low-precision copy
  int32_t* chosen = nullptr;          // [n, k]
  float* gate_weights = nullptr;      // [n, k]
  float* expert_out = nullptr;        // [n * k, h]
  float* ffn_scratch = nullptr;       // ExpertFfnScratchFloats(n, h, intermediate)
  float* mlp_gate = nullptr;          // [n, max intermediate]
  float* mlp_up = nullptr;            // [n, max intermediate]
  float* shared = nullptr;            // [n, h]
  float* shared_gate = nullptr;       // [n]
  size_t expert_rows_offset = 0;      // int32 [n * k]: tokens, grouped by expert
  int32_t* expert_rows = nullptr;
  size_t expert_slots_offset = 0;  // int32 [n * k]: (token, rank) slots, grouped by expert
  int32_t* expert_slots = nullptr;
  kernels::PagedKv kv;
};

absl::Status Model::Mlp(const kernels::SwiGluWeights& mlp, const float* x, int64_t n, float* out,
                        StepBuffers& step) {
  kernels::Stream& s = backend_->compute();
  const int64_t inter = mlp.gate.rows;
  MOED_RETURN_IF_ERROR(s.MatMul(mlp.gate, x, n, step.mlp_gate));
  MOED_RETURN_IF_ERROR(s.MatMul(mlp.up, x, n, step.mlp_up));
  MOED_RETURN_IF_ERROR(s.SiluMul(step.mlp_gate, step.mlp_up, n * inter, step.mlp_gate));
  return s.MatMul(mlp.down, step.mlp_gate, n, out);
}

absl::StatusOr<ExpertWeights> Model::OnDevice(const ExpertWeights& served) {
  if (experts_->serves_device_memory() || backend_->device().host_memory_is_device_memory()) {
    return served;
  }
  // One staging buffer, reused expert after expert: the copies and the FFN that reads them are
  // ordered on the compute stream, and a copy from host memory returns once its source is read.
  const WeightMatrix* parts[] = {&served.gate, &served.up, &served.down};
  size_t bytes = 0;
  for (const WeightMatrix* m : parts) {
    bytes += static_cast<size_t>(m->DataBytes() + m->ScaleBytes()) + 256;
  }
  if (expert_staging_.size() < bytes) {
    expert_staging_ = DeviceBuffer();
    MOED_ASSIGN_OR_RETURN(expert_staging_, backend_->device().Allocate(bytes));
  }
  kernels::Stream& s = backend_->compute();
  ExpertWeights staged = served;
  WeightMatrix* staged_parts[] = {&staged.gate, &staged.up, &staged.down};
  size_t at = 0;
  auto put = [&](const void* src, size_t n) -> absl::StatusOr<void*> {
    MOED_RETURN_IF_ERROR(s.CopyToDevice(expert_staging_, at, src, n));
    void* placed = static_cast<char*>(expert_staging_.data()) + at;
    at += (n + 255) / 256 * 256;
    return placed;
  };
  for (int i = 0; i < 3; ++i) {
    MOED_ASSIGN_OR_RETURN(void* data,
                          put(parts[i]->data, static_cast<size_t>(parts[i]->DataBytes())));
    staged_parts[i]->data = data;
    if (parts[i]->scales != nullptr) {
      MOED_ASSIGN_OR_RETURN(void* scales,
                            put(parts[i]->scales, static_cast<size_t>(parts[i]->ScaleBytes())));
      staged_parts[i]->scales = static_cast<const float*>(scales);
    }
  }
  return staged;
}

absl::Status Model::SetHostBackend(std::shared_ptr<kernels::Backend> host) {
  if (host != nullptr && !host->device().host_memory_is_device_memory()) {
    return absl::InvalidArgumentError("the host backend must compute on host memory");
  }
  host_backend_ = std::move(host);
  return absl::OkStatus();
}

absl::Status Model::HostExpert(const ExpertWeights& weights,
                               const std::vector<std::pair<int32_t, int32_t>>& tokens,
                               StepBuffers& step) {
  if (host_backend_ == nullptr) {
    return absl::FailedPreconditionError(
        "the expert provider handed over an expert to run on the host, and the model has no host "
        "backend");
  }
  const int64_t h = config_.hidden_size;
  const auto m = static_cast<int64_t>(tokens.size());
  host_rows_.clear();
  host_out_rows_.clear();
  for (const auto& [token, slot] : tokens) {
    host_rows_.push_back(token);
    host_out_rows_.push_back(slot);
  }
  host_scratch_.resize(
      static_cast<size_t>(kernels::ExpertFfnScratchFloats(m, h, weights.gate.rows)));
  float* out = host_out_.as<float>();
  kernels::Stream& cpu = host_backend_->compute();
  MOED_RETURN_IF_ERROR(cpu.ExpertFfn(weights, host_x_.data(), host_rows_.data(), m, out,
                                     host_out_rows_.data(), host_scratch_.data()));
  MOED_RETURN_IF_ERROR(cpu.Synchronize());
  kernels::Stream& s = backend_->compute();
  const auto expert_out_at = static_cast<size_t>(reinterpret_cast<const char*>(step.expert_out) -
                                                 static_cast<const char*>(step.arena->data()));
  for (int32_t slot : host_out_rows_) {
    MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, expert_out_at + slot * h * sizeof(float),
                                        out + slot * h, static_cast<size_t>(h) * sizeof(float)));
  }
  return absl::OkStatus();
}

absl::Status Model::MoeBlock(int layer, StepBuffers& step, ForwardOutput* output) {
  const ModelConfig& c = config_;
  const LayerWeights& w = layers_[layer];
  kernels::Stream& s = backend_->compute();
  const int64_t n = step.n, h = c.hidden_size, k = c.experts_per_token, num_experts = c.num_experts;

  MOED_RETURN_IF_ERROR(s.MatMul(w.router, step.x, n, step.router_logits));
  kernels::RouterSpec router = router_spec_;
  router.choice_bias = w.router_bias ? w.router_bias.as<const float>() : nullptr;
  MOED_RETURN_IF_ERROR(
      s.RouterTopK(step.router_logits, n, num_experts, k, router, step.chosen, step.gate_weights));
  // The routing comes back to the host: it decides which experts to fetch.
  const auto arena_offset = [&](const void* p) {
    return static_cast<size_t>(static_cast<const char*>(p) -
                               static_cast<const char*>(step.arena->data()));
  };
  std::vector<int32_t> chosen(static_cast<size_t>(n * k));
  std::vector<float> gate_weights(static_cast<size_t>(n * k));
  MOED_RETURN_IF_ERROR(s.CopyToHost(chosen.data(), *step.arena, arena_offset(step.chosen),
                                    chosen.size() * sizeof(int32_t)));
  MOED_RETURN_IF_ERROR(s.CopyToHost(gate_weights.data(), *step.arena,
                                    arena_offset(step.gate_weights),
                                    gate_weights.size() * sizeof(float)));
  if (host_backend_ != nullptr) {
    // Experts may run on the host: their input comes back now, while the stream is idle
    // anyway, not later behind experts waiting for their copies.
    host_x_.resize(static_cast<size_t>(n * h));
    MOED_RETURN_IF_ERROR(
        s.CopyToHost(host_x_.data(), *step.arena, arena_offset(step.x), host_x_.size() * 4));
    const size_t out_bytes = static_cast<size_t>(n * k * h) * sizeof(float);
    if (host_out_.size() < out_bytes) {
      host_out_ = kernels::DeviceBuffer();
      MOED_ASSIGN_OR_RETURN(host_out_, backend_->device().AllocateHost(out_bytes));
    }
  }
  if (routing_override_ != nullptr) {
    bool changed = false;
    for (int64_t t = 0; t < n; ++t) {
      changed |= routing_override_->Route(
          step.tokens[static_cast<size_t>(t)], layer,
          absl::MakeSpan(chosen).subspan(static_cast<size_t>(t * k), static_cast<size_t>(k)),
          absl::MakeSpan(gate_weights).subspan(static_cast<size_t>(t * k), static_cast<size_t>(k)));
    }
    if (changed) {
      MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, arena_offset(step.chosen), chosen.data(),
                                          chosen.size() * sizeof(int32_t)));
      MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, arena_offset(step.gate_weights),
                                          gate_weights.data(),
                                          gate_weights.size() * sizeof(float)));
    }
  }
  std::vector<std::vector<std::pair<int32_t, int32_t>>> tokens_of(static_cast<size_t>(num_experts));
  const size_t first_token = output->routing[layer].size();
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int> ranked(static_cast<size_t>(k));
    for (int64_t r = 0; r < k; ++r) {
      const int32_t e = chosen[t * k + r];
      if (e < 0 || e >= num_experts) {
        return absl::InternalError(
            absl::StrCat("the router chose expert ", e, " of ", num_experts, " at layer ", layer));
      }
      ranked[r] = e;
      tokens_of[e].push_back({static_cast<int32_t>(t), static_cast<int32_t>(t * k + r)});
    }
    output->routing[layer].push_back(std::move(ranked));
  }

  // Tell the provider, with the later routers' view of this hidden state when it asks for it.
  LayerRouting routing;
  routing.layer = layer;
  routing.num_experts = static_cast<int>(num_experts);
  routing.top_k = static_cast<int>(k);
  const std::vector<std::vector<int>> step_chosen(
      output->routing[layer].begin() + static_cast<int64_t>(first_token),
      output->routing[layer].end());
  routing.chosen = &step_chosen;
  routing.gate_weights = gate_weights.data();
  routing.tokens = step.tokens.data();
  routing.loosest = step.any_loose ? step.loosest.data() : nullptr;
  const int lookahead = experts_->lookahead_layers();
  for (int j = 1; j <= lookahead && layer + j < c.num_layers; ++j) {
    std::vector<float>& probabilities = routing.lookahead.emplace_back();
    const LayerWeights& later = layers_[static_cast<size_t>(layer) + static_cast<size_t>(j)];
    if (!later.moe) continue;
    MOED_RETURN_IF_ERROR(s.MatMul(later.router, step.x, n, step.lookahead_logits));
    probabilities.resize(static_cast<size_t>(n * num_experts));
    MOED_RETURN_IF_ERROR(s.CopyToHost(probabilities.data(), *step.arena,
                                      arena_offset(step.lookahead_logits),
                                      probabilities.size() * sizeof(float)));
    for (int64_t t = 0; t < n; ++t) {  // softmax per token, on the host: it only ranks
      float* row = probabilities.data() + t * num_experts;
      const float top = *std::max_element(row, row + num_experts);
      double sum = 0;
      for (int64_t e = 0; e < num_experts; ++e) sum += row[e] = std::exp(row[e] - top);
      for (int64_t e = 0; e < num_experts; ++e) row[e] = static_cast<float>(row[e] / sum);
    }
  }
  experts_->Routed(routing);

  // Each expert runs once over all its tokens; outputs land in per-(token, rank) slots so the
  // final sum is in rank order whatever order the experts ran in.
  std::vector<int> needed;
  std::vector<int32_t> rows, slots;
  std::vector<size_t> first(static_cast<size_t>(num_experts));
  for (int e = 0; e < num_experts; ++e) {
    first[e] = rows.size();
    if (tokens_of[e].empty()) continue;
    needed.push_back(e);
    for (auto [t, slot] : tokens_of[e]) {
      rows.push_back(t);
      slots.push_back(slot);
    }
  }
  MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, step.expert_rows_offset, rows.data(),
                                      rows.size() * sizeof(int32_t)));
  MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, step.expert_slots_offset, slots.data(),
                                      slots.size() * sizeof(int32_t)));
  MOED_RETURN_IF_ERROR(experts_->ForEachExpert(
      layer, needed,
      [&](int e, const ExpertWeights& served_weights, const ExpertServed& served) -> absl::Status {
        output->expert_uses.push_back({layer, e, served});
        if (served.on_host) return HostExpert(served_weights, tokens_of[e], step);
        MOED_ASSIGN_OR_RETURN(ExpertWeights ew, OnDevice(served_weights));
        MOED_RETURN_IF_ERROR(s.Wait(served.ready));  // a copy may still be filling them
        const int64_t m = static_cast<int64_t>(tokens_of[e].size());
        return s.ExpertFfn(ew, step.x, step.expert_rows + first[e], m, step.expert_out,
                           step.expert_slots + first[e], step.ffn_scratch);
      }));
  MOED_RETURN_IF_ERROR(s.MoeCombine(step.expert_out, step.gate_weights, n, k, h, step.projected));
  if (w.has_shared_expert) {
    MOED_RETURN_IF_ERROR(Mlp(w.shared_expert, step.x, n, step.shared, step));
    if (w.shared_expert_gate.data != nullptr) {
      MOED_RETURN_IF_ERROR(s.MatMul(w.shared_expert_gate, step.x, n, step.shared_gate));
      MOED_RETURN_IF_ERROR(s.SigmoidGatedAdd(step.shared_gate, step.shared, n, h, step.projected));
    } else {
      MOED_RETURN_IF_ERROR(s.Add(step.projected, step.shared, n * h));
    }
  }
  return absl::OkStatus();
}

absl::Status Model::FfnBlock(int layer, StepBuffers& step, ForwardOutput* output) {
  const LayerWeights& w = layers_[layer];
  kernels::Stream& s = backend_->compute();
  const int64_t n = step.n, h = config_.hidden_size;
  MOED_RETURN_IF_ERROR(s.RmsNorm(step.hidden, w.post_norm.as<float>(), n, h,
                                 static_cast<float>(config_.rms_norm_eps), step.x));
  if (w.moe) {
    MOED_RETURN_IF_ERROR(MoeBlock(layer, step, output));
  } else {
    MOED_RETURN_IF_ERROR(Mlp(w.dense_mlp, step.x, n, step.projected, step));
    output->routing[layer].assign(static_cast<size_t>(n), {});
  }
  return s.Add(step.hidden, step.projected, n * h);
}

absl::Status Model::GqaBlock(int layer, StepBuffers& step) {
  const ModelConfig& c = config_;
  const LayerWeights& w = layers_[layer];
  kernels::Stream& s = backend_->compute();
  const int64_t n = step.n, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int64_t d = c.head_dim, q_width = heads * d, kv_width = kv_heads * d;
  const float eps = static_cast<float>(c.rms_norm_eps);
  MOED_RETURN_IF_ERROR(s.MatMul(w.q, step.x, n, step.q));
  MOED_RETURN_IF_ERROR(s.MatMul(w.k, step.x, n, step.k));
  MOED_RETURN_IF_ERROR(s.MatMul(w.v, step.x, n, step.v));
  if (w.q_bias) {
    MOED_RETURN_IF_ERROR(s.AddBias(step.q, w.q_bias.as<float>(), n, q_width));
    MOED_RETURN_IF_ERROR(s.AddBias(step.k, w.k_bias.as<float>(), n, kv_width));
    MOED_RETURN_IF_ERROR(s.AddBias(step.v, w.v_bias.as<float>(), n, kv_width));
  }
  if (c.architecture == Architecture::kQwen3Moe) {  // per head, before RoPE
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.q, w.q_norm.as<float>(), n * heads, d, eps, step.q));
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.k, w.k_norm.as<float>(), n * kv_heads, d, eps, step.k));
  } else if (c.architecture == Architecture::kOlmoe) {  // over the whole projection
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.q, w.q_norm.as<float>(), n, q_width, eps, step.q));
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.k, w.k_norm.as<float>(), n, kv_width, eps, step.k));
  }
  MOED_RETURN_IF_ERROR(s.Rope(step.q, n, heads, d, step.positions, c.rope_theta));
  MOED_RETURN_IF_ERROR(s.Rope(step.k, n, kv_heads, d, step.positions, c.rope_theta));
  MOED_RETURN_IF_ERROR(s.WriteKv(step.kv, layer, step.k, step.v, n));
  return s.Attention(step.kv, layer, step.q, n, heads, step.attn);
}

absl::Status Model::MlaBlock(int layer, StepBuffers& step) {
  const ModelConfig& c = config_;
  const MlaConfig& m = c.mla;
  const LayerWeights& w = layers_[layer];
  kernels::Stream& s = backend_->compute();
  const int64_t n = step.n;
  if (w.q_a.data != nullptr) {
    MOED_RETURN_IF_ERROR(s.MatMul(w.q_a, step.x, n, step.q_low));
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.q_low, w.q_a_norm.as<float>(), n, m.q_lora_rank,
                                   kLowRankNormEps, step.q_low));
    MOED_RETURN_IF_ERROR(s.MatMul(w.q, step.q_low, n, step.q));
  } else {
    MOED_RETURN_IF_ERROR(s.MatMul(w.q, step.x, n, step.q));
  }
  // The latent (normed) and the rope key are what the cache keeps: step.k and step.v here.
  MOED_RETURN_IF_ERROR(s.MatMul(w.kv_a_latent, step.x, n, step.k));
  MOED_RETURN_IF_ERROR(
      s.RmsNorm(step.k, w.kv_a_norm.as<float>(), n, m.kv_lora_rank, kLowRankNormEps, step.k));
  MOED_RETURN_IF_ERROR(s.MatMul(w.kv_a_rope, step.x, n, step.v));
  MOED_RETURN_IF_ERROR(s.Rotary(step.q, n, q_rotary_, step.positions));
  MOED_RETURN_IF_ERROR(s.Rotary(step.v, n, k_rotary_, step.positions));
  MOED_RETURN_IF_ERROR(s.WriteKv(step.kv, layer, step.k, step.v, n));
  return s.MlaAttention(step.kv, layer, step.q, n, mla_shape_, w.kv_b, step.attn, step.mla_scratch);
}

absl::StatusOr<ForwardOutput> Model::Forward(absl::Span<SequenceInput> inputs) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int64_t d = c.head_dim, q_width = heads * d, kv_width = kv_heads * d;
  const int64_t k_experts = c.experts_per_token;
  const bool mla = c.uses_mla();
  // MLA keeps the latent in the k buffer and the rope key in the v buffer.
  const int64_t k_width = mla ? c.mla.kv_lora_rank : kv_width;
  const int64_t v_width = mla ? c.mla.rope_dim : kv_width;
  const int64_t attn_width = mla ? heads * c.mla.value_dim : q_width;

  // Validate everything before any cache changes.
  int64_t n = 0;
  for (const SequenceInput& input : inputs) {
    if (input.cache == nullptr) return absl::InvalidArgumentError("input without a KV cache");
    if (input.tokens.empty()) return absl::InvalidArgumentError("input without tokens");
    for (int32_t token : input.tokens) {
      if (token < 0 || token >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", token, " is outside the vocabulary of ", c.vocab_size));
      }
    }
    int64_t end = input.cache->length() + static_cast<int64_t>(input.tokens.size());
    if (end > input.cache->capacity()) {
      return absl::OutOfRangeError(absl::StrCat("sequence would reach ", end,
                                                " tokens, beyond its context of ",
                                                input.cache->capacity()));
    }
    if (&input.cache->device_ != &backend_->device()) {
      return absl::InvalidArgumentError("a KV cache of another backend");
    }
    n += static_cast<int64_t>(input.tokens.size());
  }
  // KV blocks for the new tokens (a cache keeps spare blocks it could not use yet).
  for (SequenceInput& input : inputs) {
    MOED_RETURN_IF_ERROR(
        input.cache->Reserve(input.cache->length() + static_cast<int64_t>(input.tokens.size())));
  }

  // What the step reads from the host: tokens, positions, each token's block table.
  std::vector<int32_t> tokens, table_start;
  std::vector<int64_t> positions;
  std::vector<TokenRef> token_refs;
  std::vector<Precision> loosest;
  std::vector<float*> block_table;
  std::vector<int32_t> logit_rows;  // which tokens' logits are returned, in order
  for (SequenceInput& input : inputs) {
    const int32_t start = static_cast<int32_t>(block_table.size());
    for (DeviceBuffer& block : input.cache->blocks_) block_table.push_back(block.as<float>());
    const int64_t m = static_cast<int64_t>(input.tokens.size());
    for (int64_t i = 0; i < m; ++i) {
      if (input.all_logits || i == m - 1) logit_rows.push_back(static_cast<int32_t>(tokens.size()));
      tokens.push_back(input.tokens[i]);
      positions.push_back(input.cache->length() + i);
      token_refs.push_back({reinterpret_cast<uintptr_t>(input.cache), input.cache->length() + i});
      loosest.push_back(input.loosest_precision);
      table_start.push_back(start);
    }
  }
  const int64_t rows_out = static_cast<int64_t>(logit_rows.size());

  int64_t max_inter = 0;
  for (const LayerWeights& w : layers_) {
    if (!w.moe) max_inter = std::max(max_inter, w.dense_mlp.gate.rows);
    if (w.has_shared_expert) max_inter = std::max(max_inter, w.shared_expert.gate.rows);
  }
  const auto f = [](int64_t count) { return static_cast<size_t>(count) * sizeof(float); };
  const auto i32 = [](int64_t count) { return static_cast<size_t>(count) * sizeof(int32_t); };
  ArenaLayout layout;
  const size_t hidden_at = layout.Add(f(n * h)), x_at = layout.Add(f(n * h)),
               q_at = layout.Add(f(n * q_width)), k_at = layout.Add(f(n * k_width)),
               v_at = layout.Add(f(n * v_width)), attn_at = layout.Add(f(n * attn_width)),
               q_low_at = layout.Add(f(n * c.mla.q_lora_rank)),
               mla_scratch_at = layout.Add(f(mla ? kernels::MlaScratchFloats(n, mla_shape_) : 0)),
               projected_at = layout.Add(f(n * h)),
               router_at = layout.Add(f(n * std::max<int64_t>(c.num_experts, 1))),
               lookahead_at = layout.Add(f(n * std::max<int64_t>(c.num_experts, 1))),
               chosen_at = layout.Add(i32(n * k_experts)),
               gate_weights_at = layout.Add(f(n * k_experts)),
               expert_out_at = layout.Add(f(n * k_experts * h)),
               ffn_at =
                   layout.Add(f(kernels::ExpertFfnScratchFloats(n, h, c.expert_intermediate_size))),
               mlp_gate_at = layout.Add(f(n * max_inter)), mlp_up_at = layout.Add(f(n * max_inter)),
               shared_at = layout.Add(f(n * h)), shared_gate_at = layout.Add(f(n)),
               rows_at = layout.Add(i32(n * k_experts)), slots_at = layout.Add(i32(n * k_experts)),
               tokens_at = layout.Add(i32(n)), positions_at = layout.Add(n * sizeof(int64_t)),
               table_start_at = layout.Add(i32(n)),
               table_at = layout.Add(block_table.size() * sizeof(float*)),
               logit_rows_at = layout.Add(i32(rows_out)), selected_at = layout.Add(f(rows_out * h)),
               logits_at = layout.Add(f(rows_out * c.vocab_size));
  // The activations of the largest step so far, kept: a step allocates nothing in the common
  // case (a fresh allocation per step would cost page faults on the CPU, cudaMalloc on a GPU).
  if (step_arena_.size() < layout.total()) {
    step_arena_ = DeviceBuffer();
    absl::StatusOr<DeviceBuffer> arena = backend_->device().Allocate(layout.total());
    if (!arena.ok()) {
      return absl::ResourceExhaustedError(
          absl::StrCat("cannot allocate a step's ", layout.total(),
                       " bytes of activations: ", arena.status().message()));
    }
    step_arena_ = *std::move(arena);
  }
  StepBuffers step;
  step.n = n;
  step.arena = &step_arena_;
  char* base = static_cast<char*>(step_arena_.data());
  auto at_f = [&](size_t offset) { return reinterpret_cast<float*>(base + offset); };
  auto at_i = [&](size_t offset) { return reinterpret_cast<int32_t*>(base + offset); };
  step.hidden = at_f(hidden_at);
  step.x = at_f(x_at);
  step.q = at_f(q_at);
  step.k = at_f(k_at);
  step.v = at_f(v_at);
  step.attn = at_f(attn_at);
  step.q_low = at_f(q_low_at);
  step.mla_scratch = at_f(mla_scratch_at);
  step.projected = at_f(projected_at);
  step.router_logits = at_f(router_at);
  step.lookahead_logits = at_f(lookahead_at);
  step.tokens = std::move(token_refs);
  step.any_loose = std::any_of(loosest.begin(), loosest.end(),
                               [](Precision p) { return p != Precision::kSource; });
  step.loosest = std::move(loosest);
  step.chosen = at_i(chosen_at);
  step.gate_weights = at_f(gate_weights_at);
  step.expert_out = at_f(expert_out_at);
  step.ffn_scratch = at_f(ffn_at);
  step.mlp_gate = at_f(mlp_gate_at);
  step.mlp_up = at_f(mlp_up_at);
  step.shared = at_f(shared_at);
  step.shared_gate = at_f(shared_gate_at);
  step.expert_rows_offset = rows_at;
  step.expert_rows = at_i(rows_at);
  step.expert_slots_offset = slots_at;
  step.expert_slots = at_i(slots_at);

  kernels::Stream& s = backend_->compute();
  MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, tokens_at, tokens.data(), i32(n)));
  MOED_RETURN_IF_ERROR(
      s.CopyToDevice(*step.arena, positions_at, positions.data(), n * sizeof(int64_t)));
  MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, table_start_at, table_start.data(), i32(n)));
  MOED_RETURN_IF_ERROR(s.CopyToDevice(*step.arena, table_at, block_table.data(),
                                      block_table.size() * sizeof(float*)));
  MOED_RETURN_IF_ERROR(
      s.CopyToDevice(*step.arena, logit_rows_at, logit_rows.data(), i32(rows_out)));
  const int64_t* positions_dev = reinterpret_cast<const int64_t*>(base + positions_at);
  step.positions = positions_dev;
  step.kv.block_table = reinterpret_cast<float* const*>(base + table_at);
  step.kv.table_start = at_i(table_start_at);
  step.kv.positions = positions_dev;
  step.kv.block_size = kKvBlockSize;
  step.kv.kv_heads = mla ? 1 : kv_heads;
  step.kv.head_dim = mla ? c.mla.kv_lora_rank : d;
  step.kv.value_dim = mla ? c.mla.rope_dim : d;
  step.kv.layer_floats = kKvBlockSize * c.KvFloatsPerTokenLayer();

  ForwardOutput output;
  output.routing.assign(static_cast<size_t>(c.num_layers), {});
  MOED_RETURN_IF_ERROR(s.Embed(embed_, at_i(tokens_at), n, step.hidden));
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& w = layers_[layer];
    MOED_RETURN_IF_ERROR(s.RmsNorm(step.hidden, w.input_norm.as<float>(), n, h, eps, step.x));
    MOED_RETURN_IF_ERROR(mla ? MlaBlock(layer, step) : GqaBlock(layer, step));
    MOED_RETURN_IF_ERROR(s.MatMul(w.o, step.attn, n, step.projected));
    MOED_RETURN_IF_ERROR(s.Add(step.hidden, step.projected, n * h));
    MOED_RETURN_IF_ERROR(FfnBlock(layer, step, &output));
  }

  // Final norm and the vocabulary projection, only for the rows asked for.
  float* selected = at_f(selected_at);
  MOED_RETURN_IF_ERROR(s.GatherRows(step.hidden, h, at_i(logit_rows_at), rows_out, selected));
  MOED_RETURN_IF_ERROR(s.RmsNorm(selected, final_norm_.as<float>(), rows_out, h, eps, selected));
  MOED_RETURN_IF_ERROR(s.MatMul(lm_head_, selected, rows_out, at_f(logits_at)));
  output.rows = rows_out;
  output.prefetches = experts_->TakeStepPrefetches();
  output.logits.resize(static_cast<size_t>(rows_out * c.vocab_size));
  MOED_RETURN_IF_ERROR(s.CopyToHost(output.logits.data(), *step.arena, logits_at,
                                    output.logits.size() * sizeof(float)));
  for (SequenceInput& input : inputs)
    input.cache->length_ += static_cast<int64_t>(input.tokens.size());
  return output;
}

}  // namespace moed::model
