#include "tools/synth/synthesizer.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "model/chat_template.h"
#include "model/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tests/scratch_dir.h"

namespace moed::tools {
namespace {

namespace fs = std::filesystem;

std::string ReadFile(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

// Parses a safetensors file independently of the writer: u64 LE header length, JSON header,
// then the data.
nlohmann::json SafetensorsHeader(const std::string& bytes) {
  REQUIRE(bytes.size() >= 8);
  uint64_t length = 0;
  for (int i = 0; i < 8; ++i) length |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  REQUIRE(8 + length <= bytes.size());
  CHECK((8 + length) % 8 == 0);
  return nlohmann::json::parse(bytes.substr(8, length));
}

TEST_CASE("every architecture's tiny checkpoint is complete and consistent") {
  const testing::ScratchDir scratch("moed_synth_test");
  const fs::path& root = scratch.path();
  for (auto arch : {model::Architecture::kMixtral, model::Architecture::kQwen2Moe,
                    model::Architecture::kQwen3Moe, model::Architecture::kOlmoe,
                    model::Architecture::kDeepseekV2, model::Architecture::kDeepseekV3}) {
    INFO(model::ArchitectureShortName(arch));
    SynthSpec spec = *PresetSpec("tiny", arch);
    const bool deepseek = model::IsDeepseek(arch);
    fs::path out = root / std::string(model::ArchitectureShortName(arch));
    REQUIRE(WriteCheckpoint(spec, out.string()).ok());

    auto config = model::LoadModelConfig(out.string());
    REQUIRE(config.ok());
    CHECK(config->architecture == arch);
    CHECK(config->num_experts == spec.num_experts);
    CHECK(config->expert_intermediate_size == spec.expert_intermediate_size);
    // DeepSeek's shared experts are n_shared_experts of the routed experts' width.
    CHECK(config->shared_expert_intermediate_size ==
          (deepseek ? spec.n_shared_experts * spec.expert_intermediate_size
                    : spec.shared_expert_intermediate_size));
    CHECK(config->uses_mla() == deepseek);
    CHECK(config->norm_topk_prob == (arch == model::Architecture::kMixtral || spec.norm_topk_prob));

    std::string bytes = ReadFile(out / "model.safetensors");
    nlohmann::json header = SafetensorsHeader(bytes);
    uint64_t header_end = 8;
    for (int i = 0; i < 8; ++i) header_end += uint64_t(uint8_t(bytes[i])) << (8 * i);
    std::vector<TensorSpec> tensors = CheckpointTensors(spec);
    CHECK(header.size() == tensors.size() + 1);  // plus __metadata__
    uint64_t expected_offset = 0;
    for (const TensorSpec& tensor : tensors) {
      const auto& entry = header[tensor.name];
      CHECK(entry["dtype"] == "BF16");
      CHECK(entry["shape"].get<std::vector<int64_t>>() == tensor.shape);
      CHECK(entry["data_offsets"][0] == expected_offset);
      expected_offset += tensor.NumBytes();
      CHECK(entry["data_offsets"][1] == expected_offset);
    }
    CHECK(bytes.size() == header_end + expected_offset);
    std::string expert = arch == model::Architecture::kMixtral
                             ? "model.layers.1.block_sparse_moe.experts.7.w2.weight"
                             : "model.layers.1.mlp.experts.7.down_proj.weight";
    CHECK(header.contains(expert));

    auto tokenizer = nlohmann::json::parse(ReadFile(out / "tokenizer.json"));
    int64_t learned = static_cast<int64_t>(tokenizer["model"]["vocab"].size());
    int64_t eos = tokenizer["added_tokens"][0]["id"];
    CHECK(eos == learned);
    CHECK(learned + static_cast<int64_t>(tokenizer["added_tokens"].size()) <= spec.vocab_size);
    CHECK(config->eos_token_ids == std::vector<int64_t>{eos});
    CHECK(fs::exists(out / "tokenizer_config.json"));
    CHECK(fs::exists(out / "generation_config.json"));
  }
  // No temporary directory is left beside the outputs.
  for (const auto& entry : fs::directory_iterator(root)) {
    CHECK(entry.path().filename().string().find(".tmp-") == std::string::npos);
  }
}

TEST_CASE("the same seed gives the same bytes, another seed other weights") {
  const testing::ScratchDir scratch("moed_synth_test");
  const fs::path& root = scratch.path();
  SynthSpec spec = *PresetSpec("tiny", model::Architecture::kMixtral);
  REQUIRE(WriteCheckpoint(spec, (root / "a").string()).ok());
  REQUIRE(WriteCheckpoint(spec, (root / "b").string()).ok());
  spec.seed = 1;
  REQUIRE(WriteCheckpoint(spec, (root / "c").string()).ok());
  for (const char* file : {"model.safetensors", "tokenizer.json", "config.json"}) {
    CHECK(ReadFile(root / "a" / file) == ReadFile(root / "b" / file));
  }
  CHECK(ReadFile(root / "a" / "model.safetensors") != ReadFile(root / "c" / "model.safetensors"));
  CHECK(ReadFile(root / "a" / "tokenizer.json") == ReadFile(root / "c" / "tokenizer.json"));

  absl::Status again = WriteCheckpoint(spec, (root / "a").string());
  CHECK(again.code() == absl::StatusCode::kAlreadyExists);
}

TEST_CASE("weights have the intended scale") {
  const testing::ScratchDir scratch("moed_synth_test");
  const fs::path& root = scratch.path();
  SynthSpec spec = *PresetSpec("tiny", model::Architecture::kMixtral);
  spec.dtype = DType::kF32;
  REQUIRE(WriteCheckpoint(spec, (root / "f32").string()).ok());
  std::string bytes = ReadFile(root / "f32" / "model.safetensors");
  nlohmann::json header = SafetensorsHeader(bytes);
  uint64_t data = 8;
  for (int i = 0; i < 8; ++i) data += uint64_t(uint8_t(bytes[i])) << (8 * i);
  auto stats = [&](const std::string& name) {
    const auto& entry = header[name];
    CHECK(entry["dtype"] == "F32");
    uint64_t begin = entry["data_offsets"][0], end = entry["data_offsets"][1];
    double sum = 0, sum2 = 0;
    size_t n = (end - begin) / 4;
    for (size_t i = 0; i < n; ++i) {
      float v;
      std::memcpy(&v, bytes.data() + data + begin + 4 * i, 4);
      sum += v;
      sum2 += double(v) * v;
    }
    double mean = sum / n;
    return std::pair{mean, std::sqrt(sum2 / n - mean * mean)};
  };
  auto [embed_mean, embed_std] = stats("model.embed_tokens.weight");  // 32768 draws
  CHECK(std::abs(embed_mean) < 0.001);
  CHECK(embed_std == Approx(0.02).epsilon(0.03));
  auto [norm_mean, norm_std] = stats("model.norm.weight");
  CHECK(norm_mean == Approx(1.0).epsilon(0.05));
  auto [router_mean, router_std] = stats("model.layers.0.block_sparse_moe.gate.weight");
  CHECK(router_std == Approx(0.2).epsilon(0.1));
}

TEST_CASE("impossible specs are refused") {
  SynthSpec spec;
  spec.num_key_value_heads = 3;
  CHECK_FALSE(ValidateSpec(spec).ok());
  spec = SynthSpec{};
  spec.experts_per_token = 9;
  CHECK_FALSE(ValidateSpec(spec).ok());
  spec = SynthSpec{};
  spec.shared_expert_intermediate_size = 64;  // Mixtral has no shared expert
  CHECK_FALSE(ValidateSpec(spec).ok());
  CHECK_FALSE(PresetSpec("huge", model::Architecture::kMixtral).ok());
}

TEST_CASE("the demo chat template renders ChatML with Hermes tool calls") {
  const testing::ScratchDir scratch("moed_synth_test");
  const fs::path root = scratch / "chat";
  SynthSpec spec = *PresetSpec("tiny", model::Architecture::kMixtral);
  REQUIRE(WriteCheckpoint(spec, root.string()).ok());
  auto loaded = model::ChatTemplate::LoadForModel(root.string(), "");
  REQUIRE(loaded.ok());
  REQUIRE(loaded->has_value());
  const model::ChatTemplate& chat = **loaded;
  CHECK(chat.Resolve(model::ToolCallFormat::kAuto) == model::ToolCallFormat::kHermes);
  CHECK(chat.Resolve(model::ReasoningFormat::kAuto) == model::ReasoningFormat::kNone);

  model::ChatTemplateInput input;
  input.messages = nlohmann::ordered_json::parse(R"([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
      "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}])");
  input.tools = nlohmann::ordered_json::parse(R"([{"type": "function", "function":
    {"name": "get_weather", "parameters": {"type": "object"}}}])");
  absl::StatusOr<std::string> prompt = chat.Render(input, std::tm{});
  INFO(prompt.status().ToString());
  REQUIRE(prompt.ok());
  CHECK(*prompt ==
        "<|im_start|>system\nBe brief.\n\nYou can call these functions. Their signatures are "
        "listed in <tools></tools>:\n<tools>\n{\"name\": \"get_weather\", \"parameters\": "
        "{\"type\": \"object\"}}\n</tools>\n\nTo call one, reply with a JSON object inside "
        "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
        "{\"city\": \"Oslo\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n");

  input.tools = nullptr;
  input.messages = nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi"}])");
  prompt = chat.Render(input, std::tm{});
  REQUIRE(prompt.ok());
  CHECK(*prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
  auto tokenizer = model::Tokenizer::FromFile((root / "tokenizer.json").string());
  REQUIRE(tokenizer.ok());
  auto ids = (*tokenizer)->Encode(*prompt);
  REQUIRE(ids.ok());
  CHECK((*tokenizer)->IsSpecial(ids->front()));  // <|im_start|> is one special token

  input.messages = nlohmann::ordered_json::parse(R"([{"role": "robot", "content": "x"}])");
  CHECK(chat.Render(input, std::tm{}).status().message() == "Unexpected message role: robot");
}

}  // namespace
}  // namespace moed::tools
