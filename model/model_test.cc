// The forward pass on synthesized checkpoints: loading in every dtype and layout, batch
// invariance, prefill/decode agreement and refusal of bad input.
#include "model/model.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>

#include "kernels/test_backend.h"
#include "model/generate.h"
#include "tests/scratch_dir.h"
#include "tools/reencode/reencode.h"
#include "tools/synth/synthesizer.h"

namespace moed::model {
namespace {

namespace fs = std::filesystem;

fs::path Synthesize(const fs::path& root, Architecture arch, const std::string& name) {
  auto spec = tools::PresetSpec("tiny", arch);
  REQUIRE(spec.ok());
  fs::path out = root / name;
  REQUIRE(tools::WriteCheckpoint(*spec, out.string()).ok());
  return out;
}

GreedyResult Run(const fs::path& dir, const std::vector<int32_t>& prompt, int steps) {
  auto model = Model::Load(dir.string(), kernels::TestCpuBackend(2));
  INFO(model.status().ToString());
  REQUIRE(model.ok());
  auto result = ScoreAndGreedy(**model, prompt, steps);
  REQUIRE(result.ok());
  return *std::move(result);
}

const std::vector<int32_t> kPrompt = {5, 300, 17, 42, 99, 7, 256};

TEST_CASE("fp32 and sharded copies give bitwise the same logits, fp16 nearly") {
  const testing::ScratchDir tmp("moed_model_test");
  for (Architecture arch :
       {Architecture::kMixtral, Architecture::kQwen2Moe, Architecture::kQwen3Moe,
        Architecture::kOlmoe, Architecture::kDeepseekV2, Architecture::kDeepseekV3}) {
    INFO(ArchitectureShortName(arch));
    std::string name(ArchitectureShortName(arch));
    fs::path source = Synthesize(tmp.path(), arch, name);
    GreedyResult reference = Run(source, kPrompt, 4);

    tools::ReencodeOptions f32{kernels::DType::kF32, 1};
    REQUIRE(tools::Reencode(source.string(), (tmp.path() / (name + "-f32")).string(), f32).ok());
    tools::ReencodeOptions shards{kernels::DType::kBF16, 3};
    REQUIRE(
        tools::Reencode(source.string(), (tmp.path() / (name + "-sharded")).string(), shards).ok());
    CHECK(fs::exists(tmp.path() / (name + "-sharded") / "model-00003-of-00003.safetensors"));
    CHECK(fs::exists(tmp.path() / (name + "-sharded") / "model.safetensors.index.json"));
    for (const char* variant : {"-f32", "-sharded"}) {
      GreedyResult other = Run(tmp.path() / (name + variant), kPrompt, 4);
      CHECK(other.prompt_logits == reference.prompt_logits);  // bf16 widens exactly
      CHECK(other.greedy_logits == reference.greedy_logits);
      CHECK(other.greedy == reference.greedy);
    }

    tools::ReencodeOptions f16{kernels::DType::kF16, 1};
    REQUIRE(tools::Reencode(source.string(), (tmp.path() / (name + "-f16")).string(), f16).ok());
    GreedyResult half = Run(tmp.path() / (name + "-f16"), kPrompt, 0);
    double worst = 0;
    for (size_t r = 0; r < half.prompt_logits.size(); ++r) {
      for (size_t i = 0; i < half.prompt_logits[r].size(); ++i) {
        worst = std::max(
            worst, double(std::abs(half.prompt_logits[r][i] - reference.prompt_logits[r][i])));
      }
    }
    CHECK(worst < 1e-4);  // only bf16 values too small for fp16's normal range move
  }
}

TEST_CASE("prefill and token-by-token decode agree bitwise, so do batched sequences") {
  const testing::ScratchDir tmp("moed_model_test");
  fs::path dir = Synthesize(tmp.path(), Architecture::kQwen3Moe, "qwen3");
  auto model = Model::Load(dir.string(), kernels::TestCpuBackend(2));
  REQUIRE(model.ok());
  const int64_t vocab = (*model)->config().vocab_size;

  KvCache prefill_cache((*model)->backend().device(), (*model)->config(), 16);
  SequenceInput prefill{&prefill_cache, kPrompt, true};
  auto all = (*model)->Forward(absl::MakeSpan(&prefill, 1));
  REQUIRE(all.ok());

  KvCache decode_cache((*model)->backend().device(), (*model)->config(), 16);
  for (size_t i = 0; i < kPrompt.size(); ++i) {
    SequenceInput one{&decode_cache, {kPrompt[i]}, false};
    auto out = (*model)->Forward(absl::MakeSpan(&one, 1));
    REQUIRE(out.ok());
    std::vector<float> expected(all->logits.begin() + i * vocab,
                                all->logits.begin() + (i + 1) * vocab);
    CHECK(out->logits == expected);
  }

  // Two sequences in one step, at different positions, each as if alone.
  KvCache a((*model)->backend().device(), (*model)->config(), 16),
      b((*model)->backend().device(), (*model)->config(), 16);
  std::vector<SequenceInput> batch = {{&a, {1, 2, 3}, false}, {&b, {9}, false}};
  auto together = (*model)->Forward(absl::MakeSpan(batch));
  REQUIRE(together.ok());
  REQUIRE(together->rows == 2);
  KvCache a_alone((*model)->backend().device(), (*model)->config(), 16),
      b_alone((*model)->backend().device(), (*model)->config(), 16);
  SequenceInput sa{&a_alone, {1, 2, 3}, false}, sb{&b_alone, {9}, false};
  auto ra = (*model)->Forward(absl::MakeSpan(&sa, 1));
  auto rb = (*model)->Forward(absl::MakeSpan(&sb, 1));
  CHECK(std::vector<float>(together->logits.begin(), together->logits.begin() + vocab) ==
        ra->logits);
  CHECK(std::vector<float>(together->logits.begin() + vocab, together->logits.end()) == rb->logits);
  REQUIRE(together->routing.size() == 3);
  CHECK(together->routing[0].size() == 4);     // one entry per token of the step
  CHECK(together->routing[0][0].size() == 4);  // top-4 in the tiny qwen3 shape
}

TEST_CASE("bad tokens and a full context are refused and change nothing") {
  const testing::ScratchDir tmp("moed_model_test");
  fs::path dir = Synthesize(tmp.path(), Architecture::kMixtral, "mixtral");
  auto model = Model::Load(dir.string(), kernels::TestCpuBackend(1));
  REQUIRE(model.ok());
  KvCache cache((*model)->backend().device(), (*model)->config(), 4);
  SequenceInput bad{&cache, {1, 512}, false};
  auto out = (*model)->Forward(absl::MakeSpan(&bad, 1));
  CHECK(out.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(out.status().message() == "token id 512 is outside the vocabulary of 512");
  CHECK(cache.length() == 0);
  SequenceInput too_long{&cache, {1, 2, 3, 4, 5}, false};
  CHECK((*model)->Forward(absl::MakeSpan(&too_long, 1)).status().code() ==
        absl::StatusCode::kOutOfRange);
  CHECK(cache.length() == 0);
  CHECK_FALSE(ScoreAndGreedy(**model, {1}, 300).ok());  // over max_position_embeddings
}

TEST_CASE("corrupt and truncated checkpoints give errors naming the file and the problem") {
  const testing::ScratchDir tmp("moed_model_test");
  fs::path dir = Synthesize(tmp.path(), Architecture::kMixtral, "mixtral");
  fs::path weights = dir / "model.safetensors";

  SECTION("truncated weights") {
    fs::resize_file(weights, fs::file_size(weights) - 1000);
    auto model = Model::Load(dir.string(), kernels::TestCpuBackend());
    CHECK(model.status().code() == absl::StatusCode::kDataLoss);
    CHECK(model.status().message().find(weights.string()) != std::string::npos);
    CHECK(model.status().message().find("truncated") != std::string::npos);
  }
  SECTION("a shape that disagrees with config.json") {
    std::ifstream in(dir / "config.json");
    std::string config((std::istreambuf_iterator<char>(in)), {});
    size_t at = config.find("\"intermediate_size\": 128");
    REQUIRE(at != std::string::npos);
    config.replace(at, 24, "\"intermediate_size\": 64");
    std::ofstream(dir / "config.json") << config;
    auto model = Model::Load(dir.string(), kernels::TestCpuBackend());
    CHECK(model.status().message() ==
          weights.string() +
              ": tensor model.layers.0.block_sparse_moe.experts.0.w1.weight has shape "
              "[128, 64], but config.json implies [64, 64]");
  }
  SECTION("garbage instead of a header") {
    std::ofstream(weights, std::ios::binary | std::ios::in | std::ios::out)
        .write("\x10\0\0\0\0\0\0\0not json at all!", 24);
    auto model = Model::Load(dir.string(), kernels::TestCpuBackend());
    CHECK_FALSE(model.ok());
    CHECK(model.status().message().find(weights.string()) != std::string::npos);
  }
  SECTION("an index naming a file that is not there") {
    fs::path sharded = tmp.path() / "sharded";
    REQUIRE(tools::Reencode(dir.string(), sharded.string(), {kernels::DType::kBF16, 2}).ok());
    fs::remove(sharded / "model-00002-of-00002.safetensors");
    auto model = Model::Load(sharded.string(), kernels::TestCpuBackend());
    CHECK(model.status().code() == absl::StatusCode::kNotFound);
    CHECK(model.status().message().find("model-00002-of-00002.safetensors") != std::string::npos);
  }
  SECTION("no weights at all") {
    fs::remove(weights);
    CHECK(Model::Load(dir.string(), kernels::TestCpuBackend()).status().message() ==
          dir.string() + ": no *.safetensors files");
  }
}

}  // namespace
}  // namespace moed::model
