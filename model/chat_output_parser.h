// Splits a model's streamed output into content, reasoning and tool calls, whatever the
// chunking of the text deltas: the same text fed in any pieces gives the same results.
//
//   reasoning: <think>...</think> (DeepSeek-R1, Qwen3, DeepSeek-V3.1). When the prompt
//              already opened <think> (PromptOpensReasoning), output starts as reasoning.
//   hermes:    <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen2.5, Qwen3, Hermes)
//   mistral:   [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...] and the newer
//              [TOOL_CALLS]name[ARGS]{...} form
//
// A tool call that does not parse comes back as content, so no text is ever lost.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "model/chat_template.h"

namespace moed::model {

struct ToolCall {
  std::string id;
  std::string name;
  std::string arguments;  // a JSON text, as OpenAI's API carries it
};

struct ChatDelta {
  std::string content;
  std::string reasoning_content;
  std::vector<ToolCall> tool_calls;  // complete calls only

  bool empty() const { return content.empty() && reasoning_content.empty() && tool_calls.empty(); }
  void Append(ChatDelta other);
};

struct ChatOutputOptions {
  ToolCallFormat tool_calls = ToolCallFormat::kNone;  // kAuto is treated as kNone
  ReasoningFormat reasoning = ReasoningFormat::kNone;
  bool starts_in_reasoning = false;
  // Tool-call ids are derived from this (a request's own seed), so a replay gives the same ids.
  uint64_t id_seed = 0;
};

// True when the rendered prompt ends inside an open <think> block.
bool PromptOpensReasoning(absl::string_view prompt);

class ChatOutputParser {
 public:
  explicit ChatOutputParser(ChatOutputOptions options);

  // One text delta of the model's output; returns what is certain so far.
  ChatDelta Feed(absl::string_view text);
  // The output ended: flushes what was held back, completes or returns unfinished calls.
  ChatDelta Finish();

 private:
  enum class State { kContent, kReasoning, kHermesCall, kMistralCalls };

  void Process(ChatDelta& out, bool at_end);
  void EmitContent(ChatDelta& out, absl::string_view text);
  bool ParseHermesCall(absl::string_view body, ChatDelta& out);
  bool ParseMistralCalls(absl::string_view body, ChatDelta& out);
  std::string NextId();

  ChatOutputOptions options_;
  State state_;
  std::string pending_;
  bool skip_leading_space_ = false;  // after </think> or a tool call
  std::string held_space_;           // trailing whitespace of reasoning, not yet known to be inner
  int calls_made_ = 0;
};

}  // namespace moed::model
