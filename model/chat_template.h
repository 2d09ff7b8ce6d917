// A model's chat template, rendered as Hugging Face's apply_chat_template renders it.
//
// Where the template comes from, first found wins: an explicit file (--chat-template),
// chat_template.jinja beside the model, tokenizer_config.json's "chat_template" (a string,
// or a list of {"name", "template"} of which "tool_use" serves requests with tools and
// "default" the rest).
#pragma once

#include <ctime>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/jinja.h"
#include "nlohmann/json.hpp"

namespace moed::model {

// What one rendering receives; the names are apply_chat_template's.
struct ChatTemplateInput {
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  nlohmann::ordered_json tools = nullptr;  // a list of function schemas, or null (none)
  bool add_generation_prompt = true;
  // Extra variables (enable_thinking, reasoning_effort, builtin_tools, ...). They follow the
  // standard ones, so a kwarg of the same name wins, as in HF.
  nlohmann::ordered_json kwargs = nlohmann::ordered_json::object();
};

// How a model's output is split into content, reasoning and tool calls. kAuto follows the
// template's text (ChatTemplate::Resolve).
enum class ToolCallFormat { kAuto, kNone, kHermes, kMistral };
enum class ReasoningFormat { kAuto, kNone, kThink };

absl::string_view ToolCallFormatName(ToolCallFormat format);
absl::string_view ReasoningFormatName(ReasoningFormat format);
// "auto", "none", "hermes", "mistral" / "auto", "none", "think".
absl::StatusOr<ToolCallFormat> ParseToolCallFormat(absl::string_view name);
absl::StatusOr<ReasoningFormat> ParseReasoningFormat(absl::string_view name);

class ChatTemplate {
 public:
  // One template; `origin` names it in errors ("tokenizer_config.json", a path).
  static absl::StatusOr<ChatTemplate> FromSource(absl::string_view source, std::string origin);

  // The model directory's template(s) and special tokens, or nullopt when it has none.
  // `override_file` (may be empty) replaces the directory's template.
  static absl::StatusOr<std::optional<ChatTemplate>> LoadForModel(const std::string& model_dir,
                                                                  const std::string& override_file);

  // bos_token/eos_token passed to the template; absent ones are left undefined (HF passes
  // only the tokens the tokenizer has).
  void set_special_tokens(std::optional<std::string> bos, std::optional<std::string> eos) {
    bos_token_ = std::move(bos);
    eos_token_ = std::move(eos);
  }
  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }

  // The rendered prompt. Template errors (raise_exception, type errors) are
  // INVALID_ARGUMENT; see IsTemplateRaise.
  absl::StatusOr<std::string> Render(const ChatTemplateInput& input, const std::tm& now,
                                     const JinjaLimits& limits = {}) const;

  // Where the template came from and the names of its variants ("default", "tool_use").
  const std::string& origin() const { return origin_; }
  std::vector<std::string> names() const;

  // kAuto becomes what the template's own text implies; other values stay.
  ToolCallFormat Resolve(ToolCallFormat format) const;
  ReasoningFormat Resolve(ReasoningFormat format) const;

 private:
  struct Variant {
    std::string source;
    JinjaTemplate compiled;
  };
  ChatTemplate() = default;
  const Variant* Select(bool has_tools) const;

  std::string origin_;
  std::map<std::string, Variant> variants_;
  std::optional<std::string> bos_token_, eos_token_;
};

// The local wall clock, for strftime_now() in the daemon.
std::tm LocalNow();

// The fixed clock of the chat-template test vectors.
inline constexpr const char* kTemplateTestClock = "2025-03-14 09:26:53";

// "YYYY-MM-DD HH:MM:SS" as local time fields (weekday and day of year filled in).
absl::StatusOr<std::tm> ParseTemplateClock(absl::string_view text);

}  // namespace moed::model
