// The engine's set-up from the configuration: budgets resolved from what the device has free.
#include "server/engine.h"

#include <catch2/catch.hpp>
#include <filesystem>

#include "kernels/backend.h"
#include "tests/scratch_dir.h"
#include "tools/pack/pack.h"
#include "tools/synth/synthesizer.h"

namespace moed::server {
namespace {

namespace fs = std::filesystem;

TEST_CASE("the GPU memory fraction sizes the device tier from the memory free after the KV cache") {
  const testing::ScratchDir scratch("moed_engine_test");
  const fs::path& root = scratch.path();
  tools::SynthSpec spec = *tools::PresetSpec("tiny", model::Architecture::kMixtral);
  REQUIRE(tools::WriteCheckpoint(spec, (root / "m").string()).ok());
  REQUIRE(tools::Pack((root / "m").string(), (root / "s").string(), tools::PackOptions{}).ok());
  auto store = cache::Store::Open((root / "s").string());
  REQUIRE(store.ok());
  const uint64_t slot = cache::ExpertCache::SlotBytes(**store, cache::Precision::kSource);

  DaemonConfig config;
  config.store = (root / "s").string();
  config.backend = "cpu";
  config.threads = 1;
  config.kv_cache_bytes = 1 << 20;
  // A fraction that leaves room for 8.5 expert slots of what the CPU has free now (the free
  // memory moves a little between here and the engine's reading: far less than half a slot).
  auto cpu = kernels::CreateBackend(kernels::BackendKind::kCpu);
  REQUIRE(cpu.ok());
  const uint64_t free_bytes = cpu->backend->device().info()->free_memory_bytes;
  REQUIRE(free_bytes > static_cast<uint64_t>(config.kv_cache_bytes) + 100 * slot);
  config.gpu_memory_fraction =
      8.5 * static_cast<double>(slot) / static_cast<double>(free_bytes - config.kv_cache_bytes);
  absl::StatusOr<Engine> engine = BuildEngine(config);
  INFO(engine.status().ToString());
  REQUIRE(engine.ok());
  CHECK(engine->cache->counters().device.slots == 8);
  CHECK(engine->kv_cache_budget_bytes == static_cast<uint64_t>(config.kv_cache_bytes));
  // The CPU's memory is the host's: no experts to run elsewhere, so no host backend.
  CHECK(engine->host_backend == nullptr);
  CHECK(engine->host_compute_note.empty());

  // A fraction too small for two slots is refused with the budget it came to.
  config.gpu_memory_fraction /= 8;
  absl::StatusOr<Engine> tiny = BuildEngine(config);
  REQUIRE_FALSE(tiny.ok());
  CHECK(tiny.status().message().find("below the minimum") != std::string::npos);
}

}  // namespace
}  // namespace moed::server
