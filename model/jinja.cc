// The Jinja subset: lexer (jinja2's whitespace rules), recursive-descent parser, and a
// tree-walking renderer with Python value semantics. See jinja.h for the contract.
#include "model/jinja.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "utf8proc.h"
#include "util/status_macros.h"

namespace moed::model {

bool IsTemplateRaise(const absl::Status& status) {
  return status.GetPayload(kJinjaRaisePayload).has_value();
}

namespace {

// ---------------------------------------------------------------------------------------
// Unicode helpers. Strings are UTF-8; Python counts, slices and strips code points.

void AppendUtf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

// Decodes UTF-8; an invalid byte becomes U+FFFD (inputs are validated before they get here).
std::u32string DecodeUtf8(absl::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    utf8proc_int32_t c;
    utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                          static_cast<utf8proc_ssize_t>(s.size() - i), &c);
    if (n <= 0) {
      out.push_back(0xFFFD);
      ++i;
    } else {
      out.push_back(static_cast<char32_t>(c));
      i += static_cast<size_t>(n);
    }
  }
  return out;
}

std::string EncodeUtf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) AppendUtf8(out, c);
  return out;
}

bool ValidUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    utf8proc_int32_t c;
    utf8proc_ssize_t n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                                          static_cast<utf8proc_ssize_t>(s.size() - i), &c);
    if (n <= 0) return false;
    i += static_cast<size_t>(n);
  }
  return true;
}

size_t CodePointCount(absl::string_view s) {
  size_t n = 0;
  for (char c : s) n += (static_cast<unsigned char>(c) & 0xC0) != 0x80;
  return n;
}

// Python's str.isspace().
bool IsPySpace(char32_t c) {
  switch (c) {
    case 0x09:
    case 0x0A:
    case 0x0B:
    case 0x0C:
    case 0x0D:
    case 0x1C:
    case 0x1D:
    case 0x1E:
    case 0x1F:
    case 0x20:
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
      return true;
    default:
      return c >= 0x2000 && c <= 0x200A;
  }
}

// Python's str.isprintable() for one code point.
bool IsPyPrintable(char32_t c) {
  if (c == ' ') return true;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS:
      return false;
    default:
      return true;
  }
}

enum class StripSide { kBoth, kLeft, kRight };

// Python's str.strip/lstrip/rstrip: whitespace, or the code points of `chars` when given.
std::string PyStrip(absl::string_view s, StripSide side, const std::u32string* chars) {
  std::u32string text = DecodeUtf8(s);
  auto strip = [&](char32_t c) {
    return chars ? chars->find(c) != std::u32string::npos : IsPySpace(c);
  };
  size_t begin = 0, end = text.size();
  if (side != StripSide::kRight)
    while (begin < end && strip(text[begin])) ++begin;
  if (side != StripSide::kLeft)
    while (end > begin && strip(text[end - 1])) --end;
  return EncodeUtf8(std::u32string_view(text).substr(begin, end - begin));
}

std::string MapCase(absl::string_view s, bool upper) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : DecodeUtf8(s)) {
    auto cp = static_cast<utf8proc_int32_t>(c);
    AppendUtf8(out, static_cast<char32_t>(upper ? utf8proc_toupper(cp) : utf8proc_tolower(cp)));
  }
  return out;
}

// Python's float.__repr__: the shortest digits that round-trip, fixed notation for
// exponents in [-4, 16), scientific otherwise.
std::string PyFloatRepr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  auto result = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  absl::string_view sci(buf, static_cast<size_t>(result.ptr - buf));
  std::string sign;
  if (!sci.empty() && sci[0] == '-') {
    sign = "-";
    sci.remove_prefix(1);
  }
  size_t e_pos = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_pos))
    if (c != '.') digits.push_back(c);
  int exponent = 0;
  absl::string_view exp_text = sci.substr(e_pos + 1);
  if (!exp_text.empty() && exp_text[0] == '+') exp_text.remove_prefix(1);
  std::from_chars(exp_text.data(), exp_text.data() + exp_text.size(), exponent);
  const int n = static_cast<int>(digits.size());
  std::string out = sign;
  if (exponent >= -4 && exponent < 16) {
    if (exponent >= 0) {
      const size_t whole = static_cast<size_t>(exponent) + 1;  // digits before the point
      if (digits.size() <= whole) {
        out += digits + std::string(whole - digits.size(), '0') + ".0";
      } else {
        out += digits.substr(0, whole) + "." + digits.substr(whole);
      }
    } else {
      out += "0." + std::string(static_cast<size_t>(-exponent) - 1, '0') + digits;
    }
    return out;
  }
  out += digits.substr(0, 1);
  if (n > 1) out += "." + digits.substr(1);
  char exp_buf[16];
  std::snprintf(exp_buf, sizeof(exp_buf), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
  return out + exp_buf;
}

std::string PyStringRepr(absl::string_view s) {
  bool has_single = s.find('\'') != absl::string_view::npos;
  bool has_double = s.find('"') != absl::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : DecodeUtf8(s)) {
    char buf[16];
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    } else if (c < 0x7F || IsPyPrintable(c)) {
      AppendUtf8(out, c);
    } else {
      if (c <= 0xFF) {
        std::snprintf(buf, sizeof(buf), "\\x%02x", static_cast<unsigned>(c));
      } else if (c <= 0xFFFF) {
        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
      } else {
        std::snprintf(buf, sizeof(buf), "\\U%08x", static_cast<unsigned>(c));
      }
      out += buf;
    }
  }
  out.push_back(quote);
  return out;
}

// json.dumps's string encoder.
void AppendJsonString(std::string& out, absl::string_view s, bool ensure_ascii) {
  out.push_back('"');
  char buf[16];
  for (char32_t c : DecodeUtf8(s)) {
    switch (c) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (c < 0x20 || (ensure_ascii && c >= 0x7F)) {
      if (c >= 0x10000) {
        char32_t v = c - 0x10000;
        std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                      static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
      } else {
        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(c));
      }
      out += buf;
    } else {
      AppendUtf8(out, c);
    }
  }
  out.push_back('"');
}

// ---------------------------------------------------------------------------------------
// Values.

struct Value;
using ValueList = std::vector<Value>;
class Renderer;

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> named;
};

struct Callable {
  std::string name;
  std::function<absl::StatusOr<Value>(Renderer&, CallArgs&)> call;
};

struct ValueDict;

struct Value {
  enum class Kind : uint8_t {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,
    kDict,
    kNamespace,
    kCallable
  };
  Kind kind = Kind::kUndefined;
  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  std::shared_ptr<const std::string> text;  // kString; for kUndefined, what was missing
  std::shared_ptr<const ValueList> list;
  std::shared_ptr<ValueDict> dict;  // kDict (never changed once built) and kNamespace
  std::shared_ptr<const Callable> fn;

  static Value Undefined(std::string hint = {}) {
    Value v;
    if (!hint.empty()) v.text = std::make_shared<const std::string>(std::move(hint));
    return v;
  }
  static Value None() { return Make(Kind::kNone); }
  static Value Bool(bool b) {
    Value v = Make(Kind::kBool);
    v.boolean = b;
    return v;
  }
  static Value Int(int64_t i) {
    Value v = Make(Kind::kInt);
    v.integer = i;
    return v;
  }
  static Value Float(double d) {
    Value v = Make(Kind::kFloat);
    v.real = d;
    return v;
  }
  static Value String(std::string s) {
    Value v = Make(Kind::kString);
    v.text = std::make_shared<const std::string>(std::move(s));
    return v;
  }
  static Value List(ValueList items) {
    Value v = Make(Kind::kList);
    v.list = std::make_shared<const ValueList>(std::move(items));
    return v;
  }
  static Value Dict(std::shared_ptr<ValueDict> d) {
    Value v = Make(Kind::kDict);
    v.dict = std::move(d);
    return v;
  }
  static Value Namespace(std::shared_ptr<ValueDict> d) {
    Value v = Make(Kind::kNamespace);
    v.dict = std::move(d);
    return v;
  }
  static Value Function(std::string name,
                        std::function<absl::StatusOr<Value>(Renderer&, CallArgs&)> call) {
    Value v = Make(Kind::kCallable);
    v.fn = std::make_shared<const Callable>(Callable{std::move(name), std::move(call)});
    return v;
  }

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const {
    return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool;
  }
  const std::string& str() const { return *text; }
  double AsDouble() const {
    return kind == Kind::kFloat ? real
                                : static_cast<double>(kind == Kind::kBool ? boolean : integer);
  }
  int64_t AsInt() const { return kind == Kind::kBool ? boolean : integer; }

 private:
  static Value Make(Kind kind) {
    Value v;
    v.kind = kind;
    return v;
  }
};

// Insertion-ordered string-keyed mapping (Python dicts keep insertion order).
struct ValueDict {
  std::vector<std::pair<std::string, Value>> items;
  absl::flat_hash_map<std::string, size_t> index;

  const Value* Find(absl::string_view key) const {
    auto it = index.find(key);
    return it == index.end() ? nullptr : &items[it->second].second;
  }
  void Set(std::string key, Value value) {
    auto it = index.find(key);
    if (it != index.end()) {
      items[it->second].second = std::move(value);
      return;
    }
    index.emplace(key, items.size());
    items.emplace_back(std::move(key), std::move(value));
  }
};

absl::string_view TypeName(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "Undefined";
    case Value::Kind::kNone:
      return "NoneType";
    case Value::Kind::kBool:
      return "bool";
    case Value::Kind::kInt:
      return "int";
    case Value::Kind::kFloat:
      return "float";
    case Value::Kind::kString:
      return "str";
    case Value::Kind::kList:
      return "list";
    case Value::Kind::kDict:
      return "dict";
    case Value::Kind::kNamespace:
      return "Namespace";
    case Value::Kind::kCallable:
      return "function";
  }
  return "object";
}

Value FromJson(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::None();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      uint64_t u = j.get<uint64_t>();
      if (u <= static_cast<uint64_t>(INT64_MAX)) return Value::Int(static_cast<int64_t>(u));
      return Value::Float(static_cast<double>(u));
    }
    case nlohmann::ordered_json::value_t::number_float:
      return Value::Float(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::String(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList items;
      items.reserve(j.size());
      for (const auto& item : j) items.push_back(FromJson(item));
      return Value::List(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto dict = std::make_shared<ValueDict>();
      for (const auto& [key, item] : j.items()) dict->Set(key, FromJson(item));
      return Value::Dict(std::move(dict));
    }
    default:
      return Value::Undefined();
  }
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return false;
    case Value::Kind::kBool:
      return v.boolean;
    case Value::Kind::kInt:
      return v.integer != 0;
    case Value::Kind::kFloat:
      return v.real != 0;
    case Value::Kind::kString:
      return !v.text->empty();
    case Value::Kind::kList:
      return !v.list->empty();
    case Value::Kind::kDict:
      return !v.dict->items.empty();
    default:
      return true;
  }
}

std::string Repr(const Value& v);

// Python's str().
std::string ToStr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
      return "";
    case Value::Kind::kNone:
      return "None";
    case Value::Kind::kBool:
      return v.boolean ? "True" : "False";
    case Value::Kind::kInt:
      return std::to_string(v.integer);
    case Value::Kind::kFloat:
      return PyFloatRepr(v.real);
    case Value::Kind::kString:
      return *v.text;
    case Value::Kind::kNamespace:
      return "<Namespace>";
    case Value::Kind::kCallable:
      return absl::StrCat("<function ", v.fn->name, ">");
    default:
      return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kString:
      return PyStringRepr(*v.text);
    case Value::Kind::kList: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) out += ", ";
        out += Repr((*v.list)[i]);
      }
      return out + "]";
    }
    case Value::Kind::kDict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [key, item] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += PyStringRepr(key) + ": " + Repr(item);
      }
      return out + "}";
    }
    default:
      return ToStr(v);
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat)
      return a.AsDouble() == b.AsDouble();
    return a.AsInt() == b.AsInt();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone:
      return true;
    case Value::Kind::kString:
      return *a.text == *b.text;
    case Value::Kind::kList: {
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i)
        if (!Equal((*a.list)[i], (*b.list)[i])) return false;
      return true;
    }
    case Value::Kind::kDict: {
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [key, item] : a.dict->items) {
        const Value* other = b.dict->Find(key);
        if (!other || !Equal(item, *other)) return false;
      }
      return true;
    }
    default:
      return a.dict == b.dict && a.fn == b.fn;
  }
}

// ---------------------------------------------------------------------------------------
// Lexer.

enum class Tok {
  kData,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok type;
  std::string text;  // data, name, operator, decoded string literal
  int64_t integer = 0;
  double real = 0;
  int line = 1;
};

absl::Status SyntaxError(int line, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat("template line ", line, ": ", message));
}

class Lexer {
 public:
  explicit Lexer(std::string source) : src_(std::move(source)) {}

  absl::StatusOr<std::vector<Token>> Run() {
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t open = FindOpener(pos);
      if (open == std::string::npos) {
        Emit(Tok::kData, src_.substr(pos), pos);
        break;
      }
      char kind = src_[open + 1];  // '{', '%' or '#'
      char sign = open + 2 < src_.size() ? src_[open + 2] : '\0';
      if (sign != '-' && sign != '+') sign = '\0';
      std::string text = src_.substr(pos, open - pos);
      if (sign == '-') {
        text = RStripWhitespace(text);
      } else if (sign != '+' && kind != '{') {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        if (l_pos > 0 || line_starting) {
          absl::string_view tail = absl::string_view(text).substr(l_pos);
          if (!tail.empty() && std::all_of(tail.begin(), tail.end(), [](char c) {
                return c == ' ' || c == '\t' || c == '\v' || c == '\f';
              })) {
            text.resize(l_pos);
          }
        }
      }
      if (!text.empty()) Emit(Tok::kData, std::move(text), pos);
      size_t inner = open + 2 + (sign ? 1 : 0);
      absl::StatusOr<size_t> end =
          kind == '#' ? LexComment(open, inner) : LexTag(kind, open, inner);
      if (!end.ok()) return end.status();
      pos = *end;
      line_starting = pos > 0 && src_[pos - 1] == '\n';
    }
    tokens_.push_back(Token{Tok::kEof, "", 0, 0, LineAt(src_.size())});
    return std::move(tokens_);
  }

 private:
  size_t FindOpener(size_t from) const {
    for (size_t i = from; i + 1 < src_.size(); ++i) {
      if (src_[i] == '{' && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#'))
        return i;
    }
    return std::string::npos;
  }

  static bool AsciiSpace(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
  }
  static std::string RStripWhitespace(const std::string& s) {
    return PyStrip(s, StripSide::kRight, nullptr);
  }

  int LineAt(size_t pos) {
    while (line_pos_ < pos && line_pos_ < src_.size()) {
      if (src_[line_pos_] == '\n') ++line_;
      ++line_pos_;
    }
    return line_;
  }

  void Emit(Tok type, std::string text, size_t pos) {
    tokens_.push_back(Token{type, std::move(text), 0, 0, LineAt(pos)});
  }

  // After a closing delimiter at `pos` (its '-' already seen or not), applies -/trim_blocks.
  size_t AfterClose(size_t pos, bool minus, bool plus, bool trim) {
    if (minus) {
      while (pos < src_.size()) {
        if (AsciiSpace(src_[pos])) {
          ++pos;
          continue;
        }
        utf8proc_int32_t c;
        utf8proc_ssize_t n =
            utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(src_.data() + pos),
                             static_cast<utf8proc_ssize_t>(src_.size() - pos), &c);
        if (n <= 0 || !IsPySpace(static_cast<char32_t>(c))) break;
        pos += static_cast<size_t>(n);
      }
    } else if (trim && !plus && pos < src_.size() && src_[pos] == '\n') {
      ++pos;
    }
    return pos;
  }

  absl::StatusOr<size_t> LexComment(size_t open, size_t inner) {
    size_t close = src_.find("#}", inner);
    if (close == std::string::npos) return SyntaxError(LineAt(open), "unclosed comment");
    bool minus = close > inner && src_[close - 1] == '-';
    return AfterClose(close + 2, minus, false, true);
  }

  // Lexes the expression tokens of a {{ }} or {% %} tag; returns the position after it.
  absl::StatusOr<size_t> LexTag(char kind, size_t open, size_t pos) {
    const bool block = kind == '%';
    const size_t first_token = tokens_.size();
    Emit(block ? Tok::kBlockBegin : Tok::kVarBegin, "", open);
    int depth = 0;  // brackets: a '}}' inside a dict literal does not close the tag
    while (true) {
      while (pos < src_.size() && AsciiSpace(src_[pos])) ++pos;
      if (pos >= src_.size()) return SyntaxError(LineAt(open), "unclosed tag");
      absl::string_view rest = absl::string_view(src_).substr(pos);
      const absl::string_view closer = block ? "%}" : "}}";
      if (depth == 0) {
        bool minus = rest.size() > 2 && rest[0] == '-' && rest.substr(1, 2) == closer;
        bool plus = block && rest.size() > 2 && rest[0] == '+' && rest.substr(1, 2) == closer;
        if (minus || plus || rest.substr(0, 2) == closer) {
          size_t after = pos + 2 + (minus || plus ? 1 : 0);
          Emit(block ? Tok::kBlockEnd : Tok::kVarEnd, "", pos);
          if (block && tokens_.size() == first_token + 3 &&
              tokens_[first_token + 1].type == Tok::kName &&
              tokens_[first_token + 1].text == "raw") {
            return LexRaw(first_token, after, minus);
          }
          return AfterClose(after, minus, plus, block);
        }
      }
      char c = rest[0];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t n = 1;
        while (n < rest.size() &&
               (std::isalnum(static_cast<unsigned char>(rest[n])) || rest[n] == '_'))
          ++n;
        Emit(Tok::kName, std::string(rest.substr(0, n)), pos);
        pos += n;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t n = 0;
        std::string digits;
        auto take_digits = [&] {
          size_t start = n;
          while (n < rest.size() && (std::isdigit(static_cast<unsigned char>(rest[n])) ||
                                     (rest[n] == '_' && n + 1 < rest.size() &&
                                      std::isdigit(static_cast<unsigned char>(rest[n + 1]))))) {
            if (rest[n] != '_') digits.push_back(rest[n]);
            ++n;
          }
          return n > start;
        };
        take_digits();
        bool is_float = false;
        if (n + 1 < rest.size() && rest[n] == '.' &&
            std::isdigit(static_cast<unsigned char>(rest[n + 1]))) {
          digits.push_back('.');
          ++n;
          take_digits();
          is_float = true;
        }
        if (n < rest.size() && (rest[n] == 'e' || rest[n] == 'E')) {
          size_t save = n;
          std::string save_digits = digits;
          digits.push_back('e');
          ++n;
          if (n < rest.size() && (rest[n] == '+' || rest[n] == '-')) digits.push_back(rest[n++]);
          if (take_digits()) {
            is_float = true;
          } else {
            n = save;
            digits = save_digits;
          }
        }
        Token token{is_float ? Tok::kFloat : Tok::kInt, digits, 0, 0, LineAt(pos)};
        if (is_float) {
          token.real = std::strtod(digits.c_str(), nullptr);
        } else {
          auto [ptr, ec] =
              std::from_chars(digits.data(), digits.data() + digits.size(), token.integer);
          if (ec != std::errc()) return SyntaxError(LineAt(pos), "integer literal out of range");
        }
        tokens_.push_back(std::move(token));
        pos += n;
      } else if (c == '\'' || c == '"') {
        absl::StatusOr<size_t> n = LexString(pos);
        if (!n.ok()) return n.status();
        pos += *n;
      } else {
        static constexpr absl::string_view kOps[] = {
            "//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<",
            ">",  "=",  "(",  ")",  "[",  "]",  "{", "}", ",", ".", ":", "|"};
        bool matched = false;
        for (absl::string_view op : kOps) {
          if (rest.substr(0, op.size()) == op) {
            if (op == "(" || op == "[" || op == "{") ++depth;
            if (op == ")" || op == "]" || op == "}") {
              if (depth == 0)
                return SyntaxError(LineAt(pos), absl::StrCat("unexpected '", op, "'"));
              --depth;
            }
            Emit(Tok::kOp, std::string(op), pos);
            pos += op.size();
            matched = true;
            break;
          }
        }
        if (!matched) {
          return SyntaxError(LineAt(pos),
                             absl::StrCat("unexpected character '", std::string(1, c), "'"));
        }
      }
    }
  }

  // Python's unicode-escape decoding of a quoted literal (real newlines allowed inside).
  absl::StatusOr<size_t> LexString(size_t pos) {
    const char quote = src_[pos];
    std::string out;
    size_t i = pos + 1;
    auto hex = [&](size_t digits) -> absl::StatusOr<char32_t> {
      if (i + digits > src_.size()) return SyntaxError(LineAt(pos), "truncated escape");
      uint32_t v = 0;
      for (size_t k = 0; k < digits; ++k) {
        char h = src_[i + k];
        int d = std::isdigit(static_cast<unsigned char>(h)) ? h - '0'
                : (h >= 'a' && h <= 'f')                    ? h - 'a' + 10
                : (h >= 'A' && h <= 'F')                    ? h - 'A' + 10
                                                            : -1;
        if (d < 0) return SyntaxError(LineAt(pos), "invalid escape in string literal");
        v = v * 16 + static_cast<uint32_t>(d);
      }
      i += digits;
      if (v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF))
        return SyntaxError(LineAt(pos), "escape is not a Unicode scalar value");
      return static_cast<char32_t>(v);
    };
    while (true) {
      if (i >= src_.size()) return SyntaxError(LineAt(pos), "unterminated string literal");
      char c = src_[i];
      if (c == quote) {
        ++i;
        break;
      }
      if (c != '\\') {
        out.push_back(c);
        ++i;
        continue;
      }
      if (i + 1 >= src_.size()) return SyntaxError(LineAt(pos), "unterminated string literal");
      char e = src_[i + 1];
      i += 2;
      switch (e) {
        case '\n':
          break;
        case '\\':
          out.push_back('\\');
          break;
        case '\'':
          out.push_back('\'');
          break;
        case '"':
          out.push_back('"');
          break;
        case 'a':
          out.push_back('\a');
          break;
        case 'b':
          out.push_back('\b');
          break;
        case 'f':
          out.push_back('\f');
          break;
        case 'n':
          out.push_back('\n');
          break;
        case 'r':
          out.push_back('\r');
          break;
        case 't':
          out.push_back('\t');
          break;
        case 'v':
          out.push_back('\v');
          break;
        case 'x':
        case 'u':
        case 'U': {
          absl::StatusOr<char32_t> cp = hex(e == 'x' ? 2 : e == 'u' ? 4 : 8);
          if (!cp.ok()) return cp.status();
          AppendUtf8(out, *cp);
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            uint32_t v = static_cast<uint32_t>(e - '0');
            for (int k = 0; k < 2 && i < src_.size() && src_[i] >= '0' && src_[i] <= '7'; ++k)
              v = v * 8 + static_cast<uint32_t>(src_[i++] - '0');
            AppendUtf8(out, static_cast<char32_t>(v));
          } else {
            out.push_back('\\');
            out.push_back(e);
          }
      }
    }
    tokens_.push_back(Token{Tok::kString, std::move(out), 0, 0, LineAt(pos)});
    return i - pos;
  }

  // {% raw %}...{% endraw %}: everything between is data.
  absl::StatusOr<size_t> LexRaw(size_t first_token, size_t pos, bool minus_after_raw) {
    int line = tokens_[first_token].line;
    tokens_.resize(first_token);
    size_t body_start = AfterClose(pos, minus_after_raw, false, true);
    size_t search = body_start;
    while (true) {
      size_t open = src_.find("{%", search);
      if (open == std::string::npos) return SyntaxError(line, "missing endraw");
      size_t i = open + 2;
      bool minus = i < src_.size() && src_[i] == '-';
      if (minus || (i < src_.size() && src_[i] == '+')) ++i;
      while (i < src_.size() && AsciiSpace(src_[i])) ++i;
      if (src_.compare(i, 6, "endraw") != 0) {
        search = open + 2;
        continue;
      }
      i += 6;
      while (i < src_.size() && AsciiSpace(src_[i])) ++i;
      bool close_minus = i < src_.size() && src_[i] == '-';
      if (close_minus) ++i;
      if (src_.compare(i, 2, "%}") != 0) return SyntaxError(line, "malformed endraw");
      std::string body = src_.substr(body_start, open - body_start);
      if (minus) body = RStripWhitespace(body);
      if (!body.empty()) Emit(Tok::kData, std::move(body), body_start);
      return AfterClose(i + 2, close_minus, false, true);
    }
  }

  std::string src_;
  std::vector<Token> tokens_;
  size_t line_pos_ = 0;
  int line_ = 1;
};

// ---------------------------------------------------------------------------------------
// Syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Type {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNeg,
    kPos,
    kNot,
    kBinary,
    kCompare,
    kAnd,
    kOr,
    kCond
  };
  Type type;
  int line = 0;
  Value literal;
  std::string name;              // name, attribute, filter, test or binary operator
  std::vector<std::string> ops;  // comparison operators of a chain
  std::vector<ExprPtr> args;     // operands; kSlice: object, start, stop, step (null = absent)
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
  bool negated = false;  // `is not`
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Type { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kScope };
  Type type;
  int line = 0;
  std::string text;                  // kText; kSet/kSetBlock/kMacro: the name
  std::string attr;                  // kSet on a namespace attribute
  std::vector<std::string> targets;  // kFor targets, kSet unpacking targets
  ExprPtr expr;                      // kOutput, kSet value, kFor iterable, kSet namespace object
  ExprPtr filter;                    // kFor ... if cond
  std::vector<std::pair<ExprPtr, Body>> branches;  // kIf: condition and body per if/elif
  Body body;
  Body else_body;
  std::vector<std::pair<std::string, ExprPtr>> params;  // kMacro params, kScope assignments
};

}  // namespace

struct JinjaTemplate::Program {
  Body body;
};

namespace {

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : tokens_(std::move(tokens)) {}

  absl::Status Run(Body& out) {
    std::string end_tag;
    MOED_RETURN_IF_ERROR(ParseBody(out, {}, &end_tag));
    if (!end_tag.empty())
      return SyntaxError(Peek().line, absl::StrCat("unexpected '", end_tag, "'"));
    return absl::OkStatus();
  }

 private:
  const Token& Peek(size_t ahead = 0) const {
    size_t i = std::min(pos_ + ahead, tokens_.size() - 1);
    return tokens_[i];
  }
  const Token& Next() {
    const Token& t = tokens_[std::min(pos_, tokens_.size() - 1)];
    if (pos_ < tokens_.size() - 1) ++pos_;
    return t;
  }
  bool IsOp(absl::string_view op, size_t ahead = 0) const {
    return Peek(ahead).type == Tok::kOp && Peek(ahead).text == op;
  }
  bool IsName(absl::string_view name, size_t ahead = 0) const {
    return Peek(ahead).type == Tok::kName && Peek(ahead).text == name;
  }
  absl::Status Expect(Tok type, absl::string_view what) {
    if (Peek().type != type) return Unexpected(what);
    Next();
    return absl::OkStatus();
  }
  absl::Status ExpectOp(absl::string_view op) {
    if (!IsOp(op)) return Unexpected(absl::StrCat("'", op, "'"));
    Next();
    return absl::OkStatus();
  }
  absl::Status Unexpected(absl::string_view expected) const {
    const Token& t = Peek();
    std::string got;
    switch (t.type) {
      case Tok::kEof:
        got = "end of template";
        break;
      case Tok::kBlockEnd:
        got = "end of statement block";
        break;
      case Tok::kVarEnd:
        got = "end of print statement";
        break;
      case Tok::kData:
        got = "template data";
        break;
      default:
        got = absl::StrCat("'", t.text, "'");
    }
    return SyntaxError(t.line, absl::StrCat("expected ", expected, ", got ", got));
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().type != Tok::kName) return Unexpected("a name");
    return Next().text;
  }

  // Parses nodes until one of `ends` (a block tag name) or the end of the template; the end
  // tag's name is left in *end_tag (its block is consumed up to the tag name).
  absl::Status ParseBody(Body& out, const std::vector<absl::string_view>& ends,
                         std::string* end_tag) {
    end_tag->clear();
    while (true) {
      const Token& t = Peek();
      if (t.type == Tok::kEof) {
        if (!ends.empty()) {
          return SyntaxError(t.line, absl::StrCat("unexpected end of template, expected '",
                                                  absl::StrJoin(ends, "' or '"), "'"));
        }
        return absl::OkStatus();
      }
      if (t.type == Tok::kData) {
        auto node = std::make_unique<Node>();
        node->type = Node::Type::kText;
        node->line = t.line;
        node->text = Next().text;
        out.push_back(std::move(node));
        continue;
      }
      if (t.type == Tok::kVarBegin) {
        Next();
        auto node = std::make_unique<Node>();
        node->type = Node::Type::kOutput;
        node->line = t.line;
        MOED_ASSIGN_OR_RETURN(node->expr, ParseExpression());
        MOED_RETURN_IF_ERROR(Expect(Tok::kVarEnd, "end of print statement"));
        out.push_back(std::move(node));
        continue;
      }
      if (t.type != Tok::kBlockBegin) return Unexpected("template data or a tag");
      const Token& keyword = Peek(1);
      if (keyword.type != Tok::kName) {
        Next();
        return Unexpected("a statement name");
      }
      if (std::find(ends.begin(), ends.end(), keyword.text) != ends.end()) {
        Next();
        *end_tag = Next().text;
        return absl::OkStatus();
      }
      Next();
      MOED_RETURN_IF_ERROR(ParseStatement(out));
    }
  }

  absl::Status EndBlock() { return Expect(Tok::kBlockEnd, "end of statement block"); }

  absl::Status ParseStatement(Body& out) {
    const Token keyword = Next();
    auto node = std::make_unique<Node>();
    node->line = keyword.line;
    const std::string& k = keyword.text;
    std::string end_tag;
    if (k == "if") {
      node->type = Node::Type::kIf;
      while (true) {
        MOED_ASSIGN_OR_RETURN(ExprPtr cond, ParseExpression());
        MOED_RETURN_IF_ERROR(EndBlock());
        Body body;
        MOED_RETURN_IF_ERROR(ParseBody(body, {"elif", "else", "endif"}, &end_tag));
        node->branches.emplace_back(std::move(cond), std::move(body));
        if (end_tag == "elif") continue;
        if (end_tag == "else") {
          MOED_RETURN_IF_ERROR(EndBlock());
          MOED_RETURN_IF_ERROR(ParseBody(node->else_body, {"endif"}, &end_tag));
        }
        break;
      }
      MOED_RETURN_IF_ERROR(EndBlock());
    } else if (k == "for") {
      node->type = Node::Type::kFor;
      do {
        MOED_ASSIGN_OR_RETURN(std::string target, ExpectName());
        node->targets.push_back(std::move(target));
      } while (IsOp(",") && (Next(), true));
      if (!IsName("in")) return Unexpected("'in'");
      Next();
      MOED_ASSIGN_OR_RETURN(node->expr, ParseCondExpr(/*allow_if=*/false));
      if (IsName("if")) {
        Next();
        MOED_ASSIGN_OR_RETURN(node->filter, ParseExpression());
      }
      if (IsName("recursive"))
        return SyntaxError(keyword.line, "recursive loops are not supported");
      MOED_RETURN_IF_ERROR(EndBlock());
      ++loop_depth_;
      absl::Status body = ParseBody(node->body, {"else", "endfor"}, &end_tag);
      --loop_depth_;
      MOED_RETURN_IF_ERROR(body);
      if (end_tag == "else") {
        MOED_RETURN_IF_ERROR(EndBlock());
        MOED_RETURN_IF_ERROR(ParseBody(node->else_body, {"endfor"}, &end_tag));
      }
      MOED_RETURN_IF_ERROR(EndBlock());
    } else if (k == "set") {
      MOED_ASSIGN_OR_RETURN(std::string name, ExpectName());
      if (IsOp(".")) {
        Next();
        node->type = Node::Type::kSet;
        auto object = std::make_unique<Expr>();
        object->type = Expr::Type::kName;
        object->line = keyword.line;
        object->name = name;
        node->expr = std::move(object);
        MOED_ASSIGN_OR_RETURN(node->attr, ExpectName());
        MOED_RETURN_IF_ERROR(ExpectOp("="));
        MOED_ASSIGN_OR_RETURN(ExprPtr value, ParseTupleOrExpression());
        node->params.emplace_back("", std::move(value));
        MOED_RETURN_IF_ERROR(EndBlock());
      } else if (IsOp("=") || IsOp(",")) {
        node->type = Node::Type::kSet;
        node->targets.push_back(name);
        while (IsOp(",")) {
          Next();
          MOED_ASSIGN_OR_RETURN(std::string more, ExpectName());
          node->targets.push_back(std::move(more));
        }
        MOED_RETURN_IF_ERROR(ExpectOp("="));
        MOED_ASSIGN_OR_RETURN(node->expr, ParseTupleOrExpression());
        MOED_RETURN_IF_ERROR(EndBlock());
      } else {
        node->type = Node::Type::kSetBlock;
        node->text = name;
        if (IsOp("|")) return SyntaxError(keyword.line, "filtered set blocks are not supported");
        MOED_RETURN_IF_ERROR(EndBlock());
        MOED_RETURN_IF_ERROR(ParseBody(node->body, {"endset"}, &end_tag));
        MOED_RETURN_IF_ERROR(EndBlock());
      }
    } else if (k == "macro") {
      node->type = Node::Type::kMacro;
      MOED_ASSIGN_OR_RETURN(node->text, ExpectName());
      MOED_RETURN_IF_ERROR(ExpectOp("("));
      while (!IsOp(")")) {
        MOED_ASSIGN_OR_RETURN(std::string param, ExpectName());
        ExprPtr default_value;
        if (IsOp("=")) {
          Next();
          MOED_ASSIGN_OR_RETURN(default_value, ParseExpression());
        }
        node->params.emplace_back(std::move(param), std::move(default_value));
        if (!IsOp(",")) break;
        Next();
      }
      MOED_RETURN_IF_ERROR(ExpectOp(")"));
      MOED_RETURN_IF_ERROR(EndBlock());
      MOED_RETURN_IF_ERROR(ParseBody(node->body, {"endmacro"}, &end_tag));
      if (Peek().type == Tok::kName) Next();  // {% endmacro name %}
      MOED_RETURN_IF_ERROR(EndBlock());
    } else if (k == "break" || k == "continue") {
      if (loop_depth_ == 0)
        return SyntaxError(keyword.line, absl::StrCat("'", k, "' outside of a loop"));
      node->type = k == "break" ? Node::Type::kBreak : Node::Type::kContinue;
      MOED_RETURN_IF_ERROR(EndBlock());
    } else if (k == "generation" || k == "with") {
      // HF's {% generation %} marks assistant tokens for training masks: it renders its body.
      node->type = Node::Type::kScope;
      while (k == "with" && Peek().type == Tok::kName) {
        MOED_ASSIGN_OR_RETURN(std::string name, ExpectName());
        MOED_RETURN_IF_ERROR(ExpectOp("="));
        MOED_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        node->params.emplace_back(std::move(name), std::move(value));
        if (!IsOp(",")) break;
        Next();
      }
      MOED_RETURN_IF_ERROR(EndBlock());
      MOED_RETURN_IF_ERROR(
          ParseBody(node->body, {k == "with" ? "endwith" : "endgeneration"}, &end_tag));
      MOED_RETURN_IF_ERROR(EndBlock());
    } else {
      return SyntaxError(keyword.line, absl::StrCat("unknown or unsupported tag '", k, "'"));
    }
    out.push_back(std::move(node));
    return absl::OkStatus();
  }

  ExprPtr Make(Expr::Type type, int line) {
    auto e = std::make_unique<Expr>();
    e->type = type;
    e->line = line;
    return e;
  }

  // `a, b` without brackets on the right of a set makes a tuple (a list here).
  absl::StatusOr<ExprPtr> ParseTupleOrExpression() {
    MOED_ASSIGN_OR_RETURN(ExprPtr first, ParseExpression());
    if (!IsOp(",")) return first;
    auto list = Make(Expr::Type::kList, first->line);
    list->args.push_back(std::move(first));
    while (IsOp(",")) {
      Next();
      if (Peek().type == Tok::kBlockEnd) break;
      MOED_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
      list->args.push_back(std::move(item));
    }
    return list;
  }

  absl::StatusOr<ExprPtr> ParseExpression() { return ParseCondExpr(true); }

  absl::StatusOr<ExprPtr> ParseCondExpr(bool allow_if) {
    if (++nesting_ > kMaxNesting) return SyntaxError(Peek().line, "expression nested too deeply");
    struct Guard {
      int& n;
      ~Guard() { --n; }
    } guard{nesting_};
    MOED_ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    while (allow_if && IsName("if")) {
      int line = Next().line;
      auto cond = Make(Expr::Type::kCond, line);
      MOED_ASSIGN_OR_RETURN(ExprPtr test, ParseOr());
      ExprPtr otherwise;
      if (IsName("else")) {
        Next();
        MOED_ASSIGN_OR_RETURN(otherwise, ParseCondExpr(true));
      }
      cond->args.push_back(std::move(test));
      cond->args.push_back(std::move(expr));
      cond->args.push_back(std::move(otherwise));
      expr = std::move(cond);
    }
    return expr;
  }

  // One left-associative precedence level: operands from `operand`, joined by the operators
  // among `ops` (names such as "and" or operator tokens).
  absl::StatusOr<ExprPtr> LeftAssociative(absl::StatusOr<ExprPtr> (Parser::*operand)(),
                                          std::initializer_list<absl::string_view> ops,
                                          Expr::Type type) {
    MOED_ASSIGN_OR_RETURN(ExprPtr left, (this->*operand)());
    while (true) {
      const Token& t = Peek();
      const bool is_op = (t.type == Tok::kOp || t.type == Tok::kName) &&
                         std::find(ops.begin(), ops.end(), t.text) != ops.end();
      if (!is_op) return left;
      auto node = Make(type, t.line);
      node->name = Next().text;
      MOED_ASSIGN_OR_RETURN(ExprPtr right, (this->*operand)());
      node->args.push_back(std::move(left));
      node->args.push_back(std::move(right));
      left = std::move(node);
    }
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    return LeftAssociative(&Parser::ParseAnd, {"or"}, Expr::Type::kOr);
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    return LeftAssociative(&Parser::ParseNot, {"and"}, Expr::Type::kAnd);
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      auto node = Make(Expr::Type::kNot, Next().line);
      if (++nesting_ > kMaxNesting) return SyntaxError(node->line, "expression nested too deeply");
      absl::StatusOr<ExprPtr> operand = ParseNot();
      --nesting_;
      if (!operand.ok()) return operand.status();
      node->args.push_back(std::move(*operand));
      return node;
    }
    return ParseCompare();
  }

  absl::StatusOr<ExprPtr> ParseCompare() {
    MOED_ASSIGN_OR_RETURN(ExprPtr left, ParseMath1());
    ExprPtr chain;
    while (true) {
      std::string op;
      const Token& t = Peek();
      if (t.type == Tok::kOp && (t.text == "==" || t.text == "!=" || t.text == "<" ||
                                 t.text == ">" || t.text == "<=" || t.text == ">=")) {
        op = t.text;
        Next();
      } else if (IsName("in")) {
        op = "in";
        Next();
      } else if (IsName("not") && IsName("in", 1)) {
        op = "not in";
        Next();
        Next();
      } else {
        break;
      }
      if (!chain) {
        chain = Make(Expr::Type::kCompare, t.line);
        chain->args.push_back(std::move(left));
      }
      MOED_ASSIGN_OR_RETURN(ExprPtr right, ParseMath1());
      chain->ops.push_back(std::move(op));
      chain->args.push_back(std::move(right));
    }
    return chain ? std::move(chain) : std::move(left);
  }

  absl::StatusOr<ExprPtr> ParseMath1() {
    return LeftAssociative(&Parser::ParseConcat, {"+", "-"}, Expr::Type::kBinary);
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    return LeftAssociative(&Parser::ParseMath2, {"~"}, Expr::Type::kBinary);
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    return LeftAssociative(&Parser::ParsePow, {"*", "/", "//", "%"}, Expr::Type::kBinary);
  }
  absl::StatusOr<ExprPtr> ParsePow() {
    return LeftAssociative(&Parser::ParseFilteredUnary, {"**"}, Expr::Type::kBinary);
  }
  absl::StatusOr<ExprPtr> ParseFilteredUnary() { return ParseUnary(true); }

  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    if (++nesting_ > kMaxNesting) return SyntaxError(Peek().line, "expression nested too deeply");
    struct Guard {
      int& n;
      ~Guard() { --n; }
    } guard{nesting_};
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      const Token& op = Next();
      node = Make(op.text == "-" ? Expr::Type::kNeg : Expr::Type::kPos, op.line);
      MOED_ASSIGN_OR_RETURN(ExprPtr operand, ParseUnary(false));
      node->args.push_back(std::move(operand));
    } else {
      MOED_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    MOED_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      MOED_ASSIGN_OR_RETURN(node, ParseFilterAndTests(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Token& t = Peek();
    switch (t.type) {
      case Tok::kName: {
        Next();
        auto node = Make(Expr::Type::kLiteral, t.line);
        if (t.text == "true" || t.text == "True") {
          node->literal = Value::Bool(true);
        } else if (t.text == "false" || t.text == "False") {
          node->literal = Value::Bool(false);
        } else if (t.text == "none" || t.text == "None") {
          node->literal = Value::None();
        } else {
          node->type = Expr::Type::kName;
          node->name = t.text;
        }
        return node;
      }
      case Tok::kString: {
        std::string text = Next().text;
        while (Peek().type == Tok::kString) text += Next().text;  // adjacent literals join
        auto node = Make(Expr::Type::kLiteral, t.line);
        node->literal = Value::String(std::move(text));
        return node;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        Next();
        auto node = Make(Expr::Type::kLiteral, t.line);
        node->literal = t.type == Tok::kInt ? Value::Int(t.integer) : Value::Float(t.real);
        return node;
      }
      case Tok::kOp:
        if (t.text == "(") {
          Next();
          if (IsOp(")")) {
            Next();
            return Make(Expr::Type::kList, t.line);  // the empty tuple
          }
          MOED_ASSIGN_OR_RETURN(ExprPtr inner, ParseExpression());
          if (IsOp(",")) {
            auto tuple = Make(Expr::Type::kList, t.line);
            tuple->args.push_back(std::move(inner));
            while (IsOp(",")) {
              Next();
              if (IsOp(")")) break;
              MOED_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
              tuple->args.push_back(std::move(item));
            }
            inner = std::move(tuple);
          }
          MOED_RETURN_IF_ERROR(ExpectOp(")"));
          return inner;
        }
        if (t.text == "[") {
          Next();
          auto list = Make(Expr::Type::kList, t.line);
          while (!IsOp("]")) {
            MOED_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
            list->args.push_back(std::move(item));
            if (!IsOp(",")) break;
            Next();
          }
          MOED_RETURN_IF_ERROR(ExpectOp("]"));
          return list;
        }
        if (t.text == "{") {
          Next();
          auto dict = Make(Expr::Type::kDict, t.line);
          while (!IsOp("}")) {
            MOED_ASSIGN_OR_RETURN(ExprPtr key, ParseExpression());
            MOED_RETURN_IF_ERROR(ExpectOp(":"));
            MOED_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
            dict->args.push_back(std::move(key));
            dict->args.push_back(std::move(value));
            if (!IsOp(",")) break;
            Next();
          }
          MOED_RETURN_IF_ERROR(ExpectOp("}"));
          return dict;
        }
        break;
      default:
        break;
    }
    return Unexpected("an expression");
  }

  absl::Status ParseCallArgs(Expr& call) {
    MOED_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (Peek().type == Tok::kName && IsOp("=", 1)) {
        std::string name = Next().text;
        Next();
        MOED_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        call.kwargs.emplace_back(std::move(name), std::move(value));
      } else {
        if (!call.kwargs.empty())
          return SyntaxError(Peek().line, "positional argument after keyword argument");
        MOED_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        call.args.push_back(std::move(value));
      }
      if (!IsOp(",")) break;
      Next();
    }
    return ExpectOp(")");
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (IsOp(".")) {
        int line = Next().line;
        const Token& t = Peek();
        if (t.type == Tok::kName) {
          auto attr = Make(Expr::Type::kAttr, line);
          attr->name = Next().text;
          attr->args.push_back(std::move(node));
          node = std::move(attr);
        } else if (t.type == Tok::kInt) {
          auto item = Make(Expr::Type::kItem, line);
          auto index = Make(Expr::Type::kLiteral, line);
          index->literal = Value::Int(Next().integer);
          item->args.push_back(std::move(node));
          item->args.push_back(std::move(index));
          node = std::move(item);
        } else {
          return Unexpected("an attribute name");
        }
      } else if (IsOp("[")) {
        int line = Next().line;
        ExprPtr parts[3];
        bool slice = false;
        for (int part = 0; part < 3; ++part) {
          if (!IsOp(":") && !IsOp("]")) {
            MOED_ASSIGN_OR_RETURN(parts[part], ParseExpression());
          }
          if (part < 2 && IsOp(":")) {
            Next();
            slice = true;
          } else {
            break;
          }
        }
        MOED_RETURN_IF_ERROR(ExpectOp("]"));
        if (slice) {
          auto s = Make(Expr::Type::kSlice, line);
          s->args.push_back(std::move(node));
          for (auto& p : parts) s->args.push_back(std::move(p));
          node = std::move(s);
        } else {
          if (!parts[0]) return SyntaxError(line, "expected a subscript");
          auto item = Make(Expr::Type::kItem, line);
          item->args.push_back(std::move(node));
          item->args.push_back(std::move(parts[0]));
          node = std::move(item);
        }
      } else if (IsOp("(")) {
        auto call = Make(Expr::Type::kCall, Peek().line);
        call->args.push_back(std::move(node));
        MOED_RETURN_IF_ERROR(ParseCallArgs(*call));
        node = std::move(call);
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseFilterAndTests(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        int line = Next().line;
        auto filter = Make(Expr::Type::kFilter, line);
        MOED_ASSIGN_OR_RETURN(filter->name, ExpectName());
        while (IsOp(".")) {  // dotted filter names
          Next();
          MOED_ASSIGN_OR_RETURN(std::string part, ExpectName());
          filter->name += "." + part;
        }
        filter->args.push_back(std::move(node));
        if (IsOp("(")) MOED_RETURN_IF_ERROR(ParseCallArgs(*filter));
        node = std::move(filter);
      } else if (IsName("is")) {
        int line = Next().line;
        auto test = Make(Expr::Type::kTest, line);
        if (IsName("not")) {
          Next();
          test->negated = true;
        }
        MOED_ASSIGN_OR_RETURN(test->name, ExpectName());
        test->args.push_back(std::move(node));
        if (IsOp("(")) {
          MOED_RETURN_IF_ERROR(ParseCallArgs(*test));
        } else {
          const Token& t = Peek();
          bool starts_argument =
              t.type == Tok::kString || t.type == Tok::kInt || t.type == Tok::kFloat ||
              (t.type == Tok::kOp && (t.text == "[" || t.text == "{" || t.text == "-")) ||
              (t.type == Tok::kName && t.text != "else" && t.text != "or" && t.text != "and" &&
               t.text != "if" && t.text != "is" && t.text != "in" && t.text != "not");
          if (starts_argument) {
            MOED_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
            MOED_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
            test->args.push_back(std::move(arg));
          }
        }
        node = std::move(test);
      } else {
        return node;
      }
    }
  }

  static constexpr int kMaxNesting = 200;
  std::vector<Token> tokens_;
  size_t pos_ = 0;
  int loop_depth_ = 0;
  int nesting_ = 0;
};

// ---------------------------------------------------------------------------------------
// Rendering.

struct Frame {
  absl::flat_hash_map<std::string, Value> vars;
  std::shared_ptr<Frame> parent;
};
using FramePtr = std::shared_ptr<Frame>;

enum class Flow { kNormal, kBreak, kContinue };

// Total bytes of strings (and list slots) the template may create in one render, beyond the
// output itself: concatenation in a loop can otherwise double a string each iteration.
constexpr size_t kCreatedBytesPerOutputByte = 4;

class Renderer {
 public:
  explicit Renderer(const JinjaRenderOptions& options) : options_(options) {}

  ~Renderer() {
    // Namespaces may hold themselves (set ns.self = ns); break such cycles.
    for (const auto& dict : linked_namespaces_) {
      dict->items.clear();
      dict->index.clear();
    }
  }

  absl::StatusOr<std::string> Run(const Body& body, const nlohmann::ordered_json& context) {
    root_ = std::make_shared<Frame>();
    if (!context.is_object())
      return absl::InvalidArgumentError("template context must be an object");
    for (const auto& [key, value] : context.items()) root_->vars[key] = FromJson(value);
    std::string out;
    out_ = &out;
    absl::StatusOr<Flow> flow = Exec(body, root_);
    out_ = nullptr;
    if (!flow.ok()) return flow.status();
    return out;
  }

  // --- errors and limits -------------------------------------------------------------

  absl::Status Error(absl::string_view message) const {
    return absl::InvalidArgumentError(absl::StrCat("template line ", line_, ": ", message));
  }
  absl::Status Exhausted(absl::string_view what) const {
    return absl::ResourceExhaustedError(
        absl::StrCat("template line ", line_, ": rendering stopped: ", what));
  }
  absl::Status Step() {
    if (++steps_ > options_.limits.max_steps)
      return Exhausted(absl::StrCat("more than ", options_.limits.max_steps, " steps"));
    return absl::OkStatus();
  }
  // Accounts for a new string or list of `bytes`; fails past the render's budget.
  absl::Status Created(size_t bytes) {
    created_bytes_ += bytes;
    if (bytes > options_.limits.max_output_bytes ||
        created_bytes_ > options_.limits.max_output_bytes * kCreatedBytesPerOutputByte) {
      return Exhausted(absl::StrCat("values larger than ",
                                    options_.limits.max_output_bytes * kCreatedBytesPerOutputByte,
                                    " bytes in all"));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<Value> NewString(std::string s) {
    MOED_RETURN_IF_ERROR(Created(s.size()));
    return Value::String(std::move(s));
  }
  absl::StatusOr<Value> NewList(ValueList items) {
    MOED_RETURN_IF_ERROR(Created(items.size() * sizeof(Value)));
    return Value::List(std::move(items));
  }
  absl::Status Append(absl::string_view s) {
    if (out_->size() + s.size() > options_.limits.max_output_bytes)
      return Exhausted(
          absl::StrCat("output larger than ", options_.limits.max_output_bytes, " bytes"));
    out_->append(s.data(), s.size());
    return absl::OkStatus();
  }

  int line() const { return line_; }
  const JinjaRenderOptions& options() const { return options_; }

  // --- statements ----------------------------------------------------------------------

  absl::StatusOr<Flow> Exec(const Body& body, const FramePtr& frame) {
    for (const auto& node_ptr : body) {
      const Node& node = *node_ptr;
      line_ = node.line;
      MOED_RETURN_IF_ERROR(Step());
      switch (node.type) {
        case Node::Type::kText:
          MOED_RETURN_IF_ERROR(Append(node.text));
          break;
        case Node::Type::kOutput: {
          MOED_ASSIGN_OR_RETURN(Value v, Eval(*node.expr, frame));
          line_ = node.line;
          MOED_RETURN_IF_ERROR(Append(ToStr(v)));
          break;
        }
        case Node::Type::kIf: {
          const Body* chosen = &node.else_body;
          for (const auto& [cond, branch] : node.branches) {
            MOED_ASSIGN_OR_RETURN(Value v, Eval(*cond, frame));
            if (Truthy(v)) {
              chosen = &branch;
              break;
            }
          }
          MOED_ASSIGN_OR_RETURN(Flow flow, Exec(*chosen, frame));
          if (flow != Flow::kNormal) return flow;
          break;
        }
        case Node::Type::kFor:
          MOED_RETURN_IF_ERROR(ExecFor(node, frame));
          break;
        case Node::Type::kSet:
          MOED_RETURN_IF_ERROR(ExecSet(node, frame));
          break;
        case Node::Type::kSetBlock: {
          MOED_ASSIGN_OR_RETURN(std::string captured,
                                Capture(node.body, std::make_shared<Frame>(Frame{{}, frame})));
          MOED_ASSIGN_OR_RETURN(frame->vars[node.text], NewString(std::move(captured)));
          break;
        }
        case Node::Type::kMacro:
          frame->vars[node.text] = MakeMacro(node, frame);
          break;
        case Node::Type::kBreak:
          return Flow::kBreak;
        case Node::Type::kContinue:
          return Flow::kContinue;
        case Node::Type::kScope: {
          auto inner = std::make_shared<Frame>(Frame{{}, frame});
          for (const auto& [name, expr] : node.params) {
            MOED_ASSIGN_OR_RETURN(Value v, Eval(*expr, frame));
            inner->vars[name] = std::move(v);
          }
          MOED_ASSIGN_OR_RETURN(Flow flow, Exec(node.body, inner));
          if (flow != Flow::kNormal) return flow;
          break;
        }
      }
    }
    return Flow::kNormal;
  }

  absl::StatusOr<std::string> Capture(const Body& body, const FramePtr& frame) {
    std::string captured;
    std::string* saved = out_;
    out_ = &captured;
    absl::StatusOr<Flow> flow = Exec(body, frame);
    out_ = saved;
    if (!flow.ok()) return flow.status();
    return captured;
  }

  absl::Status Bind(const std::vector<std::string>& targets, const Value& value, Frame& frame) {
    if (targets.size() == 1) {
      frame.vars[targets[0]] = value;
      return absl::OkStatus();
    }
    MOED_ASSIGN_OR_RETURN(ValueList parts, Iterate(value));
    if (parts.size() != targets.size()) {
      return Error(absl::StrCat(parts.size() < targets.size() ? "not enough" : "too many",
                                " values to unpack (expected ", targets.size(), ", got ",
                                parts.size(), ")"));
    }
    for (size_t i = 0; i < targets.size(); ++i) frame.vars[targets[i]] = std::move(parts[i]);
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Node& node, const FramePtr& frame) {
    MOED_ASSIGN_OR_RETURN(Value iterable, Eval(*node.expr, frame));
    line_ = node.line;
    MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(iterable));
    if (node.filter) {
      ValueList kept;
      for (Value& item : items) {
        MOED_RETURN_IF_ERROR(Step());
        auto probe = std::make_shared<Frame>(Frame{{}, frame});
        MOED_RETURN_IF_ERROR(Bind(node.targets, item, *probe));
        MOED_ASSIGN_OR_RETURN(Value keep, Eval(*node.filter, probe));
        if (Truthy(keep)) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      line_ = node.line;
      MOED_RETURN_IF_ERROR(Step());
      auto inner = std::make_shared<Frame>(Frame{{}, frame});
      MOED_RETURN_IF_ERROR(Bind(node.targets, items[static_cast<size_t>(i)], *inner));
      auto loop = std::make_shared<ValueDict>();
      loop->Set("index", Value::Int(i + 1));
      loop->Set("index0", Value::Int(i));
      loop->Set("revindex", Value::Int(n - i));
      loop->Set("revindex0", Value::Int(n - i - 1));
      loop->Set("first", Value::Bool(i == 0));
      loop->Set("last", Value::Bool(i == n - 1));
      loop->Set("length", Value::Int(n));
      loop->Set("depth", Value::Int(1));
      loop->Set("depth0", Value::Int(0));
      loop->Set("previtem", i > 0 ? items[static_cast<size_t>(i - 1)]
                                  : Value::Undefined("there is no previous item"));
      loop->Set("nextitem", i + 1 < n ? items[static_cast<size_t>(i + 1)]
                                      : Value::Undefined("there is no next item"));
      loop->Set("cycle",
                Value::Function("cycle", [i](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
                  if (args.positional.empty()) return r.Error("no items for cycling given");
                  return args.positional[static_cast<size_t>(i) % args.positional.size()];
                }));
      Value loop_value = Value::Namespace(std::move(loop));
      loop_value.boolean = true;  // marks a loop object: attributes cannot be assigned
      inner->vars["loop"] = std::move(loop_value);
      MOED_ASSIGN_OR_RETURN(Flow flow, Exec(node.body, inner));
      if (flow == Flow::kBreak) break;
    }
    if (n == 0 && !node.else_body.empty()) {
      MOED_ASSIGN_OR_RETURN(Flow flow,
                            Exec(node.else_body, std::make_shared<Frame>(Frame{{}, frame})));
      (void)flow;
    }
    return absl::OkStatus();
  }

  absl::Status ExecSet(const Node& node, const FramePtr& frame) {
    if (!node.attr.empty()) {
      MOED_ASSIGN_OR_RETURN(Value target, Eval(*node.expr, frame));
      MOED_ASSIGN_OR_RETURN(Value value, Eval(*node.params[0].second, frame));
      line_ = node.line;
      if (target.kind != Value::Kind::kNamespace || target.boolean)
        return Error("cannot assign attribute on non-namespace object");
      if (value.kind == Value::Kind::kNamespace || value.kind == Value::Kind::kList ||
          value.kind == Value::Kind::kDict) {
        if (linked_set_.insert(target.dict.get()).second) linked_namespaces_.push_back(target.dict);
      }
      target.dict->Set(node.attr, std::move(value));
      return absl::OkStatus();
    }
    MOED_ASSIGN_OR_RETURN(Value value, Eval(*node.expr, frame));
    line_ = node.line;
    return Bind(node.targets, value, *frame);
  }

  Value MakeMacro(const Node& node, const FramePtr& frame) {
    std::weak_ptr<Frame> defining = frame;
    const Node* macro = &node;
    return Value::Function(node.text, [macro, defining](Renderer& r, CallArgs& args) {
      return r.CallMacro(*macro, defining, args);
    });
  }

  absl::StatusOr<Value> CallMacro(const Node& macro, const std::weak_ptr<Frame>& defining,
                                  CallArgs& args) {
    const int call_line = line_;
    if (depth_ >= options_.limits.max_call_depth) {
      return Exhausted(
          absl::StrCat("macro calls nested deeper than ", options_.limits.max_call_depth));
    }
    FramePtr parent = defining.lock();
    auto frame = std::make_shared<Frame>(Frame{{}, parent ? parent : root_});
    const auto& params = macro.params;
    if (args.positional.size() > params.size()) {
      return Error(absl::StrCat("macro '", macro.text, "' takes not more than ", params.size(),
                                " argument(s)"));
    }
    std::vector<bool> bound(params.size(), false);
    for (size_t i = 0; i < args.positional.size(); ++i) {
      frame->vars[params[i].first] = std::move(args.positional[i]);
      bound[i] = true;
    }
    for (auto& [name, value] : args.named) {
      size_t i = 0;
      while (i < params.size() && params[i].first != name) ++i;
      if (i == params.size())
        return Error(
            absl::StrCat("macro '", macro.text, "' takes no keyword argument '", name, "'"));
      if (bound[i])
        return Error(
            absl::StrCat("macro '", macro.text, "' got multiple values for argument '", name, "'"));
      frame->vars[name] = std::move(value);
      bound[i] = true;
    }
    for (size_t i = 0; i < params.size(); ++i) {
      if (bound[i]) continue;
      if (params[i].second) {
        MOED_ASSIGN_OR_RETURN(frame->vars[params[i].first], Eval(*params[i].second, frame));
      } else {
        frame->vars[params[i].first] =
            Value::Undefined(absl::StrCat("parameter '", params[i].first, "' was not provided"));
      }
    }
    ++depth_;
    absl::StatusOr<std::string> out = Capture(macro.body, frame);
    --depth_;
    line_ = call_line;
    if (!out.ok()) return out.status();
    return NewString(std::move(*out));
  }

  // --- expressions ---------------------------------------------------------------------

  Value Lookup(const std::string& name, const FramePtr& frame) {
    for (const Frame* f = frame.get(); f; f = f->parent.get()) {
      auto it = f->vars.find(name);
      if (it != f->vars.end()) return it->second;
    }
    if (std::optional<Value> global = Global(name)) return *global;
    return Value::Undefined(absl::StrCat("'", name, "' is undefined"));
  }

  absl::Status UndefinedError(const Value& v) const {
    return Error(v.text ? *v.text : "value is undefined");
  }

  absl::StatusOr<Value> Eval(const Expr& e, const FramePtr& frame) {
    switch (e.type) {
      case Expr::Type::kLiteral:
        return e.literal;
      case Expr::Type::kName:
        return Lookup(e.name, frame);
      case Expr::Type::kList: {
        ValueList items;
        for (const auto& arg : e.args) {
          MOED_ASSIGN_OR_RETURN(Value v, Eval(*arg, frame));
          items.push_back(std::move(v));
        }
        return NewList(std::move(items));
      }
      case Expr::Type::kDict: {
        auto dict = std::make_shared<ValueDict>();
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          MOED_ASSIGN_OR_RETURN(Value key, Eval(*e.args[i], frame));
          MOED_ASSIGN_OR_RETURN(Value value, Eval(*e.args[i + 1], frame));
          line_ = e.line;
          if (!key.is_string()) return Error("dict literal keys must be strings");
          dict->Set(key.str(), std::move(value));
        }
        MOED_RETURN_IF_ERROR(Created(dict->items.size() * sizeof(Value)));
        return Value::Dict(std::move(dict));
      }
      case Expr::Type::kAttr: {
        MOED_ASSIGN_OR_RETURN(Value object, Eval(*e.args[0], frame));
        line_ = e.line;
        return GetAttr(object, e.name);
      }
      case Expr::Type::kItem: {
        MOED_ASSIGN_OR_RETURN(Value object, Eval(*e.args[0], frame));
        MOED_ASSIGN_OR_RETURN(Value key, Eval(*e.args[1], frame));
        line_ = e.line;
        return GetItem(object, key);
      }
      case Expr::Type::kSlice:
        return EvalSlice(e, frame);
      case Expr::Type::kCall: {
        MOED_ASSIGN_OR_RETURN(Value callee, Eval(*e.args[0], frame));
        MOED_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(e, 1, frame));
        line_ = e.line;
        MOED_RETURN_IF_ERROR(Step());
        if (callee.is_undefined()) return UndefinedError(callee);
        if (callee.kind != Value::Kind::kCallable)
          return Error(absl::StrCat("'", TypeName(callee), "' object is not callable"));
        return callee.fn->call(*this, args);
      }
      case Expr::Type::kFilter: {
        MOED_ASSIGN_OR_RETURN(Value subject, Eval(*e.args[0], frame));
        MOED_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(e, 1, frame));
        line_ = e.line;
        return ApplyFilter(e.name, std::move(subject), args);
      }
      case Expr::Type::kTest: {
        MOED_ASSIGN_OR_RETURN(Value subject, Eval(*e.args[0], frame));
        MOED_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(e, 1, frame));
        line_ = e.line;
        MOED_ASSIGN_OR_RETURN(bool result, ApplyTest(e.name, subject, args));
        return Value::Bool(result != e.negated);
      }
      case Expr::Type::kNeg:
      case Expr::Type::kPos: {
        MOED_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], frame));
        line_ = e.line;
        if (v.is_undefined()) return UndefinedError(v);
        if (!v.is_number())
          return Error(absl::StrCat("bad operand type for unary ",
                                    e.type == Expr::Type::kNeg ? "-" : "+", ": '", TypeName(v),
                                    "'"));
        if (e.type == Expr::Type::kPos)
          return v.kind == Value::Kind::kBool ? Value::Int(v.AsInt()) : v;
        if (v.kind == Value::Kind::kFloat) return Value::Float(-v.real);
        if (v.AsInt() == INT64_MIN) return Error("integer overflow");
        return Value::Int(-v.AsInt());
      }
      case Expr::Type::kNot: {
        MOED_ASSIGN_OR_RETURN(Value v, Eval(*e.args[0], frame));
        return Value::Bool(!Truthy(v));
      }
      case Expr::Type::kAnd:
      case Expr::Type::kOr: {
        MOED_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], frame));
        if (Truthy(left) == (e.type == Expr::Type::kOr)) return left;
        return Eval(*e.args[1], frame);
      }
      case Expr::Type::kCond: {
        MOED_ASSIGN_OR_RETURN(Value test, Eval(*e.args[0], frame));
        if (Truthy(test)) return Eval(*e.args[1], frame);
        if (e.args[2]) return Eval(*e.args[2], frame);
        return Value::Undefined(
            "the inline if expression evaluated to false and no else section was defined");
      }
      case Expr::Type::kBinary: {
        MOED_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], frame));
        MOED_ASSIGN_OR_RETURN(Value right, Eval(*e.args[1], frame));
        line_ = e.line;
        return BinaryOp(e.name, left, right);
      }
      case Expr::Type::kCompare: {
        MOED_ASSIGN_OR_RETURN(Value left, Eval(*e.args[0], frame));
        for (size_t i = 0; i < e.ops.size(); ++i) {
          MOED_ASSIGN_OR_RETURN(Value right, Eval(*e.args[i + 1], frame));
          line_ = e.line;
          MOED_ASSIGN_OR_RETURN(bool holds, CompareOp(e.ops[i], left, right));
          if (!holds) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
    }
    return Error("unknown expression");
  }

  absl::StatusOr<CallArgs> EvalArgs(const Expr& e, size_t first, const FramePtr& frame) {
    CallArgs args;
    for (size_t i = first; i < e.args.size(); ++i) {
      MOED_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i], frame));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [name, expr] : e.kwargs) {
      MOED_ASSIGN_OR_RETURN(Value v, Eval(*expr, frame));
      args.named.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<ValueList> Iterate(const Value& v) {
    switch (v.kind) {
      case Value::Kind::kUndefined:
        return ValueList{};
      case Value::Kind::kList:
        return *v.list;
      case Value::Kind::kDict: {
        ValueList keys;
        for (const auto& [key, item] : v.dict->items) keys.push_back(Value::String(key));
        return keys;
      }
      case Value::Kind::kString: {
        ValueList chars;
        for (char32_t c : DecodeUtf8(v.str())) {
          std::string s;
          AppendUtf8(s, c);
          chars.push_back(Value::String(std::move(s)));
        }
        MOED_RETURN_IF_ERROR(Created(chars.size() * sizeof(Value)));
        return chars;
      }
      default:
        return Error(absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
  }

  Value Unsafe(absl::string_view type, absl::string_view name) {
    std::string message =
        absl::StrCat("access to attribute '", name, "' of '", type, "' object is unsafe.");
    return Value::Function(
        std::string(name),
        [message](Renderer& r, CallArgs&) -> absl::StatusOr<Value> { return r.Error(message); });
  }

  absl::StatusOr<Value> GetAttr(const Value& object, const std::string& name) {
    switch (object.kind) {
      case Value::Kind::kUndefined:
        return UndefinedError(object);
      case Value::Kind::kDict: {
        if (name == "items" || name == "keys" || name == "values" || name == "get")
          return BoundMethod(object, name);
        if (name == "clear" || name == "pop" || name == "popitem" || name == "setdefault" ||
            name == "update")
          return Unsafe("dict", name);
        if (const Value* v = object.dict->Find(name)) return *v;
        break;
      }
      case Value::Kind::kNamespace:
        if (const Value* v = object.dict->Find(name)) return *v;
        break;
      case Value::Kind::kString:
        if (IsStringMethod(name)) return BoundMethod(object, name);
        break;
      case Value::Kind::kList:
        if (name == "count" || name == "index") return BoundMethod(object, name);
        if (name == "append" || name == "pop" || name == "clear" || name == "extend" ||
            name == "insert" || name == "remove" || name == "reverse" || name == "sort")
          return Unsafe("list", name);
        break;
      default:
        break;
    }
    return Value::Undefined(
        absl::StrCat("'", TypeName(object), " object' has no attribute '", name, "'"));
  }

  absl::StatusOr<Value> GetItem(const Value& object, const Value& key) {
    switch (object.kind) {
      case Value::Kind::kUndefined:
        return UndefinedError(object);
      case Value::Kind::kDict:
      case Value::Kind::kNamespace:
        if (key.is_string()) {
          if (const Value* v = object.dict->Find(key.str())) return *v;
          if (object.kind == Value::Kind::kDict) return GetAttr(object, key.str());
        }
        break;
      case Value::Kind::kList:
        if (key.kind == Value::Kind::kInt || key.kind == Value::Kind::kBool) {
          int64_t i = key.AsInt();
          const int64_t n = static_cast<int64_t>(object.list->size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) return (*object.list)[static_cast<size_t>(i)];
        } else if (key.is_string()) {
          return GetAttr(object, key.str());
        }
        break;
      case Value::Kind::kString:
        if (key.kind == Value::Kind::kInt || key.kind == Value::Kind::kBool) {
          std::u32string text = DecodeUtf8(object.str());
          int64_t i = key.AsInt();
          const int64_t n = static_cast<int64_t>(text.size());
          if (i < 0) i += n;
          if (i >= 0 && i < n) {
            std::string s;
            AppendUtf8(s, text[static_cast<size_t>(i)]);
            return Value::String(std::move(s));
          }
        } else if (key.is_string()) {
          return GetAttr(object, key.str());
        }
        break;
      default:
        break;
    }
    return Value::Undefined(
        absl::StrCat("'", TypeName(object), " object' has no attribute '", ToStr(key), "'"));
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e, const FramePtr& frame) {
    MOED_ASSIGN_OR_RETURN(Value object, Eval(*e.args[0], frame));
    std::optional<int64_t> bounds[3];
    for (int i = 0; i < 3; ++i) {
      if (!e.args[i + 1]) continue;
      MOED_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1], frame));
      line_ = e.line;
      if (v.kind == Value::Kind::kNone) continue;
      if (v.kind != Value::Kind::kInt && v.kind != Value::Kind::kBool)
        return Error("slice indices must be integers or None");
      bounds[i] = v.AsInt();
    }
    line_ = e.line;
    if (object.is_undefined()) return UndefinedError(object);
    int64_t n;
    std::u32string text;
    if (object.kind == Value::Kind::kList) {
      n = static_cast<int64_t>(object.list->size());
    } else if (object.is_string()) {
      text = DecodeUtf8(object.str());
      n = static_cast<int64_t>(text.size());
    } else {
      return Value::Undefined(absl::StrCat("'", TypeName(object), "' object is not subscriptable"));
    }
    const int64_t step = bounds[2].value_or(1);
    if (step == 0) return Error("slice step cannot be zero");
    auto clamp = [&](std::optional<int64_t> b, int64_t fallback) {
      if (!b) return fallback;
      int64_t v = *b;
      if (v < 0) v = std::max<int64_t>(v + n, step > 0 ? 0 : -1);
      return std::min<int64_t>(v, step > 0 ? n : n - 1);
    };
    const int64_t start = clamp(bounds[0], step > 0 ? 0 : n - 1);
    const int64_t stop = clamp(bounds[1], step > 0 ? n : -1);
    std::vector<size_t> picked;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
      picked.push_back(static_cast<size_t>(i));
    if (object.kind == Value::Kind::kList) {
      ValueList items;
      items.reserve(picked.size());
      for (size_t i : picked) items.push_back((*object.list)[i]);
      return NewList(std::move(items));
    }
    std::u32string part;
    for (size_t i : picked) part.push_back(text[i]);
    return NewString(EncodeUtf8(part));
  }

  absl::StatusOr<Value> BinaryOp(const std::string& op, const Value& a, const Value& b) {
    if (op == "~") return NewString(ToStr(a) + ToStr(b));
    if (a.is_undefined()) return UndefinedError(a);
    if (b.is_undefined()) return UndefinedError(b);
    if (op == "+") {
      if (a.is_string() && b.is_string()) {
        MOED_RETURN_IF_ERROR(Created(a.str().size() + b.str().size()));
        return Value::String(a.str() + b.str());
      }
      if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
        ValueList items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return NewList(std::move(items));
      }
    }
    if (op == "*" && ((a.is_string() || a.kind == Value::Kind::kList) &&
                      (b.kind == Value::Kind::kInt || b.kind == Value::Kind::kBool))) {
      const int64_t times = std::max<int64_t>(0, b.AsInt());
      const size_t unit = a.is_string() ? a.str().size() : a.list->size() * sizeof(Value);
      if (unit > 0 && static_cast<uint64_t>(times) > options_.limits.max_output_bytes / unit)
        return Exhausted("repetition too large");
      if (a.is_string()) {
        std::string s;
        for (int64_t i = 0; i < times; ++i) s += a.str();
        return NewString(std::move(s));
      }
      ValueList items;
      for (int64_t i = 0; i < times; ++i) items.insert(items.end(), a.list->begin(), a.list->end());
      return NewList(std::move(items));
    }
    if (!a.is_number() || !b.is_number()) {
      if (op == "+" && a.is_string())
        return Error(absl::StrCat("can only concatenate str (not \"", TypeName(b), "\") to str"));
      if (op == "+" && a.kind == Value::Kind::kList)
        return Error(absl::StrCat("can only concatenate list (not \"", TypeName(b), "\") to list"));
      return Error(absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(a),
                                "' and '", TypeName(b), "'"));
    }
    const bool floating = a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat;
    if (op == "/") {
      if (b.AsDouble() == 0) return Error("division by zero");
      return Value::Float(a.AsDouble() / b.AsDouble());
    }
    if (floating) {
      const double x = a.AsDouble(), y = b.AsDouble();
      if (op == "+") return Value::Float(x + y);
      if (op == "-") return Value::Float(x - y);
      if (op == "*") return Value::Float(x * y);
      if (op == "**") return Value::Float(std::pow(x, y));
      if (y == 0) return Error("float modulo or division by zero");
      if (op == "//") return Value::Float(std::floor(x / y));
      if (op == "%") {
        double r = std::fmod(x, y);
        if (r != 0 && ((r < 0) != (y < 0))) r += y;
        return Value::Float(r);
      }
    } else {
      const int64_t x = a.AsInt(), y = b.AsInt();
      int64_t r = 0;
      if (op == "+" && !__builtin_add_overflow(x, y, &r)) return Value::Int(r);
      if (op == "-" && !__builtin_sub_overflow(x, y, &r)) return Value::Int(r);
      if (op == "*" && !__builtin_mul_overflow(x, y, &r)) return Value::Int(r);
      if (op == "**") {
        if (y < 0) return Value::Float(std::pow(static_cast<double>(x), static_cast<double>(y)));
        int64_t acc = 1;
        for (int64_t i = 0; i < y; ++i) {
          if (__builtin_mul_overflow(acc, x, &acc)) return Error("integer overflow");
          if (acc == 0 || acc == 1) break;
        }
        return Value::Int(acc);
      }
      if (op == "//" || op == "%") {
        if (y == 0) return Error("integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) return Error("integer overflow");
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {
          --q;
          m += y;
        }
        return Value::Int(op == "//" ? q : m);
      }
      return Error("integer overflow");
    }
    return Error(absl::StrCat("unknown operator ", op));
  }

  // Python's ordering for the types a template can compare; TypeError otherwise.
  absl::StatusOr<int> Order(const Value& a, const Value& b, absl::string_view op) {
    if (a.is_number() && b.is_number()) {
      if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat) {
        double x = a.AsDouble(), y = b.AsDouble();
        return x < y ? -1 : x > y ? 1 : 0;
      }
      int64_t x = a.AsInt(), y = b.AsInt();
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.is_string() && b.is_string()) {
      int c = a.str().compare(b.str());  // UTF-8 byte order is code point order
      return c < 0 ? -1 : c > 0 ? 1 : 0;
    }
    if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
      for (size_t i = 0; i < a.list->size() && i < b.list->size(); ++i) {
        if (Equal((*a.list)[i], (*b.list)[i])) continue;
        return Order((*a.list)[i], (*b.list)[i], op);
      }
      return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
    }
    if (a.is_undefined()) return UndefinedError(a);
    if (b.is_undefined()) return UndefinedError(b);
    return Error(absl::StrCat("'", op, "' not supported between instances of '", TypeName(a),
                              "' and '", TypeName(b), "'"));
  }

  absl::StatusOr<bool> Contains(const Value& container, const Value& needle) {
    switch (container.kind) {
      case Value::Kind::kUndefined:
        return false;
      case Value::Kind::kString:
        if (!needle.is_string())
          return Error(absl::StrCat("'in <string>' requires string as left operand, not ",
                                    TypeName(needle)));
        return container.str().find(needle.str()) != std::string::npos;
      case Value::Kind::kList:
        for (const Value& item : *container.list)
          if (Equal(item, needle)) return true;
        return false;
      case Value::Kind::kDict:
        return needle.is_string() && container.dict->Find(needle.str()) != nullptr;
      default:
        return Error(absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
    }
  }

  absl::StatusOr<bool> CompareOp(const std::string& op, const Value& a, const Value& b) {
    if (op == "==") return Equal(a, b);
    if (op == "!=") return !Equal(a, b);
    if (op == "in") return Contains(b, a);
    if (op == "not in") {
      MOED_ASSIGN_OR_RETURN(bool in, Contains(b, a));
      return !in;
    }
    MOED_ASSIGN_OR_RETURN(int c, Order(a, b, op));
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  // --- tests ---------------------------------------------------------------------------

  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& v, CallArgs& args) {
    auto arg = [&](size_t i) -> absl::StatusOr<Value> {
      if (i < args.positional.size()) return args.positional[i];
      return Error(absl::StrCat("test '", name, "' needs an argument"));
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.kind == Value::Kind::kNone;
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.kind == Value::Kind::kDict;
    if (name == "iterable")
      return v.is_string() || v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict ||
             v.is_undefined();
    if (name == "sequence")
      return v.is_string() || v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict;
    if (name == "number") return v.is_number();
    if (name == "integer") return v.kind == Value::Kind::kInt;
    if (name == "float") return v.kind == Value::Kind::kFloat;
    if (name == "boolean") return v.kind == Value::Kind::kBool;
    if (name == "true") return v.kind == Value::Kind::kBool && v.boolean;
    if (name == "false") return v.kind == Value::Kind::kBool && !v.boolean;
    if (name == "callable") return v.kind == Value::Kind::kCallable;
    if (name == "lower" || name == "upper")
      return v.is_string() && MapCase(v.str(), name == "upper") == v.str();
    if (name == "odd" || name == "even" || name == "divisibleby") {
      if (v.kind != Value::Kind::kInt && v.kind != Value::Kind::kBool)
        return Error(absl::StrCat("test '", name, "' needs an integer"));
      int64_t d = 2;
      if (name == "divisibleby") {
        MOED_ASSIGN_OR_RETURN(Value by, arg(0));
        if (by.kind != Value::Kind::kInt || by.integer == 0)
          return Error("divisibleby needs a nonzero integer");
        d = by.integer;
      }
      int64_t m = d == -1 ? 0 : v.AsInt() % d;
      return name == "odd" ? m != 0 : m == 0;
    }
    if (name == "in") {
      MOED_ASSIGN_OR_RETURN(Value container, arg(0));
      return Contains(container, v);
    }
    if (name == "sameas") {
      MOED_ASSIGN_OR_RETURN(Value other, arg(0));
      if (v.kind != other.kind) return false;
      if (v.kind == Value::Kind::kNone || v.kind == Value::Kind::kUndefined) return true;
      if (v.kind == Value::Kind::kBool) return v.boolean == other.boolean;
      return Equal(v, other) && v.list == other.list && v.dict == other.dict;
    }
    static const std::pair<absl::string_view, absl::string_view> kComparisons[] = {
        {"equalto", "=="}, {"eq", "=="},         {"==", "=="}, {"ne", "!="}, {"!=", "!="},
        {"lt", "<"},       {"lessthan", "<"},    {"<", "<"},   {"le", "<="}, {"<=", "<="},
        {"gt", ">"},       {"greaterthan", ">"}, {">", ">"},   {"ge", ">="}, {">=", ">="}};
    for (const auto& [test, op] : kComparisons) {
      if (name == test) {
        MOED_ASSIGN_OR_RETURN(Value other, arg(0));
        return CompareOp(std::string(op), v, other);
      }
    }
    return Error(absl::StrCat("no test named '", name, "'"));
  }

  // --- filters -------------------------------------------------------------------------

  // The argument at `index` or named `name`, or nullopt.
  static std::optional<Value> Arg(const CallArgs& args, size_t index, absl::string_view name) {
    for (const auto& [n, v] : args.named)
      if (n == name) return v;
    if (index < args.positional.size()) return args.positional[index];
    return std::nullopt;
  }

  absl::StatusOr<std::string> Json(const Value& v, const CallArgs& args) {
    JsonStyle style;
    if (std::optional<Value> ensure_ascii = Arg(args, 0, "ensure_ascii"))
      style.ensure_ascii = Truthy(*ensure_ascii);
    if (std::optional<Value> indent = Arg(args, 1, "indent");
        indent && indent->kind != Value::Kind::kNone) {
      if (indent->is_string()) {
        style.indent = indent->str();
      } else if (indent->kind == Value::Kind::kInt) {
        style.indent =
            std::string(static_cast<size_t>(std::clamp<int64_t>(indent->integer, 0, 64)), ' ');
      } else {
        return Error("tojson: indent must be an integer or a string");
      }
      style.item_separator = ",";
    }
    if (std::optional<Value> separators = Arg(args, 2, "separators");
        separators && separators->kind != Value::Kind::kNone) {
      if (separators->kind != Value::Kind::kList || separators->list->size() != 2 ||
          !(*separators->list)[0].is_string() || !(*separators->list)[1].is_string())
        return Error("tojson: separators must be a pair of strings");
      style.item_separator = (*separators->list)[0].str();
      style.key_separator = (*separators->list)[1].str();
    }
    if (std::optional<Value> sort_keys = Arg(args, 3, "sort_keys"))
      style.sort_keys = Truthy(*sort_keys);
    std::string out;
    MOED_RETURN_IF_ERROR(AppendJson(out, v, style, 0));
    MOED_RETURN_IF_ERROR(Created(out.size()));
    return out;
  }

  struct JsonStyle {
    bool ensure_ascii = false;
    std::optional<std::string> indent;
    std::string item_separator = ", ";
    std::string key_separator = ": ";
    bool sort_keys = false;
  };

  absl::Status AppendJson(std::string& out, const Value& v, const JsonStyle& style, int level) {
    if (level > 256) return Error("tojson: value nested too deeply");
    if (out.size() > options_.limits.max_output_bytes) return Exhausted("tojson output too large");
    auto newline = [&](int at) {
      if (!style.indent) return;
      out.push_back('\n');
      for (int i = 0; i < at; ++i) out += *style.indent;
    };
    switch (v.kind) {
      case Value::Kind::kNone:
        out += "null";
        return absl::OkStatus();
      case Value::Kind::kBool:
        out += v.boolean ? "true" : "false";
        return absl::OkStatus();
      case Value::Kind::kInt:
        out += std::to_string(v.integer);
        return absl::OkStatus();
      case Value::Kind::kFloat:
        out += std::isnan(v.real)   ? "NaN"
               : std::isinf(v.real) ? (v.real < 0 ? "-Infinity" : "Infinity")
                                    : PyFloatRepr(v.real);
        return absl::OkStatus();
      case Value::Kind::kString:
        AppendJsonString(out, v.str(), style.ensure_ascii);
        return absl::OkStatus();
      case Value::Kind::kList: {
        if (v.list->empty()) {
          out += "[]";
          return absl::OkStatus();
        }
        out.push_back('[');
        for (size_t i = 0; i < v.list->size(); ++i) {
          if (i) out += style.item_separator;
          newline(level + 1);
          MOED_RETURN_IF_ERROR(AppendJson(out, (*v.list)[i], style, level + 1));
        }
        newline(level);
        out.push_back(']');
        return absl::OkStatus();
      }
      case Value::Kind::kDict: {
        if (v.dict->items.empty()) {
          out += "{}";
          return absl::OkStatus();
        }
        std::vector<const std::pair<std::string, Value>*> entries;
        for (const auto& entry : v.dict->items) entries.push_back(&entry);
        if (style.sort_keys)
          std::sort(entries.begin(), entries.end(),
                    [](auto* x, auto* y) { return x->first < y->first; });
        out.push_back('{');
        for (size_t i = 0; i < entries.size(); ++i) {
          if (i) out += style.item_separator;
          newline(level + 1);
          AppendJsonString(out, entries[i]->first, style.ensure_ascii);
          out += style.key_separator;
          MOED_RETURN_IF_ERROR(AppendJson(out, entries[i]->second, style, level + 1));
        }
        newline(level);
        out.push_back('}');
        return absl::OkStatus();
      }
      default:
        return Error(absl::StrCat("Object of type ", TypeName(v), " is not JSON serializable"));
    }
  }

  // Jinja's attribute getter for filters: "a.b" looks up item-then-attribute per part.
  absl::StatusOr<Value> Attribute(const Value& item, const std::string& path) {
    Value v = item;
    size_t start = 0;
    while (true) {
      size_t dot = path.find('.', start);
      std::string part =
          path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      Value key = Value::String(part);
      if (!part.empty() && std::all_of(part.begin(), part.end(), [](char c) {
            return std::isdigit(static_cast<unsigned char>(c));
          }))
        key = Value::Int(std::stoll(part));
      MOED_ASSIGN_OR_RETURN(v, GetItem(v, key));
      if (dot == std::string::npos) return v;
      start = dot + 1;
    }
  }

  absl::StatusOr<bool> SelectTest(const Value& item, const CallArgs& args, size_t test_at) {
    if (test_at >= args.positional.size()) return Truthy(item);
    const Value& test = args.positional[test_at];
    if (!test.is_string()) return Error("the test name must be a string");
    CallArgs rest;
    rest.positional.assign(args.positional.begin() + static_cast<std::ptrdiff_t>(test_at) + 1,
                           args.positional.end());
    return ApplyTest(test.str(), item, rest);
  }

  absl::StatusOr<Value> SortedList(ValueList items, const CallArgs& args, bool dict_items) {
    const bool reverse = Arg(args, 0, "reverse").has_value() && Truthy(*Arg(args, 0, "reverse"));
    const bool case_sensitive =
        Arg(args, 1, "case_sensitive").has_value() && Truthy(*Arg(args, 1, "case_sensitive"));
    std::optional<Value> attribute = Arg(args, 2, "attribute");
    std::vector<std::pair<Value, Value>> keyed;
    for (Value& item : items) {
      Value key = item;
      if (dict_items) key = (*item.list)[0];
      if (attribute && attribute->is_string()) {
        MOED_ASSIGN_OR_RETURN(key, Attribute(item, attribute->str()));
      }
      if (key.is_string() && !case_sensitive) key = Value::String(MapCase(key.str(), false));
      keyed.emplace_back(std::move(key), std::move(item));
    }
    absl::Status failed;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
      absl::StatusOr<int> c = Order(x.first, y.first, "<");
      if (!c.ok()) {
        failed.Update(c.status());
        return false;
      }
      return reverse ? *c > 0 : *c < 0;
    });
    MOED_RETURN_IF_ERROR(failed);
    ValueList sorted;
    for (auto& [key, item] : keyed) sorted.push_back(std::move(item));
    return NewList(std::move(sorted));
  }

  absl::StatusOr<Value> ApplyFilter(const std::string& name, Value v, CallArgs& args) {
    if (name == "safe") return v;
    if (name == "tojson") {
      MOED_ASSIGN_OR_RETURN(std::string json, Json(v, args));
      return Value::String(std::move(json));
    }
    if (name == "string") return NewString(ToStr(v));
    if (name == "default" || name == "d") {
      std::optional<Value> fallback = Arg(args, 0, "default_value");
      const bool boolean = Arg(args, 1, "boolean").has_value() && Truthy(*Arg(args, 1, "boolean"));
      if (v.is_undefined() || (boolean && !Truthy(v))) return fallback.value_or(Value::String(""));
      return v;
    }
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case Value::Kind::kUndefined:
          return Value::Int(0);
        case Value::Kind::kString:
          return Value::Int(static_cast<int64_t>(CodePointCount(v.str())));
        case Value::Kind::kList:
          return Value::Int(static_cast<int64_t>(v.list->size()));
        case Value::Kind::kDict:
          return Value::Int(static_cast<int64_t>(v.dict->items.size()));
        default:
          return Error(absl::StrCat("object of type '", TypeName(v), "' has no len()"));
      }
    }
    if (name == "items") {
      if (v.is_undefined()) return Value::List({});
      if (v.kind != Value::Kind::kDict) return Error("Can only get item pairs from a mapping.");
      return DictItems(v);
    }
    if (name == "trim") {
      std::optional<Value> chars = Arg(args, 0, "chars");
      std::u32string set;
      if (chars && chars->is_string()) set = DecodeUtf8(chars->str());
      return NewString(
          PyStrip(ToStr(v), StripSide::kBoth, chars && chars->is_string() ? &set : nullptr));
    }
    if (name == "lower" || name == "upper") return NewString(MapCase(ToStr(v), name == "upper"));
    if (name == "capitalize") {
      std::u32string text = DecodeUtf8(MapCase(ToStr(v), false));
      if (!text.empty())
        text[0] = static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(text[0])));
      return NewString(EncodeUtf8(text));
    }
    if (name == "title") {
      std::u32string text = DecodeUtf8(ToStr(v));
      bool start = true;
      for (char32_t& c : text) {
        auto cp = static_cast<utf8proc_int32_t>(c);
        const bool letter = utf8proc_category(cp) >= UTF8PROC_CATEGORY_LU &&
                            utf8proc_category(cp) <= UTF8PROC_CATEGORY_LO;
        c = static_cast<char32_t>(start ? utf8proc_toupper(cp) : utf8proc_tolower(cp));
        start = !letter && !(c == '\'');
      }
      return NewString(EncodeUtf8(text));
    }
    if (name == "replace") {
      std::optional<Value> old_value = Arg(args, 0, "old"), new_value = Arg(args, 1, "new");
      if (!old_value || !new_value) return Error("replace needs two arguments");
      std::optional<Value> count = Arg(args, 2, "count");
      return StrReplace(ToStr(v), ToStr(*old_value), ToStr(*new_value),
                        count && count->kind == Value::Kind::kInt ? count->integer : -1);
    }
    if (name == "join") {
      std::optional<Value> sep = Arg(args, 0, "d");
      std::optional<Value> attribute = Arg(args, 1, "attribute");
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      std::string out;
      const std::string separator = sep ? ToStr(*sep) : "";
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += separator;
        Value item = items[i];
        if (attribute && attribute->is_string()) {
          MOED_ASSIGN_OR_RETURN(item, Attribute(item, attribute->str()));
        }
        out += ToStr(item);
        if (out.size() > options_.limits.max_output_bytes)
          return Exhausted("join result too large");
      }
      return NewString(std::move(out));
    }
    if (name == "list") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      return NewList(std::move(items));
    }
    if (name == "first" || name == "last") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      if (items.empty())
        return Value::Undefined(absl::StrCat("No ", name, " item, sequence was empty."));
      return name == "first" ? items.front() : items.back();
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string text = DecodeUtf8(v.str());
        std::reverse(text.begin(), text.end());
        return NewString(EncodeUtf8(text));
      }
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      std::reverse(items.begin(), items.end());
      return NewList(std::move(items));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_if = name == "select" || name == "selectattr";
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      if (by_attr && (args.positional.empty() || !args.positional[0].is_string()))
        return Error(absl::StrCat(name, " needs an attribute name"));
      ValueList kept;
      for (Value& item : items) {
        MOED_RETURN_IF_ERROR(Step());
        Value probe = item;
        if (by_attr) {
          MOED_ASSIGN_OR_RETURN(probe, Attribute(item, args.positional[0].str()));
        }
        MOED_ASSIGN_OR_RETURN(bool pass, SelectTest(probe, args, by_attr ? 1 : 0));
        if (pass == keep_if) kept.push_back(std::move(item));
      }
      return NewList(std::move(kept));
    }
    if (name == "map") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      ValueList mapped;
      std::optional<Value> attribute = Arg(args, 99, "attribute");
      for (Value& item : items) {
        MOED_RETURN_IF_ERROR(Step());
        if (attribute) {
          if (!attribute->is_string()) return Error("map: attribute must be a string");
          MOED_ASSIGN_OR_RETURN(Value got, Attribute(item, attribute->str()));
          if (got.is_undefined()) {
            if (std::optional<Value> fallback = Arg(args, 99, "default")) got = *fallback;
          }
          mapped.push_back(std::move(got));
        } else {
          if (args.positional.empty() || !args.positional[0].is_string())
            return Error("map needs a filter name or attribute=");
          CallArgs rest;
          rest.positional.assign(args.positional.begin() + 1, args.positional.end());
          rest.named = args.named;
          MOED_ASSIGN_OR_RETURN(Value got, ApplyFilter(args.positional[0].str(), item, rest));
          mapped.push_back(std::move(got));
        }
      }
      return NewList(std::move(mapped));
    }
    if (name == "unique") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      const bool case_sensitive =
          Arg(args, 0, "case_sensitive").has_value() && Truthy(*Arg(args, 0, "case_sensitive"));
      std::optional<Value> attribute = Arg(args, 1, "attribute");
      ValueList kept, keys;
      for (Value& item : items) {
        MOED_RETURN_IF_ERROR(Step());
        Value key = item;
        if (attribute && attribute->is_string()) {
          MOED_ASSIGN_OR_RETURN(key, Attribute(item, attribute->str()));
        }
        if (key.is_string() && !case_sensitive) key = Value::String(MapCase(key.str(), false));
        if (std::none_of(keys.begin(), keys.end(), [&](const Value& k) { return Equal(k, key); })) {
          keys.push_back(std::move(key));
          kept.push_back(std::move(item));
        }
      }
      return NewList(std::move(kept));
    }
    if (name == "sort") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      return SortedList(std::move(items), args, false);
    }
    if (name == "dictsort") {
      if (v.kind != Value::Kind::kDict) return Error("dictsort needs a mapping");
      MOED_ASSIGN_OR_RETURN(Value pairs, DictItems(v));
      CallArgs sort_args;
      sort_args.named.emplace_back("case_sensitive",
                                   Arg(args, 0, "case_sensitive").value_or(Value::Bool(false)));
      sort_args.named.emplace_back("reverse", Arg(args, 2, "reverse").value_or(Value::Bool(false)));
      return SortedList(*pairs.list, sort_args, true);
    }
    if (name == "sum" || name == "min" || name == "max") {
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(v));
      std::optional<Value> attribute = Arg(args, name == "sum" ? 0 : 1, "attribute");
      ValueList keys;
      for (const Value& item : items) {
        Value key = item;
        if (attribute && attribute->is_string()) {
          MOED_ASSIGN_OR_RETURN(key, Attribute(item, attribute->str()));
        }
        keys.push_back(std::move(key));
      }
      if (name == "sum") {
        Value total = Arg(args, 1, "start").value_or(Value::Int(0));
        for (const Value& key : keys) {
          MOED_ASSIGN_OR_RETURN(total, BinaryOp("+", total, key));
        }
        return total;
      }
      if (keys.empty())
        return Value::Undefined(absl::StrCat("No aggregated item, sequence was empty."));
      size_t best = 0;
      for (size_t i = 1; i < keys.size(); ++i) {
        MOED_ASSIGN_OR_RETURN(int c, Order(keys[i], keys[best], "<"));
        if (name == "min" ? c < 0 : c > 0) best = i;
      }
      return items[best];
    }
    if (name == "int") {
      Value fallback = Arg(args, 0, "default").value_or(Value::Int(0));
      if (v.kind == Value::Kind::kInt) return v;
      if (v.kind == Value::Kind::kBool) return Value::Int(v.AsInt());
      if (v.kind == Value::Kind::kFloat) {
        if (!std::isfinite(v.real) || std::fabs(v.real) >= 9.2e18) return fallback;
        return Value::Int(static_cast<int64_t>(v.real));
      }
      if (v.is_string()) {
        std::string s = PyStrip(v.str(), StripSide::kBoth, nullptr);
        int64_t i;
        auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), i);
        if (ec == std::errc() && ptr == s.data() + s.size()) return Value::Int(i);
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size() && std::isfinite(d) && std::fabs(d) < 9.2e18)
          return Value::Int(static_cast<int64_t>(d));
      }
      return fallback;
    }
    if (name == "float") {
      Value fallback = Arg(args, 0, "default").value_or(Value::Float(0));
      if (v.is_number()) return Value::Float(v.AsDouble());
      if (v.is_string()) {
        std::string s = PyStrip(v.str(), StripSide::kBoth, nullptr);
        char* end = nullptr;
        double d = std::strtod(s.c_str(), &end);
        if (!s.empty() && end == s.c_str() + s.size()) return Value::Float(d);
      }
      return fallback;
    }
    if (name == "abs") {
      if (!v.is_number())
        return Error(absl::StrCat("bad operand type for abs(): '", TypeName(v), "'"));
      if (v.kind == Value::Kind::kFloat) return Value::Float(std::fabs(v.real));
      if (v.AsInt() == INT64_MIN) return Error("integer overflow");
      return Value::Int(std::llabs(v.AsInt()));
    }
    if (name == "round") {
      if (!v.is_number()) return Error("round needs a number");
      Value precision = Arg(args, 0, "precision").value_or(Value::Int(0));
      std::string method = ToStr(Arg(args, 1, "method").value_or(Value::String("common")));
      const double scale =
          std::pow(10.0, static_cast<double>(std::clamp<int64_t>(precision.AsInt(), -300, 300)));
      double x = v.AsDouble() * scale;
      x = method == "ceil" ? std::ceil(x) : method == "floor" ? std::floor(x) : std::nearbyint(x);
      return Value::Float(x / scale);
    }
    if (name == "indent") {
      Value width = Arg(args, 0, "width").value_or(Value::Int(4));
      const bool first = Arg(args, 1, "first").has_value() && Truthy(*Arg(args, 1, "first"));
      const bool blank = Arg(args, 2, "blank").has_value() && Truthy(*Arg(args, 2, "blank"));
      std::string indent =
          width.is_string()
              ? width.str()
              : std::string(static_cast<size_t>(std::clamp<int64_t>(width.AsInt(), 0, 256)), ' ');
      std::vector<std::string> lines = SplitLines(ToStr(v) + "\n");
      std::string out;
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i) out += "\n";
        if ((i > 0 || first) && (blank || !lines[i].empty())) out += indent;
        out += lines[i];
      }
      return NewString(std::move(out));
    }
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : ToStr(v)) {
        switch (c) {
          case '&':
            out += "&amp;";
            break;
          case '<':
            out += "&lt;";
            break;
          case '>':
            out += "&gt;";
            break;
          case '"':
            out += "&#34;";
            break;
          case '\'':
            out += "&#39;";
            break;
          default:
            out.push_back(c);
        }
      }
      return NewString(std::move(out));
    }
    if (name == "wordcount") {
      int64_t words = 0;
      bool in_word = false;
      for (char32_t c : DecodeUtf8(ToStr(v))) {
        auto category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        bool word =
            c == '_' || (category >= UTF8PROC_CATEGORY_LU && category <= UTF8PROC_CATEGORY_NO);
        if (word && !in_word) ++words;
        in_word = word;
      }
      return Value::Int(words);
    }
    return Error(absl::StrCat("no filter named '", name, "'"));
  }

  absl::StatusOr<Value> DictItems(const Value& v) {
    ValueList pairs;
    for (const auto& [key, item] : v.dict->items)
      pairs.push_back(Value::List({Value::String(key), item}));
    return NewList(std::move(pairs));
  }

  absl::StatusOr<Value> StrReplace(const std::string& s, const std::string& from,
                                   const std::string& to, int64_t count) {
    std::string out;
    if (from.empty()) {
      // Python inserts `to` around every code point.
      std::u32string text = DecodeUtf8(s);
      int64_t done = 0;
      for (size_t i = 0; i <= text.size(); ++i) {
        if (count < 0 || done < count) {
          out += to;
          ++done;
        }
        if (i < text.size()) AppendUtf8(out, text[i]);
        if (out.size() > options_.limits.max_output_bytes)
          return Exhausted("replace result too large");
      }
      return NewString(std::move(out));
    }
    size_t pos = 0;
    int64_t done = 0;
    while (count < 0 || done < count) {
      size_t hit = s.find(from, pos);
      if (hit == std::string::npos) break;
      out.append(s, pos, hit - pos);
      out += to;
      pos = hit + from.size();
      ++done;
      if (out.size() > options_.limits.max_output_bytes)
        return Exhausted("replace result too large");
    }
    out.append(s, pos, std::string::npos);
    return NewString(std::move(out));
  }

  // Python's str.splitlines() (without keepends).
  static std::vector<std::string> SplitLines(const std::string& s) {
    std::vector<std::string> lines;
    std::u32string text = DecodeUtf8(s);
    std::u32string current;
    for (size_t i = 0; i < text.size(); ++i) {
      char32_t c = text[i];
      bool is_break = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                      c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
      if (!is_break) {
        current.push_back(c);
        continue;
      }
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      lines.push_back(EncodeUtf8(current));
      current.clear();
    }
    if (!current.empty()) lines.push_back(EncodeUtf8(current));
    return lines;
  }

  // --- methods -------------------------------------------------------------------------

  static bool IsStringMethod(const std::string& name) {
    static constexpr absl::string_view kMethods[] = {
        "startswith", "endswith", "split",   "rsplit",  "strip",      "lstrip",
        "rstrip",     "lower",    "upper",   "title",   "capitalize", "replace",
        "find",       "rfind",    "count",   "join",    "isdigit",    "isalpha",
        "isalnum",    "isspace",  "islower", "isupper", "splitlines"};
    return std::find(std::begin(kMethods), std::end(kMethods), name) != std::end(kMethods);
  }

  Value BoundMethod(const Value& self, const std::string& name) {
    return Value::Function(
        name, [self, name](Renderer& r, CallArgs& args) { return r.CallMethod(self, name, args); });
  }

  absl::StatusOr<std::vector<std::string>> Split(const std::string& s,
                                                 const std::optional<Value>& sep, int64_t maxsplit,
                                                 bool from_right) {
    std::vector<std::string> parts;
    if (!sep || sep->kind == Value::Kind::kNone) {
      std::u32string text = DecodeUtf8(s);
      std::vector<std::pair<size_t, size_t>> words;
      size_t i = 0;
      while (i < text.size()) {
        while (i < text.size() && IsPySpace(text[i])) ++i;
        if (i == text.size()) break;
        size_t j = i;
        while (j < text.size() && !IsPySpace(text[j])) ++j;
        words.emplace_back(i, j);
        i = j;
      }
      // With maxsplit, the last (or first, from the right) piece keeps its inner whitespace.
      if (maxsplit >= 0 && static_cast<int64_t>(words.size()) > maxsplit + 1) {
        if (!from_right) {
          size_t keep = static_cast<size_t>(maxsplit);
          std::u32string tail = text.substr(words[keep].first);
          size_t end = tail.size();
          while (end > 0 && IsPySpace(tail[end - 1])) --end;
          for (size_t k = 0; k < keep; ++k)
            parts.push_back(
                EncodeUtf8(text.substr(words[k].first, words[k].second - words[k].first)));
          parts.push_back(EncodeUtf8(tail.substr(0, end)));
        } else {
          size_t keep = words.size() - static_cast<size_t>(maxsplit);
          size_t begin = 0;
          while (begin < text.size() && IsPySpace(text[begin])) ++begin;
          parts.push_back(EncodeUtf8(text.substr(begin, words[keep - 1].second - begin)));
          for (size_t k = keep; k < words.size(); ++k)
            parts.push_back(
                EncodeUtf8(text.substr(words[k].first, words[k].second - words[k].first)));
        }
        return parts;
      }
      for (auto [b, e] : words) parts.push_back(EncodeUtf8(text.substr(b, e - b)));
      return parts;
    }
    if (!sep->is_string()) return Error("must be str or None");
    const std::string& separator = sep->str();
    if (separator.empty()) return Error("empty separator");
    if (!from_right) {
      size_t pos = 0;
      while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
        size_t hit = s.find(separator, pos);
        if (hit == std::string::npos) break;
        parts.push_back(s.substr(pos, hit - pos));
        pos = hit + separator.size();
      }
      parts.push_back(s.substr(pos));
      return parts;
    }
    size_t end = s.size();
    std::vector<std::string> reversed;
    while (maxsplit < 0 || static_cast<int64_t>(reversed.size()) < maxsplit) {
      if (end < separator.size()) break;
      size_t hit = s.rfind(separator, end - separator.size());
      if (hit == std::string::npos) break;
      reversed.push_back(s.substr(hit + separator.size(), end - hit - separator.size()));
      end = hit;
    }
    parts.push_back(s.substr(0, end));
    parts.insert(parts.end(), reversed.rbegin(), reversed.rend());
    return parts;
  }

  absl::StatusOr<Value> CallMethod(const Value& self, const std::string& name, CallArgs& args) {
    if (self.kind == Value::Kind::kDict) {
      if (name == "items") return DictItems(self);
      if (name == "keys" || name == "values") {
        ValueList out;
        for (const auto& [key, item] : self.dict->items)
          out.push_back(name == "keys" ? Value::String(key) : item);
        return NewList(std::move(out));
      }
      // get
      std::optional<Value> key = Arg(args, 0, "key");
      if (!key) return Error("get expected at least 1 argument, got 0");
      if (key->is_string())
        if (const Value* v = self.dict->Find(key->str())) return *v;
      return Arg(args, 1, "default").value_or(Value::None());
    }
    if (self.kind == Value::Kind::kList) {
      std::optional<Value> needle = Arg(args, 0, "value");
      if (!needle) return Error(absl::StrCat(name, "() takes exactly one argument"));
      int64_t count = 0;
      for (size_t i = 0; i < self.list->size(); ++i) {
        if (!Equal((*self.list)[i], *needle)) continue;
        if (name == "index") return Value::Int(static_cast<int64_t>(i));
        ++count;
      }
      if (name == "index") return Error(absl::StrCat(ToStr(*needle), " is not in list"));
      return Value::Int(count);
    }
    const std::string& s = self.str();
    auto string_arg = [&](size_t i, absl::string_view arg_name) -> absl::StatusOr<std::string> {
      std::optional<Value> v = Arg(args, i, arg_name);
      if (!v || !v->is_string()) return Error(absl::StrCat(name, "() argument must be str"));
      return v->str();
    };
    if (name == "startswith" || name == "endswith") {
      std::optional<Value> affix = Arg(args, 0, "prefix");
      if (!affix) return Error(absl::StrCat(name, "() takes at least 1 argument (0 given)"));
      ValueList options = affix->kind == Value::Kind::kList ? *affix->list : ValueList{*affix};
      for (const Value& option : options) {
        if (!option.is_string())
          return Error(absl::StrCat(name, " first arg must be str or a tuple of str, not ",
                                    TypeName(option)));
        const std::string& a = option.str();
        if (a.size() <= s.size() &&
            (name == "startswith" ? s.compare(0, a.size(), a) == 0
                                  : s.compare(s.size() - a.size(), a.size(), a) == 0))
          return Value::Bool(true);
      }
      return Value::Bool(false);
    }
    if (name == "split" || name == "rsplit") {
      std::optional<Value> maxsplit = Arg(args, 1, "maxsplit");
      MOED_ASSIGN_OR_RETURN(
          std::vector<std::string> parts,
          Split(s, Arg(args, 0, "sep"), maxsplit ? maxsplit->AsInt() : -1, name == "rsplit"));
      ValueList out;
      for (auto& part : parts) out.push_back(Value::String(std::move(part)));
      MOED_RETURN_IF_ERROR(Created(s.size()));
      return NewList(std::move(out));
    }
    if (name == "splitlines") {
      ValueList out;
      for (auto& line : SplitLines(s)) out.push_back(Value::String(std::move(line)));
      return NewList(std::move(out));
    }
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      std::optional<Value> chars = Arg(args, 0, "chars");
      std::u32string set;
      const bool has_chars = chars && chars->kind != Value::Kind::kNone;
      if (has_chars) {
        if (!chars->is_string()) return Error(absl::StrCat(name, " arg must be None or str"));
        set = DecodeUtf8(chars->str());
      }
      StripSide side = name == "strip"    ? StripSide::kBoth
                       : name == "lstrip" ? StripSide::kLeft
                                          : StripSide::kRight;
      return NewString(PyStrip(s, side, has_chars ? &set : nullptr));
    }
    if (name == "lower" || name == "upper") return NewString(MapCase(s, name == "upper"));
    if (name == "title" || name == "capitalize") {
      CallArgs none;
      return ApplyFilter(name, self, none);
    }
    if (name == "replace") {
      MOED_ASSIGN_OR_RETURN(std::string from, string_arg(0, "old"));
      MOED_ASSIGN_OR_RETURN(std::string to, string_arg(1, "new"));
      std::optional<Value> count = Arg(args, 2, "count");
      return StrReplace(s, from, to, count ? count->AsInt() : -1);
    }
    if (name == "find" || name == "rfind" || name == "count") {
      MOED_ASSIGN_OR_RETURN(std::string sub, string_arg(0, "sub"));
      if (name == "count") {
        if (sub.empty()) return Value::Int(static_cast<int64_t>(CodePointCount(s)) + 1);
        int64_t n = 0;
        for (size_t pos = s.find(sub); pos != std::string::npos;
             pos = s.find(sub, pos + sub.size()))
          ++n;
        return Value::Int(n);
      }
      size_t hit = name == "find" ? s.find(sub) : s.rfind(sub);
      if (hit == std::string::npos) return Value::Int(-1);
      return Value::Int(static_cast<int64_t>(CodePointCount(absl::string_view(s).substr(0, hit))));
    }
    if (name == "join") {
      std::optional<Value> iterable = Arg(args, 0, "iterable");
      if (!iterable) return Error("join() takes exactly one argument (0 given)");
      MOED_ASSIGN_OR_RETURN(ValueList items, Iterate(*iterable));
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (!items[i].is_string())
          return Error(absl::StrCat("sequence item ", i, ": expected str instance, ",
                                    TypeName(items[i]), " found"));
        if (i) out += s;
        out += items[i].str();
        if (out.size() > options_.limits.max_output_bytes)
          return Exhausted("join result too large");
      }
      return NewString(std::move(out));
    }
    // is* predicates
    std::u32string text = DecodeUtf8(s);
    if (text.empty()) return Value::Bool(false);
    bool cased = false;
    for (char32_t c : text) {
      auto category = utf8proc_category(static_cast<utf8proc_int32_t>(c));
      const bool letter = category >= UTF8PROC_CATEGORY_LU && category <= UTF8PROC_CATEGORY_LO;
      const bool digit = category == UTF8PROC_CATEGORY_ND;
      bool ok = true;
      if (name == "isdigit") ok = digit;
      if (name == "isalpha") ok = letter;
      if (name == "isalnum") ok = letter || digit;
      if (name == "isspace") ok = IsPySpace(c);
      if (name == "islower")
        ok = category != UTF8PROC_CATEGORY_LU && category != UTF8PROC_CATEGORY_LT;
      if (name == "isupper") ok = category != UTF8PROC_CATEGORY_LL;
      cased |= category == UTF8PROC_CATEGORY_LU || category == UTF8PROC_CATEGORY_LL ||
               category == UTF8PROC_CATEGORY_LT;
      if (!ok) return Value::Bool(false);
    }
    if (name == "islower" || name == "isupper") return Value::Bool(cased);
    return Value::Bool(true);
  }

  // --- globals -------------------------------------------------------------------------

  std::optional<Value> Global(const std::string& name) {
    if (name == "namespace") {
      return Value::Function("namespace", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
        auto dict = std::make_shared<ValueDict>();
        for (const Value& init : args.positional) {
          if (init.kind != Value::Kind::kDict)
            return r.Error("namespace() takes a mapping and keyword arguments");
          for (const auto& [key, item] : init.dict->items) dict->Set(key, item);
        }
        for (auto& [key, item] : args.named) dict->Set(key, std::move(item));
        return Value::Namespace(std::move(dict));
      });
    }
    if (name == "raise_exception") {
      return Value::Function(
          "raise_exception", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
            std::string message = args.positional.empty() ? "" : ToStr(args.positional[0]);
            absl::Status status = absl::InvalidArgumentError(message);
            status.SetPayload(kJinjaRaisePayload, absl::Cord(absl::StrCat("line ", r.line())));
            return status;
          });
    }
    if (name == "strftime_now") {
      return Value::Function(
          "strftime_now", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
            if (args.positional.empty() || !args.positional[0].is_string())
              return r.Error("strftime_now() needs a format string");
            const std::string& format = args.positional[0].str();
            if (format.empty()) return Value::String("");
            std::tm now = r.options().now;
            std::string buf(64 + format.size() * 16, '\0');
            size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &now);
            buf.resize(n);
            return r.NewString(std::move(buf));
          });
    }
    if (name == "range") {
      return Value::Function("range", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
        int64_t bounds[3] = {0, 0, 1};
        const auto& p = args.positional;
        if (p.empty() || p.size() > 3) return r.Error("range expected 1 to 3 arguments");
        for (const Value& v : p)
          if (v.kind != Value::Kind::kInt && v.kind != Value::Kind::kBool)
            return r.Error(
                absl::StrCat("'", TypeName(v), "' object cannot be interpreted as an integer"));
        if (p.size() == 1) {
          bounds[1] = p[0].AsInt();
        } else {
          bounds[0] = p[0].AsInt();
          bounds[1] = p[1].AsInt();
          if (p.size() == 3) bounds[2] = p[2].AsInt();
        }
        if (bounds[2] == 0) return r.Error("range() arg 3 must not be zero");
        const double count =
            std::ceil((static_cast<double>(bounds[1]) - static_cast<double>(bounds[0])) /
                      static_cast<double>(bounds[2]));
        constexpr double kMaxRange = 100000;  // jinja2.sandbox.MAX_RANGE
        if (count > kMaxRange)
          return r.Error(
              "Range too big. The sandbox blocks ranges larger than MAX_RANGE (100000).");
        ValueList items;
        for (int64_t i = bounds[0]; bounds[2] > 0 ? i < bounds[1] : i > bounds[1]; i += bounds[2])
          items.push_back(Value::Int(i));
        return r.NewList(std::move(items));
      });
    }
    if (name == "dict") {
      return Value::Function("dict", [](Renderer& r, CallArgs& args) -> absl::StatusOr<Value> {
        auto dict = std::make_shared<ValueDict>();
        for (const Value& init : args.positional) {
          if (init.kind != Value::Kind::kDict)
            return r.Error("dict() takes a mapping and keyword arguments");
          for (const auto& [key, item] : init.dict->items) dict->Set(key, item);
        }
        for (auto& [key, item] : args.named) dict->Set(key, std::move(item));
        return Value::Dict(std::move(dict));
      });
    }
    return std::nullopt;
  }

 private:
  const JinjaRenderOptions& options_;
  FramePtr root_;
  std::string* out_ = nullptr;
  int line_ = 0;
  int depth_ = 0;
  int64_t steps_ = 0;
  size_t created_bytes_ = 0;
  std::vector<std::shared_ptr<ValueDict>> linked_namespaces_;
  absl::flat_hash_set<const ValueDict*> linked_set_;
};

}  // namespace

absl::StatusOr<JinjaTemplate> JinjaTemplate::Parse(absl::string_view source) {
  if (!ValidUtf8(source)) return absl::InvalidArgumentError("template is not valid UTF-8");
  // jinja2 normalises newlines and drops one trailing newline (keep_trailing_newline=False).
  std::string text;
  text.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      text.push_back('\n');
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      text.push_back(source[i]);
    }
  }
  if (!text.empty() && text.back() == '\n') text.pop_back();
  MOED_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lexer(std::move(text)).Run());
  auto program = std::make_shared<Program>();
  MOED_RETURN_IF_ERROR(Parser(std::move(tokens)).Run(program->body));
  return JinjaTemplate(std::move(program));
}

absl::StatusOr<std::string> JinjaTemplate::Render(const nlohmann::ordered_json& context,
                                                  const JinjaRenderOptions& options) const {
  Renderer renderer(options);
  return renderer.Run(program_->body, context);
}

}  // namespace moed::model
