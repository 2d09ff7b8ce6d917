#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "util/status_macros.h"

namespace moed::model {
namespace {

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
    kernels::cpu::ToFloat(ref.info->dtype, ref.data, size, out.data());
    return out;
  }

  absl::StatusOr<DenseMlp> Mlp(const std::string& prefix, absl::string_view gate,
                               absl::string_view up, absl::string_view down, int64_t hidden,
                               int64_t inter) {
    DenseMlp mlp;
    MOED_ASSIGN_OR_RETURN(mlp.gate, Matrix(absl::StrCat(prefix, gate, ".weight"), inter, hidden));
    MOED_ASSIGN_OR_RETURN(mlp.up, Matrix(absl::StrCat(prefix, up, ".weight"), inter, hidden));
    MOED_ASSIGN_OR_RETURN(mlp.down, Matrix(absl::StrCat(prefix, down, ".weight"), hidden, inter));
    return mlp;
  }

 private:
  const TensorSource& checkpoint_;
};

// Serves every expert straight from the checkpoint's memory mapping.
class CheckpointExpertProvider final : public ExpertProvider {
 public:
  explicit CheckpointExpertProvider(std::vector<std::vector<ExpertWeights>> experts)
      : experts_(std::move(experts)) {}

  absl::Status ForEachExpert(int layer, const std::vector<int>& experts,
                             const ExpertCompute& compute) override {
    for (int expert : experts)
      MOED_RETURN_IF_ERROR(compute(expert, experts_[layer][expert], ExpertServed{}));
    return absl::OkStatus();
  }

 private:
  std::vector<std::vector<ExpertWeights>> experts_;  // [layer][expert]; empty for dense layers
};

}  // namespace

KvCache::KvCache(const ModelConfig& config, int64_t capacity) : capacity_(capacity) {
  size_t per_layer = static_cast<size_t>(capacity * config.num_key_value_heads * config.head_dim);
  keys_.assign(static_cast<size_t>(config.num_layers), std::vector<float>(per_layer));
  values_.assign(static_cast<size_t>(config.num_layers), std::vector<float>(per_layer));
}

uint64_t KvCache::BytesFor(const ModelConfig& config, int64_t capacity) {
  // Keys and values, each capacity × kv heads × head_dim floats per layer.
  return 2 * static_cast<uint64_t>(config.num_layers) * static_cast<uint64_t>(capacity) *
         static_cast<uint64_t>(config.num_key_value_heads * config.head_dim) * sizeof(float);
}

uint64_t KvCache::bytes() const {
  uint64_t floats = 0;
  for (size_t l = 0; l < keys_.size(); ++l) floats += keys_[l].size() + values_[l].size();
  return floats * sizeof(float);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir, int threads) {
  MOED_ASSIGN_OR_RETURN(ModelConfig c, LoadModelConfig(dir));
  MOED_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> opened, Checkpoint::Open(dir));
  std::shared_ptr<const Checkpoint> checkpoint = std::move(opened);
  WeightBinder bind(*checkpoint);
  std::vector<std::vector<ExpertWeights>> experts(static_cast<size_t>(c.num_layers));
  for (int layer = 0; layer < c.num_layers; ++layer) {
    if (!c.IsMoeLayer(layer)) continue;
    for (int e = 0; e < c.num_experts; ++e) {
      ExpertTensorNames names = RoutedExpertTensorNames(c.architecture, layer, e);
      ExpertWeights weights;
      const int64_t h = c.hidden_size, inter = c.expert_intermediate_size;
      MOED_ASSIGN_OR_RETURN(weights.gate, bind.Matrix(names.gate, inter, h));
      MOED_ASSIGN_OR_RETURN(weights.up, bind.Matrix(names.up, inter, h));
      MOED_ASSIGN_OR_RETURN(weights.down, bind.Matrix(names.down, h, inter));
      experts[layer].push_back(weights);
    }
  }
  return Create(c, checkpoint, std::make_unique<CheckpointExpertProvider>(std::move(experts)),
                threads);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Create(const ModelConfig& config,
                                                     std::shared_ptr<const TensorSource> dense,
                                                     std::unique_ptr<ExpertProvider> experts,
                                                     int threads) {
  std::unique_ptr<Model> model(new Model());
  model->config_ = config;
  model->dense_ = std::move(dense);
  const ModelConfig& c = model->config_;
  WeightBinder bind(*model->dense_);
  const int64_t h = c.hidden_size;
  const int64_t q_width = c.num_attention_heads * c.head_dim;
  const int64_t kv_width = c.num_key_value_heads * c.head_dim;

  MOED_ASSIGN_OR_RETURN(model->embed_, bind.Matrix("model.embed_tokens.weight", c.vocab_size, h));
  MOED_ASSIGN_OR_RETURN(model->final_norm_, bind.Vector("model.norm.weight", h));
  if (model->dense_->Contains("lm_head.weight") || !c.tie_word_embeddings) {
    MOED_ASSIGN_OR_RETURN(model->lm_head_, bind.Matrix("lm_head.weight", c.vocab_size, h));
  } else {
    model->lm_head_ = model->embed_;
  }

  for (int layer = 0; layer < c.num_layers; ++layer) {
    LayerWeights w;
    std::string p = absl::StrCat("model.layers.", layer, ".");
    MOED_ASSIGN_OR_RETURN(w.input_norm, bind.Vector(p + "input_layernorm.weight", h));
    MOED_ASSIGN_OR_RETURN(w.post_norm, bind.Vector(p + "post_attention_layernorm.weight", h));
    MOED_ASSIGN_OR_RETURN(w.q, bind.Matrix(p + "self_attn.q_proj.weight", q_width, h));
    MOED_ASSIGN_OR_RETURN(w.k, bind.Matrix(p + "self_attn.k_proj.weight", kv_width, h));
    MOED_ASSIGN_OR_RETURN(w.v, bind.Matrix(p + "self_attn.v_proj.weight", kv_width, h));
    MOED_ASSIGN_OR_RETURN(w.o, bind.Matrix(p + "self_attn.o_proj.weight", h, q_width));
    // Qwen2-MoE has q/k/v biases; they are detected from the tensors, as the config may not say.
    if (model->dense_->Contains(p + "self_attn.q_proj.bias")) {
      MOED_ASSIGN_OR_RETURN(w.q_bias, bind.Vector(p + "self_attn.q_proj.bias", q_width));
      MOED_ASSIGN_OR_RETURN(w.k_bias, bind.Vector(p + "self_attn.k_proj.bias", kv_width));
      MOED_ASSIGN_OR_RETURN(w.v_bias, bind.Vector(p + "self_attn.v_proj.bias", kv_width));
    }
    if (c.architecture == Architecture::kQwen3Moe) {
      MOED_ASSIGN_OR_RETURN(w.q_norm, bind.Vector(p + "self_attn.q_norm.weight", c.head_dim));
      MOED_ASSIGN_OR_RETURN(w.k_norm, bind.Vector(p + "self_attn.k_norm.weight", c.head_dim));
    } else if (c.architecture == Architecture::kOlmoe) {
      MOED_ASSIGN_OR_RETURN(w.q_norm, bind.Vector(p + "self_attn.q_norm.weight", q_width));
      MOED_ASSIGN_OR_RETURN(w.k_norm, bind.Vector(p + "self_attn.k_norm.weight", kv_width));
    }
    w.moe = c.IsMoeLayer(layer);
    if (!w.moe) {
      MOED_ASSIGN_OR_RETURN(w.dense_mlp, bind.Mlp(p + "mlp.", "gate_proj", "up_proj", "down_proj",
                                                  h, c.dense_intermediate_size));
    } else {
      std::string moe = MoeBlockPrefix(c.architecture, layer);
      MOED_ASSIGN_OR_RETURN(w.router, bind.Matrix(moe + "gate.weight", c.num_experts, h));
      if (c.shared_expert_intermediate_size > 0) {
        w.has_shared_expert = true;
        MOED_ASSIGN_OR_RETURN(w.shared_expert,
                              bind.Mlp(moe + "shared_expert.", "gate_proj", "up_proj", "down_proj",
                                       h, c.shared_expert_intermediate_size));
        MOED_ASSIGN_OR_RETURN(w.shared_expert_gate,
                              bind.Matrix(moe + "shared_expert_gate.weight", 1, h));
      }
    }
    model->layers_.push_back(std::move(w));
  }
  model->experts_ = std::move(experts);
  model->pool_ = std::make_unique<kernels::ThreadPool>(threads);
  return model;
}

void Model::Mlp(const DenseMlp& mlp, const float* x, int64_t n, float* out) {
  const int64_t inter = mlp.gate.rows;
  std::vector<float> gate(static_cast<size_t>(n * inter)), up(gate.size());
  kernels::cpu::MatMul(mlp.gate, x, n, gate.data(), *pool_);
  kernels::cpu::MatMul(mlp.up, x, n, up.data(), *pool_);
  kernels::cpu::SiluMul(gate.data(), up.data(), n * inter, gate.data());
  kernels::cpu::MatMul(mlp.down, gate.data(), n, out, *pool_);
}

absl::Status Model::MoeBlock(int layer, const float* x, int64_t n, float* out, Routing* routing,
                             std::vector<ExpertUse>* uses) {
  const ModelConfig& c = config_;
  const LayerWeights& w = layers_[layer];
  const int64_t h = c.hidden_size, k = c.experts_per_token, num_experts = c.num_experts;

  std::vector<float> router_logits(static_cast<size_t>(n * num_experts));
  kernels::cpu::MatMul(w.router, x, n, router_logits.data(), *pool_);

  // Softmax over all experts, top-k (ties to the lower id), optional renormalisation.
  std::vector<int> chosen(static_cast<size_t>(n * k));
  std::vector<float> weights(static_cast<size_t>(n * k));
  std::vector<std::vector<std::pair<int64_t, int>>> tokens_of(static_cast<size_t>(num_experts));
  for (int64_t t = 0; t < n; ++t) {
    const float* logits = router_logits.data() + t * num_experts;
    float max_logit = *std::max_element(logits, logits + num_experts);
    std::vector<float> p(static_cast<size_t>(num_experts));
    float total = 0;
    for (int64_t e = 0; e < num_experts; ++e) total += p[e] = std::exp(logits[e] - max_logit);
    for (float& v : p) v /= total;
    std::vector<int> order(static_cast<size_t>(num_experts));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float selected = 0;
    for (int64_t r = 0; r < k; ++r) selected += p[order[r]];
    for (int64_t r = 0; r < k; ++r) {
      chosen[t * k + r] = order[r];
      weights[t * k + r] = c.norm_topk_prob ? p[order[r]] / selected : p[order[r]];
      tokens_of[order[r]].push_back({t, static_cast<int>(r)});
    }
    (*routing)[layer].push_back(std::vector<int>(order.begin(), order.begin() + k));
  }

  // Each expert runs once over all its tokens; outputs land in per-(token, rank) slots so the
  // final sum is in rank order whatever order the experts ran in.
  std::vector<float> expert_out(static_cast<size_t>(n * k * h));
  std::vector<int> needed;
  for (int e = 0; e < num_experts; ++e) {
    if (!tokens_of[e].empty()) needed.push_back(e);
  }
  std::vector<float> gathered, gate, up, down;
  MOED_RETURN_IF_ERROR(experts_->ForEachExpert(
      layer, needed,
      [&](int e, const ExpertWeights& ew, const ExpertServed& served) -> absl::Status {
        uses->push_back({layer, e, served});
        const auto& tokens = tokens_of[e];
        const int64_t m = static_cast<int64_t>(tokens.size());
        const int64_t inter = ew.gate.rows;
        gathered.resize(static_cast<size_t>(m * h));
        for (int64_t i = 0; i < m; ++i) {
          std::copy_n(x + tokens[i].first * h, h, gathered.data() + i * h);
        }
        gate.resize(static_cast<size_t>(m * inter));
        up.resize(gate.size());
        down.resize(static_cast<size_t>(m * h));
        kernels::cpu::MatMul(ew.gate, gathered.data(), m, gate.data(), *pool_);
        kernels::cpu::MatMul(ew.up, gathered.data(), m, up.data(), *pool_);
        kernels::cpu::SiluMul(gate.data(), up.data(), m * inter, gate.data());
        kernels::cpu::MatMul(ew.down, gate.data(), m, down.data(), *pool_);
        for (int64_t i = 0; i < m; ++i) {
          auto [t, rank] = tokens[i];
          std::copy_n(down.data() + i * h, h, expert_out.data() + (t * k + rank) * h);
        }
        return absl::OkStatus();
      }));
  for (int64_t t = 0; t < n; ++t) {
    float* o = out + t * h;
    std::fill(o, o + h, 0.0f);
    for (int64_t r = 0; r < k; ++r) {
      const float* y = expert_out.data() + (t * k + r) * h;
      float weight = weights[t * k + r];
      for (int64_t i = 0; i < h; ++i) o[i] += weight * y[i];
    }
  }
  if (w.has_shared_expert) {
    std::vector<float> shared(static_cast<size_t>(n * h)), gate_logit(static_cast<size_t>(n));
    Mlp(w.shared_expert, x, n, shared.data());
    kernels::cpu::MatMul(w.shared_expert_gate, x, n, gate_logit.data(), *pool_);
    for (int64_t t = 0; t < n; ++t) {
      float g = 1.0f / (1.0f + std::exp(-gate_logit[t]));
      for (int64_t i = 0; i < h; ++i) out[t * h + i] += g * shared[t * h + i];
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ForwardOutput> Model::Forward(absl::Span<SequenceInput> inputs) {
  const ModelConfig& c = config_;
  const int64_t h = c.hidden_size, heads = c.num_attention_heads, kv_heads = c.num_key_value_heads;
  const int64_t d = c.head_dim, q_width = heads * d, kv_width = kv_heads * d;

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
    n += static_cast<int64_t>(input.tokens.size());
  }

  std::vector<float> hidden(static_cast<size_t>(n * h));
  std::vector<int64_t> positions;
  std::vector<std::pair<size_t, int64_t>> token_source;  // (input, index within input)
  for (size_t s = 0; s < inputs.size(); ++s) {
    for (size_t i = 0; i < inputs[s].tokens.size(); ++i) {
      int64_t t = static_cast<int64_t>(positions.size());
      const char* row =
          static_cast<const char*>(embed_.data) +
          inputs[s].tokens[i] * h * static_cast<int64_t>(kernels::DTypeSize(embed_.dtype));
      kernels::cpu::ToFloat(embed_.dtype, row, h, hidden.data() + t * h);
      positions.push_back(inputs[s].cache->length() + static_cast<int64_t>(i));
      token_source.push_back({s, static_cast<int64_t>(i)});
    }
  }

  ForwardOutput output;
  output.routing.assign(static_cast<size_t>(c.num_layers), {});
  std::vector<float> x(hidden.size()), q(static_cast<size_t>(n * q_width)),
      k(static_cast<size_t>(n * kv_width)), v(k.size()), attn(q.size()), projected(hidden.size());
  const float eps = static_cast<float>(c.rms_norm_eps);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& w = layers_[layer];
    kernels::cpu::RmsNorm(hidden.data(), w.input_norm.data(), n, h, eps, x.data());
    kernels::cpu::MatMul(w.q, x.data(), n, q.data(), *pool_);
    kernels::cpu::MatMul(w.k, x.data(), n, k.data(), *pool_);
    kernels::cpu::MatMul(w.v, x.data(), n, v.data(), *pool_);
    if (!w.q_bias.empty()) {
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t i = 0; i < q_width; ++i) q[t * q_width + i] += w.q_bias[i];
        for (int64_t i = 0; i < kv_width; ++i) {
          k[t * kv_width + i] += w.k_bias[i];
          v[t * kv_width + i] += w.v_bias[i];
        }
      }
    }
    if (c.architecture == Architecture::kQwen3Moe) {  // per head, before RoPE
      kernels::cpu::RmsNorm(q.data(), w.q_norm.data(), n * heads, d, eps, q.data());
      kernels::cpu::RmsNorm(k.data(), w.k_norm.data(), n * kv_heads, d, eps, k.data());
    } else if (c.architecture == Architecture::kOlmoe) {  // over the whole projection
      kernels::cpu::RmsNorm(q.data(), w.q_norm.data(), n, q_width, eps, q.data());
      kernels::cpu::RmsNorm(k.data(), w.k_norm.data(), n, kv_width, eps, k.data());
    }
    kernels::cpu::RopeNeox(q.data(), n, heads, d, positions.data(), c.rope_theta);
    kernels::cpu::RopeNeox(k.data(), n, kv_heads, d, positions.data(), c.rope_theta);

    int64_t t0 = 0;
    for (SequenceInput& input : inputs) {
      const int64_t m = static_cast<int64_t>(input.tokens.size());
      KvCache& cache = *input.cache;
      std::copy_n(k.data() + t0 * kv_width, m * kv_width,
                  cache.keys_[layer].data() + cache.length_ * kv_width);
      std::copy_n(v.data() + t0 * kv_width, m * kv_width,
                  cache.values_[layer].data() + cache.length_ * kv_width);
      kernels::cpu::Attention(q.data() + t0 * q_width, m, heads, kv_heads, d,
                              cache.keys_[layer].data(), cache.values_[layer].data(),
                              positions.data() + t0, attn.data() + t0 * q_width, *pool_);
      t0 += m;
    }
    kernels::cpu::MatMul(w.o, attn.data(), n, projected.data(), *pool_);
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] += projected[i];

    kernels::cpu::RmsNorm(hidden.data(), w.post_norm.data(), n, h, eps, x.data());
    if (w.moe) {
      MOED_RETURN_IF_ERROR(
          MoeBlock(layer, x.data(), n, projected.data(), &output.routing, &output.expert_uses));
    } else {
      Mlp(w.dense_mlp, x.data(), n, projected.data());
      output.routing[layer].assign(static_cast<size_t>(n), {});
    }
    for (size_t i = 0; i < hidden.size(); ++i) hidden[i] += projected[i];
  }
  for (SequenceInput& input : inputs)
    input.cache->length_ += static_cast<int64_t>(input.tokens.size());

  // Final norm and the vocabulary projection, only for the rows asked for.
  std::vector<int64_t> rows;
  int64_t t0 = 0;
  for (const SequenceInput& input : inputs) {
    const int64_t m = static_cast<int64_t>(input.tokens.size());
    if (input.all_logits) {
      for (int64_t i = 0; i < m; ++i) rows.push_back(t0 + i);
    } else {
      rows.push_back(t0 + m - 1);
    }
    t0 += m;
  }
  std::vector<float> selected(rows.size() * static_cast<size_t>(h));
  for (size_t r = 0; r < rows.size(); ++r) {
    kernels::cpu::RmsNorm(hidden.data() + rows[r] * h, final_norm_.data(), 1, h, eps,
                          selected.data() + r * h);
  }
  output.rows = static_cast<int64_t>(rows.size());
  output.logits.resize(rows.size() * static_cast<size_t>(c.vocab_size));
  kernels::cpu::MatMul(lm_head_, selected.data(), output.rows, output.logits.data(), *pool_);
  return output;
}

}  // namespace moed::model
