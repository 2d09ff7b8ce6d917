#include "cache/prefetcher.h"

#include <algorithm>
#include <numeric>
#include <tuple>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "util/status_macros.h"

namespace moed::cache {
namespace {

// Scales `scores` to sum 1 (left all zero when they are).
void Normalise(absl::Span<double> scores) {
  const double sum = std::accumulate(scores.begin(), scores.end(), 0.0);
  if (sum <= 0) return;
  for (double& s : scores) s /= sum;
}

class GatePredictor final : public Predictor {
 public:
  absl::string_view name() const override { return "gate"; }
  void Score(const TokenAtLayer& token, int depth, absl::Span<double> scores) override {
    std::fill(scores.begin(), scores.end(), 0.0);
    const size_t j = static_cast<size_t>(depth - 1);
    if (j >= token.lookahead.size() || token.lookahead[j].size() != scores.size()) return;
    for (size_t e = 0; e < scores.size(); ++e)
      scores[e] = std::max(0.0, static_cast<double>(token.lookahead[j][e]));
  }
};

class AffinityPredictor final : public Predictor {
 public:
  explicit AffinityPredictor(std::shared_ptr<const AffinityTable> table)
      : table_(std::move(table)) {}
  absl::string_view name() const override { return "affinity"; }
  void Score(const TokenAtLayer& token, int depth, absl::Span<double> scores) override {
    std::fill(scores.begin(), scores.end(), 0.0);
    if (depth < 1 || depth > table_->max_depth() || token.layer < 0 ||
        token.layer + depth >= table_->num_layers()) {
      return;
    }
    const int experts = std::min<int>(table_->num_experts(), static_cast<int>(scores.size()));
    for (int from : token.chosen) {
      if (from < 0 || from >= table_->num_experts()) continue;
      for (int to = 0; to < experts; ++to)
        scores[to] += static_cast<double>(table_->count(depth, token.layer, from, to));
    }
  }

 private:
  std::shared_ptr<const AffinityTable> table_;
};

// Per layer: what the sequence chose last, its decayed choice counts, and decayed counts over
// every sequence. The weights were chosen on the shared Mixtral traces (docs/benchmarks.md).
class HistoryPredictor final : public Predictor {
 public:
  static constexpr double kDecay = 0.95;
  static constexpr double kLastWeight = 1.0, kSequenceWeight = 1.0, kGlobalWeight = 0.5;
  static constexpr size_t kMaxSequences = 4096;

  HistoryPredictor(int num_layers, int num_experts)
      : num_layers_(num_layers),
        num_experts_(num_experts),
        global_(static_cast<size_t>(num_layers) * static_cast<size_t>(num_experts)) {}
  absl::string_view name() const override { return "history"; }

  void Score(const TokenAtLayer& token, int depth, absl::Span<double> scores) override {
    std::fill(scores.begin(), scores.end(), 0.0);
    const int target = token.layer + depth;
    if (target < 0 || target >= num_layers_ || static_cast<int>(scores.size()) != num_experts_)
      return;
    auto add = [&](absl::Span<const double> counts, double weight) {
      const double sum = std::accumulate(counts.begin(), counts.end(), 0.0);
      if (sum <= 0) return;
      for (size_t e = 0; e < scores.size(); ++e) scores[e] += weight * counts[e] / sum;
    };
    add(Row(global_, target), kGlobalWeight);
    auto it = sequences_.find(token.token.sequence);
    if (it == sequences_.end()) return;
    SequenceState& state = it->second;
    // A layer last updated at this position or later belongs to an earlier sequence that had
    // the same key.
    if (state.position[static_cast<size_t>(target)] >= token.token.position) return;
    add(Row(state.frequency, target), kSequenceWeight);
    const auto& last = state.last[static_cast<size_t>(target)];
    for (int e : last)
      scores[static_cast<size_t>(e)] += kLastWeight / static_cast<double>(last.size());
  }

  void Observe(const TokenAtLayer& token) override {
    if (token.layer < 0 || token.layer >= num_layers_) return;
    const size_t layer = static_cast<size_t>(token.layer);
    auto update = [&](absl::Span<double> counts) {
      for (double& c : counts) c *= kDecay;
      for (int e : token.chosen) {
        if (e >= 0 && e < num_experts_) counts[static_cast<size_t>(e)] += 1;
      }
    };
    update(Row(global_, token.layer));
    auto [it, inserted] = sequences_.try_emplace(token.token.sequence);
    SequenceState& state = it->second;
    if (inserted) {
      state.frequency.assign(global_.size(), 0.0);
      state.last.assign(static_cast<size_t>(num_layers_), {});
      state.position.assign(static_cast<size_t>(num_layers_), -1);
      order_.push_back(token.token.sequence);
      if (order_.size() > kMaxSequences) {
        sequences_.erase(order_.front());
        order_.pop_front();
      }
    }
    if (state.position[layer] >= token.token.position) {  // a new sequence under an old key
      std::fill_n(state.frequency.begin() + static_cast<int64_t>(layer) * num_experts_,
                  num_experts_, 0.0);
    }
    update(Row(state.frequency, token.layer));
    state.last[layer].assign(token.chosen.begin(), token.chosen.end());
    state.position[layer] = token.token.position;
  }

 private:
  struct SequenceState {
    std::vector<double> frequency;       // [layer][expert]
    std::vector<std::vector<int>> last;  // [layer]
    std::vector<int64_t> position;       // [layer]: the position it was last updated at
  };
  absl::Span<double> Row(std::vector<double>& table, int layer) {
    return absl::MakeSpan(table).subspan(static_cast<size_t>(layer) * num_experts_,
                                         static_cast<size_t>(num_experts_));
  }
  int num_layers_, num_experts_;
  std::vector<double> global_;  // [layer][expert]
  absl::flat_hash_map<uint64_t, SequenceState> sequences_;
  std::deque<uint64_t> order_;  // sequences by first sight, to bound their number
};

// Each source's scores normalised to sum 1, weighted by the source's recall so far at that
// depth (hits of its top-k over the experts chosen, with a prior of 1/2).
class CombinedPredictor final : public Predictor {
 public:
  CombinedPredictor(int num_experts, std::vector<std::unique_ptr<Predictor>> sources)
      : num_experts_(num_experts), sources_(std::move(sources)) {}
  absl::string_view name() const override { return "combined"; }

  void Score(const TokenAtLayer& token, int depth, absl::Span<double> scores) override {
    std::fill(scores.begin(), scores.end(), 0.0);
    const int target = token.layer + depth;
    const int top = std::max<int>(1, static_cast<int>(token.chosen.size()));
    std::vector<double> one(scores.size());
    auto& proposals = pending_[{token.token.sequence, token.token.position, target}];
    proposals.resize(sources_.size() * kMaxDepth);
    for (size_t s = 0; s < sources_.size(); ++s) {
      sources_[s]->Score(token, depth, absl::MakeSpan(one));
      const bool knows = std::any_of(one.begin(), one.end(), [](double v) { return v > 0; });
      if (depth <= kMaxDepth && knows)
        proposals[s * kMaxDepth + static_cast<size_t>(depth - 1)] = TopExperts(one, top);
      if (!knows) continue;
      Normalise(absl::MakeSpan(one));
      const double weight = Weight(s, depth);
      for (size_t e = 0; e < scores.size(); ++e) scores[e] += weight * one[e];
    }
    if (pending_.size() > kMaxPending) pending_.clear();  // entries of layers never observed
  }

  void Observe(const TokenAtLayer& token) override {
    auto it = pending_.find({token.token.sequence, token.token.position, token.layer});
    if (it != pending_.end()) {
      for (size_t s = 0; s < sources_.size(); ++s) {
        for (int d = 1; d <= kMaxDepth; ++d) {
          const auto& proposed = it->second[s * kMaxDepth + static_cast<size_t>(d - 1)];
          if (proposed.empty()) continue;
          Tally& tally = tallies_[{s, d}];
          for (int e : token.chosen)
            tally.hits += std::count(proposed.begin(), proposed.end(), e) > 0 ? 1 : 0;
          tally.chosen += token.chosen.size();
        }
      }
      pending_.erase(it);
    }
    for (auto& source : sources_) source->Observe(token);
  }

 private:
  static constexpr int kMaxDepth = 8;
  static constexpr size_t kMaxPending = 1 << 16;
  struct Tally {
    uint64_t hits = 0, chosen = 0;
  };
  double Weight(size_t source, int depth) const {
    auto it = tallies_.find({source, depth});
    const Tally t = it == tallies_.end() ? Tally{} : it->second;
    return (static_cast<double>(t.hits) + 1) / (static_cast<double>(t.chosen) + 2);
  }
  int num_experts_;
  std::vector<std::unique_ptr<Predictor>> sources_;
  // (sequence, position, target layer) → per source and depth, the experts it proposed.
  absl::flat_hash_map<std::tuple<uint64_t, int64_t, int>, std::vector<std::vector<int>>> pending_;
  absl::flat_hash_map<std::pair<size_t, int>, Tally> tallies_;
};

}  // namespace

absl::StatusOr<PredictorKind> ParsePredictorKind(absl::string_view name) {
  if (name == "off") return PredictorKind::kOff;
  if (name == "gate") return PredictorKind::kGate;
  if (name == "affinity") return PredictorKind::kAffinity;
  if (name == "history") return PredictorKind::kHistory;
  if (name == "combined") return PredictorKind::kCombined;
  return absl::InvalidArgumentError(absl::StrCat("unknown prefetch predictor \"", name,
                                                 "\" (off, gate, affinity, history, combined)"));
}

absl::string_view PredictorName(PredictorKind kind) {
  switch (kind) {
    case PredictorKind::kOff:
      return "off";
    case PredictorKind::kGate:
      return "gate";
    case PredictorKind::kAffinity:
      return "affinity";
    case PredictorKind::kHistory:
      return "history";
    case PredictorKind::kCombined:
      return "combined";
  }
  return "?";
}

AffinityTable::AffinityTable(int num_layers, int num_experts, int max_depth)
    : num_layers_(num_layers),
      num_experts_(num_experts),
      max_depth_(max_depth),
      counts_(static_cast<size_t>(max_depth) * static_cast<size_t>(num_layers) *
              static_cast<size_t>(num_experts) * static_cast<size_t>(num_experts)) {}

absl::StatusOr<AffinityTable> AffinityTable::FromTraces(const std::vector<RoutingTrace>& traces,
                                                        int max_depth) {
  if (traces.empty()) return absl::InvalidArgumentError("no routing traces to calibrate on");
  if (max_depth < 1 || max_depth > 8)
    return absl::InvalidArgumentError("the prefetch depth must be between 1 and 8");
  const RoutingTrace& first = traces.front();
  if (first.num_layers <= 0 || first.num_experts <= 0 || first.num_layers > 4096 ||
      first.num_experts > 4096) {
    return absl::InvalidArgumentError("routing traces with no layers or experts");
  }
  // Bounded whatever the file claims: 2^26 counts (512 MiB) hold DeepSeek-V3's 61 layers of
  // 256 experts at depth 8.
  const uint64_t counts =
      static_cast<uint64_t>(max_depth) * static_cast<uint64_t>(first.num_layers) *
      static_cast<uint64_t>(first.num_experts) * static_cast<uint64_t>(first.num_experts);
  if (counts > (uint64_t{1} << 26)) {
    return absl::InvalidArgumentError(
        absl::StrCat("routing traces of ", first.num_layers, " layers x ", first.num_experts,
                     " experts at depth ", max_depth, " need ", counts,
                     " affinity counts, over the 2^26 allowed"));
  }
  AffinityTable table(first.num_layers, first.num_experts, max_depth);
  for (const RoutingTrace& trace : traces) {
    if (trace.num_layers != first.num_layers || trace.num_experts != first.num_experts) {
      return absl::InvalidArgumentError(absl::StrCat(
          "routing traces of different shapes (", first.num_layers, " layers x ", first.num_experts,
          " experts, and ", trace.num_layers, " x ", trace.num_experts, ")"));
    }
    for (const auto& token : trace.tokens) {
      for (int l = 0; l < trace.num_layers; ++l) {
        if (!token[static_cast<size_t>(l)].has_value()) continue;
        for (int d = 1; d <= max_depth && l + d < trace.num_layers; ++d) {
          const auto& later = token[static_cast<size_t>(l) + static_cast<size_t>(d)];
          if (!later.has_value()) continue;
          for (int from : *token[static_cast<size_t>(l)]) {
            for (int to : *later) table.Add(d, l, from, to);
          }
        }
      }
    }
  }
  return table;
}

absl::StatusOr<AffinityTable> AffinityTable::FromFile(const std::string& path, int max_depth) {
  MOED_ASSIGN_OR_RETURN(std::vector<RoutingTrace> traces, ReadRoutingTraces(path));
  absl::StatusOr<AffinityTable> table = FromTraces(traces, max_depth);
  if (!table.ok()) {
    return absl::Status(table.status().code(), absl::StrCat(path, ": ", table.status().message()));
  }
  return table;
}

absl::StatusOr<std::unique_ptr<Predictor>> MakePredictor(
    PredictorKind kind, int num_layers, int num_experts,
    std::shared_ptr<const AffinityTable> calibration) {
  if (calibration != nullptr &&
      (calibration->num_layers() != num_layers || calibration->num_experts() != num_experts)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the prefetch calibration is for ", calibration->num_layers(), " layers x ",
        calibration->num_experts(), " experts; the model has ", num_layers, " x ", num_experts));
  }
  switch (kind) {
    case PredictorKind::kOff:
      return absl::InvalidArgumentError("no predictor for prefetch off");
    case PredictorKind::kGate:
      return std::make_unique<GatePredictor>();
    case PredictorKind::kAffinity:
      if (calibration == nullptr) {
        return absl::InvalidArgumentError(
            "the affinity predictor needs a calibration (--prefetch-calibration FILE, a routing "
            "trace from moed --record-routing)");
      }
      return std::make_unique<AffinityPredictor>(std::move(calibration));
    case PredictorKind::kHistory:
      return std::make_unique<HistoryPredictor>(num_layers, num_experts);
    case PredictorKind::kCombined: {
      std::vector<std::unique_ptr<Predictor>> sources;
      sources.push_back(std::make_unique<GatePredictor>());
      if (calibration != nullptr)
        sources.push_back(std::make_unique<AffinityPredictor>(std::move(calibration)));
      sources.push_back(std::make_unique<HistoryPredictor>(num_layers, num_experts));
      return std::make_unique<CombinedPredictor>(num_experts, std::move(sources));
    }
  }
  return absl::InvalidArgumentError("unknown predictor");
}

std::vector<int> TopExperts(absl::Span<const double> scores, int count) {
  std::vector<int> order(scores.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t n = std::min(order.size(), static_cast<size_t>(std::max(0, count)));
  std::partial_sort(
      order.begin(), order.begin() + static_cast<int64_t>(n), order.end(),
      [&](int a, int b) { return scores[a] != scores[b] ? scores[a] > scores[b] : a < b; });
  order.resize(n);
  return order;
}

std::vector<PrefetchEvalResult> EvaluateOnTraces(Predictor& predictor,
                                                 const std::vector<RoutingTrace>& traces,
                                                 const std::vector<int>& depths,
                                                 const std::vector<int>& candidates) {
  std::vector<PrefetchEvalResult> results;
  for (int d : depths) {
    for (int c : candidates) results.push_back({std::string(predictor.name()), d, c});
  }
  std::vector<double> scores;
  uint64_t sequence = 0;
  for (const RoutingTrace& trace : traces) {
    ++sequence;
    scores.assign(static_cast<size_t>(trace.num_experts), 0.0);
    for (size_t t = 0; t < trace.tokens.size(); ++t) {
      const auto& token = trace.tokens[t];
      for (int l = 0; l < trace.num_layers; ++l) {
        const auto& here = token[static_cast<size_t>(l)];
        if (!here.has_value()) continue;
        TokenAtLayer at{{sequence, static_cast<int64_t>(t)}, l, absl::MakeConstSpan(*here), {}};
        size_t r = 0;
        for (int d : depths) {
          const bool known =
              l + d < trace.num_layers && token[static_cast<size_t>(l) + static_cast<size_t>(d)];
          if (known) predictor.Score(at, d, absl::MakeSpan(scores));
          for (int c : candidates) {
            PrefetchEvalResult& result = results[r++];
            if (!known) continue;
            const auto& later = *token[static_cast<size_t>(l) + static_cast<size_t>(d)];
            std::vector<int> proposed = TopExperts(scores, c);
            for (int e : later)
              result.hits += std::count(proposed.begin(), proposed.end(), e) > 0 ? 1 : 0;
            result.chosen += later.size();
            result.proposed += proposed.size();
          }
        }
        predictor.Observe(at);
      }
    }
  }
  return results;
}

absl::StatusOr<std::unique_ptr<Prefetcher>> Prefetcher::Create(
    const PrefetcherOptions& options, int num_layers, int num_experts,
    std::shared_ptr<const AffinityTable> calibration) {
  if (options.kind == PredictorKind::kOff)
    return absl::InvalidArgumentError("no prefetcher for prefetch off");
  if (options.depth < 1 || options.depth > 8)
    return absl::InvalidArgumentError("--prefetch-depth must be between 1 and 8");
  if (calibration != nullptr && calibration->max_depth() < options.depth) {
    return absl::InvalidArgumentError(absl::StrCat("the prefetch calibration covers depth ",
                                                   calibration->max_depth(), ", not ",
                                                   options.depth));
  }
  MOED_ASSIGN_OR_RETURN(
      std::unique_ptr<Predictor> predictor,
      MakePredictor(options.kind, num_layers, num_experts, std::move(calibration)));
  return std::unique_ptr<Prefetcher>(
      new Prefetcher(options, num_layers, num_experts, std::move(predictor)));
}

Prefetcher::Prefetcher(const PrefetcherOptions& options, int num_layers, int num_experts,
                       std::unique_ptr<Predictor> predictor)
    : options_(options),
      num_layers_(num_layers),
      num_experts_(num_experts),
      predictor_(std::move(predictor)),
      hinted_(static_cast<size_t>(num_layers)),
      stats_(static_cast<size_t>(num_layers)) {
  for (int l = 0; l < num_layers; ++l) stats_[static_cast<size_t>(l)].layer = l;
}

int Prefetcher::lookahead_layers() const {
  return options_.kind == PredictorKind::kGate || options_.kind == PredictorKind::kCombined
             ? options_.depth
             : 0;
}

std::vector<PrefetchHint> Prefetcher::Plan(const model::LayerRouting& routing) {
  const int layer = routing.layer;
  if (layer < 0 || layer >= num_layers_ || routing.num_experts != num_experts_ ||
      routing.chosen == nullptr) {
    return {};
  }
  const auto& chosen = *routing.chosen;
  // How this layer's hints fared.
  auto& hinted = hinted_[static_cast<size_t>(layer)];
  if (!hinted.empty()) {
    std::vector<bool> needed(static_cast<size_t>(num_experts_));
    for (const auto& token : chosen) {
      for (int e : token) needed[static_cast<size_t>(e)] = true;
    }
    std::lock_guard lock(stats_mutex_);
    LayerPrefetchStats& stats = stats_[static_cast<size_t>(layer)];
    for (int e = 0; e < num_experts_; ++e) {
      stats.hinted += hinted[static_cast<size_t>(e)] ? 1 : 0;
      stats.needed += needed[static_cast<size_t>(e)] ? 1 : 0;
      stats.correct += hinted[static_cast<size_t>(e)] && needed[static_cast<size_t>(e)] ? 1 : 0;
    }
    hinted.clear();
  }

  const int candidates = options_.candidates > 0 ? options_.candidates : routing.top_k;
  absl::flat_hash_map<std::pair<int, int>, double> best;  // (layer, expert) → probability
  absl::flat_hash_set<std::pair<int, int>> fetch;         // some token's top candidates
  std::vector<double> scores(static_cast<size_t>(num_experts_));
  std::vector<TokenAtLayer> tokens(chosen.size());
  for (size_t t = 0; t < chosen.size(); ++t) {
    TokenAtLayer& at = tokens[t];
    at.token = routing.tokens != nullptr ? routing.tokens[t] : model::TokenRef{};
    at.layer = layer;
    at.chosen = absl::MakeConstSpan(chosen[t]);
    for (const auto& probabilities : routing.lookahead) {
      at.lookahead.push_back(probabilities.empty()
                                 ? absl::Span<const float>()
                                 : absl::MakeConstSpan(probabilities)
                                       .subspan(t * static_cast<size_t>(num_experts_),
                                                static_cast<size_t>(num_experts_)));
    }
    for (int d = 1; d <= options_.depth && layer + d < num_layers_; ++d) {
      predictor_->Score(at, d, absl::MakeSpan(scores));
      Normalise(absl::MakeSpan(scores));
      // Sized even when nothing is hinted: the layer's need then counts against recall.
      auto& target = hinted_[static_cast<size_t>(layer) + static_cast<size_t>(d)];
      if (target.empty()) target.assign(static_cast<size_t>(num_experts_), false);
      for (int e = 0; e < num_experts_; ++e) {
        const double p = scores[static_cast<size_t>(e)];
        if (p <= 0) continue;
        double& kept = best[{layer + d, e}];
        kept = std::max(kept, p);
      }
      for (int e : TopExperts(scores, candidates)) {
        if (scores[static_cast<size_t>(e)] <= 0) continue;
        fetch.insert({layer + d, e});
        target[static_cast<size_t>(e)] = true;
      }
    }
  }
  for (const TokenAtLayer& at : tokens) predictor_->Observe(at);

  std::vector<PrefetchHint> hints;
  hints.reserve(best.size());
  for (const auto& [key, p] : best)
    hints.push_back({key.first, key.second, p, fetch.contains(key)});
  std::sort(hints.begin(), hints.end(), [](const PrefetchHint& a, const PrefetchHint& b) {
    return std::tie(b.probability, a.layer, a.expert) < std::tie(a.probability, b.layer, b.expert);
  });
  return hints;
}

}  // namespace moed::cache
