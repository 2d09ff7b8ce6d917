// Chat template loading (where the template comes from, named variants, special tokens) and
// the output parsers, fed real-looking model outputs in every possible chunking.
#include "model/chat_template.h"

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>

#include "model/chat_output_parser.h"
#include "tests/scratch_dir.h"

namespace moed::model {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::ordered_json;

void Write(const testing::ScratchDir& dir, const std::string& name, const std::string& text) {
  std::ofstream(dir / name, std::ios::binary) << text;
}

std::string RenderOne(const ChatTemplate& t, Json messages, Json tools = nullptr) {
  ChatTemplateInput input;
  input.messages = std::move(messages);
  input.tools = std::move(tools);
  input.add_generation_prompt = false;
  absl::StatusOr<std::string> out = t.Render(input, std::tm{});
  INFO(out.status().ToString());
  REQUIRE(out.ok());
  return *out;
}

const Json kHello = Json::parse(R"([{"role": "user", "content": "hi"}])");

TEST_CASE("chat template: tokenizer_config.json string, with its special tokens") {
  const testing::ScratchDir dir("moed-chat");
  Write(dir, "tokenizer_config.json", R"({"bos_token": {"content": "<s>", "special": true},
    "eos_token": "</s>", "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}"})");
  auto t = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(t.ok());
  REQUIRE(t->has_value());
  CHECK(RenderOne(**t, kHello) == "<s>hi</s>");
}

TEST_CASE("chat template: absent tokens stay undefined, absent template is none") {
  const testing::ScratchDir dir("moed-chat");
  Write(dir, "tokenizer_config.json",
        R"({"bos_token": null, "chat_template": "[{{ bos_token is defined }}]"})");
  auto t = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(t.ok());
  CHECK(RenderOne(**t, kHello) == "[False]");
  const testing::ScratchDir empty("moed-chat");
  Write(empty, "tokenizer_config.json", R"({"eos_token": "</s>"})");
  auto none = ChatTemplate::LoadForModel(empty.path().string(), "");
  REQUIRE(none.ok());
  CHECK(!none->has_value());
}

TEST_CASE("chat template: chat_template.jinja wins over the config, a given file over both") {
  const testing::ScratchDir dir("moed-chat");
  Write(dir, "tokenizer_config.json", R"({"chat_template": "config"})");
  Write(dir, "chat_template.jinja", "jinja file\n");
  Write(dir, "override.jinja", "override");
  auto beside = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(beside.ok());
  CHECK(RenderOne(**beside, kHello) == "jinja file");
  auto given =
      ChatTemplate::LoadForModel(dir.path().string(), (dir.path() / "override.jinja").string());
  REQUIRE(given.ok());
  CHECK(RenderOne(**given, kHello) == "override");
  CHECK((*given)->origin() == (dir.path() / "override.jinja").string());
}

TEST_CASE("chat template: named templates: tool_use serves requests with tools") {
  const testing::ScratchDir dir("moed-chat");
  Write(dir, "tokenizer_config.json", R"({"chat_template": [
    {"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools:{{ tools|length }}"}]})");
  auto t = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(t.ok());
  CHECK(RenderOne(**t, kHello) == "plain");
  CHECK(
      RenderOne(**t, kHello, Json::parse(R"([{"type": "function", "function": {"name": "f"}}])")) ==
      "tools:1");
  CHECK((*t)->names() == std::vector<std::string>{"default", "tool_use"});

  Write(dir, "tokenizer_config.json",
        R"({"chat_template": [{"name": "tool_use", "template": "tools only"}]})");
  auto tools_only = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(tools_only.ok());
  ChatTemplateInput plain;
  plain.messages = kHello;
  absl::StatusOr<std::string> refused = (*tools_only)->Render(plain, std::tm{});
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK(refused.status().message().find("no \"default\" chat template") != std::string::npos);
}

TEST_CASE("chat template: bad templates and configs are errors naming the file and line") {
  const testing::ScratchDir dir("moed-chat");
  Write(dir, "tokenizer_config.json", R"({"chat_template": "ok\n{% if %}"})");
  auto bad = ChatTemplate::LoadForModel(dir.path().string(), "");
  REQUIRE(!bad.ok());
  CHECK(bad.status().message().find("tokenizer_config.json: chat template: template line 2:") !=
        std::string::npos);
  Write(dir, "tokenizer_config.json", R"({"chat_template": 5})");
  CHECK(!ChatTemplate::LoadForModel(dir.path().string(), "").ok());
  Write(dir, "tokenizer_config.json", "{not json");
  CHECK(!ChatTemplate::LoadForModel(dir.path().string(), "").ok());
  Write(dir, "tokenizer_config.json", "{}");
  CHECK(ChatTemplate::LoadForModel(dir.path().string(), "/nonexistent.jinja").status().code() ==
        absl::StatusCode::kNotFound);
}

TEST_CASE("chat template: parser formats follow the template text unless configured") {
  auto hermes = ChatTemplate::FromSource("{{ '<tool_call>' }}{{ '<think>' }}{{ '</think>' }}", "t");
  auto mistral = ChatTemplate::FromSource("[TOOL_CALLS]", "t");
  auto plain = ChatTemplate::FromSource("plain", "t");
  REQUIRE((hermes.ok() && mistral.ok() && plain.ok()));
  CHECK(hermes->Resolve(ToolCallFormat::kAuto) == ToolCallFormat::kHermes);
  CHECK(hermes->Resolve(ReasoningFormat::kAuto) == ReasoningFormat::kThink);
  CHECK(mistral->Resolve(ToolCallFormat::kAuto) == ToolCallFormat::kMistral);
  CHECK(plain->Resolve(ToolCallFormat::kAuto) == ToolCallFormat::kNone);
  CHECK(plain->Resolve(ReasoningFormat::kAuto) == ReasoningFormat::kNone);
  CHECK(plain->Resolve(ToolCallFormat::kHermes) == ToolCallFormat::kHermes);
  CHECK(ParseToolCallFormat("mistral").value() == ToolCallFormat::kMistral);
  CHECK(!ParseToolCallFormat("xml").ok());
  CHECK(!ParseReasoningFormat("deepthink").ok());
}

TEST_CASE("chat template: a prompt that opens <think> starts the output as reasoning") {
  CHECK(PromptOpensReasoning("<｜Assistant｜><think>\n"));
  CHECK(PromptOpensReasoning("assistant\n<think>"));
  CHECK(!PromptOpensReasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
  CHECK(!PromptOpensReasoning("<|im_start|>assistant\n"));
  CHECK(!PromptOpensReasoning("<think>\nsomething"));
}

struct Expected {
  std::string content, reasoning;
  std::vector<std::pair<std::string, std::string>> calls;  // name, arguments
};

ChatDelta Parse(const ChatOutputOptions& options, const std::vector<std::string>& chunks) {
  ChatOutputParser parser(options);
  ChatDelta all;
  for (const std::string& chunk : chunks) all.Append(parser.Feed(chunk));
  all.Append(parser.Finish());
  return all;
}

// Every split into two pieces, one byte at a time, and random multi-piece splits: all must
// agree with the expectation, ids included.
void CheckEveryChunking(const ChatOutputOptions& options, const std::string& output,
                        const Expected& expected) {
  const ChatDelta whole = Parse(options, {output});
  INFO("output: " << output);
  CHECK(whole.content == expected.content);
  CHECK(whole.reasoning_content == expected.reasoning);
  REQUIRE(whole.tool_calls.size() == expected.calls.size());
  for (size_t i = 0; i < expected.calls.size(); ++i) {
    CHECK(whole.tool_calls[i].name == expected.calls[i].first);
    CHECK(whole.tool_calls[i].arguments == expected.calls[i].second);
  }
  auto same = [&](const ChatDelta& got) {
    if (got.content != whole.content || got.reasoning_content != whole.reasoning_content ||
        got.tool_calls.size() != whole.tool_calls.size())
      return false;
    for (size_t i = 0; i < got.tool_calls.size(); ++i) {
      if (got.tool_calls[i].id != whole.tool_calls[i].id ||
          got.tool_calls[i].name != whole.tool_calls[i].name ||
          got.tool_calls[i].arguments != whole.tool_calls[i].arguments)
        return false;
    }
    return true;
  };
  for (size_t cut = 0; cut <= output.size(); ++cut) {
    INFO("split at " << cut);
    CHECK(same(Parse(options, {output.substr(0, cut), output.substr(cut)})));
  }
  std::vector<std::string> bytes;
  for (char c : output) bytes.emplace_back(1, c);
  CHECK(same(Parse(options, bytes)));
  std::mt19937 rng(7);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<std::string> pieces;
    size_t at = 0;
    while (at < output.size()) {
      size_t n = std::uniform_int_distribution<size_t>(1, 6)(rng);
      pieces.push_back(output.substr(at, n));
      at += n;
    }
    CHECK(same(Parse(options, pieces)));
  }
}

TEST_CASE("output parser: Qwen3 thinking, then a Hermes tool call") {
  ChatOutputOptions options{ToolCallFormat::kHermes, ReasoningFormat::kThink, false, 42};
  CheckEveryChunking(options,
                     "<think>\nThe user wants the weather in Paris. I should call get_weather.\n"
                     "</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                     "{\"location\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>",
                     {"",
                      "The user wants the weather in Paris. I should call get_weather.",
                      {{"get_weather", R"({"location":"Paris","unit":"celsius"})"}}});
}

TEST_CASE("output parser: Qwen2.5 content then parallel Hermes calls") {
  ChatOutputOptions options{ToolCallFormat::kHermes, ReasoningFormat::kNone, false, 1};
  CheckEveryChunking(
      options,
      "Let me check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
      "{\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", "
      "\"arguments\": {\"city\": \"東京\"}}\n</tool_call>",
      {"Let me check both cities.\n",
       "",
       {{"get_weather", R"({"city":"Paris"})"}, {"get_weather", R"({"city":"東京"})"}}});
}

TEST_CASE("output parser: DeepSeek-R1 output after a prompt that opened <think>") {
  ChatOutputOptions options{ToolCallFormat::kNone, ReasoningFormat::kThink, true, 0};
  CheckEveryChunking(options,
                     "Okay, 2 + 2 is 4.\nDouble-check: yes.\n</think>\n\nThe answer is **4**.",
                     {"The answer is **4**.", "Okay, 2 + 2 is 4.\nDouble-check: yes.", {}});
}

TEST_CASE("output parser: Qwen3 with thinking off gives content only") {
  ChatOutputOptions options{ToolCallFormat::kHermes, ReasoningFormat::kThink, false, 0};
  CheckEveryChunking(options, "Paris is the capital of France. 1 < 2 and <tool isn't a tag.",
                     {"Paris is the capital of France. 1 < 2 and <tool isn't a tag.", "", {}});
}

TEST_CASE("output parser: Mistral [TOOL_CALLS] JSON list keeps the model's ids") {
  ChatOutputOptions options{ToolCallFormat::kMistral, ReasoningFormat::kNone, false, 3};
  const std::string output =
      "[TOOL_CALLS][{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}, \"id\": "
      "\"abc123xyz\"}, {\"name\": \"get_time\", \"arguments\": {}}]";
  CheckEveryChunking(options, output,
                     {"", "", {{"get_weather", R"({"city":"Paris"})"}, {"get_time", "{}"}}});
  ChatDelta got = Parse(options, {output});
  CHECK(got.tool_calls[0].id == "abc123xyz");
  REQUIRE(got.tool_calls[1].id.size() == 9);
  CHECK(std::all_of(got.tool_calls[1].id.begin(), got.tool_calls[1].id.end(),
                    [](char c) { return std::isalnum(static_cast<unsigned char>(c)); }));
}

TEST_CASE("output parser: Mistral's name[ARGS]{...} form") {
  ChatOutputOptions options{ToolCallFormat::kMistral, ReasoningFormat::kNone, false, 3};
  CheckEveryChunking(
      options, "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Paris\"}[TOOL_CALLS]get_time[ARGS]{}",
      {"", "", {{"get_weather", R"({"city":"Paris"})"}, {"get_time", "{}"}}});
}

TEST_CASE("output parser: a call that does not parse comes back as content") {
  ChatOutputOptions hermes{ToolCallFormat::kHermes, ReasoningFormat::kNone, false, 0};
  CheckEveryChunking(hermes, "Sure.\n<tool_call>\n{\"name\": oops}\n</tool_call>",
                     {"Sure.\n<tool_call>\n{\"name\": oops}\n</tool_call>", "", {}});
  CheckEveryChunking(hermes, "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}",
                     {"", "", {{"f", R"({"a":1})"}}});  // ended at EOS without the closing tag
  ChatOutputOptions mistral{ToolCallFormat::kMistral, ReasoningFormat::kNone, false, 0};
  CheckEveryChunking(mistral, "[TOOL_CALLS][{\"name\": ", {"[TOOL_CALLS][{\"name\": ", "", {}});
}

TEST_CASE("output parser: ids differ per call and follow the seed") {
  ChatOutputOptions options{ToolCallFormat::kHermes, ReasoningFormat::kNone, false, 9};
  const std::string two =
      "<tool_call>{\"name\": \"a\"}</tool_call><tool_call>{\"name\": \"b\"}</tool_call>";
  ChatDelta first = Parse(options, {two});
  REQUIRE(first.tool_calls.size() == 2);
  CHECK(first.tool_calls[0].id != first.tool_calls[1].id);
  CHECK(first.tool_calls[0].id.rfind("call_", 0) == 0);
  CHECK(first.tool_calls[0].id.size() == 29);
  options.id_seed = 10;
  CHECK(Parse(options, {two}).tool_calls[0].id != first.tool_calls[0].id);
}

}  // namespace
}  // namespace moed::model
