# Turns a text file into a C++ array (k${NAME}Bytes, k${NAME}Size) so that moed-synth needs
# no files at run time.
file(READ ${INPUT} hex HEX)
string(LENGTH "${hex}" hex_length)
math(EXPR size "${hex_length} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," bytes "${hex}")
file(WRITE ${OUTPUT} "#include <cstddef>\nnamespace moed::tools {\nextern const unsigned char k${NAME}Bytes[] = {${bytes}};\nextern const size_t k${NAME}Size = ${size};\n}  // namespace moed::tools\n")
