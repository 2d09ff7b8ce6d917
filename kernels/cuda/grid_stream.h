// The operators of the CUDA backend over a launcher: the device launcher (cuda_kernels.h) on a
// GPU, the host launcher (host_grid_backend.cc) in the tests. Copies and events are the
// derived stream's.
#pragma once

#include "absl/strings/str_cat.h"
#include "kernels/backend.h"
#include "kernels/cuda/kernel_bodies.h"

namespace moed::kernels::grid {

inline Matrix ToGrid(const WeightMatrix& w) {
  return Matrix{static_cast<int>(w.format()), w.data, w.rows, w.cols, w.scales, w.group_size};
}

inline Kv ToGrid(const PagedKv& kv) {
  return Kv{kv.block_table, kv.table_start, kv.positions,    kv.block_size,
            kv.kv_heads,    kv.head_dim,    kv.layer_floats, kv.value_width()};
}

template <class Launcher>
class GridStream : public Stream {
 public:
  absl::Status Embed(const WeightMatrix& table, const int32_t* tokens, int64_t n,
                     float* out) override {
    if (table.quantization != Quantization::kNone) {
      return absl::UnimplementedError("embedding tables are unquantized");
    }
    launcher().Elementwise(n * table.cols, EmbedBody{ToGrid(table), tokens, out});
    return Launched("embedding");
  }
  absl::Status RmsNorm(const float* x, const float* weight, int64_t rows, int64_t width, float eps,
                       float* y) override {
    launcher().Warps(rows, RmsNormBody{x, weight, width, eps, y});
    return Launched("rms_norm");
  }
  absl::Status MatMul(const WeightMatrix& w, const float* x, int64_t n, float* y) override {
    RunMatMul(launcher(), ToGrid(w), x, n, y);
    return Launched("matmul");
  }
  absl::Status AddBias(float* x, const float* bias, int64_t rows, int64_t width) override {
    launcher().Elementwise(rows * width, AddBiasBody{x, bias, width});
    return Launched("add_bias");
  }
  absl::Status Rope(float* x, int64_t n, int64_t heads, int64_t head_dim, const int64_t* positions,
                    double theta) override {
    launcher().Elementwise(n * heads * (head_dim / 2),
                           RopeBody{x, heads, head_dim, positions, theta});
    return Launched("rope");
  }
  absl::Status WriteKv(const PagedKv& kv, int layer, const float* k, const float* v,
                       int64_t n) override {
    launcher().Elementwise(n * (kv.kv_width() + kv.value_width()),
                           WriteKvBody{ToGrid(kv), layer, k, v});
    return Launched("kv_write");
  }
  absl::Status Attention(const PagedKv& kv, int layer, const float* q, int64_t n, int64_t heads,
                         float* out) override {
    launcher().Elementwise(n * heads, AttentionBody{ToGrid(kv), layer, q, heads, out});
    return Launched("attention");
  }
  absl::Status RouterTopK(const float* logits, int64_t n, int64_t experts, int64_t k,
                          const RouterSpec& spec, int32_t* chosen, float* weights) override {
    if (absl::Status s = CheckRouterSpec(experts, k, spec); !s.ok()) return s;
    if (experts > kMaxExperts || spec.groups > kMaxGroups) {
      return absl::InvalidArgumentError(absl::StrCat("router_topk: ", experts, " experts in ",
                                                     spec.groups, " groups, beyond the kernel's ",
                                                     kMaxExperts, " and ", kMaxGroups));
    }
    launcher().Elementwise(
        n,
        RouterTopKBody{logits, experts, k, spec.scoring == RouterScoring::kSigmoid,
                       spec.renormalize, spec.scale, spec.choice_bias, spec.groups, spec.top_groups,
                       spec.group_score == GroupScore::kTopTwoSum, chosen, weights});
    return Launched("router_topk");
  }
  absl::Status SiluMul(const float* gate, const float* up, int64_t count, float* out) override {
    RunSiluMul(launcher(), gate, up, count, out);
    return Launched("silu_mul");
  }
  absl::Status ExpertFfn(const SwiGluWeights& w, const float* x, const int32_t* rows, int64_t m,
                         float* out, const int32_t* out_rows, float* scratch) override {
    RunExpertFfn(launcher(), ToGrid(w.gate), ToGrid(w.up), ToGrid(w.down), x, rows, m, out,
                 out_rows, scratch);
    return Launched("expert_ffn");
  }
  absl::Status MoeCombine(const float* expert_out, const float* weights, int64_t n, int64_t k,
                          int64_t width, float* out) override {
    launcher().Elementwise(n * width, MoeCombineBody{expert_out, weights, k, width, out});
    return Launched("moe_combine");
  }
  absl::Status Add(float* acc, const float* x, int64_t count) override {
    launcher().Elementwise(count, AddBody{acc, x});
    return Launched("add");
  }
  absl::Status SigmoidGatedAdd(const float* gate_logits, const float* x, int64_t n, int64_t width,
                               float* out) override {
    launcher().Elementwise(n * width, SigmoidGatedAddBody{gate_logits, x, width, out});
    return Launched("sigmoid_gated_add");
  }
  absl::Status GatherRows(const float* src, int64_t width, const int32_t* rows, int64_t m,
                          float* dst) override {
    launcher().Elementwise(m * width, GatherRowsBody{src, width, rows, dst});
    return Launched("gather_rows");
  }
  absl::Status Rotary(float* x, int64_t n, const RotarySpec& spec,
                      const int64_t* positions) override {
    launcher().Elementwise(
        n * spec.heads * (spec.dims / 2),
        RotaryBody{x, spec.heads, spec.head_stride, spec.offset, spec.dims,
                   spec.style == RotaryStyle::kPairs, spec.inv_freq, spec.magnitude, positions});
    return Launched("rotary");
  }
  absl::Status MlaAttention(const PagedKv& kv, int layer, const float* q, int64_t n,
                            const MlaShape& shape, const WeightMatrix& kv_b, float* out,
                            float* scratch) override {
    const Matrix b = ToGrid(kv_b);
    const int64_t items = n * shape.heads;
    launcher().Elementwise(items * shape.latent_dim,
                           MlaAbsorbBody{q, b, shape.heads, shape.nope_dim, shape.rope_dim,
                                         shape.value_dim, shape.latent_dim, scratch});
    launcher().Elementwise(
        items, MlaLatentAttentionBody{ToGrid(kv), layer, q, shape.heads, shape.nope_dim,
                                      shape.rope_dim, shape.latent_dim, shape.scale, scratch});
    launcher().Elementwise(items * shape.value_dim,
                           MlaValueBody{b, shape.heads, shape.nope_dim, shape.value_dim,
                                        shape.latent_dim, scratch, out});
    return Launched("mla_attention");
  }

 protected:
  virtual Launcher& launcher() = 0;
  // The launch error of the operator just queued, if any.
  virtual absl::Status Launched(const char* op) = 0;
};

}  // namespace moed::kernels::grid
