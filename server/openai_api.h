// The OpenAI API's request and response formats, apart from any I/O: a request body is
// checked field by field into OpenAiRequest (or an OpenAiError naming the field), and the
// response objects and stream chunks are built here. Unknown fields are ignored, as OpenAI's
// servers ignore them; known fields of the wrong type or out of range are errors.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "absl/strings/string_view.h"
#include "model/sampler.h"
#include "nlohmann/json.hpp"

namespace moed::server {

struct OpenAiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;         // empty: null
  std::string code;          // empty: null
  std::string Body() const;  // {"error": {...}}
};

enum class OpenAiEndpoint { kCompletions, kChatCompletions };

struct OpenAiPrompt {
  bool is_text = true;
  std::string text;
  std::vector<int32_t> ids;
};

struct OpenAiLimits {
  int max_n = 16;           // choices per request
  size_t max_prompts = 64;  // prompts in one completions request
};

struct OpenAiRequest {
  OpenAiEndpoint endpoint = OpenAiEndpoint::kCompletions;
  std::string model;
  // /v1/completions
  std::vector<OpenAiPrompt> prompts;
  bool echo = false;
  // /v1/chat/completions: messages as the template expects them (text parts joined, tool-call
  // arguments parsed into objects, "developer" as "system").
  nlohmann::ordered_json messages;
  nlohmann::ordered_json tools;  // null or a list of function tools
  std::string tool_choice;       // "none", "auto", "required" or a function's name
  nlohmann::ordered_json chat_template_kwargs = nlohmann::ordered_json::object();
  bool add_generation_prompt = true;
  // both
  int n = 1;
  bool stream = false;
  bool include_usage = false;
  model::SamplingParams sampling;  // max_tokens 0: to the end of the context
  bool logprobs = false;
  uint32_t top_logprobs = 0;
};

std::variant<OpenAiRequest, OpenAiError> ParseOpenAiRequest(OpenAiEndpoint endpoint,
                                                            absl::string_view body,
                                                            const OpenAiLimits& limits = {});

}  // namespace moed::server
