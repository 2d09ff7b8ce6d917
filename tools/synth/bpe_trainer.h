// Learns a byte-level BPE vocabulary (GPT-2 style) from text and writes it as a Hugging Face
// tokenizer.json.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace moed::tools {

// The GPT-2 pre-tokenizer pattern (PCRE syntax).
inline constexpr absl::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// The printable character GPT-2's byte-level alphabet uses for `byte`, as UTF-8.
std::string ByteToSymbol(uint8_t byte);

// Splits UTF-8 text with kGpt2SplitPattern.
absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text);

struct BpeVocabulary {
  // Token strings in the byte-level alphabet; index = id. The first 256 are the bytes.
  std::vector<std::string> tokens;
  // Merges in rank order, as pairs of token strings.
  std::vector<std::pair<std::string, std::string>> merges;
};

// Learns up to `max_merges` merges from `corpus`, most frequent pair first (ties go to the
// pair of lowest ids), stopping early when no pair occurs twice.
absl::StatusOr<BpeVocabulary> TrainByteLevelBpe(absl::string_view corpus, int max_merges);

// The tokenizer.json text: a BPE model over `vocabulary`, the GPT-2 byte-level
// pre-tokenizer and decoder, and `special_tokens` as added tokens after the learned ids.
std::string TokenizerJson(const BpeVocabulary& vocabulary,
                          const std::vector<std::string>& special_tokens);

}  // namespace moed::tools
