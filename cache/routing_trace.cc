#include "cache/routing_trace.h"

#include <fstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moed::cache {

absl::StatusOr<std::vector<RoutingTrace>> ReadRoutingTraces(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<RoutingTrace> traces;
  std::string line;
  int number = 0;
  while (std::getline(in, line)) {
    ++number;
    if (line.empty()) continue;
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", number, ": ", what));
    };
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
    RoutingTrace t;
    auto get_int = [&](const char* key, int* out) -> bool {
      auto it = j.find(key);
      if (it == j.end() || !it->is_number_integer()) return false;
      *out = it->get<int>();
      return true;
    };
    if (!get_int("num_layers", &t.num_layers) || !get_int("num_experts", &t.num_experts) ||
        !get_int("top_k", &t.top_k)) {
      return bad("needs integer num_layers, num_experts and top_k");
    }
    get_int("num_prefill_tokens", &t.num_prefill_tokens);
    if (j.contains("model") && j["model"].is_string()) t.model = j["model"];
    if (j.contains("task") && j["task"].is_string()) t.task = j["task"];
    if (!j.contains("tokens") || !j["tokens"].is_array()) return bad("needs a tokens list");
    for (const auto& token : j["tokens"]) {
      if (!token.is_array() || static_cast<int>(token.size()) != t.num_layers)
        return bad("a token does not list every layer");
      std::vector<std::optional<std::vector<int>>> layers;
      for (const auto& layer : token) {
        if (layer.is_null()) {
          layers.emplace_back(std::nullopt);
          continue;
        }
        if (!layer.is_array()) return bad("a layer entry is neither null nor a list");
        std::vector<int> experts;
        for (const auto& e : layer) {
          if (!e.is_number_integer() || e.get<int>() < 0 || e.get<int>() >= t.num_experts)
            return bad("expert id out of range");
          experts.push_back(e.get<int>());
        }
        layers.emplace_back(std::move(experts));
      }
      t.tokens.push_back(std::move(layers));
    }
    traces.push_back(std::move(t));
  }
  return traces;
}

absl::Status AppendRoutingTrace(const std::string& path, const RoutingTrace& trace) {
  nlohmann::ordered_json tokens = nlohmann::ordered_json::array();
  for (const auto& token : trace.tokens) {
    nlohmann::ordered_json layers = nlohmann::ordered_json::array();
    for (const auto& layer : token) {
      if (layer.has_value()) {
        layers.push_back(*layer);
      } else {
        layers.push_back(nullptr);
      }
    }
    tokens.push_back(std::move(layers));
  }
  nlohmann::ordered_json line = {
      {"model", trace.model},
      {"num_layers", trace.num_layers},
      {"num_experts", trace.num_experts},
      {"top_k", trace.top_k},
      {"num_prefill_tokens", trace.num_prefill_tokens},
      {"num_decode_tokens", static_cast<int>(trace.tokens.size()) - trace.num_prefill_tokens},
      {"tokens", std::move(tokens)}};
  std::ofstream out(path, std::ios::app);
  out << line.dump() << "\n";
  out.close();
  if (!out) return absl::UnavailableError(absl::StrCat(path, ": cannot write the routing trace"));
  return absl::OkStatus();
}

RoutingTrace TraceFromRouting(const std::vector<std::vector<std::vector<int>>>& routing,
                              int num_experts, int top_k, int num_prefill_tokens,
                              const std::string& model) {
  RoutingTrace trace;
  trace.model = model;
  trace.num_layers = static_cast<int>(routing.size());
  trace.num_experts = num_experts;
  trace.top_k = top_k;
  trace.num_prefill_tokens = num_prefill_tokens;
  size_t tokens = 0;
  for (const auto& layer : routing) tokens = std::max(tokens, layer.size());
  trace.tokens.assign(tokens, std::vector<std::optional<std::vector<int>>>(routing.size()));
  for (size_t l = 0; l < routing.size(); ++l) {
    for (size_t t = 0; t < routing[l].size(); ++t) {
      if (!routing[l][t].empty()) trace.tokens[t][l] = routing[l][t];
    }
  }
  return trace;
}

}  // namespace moed::cache
