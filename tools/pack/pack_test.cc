// moed-pack and the store reader: exact logits from the source precision, deterministic
// bytes, and clear errors for corrupt, truncated or malformed stores.
#include "tools/pack/pack.h"

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>

#include "cache/expert_cache.h"
#include "cache/store_reader.h"
#include "kernels/test_backend.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"
#include "tests/scratch_dir.h"
#include "tools/synth/synthesizer.h"
#include "xxhash.h"

namespace moed::tools {
namespace {

namespace fs = std::filesystem;

std::string ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

const std::vector<int32_t> kPrompt = {3, 77, 410, 12, 9};

model::GreedyResult FromStore(const fs::path& store_dir, cache::Precision precision) {
  auto store = cache::Store::Open(store_dir.string());
  INFO(store.status().ToString());
  REQUIRE(store.ok());
  cache::CacheOptions options;
  options.precision = precision;  // the default budget holds every expert
  auto experts = cache::ExpertCache::Create(*store, options);
  REQUIRE(experts.ok());
  auto model = model::Model::Create((*store)->config(), *store, *std::move(experts),
                                    kernels::TestCpuBackend(2));
  REQUIRE(model.ok());
  auto result = model::ScoreAndGreedy(**model, kPrompt, 4);
  REQUIRE(result.ok());
  return *std::move(result);
}

double MaxDiff(const model::GreedyResult& a, const model::GreedyResult& b) {
  double worst = 0;
  for (size_t r = 0; r < a.prompt_logits.size(); ++r) {
    for (size_t i = 0; i < a.prompt_logits[r].size(); ++i) {
      worst = std::max(worst, double(std::abs(a.prompt_logits[r][i] - b.prompt_logits[r][i])));
    }
  }
  return worst;
}

TEST_CASE(
    "a store's source precision gives bitwise the checkpoint's logits, int8 and int4 stay close") {
  const testing::ScratchDir tmp("moed_pack_test");
  for (auto arch : {model::Architecture::kMixtral, model::Architecture::kQwen2Moe,
                    model::Architecture::kQwen3Moe, model::Architecture::kOlmoe,
                    model::Architecture::kDeepseekV2, model::Architecture::kDeepseekV3}) {
    std::string name(model::ArchitectureShortName(arch));
    INFO(name);
    fs::path checkpoint = tmp.path() / name;
    REQUIRE(WriteCheckpoint(*PresetSpec("tiny", arch), checkpoint.string()).ok());
    fs::path store = tmp.path() / (name + "-store");
    REQUIRE(Pack(checkpoint.string(), store.string(), PackOptions{}).ok());

    auto model = model::Model::Load(checkpoint.string(), kernels::TestCpuBackend(2));
    REQUIRE(model.ok());
    auto reference = model::ScoreAndGreedy(**model, kPrompt, 4);
    REQUIRE(reference.ok());

    model::GreedyResult exact = FromStore(store, cache::Precision::kSource);
    CHECK(exact.prompt_logits == reference->prompt_logits);
    CHECK(exact.greedy_logits == reference->greedy_logits);
    CHECK(exact.greedy == reference->greedy);

    double int8_error = MaxDiff(FromStore(store, cache::Precision::kInt8), *reference);
    double int4_error = MaxDiff(FromStore(store, cache::Precision::kInt4), *reference);
    INFO("int8 " << int8_error << ", int4 " << int4_error);
    CHECK(int8_error > 0);
    CHECK(int8_error < int4_error);  // more bits, less error
    CHECK(int4_error < 0.5);
  }
}

TEST_CASE("packing is deterministic, atomic and refuses to overwrite") {
  const testing::ScratchDir tmp("moed_pack_test");
  fs::path checkpoint = tmp.path() / "m";
  REQUIRE(WriteCheckpoint(*PresetSpec("tiny", model::Architecture::kMixtral), checkpoint.string())
              .ok());
  REQUIRE(Pack(checkpoint.string(), (tmp.path() / "a").string(), PackOptions{}).ok());
  REQUIRE(Pack(checkpoint.string(), (tmp.path() / "b").string(), PackOptions{}).ok());
  for (const char* file :
       {"manifest.json", "dense.bin", "experts.bin", "config.json", "tokenizer.json"}) {
    CHECK(ReadFile(tmp.path() / "a" / file) == ReadFile(tmp.path() / "b" / file));
  }
  CHECK(Pack(checkpoint.string(), (tmp.path() / "a").string(), PackOptions{}).code() ==
        absl::StatusCode::kAlreadyExists);
  // A failed pack (no such checkpoint) leaves nothing behind.
  CHECK_FALSE(
      Pack((tmp.path() / "missing").string(), (tmp.path() / "c").string(), PackOptions{}).ok());
  for (const auto& entry : fs::directory_iterator(tmp.path())) {
    CHECK(entry.path().filename().string().find(".tmp-") == std::string::npos);
    CHECK(entry.path().filename() != "c");
  }
  // Every blob is aligned for O_DIRECT.
  auto store = cache::Store::Open((tmp.path() / "a").string());
  REQUIRE(store.ok());
  for (const cache::BlobEntry& blob : (*store)->manifest().blobs) CHECK(blob.offset % 4096 == 0);
  CHECK((*store)->manifest().blobs.size() == size_t{2} * 8 * 3);  // layers x experts x precisions
}

TEST_CASE("a store takes the checkpoint's serving files and nothing else beside its weights") {
  const testing::ScratchDir tmp("moed_pack_test");
  fs::path checkpoint = tmp.path() / "m";
  REQUIRE(WriteCheckpoint(*PresetSpec("tiny", model::Architecture::kMixtral), checkpoint.string())
              .ok());
  // What sits beside a downloaded checkpoint: its template and generation config, and files
  // serving never reads (another format's weights, a model card, a directory).
  std::ofstream(checkpoint / "chat_template.jinja") << "{{ messages[0].content }}";
  std::ofstream(checkpoint / "generation_config.json") << R"({"temperature": 0.6})";
  std::ofstream(checkpoint / "model-q4.gguf") << std::string(1 << 16, 'w');
  std::ofstream(checkpoint / "README.md") << "# a model card";
  fs::create_directories(checkpoint / "original");
  REQUIRE(Pack(checkpoint.string(), (tmp.path() / "s").string(), PackOptions{}).ok());
  for (const char* file :
       {"config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"}) {
    INFO(file);
    CHECK(ReadFile(tmp.path() / "s" / file) == ReadFile(checkpoint / file));
  }
  CHECK_FALSE(fs::exists(tmp.path() / "s" / "model-q4.gguf"));
  CHECK_FALSE(fs::exists(tmp.path() / "s" / "README.md"));
  CHECK_FALSE(fs::exists(tmp.path() / "s" / "original"));
}

TEST_CASE("corrupt and truncated stores fail with errors that say where") {
  const testing::ScratchDir tmp("moed_pack_test");
  fs::path checkpoint = tmp.path() / "m";
  REQUIRE(WriteCheckpoint(*PresetSpec("tiny", model::Architecture::kMixtral), checkpoint.string())
              .ok());
  fs::path store = tmp.path() / "s";
  REQUIRE(
      Pack(checkpoint.string(), store.string(), PackOptions{{cache::Precision::kSource}, 64}).ok());
  auto opened = cache::Store::Open(store.string());
  REQUIRE(opened.ok());
  const cache::BlobEntry blob = *(*opened)->manifest().FindBlob(1, 5, cache::Precision::kSource);
  opened->reset();

  SECTION("a flipped byte in an expert blob") {
    {
      std::fstream file(store / "experts.bin", std::ios::in | std::ios::out | std::ios::binary);
      file.seekp(static_cast<std::streamoff>(blob.offset + 100));
      file.put('\x5A');
    }
    auto s = cache::Store::Open(store.string());
    REQUIRE(s.ok());  // expert blobs are verified when read, not at open
    auto cache = cache::ExpertCache::Create(*s, cache::CacheOptions{});
    REQUIRE(cache.ok());
    auto model =
        model::Model::Create((*s)->config(), *s, *std::move(cache), kernels::TestCpuBackend(1));
    REQUIRE(model.ok());
    // Token 0 of every layer needs some expert; run until the damaged one is read.
    absl::Status failure;
    for (int32_t token = 0; token < 512 && failure.ok(); ++token) {
      failure = model::ScoreAndGreedy(**model, {token}, 0).status();
    }
    CHECK(failure.code() == absl::StatusCode::kDataLoss);
    CHECK(failure.message() == "layer 1 expert 5 (source): checksum mismatch in " +
                                   (store / "experts.bin").string() + " at offset " +
                                   std::to_string(blob.offset));
  }
  SECTION("a truncated experts.bin") {
    fs::resize_file(store / "experts.bin", fs::file_size(store / "experts.bin") - 4096);
    auto s = cache::Store::Open(store.string());
    CHECK(s.status().code() == absl::StatusCode::kDataLoss);
    CHECK(s.status().message().find("truncated") != std::string::npos);
  }
  SECTION("a corrupt dense tensor") {
    {
      std::fstream file(store / "dense.bin", std::ios::in | std::ios::out | std::ios::binary);
      file.seekp(10);
      file.put('\x01');
    }
    auto s = cache::Store::Open(store.string());
    CHECK(s.status().code() == absl::StatusCode::kDataLoss);
    CHECK(s.status().message().find("fails its checksum") != std::string::npos);
  }
  SECTION("a precision the store was not packed with") {
    auto s = cache::Store::Open(store.string());
    REQUIRE(s.ok());
    cache::CacheOptions int4;
    int4.precision = cache::Precision::kInt4;
    CHECK(cache::ExpertCache::Create(*s, int4).status().message().find("has no int4 blobs") !=
          std::string::npos);
  }
  SECTION("a damaged manifest") {
    std::string manifest = ReadFile(store / "manifest.json");
    std::string aligned = "\"offset\": " + std::to_string(blob.offset);
    size_t at = manifest.find(aligned);
    REQUIRE(at != std::string::npos);
    manifest.replace(at, aligned.size(), "\"offset\": " + std::to_string(blob.offset + 8));
    std::ofstream(store / "manifest.json") << manifest;
    auto s = cache::Store::Open(store.string());
    CHECK(s.status().code() == absl::StatusCode::kDataLoss);
    CHECK(s.status().message().find("does not match its checksum") != std::string::npos);
    std::ofstream(store / "manifest.json") << "{\"format\": \"moed-store\", \"version\": 9}";
    CHECK(
        cache::Store::Open(store.string()).status().message().find("version 9 is not supported") !=
        std::string::npos);
  }
}

// Rewrites the store's manifest through `edit` and seals it with a fresh checksum (xxh64 of the
// JSON as moed-pack writes it, one-space indent, without the checksum field), so that the
// checks behind the checksum are reached.
void EditManifest(const fs::path& store, const std::function<void(nlohmann::ordered_json&)>& edit) {
  auto root = nlohmann::ordered_json::parse(ReadFile(store / "manifest.json"));
  edit(root);
  root.erase("checksum");
  const std::string text = root.dump(1) + "\n";
  char hex[17];
  std::snprintf(hex, sizeof(hex), "%016llx",
                static_cast<unsigned long long>(XXH64(text.data(), text.size(), 0)));
  root["checksum"] = hex;
  std::ofstream(store / "manifest.json") << root.dump(1) << "\n";
}

TEST_CASE("manifests whose fields lie are refused with a Status, never a crash or a wild read") {
  const testing::ScratchDir tmp("moed_pack_test");
  fs::path checkpoint = tmp.path() / "m";
  REQUIRE(WriteCheckpoint(*PresetSpec("tiny", model::Architecture::kMixtral), checkpoint.string())
              .ok());
  fs::path store = tmp.path() / "s";
  REQUIRE(Pack(checkpoint.string(), store.string(), PackOptions{}).ok());
  const std::string original = ReadFile(store / "manifest.json");
  auto refused = [&](const std::function<void(nlohmann::ordered_json&)>& edit) {
    std::ofstream(store / "manifest.json") << original;
    EditManifest(store, edit);
    return cache::Store::Open(store.string()).status();
  };
  // The edit with nothing changed is accepted: the seal is the one moed-pack writes.
  CHECK(refused([](nlohmann::ordered_json&) {}).ok());
  SECTION("a field of the wrong type") {
    absl::Status s = refused([](nlohmann::ordered_json& m) { m["format"] = 5; });
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(s.message().find("\"format\" is not \"moed-store\"") != std::string::npos);
    s = refused([](nlohmann::ordered_json& m) { m["layouts"]["source"]["gate"]["rows"] = "32"; });
    CHECK(s.message().find("\"rows\" must be a non-negative integer") != std::string::npos);
  }
  SECTION("a matrix offset that wraps around 2^64") {
    absl::Status s = refused([](nlohmann::ordered_json& m) {
      auto& gate = m["layouts"]["int8"]["gate"];
      gate["offset"] = ~uint64_t{0} - gate["bytes"].get<uint64_t>() + 2;
    });
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(s.message().find("layout int8 gate: lies outside the blob") != std::string::npos);
  }
  SECTION("matrices whose shapes are not the config's") {
    // Half the rows, with byte counts to match: consistent in itself, wrong for the model.
    absl::Status s = refused([](nlohmann::ordered_json& m) {
      auto& down = m["layouts"]["source"]["down"];
      down["rows"] = down["rows"].get<uint64_t>() / 2;
      down["bytes"] = down["bytes"].get<uint64_t>() / 2;
    });
    CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    CHECK(s.message().find("layout source down is [") != std::string::npos);
    CHECK(s.message().find("but the config implies") != std::string::npos);
  }
  SECTION("a blob listed for an expert the model does not have") {
    absl::Status s =
        refused([](nlohmann::ordered_json& m) { m["experts"]["blobs"][0]["expert"] = 1000; });
    CHECK(s.message().find("is outside the model") != std::string::npos);
  }
}

}  // namespace
}  // namespace moed::tools
