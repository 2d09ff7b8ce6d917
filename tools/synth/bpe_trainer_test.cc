#include "tools/synth/bpe_trainer.h"

#include <catch2/catch.hpp>
#include <set>

#include "nlohmann/json.hpp"

namespace moed::tools {
namespace {

TEST_CASE("bytes map onto GPT-2's printable alphabet") {
  CHECK(ByteToSymbol('a') == "a");
  CHECK(ByteToSymbol('!') == "!");
  CHECK(ByteToSymbol(' ') == "\xC4\xA0");   // U+0120 'Ġ'
  CHECK(ByteToSymbol('\n') == "\xC4\x8A");  // U+010A 'Ċ'
  CHECK(ByteToSymbol(0) == "\xC4\x80");     // U+0100 'Ā'
  CHECK(ByteToSymbol(0xAD) == "\xC5\x83");  // soft hyphen is shifted: U+0143 'Ń'
  std::set<std::string> symbols;
  for (int b = 0; b < 256; ++b) symbols.insert(ByteToSymbol(static_cast<uint8_t>(b)));
  CHECK(symbols.size() == 256);
}

TEST_CASE("the GPT-2 pattern splits words, contractions, numbers and whitespace") {
  auto pieces = PreTokenize("Hello world's  x 42!!\n");
  REQUIRE(pieces.ok());
  CHECK(*pieces == std::vector<std::string>{"Hello", " world", "'s", " ", " x", " 42", "!!", "\n"});
  CHECK(*PreTokenize("日本語 ok") == std::vector<std::string>{"日本語", " ok"});
  CHECK_FALSE(PreTokenize("bad \xFF utf8").ok());
}

TEST_CASE("training merges the most frequent pair first, ties to the lowest ids") {
  auto vocabulary = TrainByteLevelBpe("aaab aaab aaab", 3);
  REQUIRE(vocabulary.ok());
  // Pieces: "aaab" once, " aaab" twice. (a,a) occurs 6 times; then (aa,a) and (a,b) tie at
  // 3 and (a,b) has the lower ids; then (aa,ab) and (Ġ,aa) ... (aa,ab) occurs 3 times.
  REQUIRE(vocabulary->merges.size() == 3);
  CHECK(vocabulary->merges[0] == std::pair<std::string, std::string>{"a", "a"});
  CHECK(vocabulary->merges[1] == std::pair<std::string, std::string>{"a", "b"});
  CHECK(vocabulary->merges[2] == std::pair<std::string, std::string>{"aa", "ab"});
  CHECK(vocabulary->tokens.size() == 259);
  CHECK(vocabulary->tokens[258] == "aaab");
  // Nothing occurs twice any more after "aaab" and "Ġaaab": training stops early.
  CHECK(TrainByteLevelBpe("aaab aaab aaab", 100)->merges.size() == 4);
}

TEST_CASE("tokenizer.json has the byte-level BPE layout") {
  auto vocabulary = TrainByteLevelBpe("the cat and the hat and the bat", 10);
  REQUIRE(vocabulary.ok());
  auto tokenizer = nlohmann::json::parse(TokenizerJson(*vocabulary, {"<|endoftext|>"}));
  CHECK(tokenizer["model"]["type"] == "BPE");
  CHECK(tokenizer["pre_tokenizer"]["type"] == "ByteLevel");
  CHECK(tokenizer["decoder"]["type"] == "ByteLevel");
  const auto& vocab = tokenizer["model"]["vocab"];
  CHECK(vocab.size() == vocabulary->tokens.size());
  for (const auto& merge : tokenizer["model"]["merges"]) {
    REQUIRE(merge.size() == 2);
    CHECK(vocab.contains(merge[0].get<std::string>() + merge[1].get<std::string>()));
  }
  REQUIRE(tokenizer["added_tokens"].size() == 1);
  CHECK(tokenizer["added_tokens"][0]["id"] == vocabulary->tokens.size());
  CHECK(tokenizer["added_tokens"][0]["special"] == true);
}

}  // namespace
}  // namespace moed::tools
