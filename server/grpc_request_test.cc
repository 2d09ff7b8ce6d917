#include "server/grpc_request.h"

#include <catch2/catch.hpp>
#include <cstdint>
#include <random>
#include <string>

#include "moed/v1/moed.pb.h"

namespace moed::server {
namespace {

// A reference decoder written from the definition: decode each sequence into a code point,
// then judge the code point and the length it was written with.
bool ReferenceUtf8(const std::string& text) {
  size_t i = 0;
  while (i < text.size()) {
    const auto lead = static_cast<uint8_t>(text[i]);
    int length = lead < 0x80           ? 1
                 : (lead >> 5) == 0x6  ? 2
                 : (lead >> 4) == 0xE  ? 3
                 : (lead >> 3) == 0x1E ? 4
                                       : 0;
    if (length == 0 || i + static_cast<size_t>(length) > text.size()) return false;
    uint32_t code = length == 1 ? lead : lead & (0x7F >> length);
    for (int k = 1; k < length; ++k) {
      const auto next = static_cast<uint8_t>(text[i + static_cast<size_t>(k)]);
      if ((next & 0xC0) != 0x80) return false;
      code = (code << 6) | (next & 0x3F);
    }
    const uint32_t smallest[] = {0, 0, 0x80, 0x800, 0x10000};
    if (code < smallest[length] || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF))
      return false;
    i += static_cast<size_t>(length);
  }
  return true;
}

TEST_CASE("UTF-8 validation agrees with a reference decoder") {
  for (const char* valid : {"", "plain", "caf\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80",
                            "\xF4\x8F\xBF\xBF", "\xED\x9F\xBF"}) {
    CHECK(IsValidUtf8(valid));
    CHECK(ReferenceUtf8(valid));
  }
  for (const char* invalid : {"\xC3", "\xC0\xAF", "\xE0\x80\xAF", "\xED\xA0\x80",
                              "\xF4\x90\x80\x80", "\xF8\x88\x80\x80\x80", "\x80", "a\xFF"}) {
    CHECK_FALSE(IsValidUtf8(invalid));
    CHECK_FALSE(ReferenceUtf8(invalid));
  }
  // Random short strings weighted towards the bytes that matter.
  std::mt19937 random(5);
  const uint8_t alphabet[] = {0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1,
                              0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF};
  for (int round = 0; round < 200000; ++round) {
    std::string text(random() % 6, '\0');
    for (char& c : text) c = static_cast<char>(alphabet[random() % sizeof(alphabet)]);
    INFO(round);
    REQUIRE(IsValidUtf8(text) == ReferenceUtf8(text));
  }
}

TEST_CASE("a request with invalid UTF-8 is refused naming the field") {
  v1::GenerateRequest request;
  request.set_request_id("ok");
  request.set_prompt("bad \xFF prompt");
  std::string wire;
  REQUIRE(request.SerializeToString(&wire));
  v1::GenerateRequest parsed;
  absl::Status status = ParseRequest(wire, &parsed);
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "field 'prompt' is not valid UTF-8 (string fields must be)");

  request.set_prompt("fine");
  request.mutable_sampling()->add_stop("fine");
  request.mutable_sampling()->add_stop("\xC0\xAF");
  REQUIRE(request.SerializeToString(&wire));
  status = ParseRequest(wire, &parsed);
  CHECK(status.message() == "field 'sampling.stop' is not valid UTF-8 (string fields must be)");

  request.mutable_sampling()->clear_stop();
  REQUIRE(request.SerializeToString(&wire));
  REQUIRE(ParseRequest(wire, &parsed).ok());
  CHECK(parsed.prompt() == "fine");

  status = ParseRequest(std::string("\x0A\x10", 2), &parsed);  // a field longer than the bytes
  CHECK(status.code() == absl::StatusCode::kInvalidArgument);
  CHECK(status.message() == "the request is not a valid moed.v1.GenerateRequest message");
}

}  // namespace
}  // namespace moed::server
