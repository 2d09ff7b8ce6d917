// libFuzzer target: an expert store's manifest.json. The checksum is not verified (a fuzzer
// cannot forge it), so every check behind it is reached. The oracle: a manifest that passes
// ParseManifest and CheckManifestAgainstConfig for the tiny Mixtral config has every blob
// inside experts.bin and every expert computable: each layout's matrices are run through the
// CPU backend's expert FFN over a blob-sized buffer, under ASan, as the cache would run them.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cache/aligned_buffer.h"
#include "cache/store.h"
#include "kernels/backend.h"
#include "tests/fuzz/tiny_mixtral_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const moed::model::ModelConfig config =
      *moed::model::ParseModelConfig(moed::fuzz::kTinyMixtralConfig, "fuzz");
  static const std::shared_ptr<moed::kernels::Backend> backend = [] {
    auto choice =
        moed::kernels::CreateBackend(moed::kernels::BackendKind::kCpu, {.cpu_threads = 1});
    if (!choice.ok()) __builtin_trap();
    return std::shared_ptr<moed::kernels::Backend>(std::move(choice->backend));
  }();
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto manifest = moed::cache::ParseManifest(text, "fuzz.json", /*verify_checksum=*/false);
  if (!manifest.ok()) return 0;
  (void)moed::cache::ManifestJson(*manifest);
  for (const auto& blob : manifest->blobs) {
    const auto& layout = manifest->layouts.at(blob.precision);
    if (blob.offset % moed::cache::kBlobAlignment != 0 ||
        blob.offset + layout.padded_size > manifest->experts_file_size) {
      __builtin_trap();
    }
  }
  if (!moed::cache::CheckManifestAgainstConfig(*manifest, config, "fuzz.json").ok()) return 0;
  const int64_t hidden = config.hidden_size, intermediate = config.expert_intermediate_size;
  std::vector<float> x(static_cast<size_t>(hidden), 0.5f), out(static_cast<size_t>(hidden));
  std::vector<float> scratch(
      static_cast<size_t>(moed::kernels::ExpertFfnScratchFloats(1, hidden, intermediate)));
  const int32_t row = 0;
  for (const auto& [precision, layout] : manifest->layouts) {
    // Exactly the blob's padded size, so that ASan sees any read past it.
    auto buffer = moed::cache::AlignedBuffer::Allocate(layout.padded_size);
    if (!buffer.ok()) __builtin_trap();
    std::memset(buffer->data(), 0x11, layout.padded_size);
    moed::model::ExpertWeights weights = moed::cache::ExpertWeightsInBlob(layout, buffer->data());
    moed::kernels::SwiGluWeights w{weights.gate, weights.up, weights.down};
    if (!backend->compute().ExpertFfn(w, x.data(), &row, 1, out.data(), &row, scratch.data()).ok())
      __builtin_trap();
  }
  return 0;
}
