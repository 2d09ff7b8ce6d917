// The tokenizer on vocabularies made here: the demo model's learned byte-level BPE, and small
// hand-written files for the SentencePiece-style pieces and for refusals.
#include "model/tokenizer.h"

#include <catch2/catch.hpp>
#include <random>

#include "tools/synth/bpe_trainer.h"
#include "tools/synth/synthesizer.h"

namespace moed::model {
namespace {

std::unique_ptr<Tokenizer> SynthTokenizer() {
  auto vocabulary = tools::TrainByteLevelBpe(tools::TokenizerCorpus(), 700);
  REQUIRE(vocabulary.ok());
  auto tokenizer = Tokenizer::FromJson(
      tools::TokenizerJson(*vocabulary, {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}), "synth");
  REQUIRE(tokenizer.ok());
  return *std::move(tokenizer);
}

// Random valid UTF-8: ASCII, Latin, Cyrillic, CJK, emoji, controls and whitespace runs.
std::string RandomText(std::mt19937& rng) {
  static const std::vector<std::string> pool = {"a",
                                                "Z",
                                                " ",
                                                "  ",
                                                "\n",
                                                "\t",
                                                "0",
                                                "9",
                                                "'s",
                                                "!",
                                                "é",
                                                "ß",
                                                "ж",
                                                "中",
                                                "日本",
                                                "🦙",
                                                "👩‍💻",
                                                "\xC2\xA0",
                                                "\u2581",
                                                std::string("\0", 1),
                                                "\xEF\xBF\xBD",
                                                "<",
                                                "|",
                                                ">",
                                                "the",
                                                " the",
                                                "ing"};
  std::string text;
  int n = std::uniform_int_distribution<int>(0, 40)(rng);
  for (int i = 0; i < n; ++i)
    text += pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(rng)];
  return text;
}

TEST_CASE("the synthesized byte-level tokenizer round-trips any UTF-8 text") {
  auto tokenizer = SynthTokenizer();
  std::mt19937 rng(11);
  for (int i = 0; i < 500; ++i) {
    std::string text = RandomText(rng);
    auto ids = tokenizer->Encode(text);
    REQUIRE(ids.ok());
    auto back = tokenizer->Decode(*ids);
    REQUIRE(back.ok());
    REQUIRE(*back == text);
  }
  // Learned merges shorten common English.
  auto ids = tokenizer->Encode("the clockmaker and the town");
  REQUIRE(ids.ok());
  CHECK(ids->size() < 12);
}

TEST_CASE("special tokens in the text match as added tokens and can be skipped when decoding") {
  auto tokenizer = SynthTokenizer();
  int32_t eos = *tokenizer->TokenId("<|endoftext|>");
  auto ids = tokenizer->Encode("hi<|endoftext|>yo");
  REQUIRE(ids.ok());
  CHECK(std::count(ids->begin(), ids->end(), eos) == 1);
  CHECK(tokenizer->IsSpecial(eos));
  CHECK(*tokenizer->Decode(*ids) == "hi<|endoftext|>yo");
  CHECK(*tokenizer->Decode(*ids, /*skip_special_tokens=*/true) == "hiyo");
  CHECK(tokenizer->Decode({tokenizer->vocab_size()}).status().code() ==
        absl::StatusCode::kInvalidArgument);
}

TEST_CASE("streaming never emits half a character and adds up to the whole text") {
  auto tokenizer = SynthTokenizer();
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) {
    std::string text = RandomText(rng);
    auto ids = tokenizer->Encode(text);
    REQUIRE(ids.ok());
    StreamingDecoder stream(*tokenizer, false);
    std::string joined;
    for (int32_t id : *ids) {
      auto delta = stream.Add(id);
      REQUIRE(delta.ok());
      CHECK(CompleteUtf8Prefix(*delta) == delta->size());
      bool text_has_replacement = text.find("\xEF\xBF\xBD") != std::string::npos;
      CHECK((delta->find("\xEF\xBF\xBD") == std::string::npos || text_has_replacement));
      joined += *delta;
    }
    joined += *stream.Flush();
    REQUIRE(joined == text);
  }
}

TEST_CASE("UTF-8 prefix completeness") {
  CHECK(CompleteUtf8Prefix("abc") == 3);
  CHECK(CompleteUtf8Prefix("a\xE4\xB8") == 1);  // half of 中
  CHECK(CompleteUtf8Prefix("a\xE4\xB8\xAD") == 4);
  CHECK(CompleteUtf8Prefix("\xF0\x9F\xA6") == 0);  // 3 of 4 bytes of an emoji
}

// A tiny SentencePiece-style vocabulary: Metaspace, byte fallback, string merges.
constexpr char kSentencePieceJson[] = R"({
  "added_tokens": [{"id": 1, "content": "<s>", "special": true}, {"id": 2, "content": "</s>", "special": true}],
  "normalizer": null,
  "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
  "decoder": {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
    {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
  "model": {"type": "BPE", "unk_token": "<unk>", "fuse_unk": true, "byte_fallback": true,
    "vocab": {VOCAB},
    "merges": ["▁ h", "▁h i", "h i"]}})";

std::unique_ptr<Tokenizer> SentencePieceTokenizer() {
  std::string vocab =
      R"("<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "i": 5, "▁h": 6, "▁hi": 7, "hi": 8)";
  for (int b = 0; b < 256; ++b) {
    char entry[32];
    std::snprintf(entry, sizeof(entry), ", \"<0x%02X>\": %d", b, 9 + b);
    vocab += entry;
  }
  std::string text = kSentencePieceJson;
  text.replace(text.find("{VOCAB}"), 7, "{" + vocab + "}");
  auto tokenizer = Tokenizer::FromJson(text, "sp.json");
  INFO(tokenizer.status().ToString());
  REQUIRE(tokenizer.ok());
  return *std::move(tokenizer);
}

TEST_CASE("SentencePiece-style: metaspace, merges, byte fallback, BOS template, decoder chain") {
  auto tokenizer = SentencePieceTokenizer();
  CHECK(*tokenizer->Encode("hi") == std::vector<int32_t>{7});  // "▁hi"
  CHECK(*tokenizer->Encode("hi hi") == std::vector<int32_t>{7, 7});
  CHECK(*tokenizer->Encode(" hi") == std::vector<int32_t>{7});  // "first": no second ▁
  // 'é' is not in the vocabulary: its two UTF-8 bytes fall back to <0xC3><0xA9>.
  CHECK(*tokenizer->Encode("hé") == std::vector<int32_t>{6, 9 + 0xC3, 9 + 0xA9});
  CHECK(*tokenizer->Encode("hi", true) == std::vector<int32_t>{1, 7});
  CHECK(*tokenizer->Decode({7, 7}) == "hi hi");
  CHECK(*tokenizer->Decode({6, 9 + 0xC3, 9 + 0xA9}) == "hé");
  CHECK(*tokenizer->Decode({6, 9 + 0xC3}) == "h\xEF\xBF\xBD");  // a lone lead byte
}

TEST_CASE("components that are not implemented are refused by name") {
  auto error = [](const std::string& json) {
    auto t = Tokenizer::FromJson(json, "t.json");
    REQUIRE_FALSE(t.ok());
    return std::string(t.status().message());
  };
  const std::string model =
      R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]})";
  CHECK(error("{" + model + R"(, "normalizer": {"type": "NFKD"}})") ==
        "t.json: normalizer 'NFKD' is not supported");
  CHECK(error("{" + model + R"(, "pre_tokenizer": {"type": "Whitespace"}})") ==
        "t.json: pre-tokenizer 'Whitespace' is not supported");
  CHECK(error("{" + model + R"(, "decoder": {"type": "WordPiece"}})") ==
        "t.json: decoder 'WordPiece' is not supported");
  CHECK(error(R"({"model": {"type": "WordPiece", "vocab": {}}})") ==
        "t.json: model 'WordPiece' is not supported");
  CHECK(error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}})") ==
        "t.json: merge 0 ('a', 'b') uses tokens not in the vocab");
  CHECK(error(R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a"]}})") ==
        "t.json: merge 'a' is not two tokens");
  CHECK(error("[1]") == "t.json: not a JSON object");
  CHECK(error("{" + model + R"(, "decoder": {"type": "Strip", "start": 2e61}})") ==
        "t.json: Strip decoder 'start' must be an integer from 0 to 1048576");
  CHECK(error("{" + model + R"(, "decoder": {"type": "Strip", "stop": -1}})") ==
        "t.json: Strip decoder 'stop' must be an integer from 0 to 1048576");
  auto ok = Tokenizer::FromJson("{" + model + "}", "t.json");
  REQUIRE(ok.ok());
  CHECK(*(*ok)->Encode("ab") == std::vector<int32_t>{2});
  CHECK((*ok)->Encode("c").status().message() ==
        "t.json: the vocabulary cannot encode 'c' and has no unk token");
}

}  // namespace
}  // namespace moed::model
