// moed-load: N concurrent streaming clients, M requests each, against a running daemon.
// Checks that every stream ends with the expected finish reason and token count, and prints
// throughput, time to first token and inter-token latency percentiles.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "client/client.h"

namespace {

using Clock = std::chrono::steady_clock;

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  auto index = static_cast<size_t>(std::lround(p / 100.0 * static_cast<double>(values.size() - 1)));
  return values[std::min(index, values.size() - 1)];
}

}  // namespace

int main(int argc, char** argv) try {
  std::string server = "127.0.0.1:50051";
  int clients = 8, requests = 4, prompt_tokens = 16;
  uint32_t max_tokens = 32;
  std::string prompt;
  CLI::App app{"moed-load: concurrent streaming load against a moed daemon"};
  app.add_option("--server", server, "daemon address")->capture_default_str();
  app.add_option("--clients", clients, "concurrent streaming clients")->capture_default_str();
  app.add_option("--requests", requests, "requests per client")->capture_default_str();
  app.add_option("--max-tokens", max_tokens, "tokens per request (generation ignores EOS)")
      ->capture_default_str();
  app.add_option("--prompt-tokens", prompt_tokens, "prompt length in token ids")
      ->capture_default_str();
  app.add_option("--prompt", prompt, "a text prompt instead of token ids");
  CLI11_PARSE(app, argc, argv);

  std::mutex mutex;
  std::vector<double> ttft_ms, itl_ms;
  uint64_t bytes_staged = 0, expert_uses = 0, device_hits = 0;  // under mutex
  std::atomic<int> failures{0};
  std::atomic<uint64_t> tokens{0};
  auto start = Clock::now();
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(std::max(0, clients)));
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      auto client = moed::client::Client::Create(server, std::chrono::minutes(10));
      for (int r = 0; r < requests; ++r) {
        moed::v1::GenerateRequest request;
        if (prompt.empty()) {
          for (int i = 0; i < prompt_tokens; ++i)
            request.add_prompt_token_ids(
                static_cast<uint32_t>(1 + (c * 131 + r * 17 + i * 7) % 250));
        } else {
          request.set_prompt(prompt);
        }
        request.set_request_id("load-" + std::to_string(c) + "-" + std::to_string(r));
        request.mutable_sampling()->set_max_tokens(max_tokens);
        request.mutable_sampling()->set_temperature(0.8f);
        request.mutable_sampling()->set_seed(static_cast<uint64_t>(c) * 1000 +
                                             static_cast<uint64_t>(r));
        request.mutable_sampling()->set_ignore_eos(true);
        auto sent = Clock::now();
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
      }
    });
  }
  for (auto& t : threads) t.join();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  std::printf("clients %d x requests %d, %u tokens each: %d failed\n", clients, requests,
              max_tokens, failures.load());
  std::printf("throughput   %.1f tokens/s (%.2f requests/s) over %.1f s\n", tokens.load() / seconds,
              (clients * requests - failures.load()) / seconds, seconds);
  std::printf("TTFT ms      p50 %.1f  p90 %.1f  p99 %.1f\n", Percentile(ttft_ms, 50),
              Percentile(ttft_ms, 90), Percentile(ttft_ms, 99));
  std::printf("ITL ms       p50 %.1f  p90 %.1f  p99 %.1f\n", Percentile(itl_ms, 50),
              Percentile(itl_ms, 90), Percentile(itl_ms, 99));
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
