#include "model/chat_template.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "util/read_file.h"
#include "util/status_macros.h"

namespace moed::model {
namespace {

// tokenizer_config.json writes a special token as a string or as an AddedToken object.
std::optional<std::string> SpecialToken(const nlohmann::json& config, const char* name) {
  auto it = config.find(name);
  if (it == config.end()) return std::nullopt;
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string())
    return (*it)["content"].get<std::string>();
  return std::nullopt;
}

}  // namespace

absl::string_view ToolCallFormatName(ToolCallFormat format) {
  switch (format) {
    case ToolCallFormat::kAuto:
      return "auto";
    case ToolCallFormat::kNone:
      return "none";
    case ToolCallFormat::kHermes:
      return "hermes";
    case ToolCallFormat::kMistral:
      return "mistral";
  }
  return "none";
}

absl::string_view ReasoningFormatName(ReasoningFormat format) {
  switch (format) {
    case ReasoningFormat::kAuto:
      return "auto";
    case ReasoningFormat::kNone:
      return "none";
    case ReasoningFormat::kThink:
      return "think";
  }
  return "none";
}

absl::StatusOr<ToolCallFormat> ParseToolCallFormat(absl::string_view name) {
  for (ToolCallFormat f : {ToolCallFormat::kAuto, ToolCallFormat::kNone, ToolCallFormat::kHermes,
                           ToolCallFormat::kMistral}) {
    if (name == ToolCallFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown tool-call parser '", name, "' (auto, none, hermes or mistral)"));
}

absl::StatusOr<ReasoningFormat> ParseReasoningFormat(absl::string_view name) {
  for (ReasoningFormat f :
       {ReasoningFormat::kAuto, ReasoningFormat::kNone, ReasoningFormat::kThink}) {
    if (name == ReasoningFormatName(f)) return f;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown reasoning parser '", name, "' (auto, none or think)"));
}

absl::StatusOr<ChatTemplate> ChatTemplate::FromSource(absl::string_view source,
                                                      std::string origin) {
  absl::StatusOr<JinjaTemplate> compiled = JinjaTemplate::Parse(source);
  if (!compiled.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(origin, ": chat template: ", compiled.status().message()));
  }
  ChatTemplate t;
  t.origin_ = std::move(origin);
  t.variants_.emplace("default", Variant{std::string(source), *std::move(compiled)});
  return t;
}

absl::StatusOr<std::optional<ChatTemplate>> ChatTemplate::LoadForModel(
    const std::string& model_dir, const std::string& override_file) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  std::optional<ChatTemplate> result;
  nlohmann::json config = nlohmann::json::object();
  const fs::path config_path = dir / "tokenizer_config.json";
  if (fs::exists(config_path)) {
    MOED_ASSIGN_OR_RETURN(std::string text, util::ReadFile(config_path.string()));
    config = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path.string(), ": not a JSON object"));
    }
  }
  if (!override_file.empty()) {
    MOED_ASSIGN_OR_RETURN(std::string text, util::ReadFile(override_file));
    MOED_ASSIGN_OR_RETURN(result, FromSource(text, override_file));
  } else if (fs::exists(dir / "chat_template.jinja")) {
    const std::string path = (dir / "chat_template.jinja").string();
    MOED_ASSIGN_OR_RETURN(std::string text, util::ReadFile(path));
    MOED_ASSIGN_OR_RETURN(result, FromSource(text, path));
  } else if (auto it = config.find("chat_template"); it != config.end() && !it->is_null()) {
    const std::string origin = config_path.string();
    if (it->is_string()) {
      MOED_ASSIGN_OR_RETURN(result, FromSource(it->get<std::string>(), origin));
    } else if (it->is_array()) {
      ChatTemplate t;
      t.origin_ = origin;
      for (const auto& entry : *it) {
        if (!entry.is_object() || !entry.contains("name") || !entry["name"].is_string() ||
            !entry.contains("template") || !entry["template"].is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              origin, ": chat_template entries must be {\"name\": string, \"template\": string}"));
        }
        const std::string name = entry["name"].get<std::string>();
        const std::string source = entry["template"].get<std::string>();
        absl::StatusOr<JinjaTemplate> compiled = JinjaTemplate::Parse(source);
        if (!compiled.ok()) {
          return absl::InvalidArgumentError(
              absl::StrCat(origin, ": chat template '", name, "': ", compiled.status().message()));
        }
        t.variants_.insert_or_assign(name, Variant{source, *std::move(compiled)});
      }
      if (t.variants_.empty())
        return absl::InvalidArgumentError(absl::StrCat(origin, ": chat_template is an empty list"));
      result = std::move(t);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": chat_template must be a string or a list of named templates"));
    }
  }
  if (result)
    result->set_special_tokens(SpecialToken(config, "bos_token"),
                               SpecialToken(config, "eos_token"));
  return result;
}

std::vector<std::string> ChatTemplate::names() const {
  std::vector<std::string> out;
  for (const auto& [name, variant] : variants_) out.push_back(name);
  return out;
}

const ChatTemplate::Variant* ChatTemplate::Select(bool has_tools) const {
  if (has_tools) {
    if (auto it = variants_.find("tool_use"); it != variants_.end()) return &it->second;
  }
  if (auto it = variants_.find("default"); it != variants_.end()) return &it->second;
  return nullptr;
}

absl::StatusOr<std::string> ChatTemplate::Render(const ChatTemplateInput& input, const std::tm& now,
                                                 const JinjaLimits& limits) const {
  if (!input.messages.is_array()) return absl::InvalidArgumentError("messages must be a list");
  if (!input.tools.is_null() && !input.tools.is_array())
    return absl::InvalidArgumentError("tools must be a list or null");
  if (!input.kwargs.is_object())
    return absl::InvalidArgumentError("template kwargs must be an object");
  const bool has_tools = input.tools.is_array();
  const Variant* variant = Select(has_tools);
  if (!variant) {
    return absl::FailedPreconditionError(absl::StrCat(origin_, ": no \"default\" chat template",
                                                      has_tools ? " and no \"tool_use\" one" : ""));
  }
  nlohmann::ordered_json context = nlohmann::ordered_json::object();
  context["messages"] = input.messages;
  context["tools"] = input.tools;
  context["documents"] = nullptr;
  context["add_generation_prompt"] = input.add_generation_prompt;
  if (bos_token_) context["bos_token"] = *bos_token_;
  if (eos_token_) context["eos_token"] = *eos_token_;
  for (const auto& [key, value] : input.kwargs.items()) context[key] = value;
  JinjaRenderOptions options;
  options.now = now;
  options.limits = limits;
  return variant->compiled.Render(context, options);
}

ToolCallFormat ChatTemplate::Resolve(ToolCallFormat format) const {
  if (format != ToolCallFormat::kAuto) return format;
  for (const auto& [name, variant] : variants_) {
    if (variant.source.find("<tool_call>") != std::string::npos) return ToolCallFormat::kHermes;
    if (variant.source.find("[TOOL_CALLS]") != std::string::npos) return ToolCallFormat::kMistral;
  }
  return ToolCallFormat::kNone;
}

ReasoningFormat ChatTemplate::Resolve(ReasoningFormat format) const {
  if (format != ReasoningFormat::kAuto) return format;
  for (const auto& [name, variant] : variants_) {
    if (variant.source.find("</think>") != std::string::npos) return ReasoningFormat::kThink;
  }
  return ReasoningFormat::kNone;
}

absl::StatusOr<std::tm> ParseTemplateClock(absl::string_view text) {
  std::tm fields{};
  const std::string copy(text);
  const char* end = strptime(copy.c_str(), "%Y-%m-%d %H:%M:%S", &fields);
  if (end == nullptr || *end != '\0')
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not \"YYYY-MM-DD HH:MM:SS\""));
  // timegm normalises the fields and fills in the weekday and the day of the year.
  std::time_t t = timegm(&fields);
  std::tm out{};
  gmtime_r(&t, &out);
  return out;
}

std::tm LocalNow() {
  std::time_t t = std::time(nullptr);
  std::tm out{};
  localtime_r(&t, &out);
  return out;
}

}  // namespace moed::model
