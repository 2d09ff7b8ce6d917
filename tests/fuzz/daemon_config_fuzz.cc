// libFuzzer target: the daemon's JSON config file.
#include <cstddef>
#include <cstdint>

#include "server/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  moed::server::DaemonConfig config;
  const moed::server::DaemonConfig before = config;
  absl::Status status = moed::server::ApplyConfigJson(text, "fuzz.json", &config);
  // A refused file changes nothing.
  if (!status.ok() && (config.model != before.model || config.listen != before.listen ||
                       config.backend != before.backend || config.log_level != before.log_level)) {
    __builtin_trap();
  }
  return 0;
}
