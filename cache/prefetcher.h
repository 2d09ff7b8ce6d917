// Predictive prefetch: interchangeable predictors of the experts later layers will choose, and
// the Prefetcher that turns their scores into prioritised hints for the expert cache. Every
// predictor also runs offline over routing traces (EvaluateOnTraces), so what the engine uses
// is what moed-replay measures.
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "cache/routing_trace.h"
#include "model/expert_provider.h"

namespace moed::cache {

enum class PredictorKind { kOff, kGate, kAffinity, kHistory, kCombined };
// "off", "gate", "affinity", "history", "combined"
absl::StatusOr<PredictorKind> ParsePredictorKind(absl::string_view name);
absl::string_view PredictorName(PredictorKind kind);

// Counts of (expert e chosen at layer l → expert e' chosen at layer l + d by the same token),
// for d = 1..max_depth, from recorded routing.
class AffinityTable {
 public:
  AffinityTable(int num_layers, int num_experts, int max_depth);
  // Every (token, layer, depth) of `traces` whose two entries are both recorded; every pair of
  // the two entries' experts counts once.
  static absl::StatusOr<AffinityTable> FromTraces(const std::vector<RoutingTrace>& traces,
                                                  int max_depth);
  // A .jsonl routing trace file (moed --record-routing, moectl logits --record-routing).
  static absl::StatusOr<AffinityTable> FromFile(const std::string& path, int max_depth);

  int num_layers() const { return num_layers_; }
  int num_experts() const { return num_experts_; }
  int max_depth() const { return max_depth_; }
  uint64_t count(int depth, int layer, int from, int to) const {
    return counts_[Index(depth, layer, from, to)];
  }
  void Add(int depth, int layer, int from, int to) { ++counts_[Index(depth, layer, from, to)]; }

 private:
  size_t Index(int depth, int layer, int from, int to) const {
    return ((static_cast<size_t>(depth - 1) * static_cast<size_t>(num_layers_) +
             static_cast<size_t>(layer)) *
                static_cast<size_t>(num_experts_) +
            static_cast<size_t>(from)) *
               static_cast<size_t>(num_experts_) +
           static_cast<size_t>(to);
  }
  int num_layers_, num_experts_, max_depth_;
  std::vector<uint64_t> counts_;
};

// One token at one layer, as a predictor sees it.
struct TokenAtLayer {
  model::TokenRef token;
  int layer = 0;
  absl::Span<const int> chosen;  // the experts it chose here, rank order
  // lookahead[j]: probabilities of layer + 1 + j's router on this token's hidden state here;
  // empty spans where not computed.
  std::vector<absl::Span<const float>> lookahead;
};

class Predictor {
 public:
  virtual ~Predictor() = default;
  virtual absl::string_view name() const = 0;
  // Non-negative scores, one per expert (higher: likelier), that the token chooses each expert
  // at layer `token.layer + depth`; all zero when the predictor knows nothing.
  virtual void Score(const TokenAtLayer& token, int depth, absl::Span<double> scores) = 0;
  // The token's choice at token.layer, after every prediction made at that layer.
  virtual void Observe(const TokenAtLayer& /*token*/) {}
};

// gate: the later layers' routers applied to the current hidden state (LayerRouting::lookahead).
// affinity: the calibration's counts from the experts chosen here.
// history: per layer, the experts the sequence chose last, its decayed choice frequency, and a
//   decayed frequency over all sequences.
// combined: every source given (each normalised to sum 1), weighted by its recall measured
//   online, per depth.
// `calibration` is needed by affinity (and used by combined when given).
absl::StatusOr<std::unique_ptr<Predictor>> MakePredictor(
    PredictorKind kind, int num_layers, int num_experts,
    std::shared_ptr<const AffinityTable> calibration);

// The `count` highest-scoring experts, ties to the lower id.
std::vector<int> TopExperts(absl::Span<const double> scores, int count);

// Recall and precision at `depth` with `candidates` per (token, layer), as moed-replay reports
// them: pooled over every token and layer whose entries at layer and layer + depth are both
// recorded.
struct PrefetchEvalResult {
  std::string predictor;
  int depth = 0;
  int candidates = 0;
  uint64_t hits = 0, chosen = 0, proposed = 0;
  double recall() const { return chosen == 0 ? 0 : static_cast<double>(hits) / chosen; }
  double precision() const { return proposed == 0 ? 0 : static_cast<double>(hits) / proposed; }
};

// Runs `predictor` over `traces` in order (tokens in order, layers in order within a token,
// each prediction made before the predicted layer is observed), for every depth × candidates.
std::vector<PrefetchEvalResult> EvaluateOnTraces(Predictor& predictor,
                                                 const std::vector<RoutingTrace>& traces,
                                                 const std::vector<int>& depths,
                                                 const std::vector<int>& candidates);

// A hint for the expert cache: make (layer, expert) resident, ahead of its use.
struct PrefetchHint {
  int layer = 0;
  int expert = 0;
  double probability = 0;  // the predictor's normalised score; hints run highest first
  // False: not worth a read, but the probability still protects the expert, when resident,
  // from eviction by a less likely prefetch.
  bool fetch = true;
  // The copy to fetch; empty: the cache's full copy.
  std::optional<model::Precision> precision;
};

// How well the prefetcher's hints for a layer matched what the layer then needed.
struct LayerPrefetchStats {
  int layer = 0;
  uint64_t hinted = 0;   // experts hinted for the layer, summed over steps
  uint64_t needed = 0;   // experts the layer's tokens chose, summed over steps
  uint64_t correct = 0;  // hinted and needed
  double recall() const { return needed == 0 ? 0 : static_cast<double>(correct) / needed; }
  double precision() const { return hinted == 0 ? 0 : static_cast<double>(correct) / hinted; }
};

struct PrefetcherOptions {
  PredictorKind kind = PredictorKind::kCombined;
  int depth = 1;  // layers ahead
  // Experts proposed per token per predicted layer; 0: the model's experts per token.
  int candidates = 0;
};

// Engine side: fed each MoE layer's routing in order, it returns hints for the next `depth`
// layers, ordered by probability (the highest score over the step's tokens): to fetch, each
// token's `candidates` likeliest experts; the rest of the predicted distribution as hints not
// to fetch.
class Prefetcher {
 public:
  static absl::StatusOr<std::unique_ptr<Prefetcher>> Create(
      const PrefetcherOptions& options, int num_layers, int num_experts,
      std::shared_ptr<const AffinityTable> calibration);

  // Hints for layers routing.layer + 1 .. + depth; also scores this layer's earlier hints.
  std::vector<PrefetchHint> Plan(const model::LayerRouting& routing);
  // How many later routers the engine should evaluate (the gate predictor's need).
  int lookahead_layers() const;

  const PrefetcherOptions& options() const { return options_; }
  std::vector<LayerPrefetchStats> layer_stats() const {
    std::lock_guard lock(stats_mutex_);
    return stats_;
  }

 private:
  Prefetcher(const PrefetcherOptions& options, int num_layers, int num_experts,
             std::unique_ptr<Predictor> predictor);
  PrefetcherOptions options_;
  int num_layers_, num_experts_;
  std::unique_ptr<Predictor> predictor_;
  // Per layer: the experts hinted for it since it last routed.
  std::vector<std::vector<bool>> hinted_;
  mutable std::mutex stats_mutex_;  // stats_ is read by other threads than the engine's
  std::vector<LayerPrefetchStats> stats_;
};

}  // namespace moed::cache
