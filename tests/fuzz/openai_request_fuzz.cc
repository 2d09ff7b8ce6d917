// libFuzzer target: an OpenAI request body, parsed for both endpoints. Whatever the bytes, the
// result is a request within the documented ranges or an error whose body is valid JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <variant>

#include "server/openai_api.h"

using moed::server::OpenAiEndpoint;
using moed::server::OpenAiError;
using moed::server::OpenAiRequest;

namespace {

void Check(OpenAiEndpoint endpoint, absl::string_view body) {
  const moed::server::OpenAiLimits limits;
  auto result = moed::server::ParseOpenAiRequest(endpoint, body, limits);
  if (auto* error = std::get_if<OpenAiError>(&result)) {
    auto parsed = nlohmann::json::parse(error->Body(), nullptr, false);
    if (parsed.is_discarded() || !parsed["error"]["message"].is_string() || error->status < 400)
      std::abort();
    return;
  }
  const OpenAiRequest& r = std::get<OpenAiRequest>(result);
  const auto& s = r.sampling;
  if (r.n < 1 || r.n > limits.max_n || s.temperature < 0 || s.temperature > 2 || s.top_p <= 0 ||
      s.top_p > 1 || s.top_logprobs > 20 || (r.include_usage && !r.stream))
    std::abort();
  if (endpoint == OpenAiEndpoint::kCompletions) {
    if (r.prompts.empty() || r.prompts.size() > limits.max_prompts) std::abort();
    for (const auto& p : r.prompts) {
      if (p.is_text ? p.text.empty() : p.ids.empty()) std::abort();
      for (int32_t id : p.ids)
        if (id < 0) std::abort();
    }
  } else {
    if (!r.messages.is_array() || r.messages.empty()) std::abort();
    for (const auto& m : r.messages) {
      const auto& role = m["role"];
      if (!role.is_string() || role == "developer") std::abort();
      if (!m["content"].is_string() && !m["content"].is_null()) std::abort();
    }
    if (!r.tools.is_null() && !r.tools.is_array()) std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view body(reinterpret_cast<const char*>(data), size);
  Check(OpenAiEndpoint::kCompletions, body);
  Check(OpenAiEndpoint::kChatCompletions, body);
  return 0;
}
