#include "server/grpc_request.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/unknown_field_set.h"

namespace moed::server {

bool IsValidUtf8(absl::string_view text) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t length = 0;
    unsigned char low = 0x80, high = 0xBF;  // the second byte's range
    if (c >= 0xC2 && c <= 0xDF) {
      length = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      length = 3;
      if (c == 0xE0) low = 0xA0;   // overlong
      if (c == 0xED) high = 0x9F;  // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      length = 4;
      if (c == 0xF0) low = 0x90;   // overlong
      if (c == 0xF4) high = 0x8F;  // above U+10FFFF
    } else {
      return false;
    }
    if (n - i < length) return false;
    if (s[i + 1] < low || s[i + 1] > high) return false;
    for (size_t k = 2; k < length; ++k) {
      if ((s[i + k] & 0xC0) != 0x80) return false;
    }
    i += length;
  }
  return true;
}

std::string InvalidUtf8Field(const google::protobuf::Descriptor& descriptor,
                             absl::string_view wire) {
  google::protobuf::UnknownFieldSet fields;
  if (!fields.ParseFromArray(wire.data(), static_cast<int>(wire.size()))) return "";
  for (int i = 0; i < fields.field_count(); ++i) {
    const google::protobuf::UnknownField& field = fields.field(i);
    if (field.type() != google::protobuf::UnknownField::TYPE_LENGTH_DELIMITED) continue;
    const google::protobuf::FieldDescriptor* known = descriptor.FindFieldByNumber(field.number());
    if (known == nullptr) continue;
    if (known->type() == google::protobuf::FieldDescriptor::TYPE_STRING &&
        !IsValidUtf8(field.length_delimited())) {
      return known->name();
    }
    if (known->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
      std::string inner = InvalidUtf8Field(*known->message_type(), field.length_delimited());
      if (!inner.empty()) return absl::StrCat(known->name(), ".", inner);
    }
  }
  return "";
}

absl::Status ParseRequest(absl::string_view bytes, google::protobuf::Message* message) {
  if (bytes.size() <= static_cast<size_t>(INT32_MAX) &&
      message->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) {
    return absl::OkStatus();
  }
  const std::string field = InvalidUtf8Field(*message->GetDescriptor(), bytes);
  if (!field.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field '", field, "' is not valid UTF-8 (string fields must be)"));
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "the request is not a valid ", message->GetDescriptor()->full_name(), " message"));
}

absl::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* message) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return absl::InvalidArgumentError("unreadable request");
  std::string bytes;
  bytes.reserve(buffer.Length());
  for (const grpc::Slice& slice : slices)
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  return ParseRequest(bytes, message);
}

}  // namespace moed::server
