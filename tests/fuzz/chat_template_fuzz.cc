// libFuzzer target: a chat template, optionally followed by "\n#context#\n" and a JSON object
// of variables (else a conversation with tools, tool calls and reasoning). Whatever the
// bytes, parsing and rendering end in a value or a Status, within the limits, the same way
// twice.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "model/jinja.h"

namespace {

constexpr char kSeparator[] = "\n#context#\n";

const nlohmann::ordered_json& DefaultContext() {
  static const nlohmann::ordered_json context = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are helpful."},
      {"role": "user", "content": "Weather in Paris? {{ x }} <|im_end|>\u00a0"},
      {"role": "assistant", "content": null, "reasoning_content": "Need a tool.",
       "tool_calls": [{"id": "abc123xyz", "type": "function",
                       "function": {"name": "get_weather", "arguments": {"city": "Paris", "n": 2.5}}}]},
      {"role": "tool", "tool_call_id": "abc123xyz", "name": "get_weather", "content": "{\"t\": 21}"},
      {"role": "assistant", "content": "<think>hm</think>It is 21 °C."},
      {"role": "user", "content": [{"type": "text", "text": "thanks"}]}
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "d",
               "parameters": {"type": "object", "properties": {"city": {"type": "string",
               "enum": ["Paris", "Oslo"]}, "n": {"type": ["number", "null"]}},
               "required": ["city"]}}}],
    "documents": null, "add_generation_prompt": true, "bos_token": "<s>", "eos_token": "</s>",
    "enable_thinking": false, "builtin_tools": ["browser"], "reasoning_effort": "high"})");
  return context;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string input(reinterpret_cast<const char*>(data), size);
  std::string source = input;
  nlohmann::ordered_json context = DefaultContext();
  if (size_t at = input.find(kSeparator); at != std::string::npos) {
    source = input.substr(0, at);
    auto parsed =
        nlohmann::ordered_json::parse(input.substr(at + sizeof(kSeparator) - 1), nullptr, false);
    if (!parsed.is_discarded() && parsed.is_object()) context = std::move(parsed);
  }
  absl::StatusOr<moed::model::JinjaTemplate> parsed = moed::model::JinjaTemplate::Parse(source);
  if (!parsed.ok()) {
    if (parsed.status().code() != absl::StatusCode::kInvalidArgument) std::abort();
    return 0;
  }
  moed::model::JinjaRenderOptions options;
  options.limits.max_output_bytes = 1 << 20;
  options.limits.max_steps = 200'000;
  options.limits.max_call_depth = 32;
  absl::StatusOr<std::string> first = parsed->Render(context, options);
  absl::StatusOr<std::string> second = parsed->Render(context, options);
  if (first.ok() != second.ok()) std::abort();
  if (first.ok()) {
    if (*first != *second || first->size() > options.limits.max_output_bytes) std::abort();
  } else if (first.status() != second.status() ||
             (first.status().code() != absl::StatusCode::kInvalidArgument &&
              first.status().code() != absl::StatusCode::kResourceExhausted)) {
    std::abort();
  }
  return 0;
}
