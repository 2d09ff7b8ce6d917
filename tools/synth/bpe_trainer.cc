#include "tools/synth/bpe_trainer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <map>
#include <memory>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace moed::tools {
namespace {

void AppendUtf8(uint32_t code_point, std::string* out) {
  if (code_point < 0x80) {
    out->push_back(static_cast<char>(code_point));
  } else if (code_point < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (code_point >> 6)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xE0 | (code_point >> 12)));
    out->push_back(static_cast<char>(0x80 | ((code_point >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (code_point & 0x3F)));
  }
}

}  // namespace

std::string ByteToSymbol(uint8_t byte) {
  // Printable Latin-1 bytes stand for themselves; the others are shifted past U+0100 in order.
  auto printable = [](int b) {
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
  };
  uint32_t code_point = byte;
  if (!printable(byte)) {
    int shifted = 0;
    for (int b = 0; b < byte; ++b) shifted += printable(b) ? 0 : 1;
    code_point = 256 + shifted;
  }
  std::string out;
  AppendUtf8(code_point, &out);
  return out;
}

absl::StatusOr<std::vector<std::string>> PreTokenize(absl::string_view text) {
  int error_code = 0;
  PCRE2_SIZE error_offset = 0;
  std::unique_ptr<pcre2_code, void (*)(pcre2_code*)> code(
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kGpt2SplitPattern.data()),
                    kGpt2SplitPattern.size(), PCRE2_UTF | PCRE2_UCP, &error_code, &error_offset,
                    nullptr),
      &pcre2_code_free);
  if (!code) return absl::InternalError("cannot compile the GPT-2 split pattern");
  std::unique_ptr<pcre2_match_data, void (*)(pcre2_match_data*)> match(
      pcre2_match_data_create_from_pattern(code.get(), nullptr), &pcre2_match_data_free);
  std::vector<std::string> pieces;
  PCRE2_SIZE start = 0;
  while (start < text.size()) {
    int rc = pcre2_match(code.get(), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                         0, match.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) return absl::InvalidArgumentError("text is not valid UTF-8");
    PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match.get());
    if (ovector[1] == ovector[0]) break;  // the pattern never matches empty; stay safe
    pieces.emplace_back(text.substr(ovector[0], ovector[1] - ovector[0]));
    start = ovector[1];
  }
  return pieces;
}

absl::StatusOr<BpeVocabulary> TrainByteLevelBpe(absl::string_view corpus, int max_merges) {
  absl::StatusOr<std::vector<std::string>> pieces = PreTokenize(corpus);
  if (!pieces.ok()) return pieces.status();
  std::map<std::string, int64_t> piece_counts;
  for (const std::string& piece : *pieces) ++piece_counts[piece];

  BpeVocabulary vocabulary;
  for (int b = 0; b < 256; ++b) vocabulary.tokens.push_back(ByteToSymbol(static_cast<uint8_t>(b)));

  struct Word {
    std::vector<int> ids;
    int64_t count;
  };
  std::vector<Word> words;
  for (const auto& [piece, count] : piece_counts) {
    Word word{{}, count};
    for (unsigned char c : piece) word.ids.push_back(c);
    words.push_back(std::move(word));
  }

  for (int merge = 0; merge < max_merges; ++merge) {
    std::map<std::pair<int, int>, int64_t> pair_counts;
    for (const Word& word : words) {
      for (size_t i = 0; i + 1 < word.ids.size(); ++i) {
        pair_counts[{word.ids[i], word.ids[i + 1]}] += word.count;
      }
    }
    std::pair<int, int> best{-1, -1};
    int64_t best_count = 1;
    for (const auto& [pair, count] : pair_counts) {  // ordered: ties keep the lowest ids
      if (count > best_count) {
        best = pair;
        best_count = count;
      }
    }
    if (best.first < 0) break;
    int new_id = static_cast<int>(vocabulary.tokens.size());
    vocabulary.tokens.push_back(vocabulary.tokens[best.first] + vocabulary.tokens[best.second]);
    vocabulary.merges.emplace_back(vocabulary.tokens[best.first], vocabulary.tokens[best.second]);
    for (Word& word : words) {
      std::vector<int> merged;
      merged.reserve(word.ids.size());
      for (size_t i = 0; i < word.ids.size(); ++i) {
        if (i + 1 < word.ids.size() && word.ids[i] == best.first &&
            word.ids[i + 1] == best.second) {
          merged.push_back(new_id);
          ++i;
        } else {
          merged.push_back(word.ids[i]);
        }
      }
      word.ids = std::move(merged);
    }
  }
  return vocabulary;
}

std::string TokenizerJson(const BpeVocabulary& vocabulary,
                          const std::vector<std::string>& special_tokens) {
  using json = nlohmann::ordered_json;
  json vocab = json::object();
  for (size_t id = 0; id < vocabulary.tokens.size(); ++id) vocab[vocabulary.tokens[id]] = id;
  json merges = json::array();
  for (const auto& [left, right] : vocabulary.merges) merges.push_back(json::array({left, right}));
  json added = json::array();
  for (size_t i = 0; i < special_tokens.size(); ++i) {
    added.push_back({{"id", vocabulary.tokens.size() + i},
                     {"content", special_tokens[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  json byte_level = {{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", true}};
  json tokenizer = {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer", nullptr},
      {"pre_tokenizer", byte_level},
      {"post_processor", byte_level},
      {"decoder", byte_level},
      {"model",
       {{"type", "BPE"},
        {"dropout", nullptr},
        {"unk_token", nullptr},
        {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr},
        {"fuse_unk", false},
        {"byte_fallback", false},
        {"ignore_merges", false},
        {"vocab", vocab},
        {"merges", merges}}},
  };
  return tokenizer.dump(2);
}

}  // namespace moed::tools
