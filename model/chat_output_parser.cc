#include "model/chat_output_parser.h"

#include <algorithm>
#include <initializer_list>

#include "nlohmann/json.hpp"

namespace moed::model {
namespace {

constexpr absl::string_view kThinkOpen = "<think>";
constexpr absl::string_view kThinkClose = "</think>";
constexpr absl::string_view kHermesOpen = "<tool_call>";
constexpr absl::string_view kHermesClose = "</tool_call>";
constexpr absl::string_view kMistralCalls = "[TOOL_CALLS]";
constexpr absl::string_view kMistralArgs = "[ARGS]";
constexpr absl::string_view kMistralCallId = "[CALL_ID]";

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

absl::string_view Trim(absl::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

// The length of the longest suffix of `text` that is a proper prefix of one of `markers`:
// those bytes may still become a marker and are held back.
size_t HeldSuffix(absl::string_view text, std::initializer_list<absl::string_view> markers) {
  size_t held = 0;
  for (absl::string_view marker : markers) {
    if (marker.empty()) continue;
    for (size_t n = std::min(text.size(), marker.size() - 1); n > held; --n) {
      if (text.substr(text.size() - n) == marker.substr(0, n)) {
        held = n;
        break;
      }
    }
  }
  return held;
}

uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

std::optional<nlohmann::ordered_json> ParseJson(absl::string_view text) {
  auto parsed = nlohmann::ordered_json::parse(text.begin(), text.end(), nullptr, false);
  if (parsed.is_discarded()) return std::nullopt;
  return parsed;
}

// OpenAI carries arguments as a JSON text; an object is serialised, a string passes as is.
std::optional<std::string> ArgumentsText(const nlohmann::ordered_json& call) {
  auto it = call.find("arguments");
  if (it == call.end()) it = call.find("parameters");
  if (it == call.end() || it->is_null()) return std::string("{}");
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) return it->dump();
  return std::nullopt;
}

}  // namespace

void ChatDelta::Append(ChatDelta other) {
  content += other.content;
  reasoning_content += other.reasoning_content;
  for (ToolCall& call : other.tool_calls) tool_calls.push_back(std::move(call));
}

bool PromptOpensReasoning(absl::string_view prompt) {
  const size_t open = prompt.rfind(kThinkOpen);
  if (open == absl::string_view::npos) return false;
  const size_t close = prompt.rfind(kThinkClose);
  if (close != absl::string_view::npos && close > open) return false;
  return Trim(prompt.substr(open + kThinkOpen.size())).empty();
}

ChatOutputParser::ChatOutputParser(ChatOutputOptions options)
    : options_(options),
      state_(options.reasoning == ReasoningFormat::kThink && options.starts_in_reasoning
                 ? State::kReasoning
                 : State::kContent),
      skip_leading_space_(state_ == State::kReasoning) {}

ChatDelta ChatOutputParser::Feed(absl::string_view text) {
  pending_.append(text.data(), text.size());
  ChatDelta out;
  Process(out, false);
  return out;
}

ChatDelta ChatOutputParser::Finish() {
  ChatDelta out;
  Process(out, true);
  return out;
}

std::string ChatOutputParser::NextId() {
  static constexpr char kAlphabet[] =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
  // Mistral's templates require ids of exactly nine letters and digits.
  const bool mistral = options_.tool_calls == ToolCallFormat::kMistral;
  std::string id = mistral ? "" : "call_";
  uint64_t state = SplitMix64(options_.id_seed ^ SplitMix64(static_cast<uint64_t>(calls_made_)));
  for (int i = 0; i < (mistral ? 9 : 24); ++i) {
    state = SplitMix64(state);
    id.push_back(kAlphabet[state % 62]);
  }
  ++calls_made_;
  return id;
}

void ChatOutputParser::EmitContent(ChatDelta& out, absl::string_view text) {
  if (skip_leading_space_) {
    while (!text.empty() && IsSpace(text.front())) text.remove_prefix(1);
    if (text.empty()) return;
    skip_leading_space_ = false;
  }
  out.content.append(text.data(), text.size());
}

bool ChatOutputParser::ParseHermesCall(absl::string_view body, ChatDelta& out) {
  std::optional<nlohmann::ordered_json> call = ParseJson(Trim(body));
  if (!call || !call->is_object()) return false;
  auto name = call->find("name");
  if (name == call->end() || !name->is_string() || name->get<std::string>().empty()) return false;
  std::optional<std::string> arguments = ArgumentsText(*call);
  if (!arguments) return false;
  out.tool_calls.push_back(ToolCall{NextId(), name->get<std::string>(), *std::move(arguments)});
  return true;
}

bool ChatOutputParser::ParseMistralCalls(absl::string_view body, ChatDelta& out) {
  body = Trim(body);
  std::vector<ToolCall> calls;
  if (!body.empty() && body.front() == '[') {
    std::optional<nlohmann::ordered_json> list = ParseJson(body);
    if (!list || !list->is_array() || list->empty()) return false;
    for (const auto& call : *list) {
      if (!call.is_object()) return false;
      auto name = call.find("name");
      if (name == call.end() || !name->is_string() || name->get<std::string>().empty())
        return false;
      std::optional<std::string> arguments = ArgumentsText(call);
      if (!arguments) return false;
      auto id = call.find("id");
      calls.push_back(ToolCall{id != call.end() && id->is_string() ? id->get<std::string>() : "",
                               name->get<std::string>(), *std::move(arguments)});
    }
  } else {
    // name[ARGS]{...}, optionally name[CALL_ID]id[ARGS]{...}, calls separated by [TOOL_CALLS].
    while (!body.empty()) {
      size_t next = body.find(kMistralCalls);
      absl::string_view segment = body.substr(0, next);
      body = next == absl::string_view::npos ? absl::string_view()
                                             : body.substr(next + kMistralCalls.size());
      size_t args_at = segment.find(kMistralArgs);
      if (args_at == absl::string_view::npos) return false;
      absl::string_view head = segment.substr(0, args_at);
      absl::string_view arguments = Trim(segment.substr(args_at + kMistralArgs.size()));
      std::string id;
      if (size_t id_at = head.find(kMistralCallId); id_at != absl::string_view::npos) {
        id = std::string(Trim(head.substr(id_at + kMistralCallId.size())));
        head = head.substr(0, id_at);
      }
      head = Trim(head);
      std::optional<nlohmann::ordered_json> parsed = ParseJson(arguments);
      if (head.empty() || !parsed || !parsed->is_object()) return false;
      calls.push_back(ToolCall{std::move(id), std::string(head), parsed->dump()});
    }
    if (calls.empty()) return false;
  }
  for (ToolCall& call : calls) {
    if (call.id.empty()) call.id = NextId();
    out.tool_calls.push_back(std::move(call));
  }
  return true;
}

void ChatOutputParser::Process(ChatDelta& out, bool at_end) {
  const bool think = options_.reasoning == ReasoningFormat::kThink;
  const bool hermes = options_.tool_calls == ToolCallFormat::kHermes;
  const bool mistral = options_.tool_calls == ToolCallFormat::kMistral;
  while (true) {
    switch (state_) {
      case State::kReasoning: {
        const size_t close = absl::string_view(pending_).find(kThinkClose);
        const bool closed = close != std::string::npos;
        size_t take =
            closed ? close : pending_.size() - (at_end ? 0 : HeldSuffix(pending_, {kThinkClose}));
        absl::string_view text(pending_.data(), take);
        if (skip_leading_space_) {
          while (!text.empty() && IsSpace(text.front())) text.remove_prefix(1);
          if (!text.empty()) skip_leading_space_ = false;
        }
        // Whitespace at the end of the reasoning is dropped: hold it until more text follows.
        size_t body = text.size();
        while (body > 0 && IsSpace(text[body - 1])) --body;
        if (body > 0) {
          out.reasoning_content += held_space_;
          held_space_.clear();
          out.reasoning_content.append(text.data(), body);
        }
        held_space_.append(text.data() + body, text.size() - body);
        if (!closed) {
          pending_.erase(0, take);
          if (at_end) held_space_.clear();
          return;
        }
        held_space_.clear();
        pending_.erase(0, close + kThinkClose.size());
        state_ = State::kContent;
        skip_leading_space_ = true;
        continue;
      }
      case State::kContent: {
        size_t best = std::string::npos;
        absl::string_view marker;
        auto consider = [&](bool enabled, absl::string_view m) {
          if (!enabled) return;
          size_t at = absl::string_view(pending_).find(m);
          if (at < best) {
            best = at;
            marker = m;
          }
        };
        consider(think, kThinkOpen);
        consider(hermes, kHermesOpen);
        consider(mistral, kMistralCalls);
        if (best == std::string::npos) {
          size_t held = at_end
                            ? 0
                            : HeldSuffix(pending_, {think ? kThinkOpen : absl::string_view(),
                                                    hermes ? kHermesOpen : absl::string_view(),
                                                    mistral ? kMistralCalls : absl::string_view()});
          EmitContent(out, absl::string_view(pending_).substr(0, pending_.size() - held));
          pending_.erase(0, pending_.size() - held);
          return;
        }
        EmitContent(out, absl::string_view(pending_).substr(0, best));
        pending_.erase(0, best + marker.size());
        if (marker == kThinkOpen) {
          state_ = State::kReasoning;
          skip_leading_space_ = true;
        } else {
          state_ = marker == kHermesOpen ? State::kHermesCall : State::kMistralCalls;
        }
        continue;
      }
      case State::kHermesCall: {
        const size_t close = absl::string_view(pending_).find(kHermesClose);
        if (close == std::string::npos && !at_end) return;
        absl::string_view body = absl::string_view(pending_).substr(0, close);
        if (!ParseHermesCall(body, out)) {
          skip_leading_space_ = false;
          std::string raw = std::string(kHermesOpen) + std::string(body);
          if (close != std::string::npos) raw += std::string(kHermesClose);
          EmitContent(out, raw);
        }
        pending_.erase(0,
                       close == std::string::npos ? pending_.size() : close + kHermesClose.size());
        state_ = State::kContent;
        skip_leading_space_ = true;
        if (at_end && pending_.empty()) return;
        continue;
      }
      case State::kMistralCalls: {
        if (!at_end) return;
        if (!ParseMistralCalls(pending_, out)) {
          skip_leading_space_ = false;
          EmitContent(out, std::string(kMistralCalls) + pending_);
        }
        pending_.clear();
        state_ = State::kContent;
        return;
      }
    }
  }
}

}  // namespace moed::model
