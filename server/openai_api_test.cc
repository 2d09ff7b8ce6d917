// Request bodies as OpenAI's SDKs send them, and the errors moed gives for what it refuses.
#include "server/openai_api.h"

#include <catch2/catch.hpp>

namespace moed::server {
namespace {

OpenAiRequest Ok(OpenAiEndpoint endpoint, const std::string& body) {
  auto result = ParseOpenAiRequest(endpoint, body);
  if (auto* error = std::get_if<OpenAiError>(&result)) FAIL(body << " -> " << error->Body());
  return std::get<OpenAiRequest>(result);
}

OpenAiError Refused(OpenAiEndpoint endpoint, const std::string& body) {
  auto result = ParseOpenAiRequest(endpoint, body);
  REQUIRE(std::holds_alternative<OpenAiError>(result));
  return std::get<OpenAiError>(result);
}

constexpr auto kCompletions = OpenAiEndpoint::kCompletions;
constexpr auto kChat = OpenAiEndpoint::kChatCompletions;

TEST_CASE("openai: defaults follow OpenAI's: 16 tokens for completions, the context for chat") {
  OpenAiRequest c = Ok(kCompletions, R"({"model": "m", "prompt": "hi"})");
  CHECK(c.sampling.max_tokens == 16);
  CHECK(c.sampling.temperature == 1.0f);
  CHECK(c.n == 1);
  OpenAiRequest chat =
      Ok(kChat, R"({"model": "m", "messages": [{"role": "user", "content": "hi"}]})");
  CHECK(chat.sampling.max_tokens == 0);
  CHECK(chat.tool_choice == "none");
  CHECK(chat.add_generation_prompt);
}

TEST_CASE("openai: every prompt form, stop forms, vLLM's extensions, unknown fields ignored") {
  CHECK(Ok(kCompletions, R"({"model": "m", "prompt": ["a", "b"]})").prompts.size() == 2);
  OpenAiRequest ids =
      Ok(kCompletions, R"({"model": "m", "prompt": [1, 2, 3], "stop": "x", "seed": 5,
                                           "top_k": 40, "min_p": 0.1, "repetition_penalty": 1.2,
                                           "ignore_eos": true, "some_future_field": {"a": 1}})");
  REQUIRE(ids.prompts.size() == 1);
  CHECK_FALSE(ids.prompts[0].is_text);
  CHECK(ids.prompts[0].ids == std::vector<int32_t>{1, 2, 3});
  CHECK(ids.sampling.stop == std::vector<std::string>{"x"});
  CHECK(ids.sampling.seed == 5u);
  CHECK(ids.sampling.top_k == 40u);
  CHECK(ids.sampling.ignore_eos);
  CHECK(Ok(kCompletions, R"({"model": "m", "prompt": [[1], [2, 3]]})").prompts.size() == 2);
  CHECK(Ok(kCompletions, R"({"model": "m", "prompt": "x", "logprobs": 3})").top_logprobs == 3);
}

TEST_CASE("openai: chat messages are normalised for the template") {
  OpenAiRequest r = Ok(kChat, R"({"model": "m", "max_tokens": 5, "max_completion_tokens": 7,
    "messages": [{"role": "developer", "content": "rules"},
                 {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                 {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                   "function": {"name": "f", "arguments": "{\"x\": 1}"}}]},
                 {"role": "tool", "tool_call_id": "c1", "content": "ok"}],
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required",
    "chat_template_kwargs": {"enable_thinking": false}})");
  CHECK(r.sampling.max_tokens == 7);  // max_completion_tokens wins
  CHECK(r.messages[0]["role"] == "system");
  CHECK(r.messages[1]["content"] == "a\nb");
  CHECK(r.messages[2]["tool_calls"][0]["function"]["arguments"]["x"] == 1);
  CHECK(r.tool_choice == "required");
  CHECK(r.chat_template_kwargs["enable_thinking"] == false);
}

TEST_CASE("openai: wrong types and ranges are 400s naming the field") {
  struct Case {
    OpenAiEndpoint endpoint;
    std::string body;
    std::string param;
  };
  const std::string msg = R"("messages": [{"role": "user", "content": "x"}])";
  for (const Case& c : std::vector<Case>{
           {kCompletions, "not json", ""},
           {kCompletions, "[1, 2]", ""},
           {kCompletions, R"({"prompt": "x"})", "model"},
           {kCompletions, R"({"model": "m"})", "prompt"},
           {kCompletions, R"({"model": "m", "prompt": ""})", "prompt"},
           {kCompletions, R"({"model": "m", "prompt": [-1]})", "prompt"},
           {kCompletions, R"({"model": "m", "prompt": "x", "temperature": 2.5})", "temperature"},
           {kCompletions, R"({"model": "m", "prompt": "x", "temperature": "hot"})", "temperature"},
           {kCompletions, R"({"model": "m", "prompt": "x", "top_p": 0})", "top_p"},
           {kCompletions, R"({"model": "m", "prompt": "x", "n": 0})", "n"},
           {kCompletions, R"({"model": "m", "prompt": "x", "n": 1.5})", "n"},
           {kCompletions, R"({"model": "m", "prompt": "x", "max_tokens": -1})", "max_tokens"},
           {kCompletions, R"({"model": "m", "prompt": "x", "stop": [1]})", "stop"},
           {kCompletions, R"({"model": "m", "prompt": "x", "logprobs": true})", "logprobs"},
           {kCompletions,
            R"({"model": "m", "prompt": "x", "stream_options": {"include_usage": true}})",
            "stream_options"},
           {kChat, R"({"model": "m", "messages": []})", "messages"},
           {kChat, R"({"model": "m", "messages": [{"role": "robot", "content": "x"}]})",
            "messages[0].role"},
           {kChat, R"({"model": "m", "messages": [{"role": "user"}]})", "messages[0].content"},
           {kChat, R"({"model": "m", )" + msg + R"(, "top_logprobs": 2})", "top_logprobs"},
           {kChat, R"({"model": "m", )" + msg + R"(, "tool_choice": "required"})", "tool_choice"},
           {kChat, R"({"model": "m", )" + msg + R"(, "tools": [{"type": "retrieval"}]})",
            "tools[0]"},
           // A tool whose type is not a string (found by the request fuzzer: it used to throw).
           {kChat, R"({"model": "m", )" + msg + R"(, "tools": [{"type": {"name": "f"}}]})",
            "tools[0]"},
           {kChat, R"({"model": "m", )" + msg + R"(, "tools": [{"function": {"name": "f"}}]})",
            "tools[0]"},
       }) {
    INFO(c.body);
    OpenAiError e = Refused(c.endpoint, c.body);
    CHECK(e.status == 400);
    CHECK(e.type == "invalid_request_error");
    CHECK(e.param == c.param);
    CHECK(nlohmann::json::parse(e.Body())["error"]["param"] ==
          (c.param.empty() ? nlohmann::json(nullptr) : nlohmann::json(c.param)));
  }
}

TEST_CASE("openai: what moed does not do is refused by name") {
  const std::string msg = R"("messages": [{"role": "user", "content": "x"}])";
  for (
      const auto& [body, param] : std::vector<std::pair<std::string, std::string>>{
          {R"({"model": "m", "prompt": "x", "best_of": 3})", "best_of"},
          {R"({"model": "m", "prompt": "x", "suffix": "end"})", "suffix"},
          {R"({"model": "m", "prompt": "x", "logit_bias": {"5": 10}})", "logit_bias"},
          {R"({"model": "m", "prompt": "x", "echo": true, "logprobs": 1})", "echo"},
          {R"({"model": "m", )" + msg + R"(, "response_format": {"type": "json_object"}})",
           "response_format"},
          {R"({"model": "m", )" + msg + R"(, "modalities": ["text", "audio"]})", "modalities"},
          {R"({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})",
           "messages[0].content"},
      }) {
    INFO(body);
    OpenAiError e =
        Refused(body.find("messages") != std::string::npos ? kChat : kCompletions, body);
    CHECK(e.status == 400);
    CHECK(e.param == param);
    CHECK(e.code == "unsupported");
  }
}

}  // namespace
}  // namespace moed::server

#include "server/openai_service.h"

namespace moed::server {
namespace {

TEST_CASE("openai: the API key must be the whole bearer token") {
  CHECK(BearerMatches("Bearer sesame", "sesame"));
  CHECK(BearerMatches("bearer sesame", "sesame"));
  CHECK_FALSE(BearerMatches("Bearer sesam", "sesame"));
  CHECK_FALSE(BearerMatches("Bearer sesamee", "sesame"));
  CHECK_FALSE(BearerMatches("Bearer Sesame", "sesame"));
  CHECK_FALSE(BearerMatches("sesame", "sesame"));
  CHECK_FALSE(BearerMatches("", "sesame"));
  CHECK_FALSE(BearerMatches("Basic c2VzYW1l", "sesame"));
}

}  // namespace
}  // namespace moed::server
