// Requests read from the wire by moed itself rather than by gRPC's generated code, so that a
// message gRPC would refuse with INTERNAL and no message gets an INVALID_ARGUMENT that says
// what is wrong with it: above all, a string field holding bytes that are not UTF-8.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/message.h"
#include "grpcpp/support/byte_buffer.h"

namespace moed::server {

// Parses `bytes` into `message`. INVALID_ARGUMENT naming the field ("prompt",
// "sampling.stop") when a string field is not valid UTF-8, or saying the bytes are not a
// message of that type.
absl::Status ParseRequest(absl::string_view bytes, google::protobuf::Message* message);
absl::Status ParseRequest(const grpc::ByteBuffer& buffer, google::protobuf::Message* message);

// The path of the first string field (nested through message fields) of `descriptor` whose
// bytes in `wire` are not valid UTF-8, or "" when there is none or `wire` does not parse.
std::string InvalidUtf8Field(const google::protobuf::Descriptor& descriptor,
                             absl::string_view wire);

// Strict UTF-8 (RFC 3629): no overlong forms, no surrogates, nothing above U+10FFFF.
bool IsValidUtf8(absl::string_view text);

}  // namespace moed::server
