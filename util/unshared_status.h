// A copy of an absl::Status that shares nothing with the original: its message and payloads
// are new allocations. Copies of a Status share one reference-counted representation, and some
// of its reference counting runs in Debian's Abseil, which ThreadSanitizer cannot see; a status
// handed from one thread to another is therefore handed over unshared, so that the two threads
// never touch the same representation.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/cord.h"

namespace moed::util {

inline absl::Status Unshared(const absl::Status& status) {
  if (status.ok()) return absl::OkStatus();
  absl::Status copy(status.code(), std::string(status.message()));
  status.ForEachPayload([&](absl::string_view type_url, const absl::Cord& payload) {
    copy.SetPayload(type_url, absl::Cord(std::string(payload)));
  });
  return copy;
}

}  // namespace moed::util
