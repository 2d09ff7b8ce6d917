#include "server/openai_service.h"

#include <chrono>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace moed::server {
namespace {

using Json = nlohmann::ordered_json;

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

int HttpStatusOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kUnauthenticated:
      return 401;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kDeadlineExceeded:
      return 408;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    default:
      return 500;
  }
}

OpenAiError ErrorOf(const absl::Status& status) {
  OpenAiError e;
  e.status = HttpStatusOf(status);
  e.message = std::string(status.message());
  e.type = e.status == 429   ? "rate_limit_error"
           : e.status >= 500 ? "server_error"
                             : "invalid_request_error";
  return e;
}

void SendError(HttpExchange& exchange, const OpenAiError& error) {
  exchange.Respond(error.status, "application/json", error.Body());
}

int64_t UnixNow() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Json Bytes(const std::string& text) {
  Json out = Json::array();
  for (unsigned char c : text) out.push_back(static_cast<int>(c));
  return out;
}

struct ChoiceState {
  int index = 0;
  int prompt_index = 0;
  std::shared_ptr<scheduler::RequestHandle> handle;
  std::unique_ptr<model::ChatOutputParser> parser;
  std::string echo;  // completions with echo: the prompt, sent before the first text
  bool started = false;
  // What a non-streamed response carries (and the count of tool calls sent when streaming).
  std::string text, reasoning;
  std::vector<model::ToolCall> calls;
  Json chat_logprobs = Json::array();
  Json completion_logprobs = {{"tokens", Json::array()},
                              {"token_logprobs", Json::array()},
                              {"top_logprobs", Json::array()},
                              {"text_offset", Json::array()}};
  size_t text_bytes = 0;
  bool done = false;
  std::string finish_reason;
  uint32_t prompt_tokens = 0, completion_tokens = 0;
};

// One request's generation: its choices, their streams and what goes back. Everything but the
// listeners runs on the connection's thread, so no lock is needed.
class Generation : public std::enable_shared_from_this<Generation> {
 public:
  Generation(OpenAiRequest request, std::shared_ptr<HttpExchange> exchange,
             std::shared_ptr<const model::Tokenizer> tokenizer, std::string model,
             std::string fingerprint, std::string id)
      : request_(std::move(request)),
        exchange_(std::move(exchange)),
        tokenizer_(std::move(tokenizer)),
        model_(std::move(model)),
        fingerprint_(std::move(fingerprint)),
        chat_(request_.endpoint == OpenAiEndpoint::kChatCompletions),
        id_(std::move(id)),
        created_(UnixNow()) {}

  std::vector<ChoiceState>& choices() { return choices_; }

  void Start() {
    if (request_.stream) {
      exchange_->StartStream(200, "text/event-stream",
                             {{"Cache-Control", "no-cache"}, {"X-Accel-Buffering", "no"}});
    }
    std::shared_ptr<Generation> self = shared_from_this();
    exchange_->OnDisconnect([self] { self->Abandon(); });
    for (ChoiceState& choice : choices_) {
      // The engine thread calls this: hand the work to the connection's thread.
      choice.handle->SetListener([self] { self->exchange_->Post([self] { self->Drain(); }); });
    }
  }

  // The client went away: the scheduler frees the slots, KV caches and pins at the next step.
  void Abandon() {
    for (ChoiceState& choice : choices_) {
      if (choice.handle) choice.handle->Cancel();
    }
    Release();
  }

 private:
  void Release() {
    finished_ = true;
    for (ChoiceState& choice : choices_) {
      if (choice.handle) choice.handle->SetListener(nullptr);
      choice.handle.reset();
    }
  }

  void Drain() {
    for (ChoiceState& choice : choices_) {
      while (!finished_ && !choice.done && choice.handle) {
        std::optional<scheduler::StreamEvent> event =
            choice.handle->Next(std::chrono::milliseconds(0));
        if (!event) break;
        Process(choice, *event);
      }
      if (finished_) return;
    }
    if (std::all_of(choices_.begin(), choices_.end(), [](const ChoiceState& c) { return c.done; }))
      Complete();
  }

  Json Envelope() const {
    return {{"id", id_},
            {"object", chat_ ? "chat.completion.chunk" : "text_completion"},
            {"created", created_},
            {"model", model_},
            {"system_fingerprint", fingerprint_}};
  }

  void SendChunk(Json choice) {
    Json chunk = Envelope();
    chunk["choices"] = Json::array({std::move(choice)});
    exchange_->Send(absl::StrCat("data: ", Dump(chunk), "\n\n"));
  }

  std::string TokenText(int32_t id) const {
    if (tokenizer_ == nullptr) return "";
    return tokenizer_->TokenText(id).value_or("");
  }

  // The event's logprobs in the endpoint's shape; appended to the choice's totals too.
  Json Logprobs(ChoiceState& c, const scheduler::StreamEvent& event, const std::string& text) {
    if (!request_.logprobs) return nullptr;
    if (chat_) {
      Json content = Json::array();
      for (const model::TokenChoice& tc : event.choices) {
        std::string token = TokenText(tc.token);
        Json top = Json::array();
        for (const auto& [id, lp] : tc.top_logprobs) {
          if (top.size() >= request_.top_logprobs) break;
          std::string t = TokenText(id);
          top.push_back({{"token", t}, {"logprob", lp}, {"bytes", Bytes(t)}});
        }
        content.push_back({{"token", token},
                           {"logprob", tc.logprob},
                           {"bytes", Bytes(token)},
                           {"top_logprobs", top}});
        c.chat_logprobs.push_back(content.back());
      }
      return {{"content", content}};
    }
    Json out = {{"tokens", Json::array()},
                {"token_logprobs", Json::array()},
                {"top_logprobs", Json::array()},
                {"text_offset", Json::array()}};
    size_t offset = c.text_bytes;
    for (const model::TokenChoice& tc : event.choices) {
      std::string token = TokenText(tc.token);
      Json top = Json::object();
      for (const auto& [id, lp] : tc.top_logprobs) {
        if (top.size() >= request_.top_logprobs) break;
        top[TokenText(id)] = lp;
      }
      out["tokens"].push_back(token);
      out["token_logprobs"].push_back(tc.logprob);
      out["top_logprobs"].push_back(top);
      out["text_offset"].push_back(offset);
      offset += token.size();
    }
    c.text_bytes += text.size();
    for (const auto& [key, items] : out.items()) {
      for (const auto& item : items) c.completion_logprobs[key].push_back(item);
    }
    return out;
  }

  void Process(ChoiceState& c, scheduler::StreamEvent& event) {
    if (!event.error.ok()) return Fail(ErrorOf(event.error));
    std::string text = event.text;
    if (!c.started) {
      c.started = true;
      text = c.echo + text;
      if (chat_ && request_.stream) {
        SendChunk({{"index", c.index},
                   {"delta", {{"role", "assistant"}, {"content", ""}}},
                   {"logprobs", nullptr},
                   {"finish_reason", nullptr}});
      }
    }
    Json logprobs = Logprobs(c, event, text);
    if (chat_) {
      model::ChatDelta delta = c.parser->Feed(text);
      if (event.last()) delta.Append(c.parser->Finish());
      c.text += delta.content;
      c.reasoning += delta.reasoning_content;
      if (request_.stream) {
        if (!delta.reasoning_content.empty()) {
          SendChunk({{"index", c.index},
                     {"delta", {{"reasoning_content", delta.reasoning_content}}},
                     {"logprobs", nullptr},
                     {"finish_reason", nullptr}});
        }
        if (!delta.content.empty() || !logprobs.is_null()) {
          SendChunk({{"index", c.index},
                     {"delta", {{"content", delta.content}}},
                     {"logprobs", logprobs},
                     {"finish_reason", nullptr}});
        }
        for (const model::ToolCall& call : delta.tool_calls) {
          Json entry = {{"index", c.calls.size()},
                        {"id", call.id},
                        {"type", "function"},
                        {"function", {{"name", call.name}, {"arguments", call.arguments}}}};
          c.calls.push_back(call);
          SendChunk({{"index", c.index},
                     {"delta", {{"tool_calls", Json::array({entry})}}},
                     {"logprobs", nullptr},
                     {"finish_reason", nullptr}});
        }
      } else {
        for (model::ToolCall& call : delta.tool_calls) c.calls.push_back(std::move(call));
      }
    } else {
      c.text += text;
      if (request_.stream && (!text.empty() || !logprobs.is_null())) {
        SendChunk({{"index", c.index},
                   {"text", text},
                   {"logprobs", logprobs},
                   {"finish_reason", nullptr}});
      }
    }
    if (!event.last()) return;
    c.done = true;
    c.prompt_tokens = event.prompt_tokens;
    c.completion_tokens = event.completion_tokens;
    switch (event.finish) {
      case scheduler::FinishReason::kLength:
        c.finish_reason = "length";
        break;
      case scheduler::FinishReason::kCancelled:
        c.finish_reason = "abort";
        break;
      default:
        c.finish_reason = c.calls.empty() ? "stop" : "tool_calls";
    }
    if (request_.stream) {
      if (chat_) {
        SendChunk({{"index", c.index},
                   {"delta", Json::object()},
                   {"logprobs", nullptr},
                   {"finish_reason", c.finish_reason}});
      } else {
        SendChunk({{"index", c.index},
                   {"text", ""},
                   {"logprobs", nullptr},
                   {"finish_reason", c.finish_reason}});
      }
    }
  }

  Json Usage() const {
    uint64_t prompt = 0, completion = 0;
    std::vector<bool> counted;
    for (const ChoiceState& c : choices_) {
      if (static_cast<size_t>(c.prompt_index) >= counted.size())
        counted.resize(c.prompt_index + 1, false);
      if (!counted[c.prompt_index]) prompt += c.prompt_tokens;
      counted[c.prompt_index] = true;
      completion += c.completion_tokens;
    }
    return {{"prompt_tokens", prompt},
            {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  void Complete() {
    if (request_.stream) {
      if (request_.include_usage) {
        Json chunk = Envelope();
        chunk["choices"] = Json::array();
        chunk["usage"] = Usage();
        exchange_->Send(absl::StrCat("data: ", Dump(chunk), "\n\n"));
      }
      exchange_->Send("data: [DONE]\n\n");
      exchange_->End();
      return Release();
    }
    Json response = Envelope();
    response["object"] = chat_ ? "chat.completion" : "text_completion";
    Json list = Json::array();
    for (const ChoiceState& c : choices_) {
      if (chat_) {
        Json message = {
            {"role", "assistant"},
            {"content", c.text.empty() && !c.calls.empty() ? Json(nullptr) : Json(c.text)}};
        if (!c.reasoning.empty()) message["reasoning_content"] = c.reasoning;
        if (!c.calls.empty()) {
          Json calls = Json::array();
          for (const model::ToolCall& call : c.calls) {
            calls.push_back({{"id", call.id},
                             {"type", "function"},
                             {"function", {{"name", call.name}, {"arguments", call.arguments}}}});
          }
          message["tool_calls"] = std::move(calls);
        }
        list.push_back(
            {{"index", c.index},
             {"message", std::move(message)},
             {"logprobs", request_.logprobs ? Json({{"content", c.chat_logprobs}}) : Json(nullptr)},
             {"finish_reason", c.finish_reason}});
      } else {
        Json logprobs = nullptr;
        if (request_.logprobs) logprobs = c.completion_logprobs;
        list.push_back({{"index", c.index},
                        {"text", c.text},
                        {"logprobs", logprobs},
                        {"finish_reason", c.finish_reason}});
      }
    }
    response["choices"] = std::move(list);
    response["usage"] = Usage();
    exchange_->Respond(200, "application/json", Dump(response));
    Release();
  }

  void Fail(const OpenAiError& error) {
    for (ChoiceState& choice : choices_) {
      if (choice.handle) choice.handle->Cancel();
    }
    if (request_.stream) {
      exchange_->Send(absl::StrCat("data: ", error.Body(), "\n\n"));
      exchange_->Send("data: [DONE]\n\n");
      exchange_->End();
    } else {
      SendError(*exchange_, error);
    }
    Release();
  }

  OpenAiRequest request_;
  std::shared_ptr<HttpExchange> exchange_;
  std::shared_ptr<const model::Tokenizer> tokenizer_;
  std::string model_, fingerprint_;
  bool chat_;
  std::string id_;
  int64_t created_;
  std::vector<ChoiceState> choices_;
  bool finished_ = false;
};

}  // namespace

bool BearerMatches(absl::string_view authorization, absl::string_view key) {
  constexpr absl::string_view kPrefix = "Bearer ";
  if (authorization.size() < kPrefix.size() ||
      !absl::EqualsIgnoreCase(authorization.substr(0, kPrefix.size()), kPrefix)) {
    return false;
  }
  absl::string_view given = authorization.substr(kPrefix.size());
  // Every byte of the key is compared, whatever the given value's length.
  unsigned char diff = given.size() == key.size() ? 0 : 1;
  for (size_t i = 0; i < key.size(); ++i) {
    diff |= static_cast<unsigned char>(key[i] ^ (i < given.size() ? given[i] : 0));
  }
  return diff == 0;
}

OpenAiService::OpenAiService(std::shared_ptr<ServingCore> core, OpenAiServiceOptions options)
    : core_(std::move(core)),
      options_(std::move(options)),
      created_(UnixNow()),
      id_salt_(std::random_device{}() * 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(created_)) {}

void OpenAiService::Handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange) {
  const std::string& path = request.path;
  auto method_is = [&](const char* method) {
    if (request.method == method) return true;
    SendError(*exchange, {405, absl::StrCat(request.method, " is not allowed on ", path),
                          "invalid_request_error", "", "method_not_allowed"});
    return false;
  };
  if (path == "/health") {
    if (method_is("GET")) exchange->Respond(200, "application/json", R"({"status":"ok"})");
    return;
  }
  if (path == "/ready") {
    if (!method_is("GET")) return;
    const bool ready = !options_.ready || options_.ready();
    exchange->Respond(ready ? 200 : 503, "application/json",
                      ready ? R"({"status":"ready"})" : R"({"status":"not ready"})");
    return;
  }
  if (path == "/metrics" && options_.metrics) {
    if (method_is("GET"))
      exchange->Respond(200, "text/plain; version=0.0.4; charset=utf-8", options_.metrics());
    return;
  }
  if (!absl::StartsWith(path, "/v1/")) {
    return SendError(*exchange, {404, absl::StrCat("no route for ", path), "invalid_request_error",
                                 "", "not_found"});
  }
  if (!options_.api_key.empty() && !BearerMatches(request.authorization, options_.api_key)) {
    return SendError(*exchange, {401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                                 "invalid_request_error", "", "invalid_api_key"});
  }
  const std::string& name = core_->model_name();
  auto model = [&] {
    return Json{{"id", name},
                {"object", "model"},
                {"created", created_},
                {"owned_by", "moed"},
                {"max_model_len", core_->parts().max_context_tokens}};
  };
  if (path == "/v1/models") {
    if (method_is("GET"))
      exchange->Respond(200, "application/json",
                        Dump({{"object", "list"}, {"data", Json::array({model()})}}));
    return;
  }
  if (absl::StartsWith(path, "/v1/models/")) {
    if (!method_is("GET")) return;
    if (path.substr(11) != name) {
      return SendError(*exchange,
                       {404, absl::StrCat("The model '", path.substr(11), "' does not exist"),
                        "invalid_request_error", "model", "model_not_found"});
    }
    return exchange->Respond(200, "application/json", Dump(model()));
  }
  if (path == "/v1/completions" || path == "/v1/chat/completions") {
    if (method_is("POST")) {
      Generate(path == "/v1/completions" ? OpenAiEndpoint::kCompletions
                                         : OpenAiEndpoint::kChatCompletions,
               request, exchange);
    }
    return;
  }
  SendError(*exchange,
            {404, absl::StrCat("no route for ", path), "invalid_request_error", "", "not_found"});
}

void OpenAiService::Generate(OpenAiEndpoint endpoint, const HttpRequest& http,
                             const std::shared_ptr<HttpExchange>& exchange) {
  // What this adapter refuses is counted here, under the code of the refusal's cause; the core
  // counts what Submit refuses.
  auto refuse = [&](const OpenAiError& error, absl::StatusCode code) {
    core_->RecordRefusal(code);
    SendError(*exchange, error);
  };
  std::variant<OpenAiRequest, OpenAiError> parsed =
      ParseOpenAiRequest(endpoint, http.body, options_.limits);
  if (auto* error = std::get_if<OpenAiError>(&parsed)) {
    return refuse(*error, absl::StatusCode::kInvalidArgument);
  }
  OpenAiRequest request = std::get<OpenAiRequest>(std::move(parsed));
  if (request.model != core_->model_name()) {
    return refuse({404, absl::StrCat("The model '", request.model, "' does not exist"),
                   "invalid_request_error", "model", "model_not_found"},
                  absl::StatusCode::kNotFound);
  }
  const ServingParts& parts = core_->parts();
  // The prompts, as text or ids; for chat, the template's rendering.
  std::vector<OpenAiPrompt> prompts = request.prompts;
  model::ChatOutputOptions output;
  if (endpoint == OpenAiEndpoint::kChatCompletions) {
    if (request.tool_choice != "none" && request.tool_choice != "auto" &&
        parts.tool_calls == model::ToolCallFormat::kNone) {
      return refuse(
          {400, "this model's chat template has no tool calls, so 'tool_choice' cannot require one",
           "invalid_request_error", "tool_choice", "unsupported"},
          absl::StatusCode::kInvalidArgument);
    }
    model::ChatTemplateInput input;
    input.messages = request.messages;
    input.tools = request.tools;
    input.add_generation_prompt = request.add_generation_prompt;
    input.kwargs = request.chat_template_kwargs;
    absl::StatusOr<std::string> rendered = core_->RenderChat(input);
    if (!rendered.ok()) {
      OpenAiError error = ErrorOf(rendered.status());
      if (error.status == 500 || error.status == 429) error.status = 400;
      error.param = "messages";
      return refuse(error, rendered.status().code());
    }
    // The template writes any BOS itself.
    absl::StatusOr<std::vector<int32_t>> ids = core_->Tokenize(*rendered, false);
    if (!ids.ok()) return refuse(ErrorOf(ids.status()), ids.status().code());
    prompts = {OpenAiPrompt{false, "", *std::move(ids)}};
    output.tool_calls =
        request.tool_choice == "none" ? model::ToolCallFormat::kNone : parts.tool_calls;
    output.reasoning = parts.reasoning;
    output.starts_in_reasoning = model::PromptOpensReasoning(*rendered);
  }
  const uint64_t serial = next_response_.fetch_add(1);
  std::string response_id = absl::StrFormat(
      "%s%016x%08x", endpoint == OpenAiEndpoint::kChatCompletions ? "chatcmpl-" : "cmpl-", id_salt_,
      serial);
  auto generation =
      std::make_shared<Generation>(request, exchange, parts.tokenizer, core_->model_name(),
                                   options_.system_fingerprint, std::move(response_id));
  std::vector<ChoiceState>& choices = generation->choices();
  const std::string base_id = core_->NewRequestId("http-");
  for (size_t p = 0; p < prompts.size(); ++p) {
    for (int i = 0; i < request.n; ++i) {
      GenerateInput input;
      input.request_id = absl::StrCat(base_id, "-", choices.size());
      if (prompts[p].is_text) {
        input.prompt_text = prompts[p].text;
      } else {
        input.prompt_ids = prompts[p].ids;
      }
      input.sampling = request.sampling;
      if (request.sampling.seed)
        input.sampling.seed = *request.sampling.seed + static_cast<uint64_t>(i);
      absl::StatusOr<std::shared_ptr<scheduler::RequestHandle>> handle =
          core_->Submit(std::move(input));
      if (!handle.ok()) {
        for (ChoiceState& c : choices) c.handle->Cancel();
        return SendError(*exchange, ErrorOf(handle.status()));
      }
      ChoiceState choice;
      choice.index = static_cast<int>(choices.size());
      choice.prompt_index = static_cast<int>(p);
      choice.handle = *std::move(handle);
      if (endpoint == OpenAiEndpoint::kChatCompletions) {
        output.id_seed = std::hash<std::string>()(absl::StrCat(base_id, "-", choice.index));
        choice.parser = std::make_unique<model::ChatOutputParser>(output);
      } else if (request.echo) {
        if (prompts[p].is_text) {
          choice.echo = prompts[p].text;
        } else if (parts.tokenizer != nullptr) {
          choice.echo = parts.tokenizer->Decode(prompts[p].ids).value_or("");
        }
      }
      choices.push_back(std::move(choice));
    }
  }
  generation->Start();
}

}  // namespace moed::server
