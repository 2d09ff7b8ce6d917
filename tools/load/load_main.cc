// moed-load: N concurrent streaming clients, M requests each, against a running daemon.
// Checks that every stream ends with the expected finish reason and token count, and prints
// throughput, time to first token, prefill and per-stream decode rates and inter-token latency
// per token. With --engine-config, first runs the same requests on an engine built in this
// process from the daemon's config file (each client's r-th requests in one batch), and prints
// the daemon's rates against it.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/client.h"
#include "model/sampler.h"
#include "scheduler/worker_pool.h"
#include "server/config.h"
#include "server/engine.h"

namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  auto index = static_cast<size_t>(std::lround(p / 100.0 * static_cast<double>(values.size() - 1)));
  return values[std::min(index, values.size() - 1)];
}

double Ms(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// What one request's stream looked like: when each message with tokens arrived and how many
// tokens it carried.
struct StreamTimes {
  Clock::time_point sent;
  std::vector<std::pair<Clock::time_point, uint32_t>> messages;
  uint32_t prompt_tokens = 0;
};

// The rates of a set of streams: prefill as prompt tokens / time to first token, decode per
// stream as (tokens - 1) / (last token's time - first's), and the inter-token latency per
// token: a message's gap divided among its tokens, so that batching tokens into fewer messages
// changes nothing.
struct Rates {
  std::vector<double> ttft_ms, prefill_tps, decode_tps, itl_ms;
  void Add(const StreamTimes& stream) {
    if (stream.messages.empty()) return;
    const double ttft = Ms(stream.sent, stream.messages.front().first);
    ttft_ms.push_back(ttft);
    if (stream.prompt_tokens > 0 && ttft > 0)
      prefill_tps.push_back(stream.prompt_tokens / ttft * 1e3);
    uint64_t tokens = 0;
    for (size_t i = 0; i < stream.messages.size(); ++i) {
      const auto& [at, count] = stream.messages[i];
      tokens += count;
      if (i == 0) continue;
      const double gap = Ms(stream.messages[i - 1].first, at);
      for (uint32_t t = 0; t < count; ++t) itl_ms.push_back(gap / count);
    }
    const double span = Ms(stream.messages.front().first, stream.messages.back().first);
    // The first message's tokens were there at its time; the rest took `span`.
    const uint64_t after_first = tokens - stream.messages.front().second;
    if (after_first > 0 && span > 0) decode_tps.push_back(after_first / span * 1e3);
  }
  void Merge(const Rates& other) {
    for (auto [to, from] : {std::pair{&ttft_ms, &other.ttft_ms},
                            {&prefill_tps, &other.prefill_tps},
                            {&decode_tps, &other.decode_tps},
                            {&itl_ms, &other.itl_ms}}) {
      to->insert(to->end(), from->begin(), from->end());
    }
  }
  void Print(const char* who) const {
    std::printf(
        "%-7s TTFT ms p50 %.1f p90 %.1f | prefill tok/s p50 %.0f | decode tok/s per "
        "stream p50 %.1f (p10 %.1f, p90 %.1f) | ITL ms per token p50 %.1f p90 %.1f p99 "
        "%.1f\n",
        who, Percentile(ttft_ms, 50), Percentile(ttft_ms, 90), Percentile(prefill_tps, 50),
        Percentile(decode_tps, 50), Percentile(decode_tps, 10), Percentile(decode_tps, 90),
        Percentile(itl_ms, 50), Percentile(itl_ms, 90), Percentile(itl_ms, 99));
  }
};

std::vector<int32_t> PromptTokens(int client, int request, int count) {
  std::vector<int32_t> tokens;
  tokens.reserve(static_cast<size_t>(std::max(count, 0)));
  for (int i = 0; i < count; ++i) tokens.push_back(1 + (client * 131 + request * 17 + i * 7) % 250);
  return tokens;
}

// An engine built from the daemon's config file, as the daemon builds its own.
absl::StatusOr<moed::server::Engine> LoadEngine(const std::string& config_path) {
  std::ifstream in(config_path);
  if (!in) return absl::NotFoundError(config_path + ": cannot read");
  std::stringstream text;
  text << in.rdbuf();
  moed::server::DaemonConfig config;
  if (auto s = moed::server::ApplyConfigJson(text.str(), config_path, &config); !s.ok()) return s;
  return moed::server::BuildEngine(config);
}

// The same requests on an engine built from the daemon's config: round r runs every client's
// r-th request together, one batch (prefill, then `max_tokens` steps of all of them), each
// sequence sampled as the daemon samples it (temperature, seed) and, as the daemon does, the
// step's sequences sampled in parallel. Each token is timed as a stream's message would be.
absl::StatusOr<Rates> EngineRates(moed::server::Engine& engine, int clients, int requests,
                                  int prompt_count, uint32_t max_tokens, float temperature) {
  moed::model::Model& model = *engine.model;
  const auto vocab = static_cast<size_t>(model.config().vocab_size);
  // The scheduler's default (SchedulerOptions::sampling_threads 0).
  moed::scheduler::WorkerPool sampling_pool(
      std::clamp(static_cast<int>(std::thread::hardware_concurrency()), 1, 8));
  Rates rates;
  for (int r = 0; r < requests; ++r) {
    std::vector<StreamTimes> streams(static_cast<size_t>(clients));
    std::vector<std::unique_ptr<moed::model::KvCache>> caches;
    std::vector<moed::model::SequenceInput> inputs;
    std::vector<moed::model::Sampler> samplers;
    for (int c = 0; c < clients; ++c) {
      const std::vector<int32_t> prompt = PromptTokens(c, r, prompt_count);
      streams[c].prompt_tokens = static_cast<uint32_t>(prompt.size());
      moed::model::SamplingParams params;
      params.temperature = temperature;
      params.seed = static_cast<uint64_t>(c) * 1000 + static_cast<uint64_t>(r);
      samplers.emplace_back(params, prompt, 0);
      caches.push_back(model.NewKvCache(static_cast<int64_t>(prompt.size() + max_tokens + 1)));
      inputs.push_back({caches.back().get(), prompt, false});
    }
    const auto sent = Clock::now();
    for (StreamTimes& stream : streams) stream.sent = sent;
    for (uint32_t t = 0; t < max_tokens; ++t) {
      auto out = model.Forward(absl::MakeSpan(inputs));
      if (!out.ok()) return out.status();
      auto row = [&](size_t i) {
        return absl::MakeConstSpan(out->logits.data() + i * vocab, vocab);
      };
      if (inputs.size() == 1) {  // as the scheduler: a sequence alone splits its vocabulary
        inputs[0].tokens = {samplers[0]
                                .Next(row(0), sampling_pool.threads(),
                                      [&](int parts, absl::FunctionRef<void(int)> body) {
                                        sampling_pool.ParallelFor(
                                            static_cast<size_t>(parts),
                                            [&](size_t part) { body(static_cast<int>(part)); });
                                      })
                                .token};
      } else {
        sampling_pool.ParallelFor(
            inputs.size(), [&](size_t i) { inputs[i].tokens = {samplers[i].Next(row(i)).token}; });
      }
      const auto now = Clock::now();
      for (StreamTimes& stream : streams) stream.messages.push_back({now, 1});
    }
    for (const StreamTimes& stream : streams) rates.Add(stream);
  }
  return rates;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string server = "127.0.0.1:50051";
  int clients = 8, requests = 4, prompt_tokens = 16, rounds = 1;
  uint32_t max_tokens = 32;
  std::string prompt, engine_config;
  float temperature = 0.8f;
  CLI::App app{"moed-load: concurrent streaming load against a moed daemon"};
  app.add_option("--server", server, "daemon address")->capture_default_str();
  app.add_option("--clients", clients, "concurrent streaming clients")->capture_default_str();
  app.add_option("--requests", requests, "requests per client")->capture_default_str();
  app.add_option("--max-tokens", max_tokens, "tokens per request (generation ignores EOS)")
      ->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens, "prompt length in token ids")
      ->capture_default_str();
  app.add_option("--prompt", prompt, "a text prompt instead of token ids");
  app.add_option("--temperature", temperature, "sampling temperature (0: greedy)")
      ->capture_default_str();
  app.add_option("--engine-config", engine_config,
                 "the daemon's JSON config file: first run the same requests on an engine built "
                 "from it in this process, every client's r-th request in one batch, and print "
                 "the daemon's rates against it (run the daemon with --config on the same file, "
                 "idle meanwhile)");
  app.add_option("--rounds", rounds,
                 "run everything this many times; with --engine-config the engine and the daemon "
                 "alternate, and the ratios are the medians of the rounds'")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  if (!engine_config.empty() && !prompt.empty()) {
    std::cerr << "moed-load: --engine-config runs token-id prompts only (no --prompt)\n";
    return 2;
  }
  std::optional<moed::server::Engine> engine;
  if (!engine_config.empty()) {
    auto loaded = LoadEngine(engine_config);
    if (!loaded.ok()) {
      std::cerr << "moed-load: engine: " << loaded.status() << "\n";
      return 1;
    }
    engine = *std::move(loaded);
  }

  std::mutex mutex;
  Rates engine_rates, daemon_rates;                   // daemon_rates under mutex
  std::vector<double> decode_ratios, prefill_ratios;  // one per round with an engine
  std::vector<double> ttft_ms, itl_ms;
  uint64_t bytes_staged = 0, expert_uses = 0, device_hits = 0;  // under mutex
  std::atomic<int> failures{0};
  std::atomic<uint64_t> tokens{0};
  double seconds = 0;  // the daemon's rounds
  for (int round = 0; round < rounds; ++round) {
    Rates engine_round, daemon_round;  // daemon_round under mutex
    if (engine.has_value()) {
      auto rates = EngineRates(*engine, clients, requests, prompt_tokens, max_tokens, temperature);
      if (!rates.ok()) {
        std::cerr << "moed-load: engine: " << rates.status() << "\n";
        return 1;
      }
      engine_round = *std::move(rates);
      engine_rates.Merge(engine_round);
    }
    auto start = Clock::now();
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(std::max(0, clients)));
    for (int c = 0; c < clients; ++c) {
      threads.emplace_back([&, c] {
        auto client = moed::client::Client::Create(server, std::chrono::minutes(10));
        for (int r = 0; r < requests; ++r) {
          moed::v1::GenerateRequest request;
          if (prompt.empty()) {
            for (int32_t token : PromptTokens(c, r, prompt_tokens))
              request.add_prompt_token_ids(static_cast<uint32_t>(token));
          } else {
            request.set_prompt(prompt);
          }
          request.set_request_id("load-" + std::to_string(c) + "-" + std::to_string(r));
          request.mutable_sampling()->set_max_tokens(max_tokens);
          request.mutable_sampling()->set_temperature(temperature);
          request.mutable_sampling()->set_seed(static_cast<uint64_t>(c) * 1000 +
                                               static_cast<uint64_t>(r));
          StreamTimes times;
          request.mutable_sampling()->set_ignore_eos(true);
          auto sent = Clock::now();
          times.sent = sent;
          auto previous = sent;
          bool first = true;
          uint64_t got = 0;
          std::vector<double> local_itl;
          double local_ttft = 0;
          moed::v1::GenerateResponse last;
          absl::Status status = client->Generate(request, [&](const moed::v1::GenerateResponse& m) {
            auto now = Clock::now();
            if (m.token_ids_size() > 0) {
              double ms = std::chrono::duration<double, std::milli>(now - previous).count();
              if (first) {
                local_ttft = ms;
                first = false;
              } else {
                local_itl.push_back(ms);
              }
              previous = now;
              got += static_cast<uint64_t>(m.token_ids_size());
              times.messages.push_back({now, static_cast<uint32_t>(m.token_ids_size())});
            }
            last = m;
            return true;
          });
          bool ok = status.ok() && last.finish_reason() == moed::v1::FINISH_REASON_LENGTH &&
                    got == max_tokens && last.usage().completion_tokens() == max_tokens;
          if (!ok) {
            ++failures;
            std::lock_guard lock(mutex);
            std::cerr << request.request_id() << ": "
                      << (status.ok() ? "wrong finish or count" : status.ToString()) << "\n";
            continue;
          }
          tokens += got;
          std::lock_guard lock(mutex);
          const moed::v1::ExpertStats& es = last.expert_stats();
          bytes_staged += es.bytes_staged();
          expert_uses += es.device_hits() + es.host_hits() + es.ssd_reads();
          device_hits += es.device_hits();
          ttft_ms.push_back(local_ttft);
          itl_ms.insert(itl_ms.end(), local_itl.begin(), local_itl.end());
          times.prompt_tokens = last.usage().prompt_tokens();
          daemon_round.Add(times);
        }
      });
    }
    for (auto& t : threads) t.join();
    seconds += std::chrono::duration<double>(Clock::now() - start).count();
    daemon_rates.Merge(daemon_round);
    if (engine.has_value()) {
      auto ratio = [](const std::vector<double>& daemon, const std::vector<double>& engine) {
        const double e = Percentile(engine, 50);
        return e > 0 ? Percentile(daemon, 50) / e : 0.0;
      };
      decode_ratios.push_back(ratio(daemon_round.decode_tps, engine_round.decode_tps));
      prefill_ratios.push_back(ratio(daemon_round.prefill_tps, engine_round.prefill_tps));
      if (rounds > 1) {
        std::printf("round %d: daemon / engine: decode per stream %.2f, prefill %.2f (medians)\n",
                    round + 1, decode_ratios.back(), prefill_ratios.back());
      }
    }
  }
  std::printf("clients %d x requests %d%s, %u tokens each: %d failed\n", clients, requests,
              rounds > 1 ? (" x rounds " + std::to_string(rounds)).c_str() : "", max_tokens,
              failures.load());
  std::printf("throughput   %.1f tokens/s (%.2f requests/s) over %.1f s\n", tokens.load() / seconds,
              (clients * requests * rounds - failures.load()) / seconds, seconds);
  std::printf("TTFT ms      p50 %.1f  p90 %.1f  p99 %.1f\n", Percentile(ttft_ms, 50),
              Percentile(ttft_ms, 90), Percentile(ttft_ms, 99));
  std::printf("ITL ms       p50 %.1f  p90 %.1f  p99 %.1f (between messages)\n",
              Percentile(itl_ms, 50), Percentile(itl_ms, 90), Percentile(itl_ms, 99));
  if (engine.has_value()) engine_rates.Print("engine");
  daemon_rates.Print("daemon");
  if (engine.has_value()) {
    std::printf(
        "daemon / engine: decode per stream %.2f, prefill %.2f (medians%s)\n",
        Percentile(decode_ratios, 50), Percentile(prefill_ratios, 50),
        rounds > 1 ? (" of " + std::to_string(rounds) + " alternating rounds").c_str() : "");
  }
  if (bytes_staged > 0) {
    // From each request's expert_stats: bytes staged add up to the cache's own.
    std::printf(
        "experts      %.1f MiB staged per token, %.0f%% of expert uses hit the device tier\n",
        static_cast<double>(bytes_staged) / (1 << 20) /
            std::max<double>(1, static_cast<double>(tokens.load())),
        100.0 * static_cast<double>(device_hits) /
            std::max<double>(1, static_cast<double>(expert_uses)));
  }
  return failures.load() == 0 ? 0 : 1;
} catch (const std::exception& e) {
  std::cerr << "moed-load: " << e.what() << "\n";
  return 1;
}
