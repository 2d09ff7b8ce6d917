#include "cache/store_fault.h"

#include <vector>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace moed::cache {
namespace {

constexpr absl::string_view kPayloadUrl = "type.googleapis.com/moed.StoreFault";

}  // namespace

absl::string_view ReadFaultKindName(ReadFaultKind kind) {
  switch (kind) {
    case ReadFaultKind::kIoError:
      return "io_error";
    case ReadFaultKind::kShortRead:
      return "short_read";
    case ReadFaultKind::kCorrupt:
      return "checksum";
  }
  return "?";
}

absl::Status WithStoreFault(absl::Status status, const StoreFault& fault) {
  status.SetPayload(kPayloadUrl,
                    absl::Cord(absl::StrCat(static_cast<int>(fault.kind), " ", fault.layer, " ",
                                            fault.expert, " ", static_cast<int>(fault.precision),
                                            " ", fault.offset, " ", fault.attempts)));
  return status;
}

std::optional<StoreFault> StoreFaultOf(const absl::Status& status) {
  absl::optional<absl::Cord> payload = status.GetPayload(kPayloadUrl);
  if (!payload.has_value()) return std::nullopt;
  std::vector<std::string> fields = absl::StrSplit(std::string(*payload), ' ');
  int kind = 0, precision = 0;
  StoreFault fault;
  if (fields.size() != 6 || !absl::SimpleAtoi(fields[0], &kind) || kind < 0 ||
      kind >= kReadFaultKinds || !absl::SimpleAtoi(fields[1], &fault.layer) ||
      !absl::SimpleAtoi(fields[2], &fault.expert) || !absl::SimpleAtoi(fields[3], &precision) ||
      precision < 0 || precision > static_cast<int>(Precision::kInt4) ||
      !absl::SimpleAtoi(fields[4], &fault.offset) ||
      !absl::SimpleAtoi(fields[5], &fault.attempts)) {
    return std::nullopt;
  }
  fault.kind = static_cast<ReadFaultKind>(kind);
  fault.precision = static_cast<Precision>(precision);
  return fault;
}

absl::Status ReadFailure(ReadFaultKind kind, uint64_t offset, absl::string_view what) {
  absl::Status status =
      kind == ReadFaultKind::kIoError ? absl::UnavailableError(what) : absl::DataLossError(what);
  StoreFault fault;
  fault.kind = kind;
  fault.offset = offset;
  return WithStoreFault(std::move(status), fault);
}

}  // namespace moed::cache
