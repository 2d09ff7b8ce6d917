// Tokenizers read from Hugging Face tokenizer.json: BPE with byte-level pre-tokenization
// (GPT-2, Qwen2 and similar split patterns, optional NFC) and SentencePiece-style BPE with byte
// fallback (Llama-2, Mistral/Mixtral), added and special tokens, and decoding that follows the
// file's decoder. Components the file names that are not implemented are refused by name.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::model {

class Tokenizer {
 public:
  // Parses tokenizer.json text; `source` names the file in errors.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view json_text,
                                                             absl::string_view source);
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  ~Tokenizer();

  // Text to ids. Added tokens written in the text are matched as such. With
  // `add_special_tokens`, the post-processor's template (for example BOS) is applied.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                              bool add_special_tokens = false) const;

  // Ids to bytes through the file's decoder. The result can end in the middle of a UTF-8
  // character (byte-level and byte-fallback vocabularies); StreamingDecoder handles that.
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     bool skip_special_tokens = false) const;

  int32_t vocab_size() const;  // one more than the largest id
  std::optional<std::string> TokenText(int32_t id) const;
  std::optional<int32_t> TokenId(absl::string_view token) const;
  bool IsSpecial(int32_t id) const;

  // The decoder chain applied to one string as if it were a single token (for tests that
  // state what round trip to expect).
  std::string DecodeChainOnText(const std::string& text) const;
  // The normalizer and pre-tokenizer string edits (no splitting), as above.
  std::string NormalizeForTest(absl::string_view text) const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a growing list of generated ids into text deltas that always end on a whole UTF-8
// character, so a stream never shows half a character.
class StreamingDecoder {
 public:
  StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
      : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

  // Adds one id; returns the text that became complete (possibly empty).
  absl::StatusOr<std::string> Add(int32_t id);
  // Whatever is still held back (an incomplete character at the very end), for the last
  // message of a stream.
  absl::StatusOr<std::string> Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // decoding starts here for context
  size_t read_offset_ = 0;    // text up to here has been emitted
};

// The length of the longest prefix of `text` made of whole UTF-8 characters.
size_t CompleteUtf8Prefix(absl::string_view text);

}  // namespace moed::model
