// moed-bench-offload: the SSD tier against its own ceilings, in one run.
//
//  1. Staging throughput: every source blob of a store's experts.bin, in a random order, read
//     with O_DIRECT through moed's io_uring stager, next to fio reading the same file with the
//     same block size and queue depth.
//  2. Decode tokens/s of the store at device budgets of 100 %, 50 % and 25 % of the experts,
//     each next to the all-resident figure and to its roofline: max(compute time, bytes missed
//     / the fio bandwidth), from the cache's own counters.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "cache/aligned_buffer.h"
#include "cache/expert_cache.h"
#include "model/model.h"
#include "nlohmann/json.hpp"
#include "server/engine.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace {

using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Reads the blobs in `order` through the stager until `min_seconds` have passed (whole passes).
double StagerGbps(const moed::cache::Store& store,
                  const std::vector<const moed::cache::BlobEntry*>& order, uint64_t block,
                  int depth, double min_seconds) {
  std::mutex mutex;
  std::condition_variable done;
  uint64_t completed = 0, failed = 0;
  moed::cache::ReaderOptions options;
  options.queue_depth = depth;
  options.max_request_bytes = block;
  auto reader = moed::cache::OpenIoUringReader(store.experts_path(), options,
                                               [&](uint64_t, absl::Status status) {
                                                 std::lock_guard lock(mutex);
                                                 ++completed;
                                                 if (!status.ok()) ++failed;
                                                 done.notify_all();
                                               });
  if (!reader.ok()) {
    std::fprintf(stderr, "%s\n", std::string(reader.status().message()).c_str());
    return 0;
  }
  // One buffer per request in flight, reused.
  std::vector<moed::cache::AlignedBuffer> buffers;
  for (int i = 0; i < depth; ++i) buffers.push_back(*moed::cache::AlignedBuffer::Allocate(block));
  uint64_t bytes = 0, submitted = 0;
  auto start = Clock::now();
  while (Seconds(start, Clock::now()) < min_seconds) {
    for (const auto* blob : order) {
      {
        std::unique_lock lock(mutex);
        done.wait(lock, [&] { return submitted - completed < static_cast<uint64_t>(depth); });
      }
      moed::cache::ReadRequest request{blob->offset, block, buffers[submitted % depth].data(),
                                       submitted};
      (void)(*reader)->Submit(absl::MakeConstSpan(&request, 1));
      ++submitted;
      bytes += block;
    }
  }
  {
    std::unique_lock lock(mutex);
    done.wait(lock, [&] { return completed == submitted; });
  }
  double seconds = Seconds(start, Clock::now());
  if (failed > 0) std::fprintf(stderr, "%lu reads failed\n", static_cast<unsigned long>(failed));
  return bytes / seconds / 1e9;
}

// fio's random-read bandwidth on the same file, block size and queue depth.
double FioGbps(const std::string& file, uint64_t block, int depth, int seconds) {
  std::string json_path = "/tmp/moed-bench-fio.json";
  std::string command =
      "fio --name=moed --filename=" + file +
      " --readonly --rw=randread --bs=" + std::to_string(block) +
      " --iodepth=" + std::to_string(depth) +
      " --ioengine=io_uring --direct=1 --time_based --runtime=" + std::to_string(seconds) +
      " --output-format=json --output=" + json_path + " > /dev/null 2>&1";
  if (std::system(command.c_str()) != 0) return 0;
  std::ifstream in(json_path);
  auto j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) return 0;
  return j["jobs"][0]["read"]["bw_bytes"].get<double>() / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  std::string store_dir = "build/bench-models/bench-6g-store";
  int depth = 4, steps = 16, fio_seconds = 10;
  double stage_seconds = 10;
  CLI::App app{
      "moed-bench-offload: SSD staging against fio, decode at cache budgets against the roofline"};
  app.add_option("--store", store_dir,
                 "expert store (default: synthesize and pack the bench-6g model)")
      ->capture_default_str();
  app.add_option("--queue-depth", depth, "reads in flight for both the stager and fio")
      ->capture_default_str();
  app.add_option("--steps", steps, "decode steps per budget")->capture_default_str();
  app.add_option("--seconds", stage_seconds, "staging measurement time (fio gets the same)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  fio_seconds = static_cast<int>(stage_seconds);

  if (!fs::exists(store_dir + "/manifest.json")) {
    std::string checkpoint = "build/bench-models/bench-6g";
    if (!fs::exists(checkpoint + "/config.json")) {
      std::printf("synthesizing %s ...\n", checkpoint.c_str());
      fs::create_directories("build/bench-models");
      auto spec = moed::tools::PresetSpec("bench-6g", moed::model::Architecture::kMixtral);
      if (auto s = moed::tools::WriteCheckpoint(*spec, checkpoint); !s.ok()) {
        std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
        return 1;
      }
    }
    std::printf("packing %s ...\n", store_dir.c_str());
    if (auto s = moed::tools::Pack(checkpoint, store_dir, moed::tools::PackOptions{}); !s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  auto store = moed::cache::Store::Open(store_dir);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", std::string(store.status().message()).c_str());
    return 1;
  }
  const auto& manifest = (*store)->manifest();
  const uint64_t block = manifest.layouts.at(moed::cache::Precision::kSource).padded_size;
  std::vector<const moed::cache::BlobEntry*> order;
  for (const auto& blob : manifest.blobs) {
    if (blob.precision == moed::cache::Precision::kSource) order.push_back(&blob);
  }
  std::shuffle(order.begin(), order.end(), std::mt19937(1));

  std::printf(
      "\n== staging: %zu source blobs of %.1f MiB, O_DIRECT random reads, queue depth %d ==\n",
      order.size(), block / double(1 << 20), depth);
  double fio = FioGbps((*store)->experts_path(), block, depth, fio_seconds);
  double stager = StagerGbps(**store, order, block, depth, stage_seconds);
  std::printf("%-12s %10s\n%-12s %9.2f\n%-12s %9.2f   (%.0f%% of fio)\n", "reader", "GB/s", "fio",
              fio, "moed stager", stager, fio > 0 ? 100 * stager / fio : 0);

  const auto& c = (*store)->config();
  const uint64_t slot =
      moed::cache::ExpertCache::SlotBytes(**store, moed::cache::Precision::kSource);
  const uint64_t all = slot * c.NumMoeLayers() * c.num_experts;
  std::printf(
      "\n== decode, %s: %ld layers x %ld experts of %.1f MiB (%.2f GiB), top-%ld, 1 sequence ==\n",
      store_dir.c_str(), c.num_layers, c.num_experts, slot / double(1 << 20), all / double(1 << 30),
      c.experts_per_token);
  std::printf("%-8s %10s %12s %14s %14s %12s %10s\n", "budget", "tokens/s", "vs resident",
              "MB missed/tok", "roofline tok/s", "of roofline", "hit rate");
  double resident_seconds = 0;
  for (double fraction : {1.0, 0.5, 0.25}) {
    moed::server::DaemonConfig config;
    config.store = store_dir;
    config.backend = "cpu";
    config.device_cache_bytes = static_cast<int64_t>(fraction * all);
    config.io_queue_depth = depth;
    auto engine = moed::server::BuildEngine(config);
    if (!engine.ok()) return 1;
    moed::cache::ExpertCache* raw = engine->cache.get();
    std::shared_ptr<moed::model::Model> model = engine->model;
    auto kv = model->NewKvCache(8 + steps + 32);
    moed::model::SequenceInput input{kv.get(), {1, 2, 3, 4}, false};
    if (!model->Forward(absl::MakeSpan(&input, 1)).ok()) return 1;
    // The synthetic model's greedy output soon repeats one token, which would make routing
    // unrealistically repetitive: feed a fixed pseudo-random token stream instead (the same
    // for every budget), so consecutive tokens route like unrelated text.
    std::mt19937 tokens(7);
    auto next_token = [&] {
      return static_cast<int32_t>(tokens() % static_cast<uint32_t>(c.vocab_size));
    };
    // Warm-up: the resident run loads every expert it will use at least once.
    for (int warm = 0; warm < (fraction == 1.0 ? 24 : 2); ++warm) {
      input.tokens = {next_token()};
      if (!model->Forward(absl::MakeSpan(&input, 1)).ok()) return 1;
    }
    auto before = raw->counters();
    auto start = Clock::now();
    for (int s = 0; s < steps; ++s) {
      input.tokens = {next_token()};
      if (!model->Forward(absl::MakeSpan(&input, 1)).ok()) return 1;
    }
    double seconds = Seconds(start, Clock::now()) / steps;
    auto after = raw->counters();
    double missed = static_cast<double>(after.ssd_bytes - before.ssd_bytes) / steps;
    uint64_t hits = after.device.hits - before.device.hits,
             misses = after.device.misses - before.device.misses;
    if (fraction == 1.0) resident_seconds = seconds;
    double roofline = std::max(resident_seconds, fio > 0 ? missed / (fio * 1e9) : 0.0);
    std::printf("%6.0f%% %10.2f %11.0f%% %14.1f %14.2f %11.0f%% %9.0f%%\n", 100 * fraction,
                1 / seconds, 100 * resident_seconds / seconds, missed / 1e6, 1 / roofline,
                100 * roofline / seconds, 100.0 * hits / std::max<uint64_t>(1, hits + misses));
  }
  return 0;
}
