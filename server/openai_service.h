// The OpenAI-compatible HTTP API over the serving core: /v1/models, /v1/completions and
// /v1/chat/completions (streamed as server-sent events or not), /health and /ready.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "server/http_server.h"
#include "server/openai_api.h"
#include "server/serving_core.h"

namespace moed::server {

struct OpenAiServiceOptions {
  std::string api_key;             // empty: no key needed
  std::string system_fingerprint;  // "moed-VERSION-BACKEND"
  OpenAiLimits limits;
  std::function<bool()> ready;  // the model is loaded and the daemon is not draining
  // GET /metrics answers with this; without it /metrics is not a route (--metrics false).
  std::function<std::string()> metrics;
};

class OpenAiService {
 public:
  OpenAiService(std::shared_ptr<ServingCore> core, OpenAiServiceOptions options);

  void Handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange);

 private:
  void Generate(OpenAiEndpoint endpoint, const HttpRequest& request,
                const std::shared_ptr<HttpExchange>& exchange);

  std::shared_ptr<ServingCore> core_;
  OpenAiServiceOptions options_;
  int64_t created_;  // when the daemon started: the model's "created"
  // Response ids: a random part per daemon, then a counter.
  uint64_t id_salt_;
  std::atomic<uint64_t> next_response_{1};
};

// True when `authorization` is "Bearer KEY"; the comparison takes the same time wherever the
// first difference lies.
bool BearerMatches(absl::string_view authorization, absl::string_view key);

}  // namespace moed::server
