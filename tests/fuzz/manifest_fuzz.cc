// libFuzzer target: an expert store's manifest.json.
#include <cstddef>
#include <cstdint>

#include "cache/store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto manifest = moed::cache::ParseManifest(text, "fuzz.json");
  if (manifest.ok()) {
    for (const auto& blob : manifest->blobs) {
      const auto& layout = manifest->layouts.at(blob.precision);
      if (blob.offset % moed::cache::kBlobAlignment != 0 ||
          blob.offset + layout.padded_size > manifest->experts_file_size) {
        __builtin_trap();
      }
    }
    (void)moed::cache::ManifestJson(*manifest);
  }
  return 0;
}
