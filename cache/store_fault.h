// What went wrong reading an expert blob, carried as a payload of the absl::Status that
// reports it (as RocksDB's IOStatus carries retryable/data-loss): its kind decides whether the
// cache retries, and its location names the blob.
#pragma once

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "cache/store.h"

namespace moed::cache {

enum class ReadFaultKind {
  kIoError,    // the read failed (EIO and the like): may succeed when tried again
  kShortRead,  // fewer bytes than asked for: the file ends early, perhaps only for now
  kCorrupt,    // the bytes arrived but fail their checksum: never retried
};
inline constexpr int kReadFaultKinds = 3;

// "io_error", "short_read", "checksum": the `kind` label of the failed-read counters.
absl::string_view ReadFaultKindName(ReadFaultKind kind);
inline bool IsRetryable(ReadFaultKind kind) { return kind != ReadFaultKind::kCorrupt; }

struct StoreFault {
  ReadFaultKind kind = ReadFaultKind::kIoError;
  // The blob, where known (a reader knows only the offset).
  int layer = -1;
  int expert = -1;
  Precision precision = Precision::kSource;
  uint64_t offset = 0;  // in experts.bin
  int attempts = 1;     // reads tried before giving up
};

// `status` with `fault` attached (replacing any fault it carried).
absl::Status WithStoreFault(absl::Status status, const StoreFault& fault);
// The fault attached to `status`, if any.
std::optional<StoreFault> StoreFaultOf(const absl::Status& status);

// A reader's failed read: UNAVAILABLE for an I/O error, DATA_LOSS for a short read, with the
// fault's kind and offset attached.
absl::Status ReadFailure(ReadFaultKind kind, uint64_t offset, absl::string_view what);

}  // namespace moed::cache
