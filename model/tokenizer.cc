#include "model/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <fstream>
#include <queue>
#include <sstream>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "nlohmann/json.hpp"
#include "util/read_file.h"
#include "util/status_macros.h"

namespace moed::model {
namespace {

using nlohmann::json;

constexpr absl::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr char kReplacementChar[] = "\xEF\xBF\xBD";  // U+FFFD

// ---- UTF-8 helpers --------------------------------------------------------------------------

// Length of the UTF-8 sequence starting with `lead`, or 0 if it is not a valid lead byte.
int Utf8Length(unsigned char lead) {
  if (lead < 0x80) return 1;
  if ((lead & 0xE0) == 0xC0) return lead >= 0xC2 ? 2 : 0;
  if ((lead & 0xF0) == 0xE0) return 3;
  if ((lead & 0xF8) == 0xF0) return lead <= 0xF4 ? 4 : 0;
  return 0;
}

// True when text[i, i+len) is a complete, valid UTF-8 character.
bool ValidCharAt(absl::string_view text, size_t i, int len) {
  if (len == 0 || i + len > text.size()) return false;
  utf8proc_int32_t cp;
  return utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(text.data() + i), len, &cp) ==
         len;
}

// Replaces each invalid byte with U+FFFD (as from_utf8_lossy does, one per maximal bad run).
std::string ToValidUtf8(absl::string_view bytes) {
  std::string out;
  size_t i = 0;
  while (i < bytes.size()) {
    int len = Utf8Length(static_cast<unsigned char>(bytes[i]));
    if (ValidCharAt(bytes, i, len)) {
      out.append(bytes.data() + i, len);
      i += len;
    } else {
      out.append(kReplacementChar);
      ++i;
      // Skip continuation bytes that belonged to the broken sequence.
      while (i < bytes.size() && (static_cast<unsigned char>(bytes[i]) & 0xC0) == 0x80 &&
             !ValidCharAt(bytes, i, 1)) {
        ++i;
      }
    }
  }
  return out;
}

std::vector<std::string> SplitChars(absl::string_view text) {
  std::vector<std::string> chars;
  size_t i = 0;
  while (i < text.size()) {
    int len = Utf8Length(static_cast<unsigned char>(text[i]));
    if (!ValidCharAt(text, i, len)) len = 1;
    chars.emplace_back(text.substr(i, len));
    i += len;
  }
  return chars;
}

std::string CodePointToUtf8(uint32_t cp) {
  utf8proc_uint8_t buffer[4];
  utf8proc_ssize_t n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buffer);
  return std::string(reinterpret_cast<char*>(buffer), static_cast<size_t>(n));
}

// ---- GPT-2 byte-level alphabet --------------------------------------------------------------

struct ByteAlphabet {
  std::string byte_to_symbol[256];
  absl::flat_hash_map<std::string, uint8_t> symbol_to_byte;
  ByteAlphabet() {
    int shifted = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      byte_to_symbol[b] = CodePointToUtf8(printable ? b : 256 + shifted++);
      symbol_to_byte[byte_to_symbol[b]] = static_cast<uint8_t>(b);
    }
  }
};

// ---- regex ----------------------------------------------------------------------------------

class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(absl::string_view pattern,
                                                        absl::string_view source) {
    int error_code = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &error_code, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error_code, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat(source, ": split pattern does not compile at ",
                                                     offset, ": ",
                                                     reinterpret_cast<char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // best effort; the interpreter is the fallback
    auto regex = std::unique_ptr<Regex>(new Regex());
    regex->code_ = code;
    return regex;
  }
  ~Regex() { pcre2_code_free(code_); }

  // Isolated splitting: every match and every gap between matches is a piece.
  void Split(absl::string_view text, std::vector<std::string>* pieces) const {
    pcre2_match_data* match = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t start = 0, gap = 0;
    while (start <= text.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), start,
                           PCRE2_NO_UTF_CHECK, match, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(match);
      if (ov[0] > gap) pieces->emplace_back(text.substr(gap, ov[0] - gap));
      if (ov[1] > ov[0]) pieces->emplace_back(text.substr(ov[0], ov[1] - ov[0]));
      gap = ov[1];
      if (ov[1] == ov[0]) {  // empty match: step over one character
        if (ov[1] >= text.size()) break;
        int len = Utf8Length(static_cast<unsigned char>(text[ov[1]]));
        start = ov[1] + (len > 0 ? len : 1);
      } else {
        start = ov[1];
      }
    }
    if (gap < text.size()) pieces->emplace_back(text.substr(gap));
    pcre2_match_data_free(match);
  }

 private:
  Regex() = default;
  pcre2_code* code_ = nullptr;
};

// ---- pipeline steps -------------------------------------------------------------------------

struct NormalizerStep {
  enum Kind { kNfc, kPrepend, kReplace } kind;
  std::string a, b;  // prepend: a; replace: a -> b
};

struct PreTokenizerStep {
  enum Kind { kByteLevel, kSplit, kMetaspace } kind;
  bool add_prefix_space = false;
  bool use_regex = true;
  std::shared_ptr<Regex> regex;
  std::string replacement;
  std::string prepend_scheme = "always";
  bool split = true;
};

struct DecoderStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;
  int start = 0, stop = 0;
  std::string prepend_scheme;
};

struct AddedToken {
  int32_t id;
  std::string content;
  bool special;
  bool lstrip;
  bool rstrip;
};

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

}  // namespace

struct Tokenizer::Impl {
  std::vector<NormalizerStep> normalizers;
  std::vector<PreTokenizerStep> pre_tokenizers;
  std::vector<DecoderStep> decoders;
  std::vector<int32_t> template_prefix, template_suffix;

  absl::flat_hash_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  std::vector<bool> special;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a,b) -> (rank, merged)
  std::optional<int32_t> unk_id;
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  int32_t byte_tokens[256];  // <0xHH> ids when byte_fallback
  std::vector<AddedToken> added;
  ByteAlphabet alphabet;
  std::string source;

  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::string Normalize(absl::string_view text) const {
    std::string out(text);
    for (const NormalizerStep& step : normalizers) {
      switch (step.kind) {
        case NormalizerStep::kNfc: {
          // By length, not NUL-terminated: text may hold NUL characters.
          utf8proc_uint8_t* nfc = nullptr;
          utf8proc_ssize_t n =
              utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(out.data()),
                           static_cast<utf8proc_ssize_t>(out.size()), &nfc,
                           static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
          if (n >= 0) out.assign(reinterpret_cast<char*>(nfc), static_cast<size_t>(n));
          std::free(nfc);  // invalid UTF-8 (n < 0) stays as it is
          break;
        }
        case NormalizerStep::kPrepend:
          if (!out.empty()) out.insert(0, step.a);
          break;
        case NormalizerStep::kReplace:
          out = absl::StrReplaceAll(out, {{step.a, step.b}});
          break;
      }
    }
    return out;
  }

  // Normalized segment -> pieces, each in the vocabulary's alphabet.
  std::vector<std::string> PreTokenize(std::string text, bool first_segment) const {
    std::vector<std::string> pieces = {std::move(text)};
    for (const PreTokenizerStep& step : pre_tokenizers) {
      std::vector<std::string> next;
      for (std::string& piece : pieces) {
        switch (step.kind) {
          case PreTokenizerStep::kSplit:
            step.regex->Split(piece, &next);
            break;
          case PreTokenizerStep::kByteLevel: {
            if (step.add_prefix_space && !piece.empty() && piece[0] != ' ') piece.insert(0, " ");
            std::vector<std::string> parts;
            if (step.use_regex) {
              step.regex->Split(piece, &parts);
            } else {
              parts.push_back(piece);
            }
            for (const std::string& part : parts) {
              std::string mapped;
              for (unsigned char c : part) mapped += alphabet.byte_to_symbol[c];
              next.push_back(std::move(mapped));
            }
            break;
          }
          case PreTokenizerStep::kMetaspace: {
            std::string replaced = absl::StrReplaceAll(piece, {{" ", step.replacement}});
            bool prepend =
                step.prepend_scheme == "always" ||
                (step.prepend_scheme == "first" && first_segment && &piece == &pieces.front());
            if (prepend && !replaced.empty() && !absl::StartsWith(replaced, step.replacement)) {
              replaced.insert(0, step.replacement);
            }
            if (!step.split) {
              next.push_back(std::move(replaced));
            } else {
              // Split before each replacement character, keeping it with what follows.
              size_t start = 0;
              while (start < replaced.size()) {
                size_t at = replaced.find(step.replacement, start + 1);
                if (at == std::string::npos) at = replaced.size();
                next.push_back(replaced.substr(start, at - start));
                start = at;
              }
            }
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  absl::Status Bpe(absl::string_view piece, std::vector<int32_t>* out) const {
    if (piece.empty()) return absl::OkStatus();
    if (ignore_merges) {
      auto it = vocab.find(piece);
      if (it != vocab.end()) {
        out->push_back(it->second);
        return absl::OkStatus();
      }
    }
    std::vector<int32_t> symbols;
    for (const std::string& ch : SplitChars(piece)) {
      auto it = vocab.find(ch);
      if (it != vocab.end()) {
        symbols.push_back(it->second);
      } else if (byte_fallback) {
        for (unsigned char b : ch) symbols.push_back(byte_tokens[b]);
      } else if (unk_id.has_value()) {
        if (!(fuse_unk && !symbols.empty() && symbols.back() == *unk_id))
          symbols.push_back(*unk_id);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": the vocabulary cannot encode '", ch, "' and has no unk token"));
      }
    }
    // Merge lowest rank first; among equal ranks, the leftmost.
    const int n = static_cast<int>(symbols.size());
    std::vector<int> prev(n), next(n);
    for (int i = 0; i < n; ++i) {
      prev[i] = i - 1;
      next[i] = i + 1 < n ? i + 1 : -1;
    }
    using Candidate = std::tuple<int32_t, int, int32_t, int32_t>;  // rank, position, left, right
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
    auto consider = [&](int i) {
      if (i < 0 || next[i] < 0) return;
      auto it = merges.find(PairKey(symbols[i], symbols[next[i]]));
      if (it != merges.end()) queue.emplace(it->second.first, i, symbols[i], symbols[next[i]]);
    };
    for (int i = 0; i + 1 < n; ++i) consider(i);
    while (!queue.empty()) {
      auto [rank, i, left, right] = queue.top();
      queue.pop();
      if (symbols[i] != left || next[i] < 0 || symbols[next[i]] != right) continue;  // stale
      int j = next[i];
      symbols[i] = merges.at(PairKey(left, right)).second;
      symbols[j] = -1;
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      consider(prev[i]);
      consider(i);
    }
    for (int i = 0; i >= 0 && i < n; i = next[i]) out->push_back(symbols[i]);
    return absl::OkStatus();
  }

  // Splits raw text around added tokens: (text, -1) or ("", id) in order.
  std::vector<std::pair<std::string, int32_t>> SplitAdded(absl::string_view text) const {
    std::vector<std::pair<std::string, int32_t>> parts;
    size_t pos = 0;
    while (pos < text.size()) {
      size_t best = std::string::npos;
      const AddedToken* best_token = nullptr;
      for (const AddedToken& token : added) {
        if (token.content.empty()) continue;
        size_t at = text.find(token.content, pos);
        if (at == std::string::npos) continue;
        if (at < best || (at == best && token.content.size() > best_token->content.size())) {
          best = at;
          best_token = &token;
        }
      }
      if (best_token == nullptr) break;
      size_t left = best, right = best + best_token->content.size();
      if (best_token->lstrip) {
        while (left > pos && IsSpace(text[left - 1])) --left;
      }
      if (best_token->rstrip) {
        while (right < text.size() && IsSpace(text[right])) ++right;
      }
      if (left > pos) parts.emplace_back(std::string(text.substr(pos, left - pos)), -1);
      parts.emplace_back("", best_token->id);
      pos = right;
    }
    if (pos < text.size()) parts.emplace_back(std::string(text.substr(pos)), -1);
    return parts;
  }

  std::vector<std::string> RunDecoders(std::vector<std::string> tokens) const {
    for (const DecoderStep& step : decoders) {
      switch (step.kind) {
        case DecoderStep::kByteLevel: {
          std::string bytes;
          for (const std::string& token : tokens) {
            std::string mapped;
            bool all_mapped = true;
            for (const std::string& ch : SplitChars(token)) {
              auto it = alphabet.symbol_to_byte.find(ch);
              if (it == alphabet.symbol_to_byte.end()) {
                all_mapped = false;
                break;
              }
              mapped.push_back(static_cast<char>(it->second));
            }
            bytes += all_mapped ? mapped : token;
          }
          tokens = {ToValidUtf8(bytes)};
          break;
        }
        case DecoderStep::kReplace:
          for (std::string& token : tokens) token = absl::StrReplaceAll(token, {{step.a, step.b}});
          break;
        case DecoderStep::kByteFallback: {
          std::vector<std::string> next;
          std::string pending;
          size_t pending_count = 0;
          auto flush = [&] {
            if (pending_count == 0) return;
            std::string valid = ToValidUtf8(pending);
            if (valid == pending) {
              next.push_back(pending);
            } else {
              for (size_t i = 0; i < pending_count; ++i) next.emplace_back(kReplacementChar);
            }
            pending.clear();
            pending_count = 0;
          };
          for (std::string& token : tokens) {
            unsigned int byte = 0;
            if (token.size() == 6 && absl::StartsWith(token, "<0x") && token[5] == '>' &&
                std::sscanf(token.c_str() + 3, "%2x", &byte) == 1) {
              pending.push_back(static_cast<char>(byte));
              ++pending_count;
            } else {
              flush();
              next.push_back(std::move(token));
            }
          }
          flush();
          tokens = std::move(next);
          break;
        }
        case DecoderStep::kFuse: {
          std::string joined;
          for (const std::string& token : tokens) joined += token;
          tokens = {joined};
          break;
        }
        case DecoderStep::kStrip:
          for (std::string& token : tokens) {
            int cut = 0;
            while (cut < step.start && static_cast<size_t>(cut) < token.size() &&
                   token.compare(cut * step.a.size(), step.a.size(), step.a) == 0) {
              ++cut;
            }
            token.erase(0, cut * step.a.size());
            int cut_end = 0;
            while (cut_end < step.stop && token.size() >= step.a.size() &&
                   absl::EndsWith(token, step.a)) {
              token.resize(token.size() - step.a.size());
              ++cut_end;
            }
          }
          break;
        case DecoderStep::kMetaspace:
          for (size_t i = 0; i < tokens.size(); ++i) {
            tokens[i] = absl::StrReplaceAll(tokens[i], {{step.a, " "}});
            if (i == 0 && step.prepend_scheme != "never" && absl::StartsWith(tokens[i], " ")) {
              tokens[i].erase(0, 1);
            }
          }
          break;
      }
    }
    return tokens;
  }
};

namespace {

absl::Status Unsupported(absl::string_view source, absl::string_view what, const json& node) {
  std::string type = node.is_object() && node.contains("type") && node["type"].is_string()
                         ? node["type"].get<std::string>()
                         : node.dump().substr(0, 60);
  return absl::InvalidArgumentError(
      absl::StrCat(source, ": ", what, " '", type, "' is not supported"));
}

std::string StringField(const json& node, const char* key, const std::string& fallback = "") {
  auto it = node.find(key);
  return it != node.end() && it->is_string() ? it->get<std::string>() : fallback;
}

// An optional count (absent: 0). A value that is not an integer in [0, 2^20] is an error: a
// float like 2e61 would not fit the int it is read into.
absl::StatusOr<int> CountField(const json& node, const char* key, absl::string_view source,
                               absl::string_view what) {
  auto it = node.find(key);
  if (it == node.end()) return 0;
  if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (1 << 20)) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": ", what, " '", key, "' must be an integer from 0 to 1048576"));
  }
  return static_cast<int>(it->get<int64_t>());
}

bool BoolField(const json& node, const char* key, bool fallback) {
  auto it = node.find(key);
  return it != node.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// "pattern": {"String": "x"} -> "x"; {"Regex": ...} is not a plain string.
std::optional<std::string> PlainPattern(const json& node) {
  auto it = node.find("pattern");
  if (it == node.end() || !it->is_object()) return std::nullopt;
  auto s = it->find("String");
  if (s == it->end() || !s->is_string()) return std::nullopt;
  return s->get<std::string>();
}

absl::Status ParseNormalizer(const json& node, absl::string_view source, Tokenizer::Impl* impl) {
  if (node.is_null()) return absl::OkStatus();
  std::string type = StringField(node, "type");
  if (type == "Sequence" && node.contains("normalizers") && node["normalizers"].is_array()) {
    for (const json& child : node["normalizers"])
      MOED_RETURN_IF_ERROR(ParseNormalizer(child, source, impl));
  } else if (type == "NFC") {
    impl->normalizers.push_back({NormalizerStep::kNfc, "", ""});
  } else if (type == "Prepend") {
    impl->normalizers.push_back({NormalizerStep::kPrepend, StringField(node, "prepend"), ""});
  } else if (type == "Replace" && PlainPattern(node)) {
    impl->normalizers.push_back(
        {NormalizerStep::kReplace, *PlainPattern(node), StringField(node, "content")});
  } else {
    return Unsupported(source, "normalizer", node);
  }
  return absl::OkStatus();
}

absl::Status ParsePreTokenizer(const json& node, absl::string_view source, Tokenizer::Impl* impl) {
  if (node.is_null()) return absl::OkStatus();
  std::string type = StringField(node, "type");
  PreTokenizerStep step;
  if (type == "Sequence" && node.contains("pretokenizers") && node["pretokenizers"].is_array()) {
    for (const json& child : node["pretokenizers"])
      MOED_RETURN_IF_ERROR(ParsePreTokenizer(child, source, impl));
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    step.kind = PreTokenizerStep::kByteLevel;
    step.add_prefix_space = BoolField(node, "add_prefix_space", false);
    step.use_regex = BoolField(node, "use_regex", true);
    if (step.use_regex) {
      MOED_ASSIGN_OR_RETURN(std::unique_ptr<Regex> regex, Regex::Compile(kGpt2Pattern, source));
      step.regex = std::move(regex);
    }
  } else if (type == "Split") {
    auto pattern = node.find("pattern");
    std::string behavior = StringField(node, "behavior");
    if (pattern == node.end() || !pattern->is_object() || !pattern->contains("Regex") ||
        !(*pattern)["Regex"].is_string() || behavior != "Isolated" ||
        BoolField(node, "invert", false)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source,
                       ": pre-tokenizer 'Split' is supported only with a Regex pattern, "
                       "behavior Isolated and invert false"));
    }
    step.kind = PreTokenizerStep::kSplit;
    MOED_ASSIGN_OR_RETURN(std::unique_ptr<Regex> regex,
                          Regex::Compile((*pattern)["Regex"].get<std::string>(), source));
    step.regex = std::move(regex);
  } else if (type == "Metaspace") {
    step.kind = PreTokenizerStep::kMetaspace;
    step.replacement = StringField(node, "replacement", "\u2581");
    step.prepend_scheme = StringField(
        node, "prepend_scheme", BoolField(node, "add_prefix_space", true) ? "always" : "never");
    step.split = BoolField(node, "split", true);
    if (step.prepend_scheme != "always" && step.prepend_scheme != "first" &&
        step.prepend_scheme != "never") {
      return absl::InvalidArgumentError(absl::StrCat(source, ": Metaspace prepend_scheme '",
                                                     step.prepend_scheme, "' is not supported"));
    }
  } else {
    return Unsupported(source, "pre-tokenizer", node);
  }
  impl->pre_tokenizers.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ParseDecoder(const json& node, absl::string_view source, Tokenizer::Impl* impl) {
  if (node.is_null()) return absl::OkStatus();
  std::string type = StringField(node, "type");
  DecoderStep step;
  if (type == "Sequence" && node.contains("decoders") && node["decoders"].is_array()) {
    for (const json& child : node["decoders"])
      MOED_RETURN_IF_ERROR(ParseDecoder(child, source, impl));
    return absl::OkStatus();
  } else if (type == "ByteLevel") {
    step.kind = DecoderStep::kByteLevel;
  } else if (type == "Replace" && PlainPattern(node)) {
    step = {DecoderStep::kReplace, *PlainPattern(node), StringField(node, "content")};
  } else if (type == "ByteFallback") {
    step.kind = DecoderStep::kByteFallback;
  } else if (type == "Fuse") {
    step.kind = DecoderStep::kFuse;
  } else if (type == "Strip") {
    step.kind = DecoderStep::kStrip;
    step.a = StringField(node, "content", " ");
    MOED_ASSIGN_OR_RETURN(step.start, CountField(node, "start", source, "Strip decoder"));
    MOED_ASSIGN_OR_RETURN(step.stop, CountField(node, "stop", source, "Strip decoder"));
  } else if (type == "Metaspace") {
    step.kind = DecoderStep::kMetaspace;
    step.a = StringField(node, "replacement", "\u2581");
    step.prepend_scheme = StringField(node, "prepend_scheme", "always");
  } else {
    return Unsupported(source, "decoder", node);
  }
  impl->decoders.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ParsePostProcessor(const json& node, absl::string_view source, Tokenizer::Impl* impl) {
  if (node.is_null()) return absl::OkStatus();
  std::string type = StringField(node, "type");
  if (type == "ByteLevel") return absl::OkStatus();  // only adjusts offsets
  if (type == "Sequence" && node.contains("processors") && node["processors"].is_array()) {
    for (const json& child : node["processors"])
      MOED_RETURN_IF_ERROR(ParsePostProcessor(child, source, impl));
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") return Unsupported(source, "post-processor", node);
  auto single = node.find("single");
  auto specials = node.find("special_tokens");
  if (single == node.end() || !single->is_array() || specials == node.end() ||
      !specials->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": TemplateProcessing needs single and special_tokens"));
  }
  bool seen_sequence = false;
  for (const json& item : *single) {
    if (item.contains("Sequence")) {
      seen_sequence = true;
      continue;
    }
    if (!item.contains("SpecialToken") || !item["SpecialToken"].is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": unexpected TemplateProcessing item"));
    }
    std::string name = StringField(item["SpecialToken"], "id");
    auto entry = specials->find(name);
    if (entry == specials->end() || !entry->is_object() || !entry->contains("ids") ||
        !(*entry)["ids"].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": TemplateProcessing names unknown special token ", name));
    }
    for (const json& id : (*entry)["ids"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 24))
        return absl::InvalidArgumentError(absl::StrCat(source, ": bad special token id"));
      (seen_sequence ? impl->template_suffix : impl->template_prefix).push_back(id.get<int32_t>());
    }
  }
  return absl::OkStatus();
}

absl::Status ParseModel(const json& node, absl::string_view source, Tokenizer::Impl* impl) {
  if (!node.is_object() || StringField(node, "type") != "BPE") {
    return Unsupported(source, "model", node.is_object() ? node : json::object());
  }
  if (!StringField(node, "continuing_subword_prefix").empty() ||
      !StringField(node, "end_of_word_suffix").empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": BPE continuing_subword_prefix / end_of_word_suffix are not supported"));
  }
  auto vocab = node.find("vocab");
  if (vocab == node.end() || !vocab->is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": BPE model has no vocab"));
  for (const auto& [token, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (1 << 24)) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": vocab entry '", token, "' has a bad id"));
    }
    int32_t value = id.get<int32_t>();
    impl->vocab[token] = value;
    if (static_cast<size_t>(value) >= impl->id_to_token.size()) impl->id_to_token.resize(value + 1);
    impl->id_to_token[value] = token;
  }
  impl->byte_fallback = BoolField(node, "byte_fallback", false);
  impl->fuse_unk = BoolField(node, "fuse_unk", false);
  impl->ignore_merges = BoolField(node, "ignore_merges", false);
  if (std::string unk = StringField(node, "unk_token"); !unk.empty()) {
    auto it = impl->vocab.find(unk);
    if (it == impl->vocab.end())
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": unk_token ", unk, " is not in the vocab"));
    impl->unk_id = it->second;
  }
  if (impl->byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      char name[8];
      std::snprintf(name, sizeof(name), "<0x%02X>", b);
      auto it = impl->vocab.find(name);
      if (it == impl->vocab.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": byte_fallback needs token ", name));
      }
      impl->byte_tokens[b] = it->second;
    }
  }
  auto merges = node.find("merges");
  if (merges == node.end() || !merges->is_array())
    return absl::InvalidArgumentError(absl::StrCat(source, ": BPE model has no merges"));
  int32_t rank = 0;
  for (const json& merge : *merges) {
    std::string left, right;
    if (merge.is_array() && merge.size() == 2 && merge[0].is_string() && merge[1].is_string()) {
      left = merge[0].get<std::string>();
      right = merge[1].get<std::string>();
    } else if (merge.is_string()) {
      const std::string& text = merge.get_ref<const std::string&>();
      size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": merge '", text, "' is not two tokens"));
      }
      left = text.substr(0, space);
      right = text.substr(space + 1);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": merge ", rank, " is neither [a, b] nor \"a b\""));
    }
    auto l = impl->vocab.find(left), r = impl->vocab.find(right),
         m = impl->vocab.find(left + right);
    if (l == impl->vocab.end() || r == impl->vocab.end() || m == impl->vocab.end()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": merge ", rank, " ('", left, "', '",
                                                     right, "') uses tokens not in the vocab"));
    }
    impl->merges.try_emplace(Tokenizer::Impl::PairKey(l->second, r->second), rank, m->second);
    ++rank;
  }
  return absl::OkStatus();
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view json_text,
                                                               absl::string_view source) {
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, false);
  if (root.is_discarded() || !root.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  auto impl = std::make_unique<Impl>();
  impl->source = std::string(source);
  auto field = [&](const char* key) -> const json& {
    static const json null_json;
    auto it = root.find(key);
    return it == root.end() ? null_json : *it;
  };
  MOED_RETURN_IF_ERROR(ParseModel(field("model"), source, impl.get()));
  MOED_RETURN_IF_ERROR(ParseNormalizer(field("normalizer"), source, impl.get()));
  MOED_RETURN_IF_ERROR(ParsePreTokenizer(field("pre_tokenizer"), source, impl.get()));
  MOED_RETURN_IF_ERROR(ParseDecoder(field("decoder"), source, impl.get()));
  MOED_RETURN_IF_ERROR(ParsePostProcessor(field("post_processor"), source, impl.get()));
  const json& added = field("added_tokens");
  if (!added.is_null() && !added.is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": added_tokens is not a list"));
  }
  for (const json& token : added.is_array() ? added : json::array()) {
    if (!token.is_object() || !token.contains("id") || !token["id"].is_number_integer() ||
        token["id"].get<int64_t>() < 0 || token["id"].get<int64_t>() > (1 << 24) ||
        !token.contains("content") || !token["content"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": malformed added token"));
    }
    AddedToken entry{token["id"].get<int32_t>(), token["content"].get<std::string>(),
                     BoolField(token, "special", false), BoolField(token, "lstrip", false),
                     BoolField(token, "rstrip", false)};
    if (static_cast<size_t>(entry.id) >= impl->id_to_token.size())
      impl->id_to_token.resize(entry.id + 1);
    impl->id_to_token[entry.id] = entry.content;
    impl->vocab[entry.content] = entry.id;
    impl->added.push_back(std::move(entry));
  }
  impl->special.assign(impl->id_to_token.size(), false);
  for (const AddedToken& token : impl->added) impl->special[token.id] = token.special;
  for (int32_t id : impl->template_prefix) {
    if (id < 0 || static_cast<size_t>(id) >= impl->id_to_token.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": post-processor id ", id, " is not in the vocab"));
    }
  }
  return std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  MOED_ASSIGN_OR_RETURN(std::string text, util::ReadFile(path));
  return FromJson(text, path);
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool add_special_tokens) const {
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl_->template_prefix;
  bool first = true;
  for (auto& [segment, added_id] : impl_->SplitAdded(text)) {
    if (added_id >= 0) {
      ids.push_back(added_id);
    } else {
      for (const std::string& piece : impl_->PreTokenize(impl_->Normalize(segment), first)) {
        MOED_RETURN_IF_ERROR(impl_->Bpe(piece, &ids));
      }
    }
    first = false;
  }
  if (add_special_tokens)
    ids.insert(ids.end(), impl_->template_suffix.begin(), impl_->template_suffix.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids,
                                              bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  for (int32_t id : ids) {
    if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_token.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", id, " is outside the vocabulary of ", impl_->id_to_token.size()));
    }
    if (skip_special_tokens && impl_->special[id]) continue;
    tokens.push_back(impl_->id_to_token[id]);
  }
  std::string text;
  for (const std::string& piece : impl_->RunDecoders(std::move(tokens))) text += piece;
  return ToValidUtf8(text);
}

int32_t Tokenizer::vocab_size() const { return static_cast<int32_t>(impl_->id_to_token.size()); }

std::optional<std::string> Tokenizer::TokenText(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= impl_->id_to_token.size()) return std::nullopt;
  return impl_->id_to_token[id];
}

std::optional<int32_t> Tokenizer::TokenId(absl::string_view token) const {
  auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < impl_->special.size() && impl_->special[id];
}

std::string Tokenizer::DecodeChainOnText(const std::string& text) const {
  std::string out;
  for (const std::string& piece : impl_->RunDecoders({text})) out += piece;
  return out;
}

std::string Tokenizer::NormalizeForTest(absl::string_view text) const {
  std::string out;
  for (const std::string& piece : impl_->PreTokenize(impl_->Normalize(text), true)) out += piece;
  return out;
}

size_t CompleteUtf8Prefix(absl::string_view text) {
  size_t i = 0, complete = 0;
  while (i < text.size()) {
    int len = Utf8Length(static_cast<unsigned char>(text[i]));
    if (len == 0) {  // a stray byte is complete in the sense that nothing can fix it
      complete = ++i;
      continue;
    }
    if (i + len > text.size()) break;
    i += len;
    complete = i;
  }
  return complete;
}

absl::StatusOr<std::string> StreamingDecoder::Add(int32_t id) {
  ids_.push_back(id);
  std::vector<int32_t> prefix(ids_.begin() + prefix_offset_, ids_.begin() + read_offset_);
  std::vector<int32_t> full(ids_.begin() + prefix_offset_, ids_.end());
  MOED_ASSIGN_OR_RETURN(std::string prefix_text, tokenizer_.Decode(prefix, skip_special_));
  MOED_ASSIGN_OR_RETURN(std::string full_text, tokenizer_.Decode(full, skip_special_));
  // An incomplete character decodes to U+FFFD at the end: wait for the rest of it.
  if (full_text.size() <= prefix_text.size() || absl::EndsWith(full_text, kReplacementChar))
    return std::string();
  std::string delta = full_text.substr(prefix_text.size());
  prefix_offset_ = read_offset_;
  read_offset_ = ids_.size();
  return delta;
}

absl::StatusOr<std::string> StreamingDecoder::Flush() {
  std::vector<int32_t> prefix(ids_.begin() + prefix_offset_, ids_.begin() + read_offset_);
  std::vector<int32_t> full(ids_.begin() + prefix_offset_, ids_.end());
  MOED_ASSIGN_OR_RETURN(std::string prefix_text, tokenizer_.Decode(prefix, skip_special_));
  MOED_ASSIGN_OR_RETURN(std::string full_text, tokenizer_.Decode(full, skip_special_));
  prefix_offset_ = read_offset_ = ids_.size();
  if (full_text.size() <= prefix_text.size()) return std::string();
  return full_text.substr(prefix_text.size());
}

}  // namespace moed::model
