#include "cache/routing_trace.h"

#include <climits>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace moed::cache {

absl::StatusOr<std::vector<RoutingTrace>> ReadRoutingTraces(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream text;
  text << in.rdbuf();
  return ParseRoutingTraces(text.str(), path);
}

absl::StatusOr<std::vector<RoutingTrace>> ParseRoutingTraces(absl::string_view text,
                                                             absl::string_view source) {
  std::vector<RoutingTrace> traces;
  int number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    auto bad = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat(source, ":", number, ": ", what));
    };
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
    RoutingTrace t;
    auto get_int = [&](const char* key, int* out) -> bool {
      auto it = j.find(key);
      if (it == j.end() || !it->is_number_integer()) return false;
      if (it->is_number_unsigned()
              ? it->get<uint64_t>() > INT32_MAX
              : it->get<int64_t>() < INT32_MIN || it->get<int64_t>() > INT32_MAX)
        return false;  // not an int: as good as missing
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
          if (!e.is_number_integer() || e.get<int64_t>() < 0 || e.get<int64_t>() >= t.num_experts)
            return bad("expert id out of range");
          experts.push_back(static_cast<int>(e.get<int64_t>()));
        }
        layers.emplace_back(std::move(experts));
      }
      t.tokens.push_back(std::move(layers));
    }
    if (t.num_layers <= 0 || t.num_experts <= 0 || t.top_k <= 0 || t.top_k > t.num_experts)
      return bad("num_layers, num_experts and top_k must be positive, top_k at most num_experts");
    if (auto w = j.find("weights"); w != j.end() && !w->is_null()) {
      if (!w->is_array() || w->size() != t.tokens.size())
        return bad("weights must list one entry per token");
      for (size_t i = 0; i < t.tokens.size(); ++i) {
        const auto& token = (*w)[i];
        if (!token.is_array() || static_cast<int>(token.size()) != t.num_layers)
          return bad("a token's weights do not list every layer");
        std::vector<std::vector<float>> layers(static_cast<size_t>(t.num_layers));
        for (int l = 0; l < t.num_layers; ++l) {
          const auto& entry = token[static_cast<size_t>(l)];
          const auto& experts = t.tokens[i][static_cast<size_t>(l)];
          if (entry.is_null()) continue;
          if (!entry.is_array() || !experts.has_value() || entry.size() != experts->size())
            return bad("a weights entry does not match its experts");
          for (const auto& x : entry) {
            if (!x.is_number()) return bad("a weight is not a number");
            layers[static_cast<size_t>(l)].push_back(x.get<float>());
          }
        }
        t.weights.push_back(std::move(layers));
      }
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

absl::StatusOr<std::shared_ptr<TraceRouting>> TraceRouting::Create(
    std::vector<RoutingTrace> traces, const model::ModelConfig& config) {
  if (traces.empty()) return absl::InvalidArgumentError("the routing trace holds no sequences");
  for (const RoutingTrace& trace : traces) {
    if (trace.num_layers != config.num_layers || trace.num_experts != config.num_experts ||
        trace.top_k != config.experts_per_token) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the routing trace is for ", trace.num_layers, " layers x ", trace.num_experts,
          " experts, top-", trace.top_k, "; the model has ", config.num_layers, " x ",
          config.num_experts, ", top-", config.experts_per_token));
    }
    if (trace.tokens.empty()) return absl::InvalidArgumentError("a routing trace has no tokens");
  }
  int first_moe_layer = 0;
  while (first_moe_layer < config.num_layers && !config.IsMoeLayer(first_moe_layer))
    ++first_moe_layer;
  return std::shared_ptr<TraceRouting>(new TraceRouting(std::move(traces), first_moe_layer));
}

absl::StatusOr<std::shared_ptr<TraceRouting>> TraceRouting::FromFile(
    const std::string& path, const model::ModelConfig& config) {
  absl::StatusOr<std::vector<RoutingTrace>> traces = ReadRoutingTraces(path);
  if (!traces.ok()) return traces.status();
  absl::StatusOr<std::shared_ptr<TraceRouting>> routing = Create(*std::move(traces), config);
  if (!routing.ok()) {
    return absl::Status(routing.status().code(),
                        absl::StrCat(path, ": ", routing.status().message()));
  }
  return routing;
}

bool TraceRouting::Route(const model::TokenRef& token, int layer, absl::Span<int32_t> experts,
                         absl::Span<float> weights) {
  auto it = trace_of_.find(token.sequence);
  if (it == trace_of_.end() || (token.position == 0 && layer == first_moe_layer_)) {
    if (it == trace_of_.end() && trace_of_.size() >= 4096) trace_of_.clear();
    it = trace_of_.insert_or_assign(token.sequence, next_++ % traces_.size()).first;
  }
  const RoutingTrace& trace = traces_[it->second];
  const size_t t = static_cast<size_t>(token.position) % trace.tokens.size();
  if (layer < 0 || layer >= trace.num_layers) return false;
  const auto& chosen = trace.tokens[t][static_cast<size_t>(layer)];
  if (!chosen.has_value() || chosen->size() != experts.size()) return false;
  const std::vector<float>* recorded =
      t < trace.weights.size() ? &trace.weights[t][static_cast<size_t>(layer)] : nullptr;
  for (size_t r = 0; r < experts.size(); ++r) {
    experts[r] = (*chosen)[r];
    weights[r] = recorded != nullptr && recorded->size() == experts.size()
                     ? (*recorded)[r]
                     : 1.0f / static_cast<float>(experts.size());
  }
  return true;
}

}  // namespace moed::cache
