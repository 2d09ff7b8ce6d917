# Turns the tokenizer training text into a C++ array so that moed-synth needs no files.
file(READ ${INPUT} hex HEX)
string(LENGTH "${hex}" hex_length)
math(EXPR size "${hex_length} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE ${OUTPUT} "#include <cstddef>\nnamespace moed::tools {\nextern const unsigned char kCorpusBytes[] = {${bytes}};\nextern const size_t kCorpusSize = ${size};\n}  // namespace moed::tools\n")
