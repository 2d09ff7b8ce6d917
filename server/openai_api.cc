#include "server/openai_api.h"

#include <cmath>
#include <optional>

#include "absl/strings/str_cat.h"

namespace moed::server {

using Json = nlohmann::ordered_json;

std::string OpenAiError::Body() const {
  nlohmann::ordered_json error = {{"message", message},
                                  {"type", type},
                                  {"param", param.empty() ? Json(nullptr) : Json(param)},
                                  {"code", code.empty() ? Json(nullptr) : Json(code)}};
  return Json({{"error", std::move(error)}}).dump(-1, ' ', false, Json::error_handler_t::replace);
}

namespace {

// Field readers: absent or null gives nullopt; a value of the wrong type or range sets the
// error naming the field.
class Fields {
 public:
  explicit Fields(const Json& body) : body_(body) {}

  const std::optional<OpenAiError>& error() const { return error_; }
  void Fail(const std::string& param, std::string message) {
    if (!error_) error_ = OpenAiError{400, std::move(message), "invalid_request_error", param, ""};
  }
  void Unsupported(const std::string& param, std::string message) {
    if (!error_)
      error_ = OpenAiError{400, std::move(message), "invalid_request_error", param, "unsupported"};
  }

  const Json* Get(const char* name) const {
    auto it = body_.find(name);
    if (it == body_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::optional<double> Number(const char* name, double lo, double hi) {
    const Json* v = Get(name);
    if (!v) return std::nullopt;
    if (!v->is_number()) {
      Fail(name, absl::StrCat("'", name, "' must be a number"));
      return std::nullopt;
    }
    double d = v->get<double>();
    if (!std::isfinite(d) || d < lo || d > hi) {
      Fail(name, absl::StrCat("'", name, "' must be between ", lo, " and ", hi));
      return std::nullopt;
    }
    return d;
  }

  std::optional<int64_t> Integer(const char* name, int64_t lo, int64_t hi) {
    const Json* v = Get(name);
    if (!v) return std::nullopt;
    double d = v->is_number() ? v->get<double>() : NAN;
    if (!v->is_number() || v->is_boolean() || std::floor(d) != d) {
      Fail(name, absl::StrCat("'", name, "' must be an integer"));
      return std::nullopt;
    }
    if (v->is_number_float() ? (d < static_cast<double>(lo) || d > static_cast<double>(hi))
                             : false) {
      Fail(name, absl::StrCat("'", name, "' must be between ", lo, " and ", hi));
      return std::nullopt;
    }
    int64_t i = v->is_number_unsigned()  ? (v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                                                ? INT64_MAX
                                                : static_cast<int64_t>(v->get<uint64_t>()))
                : v->is_number_integer() ? v->get<int64_t>()
                                         : static_cast<int64_t>(d);
    if (i < lo || i > hi) {
      Fail(name, absl::StrCat("'", name, "' must be between ", lo, " and ", hi));
      return std::nullopt;
    }
    return i;
  }

  std::optional<bool> Bool(const char* name) {
    const Json* v = Get(name);
    if (!v) return std::nullopt;
    if (!v->is_boolean()) {
      Fail(name, absl::StrCat("'", name, "' must be a boolean"));
      return std::nullopt;
    }
    return v->get<bool>();
  }

  std::optional<std::string> String(const char* name) {
    const Json* v = Get(name);
    if (!v) return std::nullopt;
    if (!v->is_string()) {
      Fail(name, absl::StrCat("'", name, "' must be a string"));
      return std::nullopt;
    }
    return v->get<std::string>();
  }

 private:
  const Json& body_;
  std::optional<OpenAiError> error_;
};

constexpr int64_t kMaxTokenLimit = 1 << 30;

// A prompt given as token ids must hold integers that fit a token id.
bool TokenIds(const Json& list, std::vector<int32_t>& out) {
  for (const auto& id : list) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
      return false;
    out.push_back(static_cast<int32_t>(id.get<int64_t>()));
  }
  return true;
}

void ParsePrompts(Fields& f, const Json& body, const OpenAiLimits& limits, OpenAiRequest& r) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return f.Fail("prompt", "'prompt' is required");
  const Json& p = *it;
  auto bad = [&] {
    f.Fail("prompt",
           "'prompt' must be a string, a list of strings, a list of token ids or a list of lists "
           "of token ids");
  };
  if (p.is_string()) {
    r.prompts.push_back({true, p.get<std::string>(), {}});
  } else if (p.is_array()) {
    if (p.empty()) return f.Fail("prompt", "'prompt' must not be empty");
    if (p[0].is_number()) {
      OpenAiPrompt prompt{false, "", {}};
      if (!TokenIds(p, prompt.ids)) return bad();
      r.prompts.push_back(std::move(prompt));
    } else {
      if (p.size() > limits.max_prompts)
        return f.Fail("prompt",
                      absl::StrCat("at most ", limits.max_prompts, " prompts in one request"));
      for (const auto& item : p) {
        if (item.is_string()) {
          r.prompts.push_back({true, item.get<std::string>(), {}});
        } else if (item.is_array() && !item.empty()) {
          OpenAiPrompt prompt{false, "", {}};
          if (!TokenIds(item, prompt.ids)) return bad();
          r.prompts.push_back(std::move(prompt));
        } else {
          return bad();
        }
      }
    }
  } else {
    return bad();
  }
  for (const OpenAiPrompt& prompt : r.prompts) {
    if (prompt.is_text && prompt.text.empty())
      return f.Fail("prompt", "'prompt' must not be empty");
  }
}

// Text of a message's content: a string, or the text parts of a list joined by newlines.
std::optional<std::string> ContentText(Fields& f, const Json& content, const std::string& param) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) {
    f.Fail(param, "'content' must be a string or a list of content parts");
    return std::nullopt;
  }
  std::string text;
  bool first = true;
  for (const auto& part : content) {
    if (!part.is_object() || !part.contains("type") || !part["type"].is_string()) {
      f.Fail(param, "each content part must be an object with a 'type'");
      return std::nullopt;
    }
    if (part["type"] != "text") {
      f.Unsupported(param, absl::StrCat("content parts of type '", part["type"].get<std::string>(),
                                        "' are not supported: this model reads text only"));
      return std::nullopt;
    }
    if (!part.contains("text") || !part["text"].is_string()) {
      f.Fail(param, "a text content part needs a string 'text'");
      return std::nullopt;
    }
    if (!first) text += "\n";
    text += part["text"].get<std::string>();
    first = false;
  }
  return text;
}

void ParseMessages(Fields& f, const Json& body, OpenAiRequest& r) {
  auto it = body.find("messages");
  if (it == body.end() || !it->is_array() || it->empty()) {
    return f.Fail("messages", "'messages' must be a non-empty list");
  }
  r.messages = Json::array();
  for (size_t i = 0; i < it->size(); ++i) {
    const Json& m = (*it)[i];
    const std::string param = absl::StrCat("messages[", i, "]");
    if (!m.is_object()) return f.Fail(param, absl::StrCat("'", param, "' must be an object"));
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) {
      return f.Fail(param + ".role", absl::StrCat("'", param, ".role' must be a string"));
    }
    std::string role_name = role->get<std::string>();
    if (role_name != "system" && role_name != "developer" && role_name != "user" &&
        role_name != "assistant" && role_name != "tool") {
      return f.Fail(param + ".role", absl::StrCat("unknown role '", role_name, "'"));
    }
    Json out = m;  // other fields pass to the template as they are
    out["role"] = role_name == "developer" ? "system" : role_name;
    auto content = m.find("content");
    if (content != m.end() && !content->is_null()) {
      std::optional<std::string> text = ContentText(f, *content, param + ".content");
      if (!text) return;
      out["content"] = *text;
    } else if (role_name != "assistant") {
      return f.Fail(param + ".content", absl::StrCat("'", param, ".content' is required"));
    } else {
      out["content"] = nullptr;
    }
    if (auto calls = m.find("tool_calls"); calls != m.end() && !calls->is_null()) {
      if (!calls->is_array()) return f.Fail(param + ".tool_calls", "'tool_calls' must be a list");
      for (auto& call : out["tool_calls"]) {
        if (!call.is_object() || !call.contains("function") || !call["function"].is_object() ||
            !call["function"].contains("name") || !call["function"]["name"].is_string()) {
          return f.Fail(param + ".tool_calls", "each tool call needs a function with a name");
        }
        // Templates index into the arguments: pass them as an object when they parse as one.
        Json& args = call["function"]["arguments"];
        if (args.is_string()) {
          Json parsed = Json::parse(args.get<std::string>(), nullptr, false);
          if (!parsed.is_discarded() && parsed.is_object()) args = std::move(parsed);
        }
      }
    }
    r.messages.push_back(std::move(out));
  }
}

void ParseTools(Fields& f, OpenAiRequest& r) {
  r.tools = nullptr;
  if (const Json* tools = f.Get("tools")) {
    if (!tools->is_array()) return f.Fail("tools", "'tools' must be a list");
    for (size_t i = 0; i < tools->size(); ++i) {
      const Json& t = (*tools)[i];
      // Each member's type checked before it is read: nlohmann's value() throws on a mismatch.
      if (!t.is_object() || !t.contains("type") || t["type"] != "function" ||
          !t.contains("function") || !t["function"].is_object() ||
          !t["function"].contains("name") || !t["function"]["name"].is_string()) {
        return f.Fail(absl::StrCat("tools[", i, "]"),
                      "each tool must be {\"type\": \"function\", \"function\": {\"name\": ...}}");
      }
    }
    if (!tools->empty()) r.tools = *tools;
  }
  r.tool_choice = r.tools.is_null() ? "none" : "auto";
  if (const Json* choice = f.Get("tool_choice")) {
    if (choice->is_string()) {
      std::string c = choice->get<std::string>();
      if (c != "none" && c != "auto" && c != "required")
        return f.Fail("tool_choice", "'tool_choice' must be none, auto, required or a function");
      r.tool_choice = c;
    } else if (choice->is_object() && choice->contains("function") &&
               (*choice)["function"].is_object() && (*choice)["function"].contains("name") &&
               (*choice)["function"]["name"].is_string()) {
      r.tool_choice = (*choice)["function"]["name"].get<std::string>();
    } else {
      return f.Fail("tool_choice", "'tool_choice' must be none, auto, required or a function");
    }
    if (r.tool_choice != "none" && r.tool_choice != "auto" && r.tools.is_null()) {
      return f.Fail("tool_choice", "'tool_choice' names a tool but 'tools' is empty");
    }
  }
  if (const Json* kwargs = f.Get("chat_template_kwargs")) {
    if (!kwargs->is_object())
      return f.Fail("chat_template_kwargs", "'chat_template_kwargs' must be an object");
    r.chat_template_kwargs = *kwargs;
  }
  if (std::optional<bool> add = f.Bool("add_generation_prompt")) r.add_generation_prompt = *add;
}

}  // namespace

std::variant<OpenAiRequest, OpenAiError> ParseOpenAiRequest(OpenAiEndpoint endpoint,
                                                            absl::string_view text,
                                                            const OpenAiLimits& limits) {
  Json body = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded())
    return OpenAiError{400, "the request body is not valid JSON", "invalid_request_error", "", ""};
  if (!body.is_object())
    return OpenAiError{400, "the request body must be a JSON object", "invalid_request_error", "",
                       ""};
  OpenAiRequest r;
  r.endpoint = endpoint;
  Fields f(body);
  const bool chat = endpoint == OpenAiEndpoint::kChatCompletions;

  std::optional<std::string> model = f.String("model");
  if (!model && !f.error()) f.Fail("model", "'model' is required");
  if (model) r.model = *model;
  if (chat) {
    ParseMessages(f, body, r);
    ParseTools(f, r);
  } else {
    ParsePrompts(f, body, limits, r);
    if (std::optional<bool> echo = f.Bool("echo")) r.echo = *echo;
  }

  model::SamplingParams& s = r.sampling;
  s.max_tokens =
      chat ? 0 : 16;  // OpenAI's defaults: 16 for completions, the rest of the context for chat
  std::optional<int64_t> max_tokens = f.Integer("max_tokens", 0, kMaxTokenLimit);
  if (chat) {
    if (std::optional<int64_t> completion = f.Integer("max_completion_tokens", 0, kMaxTokenLimit))
      max_tokens = completion;
  }
  if (max_tokens) s.max_tokens = static_cast<uint32_t>(*max_tokens);
  if (auto v = f.Number("temperature", 0, 2)) s.temperature = static_cast<float>(*v);
  if (auto v = f.Number("top_p", 0, 1)) {
    if (*v <= 0) f.Fail("top_p", "'top_p' must be greater than 0 and at most 1");
    s.top_p = static_cast<float>(*v);
  }
  if (auto v = f.Integer("top_k", -1, INT32_MAX)) s.top_k = *v <= 0 ? 0 : static_cast<uint32_t>(*v);
  if (auto v = f.Number("min_p", 0, 1)) s.min_p = static_cast<float>(*v);
  if (auto v = f.Number("presence_penalty", -2, 2)) s.presence_penalty = static_cast<float>(*v);
  if (auto v = f.Number("frequency_penalty", -2, 2)) s.frequency_penalty = static_cast<float>(*v);
  if (auto v = f.Number("repetition_penalty", 0, 1e6)) {
    if (*v <= 0) f.Fail("repetition_penalty", "'repetition_penalty' must be greater than 0");
    s.repetition_penalty = static_cast<float>(*v);
  }
  if (auto v = f.Bool("ignore_eos")) s.ignore_eos = *v;
  if (auto v = f.Integer("seed", INT64_MIN, INT64_MAX)) s.seed = static_cast<uint64_t>(*v);
  if (auto v = f.Integer("n", 1, limits.max_n)) r.n = static_cast<int>(*v);
  if (const Json* stop = f.Get("stop")) {
    if (stop->is_string()) {
      s.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array() && std::all_of(stop->begin(), stop->end(),
                                               [](const Json& x) { return x.is_string(); })) {
      for (const auto& x : *stop) s.stop.push_back(x.get<std::string>());
    } else {
      f.Fail("stop", "'stop' must be a string or a list of strings");
    }
    std::erase_if(s.stop, [](const std::string& x) { return x.empty(); });
  }
  if (chat) {
    if (auto v = f.Bool("logprobs")) r.logprobs = *v;
    if (auto v = f.Integer("top_logprobs", 0, 20)) {
      if (!r.logprobs) f.Fail("top_logprobs", "'top_logprobs' needs 'logprobs': true");
      r.top_logprobs = static_cast<uint32_t>(*v);
    }
  } else if (const Json* lp = f.Get("logprobs")) {
    if (lp->is_boolean()) {
      f.Fail("logprobs", "'logprobs' must be an integer from 0 to 20 for completions");
    } else if (auto v = f.Integer("logprobs", 0, 20)) {
      r.logprobs = true;
      r.top_logprobs = static_cast<uint32_t>(*v);
    }
  }
  s.logprobs = r.logprobs;
  s.top_logprobs = r.top_logprobs;
  if (auto v = f.Bool("stream")) r.stream = *v;
  if (const Json* options = f.Get("stream_options")) {
    if (!options->is_object()) {
      f.Fail("stream_options", "'stream_options' must be an object");
    } else if (!r.stream) {
      f.Fail("stream_options", "'stream_options' is only allowed when 'stream' is true");
    } else if (options->contains("include_usage") && !(*options)["include_usage"].is_null()) {
      if (!(*options)["include_usage"].is_boolean()) {
        f.Fail("stream_options", "'stream_options.include_usage' must be a boolean");
      } else {
        r.include_usage = (*options)["include_usage"].get<bool>();
      }
    }
  }
  f.String("user");

  // What moed does not do is said, not ignored.
  if (auto best_of = f.Integer("best_of", 1, 64); best_of && *best_of != r.n)
    f.Unsupported("best_of", "'best_of' other than n is not supported");
  if (const Json* suffix = f.Get("suffix");
      suffix && !(suffix->is_string() && suffix->get<std::string>().empty()))
    f.Unsupported("suffix", "'suffix' is not supported");
  if (const Json* bias = f.Get("logit_bias"); bias && !(bias->is_object() && bias->empty()))
    f.Unsupported("logit_bias", "'logit_bias' is not supported");
  if (const Json* format = f.Get("response_format");
      format && !(format->is_object() && format->value("type", "") == "text"))
    f.Unsupported("response_format", "only 'response_format' {\"type\": \"text\"} is supported");
  if (f.Get("audio")) f.Unsupported("audio", "audio output is not supported");
  if (const Json* modalities = f.Get("modalities");
      modalities &&
      !(modalities->is_array() && std::all_of(modalities->begin(), modalities->end(),
                                              [](const Json& m) { return m == "text"; })))
    f.Unsupported("modalities", "only the text modality is supported");
  if (r.echo && r.logprobs)
    f.Unsupported("echo", "'echo' together with 'logprobs' is not supported");

  if (f.error()) return *f.error();
  return r;
}

}  // namespace moed::server
