// libFuzzer target: tokenizer.json text. What parses must encode and decode without crashing.
#include <cstddef>
#include <cstdint>

#include "model/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto tokenizer = moed::model::Tokenizer::FromJson(text, "fuzz.json");
  if (tokenizer.ok()) {
    auto ids = (*tokenizer)->Encode("Hello, wörld! 12 \xF0\x9F\xA6\x99 <s>", true);
    if (ids.ok()) (void)(*tokenizer)->Decode(*ids);
  }
  return 0;
}
