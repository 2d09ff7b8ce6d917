// The precision policy on the golden models packed into stores: exact requests stay bitwise
// exact beside requests that accept int4 copies in the same step, and `moectl eval` measures
// what the fallback copies cost against exact mode.
#include <sys/wait.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "cache/expert_cache.h"
#include "kernels/test_backend.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"
#include "tools/pack/pack.h"

namespace moed::model {
namespace {

namespace fs = std::filesystem;

constexpr const char* kGolden[] = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"};

struct GoldenStore {
  explicit GoldenStore(const std::string& name) {
    const char* shared = std::getenv("MOED_SHARED_DIR");
    REQUIRE(shared != nullptr);
    checkpoint = std::string(shared) + "/golden/" + name;
    dir = fs::temp_directory_path() / ("moed_precision_" + name + "_" + std::to_string(getpid()));
    fs::remove_all(dir);
    REQUIRE(tools::Pack(checkpoint, dir.string(), tools::PackOptions{}).ok());
    auto opened = cache::Store::Open(dir.string());
    REQUIRE(opened.ok());
    store = *std::move(opened);
    cases = nlohmann::json::parse(std::ifstream(checkpoint + "/cases.json"))["cases"];
  }
  ~GoldenStore() { fs::remove_all(dir); }
  // A quarter of the full copies' bytes, at least the policy's minimum.
  uint64_t QuarterBudget() const {
    const uint64_t full = cache::ExpertCache::SlotBytes(*store, cache::Precision::kSource);
    const uint64_t int4 = cache::ExpertCache::SlotBytes(*store, cache::Precision::kInt4);
    const uint64_t all =
        full * static_cast<uint64_t>(store->config().NumMoeLayers() * store->config().num_experts);
    return std::max(all / 4, 2 * (full + int4));
  }
  std::string checkpoint;
  fs::path dir;
  std::shared_ptr<cache::Store> store;
  nlohmann::json cases;
};

std::vector<float> Row(const std::vector<float>& logits, int64_t row, int64_t vocab) {
  return {logits.begin() + row * vocab, logits.begin() + (row + 1) * vocab};
}

TEST_CASE(
    "exact requests beside int4-accepting requests in the same step get bitwise exact "
    "logits") {
  for (const char* name : kGolden) {
    INFO(name);
    GoldenStore golden(name);
    const ModelConfig& config = golden.store->config();
    const int64_t vocab = config.vocab_size;
    const std::vector<int32_t> exact_prompt = golden.cases[0]["prompt"].get<std::vector<int32_t>>();
    const std::vector<int32_t> loose_prompt = golden.cases[1]["prompt"].get<std::vector<int32_t>>();
    const int steps = 6;
    auto checkpoint = Model::Load(golden.checkpoint, kernels::TestCpuBackend(2));
    REQUIRE(checkpoint.ok());
    auto expected = ScoreAndGreedy(**checkpoint, exact_prompt, steps);
    REQUIRE(expected.ok());

    cache::CacheOptions options;
    options.device_bytes = golden.QuarterBudget();
    options.precision_policy.kind = cache::PrecisionPolicyKind::kAlways;
    options.precision_policy.fallback = Precision::kInt4;
    auto made = cache::ExpertCache::Create(golden.store, options);
    REQUIRE(made.ok());
    std::shared_ptr<cache::ExpertCache> experts = *std::move(made);
    auto model = Model::Create(config, golden.store, cache::SharedProvider(experts),
                               kernels::TestCpuBackend(2));
    REQUIRE(model.ok());
    auto exact_cache = (*model)->NewKvCache(256);
    auto loose_cache = (*model)->NewKvCache(256);
    // Prefill both in one step, then decode both together: the exact one feeds the
    // reference's greedy tokens, the other its own argmax.
    std::vector<SequenceInput> step = {{exact_cache.get(), exact_prompt, true, Precision::kSource},
                                       {loose_cache.get(), loose_prompt, false, Precision::kInt4}};
    uint64_t fallbacks = 0;
    auto out = (*model)->Forward(absl::MakeSpan(step));
    REQUIRE(out.ok());
    for (const ExpertUse& use : out->expert_uses) fallbacks += use.served.fallback ? 1 : 0;
    for (size_t i = 0; i < exact_prompt.size(); ++i) {
      CHECK(Row(out->logits, static_cast<int64_t>(i), vocab) == expected->prompt_logits[i]);
    }
    int32_t loose_next = Argmax(out->logits.data() + exact_prompt.size() * vocab, vocab);
    for (int s = 0; s < steps; ++s) {
      std::vector<SequenceInput> decode = {
          {exact_cache.get(), {expected->greedy[s]}, false, Precision::kSource},
          {loose_cache.get(), {loose_next}, false, Precision::kInt4}};
      out = (*model)->Forward(absl::MakeSpan(decode));
      REQUIRE(out.ok());
      for (const ExpertUse& use : out->expert_uses) fallbacks += use.served.fallback ? 1 : 0;
      CHECK(Row(out->logits, 0, vocab) == expected->greedy_logits[s]);
      loose_next = Argmax(out->logits.data() + vocab, vocab);
    }
    // The int4 copies did run (for the other request's experts alone).
    CHECK(fallbacks > 0);
    CHECK(experts->counters().fallbacks_int4 == fallbacks);
  }
}

nlohmann::json Eval(const GoldenStore& golden, const std::string& policy_flags) {
  const fs::path prompts = golden.dir / "prompts.jsonl", out = golden.dir / "eval.out";
  {
    std::ofstream file(prompts);
    for (const auto& c : golden.cases)
      file << nlohmann::json{{"prompt_token_ids", c["prompt"]}} << "\n";
  }
  const std::string command =
      std::string("'") + MOECTL_BINARY + "' eval --store '" + golden.dir.string() +
      "' --prompts '" + prompts.string() + "' --max-tokens 16 --json --device-cache-bytes " +
      std::to_string(golden.QuarterBudget()) + " " + policy_flags + " >'" + out.string() + "'";
  int status = std::system(command.c_str());
  REQUIRE(WIFEXITED(status));
  REQUIRE(WEXITSTATUS(status) == 0);
  std::ifstream in(out);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty()) last = line;
  }
  return nlohmann::json::parse(last);
}

TEST_CASE("moectl eval: exact agrees fully, always with int8 copies agrees at least 97 percent") {
  for (const char* name : kGolden) {
    INFO(name);
    GoldenStore golden(name);
    nlohmann::json exact = Eval(golden, "--precision-policy exact");
    CHECK(exact["top1_agreement"].get<double>() == 1.0);
    CHECK(exact["kl_mean"].get<double>() == 0.0);
    CHECK(exact["greedy_agreement_tokens"].get<double>() == 16.0);
    CHECK(exact["fallbacks"].get<uint64_t>() == 0);
    // 3 prompts, each scored at every prompt position and 16 continuation positions.
    uint64_t positions = 0;
    for (const auto& c : golden.cases) positions += c["prompt"].size() + 16;
    CHECK(exact["positions"].get<uint64_t>() == positions);

    nlohmann::json int8 = Eval(golden, "--precision-policy always --fallback-precision int8");
    INFO("int8: " << int8.dump());
    CHECK(int8["fallbacks"].get<uint64_t>() > 0);
    CHECK(int8["top1_agreement"].get<double>() >= 0.97);
    CHECK(int8["kl_mean"].get<double>() > 0);

    nlohmann::json int4 = Eval(golden, "--precision-policy always --fallback-precision int4");
    INFO("int4: " << int4.dump());
    CHECK(int4["fallbacks"].get<uint64_t>() > 0);
    // Coarser copies cost more than int8's, by the same measure.
    CHECK(int4["kl_mean"].get<double>() > int8["kl_mean"].get<double>());
  }
}

}  // namespace
}  // namespace moed::model
