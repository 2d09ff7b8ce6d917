// Every golden case of ../shared/golden and ../shared/golden-next: prompt logits and the
// greedy continuation, against llama.cpp's reference numbers (README: 1e-4 on logits, greedy
// ids exact).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "cache/expert_cache.h"
#include "cache/prefetcher.h"
#include "cache/routing_trace.h"
#include "cache/store_reader.h"
#include "kernels/cuda/host_grid_backend.h"
#include "kernels/test_backend.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"

namespace moed::model {
namespace {

// Every golden model, as a path under the shared directory.
constexpr const char* kGoldenModels[] = {"golden/mixtral", "golden/qwen2_moe", "golden/qwen3_moe",
                                         "golden/olmoe", "golden-next/deepseek_v2"};

double MaxAbsDiff(const std::vector<float>& ours, const nlohmann::json& reference) {
  REQUIRE(ours.size() == reference.size());
  double worst = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    worst = std::max(worst, std::abs(double(ours[i]) - reference[i].get<double>()));
  }
  return worst;
}

void CheckGolden(const std::string& name,
                 std::shared_ptr<kernels::Backend> backend = kernels::TestCpuBackend(2)) {
  const char* shared = std::getenv("MOED_SHARED_DIR");
  REQUIRE(shared != nullptr);
  std::string dir = std::string(shared) + "/" + name;
  auto model = Model::Load(dir, std::move(backend));
  REQUIRE(model.ok());
  nlohmann::json cases = nlohmann::json::parse(std::ifstream(dir + "/cases.json"));
  REQUIRE(cases["cases"].size() == 3);
  for (const auto& c : cases["cases"]) {
    std::vector<int32_t> prompt = c["prompt"].get<std::vector<int32_t>>();
    INFO(name << " prompt of " << prompt.size());
    auto result = ScoreAndGreedy(**model, prompt, static_cast<int>(c["greedy"].size()));
    REQUIRE(result.ok());
    REQUIRE(result->prompt_logits.size() == c["prompt_logits"].size());
    double worst_prompt = 0, worst_greedy = 0;
    for (size_t i = 0; i < result->prompt_logits.size(); ++i) {
      worst_prompt =
          std::max(worst_prompt, MaxAbsDiff(result->prompt_logits[i], c["prompt_logits"][i]));
    }
    CHECK(result->greedy == c["greedy"].get<std::vector<int32_t>>());
    for (size_t i = 0; i < result->greedy_logits.size(); ++i) {
      worst_greedy =
          std::max(worst_greedy, MaxAbsDiff(result->greedy_logits[i], c["greedy_logits"][i]));
    }
    INFO("max |diff| prompt " << worst_prompt << ", greedy " << worst_greedy);
    CHECK(worst_prompt <= 1e-4);
    CHECK(worst_greedy <= 1e-4);
  }
}

// The golden checkpoints packed into stores and run through the expert cache: the source
// precision gives bitwise the all-resident checkpoint's logits at every budget, whatever the
// prefetcher does.
void CheckGoldenStore(const std::string& name) {
  const char* shared = std::getenv("MOED_SHARED_DIR");
  REQUIRE(shared != nullptr);
  std::string dir = std::string(shared) + "/" + name;
  const std::string model_name = std::filesystem::path(name).filename().string();
  const testing::ScratchDir scratch("moed_golden_store_" + model_name);
  const std::filesystem::path store_dir = scratch / "store";
  REQUIRE(tools::Pack(dir, store_dir.string(), tools::PackOptions{}).ok());
  auto store = cache::Store::Open(store_dir.string());
  REQUIRE(store.ok());
  const ModelConfig& config = (*store)->config();
  auto from_checkpoint = Model::Load(dir, kernels::TestCpuBackend(2));
  REQUIRE(from_checkpoint.ok());
  nlohmann::json cases = nlohmann::json::parse(std::ifstream(dir + "/cases.json"));
  std::vector<GreedyResult> expected;
  std::vector<cache::RoutingTrace> routing;  // the affinity predictor's calibration
  for (const auto& c : cases["cases"]) {
    auto b = ScoreAndGreedy(**from_checkpoint, c["prompt"].get<std::vector<int32_t>>(),
                            static_cast<int>(c["greedy"].size()));
    REQUIRE(b.ok());
    CHECK(b->greedy == c["greedy"].get<std::vector<int32_t>>());
    routing.push_back(cache::TraceFromRouting(b->routing, static_cast<int>(config.num_experts),
                                              static_cast<int>(config.experts_per_token), 0,
                                              model_name));
    expected.push_back(*std::move(b));
  }
  auto calibration = cache::AffinityTable::FromTraces(routing, 2);
  REQUIRE(calibration.ok());
  auto counts = std::make_shared<const cache::AffinityTable>(*std::move(calibration));

  const uint64_t slot = cache::ExpertCache::SlotBytes(**store, cache::Precision::kSource);
  const uint64_t all = slot * config.NumMoeLayers() * config.num_experts;
  const uint64_t minimum =
      cache::ExpertCache::MinimumDeviceBytes(**store, cache::Precision::kSource);
  // The minimum, 25 %, 50 % and 100 % of the experts, in exact mode.
  for (uint64_t budget : {minimum, std::max(minimum, all / 4), std::max(minimum, all / 2), all}) {
    for (cache::PredictorKind kind :
         {cache::PredictorKind::kOff, cache::PredictorKind::kGate, cache::PredictorKind::kAffinity,
          cache::PredictorKind::kHistory, cache::PredictorKind::kCombined}) {
      INFO("device budget " << budget << " of " << all << ", prefetch "
                            << cache::PredictorName(kind));
      cache::CacheOptions options;
      options.device_bytes = budget;
      options.prefetch_slots = kind == cache::PredictorKind::kOff ? 0 : 1;  // as the daemon
      auto made = cache::ExpertCache::Create(*store, options);
      REQUIRE(made.ok());
      std::shared_ptr<cache::ExpertCache> experts = *std::move(made);
      std::shared_ptr<cache::Prefetcher> prefetcher;
      if (kind != cache::PredictorKind::kOff) {
        cache::PrefetcherOptions prefetch;
        prefetch.kind = kind;
        prefetch.depth = 2;
        auto created = cache::Prefetcher::Create(prefetch, static_cast<int>(config.num_layers),
                                                 static_cast<int>(config.num_experts), counts);
        REQUIRE(created.ok());
        prefetcher = *std::move(created);
      }
      auto from_store = Model::Create(config, *store, cache::SharedProvider(experts, prefetcher),
                                      kernels::TestCpuBackend(2));
      REQUIRE(from_store.ok());
      for (size_t i = 0; i < cases["cases"].size(); ++i) {
        const auto& c = cases["cases"][i];
        auto a = ScoreAndGreedy(**from_store, c["prompt"].get<std::vector<int32_t>>(),
                                static_cast<int>(c["greedy"].size()));
        REQUIRE(a.ok());
        CHECK(a->prompt_logits == expected[i].prompt_logits);
        CHECK(a->greedy_logits == expected[i].greedy_logits);
        CHECK(a->greedy == expected[i].greedy);
      }
      if (kind != cache::PredictorKind::kOff && budget > minimum && budget < all) {
        // The prefetcher did run: it hinted, and the cache read ahead (into its landing slot:
        // the minimum budget has none).
        CHECK(experts->counters().prefetch_issued > 0);
      }
    }
  }
}

TEST_CASE(
    "golden stores give the checkpoints' logits bitwise at every cache budget and prefetcher") {
  for (const char* name : kGoldenModels) {
    INFO(name);
    CheckGoldenStore(name);
  }
}

TEST_CASE("golden mixtral") { CheckGolden("golden/mixtral"); }
TEST_CASE("golden qwen2_moe") { CheckGolden("golden/qwen2_moe"); }
TEST_CASE("golden qwen3_moe") { CheckGolden("golden/qwen3_moe"); }
TEST_CASE("golden olmoe") { CheckGolden("golden/olmoe"); }
TEST_CASE("golden deepseek_v2") { CheckGolden("golden-next/deepseek_v2"); }

// The CUDA backend's kernels, their bodies run on the host over the launch grid: the whole
// forward pass (paged KV, grouped expert FFN, router) within the golden tolerance.
TEST_CASE("golden logits through the CUDA kernels' bodies run on the host") {
  for (const char* name : kGoldenModels) {
    INFO(name);
    CheckGolden(name, kernels::grid::CreateHostGridBackend());
  }
}

// On a machine with a GPU (the lent-GPU check runs this binary there).
TEST_CASE("golden logits on a CUDA device when there is one") {
  if (kernels::DiscoverDevices().cuda_devices.empty()) {
    CHECK_FALSE(kernels::CreateBackend(kernels::BackendKind::kCuda).ok());
    return;
  }
  for (const char* name : kGoldenModels) {
    INFO(name);
    auto cuda = kernels::CreateBackend(kernels::BackendKind::kCuda);
    REQUIRE(cuda.ok());
    CheckGolden(name, std::move(cuda->backend));
  }
}

}  // namespace
}  // namespace moed::model
