// moed-replay: replays routing traces through each eviction policy and prints its hit rate
// next to Belady's optimal hit rate for the same trace and budget; with --batching, replays
// batch formation (round-robin against expert-aware) over requests cut from the traces.
#include <cstdio>
#include <iostream>

#include "CLI/CLI.hpp"
#include "absl/strings/str_join.h"
#include "cache/replay.h"
#include "nlohmann/json.hpp"
#include "tools/replay/batching_replay.h"

int main(int argc, char** argv) try {
  std::string path;
  std::vector<int> per_layer = {2, 4, 6};
  std::vector<double> shared_fractions = {0.25, 0.5, 0.75};
  CLI::App app{
      "moed-replay: routing-trace replay of the cache's eviction policies against Belady's "
      "optimum"};
  app.add_option("--trace", path,
                 "trace file (.jsonl, the format of moectl logits --record-routing)")
      ->required();
  app.add_option("--per-layer", per_layer, "per-layer budgets, in experts per layer")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--shared", shared_fractions, "shared budgets, as fractions of all experts")
      ->capture_default_str()
      ->delimiter(',');
  bool batching = false;
  moed::tools::BatchingReplayOptions batch_options;
  app.add_flag("--batching", batching,
               "replay batch formation instead: experts staged per token, round-robin against "
               "expert-aware, at the --per-layer budgets");
  app.add_option("--window", batch_options.window, "with --batching: tokens per request")
      ->capture_default_str();
  app.add_option("--running", batch_options.max_running,
                 "with --batching: requests admitted at once (--max-running)")
      ->capture_default_str();
  app.add_option("--batch", batch_options.max_batch,
                 "with --batching: sequences per step (--max-batch)")
      ->capture_default_str();
  app.add_option("--max-delay-steps", batch_options.max_delay_steps,
                 "with --batching: expert-aware formation runs a request at most this many "
                 "steps later than round-robin would")
      ->capture_default_str();
  bool prefetch_eval = false, json = false;
  std::string calibration_path;
  std::vector<std::string> predictors = {"affinity", "history", "combined"};
  std::vector<int> depths = {1, 2, 3}, candidates = {1, 2, 4};
  app.add_flag("--prefetch-eval", prefetch_eval,
               "evaluate the prefetch predictors instead: recall and precision of the experts "
               "each proposes for layer l+d from token t at layer l");
  app.add_option("--calibrate", calibration_path,
                 "with --prefetch-eval: routing trace to count expert affinities on (default: "
                 "each sequence of --trace with counts from the others, pooled)");
  app.add_option("--prefetch", predictors,
                 "predictors to evaluate (--prefetch-eval), or to prefetch with in the "
                 "eviction replay (after a row without)")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::IsMember({"affinity", "history", "combined"}));
  app.add_option("--depth", depths, "with --prefetch-eval: layers ahead")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::Range(1, 8));
  app.add_option("--candidates", candidates,
                 "with --prefetch-eval: experts proposed per token and layer")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  app.add_flag("--json", json, "one JSON object per line instead of a table");
  CLI11_PARSE(app, argc, argv);

  auto traces = moed::cache::ReadRoutingTraces(path);
  if (!traces.ok()) {
    std::cerr << "moed-replay: " << traces.status().message() << "\n";
    return 1;
  }
  if (traces->empty()) {
    std::cerr << "moed-replay: " << path << " holds no traces\n";
    return 1;
  }
  const auto& first = traces->front();
  if (prefetch_eval) {
    std::vector<moed::cache::RoutingTrace> calibration;
    if (!calibration_path.empty()) {
      auto read = moed::cache::ReadRoutingTraces(calibration_path);
      if (!read.ok()) {
        std::cerr << "moed-replay: " << read.status().message() << "\n";
        return 1;
      }
      calibration = *std::move(read);
    }
    if (!json) {
      std::printf("%-10s %5s %10s %8s %9s\n", "predictor", "depth", "candidates", "recall",
                  "precision");
    }
    for (const std::string& name : predictors) {
      auto kind = moed::cache::ParsePredictorKind(name);
      auto results = moed::cache::EvaluatePrefetch(
          *kind, *traces, calibration_path.empty() ? nullptr : &calibration, depths, candidates);
      if (!results.ok()) {
        std::cerr << "moed-replay: " << name << ": " << results.status().message() << "\n";
        return 1;
      }
      for (const auto& r : *results) {
        if (json) {
          nlohmann::ordered_json line = {{"predictor", r.predictor},   {"depth", r.depth},
                                         {"candidates", r.candidates}, {"recall", r.recall()},
                                         {"precision", r.precision()}, {"hits", r.hits},
                                         {"chosen", r.chosen},         {"proposed", r.proposed}};
          std::printf("%s\n", line.dump().c_str());
        } else {
          std::printf("%-10s %5d %10d %8.3f %9.3f\n", r.predictor.c_str(), r.depth, r.candidates,
                      r.recall(), r.precision());
        }
      }
    }
    return 0;
  }
  uint64_t tokens = 0;
  for (const auto& t : *traces) tokens += t.tokens.size();
  int total = first.num_layers * first.num_experts;
  if (!json) {
    std::printf("trace: %s (%zu sequences, %lu tokens, %d layers x %d experts, top-%d)\n",
                path.c_str(), traces->size(), static_cast<unsigned long>(tokens), first.num_layers,
                first.num_experts, first.top_k);
  }
  if (batching) {
    std::printf(
        "requests of %d tokens, %d admitted, %d per step, at most %d steps later than round-robin, "
        "LRU per "
        "layer; experts staged per generated token (hit rate)\n",
        batch_options.window, batch_options.max_running, batch_options.max_batch,
        batch_options.max_delay_steps);
    std::printf("%-18s %20s %20s %8s %20s %8s\n", "budget", "round-robin", "expert-aware", "ratio",
                "oracle", "ratio");
    for (int c : per_layer) {
      if (c <= 0 || c > first.num_experts) continue;
      batch_options.budget = {c, 0};
      batch_options.expert_aware = false;
      auto fifo = moed::tools::ReplayBatching(*traces, batch_options);
      batch_options.expert_aware = true;
      auto aware = moed::tools::ReplayBatching(*traces, batch_options);
      batch_options.oracle = true;
      auto oracle = moed::tools::ReplayBatching(*traces, batch_options);
      batch_options.oracle = false;
      auto ratio = [&](const moed::tools::BatchingReplayResult& r) {
        return 100 * r.staged_per_token() / std::max(1e-9, fifo.staged_per_token());
      };
      std::printf("%-18s %11.2f (%4.1f%%) %11.2f (%4.1f%%) %7.0f%% %11.2f (%4.1f%%) %7.0f%%\n",
                  ("per layer, C = " + std::to_string(c)).c_str(), fifo.staged_per_token(),
                  100 * fifo.hit_rate(), aware.staged_per_token(), 100 * aware.hit_rate(),
                  ratio(aware), oracle.staged_per_token(), 100 * oracle.hit_rate(), ratio(oracle));
    }
    return 0;
  }
  // Eviction, with and without prefetch, next to Belady's optimum (without prefetch).
  using moed::cache::PolicyKind;
  const std::vector<std::optional<PolicyKind>> policies = {
      PolicyKind::kLru, PolicyKind::kLfu, PolicyKind::kScored, PolicyKind::kSweep, std::nullopt};
  std::vector<std::string> prefetches = {"off"};
  prefetches.insert(prefetches.end(), predictors.begin(), predictors.end());
  if (!json) {
    std::printf(
        "hit rate and store reads per expert use; prefetch: the predictor's top-k experts "
        "of the next %d layer(s) made resident after each token's layer\n",
        depths.front());
    std::printf("%-24s %-9s %12s %12s %12s %12s %12s\n", "budget", "prefetch", "lru", "lfu",
                "scored", "sweep", "belady");
  }
  auto row = [&](const std::string& label, const char* scope, double fraction,
                 moed::cache::ReplayBudget budget) -> bool {
    for (const std::string& name : prefetches) {
      moed::cache::ReplayPrefetch prefetch;
      prefetch.kind = *moed::cache::ParsePredictorKind(name);
      prefetch.depth = depths.front();
      std::vector<moed::cache::RoutingTrace> calibration;
      if (!calibration_path.empty()) {
        auto read = moed::cache::ReadRoutingTraces(calibration_path);
        if (!read.ok()) {
          std::cerr << "moed-replay: " << read.status().message() << "\n";
          return false;
        }
        calibration = *std::move(read);
        prefetch.calibration = &calibration;
      }
      if (!json) std::printf("%-24s %-9s", label.c_str(), name.c_str());
      for (const auto& policy : policies) {
        if (!policy.has_value() && name != "off") {  // Belady is the no-prefetch optimum
          if (!json) std::printf(" %12s", "");
          continue;
        }
        auto result = moed::cache::Replay(*traces, budget, policy, &prefetch);
        if (!result.ok()) {
          std::cerr << "moed-replay: " << result.status().message() << "\n";
          return false;
        }
        const std::string policy_name =
            policy.has_value() ? std::string(moed::cache::PolicyName(*policy)) : "belady";
        if (json) {
          nlohmann::ordered_json line = {{"scope", scope},
                                         {"budget_fraction", fraction},
                                         {"policy", policy_name},
                                         {"prefetch", name},
                                         {"hit_rate", result->hit_rate()},
                                         {"reads_per_request", result->reads_per_request()}};
          std::printf("%s\n", line.dump().c_str());
        } else {
          std::printf("  %5.1f%% %4.2f", 100 * result->hit_rate(), result->reads_per_request());
        }
      }
      if (!json) std::printf("\n");
    }
    return true;
  };
  for (int c : per_layer) {
    if (c > 0 && c <= first.num_experts &&
        !row("per layer, C = " + std::to_string(c), "per_layer",
             static_cast<double>(c) / first.num_experts, {c, 0})) {
      return 1;
    }
  }
  for (double f : shared_fractions) {
    int slots = std::max(first.top_k, static_cast<int>(f * total));
    char label[64];
    std::snprintf(label, sizeof(label), "shared, %d slots (%.0f%%)", slots, 100.0 * slots / total);
    if (!row(label, "shared", static_cast<double>(slots) / total, {0, slots})) return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "moed-replay: " << e.what() << "\n";
  return 1;
}
