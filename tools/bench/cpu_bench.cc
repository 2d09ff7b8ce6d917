// moed-bench-cpu: how close the CPU engine comes to the memory-read ceiling.
//
// Prints, from one run:
//  1. the read ceiling: a SIMD read-only sweep over a buffer larger than the caches;
//  2. expert-FFN GEMV throughput (one token through gate, up and down of many experts, so
//     the weights stream from memory) in bytes of weights per second, next to the sweep
//     over the same bytes, with 1 and 2 threads;
//  3. decode tokens/s of a Mixtral-shaped bf16 model with 1 and 8 sequences, the bytes of
//     weights each step reads (from the routing it observed) and the fraction of the ceiling.
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "kernels/backend.h"
#include "kernels/cpu_backend.h"
#include "kernels/cpu_ops.h"
#include "model/model.h"
#include "model/sampler.h"
#include "server/engine.h"
#include "tools/bench/timing_backend.h"
#include "tools/synth/synthesizer.h"

namespace {

using Clock = std::chrono::steady_clock;
using moed::kernels::DType;
using moed::kernels::ThreadPool;
using moed::kernels::WeightMatrix;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

__attribute__((target("avx512f"))) float SweepAvx512(const uint8_t* data, size_t bytes) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const float* p = reinterpret_cast<const float*>(data);
  size_t n = bytes / 4;
  for (size_t i = 0; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  alignas(64) float out[16];
  _mm512_store_ps(out, _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  return out[0];
}

__attribute__((target("avx2"))) float SweepAvx2(const uint8_t* data, size_t bytes) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const float* p = reinterpret_cast<const float*>(data);
  size_t n = bytes / 4;
  for (size_t i = 0; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  alignas(32) float out[8];
  _mm256_store_ps(out, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  return out[0];
}

// Reads `bytes` of each region once, split over the pool; returns GB/s (median of `reps`).
double SweepGbps(const std::vector<std::pair<const uint8_t*, size_t>>& regions, ThreadPool& pool,
                 int reps) {
  bool avx512 = __builtin_cpu_supports("avx512f");
  size_t total = 0;
  for (auto& r : regions) total += r.second;
  std::vector<double> rates;
  volatile float sink = 0;
  for (int rep = 0; rep < reps; ++rep) {
    auto start = Clock::now();
    for (const auto& region : regions) {
      const uint8_t* data = region.first;
      const size_t bytes = region.second;
      pool.ParallelFor(pool.size(), [&](int64_t b, int64_t e) {
        for (int64_t part = b; part < e; ++part) {
          size_t chunk = bytes / pool.size() / 256 * 256;
          size_t begin = chunk * part;
          size_t len = part == pool.size() - 1 ? bytes - begin : chunk;
          sink = sink + (avx512 ? SweepAvx512(data + begin, len) : SweepAvx2(data + begin, len));
        }
      });
    }
    rates.push_back(total / Seconds(start, Clock::now()) / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

struct Expert {
  WeightMatrix gate, up, down;
  uint64_t bytes() const {
    return 2ull * (gate.rows * gate.cols + up.rows * up.cols + down.rows * down.cols);
  }
};

// `tokens` tokens through each expert in turn: gate, up, SwiGLU, down. Returns GB/s of weights.
double ExpertGemvGbps(const std::vector<Expert>& experts, ThreadPool& pool, int reps,
                      int tokens = 1) {
  const int64_t hidden = experts[0].gate.cols, inter = experts[0].gate.rows;
  std::vector<float> x(hidden * tokens, 0.01f), g(inter * tokens), u(inter * tokens),
      y(hidden * tokens);
  uint64_t bytes = 0;
  for (const Expert& e : experts) bytes += e.bytes();
  std::vector<double> rates;
  for (int rep = 0; rep < reps; ++rep) {
    auto start = Clock::now();
    for (const Expert& e : experts) {
      moed::kernels::cpu::MatMul(e.gate, x.data(), tokens, g.data(), pool);
      moed::kernels::cpu::MatMul(e.up, x.data(), tokens, u.data(), pool);
      moed::kernels::cpu::SiluMul(g.data(), u.data(), inter * tokens, g.data());
      moed::kernels::cpu::MatMul(e.down, g.data(), tokens, y.data(), pool);
    }
    rates.push_back(bytes / Seconds(start, Clock::now()) / 1e9);
  }
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace

int main(int argc, char** argv) try {
  std::string model_dir;
  int steps = 32;
  CLI::App app{"moed-bench-cpu: CPU kernels and decode against the memory-read ceiling"};
  app.add_option("--model", model_dir,
                 "bf16 Mixtral-shaped checkpoint (default: synthesize the bench-1g preset under "
                 "build/bench-models)");
  app.add_option("--steps", steps, "decode steps per measurement")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::string cpu_name = "unknown CPU";
  if (auto cpu = moed::kernels::CreateBackend(moed::kernels::BackendKind::kCpu); cpu.ok()) {
    if (auto info = cpu->backend->device().info(); info.ok()) cpu_name = info->name;
  }
  std::printf("host: %s, isa: %s, hardware threads: %u\n", cpu_name.c_str(),
              moed::kernels::cpu::IsaName(moed::kernels::cpu::DetectIsa()),
              std::thread::hardware_concurrency());

  // Expert GEMV vs the sweep, on 48 synthetic Mixtral-bench experts (hidden 1024,
  // intermediate 2816): 830 MB, far beyond the caches.
  const int64_t hidden = 1024, inter = 2816;
  const int num_experts = 48;
  std::vector<std::vector<uint16_t>> storage;
  std::vector<Expert> experts;
  std::mt19937 rng(1);
  for (int e = 0; e < num_experts; ++e) {
    Expert expert;
    for (auto [m, rows, cols] :
         {std::tuple{&expert.gate, inter, hidden}, std::tuple{&expert.up, inter, hidden},
          std::tuple{&expert.down, hidden, inter}}) {
      storage.emplace_back(static_cast<size_t>(rows * cols));
      for (auto& v : storage.back())
        v = static_cast<uint16_t>(0x3C00 + (rng() & 0x3FF));  // small bf16
      *m = WeightMatrix{DType::kBF16, storage.back().data(), rows, cols};
    }
    experts.push_back(expert);
  }
  std::vector<std::pair<const uint8_t*, size_t>> regions;
  regions.reserve(storage.size());
  for (auto& s : storage)
    regions.emplace_back(reinterpret_cast<const uint8_t*>(s.data()), s.size() * 2);

  std::printf("\n== expert FFN GEMV (bf16, 1 token, %d experts of %.1f MB) ==\n", num_experts,
              experts[0].bytes() / 1e6);
  std::printf("%-8s %14s %14s %8s %16s %16s\n", "threads", "sweep GB/s", "GEMV GB/s", "ratio",
              "2 tokens GB/s", "4 tokens GB/s");
  double ceiling = 0;
  for (int threads : {1, 2}) {
    ThreadPool pool(threads);
    double sweep = SweepGbps(regions, pool, 7);
    double gemv = ExpertGemvGbps(experts, pool, 7);
    double two = ExpertGemvGbps(experts, pool, 3, 2);
    double four = ExpertGemvGbps(experts, pool, 3, 4);
    std::printf("%-8d %14.1f %14.1f %7.0f%% %16.1f %16.1f\n", threads, sweep, gemv,
                100 * gemv / sweep, two, four);
    ceiling = std::max(ceiling, sweep);
  }
  experts.clear();  // the sweep's buffers stay: it runs again after the decode

  // Decode.
  if (model_dir.empty()) {
    model_dir = "build/bench-models/bench-1g";
    if (!std::filesystem::exists(model_dir + "/config.json")) {
      std::printf("\nsynthesizing %s ...\n", model_dir.c_str());
      auto spec = moed::tools::PresetSpec("bench-1g", moed::model::Architecture::kMixtral);
      std::filesystem::create_directories("build/bench-models");
      if (auto s = moed::tools::WriteCheckpoint(*spec, model_dir); !s.ok()) {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
  }
  moed::server::DaemonConfig config;
  config.model = model_dir;
  config.backend = "cpu";
  auto engine = moed::server::BuildEngine(config);
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  std::shared_ptr<moed::model::Model> model = engine->model;
  const auto& c = model->config();
  const uint64_t expert_bytes = 2ull * c.ExpertParameters();
  const uint64_t attention_bytes =
      2ull * c.hidden_size *
      (2 * c.num_attention_heads * c.head_dim + 2 * c.num_key_value_heads * c.head_dim);
  const uint64_t per_step_dense =
      c.num_layers * (attention_bytes + 2ull * c.num_experts * c.hidden_size) +
      2ull * c.vocab_size * c.hidden_size;  // + router, + lm_head
  std::printf(
      "\n== decode, %s: hidden %ld, %ld layers, %ld experts of %.1f MB, top-%ld, vocab %ld ==\n",
      model_dir.c_str(), c.hidden_size, c.num_layers, c.num_experts, expert_bytes / 1e6,
      c.experts_per_token, c.vocab_size);
  struct DecodeRow {
    int sequences;
    double tokens_per_second, mb_per_step, gbps;
  };
  std::vector<DecodeRow> decode_rows;
  double single_step_seconds = 0;
  std::vector<float> step_logits;  // the last single-sequence step's, for the sampler section
  // Each figure is the median of five rounds (each from a fresh prefill, the same tokens): a
  // round lasts under a second, and this machine's read rate moves within seconds.
  constexpr int kRounds = 5;
  for (int sequences : {1, 8}) {
    std::vector<DecodeRow> rounds;
    for (int round = 0; round < kRounds; ++round) {
      std::vector<std::unique_ptr<moed::model::KvCache>> caches;
      std::vector<moed::model::SequenceInput> inputs;
      for (int s = 0; s < sequences; ++s) {
        caches.push_back(model->NewKvCache(16 + steps + 8));
        inputs.push_back({caches.back().get(), {1 + s, 100 + s, 200 + s, 300 + s}, false});
      }
      auto prefill = model->Forward(absl::MakeSpan(inputs));  // also pulls the weights into RAM
      if (!prefill.ok()) return 1;
      std::vector<int32_t> next(sequences, 5);
      double seconds = 0;
      uint64_t bytes = 0;
      for (int step = 0; step < steps + 2; ++step) {
        for (int s = 0; s < sequences; ++s) inputs[s].tokens = {next[s]};
        auto start = Clock::now();
        auto out = model->Forward(absl::MakeSpan(inputs));
        auto end = Clock::now();
        if (!out.ok()) return 1;
        for (int s = 0; s < sequences; ++s) {
          const float* row = out->logits.data() + s * c.vocab_size;
          next[s] = static_cast<int32_t>(std::max_element(row, row + c.vocab_size) - row);
        }
        if (step < 2) continue;  // warm-up
        seconds += Seconds(start, end);
        uint64_t step_bytes = per_step_dense;
        for (const auto& layer : out->routing) {
          std::set<int> unique;
          for (const auto& token : layer) unique.insert(token.begin(), token.end());
          step_bytes += unique.size() * expert_bytes;
        }
        bytes += step_bytes;
      }
      rounds.push_back({sequences, sequences * steps / seconds,
                        static_cast<double>(bytes) / 1e6 / steps, bytes / seconds / 1e9});
      if (sequences == 1 && round == kRounds - 1) {
        auto last = model->Forward(absl::MakeSpan(inputs));
        if (!last.ok()) return 1;
        step_logits.assign(last->logits.begin(), last->logits.begin() + c.vocab_size);
      }
    }
    std::sort(rounds.begin(), rounds.end(), [](const DecodeRow& a, const DecodeRow& b) {
      return a.tokens_per_second < b.tokens_per_second;
    });
    decode_rows.push_back(rounds[kRounds / 2]);
    if (sequences == 1) single_step_seconds = 1 / rounds[kRounds / 2].tokens_per_second;
  }
  // The sweep again, 2 threads, after the decode: the machine's read rate drifts over a minute,
  // and the ceiling is the best it showed on either side of the decode.
  double sweep_after = 0;
  {
    ThreadPool pool(2);
    sweep_after = SweepGbps(regions, pool, 7);
  }
  ceiling = std::max(ceiling, sweep_after);
  storage.clear();
  std::printf("%-10s %10s %16s %14s %10s\n", "sequences", "tokens/s", "MB read / step", "GB/s read",
              "ceiling");
  for (const DecodeRow& row : decode_rows) {
    std::printf("%-10d %10.1f %16.1f %14.1f %9.0f%%\n", row.sequences, row.tokens_per_second,
                row.mb_per_step, row.gbps, 100 * row.gbps / ceiling);
  }
  std::printf(
      "\nceiling = the best read-only sweep, above or with 2 threads after the decode (%.1f GB/s): "
      "%.1f GB/s\n",
      sweep_after, ceiling);

  // The sampler, per token, against the single-sequence decode step measured above: on this
  // model's own logits (random weights: flat, nothing far below the top) and on logits spread
  // as a trained model's (a clear favourite, most of the vocabulary far below it).
  std::vector<float> trained(static_cast<size_t>(c.vocab_size));
  {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 6.0f);
    for (float& l : trained) l = normal(rng);
    trained[42] += 25.0f;
  }
  struct SamplerCase {
    const char* name;
    moed::model::SamplingParams params;
    bool split = false;  // the vocabulary's passes split over 2 threads, as the scheduler does
                         // for a sequence sampling alone
    moed::model::SamplerOptions options = {};
  };
  auto with = [](auto change) {
    moed::model::SamplingParams params;
    params.seed = 1;
    change(params);
    return params;
  };
  const SamplerCase sampler_cases[] = {
      {"greedy", with([](auto& p) { p.temperature = 0; })},
      {"temperature 0.8", with([](auto& p) { p.temperature = 0.8f; })},
      {"  split over 2", with([](auto& p) { p.temperature = 0.8f; }), true},
      {"  exact path", with([](auto& p) { p.temperature = 0.8f; }), false, {.fast_path = false}},
      {"  SSE2 lanes", with([](auto& p) { p.temperature = 0.8f; }), false, {.widest_simd = false}},
      {"top-k 40", with([](auto& p) { p.top_k = 40; })},
      {"top-p 0.95", with([](auto& p) { p.top_p = 0.95f; })},
      {"  split over 2", with([](auto& p) { p.top_p = 0.95f; }), true},
      {"  exact path", with([](auto& p) { p.top_p = 0.95f; }), false, {.fast_path = false}},
      {"min-p 0.05", with([](auto& p) { p.min_p = 0.05f; })},
      {"penalties", with([](auto& p) {
         p.presence_penalty = 0.5f;
         p.frequency_penalty = 0.5f;
         p.repetition_penalty = 1.1f;
       })},
      {"logprobs, top 5", with([](auto& p) {
         p.logprobs = true;
         p.top_logprobs = 5;
       })},
  };
  std::printf("\n== sampler, vocab %ld, per token, against a 1-sequence decode step (%.2f ms) ==\n",
              c.vocab_size, 1e3 * single_step_seconds);
  std::printf("%-18s %14s %10s %16s %10s\n", "parameters", "model's us", "of step",
              "trained-like us", "of step");
  const std::vector<int32_t> prompt(64, 7);
  ThreadPool split_pool(2);
  auto on_split_pool = [&](int parts, absl::FunctionRef<void(int)> body) {
    split_pool.ParallelFor(parts, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) body(static_cast<int>(part));
    });
  };
  moed::model::Sampler::Counters draws;  // of the rows on the default (fast) path
  for (const SamplerCase& sc : sampler_cases) {
    double per_call[2];
    int i = 0;
    for (const std::vector<float>* logits : {&step_logits, &trained}) {
      moed::model::Sampler sampler(sc.params, prompt, 0, sc.options);
      auto next = [&] {
        return sc.split ? sampler.Next(*logits, 2, on_split_pool) : sampler.Next(*logits);
      };
      constexpr int kCalls = 200;
      for (int warm = 0; warm < 5; ++warm) next();
      auto start = Clock::now();
      for (int call = 0; call < kCalls; ++call) next();
      per_call[i++] = Seconds(start, Clock::now()) / kCalls;
      if (sc.options.fast_path && sc.options.widest_simd) {
        draws.fast_draws += sampler.counters().fast_draws;
        draws.exact_draws += sampler.counters().exact_draws;
      }
    }
    std::printf("%-18s %14.1f %9.1f%% %16.1f %9.1f%%\n", sc.name, 1e6 * per_call[0],
                100 * per_call[0] / single_step_seconds, 1e6 * per_call[1],
                100 * per_call[1] / single_step_seconds);
  }
  std::printf(
      "sampled draws on the fast path: %lu; left to the exact path (a close call, or top-k): %lu\n",
      static_cast<unsigned long>(draws.fast_draws), static_cast<unsigned long>(draws.exact_draws));

  // A sampled single-sequence decode step by stage: every operator timed as it runs (the CPU
  // backend finishes each before returning), the sampler, and what is left (the engine's own
  // work between operators: routing back to the host, the expert provider, bookkeeping).
  auto timing = std::make_shared<moed::tools::TimingBackend>(
      std::shared_ptr<moed::kernels::Backend>(moed::kernels::CreateCpuBackend(0)));
  auto timed_model = moed::model::Model::Load(model_dir, timing);
  if (!timed_model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(timed_model.status().message()).c_str());
    return 1;
  }
  for (int sequences : {1, 8}) {
    std::vector<std::unique_ptr<moed::model::KvCache>> caches;
    std::vector<moed::model::SequenceInput> inputs;
    std::vector<moed::model::Sampler> samplers;
    for (int s = 0; s < sequences; ++s) {
      caches.push_back((*timed_model)->NewKvCache(16 + steps + 8));
      inputs.push_back({caches.back().get(), {1 + s, 100 + s, 200 + s, 300 + s}, false});
      moed::model::SamplingParams sampling;
      sampling.temperature = 0.8f;
      sampling.seed = 1 + s;
      samplers.emplace_back(sampling, inputs.back().tokens, 0);
    }
    const int64_t vocab = (*timed_model)->config().vocab_size;
    double step_seconds = 0, sampler_seconds = 0;
    for (int step = 0; step < steps + 3; ++step) {
      if (step == 3) timing->timing().Reset();  // prefill and two warm-up steps
      const auto start = Clock::now();
      auto out = (*timed_model)->Forward(absl::MakeSpan(inputs));
      if (!out.ok()) return 1;
      const auto forward_done = Clock::now();
      for (int s = 0; s < sequences; ++s) {
        const int32_t token = samplers[s]
                                  .Next(absl::MakeConstSpan(out->logits.data() + s * vocab,
                                                            static_cast<size_t>(vocab)))
                                  .token;
        inputs[s].tokens = {token};
      }
      const auto end = Clock::now();
      if (step >= 3) {
        step_seconds += Seconds(start, end);
        sampler_seconds += Seconds(forward_done, end);
      }
    }
    std::printf(
        "\n== a sampled decode step by stage (%d sequence%s, temperature 0.8, %.2f ms a step) ==\n",
        sequences, sequences == 1 ? "" : "s", 1e3 * step_seconds / steps);
    std::printf("%-18s %10s %8s %12s\n", "stage", "ms/step", "share", "calls/step");
    double operators = 0;
    for (const auto& [op, total] : timing->timing().totals()) {
      operators += total.seconds;
      std::printf("%-18s %10.3f %7.1f%% %12.1f\n", moed::kernels::OpName(op),
                  1e3 * total.seconds / steps, 100 * total.seconds / step_seconds,
                  static_cast<double>(total.calls) / steps);
    }
    std::printf("%-18s %10.3f %7.1f%% %12.1f\n", "sampler", 1e3 * sampler_seconds / steps,
                100 * sampler_seconds / step_seconds, static_cast<double>(sequences));
    const double rest = step_seconds - operators - sampler_seconds;
    std::printf("%-18s %10.3f %7.1f%%\n", "between operators", 1e3 * rest / steps,
                100 * rest / step_seconds);
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moed-bench-cpu: %s\n", e.what());
  return 1;
}
