// moed-bench-offload: the SSD tier against its own ceilings, in one run.
//
//  1. Staging throughput: every source blob of a store's experts.bin, in a random order, read
//     with O_DIRECT through moed's io_uring stager, next to fio reading the same file with the
//     same block size and queue depth.
//  2. Decode tokens/s of the store at device budgets (default 100 %, 50 % and 25 % of the
//     experts) with each prefetch predictor, next to the all-resident figure and to the
//     roofline: max(compute time, bytes missed / the fio bandwidth), from the cache's own
//     counters; and the seconds per token the engine stalled for experts, next to the time
//     the bytes it missed take at fio's bandwidth. With --routing-trace, every layer routes
//     as the recorded trace did (real Mixtral locality on the 32-layer bench model).
//     With --precision, each precision setting too (exact, always:int4, threshold:int4:0.3,
//     floor:int4 ...): the missed bytes then include the fallback copies read.
//     With --backend cuda (and --host-cache 1, every expert in pinned RAM), the experts cross
//     PCIe: first the tier's copies to the device against the backend's bare copy of one
//     pinned buffer, measured in the same run; then decode against all-resident on the same
//     GPU and the roofline max(compute time, bytes copied / that bare copy rate).
//  3. With the model's own routing: each predictor's recall and precision per predicted
//     layer, as the running prefetcher scores them.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cache/aligned_buffer.h"
#include "cache/expert_cache.h"
#include "cache/routing_trace.h"
#include "kernels/backend.h"
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
                                               [&](uint64_t, const absl::Status& status) {
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
  buffers.reserve(static_cast<size_t>(depth));
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

// fio's random-read bandwidth on the same file, block size and queue depth, over the same
// blocks: the region [offset, offset + size) of the blobs, in whole blocks from its start.
double FioGbps(const std::string& file, uint64_t block, int depth, int seconds, uint64_t offset,
               uint64_t size) {
  std::string json_path = "/tmp/moed-bench-fio.json";
  std::string command =
      "fio --name=moed --filename=" + file + " --offset=" + std::to_string(offset) +
      " --size=" + std::to_string(size) +
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

namespace {

struct DecodeRun {
  double fallbacks_per_token = 0;
  double seconds_per_token = 0;
  double stall_per_token = 0;
  double missed_bytes_per_token = 0;   // read from the store
  double copied_bytes_per_token = 0;   // brought into the device tier
  double host_computes_per_token = 0;  // experts run on the CPU instead (--host-compute auto)
  double hit_rate = 0;
  moed::cache::CacheCounters delta;  // the measured steps only (prefetch fields)
  std::vector<moed::cache::LayerPrefetchStats> layers;
};

// Copies to the device, in GB/s: the backend's copy stream copying one pinned expert-sized
// buffer over and over (the bare rate), and the expert cache bringing experts from its host
// tier (every expert resident there) into a device tier of 8 slots.
struct CopyRates {
  double bare_gbps = 0;
  double tier_gbps = 0;
  uint64_t tier_copies = 0;
};

// Every routed expert of the model, layer by layer.
std::vector<std::pair<int, int>> AllExperts(const moed::model::ModelConfig& c) {
  std::vector<std::pair<int, int>> experts;
  for (int l = 0; l < c.num_layers; ++l) {
    if (!c.IsMoeLayer(l)) continue;
    for (int e = 0; e < c.num_experts; ++e) experts.push_back({l, e});
  }
  return experts;
}

// Claims one expert and waits until its copy is queued: the event it is done at.
absl::StatusOr<moed::kernels::Event> Bring(moed::cache::ExpertCache& cache,
                                           const std::pair<int, int>& expert) {
  auto handle = cache.Acquire(expert.first, expert.second, cache.options().precision);
  if (!handle.ok()) return handle.status();
  if (auto s = handle->Wait(); !s.ok()) return s;
  return handle->ready_event();
}

// Brings every expert in once (with a host tier that holds them all, it then does).
absl::Status BringAll(moed::cache::ExpertCache& cache, const moed::model::ModelConfig& c) {
  for (const auto& expert : AllExperts(c)) {
    if (auto ready = Bring(cache, expert); !ready.ok()) return ready.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<CopyRates> MeasureCopies(const std::string& store_dir, const std::string& backend,
                                        moed::cache::Precision precision, double seconds) {
  auto kind = moed::kernels::ParseBackendKind(backend);
  if (!kind.ok()) return kind.status();
  auto choice = moed::kernels::CreateBackend(*kind);
  if (!choice.ok()) return choice.status();
  std::shared_ptr<moed::kernels::Backend> device = std::move(choice->backend);
  auto store = moed::cache::Store::Open(store_dir);
  if (!store.ok()) return store.status();
  const uint64_t slot = moed::cache::ExpertCache::SlotBytes(**store, precision);
  CopyRates rates;
  {
    auto pinned = device->device().AllocateHost(slot);
    auto target = device->device().Allocate(slot);
    if (!pinned.ok()) return pinned.status();
    if (!target.ok()) return target.status();
    std::memset(pinned->data(), 1, slot);
    moed::kernels::Stream& copy = device->copy();
    uint64_t copies = 0;
    const auto start = Clock::now();
    do {
      for (int i = 0; i < 8; ++i, ++copies) {
        if (auto s = copy.CopyToDevice(*target, 0, pinned->data(), slot); !s.ok()) return s;
      }
      if (auto s = copy.Synchronize(); !s.ok()) return s;
    } while (Seconds(start, Clock::now()) < seconds);
    rates.bare_gbps = static_cast<double>(copies * slot) / Seconds(start, Clock::now()) / 1e9;
  }
  const auto& c = (*store)->config();
  moed::cache::CacheOptions options;
  options.backend = device;
  options.precision = precision;
  options.device_bytes = 8 * slot;
  options.host_bytes = slot * static_cast<uint64_t>(c.NumMoeLayers() * c.num_experts);
  options.eviction_scope = moed::cache::EvictionScope::kGlobal;
  auto cache = moed::cache::ExpertCache::Create(*store, options);
  if (!cache.ok()) return cache.status();
  if (auto s = BringAll(**cache, c); !s.ok()) return s;  // every expert into the host tier
  const std::vector<std::pair<int, int>> experts = AllExperts(c);
  const uint64_t before = (*cache)->counters().host.hits;
  moed::kernels::Event last;
  const auto start = Clock::now();
  size_t next = 0;
  do {
    for (int i = 0; i < 8; ++i, next = (next + 1) % experts.size()) {
      auto ready = Bring(**cache, experts[next]);
      if (!ready.ok()) return ready.status();
      last = *ready;
    }
  } while (Seconds(start, Clock::now()) < seconds);
  if (auto s = device->device().WaitForEvent(last); !s.ok()) return s;
  const double elapsed = Seconds(start, Clock::now());
  rates.tier_copies = (*cache)->counters().host.hits - before;
  rates.tier_gbps = static_cast<double>(rates.tier_copies * slot) / elapsed / 1e9;
  return rates;
}

// Builds the engine of `config`, prefills 4 tokens, decodes `warm` then `steps` tokens of a
// fixed pseudo-random stream (the synthetic model's greedy output soon repeats one token,
// which would make its own routing unrealistically repetitive), measuring the `steps`. With
// `fill_host`, every expert is brought in once first (the host tier then holds them all).
absl::StatusOr<DecodeRun> Decode(const moed::server::DaemonConfig& config, int warm, int steps,
                                 moed::model::Precision loosest = moed::model::Precision::kSource,
                                 bool fill_host = false) {
  auto engine = moed::server::BuildEngine(config);
  if (!engine.ok()) return engine.status();
  moed::cache::ExpertCache* raw = engine->cache.get();
  if (fill_host) {
    if (auto s = BringAll(*raw, engine->model_config); !s.ok()) return s;
  }
  std::shared_ptr<moed::model::Model> model = engine->model;
  const auto& c = engine->model_config;
  auto kv = model->NewKvCache(8 + warm + steps);
  moed::model::SequenceInput input{kv.get(), {1, 2, 3, 4}, false, loosest};
  if (auto out = model->Forward(absl::MakeSpan(&input, 1)); !out.ok()) return out.status();
  std::mt19937 tokens(7);
  auto next_token = [&] {
    return static_cast<int32_t>(tokens() % static_cast<uint32_t>(c.vocab_size));
  };
  for (int w = 0; w < warm; ++w) {
    input.tokens = {next_token()};
    if (auto out = model->Forward(absl::MakeSpan(&input, 1)); !out.ok()) return out.status();
  }
  if (config.low_bit_floor) {
    // Measured once the floor is in, as a daemon serves after its start-up fill.
    const auto deadline = Clock::now() + std::chrono::minutes(2);
    while (raw->counters().fallback.resident < raw->counters().fallback.slots &&
           Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  const auto before = raw->counters();
  const auto start = Clock::now();
  for (int s = 0; s < steps; ++s) {
    input.tokens = {next_token()};
    if (auto out = model->Forward(absl::MakeSpan(&input, 1)); !out.ok()) return out.status();
  }
  DecodeRun run;
  run.seconds_per_token = Seconds(start, Clock::now()) / steps;
  const auto after = raw->counters();
  // Bytes read: those requested, less the cancelled prefetches' (read at most a piece of each).
  run.missed_bytes_per_token =
      static_cast<double>((after.ssd_bytes - before.ssd_bytes) -
                          (after.cancelled_read_bytes - before.cancelled_read_bytes)) /
      steps;
  run.copied_bytes_per_token =
      static_cast<double>(after.device.bytes_in - before.device.bytes_in) / steps;
  run.host_computes_per_token =
      static_cast<double>(after.host_computes - before.host_computes) / steps;
  run.stall_per_token = (after.wait_seconds - before.wait_seconds) / steps;
  run.fallbacks_per_token = static_cast<double>((after.fallbacks_int8 + after.fallbacks_int4) -
                                                (before.fallbacks_int8 + before.fallbacks_int4)) /
                            steps;
  // Served from a resident copy, full or fallback, against every use.
  const uint64_t hits = (after.device.hits + after.fallback.hits) -
                        (before.device.hits + before.fallback.hits),
                 misses = (after.device.misses + after.fallback.misses) -
                          (before.device.misses + before.fallback.misses);
  run.hit_rate = static_cast<double>(hits) / std::max<uint64_t>(1, hits + misses);
  run.delta.prefetch_issued = after.prefetch_issued - before.prefetch_issued;
  run.delta.prefetch_useful = after.prefetch_useful - before.prefetch_useful;
  run.delta.prefetch_late = after.prefetch_late - before.prefetch_late;
  run.delta.prefetch_wasted = after.prefetch_wasted - before.prefetch_wasted;
  if (engine->prefetcher != nullptr) run.layers = engine->prefetcher->layer_stats();
  return run;
}

// Writes `path`'s sequences except the first to `out`: the affinity predictor's calibration
// when the first sequence is the one replayed (trace-driven runs route as sequence 0).
bool WriteHeldOutCalibration(const std::string& path, const std::string& out) {
  auto traces = moed::cache::ReadRoutingTraces(path);
  if (!traces.ok() || traces->size() < 2) return false;
  fs::remove(out);
  for (size_t i = 1; i < traces->size(); ++i) {
    if (!moed::cache::AppendRoutingTrace(out, (*traces)[i]).ok()) return false;
  }
  return true;
}

// One --precision entry: exact, always:P, threshold:P:TAU or floor:P (always, low-bit floor).
struct PrecisionSetting {
  std::string label, policy = "exact", fallback = "int4";
  double threshold = 0;
  bool floor = false;
};

absl::StatusOr<PrecisionSetting> ParsePrecisionSetting(const std::string& text) {
  PrecisionSetting setting;
  setting.label = text;
  const std::vector<std::string> parts = absl::StrSplit(text, ':');
  const std::string& kind = parts[0];
  if (kind == "exact" && parts.size() == 1) return setting;
  if (parts.size() < 2 || (parts[1] != "int8" && parts[1] != "int4")) {
    return absl::InvalidArgumentError(
        "--precision " + text + ": exact, always:P, threshold:P:TAU or floor:P (P int8|int4)");
  }
  setting.fallback = parts[1];
  if (kind == "always" && parts.size() == 2) {
    setting.policy = "always";
  } else if (kind == "floor" && parts.size() == 2) {
    setting.policy = "always";
    setting.floor = true;
  } else if (kind == "threshold" && parts.size() == 3 &&
             absl::SimpleAtod(parts[2], &setting.threshold)) {
    setting.policy = "threshold";
  } else {
    return absl::InvalidArgumentError(
        "--precision " + text + ": exact, always:P, threshold:P:TAU or floor:P (P int8|int4)");
  }
  return setting;
}

bool EnsureStore(const std::string& preset, const std::string& store_dir) {
  if (fs::exists(store_dir + "/manifest.json")) return true;
  std::string checkpoint = "build/bench-models/" + preset;
  if (!fs::exists(checkpoint + "/config.json")) {
    std::printf("synthesizing %s ...\n", checkpoint.c_str());
    fs::create_directories("build/bench-models");
    auto spec = moed::tools::PresetSpec(preset, moed::model::Architecture::kMixtral);
    if (auto s = moed::tools::WriteCheckpoint(*spec, checkpoint); !s.ok()) {
      std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
      return false;
    }
  }
  std::printf("packing %s ...\n", store_dir.c_str());
  if (auto s = moed::tools::Pack(checkpoint, store_dir, moed::tools::PackOptions{}); !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) try {
  std::string store_dir, routing_trace, calibration;
  int depth = 4, steps = 16, fio_seconds = 10, prefetch_depth = 1, predict_steps = 32, runs = 1,
      prefetch_candidates = 1;
  double stage_seconds = 10;
  std::vector<double> budgets = {1.0, 0.5, 0.25};
  std::vector<std::string> predictors = {"off", "history", "affinity", "combined"};
  std::vector<std::string> precision_texts = {"exact"};
  std::string expert_precision = "source";
  std::string backend = "cpu", host_compute = "off";
  double host_fraction = 0;
  bool skip_staging = false;
  CLI::App app{
      "moed-bench-offload: SSD staging against fio, decode at cache budgets and prefetch "
      "predictors against the roofline"};
  app.add_option("--store", store_dir,
                 "expert store (default: synthesize and pack bench-6g, or bench-32l with "
                 "--routing-trace)");
  app.add_option("--queue-depth", depth, "reads in flight for the stager, fio and the cache")
      ->capture_default_str();
  app.add_option("--steps", steps, "decode steps measured per budget and predictor")
      ->capture_default_str();
  app.add_option("--seconds", stage_seconds, "staging measurement time (fio gets the same)")
      ->capture_default_str();
  app.add_flag("--skip-staging", skip_staging, "skip the staging section (fio still runs, once)");
  app.add_option("--budgets", budgets, "device budgets, as fractions of all experts")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--prefetch", predictors, "predictors to run at each budget below 100 %")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::IsMember({"off", "gate", "affinity", "history", "combined"}));
  app.add_option("--prefetch-depth", prefetch_depth, "layers ahead")->capture_default_str();
  app.add_option("--prefetch-candidates", prefetch_candidates,
                 "experts read ahead per token and layer")
      ->capture_default_str();
  app.add_option("--runs", runs,
                 "runs of each budget and predictor, the predictors alternating; the run with "
                 "the median stall is reported, and the spread of the stall beside it")
      ->capture_default_str();
  app.add_option("--prefetch-calibration", calibration,
                 "routing trace for the affinity predictor (default with --routing-trace: that "
                 "trace's sequences but the first, the one the decode replays)");
  app.add_option("--routing-trace", routing_trace,
                 "route every layer as this recorded trace does (its first sequence)");
  app.add_option("--expert-precision", expert_precision,
                 "the experts' full copies: source (exact), int8 or int4 (the staging section, fio "
                 "and the budgets use that precision's blobs)")
      ->capture_default_str()
      ->check(CLI::IsMember({"source", "int8", "int4"}));
  app.add_option("--precision", precision_texts,
                 "precision settings to run at each budget below 100 %: exact, always:P, "
                 "threshold:P:TAU, floor:P (always with the low-bit floor); P is int8 or int4")
      ->capture_default_str()
      ->delimiter(',');
  app.add_option("--backend", backend, "the compute backend the decode runs on")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--host-cache", host_fraction,
                 "host tier budget, as a fraction of all experts (1: every expert in RAM, pinned "
                 "with cuda; the decode roofline then uses the measured copy rate, not fio's)")
      ->capture_default_str();
  app.add_option("--host-compute", host_compute,
                 "with cuda and a host tier: auto runs an expert on the CPU when that is "
                 "estimated to beat its copy (for the decode's inexact requests only)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "off"}));
  app.add_option("--predict-steps", predict_steps,
                 "decode steps of the own-routing prediction section (0: skip it)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  fio_seconds = static_cast<int>(stage_seconds);
  std::vector<PrecisionSetting> precisions;
  for (const std::string& text : precision_texts) {
    auto setting = ParsePrecisionSetting(text);
    if (!setting.ok()) {
      std::fprintf(stderr, "%s\n", std::string(setting.status().message()).c_str());
      return 2;
    }
    precisions.push_back(*setting);
  }

  const std::string preset = routing_trace.empty() ? "bench-6g" : "bench-32l";
  if (store_dir.empty()) {
    store_dir = "build/bench-models/" + preset + "-store";
    if (!EnsureStore(preset, store_dir)) return 1;
  }
  auto store = moed::cache::Store::Open(store_dir);
  if (!store.ok()) {
    std::fprintf(stderr, "%s\n", std::string(store.status().message()).c_str());
    return 1;
  }
  const moed::cache::Precision full_precision =
      *moed::cache::ParsePrecision(expert_precision);  // checked by the option
  if (!(*store)->manifest().layouts.contains(full_precision)) {
    std::fprintf(stderr, "%s has no %s blobs\n", store_dir.c_str(), expert_precision.c_str());
    return 1;
  }
  const auto& manifest = (*store)->manifest();
  const uint64_t block = manifest.layouts.at(full_precision).padded_size;
  std::vector<const moed::cache::BlobEntry*> order;
  for (const auto& blob : manifest.blobs) {
    if (blob.precision == full_precision) order.push_back(&blob);
  }
  std::shuffle(order.begin(), order.end(), std::mt19937(1));

  uint64_t region_begin = ~uint64_t{0}, region_end = 0;
  for (const auto* blob : order) {
    region_begin = std::min(region_begin, blob->offset);
    region_end = std::max(region_end, blob->offset + block);
  }
  auto fio_gbps = [&] {
    return FioGbps((*store)->experts_path(), block, depth, fio_seconds, region_begin,
                   region_end - region_begin);
  };
  double fio = fio_gbps();
  if (!skip_staging) {
    std::printf(
        "\n== staging: %zu source blobs of %.1f MiB, O_DIRECT random reads, queue depth %d ==\n",
        order.size(), block / double(1 << 20), depth);
    double stager = StagerGbps(**store, order, block, depth, stage_seconds);
    // fio again after the stager: a virtual disk's rate drifts within a minute (caching below
    // the guest), so the stager is set against fio on both sides of it.
    const double fio_after = fio_gbps();
    const double fio_mean = (fio + fio_after) / 2;
    std::printf("%-12s %10s\n%-12s %9.2f\n%-12s %9.2f   (%.0f%% of fio's mean)\n%-12s %9.2f\n",
                "reader", "GB/s", "fio", fio, "moed stager", stager,
                fio_mean > 0 ? 100 * stager / fio_mean : 0, "fio again", fio_after);
  } else {
    std::printf("\nfio: %.2f GB/s (random %.1f MiB reads, queue depth %d)\n", fio,
                block / double(1 << 20), depth);
  }

  if (!routing_trace.empty() && calibration.empty()) {
    calibration = "/tmp/moed-bench-offload-calibration.jsonl";
    if (!WriteHeldOutCalibration(routing_trace, calibration)) {
      std::fprintf(stderr, "%s: needs two or more sequences to calibrate on\n",
                   routing_trace.c_str());
      return 1;
    }
  }
  const auto& c = (*store)->config();
  const uint64_t slot = moed::cache::ExpertCache::SlotBytes(**store, full_precision);
  const uint64_t all = slot * c.NumMoeLayers() * c.num_experts;
  // With every expert in the host tier, a miss is a copy to the device: the roofline's
  // bandwidth is the bare copy rate, measured here.
  const bool over_copies = host_fraction >= 1.0;
  double copy_gbps = 0;
  if (host_fraction > 0) {
    auto copies = MeasureCopies(store_dir, backend, full_precision, std::min(stage_seconds, 5.0));
    if (!copies.ok()) {
      std::fprintf(stderr, "%s\n", std::string(copies.status().message()).c_str());
      return 1;
    }
    copy_gbps = copies->bare_gbps;
    std::printf(
        "\n== copies to the device (%s): experts of %.1f MiB from pinned host memory ==\n"
        "%-34s %9s\n%-34s %9.2f\n%-34s %9.2f   (%.0f%% of the bare copy, %llu copies)\n",
        backend.c_str(), slot / double(1 << 20), "copy", "GB/s", "bare copy of one pinned buffer",
        copies->bare_gbps, "expert cache, host tier to device", copies->tier_gbps,
        copies->bare_gbps > 0 ? 100 * copies->tier_gbps / copies->bare_gbps : 0,
        static_cast<unsigned long long>(copies->tier_copies));
  }
  const double roof_gbps = over_copies ? copy_gbps : fio;
  std::printf(
      "\n== decode on %s, %s: %ld layers x %ld experts of %.1f MiB (%.2f GiB), top-%ld, 1 "
      "sequence, %s routing, host tier %.0f%% ==\n",
      backend.c_str(), store_dir.c_str(), c.num_layers, c.num_experts, slot / double(1 << 20),
      all / double(1 << 30), c.experts_per_token,
      routing_trace.empty() ? "the model's own" : routing_trace.c_str(), 100 * host_fraction);
  std::printf("%-7s %-9s %-18s %9s %8s %9s %9s %10s %9s %7s %17s %8s %6s %6s\n", "budget",
              "prefetch", "precision", "tokens/s", "vs res.", "roofline", "of roof.",
              over_copies ? "MB copy/t" : "MB read/t", "stall s/t", "roof s/t", "useful/late/waste",
              "hit rate", "fb/t", "cpu/t");
  double resident_seconds = 0;
  for (double fraction : budgets) {
    // (predictor, precision setting) pairs.
    std::vector<std::pair<std::string, PrecisionSetting>> order;
    for (const PrecisionSetting& precision : precisions) {
      if (fraction >= 1.0 && precision.policy != "exact") continue;  // nothing to fall back from
      for (const std::string& predictor : predictors) {
        // affinity needs a calibration: given, or taken from the routing trace.
        if (predictor == "affinity" && calibration.empty()) continue;
        if (fraction < 1.0 || predictor == "off") order.push_back({predictor, precision});
      }
    }
    std::vector<std::vector<DecodeRun>> results(order.size());
    for (int r = 0; r < (fraction >= 1.0 ? 1 : runs); ++r) {
      for (size_t i = 0; i < order.size(); ++i) {
        moed::server::DaemonConfig config;
        config.store = store_dir;
        config.backend = backend;
        config.expert_precision = expert_precision;
        config.device_cache_bytes = static_cast<int64_t>(fraction * all);
        config.host_cache_bytes = static_cast<int64_t>(host_fraction * static_cast<double>(all));
        config.host_compute = host_compute;
        config.io_queue_depth = depth;
        const auto& [predictor, precision] = order[i];
        config.prefetch = predictor;
        config.prefetch_depth = prefetch_depth;
        config.prefetch_candidates = prefetch_candidates;
        config.routing_trace = routing_trace;
        if (predictor == "affinity" || predictor == "combined")
          config.prefetch_calibration = calibration;
        config.precision_policy = precision.policy;
        config.fallback_precision = precision.fallback;
        config.fallback_threshold = precision.threshold;
        config.low_bit_floor = precision.floor;
        const moed::model::Precision loosest = precision.policy == "exact"
                                                   ? moed::model::Precision::kSource
                                                   : moed::cache::ParsePrecision(precision.fallback)
                                                         .value_or(moed::model::Precision::kInt4);
        // The resident run warms every expert it uses; the others start from what 2 steps load
        // (the floor's: until the floor is filled, as a daemon would before serving).
        const int warm = fraction >= 1.0 ? 24 : precision.floor ? 24 : 2;
        auto run = Decode(config, warm, steps, loosest, over_copies);
        if (!run.ok()) {
          std::fprintf(stderr, "%s\n", std::string(run.status().message()).c_str());
          return 1;
        }
        results[i].push_back(*std::move(run));
      }
    }
    // Runs alternate, so run r of every predictor saw the machine in the same minutes: a
    // predictor's stall against no prefetch's at the same precision, run by run.
    std::vector<std::string> paired(order.size());
    for (size_t i = 0; i < order.size(); ++i) {
      if (order[i].first == "off" || results[i].size() < 2) continue;
      for (size_t j = 0; j < order.size(); ++j) {
        if (order[j].first != "off" || order[j].second.label != order[i].second.label) continue;
        int below = 0;
        const int n = static_cast<int>(results[i].size());
        for (int r = 0; r < n; ++r) {
          below += results[i][r].stall_per_token < results[j][r].stall_per_token ? 1 : 0;
        }
        // One-sided sign test: the chance of `below` or more of n if neither were lower.
        double p = 0;
        for (int k = below; k <= n; ++k) {
          p += std::exp(std::lgamma(n + 1.0) - std::lgamma(k + 1.0) - std::lgamma(n - k + 1.0) -
                        n * std::log(2.0));
        }
        paired[i] = "  below off's stall in " + std::to_string(below) + " of " + std::to_string(n) +
                    " paired runs (sign test p = " + std::to_string(p).substr(0, 5) + ")";
      }
    }
    for (size_t i = 0; i < order.size(); ++i) {
      std::vector<DecodeRun>& of = results[i];
      std::sort(of.begin(), of.end(), [](const DecodeRun& a, const DecodeRun& b) {
        return a.stall_per_token < b.stall_per_token;
      });
      const DecodeRun& median = of[of.size() / 2];
      if (fraction >= 1.0) resident_seconds = median.seconds_per_token;
      const double moved =
          over_copies ? median.copied_bytes_per_token : median.missed_bytes_per_token;
      const double read_floor = roof_gbps > 0 ? moved / (roof_gbps * 1e9) : 0.0;
      const double roofline = std::max(resident_seconds, read_floor);
      const double per_token = 1.0 / steps;
      std::printf(
          "%6.0f%% %-9s %-18s %9.2f %7.0f%% %9.2f %8.0f%% %10.1f %9.4f %7.4f %5.1f/%4.1f/%5.1f "
          "%7.0f%% %6.1f %6.1f",
          100 * fraction, order[i].first.c_str(), order[i].second.label.c_str(),
          1 / median.seconds_per_token, 100 * resident_seconds / median.seconds_per_token,
          1 / roofline, 100 * roofline / median.seconds_per_token, moved / 1e6,
          median.stall_per_token, read_floor, median.delta.prefetch_useful * per_token,
          median.delta.prefetch_late * per_token, median.delta.prefetch_wasted * per_token,
          100 * median.hit_rate, median.fallbacks_per_token, median.host_computes_per_token);
      if (of.size() > 1) {
        std::printf("  (stall %.4f..%.4f)", of.front().stall_per_token, of.back().stall_per_token);
      }
      std::printf("%s\n", paired[i].c_str());
    }
  }
  std::printf(
      "(roofline: max(all-resident time, bytes moved / %s); roof s/t: those bytes at that "
      "bandwidth, the stall a serial mover could not avoid; useful/late/waste: prefetches per "
      "token; hit rate: uses served from a resident copy, full or fallback; fb/t: uses per token "
      "run from a fallback copy; cpu/t: experts per token run on the CPU instead of copied)\n",
      over_copies ? "the bare copy rate" : "fio");

  if (predict_steps > 0) {
    std::printf(
        "\n== prediction with the model's own routing (random weights: its routing is not a "
        "trained model's), %d decode steps, depth %d, %ld candidates ==\n",
        predict_steps, prefetch_depth, c.experts_per_token);
    std::printf("%-9s %8s %9s\n", "predictor", "recall", "precision");
    for (const std::string predictor : {"gate", "history", "combined"}) {
      moed::server::DaemonConfig config;
      config.store = store_dir;
      config.backend = "cpu";
      config.device_cache_bytes = 0;  // prediction quality does not depend on the budget
      config.prefetch = predictor;
      config.prefetch_depth = prefetch_depth;
      // As many as the model's experts per token: recall and precision then compare with
      // moed-replay --prefetch-eval's at that many candidates.
      config.prefetch_candidates = c.experts_per_token;
      auto run = Decode(config, 0, predict_steps);
      if (!run.ok()) {
        std::fprintf(stderr, "%s\n", std::string(run.status().message()).c_str());
        return 1;
      }
      uint64_t hinted = 0, needed = 0, correct = 0;
      for (const auto& layer : run->layers) {
        hinted += layer.hinted;
        needed += layer.needed;
        correct += layer.correct;
      }
      std::printf("%-9s %8.3f %9.3f\n", predictor.c_str(),
                  needed == 0 ? 0.0 : static_cast<double>(correct) / needed,
                  hinted == 0 ? 0.0 : static_cast<double>(correct) / hinted);
    }
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "moed-bench-offload: %s\n", e.what());
  return 1;
}
