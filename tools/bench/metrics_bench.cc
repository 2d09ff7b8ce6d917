// moed-bench-metrics: what recording metrics costs the decode path. The same greedy decode
// workload runs through the scheduler with the daemon's metrics recorder attached and without
// it, in rotating order, and prints each arm's median tokens/s and their ratio. A second arm
// without metrics gives the noise floor of the same run (off/off); then the cost of one recording
// call, timed alone.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "scheduler/scheduler.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "tools/synth/synthesizer.h"

namespace {

using Clock = std::chrono::steady_clock;

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 == 1 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// Tokens per second of `requests` concurrent greedy requests of `tokens` new tokens each.
double RunRound(const std::shared_ptr<moed::model::Model>& model, bool record, int requests,
                int tokens) {
  moed::scheduler::SchedulerOptions options;
  options.max_batch = requests;
  if (record) {
    moed::server::MetricsInfo info;
    info.model_name = "bench";
    options.observer = std::make_shared<moed::server::ServingMetrics>(info);
  }
  moed::scheduler::Scheduler scheduler(model, nullptr, options);
  std::vector<std::shared_ptr<moed::scheduler::RequestHandle>> handles;
  const auto start = Clock::now();
  for (int r = 0; r < requests; ++r) {
    moed::scheduler::GenerationRequest request;
    request.prompt = {1, static_cast<int32_t>(10 + r), 7, 3};
    request.sampling.max_tokens = static_cast<uint32_t>(tokens);
    request.sampling.temperature = 0;
    request.sampling.ignore_eos = true;
    handles.push_back(*scheduler.Submit(std::move(request)));
  }
  uint64_t generated = 0;
  for (auto& handle : handles) {
    while (true) {
      auto event = handle->Next(std::chrono::minutes(10));
      if (!event.has_value()) throw std::runtime_error("a request stalled");
      if (!event->error.ok()) throw std::runtime_error(std::string(event->error.message()));
      if (event->last()) {
        generated += event->completion_tokens;
        break;
      }
    }
  }
  return static_cast<double>(generated) /
         std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) try {
  std::string preset = "demo";
  int rounds = 9, tokens = 256, threads = 0;
  std::vector<int> batches = {1, 16};
  CLI::App app{"moed-bench-metrics: decode with the metrics recorder on and off"};
  app.add_option("--preset", preset, "synthetic model preset (tiny, demo)")->capture_default_str();
  app.add_option("--rounds", rounds, "rounds per arm, alternating")->capture_default_str();
  app.add_option("--tokens", tokens, "new tokens per request")->capture_default_str();
  app.add_option("--batches", batches, "concurrent requests per workload")->capture_default_str();
  app.add_option("--threads", threads, "engine threads (0: all cores)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("moed_bench_metrics_" + std::to_string(getpid()));
  auto spec = moed::tools::PresetSpec(preset, moed::model::Architecture::kMixtral);
  if (!spec.ok() || !moed::tools::WriteCheckpoint(*spec, dir.string()).ok()) {
    std::fprintf(stderr, "cannot write the %s model\n", preset.c_str());
    return 1;
  }
  moed::server::DaemonConfig config;
  config.model = dir.string();
  config.backend = "cpu";
  config.threads = threads;
  auto loaded = moed::server::BuildEngine(config);
  std::filesystem::remove_all(dir);
  if (!loaded.ok()) {
    std::fprintf(stderr, "%s\n", std::string(loaded.status().message()).c_str());
    return 1;
  }
  std::shared_ptr<moed::model::Model> model = loaded->model;
  std::printf("synthetic %s Mixtral, greedy decode of %d tokens per request, %d rounds per arm\n",
              preset.c_str(), tokens, rounds);
  std::printf("%-6s %14s %14s %14s %8s %8s\n", "batch", "off t/s", "on t/s", "off-2 t/s", "on/off",
              "off-2/off");
  RunRound(model, false, batches.front(), 8);  // warm-up: page in the weights
  for (int batch : batches) {
    // Arms: 0 off, 1 on, 2 off again. Each round starts with a different arm, so that drift
    // and whatever a round leaves behind affect all alike.
    std::vector<double> arms[3];
    for (int round = 0; round < rounds; ++round) {
      for (int k = 0; k < 3; ++k) {
        const int arm = (round + k) % 3;
        arms[arm].push_back(RunRound(model, arm == 1, batch, tokens));
      }
    }
    const double off = Median(arms[0]), on = Median(arms[1]), off2 = Median(arms[2]);
    std::printf("%-6d %14.1f %14.1f %14.1f %8.3f %8.3f\n", batch, off, on, off2, on / off,
                off2 / off);
  }

  // One recording call alone: the observations a decode token makes (an inter-token latency
  // and its share of a step's token counts).
  moed::server::MetricsInfo info;
  moed::server::ServingMetrics metrics(info);
  constexpr int kCalls = 10'000'000;
  const auto start = Clock::now();
  for (int i = 0; i < kCalls; ++i) {
    metrics.OnInterToken(0.001 * (i % 100));
    metrics.OnStepTokens(0, 1);
  }
  const double ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count() / kCalls;
  std::printf("recording one decode token: %.1f ns\n", ns);
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moed-bench-metrics: %s\n", e.what());
  return 1;
}
